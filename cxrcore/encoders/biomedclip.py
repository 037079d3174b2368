"""BiomedCLIP's image tower through open_clip (a timm ViT-B/16 trunk).

open_clip's ``create_model('hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224')``
also builds the PubMedBERT text tower, which needs a second model's config from the
hub; only the image tower is frozen here, so it is built directly from the published
``open_clip_config.json`` (embedded below) as ``open_clip.timm_model.TimmModel`` and
only the ``visual.*`` weights of ``open_clip_pytorch_model.bin`` are loaded.

Tokens: ``visual.trunk.forward_features`` = ``[CLS, patches]`` after the trunk's final
LayerNorm. The global embedding is the 768-d CLS token before the 768 -> 512
projection into the joint image-text space.

Published: Zhang et al. 2025, "A multimodal biomedical foundation model trained from
fifteen million image-text pairs", NEJM AI 2(1), doi:10.1056/AIoa2400640.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .base import Encoder, EncoderSpec, cast_state, torch_load, explain_load_failure, load_into_meta, read_descriptor, seeded

#: ``open_clip_config.json`` of hf.co/microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224,
#: as quoted in open_clip's ``factory.create_model`` docstring (open_clip_torch 3.x).
BIOMEDCLIP_OPEN_CLIP_CONFIG: dict[str, Any] = {
    "model_cfg": {
        "embed_dim": 512,
        "vision_cfg": {
            "timm_model_name": "vit_base_patch16_224",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 224,
        },
        "text_cfg": {
            "hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
            "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
            "hf_proj_type": "mlp",
            "hf_pooler_type": "cls_last_hidden_state_pooler",
            "context_length": 256,
        },
    },
    "preprocess_cfg": {
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
    },
}

#: timm ViT fields replaced in the stand-in (patch 16, input 224, CLS layout kept).
TIMM_STAND_IN = {"embed_dim": 64, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0}

CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def build_visual(config: dict[str, Any], trunk_kwargs: dict[str, Any] | None = None) -> torch.nn.Module:
    """open_clip's image tower (``model.visual``) from an ``open_clip_config.json`` dict."""
    import timm
    from open_clip.timm_model import TimmModel

    m = config["model_cfg"]
    v = m["vision_cfg"]
    if not trunk_kwargs:
        return TimmModel(v["timm_model_name"], embed_dim=m["embed_dim"], image_size=v["image_size"],
                         pool=v.get("timm_pool", "avg"), proj=v.get("timm_proj", "linear"),
                         proj_bias=v.get("timm_proj_bias", False), pretrained=False)
    # Stand-in: open_clip's TimmModel passes no width/depth to timm, so build its skeleton on the meta
    # device and put a narrow trunk and projection in place (same class, same state-dict keys).
    with torch.device("meta"):
        visual = TimmModel(v["timm_model_name"], embed_dim=m["embed_dim"], image_size=v["image_size"],
                           pool=v.get("timm_pool", "avg"), proj=v.get("timm_proj", "linear"), pretrained=False)
    visual.trunk = timm.create_model(v["timm_model_name"], pretrained=False, num_classes=0, **trunk_kwargs)
    visual.head.proj = torch.nn.Linear(visual.trunk.num_features, m["embed_dim"], bias=False)
    return visual


def _fetch(weights: str, filename: str) -> str:
    """Path of ``filename`` from a local directory or a hub repo (Hugging Face cache honoured)."""
    p = Path(weights).expanduser()
    if p.is_dir():
        f = p / filename
        if not f.is_file():
            raise FileNotFoundError(f"{f} does not exist")
        return str(f)
    from huggingface_hub import hf_hub_download

    return hf_hub_download(weights.removeprefix("hf-hub:"), filename)


def _load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Memory-mapped where the format allows: tensors are read when they are moved or cast."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch_load(path)


def timm_set_input_size(encoder: Encoder, trunk: torch.nn.Module) -> None:
    """Resample a timm ViT's position table when run at a size other than its native one."""
    if tuple(trunk.patch_embed.img_size) != (encoder.input_size, encoder.input_size):
        trunk.set_input_size(img_size=encoder.input_size)


