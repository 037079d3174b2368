"""Generic wrapper: any timm Vision Transformer as ``timm:<model name>``.

timm's own contract gives the token layout: ``forward_features`` returns all tokens
after the final norm, the first ``num_prefix_tokens`` being CLS (if any) and registers;
``forward_head(pre_logits=True)`` is the model's own global embedding (CLS token,
mean or attention pool, as the model was trained). Preprocessing follows the model's
``pretrained_cfg`` as timm's eval transform (``timm.data.transforms_imagenet_eval``) does:
mean, std, interpolation, ``crop_pct`` and ``crop_mode``. ``crop_mode="center"``: shortest
edge resized to ``floor(size / crop_pct)``, then torchvision's ``CenterCrop(size)``
(geometry ``center_crop``). ``crop_mode="squash"``: ``Resize((floor(size / crop_pct),) * 2)``,
aspect not kept, then ``CenterCrop(size)`` (geometry ``resize_crop``; with crop_pct 1.0 a
plain stretch). ``crop_mode="border"`` (resize the longest edge, pad with the mean colour
per channel) is refused: the padding differs per colour channel, which a grey pipeline
cannot reproduce (in timm 1.0 only DeepSeek's ViTs use it, and those are not wrapped).
Weights: timm's pretrained ones
(from the Hugging Face hub, cache honoured), a local checkpoint file, or a directory
written by :meth:`Encoder.save`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from .base import Encoder, EncoderSpec, cast_state, explain_load_failure, load_into_meta, read_descriptor, seeded

#: timm ViT fields replaced in every stand-in of a timm ViT (here, and the trunks of open_clip towers)
TIMM_STAND_IN = {"embed_dim": 64, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0}


def timm_set_input_size(encoder: Encoder, trunk: torch.nn.Module) -> None:
    """Resample a timm ViT's position table when run at a size other than its native one."""
    if tuple(trunk.patch_embed.img_size) != (encoder.input_size, encoder.input_size):
        trunk.set_input_size(img_size=encoder.input_size)


def timm_vit_tokens(model: torch.nn.Module, pixels: torch.Tensor, grid_hw: tuple[int, int],
                    key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A timm ViT's contract: (``forward_head(pre_logits=True)``, the patch grid of ``forward_features`` without its prefix tokens)."""
    tokens = model.forward_features(pixels)
    b, n, d = tokens.shape
    h, w = grid_hw
    first = model.num_prefix_tokens
    if n - first != h * w:
        raise RuntimeError(f"{key}: expected {first} + {h}x{w} tokens, got {n}")
    return model.forward_head(tokens, pre_logits=True), tokens[:, first:].reshape(b, h, w, d)


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
    # timm's eval transform: crop_pct None means its DEFAULT_CROP_PCT (0.875), crop_mode None means 'center'
    from timm.data.constants import DEFAULT_CROP_MODE, DEFAULT_CROP_PCT

    crop_pct = float(cfg.get("crop_pct") or DEFAULT_CROP_PCT)
    crop_mode = cfg.get("crop_mode") or DEFAULT_CROP_MODE
    if crop_mode not in ("center", "squash"):
        raise ValueError(f"{key}: its pretrained_cfg has crop_mode={crop_mode!r}; cxrcore reproduces timm's 'center' "
                         "and 'squash' eval transforms only ('border' pads with the mean colour of each channel, which "
                         "a grey pipeline cannot); wrap another model")
    return EncoderSpec(
        key=key, family="timm_vit", weights=name, input_size=size, patch_size=patch, embed_dim=int(m.num_features),
        mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))), std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
        geometry="resize_crop" if crop_mode == "squash" else "center_crop", resize_short=math.floor(size / crop_pct),
        interpolation=str(cfg.get("interpolation", "bicubic")),
        num_register_tokens=n_reg, has_cls_token=has_cls, global_pool=str(getattr(m, "global_pool", "token")),
        arch={"model_name": name, "crop_pct": crop_pct, "crop_mode": crop_mode},
        notes=f"generic wrapper of a timm ViT; global = forward_head(pre_logits=True); crop_pct {crop_pct}, "
              f"crop_mode {crop_mode}",
    )


class TimmViTEncoder(Encoder):
    """A timm ``VisionTransformer``: prefix tokens dropped from the grid, global from ``forward_head``."""

    family = "timm_vit"
    crop_rounding = "round"  # timm's eval transform ends in torchvision's CenterCrop
    library_resampler = "pil"  # its reference pipeline resizes PIL images

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
            # frozen, as it runs: torch's FLOP counter otherwise trips on timm's attention-pool latent under no_grad
            return _create(spec.arch["model_name"]).requires_grad_(False)

    @classmethod
    def default_resize_short(cls, spec: EncoderSpec, input_size: int) -> int:
        """timm's rule at any size: ``floor(input_size / crop_pct)`` (``transforms_imagenet_eval``)."""
        return math.floor(input_size / float(spec.arch.get("crop_pct", 1.0)))

    def forward_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return timm_vit_tokens(self.model, pixels, self._grid_hw(pixels), self.spec.key)

    def save(self, directory: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: t.detach().contiguous().cpu() for k, t in self.model.state_dict().items()},
                  str(path / "model.safetensors"))
        self._write_descriptor(path, timm_kwargs=TIMM_STAND_IN if self.stand_in else None)
        return path
