"""Generic wrapper: any timm Vision Transformer as ``timm:<model name>``.

timm's own contract gives the token layout: ``forward_features`` returns all tokens
after the final norm, the first ``num_prefix_tokens`` being CLS (if any) and registers;
``forward_head(pre_logits=True)`` is the model's own global embedding (CLS token,
mean or attention pool, as the model was trained). Weights: timm's pretrained ones
(from the Hugging Face hub, cache honoured), a local checkpoint file, or a directory
written by :meth:`Encoder.save`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .base import Encoder, EncoderSpec, explain_load_failure, read_descriptor, seeded
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
    return EncoderSpec(
        key=key, family="timm_vit", weights=name, input_size=size, patch_size=patch, embed_dim=int(m.num_features),
        mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))), std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
        geometry="center_crop", interpolation=str(cfg.get("interpolation", "bicubic")),
        num_register_tokens=n_reg, has_cls_token=has_cls, global_pool=str(getattr(m, "global_pool", "token")),
        arch={"model_name": name}, notes="generic wrapper of a timm ViT; global = forward_head(pre_logits=True)",
    )


class TimmViTEncoder(Encoder):
    """A timm ``VisionTransformer``: prefix tokens dropped from the grid, global from ``forward_head``."""

    family = "timm_vit"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        timm_set_input_size(self, self.model)

    @classmethod
    def build(cls, spec: EncoderSpec, weights: str | None, stand_in: bool) -> torch.nn.Module:
        name = spec.arch["model_name"]
        if stand_in:
            return seeded(lambda: _create(name, **TIMM_STAND_IN))
        assert weights is not None
        desc = read_descriptor(weights)
        try:
            if desc is not None:
                from safetensors.torch import load_file

                model = _create(name, **(desc.get("timm_kwargs") or {}))
                if desc.get("input_size") and tuple(model.patch_embed.img_size) != (desc["input_size"],) * 2:
                    model.set_input_size(img_size=desc["input_size"])
                model.load_state_dict(load_file(str(Path(weights) / "model.safetensors")))
                return model
            if Path(weights).expanduser().is_file():
                return _create(name, pretrained=True, pretrained_cfg_overlay={"file": str(Path(weights).expanduser())})
            return _create(name, pretrained=True)  # timm's published weights, via the HF cache
        except (OSError, RuntimeError) as e:
            raise explain_load_failure(spec, weights, e) from e

    @classmethod
    def build_meta(cls, spec: EncoderSpec) -> torch.nn.Module:
        with torch.device("meta"):
            return _create(spec.arch["model_name"])

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