class BiomedClipEncoder(Encoder):
    """open_clip ``TimmModel`` image tower: CLS (pre-projection) + patch grid from ``trunk.forward_features``."""

    family = "open_clip_timm"
    crop_rounding = "round"  # open_clip's preprocess is torchvision's Resize + CenterCrop
    library_resampler = "pil"  # its reference pipeline resizes PIL images

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        timm_set_input_size(self, self.model.trunk)

    @classmethod
    def build(cls, spec: EncoderSpec, weights: str | None, stand_in: bool, *, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        if stand_in:
            return seeded(lambda: build_visual(dict(spec.arch), TIMM_STAND_IN)).to(device=device, dtype=dtype)
        assert weights is not None
        desc = read_descriptor(weights) or {}
        try:
            if Path(weights).is_file():
                raise ValueError(f"{weights}: pass the directory (or hub id) holding {CONFIG_FILE} and the weights")
            config = json.loads(Path(_fetch(weights, CONFIG_FILE)).read_text())
            state = None
            for name in WEIGHT_FILES:
                try:
                    state = _load_state_dict(_fetch(weights, name))
                    break
                except Exception as e:  # noqa: BLE001 - try the next published file name, report below
                    last = e
            if state is None:
                raise last  # type: ignore[possibly-undefined]
        except (OSError, ValueError) as e:
            raise explain_load_failure(spec, weights, e) from e
        except Exception as e:  # huggingface_hub errors that are not OSErrors
            if type(e).__module__.startswith("huggingface_hub"):
                raise explain_load_failure(spec, weights, e) from e
            raise
        v = config["model_cfg"]["vision_cfg"]
        want = spec.arch["model_cfg"]["vision_cfg"]
        if v.get("timm_model_name") != want["timm_model_name"] or v.get("image_size") != want["image_size"]:
            raise ValueError(
                f"{spec.key}: {weights}/{CONFIG_FILE} describes {v.get('timm_model_name')} at {v.get('image_size')}, "
                f"not the published {want['timm_model_name']} at {want['image_size']}"
            )
        # the skeleton on the meta device, then the checkpoint's own tensors (cast to dtype on the
        # device, one at a time) become its parameters: no float32 copy, no second copy at all
        with torch.device("meta"):
            visual = build_visual(config, desc.get("trunk_kwargs"))
            if desc.get("input_size") and tuple(visual.trunk.patch_embed.img_size) != (desc["input_size"],) * 2:
                visual.trunk.set_input_size(img_size=desc["input_size"])  # saved at another size: same table shape
        visual_state = {k[len("visual."):]: t for k, t in state.items() if k.startswith("visual.")}
        del state
        if not visual_state:
            raise ValueError(f"{spec.key}: no 'visual.*' weights in {weights}; is this an open_clip checkpoint?")
        missing, unexpected = load_into_meta(visual, cast_state(visual_state, torch.device(device), dtype),
                                             what=f"{spec.key} ({weights})")
        if missing or unexpected:
            raise ValueError(
                f"{spec.key}: weights in {weights} do not fit the image tower: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        return visual

    @classmethod
    def build_meta(cls, spec: EncoderSpec) -> torch.nn.Module:
        with torch.device("meta"):
            return build_visual(dict(spec.arch))

    def forward_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        trunk = self.model.trunk
        tokens = trunk.forward_features(pixels)  # after trunk.norm; fc_norm and head come later and are skipped
        b, n, d = tokens.shape
        h, w = self._grid_hw(pixels)
        first = trunk.num_prefix_tokens
        if n - first != h * w:
            raise RuntimeError(f"{self.spec.key}: expected {first} + {h}x{w} tokens, got {n}")
        return tokens[:, 0], tokens[:, first:].reshape(b, h, w, d)

    def save(self, directory: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        config = dict(self.spec.arch)
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        state = {f"visual.{k}": t.detach().contiguous().cpu() for k, t in self.model.state_dict().items()}
        save_file(state, str(path / WEIGHT_FILES[0]))
        self._write_descriptor(path, trunk_kwargs=TIMM_STAND_IN if self.stand_in else None)
        return path

