"""The encoder registry: one key per published encoder, one contract (``Encoder.encode``).

The six encoders of the paper are registered under fixed keys; any timm ViT is
reachable as ``timm:<model name>`` and a transformers vision model as ``hf:<model id>``
(for model types whose token layout is known: DINOv2 (with registers), DINOv3, SigLIP, ViT).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .base import (CXRCORE_ENCODER_FILE, FAMILIES, Encoder, EncoderSpec, Encoding, WeightsUnavailableError,
                   read_descriptor, vit_flops)
# importing the family modules registers them in FAMILIES (Encoder.__init_subclass__)
from .biomedclip import BIOMEDCLIP_OPEN_CLIP_CONFIG, BiomedClipEncoder
from .dinov2 import Dinov2Encoder, Dinov2RegistersEncoder, HFViTEncoder
from .dinov3 import Dinov3Encoder
from .hf import hf_spec
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

REGISTRY: dict[str, EncoderSpec] = {
    "rad-dino": EncoderSpec(
        key="rad-dino", family="dinov2", weights="microsoft/rad-dino", input_size=518, patch_size=14,
        embed_dim=768, mean=(0.5307,) * 3, std=(0.2583,) * 3, geometry="center_crop", interpolation="bicubic",
        citation="Perez-Garcia et al. 2025, Nature Machine Intelligence 7:119 (RAD-DINO)", arch=_DINOV2_BASE,
    ),
    "dinov2-b14": EncoderSpec(
        key="dinov2-b14", family="dinov2", weights="facebook/dinov2-base", input_size=518, patch_size=14,
        embed_dim=768, mean=_IMAGENET_MEAN, std=_IMAGENET_STD, geometry="center_crop", interpolation="bicubic",
        citation="Oquab et al. 2024, TMLR (DINOv2)", arch=_DINOV2_BASE,
        notes="run at 518 (37x37 grid); the default HF processor would crop to 224 (16x16)",
    ),
    "dinov3-vit7b16": EncoderSpec(
        key="dinov3-vit7b16", family="dinov3", weights="facebook/dinov3-vit7b16-pretrain-lvd1689m", input_size=224,
        patch_size=16, embed_dim=4096, mean=_IMAGENET_MEAN, std=_IMAGENET_STD, geometry="resize",
        interpolation="bilinear", num_register_tokens=4, gated=True,
        citation="Simeoni et al. 2025, arXiv:2508.10104 (DINOv3)", arch=_DINOV3_7B,
        notes="tokens [CLS, 4 registers, patches]; any multiple of 16 runs (input_size=512 -> 32x32); "
              "the published processor stretches to 224x224 (bilinear)",
    ),
    "biomedclip": EncoderSpec(
        key="biomedclip", family="open_clip_timm",
        weights="hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", input_size=224, patch_size=16,
        embed_dim=768, mean=tuple(BIOMEDCLIP_OPEN_CLIP_CONFIG["preprocess_cfg"]["mean"]),
        std=tuple(BIOMEDCLIP_OPEN_CLIP_CONFIG["preprocess_cfg"]["std"]), geometry="center_crop",
        interpolation="bicubic", citation="Zhang et al. 2025, NEJM AI 2(1) (BiomedCLIP)",
        arch=BIOMEDCLIP_OPEN_CLIP_CONFIG, notes="image tower only; cls = 768-d CLS before the 512-d projection",
    ),
    "medsiglip-448": EncoderSpec(
        key="medsiglip-448", family="siglip", weights="google/medsiglip-448", input_size=448, patch_size=14,
        embed_dim=1152, mean=(0.5,) * 3, std=(0.5,) * 3, geometry="pad_square", interpolation="bilinear",
        has_cls_token=False, global_pool="pooler", gated=True,
        citation="Sellergren et al. 2025, arXiv:2507.05201 (MedGemma / MedSigLIP)", arch=_MEDSIGLIP_448,
        notes="no CLS token: the cls pooling mode is the attention-pool head (pooler_output)",
    ),
    "dino-resnet50": EncoderSpec(
        key="dino-resnet50", family="torchvision_resnet", weights=DINO_RESNET50_URL, input_size=224, patch_size=32,
        embed_dim=2048, mean=_IMAGENET_MEAN, std=_IMAGENET_STD, geometry="center_crop", interpolation="bicubic",
        has_cls_token=False, global_pool="gap",
        citation="Caron et al. 2021, ICCV (DINO)", arch={"layers": [3, 4, 6, 3], "width_per_group": 64},
        notes="layer4 cells (stride 32) are the patches; the cls pooling mode is global average pool == patch_mean",
    ),
}

GENERIC_PREFIXES = ("timm:", "hf:")


def list_encoders() -> list[str]:
    """Registered encoder keys (any timm ViT is also ``timm:<name>``, a transformers model ``hf:<id>``)."""
    return list(REGISTRY)


def check_encoders(keys) -> list[str]:
    """Return ``keys`` as a list, or raise naming the unknown ones and what is accepted (notebook parameters)."""
    keys = [keys] if isinstance(keys, str) else list(keys)
    unknown = [k for k in keys if k not in REGISTRY and not str(k).startswith(GENERIC_PREFIXES)]
    if unknown or not keys:
        raise ValueError(f"unknown encoder(s) {unknown or keys}; accepted: {list_encoders()} "
                         "or 'timm:<model name>' / 'hf:<model id>'")
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
    raise KeyError(
        f"unknown encoder {key!r}; known encoders: {', '.join(REGISTRY)}; "
        "or 'timm:<timm ViT name>' / 'hf:<transformers model id>'"
    )


def load_encoder(key: str, *, weights: str | Path | None = None, stand_in: bool = False,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 input_size: int | None = None) -> Encoder:
    """Load encoder ``key`` from ``weights`` (hub id, local directory or checkpoint file; default: the published one).

    ``stand_in=True`` builds a small seeded random-weight model of the same family, class,
    token layout, preprocessing and input size, for offline runs and tests. A directory
    written by :meth:`Encoder.save` loads through the same code path as a hub id.
    ``dtype=torch.bfloat16`` runs the forward pass under bf16 autocast (for GPUs).
    ``input_size`` overrides the published input side (a multiple of the patch size).
    """
    spec = encoder_spec(key)
    family = FAMILIES[spec.family]
    if stand_in and weights is not None:
        raise ValueError(f"{key}: give either stand_in=True or weights={weights!r}, not both")
    desc = read_descriptor(weights)
    if desc is not None and desc.get("key") != key:
        raise ValueError(f"{weights}/{CXRCORE_ENCODER_FILE} holds encoder {desc.get('key')!r}, not {key!r}; "
                         f"load it with load_encoder({desc.get('key')!r}, weights=...)")
    if stand_in:
        model = family.build(spec, None, stand_in=True)
        src = "random-weight stand-in"
    else:
        src = str(weights) if weights is not None else spec.weights
        model = family.build(spec, src, stand_in=False)
    is_stand_in = stand_in or bool(desc and desc.get("stand_in"))
    size = input_size or (desc.get("input_size") if desc else None)
    return family(spec, model, weights=src, stand_in=is_stand_in, device=device, dtype=dtype, input_size=size)


__all__ = [
    "check_encoders",
    "Encoder", "EncoderSpec", "Encoding", "REGISTRY", "WeightsUnavailableError", "encoder_spec", "list_encoders",
    "load_encoder", "vit_flops",
    "BiomedClipEncoder", "Dinov2Encoder", "Dinov2RegistersEncoder", "Dinov3Encoder", "HFViTEncoder", "ResNetEncoder",
    "SiglipEncoder", "TimmViTEncoder",
]
