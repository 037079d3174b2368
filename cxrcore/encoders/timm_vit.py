"""Generic wrapper: any timm Vision Transformer as ``timm:<model name>``.

timm's own contract gives the token layout: ``forward_features`` returns all tokens
after the final norm, the first ``num_prefix_tokens`` being CLS (if any) and registers;
``forward_head(pre_logits=True)`` is the model's own global embedding (CLS token,
mean or attention pool, as the model was trained). Preprocessing follows the model's
``pretrained_cfg``: mean, std, interpolation and ``crop_pct`` (shortest edge resized to
``floor(size / crop_pct)``, then the centre ``size`` crop). Weights: timm's pretrained ones
(from the Hugging Face hub, cache honoured), a local checkpoint file, or a directory
written by :meth:`Encoder.save`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from ..geometry import Geometry, make_geometry
from .base import Encoder, EncoderSpec, cast_state, explain_load_failure, load_into_meta, read_descriptor, seeded
from .biomedclip import timm_set_input_size

TIMM_STAND_IN = {"embed_dim": 64, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0}


def _create(name: str, *, pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
    import timm

    model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    if not hasattr(model, "patch_embed") or not hasattr(model, "num_prefix_tokens"):
        raise ValueError(f"timm:{name} is not a Vision Transformer with a patch grid; wrap ViTs only")
    return model


def timm_spec(key: str) -> EncoderSpec:
    """Spec of ``timm:<name>`` from timm's model definition and pretrained config (no weights, no network)."""
    import timm

    name = key[5:]
    if not timm.is_model(name):
        raise KeyError(f"{key}: timm has no model {name!r} (see timm.list_models('vit_*'))")
    with torch.device("meta"):
        m = _create(name)
    cfg = m.pretrained_cfg
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    patch = int(m.patch_embed.patch_size[0])
    n_reg = int(getattr(m, "num_reg_tokens", 0))
    has_cls = getattr(m, "cls_token", None) is not None
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    return EncoderSpec(
        key=key, family="timm_vit", weights=name, input_size=size, patch_size=patch, embed_dim=int(m.num_features),
        mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))), std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
        geometry="resize" if cfg.get("crop_mode") == "squash" else "center_crop",
        interpolation=str(cfg.get("interpolation", "bicubic")),
        num_register_tokens=n_reg, has_cls_token=has_cls, global_pool=str(getattr(m, "global_pool", "token")),
        arch={"model_name": name, "crop_pct": crop_pct},
        notes=f"generic wrapper of a timm ViT; global = forward_head(pre_logits=True); crop_pct {crop_pct}",
    )


class TimmViTEncoder(Encoder):
    """A timm ``VisionTransformer``: prefix tokens dropped from the grid, global from ``forward_head``."""

    family = "timm_vit"
    crop_rounding = "round"  # timm's eval transform ends in torchvision's CenterCrop
    resampler = "pil"  # its reference pipeline resizes PIL images

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        timm_set_input_size(self, self.model)

    @classmethod
    def build(cls, spec: EncoderSpec, weights: str | None, stand_in: bool, *, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        name = spec.arch["model_name"]
        if stand_in:
            return seeded(lambda: _create(name, **TIMM_STAND_IN)).to(device=device, dtype=dtype)
        assert weights is not None
        desc = read_descriptor(weights)
        try:
            if desc is not None:
                from safetensors.torch import load_file

                with torch.device("meta"):
                    model = _create(name, **(desc.get("timm_kwargs") or {}))
                    if desc.get("input_size") and tuple(model.patch_embed.img_size) != (desc["input_size"],) * 2:
                        model.set_input_size(img_size=desc["input_size"])
                state = cast_state(load_file(str(Path(weights) / "model.safetensors")), torch.device(device), dtype)
                missing, unexpected = load_into_meta(model, state, what=f"{spec.key} ({weights})")
                if missing or unexpected:
                    raise RuntimeError(f"missing keys {missing[:5]}, unexpected {unexpected[:5]}")
                return model
            # timm builds the model in dtype on device (its device=/dtype= arguments) and copies the
            # published checkpoint into it
            dd = {"device": torch.device(device), "dtype": dtype}
            if Path(weights).expanduser().is_file():
                return _create(name, pretrained=True, pretrained_cfg_overlay={"file": str(Path(weights).expanduser())}, **dd)
            return _create(name, pretrained=True, **dd)  # timm's published weights, via the HF cache
        except (OSError, RuntimeError) as e:
            raise explain_load_failure(spec, weights, e) from e

    @classmethod
    def build_meta(cls, spec: EncoderSpec) -> torch.nn.Module:
        with torch.device("meta"):
            return _create(spec.arch["model_name"])

    def geometry_for(self, hw: tuple[int, int]) -> Geometry:
        """timm's eval transform: shortest edge to ``floor(size / crop_pct)``, then torchvision's ``CenterCrop(size)``."""
        if self.geometry != "center_crop":
            return super().geometry_for(hw)
        crop_pct = float(self.spec.arch.get("crop_pct", 1.0))
        return make_geometry(hw, self.input_size, self.patch_size, "center_crop",
                             resize_short=math.floor(self.input_size / crop_pct), crop_rounding=self.crop_rounding,
                             cell_rule=self.cell_rule, cell_centre0=self.cell_centre0, resampler=self.resampler)

    def forward_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.model.forward_features(pixels)
        b, n, d = tokens.shape
        h, w = self._grid_hw(pixels)
        first = self.model.num_prefix_tokens
        if n - first != h * w:
            raise RuntimeError(f"{self.spec.key}: expected {first} + {h}x{w} tokens, got {n}")
        return self.model.forward_head(tokens, pre_logits=True), tokens[:, first:].reshape(b, h, w, d)

    def save(self, directory: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: t.detach().contiguous().cpu() for k, t in self.model.state_dict().items()},
                  str(path / "model.safetensors"))
        self._write_descriptor(path, timm_kwargs=TIMM_STAND_IN if self.stand_in else None)
        return path
