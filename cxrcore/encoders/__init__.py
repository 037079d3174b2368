"""The encoder registry: one key per published encoder, one contract (``Encoder.encode``).

The six encoders of the paper are registered under fixed keys; any timm ViT is
reachable as ``timm:<model name>``, a transformers vision model as ``hf:<model id>``
(for model types whose token layout is known: DINOv2 (with registers), DINOv3, SigLIP, ViT),
and the image tower of an open_clip model (a ViT) as ``open_clip:<model name>``,
``open_clip:<model name>@<pretrained tag>``, ``open_clip:hf-hub:<org>/<repo>`` or
``open_clip:local-dir:<directory>`` (:mod:`cxrcore.encoders.openclip`).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .base import (CXRCORE_ENCODER_FILE, FAMILIES, FP32_PARTS, Encoder, EncoderSpec, Encoding,
                   WeightsUnavailableError, read_descriptor, resolve_dtype, vit_flops)
# importing the family modules registers them in FAMILIES (Encoder.__init_subclass__)
from .biomedclip import BIOMEDCLIP_OPEN_CLIP_CONFIG, BiomedClipEncoder
from .dinov2 import Dinov2Encoder, Dinov2RegistersEncoder, HFViTEncoder
from .dinov3 import Dinov3Encoder
from .hf import hf_spec
from .openclip import ID_FORMS as OPEN_CLIP_ID_FORMS, OpenClipEncoder, open_clip_spec
from .resnet import DINO_RESNET50_URL, ResNetEncoder
from .siglip import SiglipEncoder
from .timm_vit import TimmViTEncoder, timm_spec

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

# config.json fields of the published checkpoints (architecture only; nothing is downloaded)
_DINOV2_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "mlp_ratio": 4,
                "patch_size": 14, "image_size": 518, "layer_norm_eps": 1e-6, "layerscale_value": 1.0}
# facebook/dinov3-vit7b16-pretrain-lvd1689m/config.json: SwiGLU MLP 8192 wide, no q/k/v biases, 4 registers
_DINOV3_7B = {"hidden_size": 4096, "intermediate_size": 8192, "num_hidden_layers": 40, "num_attention_heads": 32,
              "patch_size": 16, "image_size": 224, "num_register_tokens": 4, "use_gated_mlp": True,
              "query_bias": False, "key_bias": False, "value_bias": False, "proj_bias": True, "mlp_bias": True,
              "layer_norm_eps": 1e-5, "layerscale_value": 1.0, "rope_theta": 100.0, "hidden_act": "silu"}
# google/medsiglip-448/config.json vision_config: SigLIP So400m/14 at 448
_MEDSIGLIP_448 = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
                  "patch_size": 14, "image_size": 448, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
                  "vision_use_head": True}

_DINOV2_OBJECTIVE = ("self-distillation (DINO image-level + iBOT masked-token losses, KoLeo regulariser), "
                     "Oquab et al. 2024")
_MEDSIGLIP_PAD = ("scale to [0, 1] floats, zero-pad the short side to a square, then resize to 448 (bicubic, in "
                  "float, no clipping): what Google's MedSigLIP serving code does, commented 'method performed in "
                  "training' (github.com/Google-Health/medsiglip, python/serving/predictor.py: _InputImageIter divides "
                  "by the dtype's maximum, _zero_pad_image_to_square, then SiglipImageProcessor(do_rescale=False))")

REGISTRY: dict[str, EncoderSpec] = {
    "rad-dino": EncoderSpec(
        key="rad-dino", family="dinov2", weights="microsoft/rad-dino", input_size=518, patch_size=14,
        embed_dim=768, mean=(0.5307,) * 3, std=(0.2583,) * 3, geometry="center_crop", interpolation="bicubic",
        resize_short=518,
        citation="Perez-Garcia et al. 2025, Nature Machine Intelligence 7:119 (RAD-DINO)", arch=_DINOV2_BASE,
        pretraining_data="public chest X-rays (MIMIC-CXR, CheXpert, NIH ChestX-ray14, PadChest, BRAX; the image "
                         "list is training_images.csv in the model repository), continued from DINOv2-B/14",
        objective="DINOv2 self-supervised objective on chest X-rays (no text); " + _DINOV2_OBJECTIVE,
        input_size_reason="the published processor (microsoft/rad-dino preprocessor_config.json): shortest edge "
                          "518, centre crop 518, bicubic; the size RAD-DINO was trained at",
        token_layout="[CLS, 37x37 patch tokens] after the final LayerNorm", cls_embedding="CLS token (768-d)",
        licence="MIT (model repository LICENSE; earlier revisions: MSRLA)",
    ),
    "dinov2-b14": EncoderSpec(
        key="dinov2-b14", family="dinov2", weights="facebook/dinov2-base", input_size=518, patch_size=14,
        embed_dim=768, mean=_IMAGENET_MEAN, std=_IMAGENET_STD, geometry="center_crop", interpolation="bicubic",
        resize_short=518,
        citation="Oquab et al. 2024, TMLR (DINOv2)", arch=_DINOV2_BASE,
        notes="run at 518 (37x37 grid), crop ratio 1.0; the published processor (BitImageProcessor) resizes the "
              "shortest edge to 256 and centre-crops 224 (16x16): load_encoder('dinov2-b14', input_size=224, "
              "resize_short=256) gives its pixels exactly",
        pretraining_data="LVD-142M (142M curated natural images)", objective=_DINOV2_OBJECTIVE,
        input_size_reason="518, not the published processor's 224 crop: DINOv2 ends pretraining with a short "
                          "adaptation at 518x518 (Oquab et al. 2024, 'Adapting the resolution'), so 518 is a "
                          "native resolution of the weights; RAD-DINO, fine-tuned from these weights, runs at 518, so "
                          "both DINOv2-family encoders see the same 37x37 grid and a lesion spans the same number "
                          "of patches. input_size=224 alone keeps crop ratio 1.0 (shortest edge 224: the "
                          "processor's 16x16 grid, a wider field of view); input_size=224, resize_short=256 is the "
                          "published processor exactly (shortest edge 256, centre crop 224)",
        token_layout="[CLS, 37x37 patch tokens] after the final LayerNorm", cls_embedding="CLS token (768-d)",
        licence="Apache-2.0",
    ),
    "dinov3-vit7b16": EncoderSpec(
        key="dinov3-vit7b16", family="dinov3", weights="facebook/dinov3-vit7b16-pretrain-lvd1689m", input_size=224,
        patch_size=16, embed_dim=4096, mean=_IMAGENET_MEAN, std=_IMAGENET_STD, geometry="resize",
        interpolation="bilinear", num_register_tokens=4, gated=True,
        citation="Simeoni et al. 2025, arXiv:2508.10104 (DINOv3)", arch=_DINOV3_7B,
        notes="tokens [CLS, 4 registers, patches]; any multiple of 16 runs (input_size=512 -> 32x32); "
              "the published processor stretches to 224x224 (bilinear)",
        pretraining_data="LVD-1689M (1.689B curated web images)",
        objective="DINOv2-style self-distillation with Gram anchoring, then high-resolution adaptation "
                  "(Simeoni et al. 2025)",
        input_size_reason="the published processor (DINOv3ViTImageProcessor for this checkpoint): stretch to "
                          "224x224, bilinear, as the model card's feature-extraction example runs it; RoPE positions "
                          "let any multiple of 16 run without resampling a table (input_size=512 for a 32x32 grid), at "
                          "~(size/224)^2 the cost of a 6.7B-parameter model",
        token_layout="[CLS, 4 register tokens, 14x14 patch tokens] after the final LayerNorm; registers are "
                     "neither cls nor patches",
        cls_embedding="CLS token (4096-d)", licence="DINOv3 License (gated: accept it on Hugging Face)",
    ),
    "biomedclip": EncoderSpec(
        key="biomedclip", family="open_clip_timm",
        weights="hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", input_size=224, patch_size=16,
        embed_dim=768, mean=tuple(BIOMEDCLIP_OPEN_CLIP_CONFIG["preprocess_cfg"]["mean"]),
        std=tuple(BIOMEDCLIP_OPEN_CLIP_CONFIG["preprocess_cfg"]["std"]), geometry="center_crop",
        interpolation="bicubic", resize_short=224, citation="Zhang et al. 2025, NEJM AI 2(1) (BiomedCLIP)",
        arch=BIOMEDCLIP_OPEN_CLIP_CONFIG, notes="image tower only; cls = 768-d CLS before the 512-d projection",
        pretraining_data="PMC-15M (15M figure-caption pairs from PubMed Central articles)",
        objective="CLIP contrastive image-text loss with a PubMedBERT text tower",
        input_size_reason="open_clip's preprocess for this checkpoint: Resize(224, bicubic) of the shortest edge, "
                          "CenterCrop(224); the size the ViT-B/16 was trained at",
        token_layout="[CLS, 14x14 patch tokens] after the trunk's final LayerNorm (timm forward_features)",
        cls_embedding="CLS token before the 768->512 image-text projection (768-d)", licence="MIT",
    ),
    "medsiglip-448": EncoderSpec(
        key="medsiglip-448", family="siglip", weights="google/medsiglip-448", input_size=448, patch_size=14,
        embed_dim=1152, mean=(0.5,) * 3, std=(0.5,) * 3, geometry="resize", interpolation="bicubic",
        has_cls_token=False, global_pool="pooler", gated=True,
        citation="Sellergren et al. 2025, arXiv:2507.05201 (MedGemma / MedSigLIP)", arch=_MEDSIGLIP_448,
        notes="no CLS token: the cls pooling mode is the attention-pool head (pooler_output)",
        pretraining_data="de-identified medical image-text pairs (chest X-rays, dermatology, ophthalmology, "
                         "histopathology, CT and MRI slices) mixed with natural image-text pairs (model card)",
        objective="SigLIP sigmoid image-text loss, from SigLIP So400m/14",
        input_size_reason="the published processor (google/medsiglip-448 preprocessor_config.json: "
                          "SiglipImageProcessor, size 448x448, resample 3 = bicubic, mean = std = 0.5): stretch to "
                          "448x448, aspect not kept, no padding. Padding first is offered as geometry='pad_square'",
        token_layout="32x32 patch tokens after post_layernorm; no CLS token",
        cls_embedding="attention-pool head output (pooler_output: a learned query attending over the patch "
                      "tokens, 1152-d), the embedding SigLIP trains against text",
        licence="Health AI Developer Foundations terms of use (gated)",
        geometry_options={"pad_square": _MEDSIGLIP_PAD},
        # the serving code rescales every image to float before padding: 8-bit images are resampled as floats
        option_resamplers={"pad_square": "float"},
    ),
    "dino-resnet50": EncoderSpec(
        key="dino-resnet50", family="torchvision_resnet", weights=DINO_RESNET50_URL, input_size=224, patch_size=32,
        embed_dim=2048, mean=_IMAGENET_MEAN, std=_IMAGENET_STD, geometry="center_crop", interpolation="bicubic",
        has_cls_token=False, global_pool="gap", resize_short=224,
        citation="Caron et al. 2021, ICCV (DINO)", arch={"layers": [3, 4, 6, 3], "width_per_group": 64},
        notes="layer4 cells (stride 32) are the patches; the cls pooling mode is global average pool == patch_mean",
        pretraining_data="ImageNet-1k training images, labels unused",
        objective="DINO self-distillation (student matches a momentum teacher across multi-crop views)",
        input_size_reason="DINO's evaluation transform (torchvision Resize, bicubic, then CenterCrop 224) at crop "
                          "ratio 1.0 (Resize(224), not 256): the 224 input of its linear evaluation, with no border "
                          "cut beyond the centre crop",
        token_layout="7x7 layer4 cells x 2048 channels (output stride 32; cell c centred on input pixel 32c)",
        cls_embedding="global average pool of layer4 (== patch_mean for this encoder)", licence="Apache-2.0",
    ),
}

GENERIC_PREFIXES = ("timm:", "hf:", "open_clip:")
#: what check_encoders and encoder_spec say is accepted besides the registered keys
GENERIC_FORMS = "'timm:<timm ViT name>', 'hf:<transformers model id>', or an open_clip id: " + OPEN_CLIP_ID_FORMS


def list_encoders() -> list[str]:
    """Registered encoder keys (any timm ViT is also ``timm:<name>``, a transformers model ``hf:<id>``, an
    open_clip image tower ``open_clip:<id>``)."""
    return list(REGISTRY)


def check_encoders(keys) -> list[str]:
    """Return ``keys`` as a list, or raise naming the unknown ones and what is accepted (notebook parameters)."""
    keys = [keys] if isinstance(keys, str) else list(keys)
    unknown = [k for k in keys if k not in REGISTRY and not str(k).startswith(GENERIC_PREFIXES)]
    if unknown or not keys:
        raise ValueError(f"unknown encoder(s) {unknown or keys}; accepted: {list_encoders()} or {GENERIC_FORMS}")
    return keys


@functools.lru_cache(maxsize=64)
def encoder_spec(key: str) -> EncoderSpec:
    """Published facts of an encoder: ``input_size``, ``patch_size``, ``grid``, ``num_register_tokens``,
    ``embed_dim``, and (computed on first access, on the meta device) ``num_params`` and ``gflops``."""
    if key in REGISTRY:
        return REGISTRY[key]
    if key.startswith("timm:"):
        return timm_spec(key)
    if key.startswith("hf:"):
        return hf_spec(key)
    if key.startswith("open_clip:"):
        return open_clip_spec(key)
    raise KeyError(f"unknown encoder {key!r}; known encoders: {', '.join(REGISTRY)}; or {GENERIC_FORMS}")


def encoder_options(key: str, *, weights: str | Path | None = None, input_size: int | None = None,
                    geometry: str | None = None, resize_short: int | None = None) -> tuple[int, str, int | None]:
    """``(input_size, geometry, resize_short)`` that ``load_encoder`` with these arguments runs with, checked; no weights read.

    A directory written by :meth:`Encoder.save` brings its own options; arguments given override them
    (``resize_short`` is the saved one only when no option is given).
    """
    spec = encoder_spec(key)
    saved = read_descriptor(weights) or {}
    if input_size is None and geometry is None and resize_short is None:
        resize_short = saved.get("resize_short")
    return FAMILIES[spec.family].resolve_options(
        spec, saved.get("input_size") if input_size is None else input_size,
        saved.get("geometry") if geometry is None else geometry, resize_short)


def load_encoder(key: str, *, weights: str | Path | None = None, stand_in: bool = False,
                 device: str | torch.device = "cpu", dtype: "torch.dtype | str" = torch.float32,
                 input_size: int | None = None, geometry: str | None = None,
                 resize_short: int | None = None) -> Encoder:
    """Load encoder ``key`` from ``weights`` (hub id, local directory or checkpoint file; default: the published one).

    ``stand_in=True`` builds a small seeded random-weight model of the same family, class,
    token layout, preprocessing and input size, for offline runs and tests. A directory
    written by :meth:`Encoder.save` loads through the same code path as a hub id.

    ``dtype`` (``torch.float32`` default, ``torch.bfloat16`` / ``"bfloat16"``, ``torch.float16``)
    is the dtype of the weights, passed to every loader so that the checkpoint's stored
    dtype never decides it; reduced dtypes load straight into that dtype on ``device``
    (no float32 copy) and run under autocast. What stays float32 and why:
    :data:`cxrcore.encoders.base.FP32_PARTS`; the dtypes that ran are in ``provenance()``.

    ``input_size`` overrides the published input side (a multiple of the patch size);
    ``geometry`` picks one of the spec's ``geometry_options`` instead of the published
    preprocessing (e.g. ``"pad_square"`` for MedSigLIP); ``resize_short`` is the side
    resized to before the centre crop of a crop geometry (default: the spec's crop ratio
    at ``input_size``; e.g. ``load_encoder("dinov2-b14", input_size=224, resize_short=256)``
    gives the pixels of DINOv2's published processor). All are recorded in provenance,
    and checked before any weights are read.
    """
    spec = encoder_spec(key)
    family = FAMILIES[spec.family]
    dtype = resolve_dtype(dtype)
    device = torch.device(device)
    if stand_in and weights is not None:
        raise ValueError(f"{key}: give either stand_in=True or weights={weights!r}, not both")
    desc = read_descriptor(weights)
    if desc is not None and desc.get("key") != key:
        raise ValueError(f"{weights}/{CXRCORE_ENCODER_FILE} holds encoder {desc.get('key')!r}, not {key!r}; "
                         f"load it with load_encoder({desc.get('key')!r}, weights=...)")
    # checked against the spec before a (possibly 27 GB) checkpoint is read
    size, geom, short = encoder_options(key, weights=weights, input_size=input_size, geometry=geometry,
                                        resize_short=resize_short)
    if stand_in:
        model = family.build(spec, None, stand_in=True, device=device, dtype=dtype)
        src = "random-weight stand-in"
    else:
        src = str(weights) if weights is not None else spec.weights
        model = family.build(spec, src, stand_in=False, device=device, dtype=dtype)
    is_stand_in = stand_in or bool(desc and desc.get("stand_in"))
    return family(spec, model, weights=src, stand_in=is_stand_in, device=device, dtype=dtype, input_size=size,
                  geometry=geom, resize_short=short)


__all__ = [
    "check_encoders", "encoder_options",
    "Encoder", "EncoderSpec", "Encoding", "REGISTRY", "WeightsUnavailableError", "encoder_spec", "list_encoders",
    "load_encoder", "vit_flops",
    "BiomedClipEncoder", "Dinov2Encoder", "Dinov2RegistersEncoder", "Dinov3Encoder", "HFViTEncoder", "OpenClipEncoder",
    "ResNetEncoder", "SiglipEncoder", "TimmViTEncoder",
]
