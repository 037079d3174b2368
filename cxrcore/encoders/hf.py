"""Shared loading for transformers-based families, and the generic ``hf:<model id>`` wrapper.

Every transformers family builds its stand-in and its meta-device model from the
published ``config.json`` fields held in ``EncoderSpec.arch`` (the stand-in only
narrows width and depth), loads weights with ``from_pretrained`` (which honours the
Hugging Face cache and ``HF_HUB_OFFLINE``, reads safetensors, never runs remote code),
and saves with ``save_pretrained``, so a saved stand-in reloads by the hub-id path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import torch

from .base import Encoder, EncoderSpec, explain_load_failure, seeded

#: Narrow, shallow replacement fields of every transformers stand-in (patch size, input
#: size, register tokens, head and token layout are kept from the published config).
HF_STAND_IN = {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 128}


def _resolve_hf_dir(weights: str) -> str:
    """A checkpoint file inside a saved model directory means that directory."""
    p = Path(weights).expanduser()
    if p.is_file() and (p.parent / "config.json").is_file():
        return str(p.parent)
    if p.is_file():
        raise ValueError(
            f"{weights}: a transformers model loads from a directory holding config.json and the weights "
            "(model.safetensors); pass that directory"
        )
    return str(p) if p.exists() else weights


class HFEncoder(Encoder):
    """A family whose model is one transformers class."""

    model_class: ClassVar[str] = ""
    config_class: ClassVar[str] = ""

    @classmethod
    def _classes(cls) -> tuple[type, type]:
        import transformers

        return getattr(transformers, cls.config_class), getattr(transformers, cls.model_class)

    @classmethod
    def config_for(cls, spec: EncoderSpec, stand_in: bool) -> Any:
        cfg_cls, _ = cls._classes()
        fields = dict(spec.arch)
        if stand_in:
            fields.update(HF_STAND_IN)
            if "mlp_ratio" in fields:  # Dinov2Config sizes the MLP by ratio, not intermediate_size
                fields["mlp_ratio"] = 2
        return cfg_cls(**fields)

    @classmethod
    def build(cls, spec: EncoderSpec, weights: str | None, stand_in: bool, *, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        _, model_cls = cls._classes()
        if stand_in:
            cfg = cls.config_for(spec, stand_in=True)
            return seeded(lambda: model_cls(cfg)).to(device=device, dtype=dtype)
        assert weights is not None
        src = _resolve_hf_dir(weights)
        try:
            # dtype explicitly: transformers >= 5 otherwise loads the dtype the checkpoint was saved in.
            # device_map: the weights are materialised on the device, shard by shard (needs accelerate),
            # so ViT-7B in bf16 never exists as an fp32 copy, nor in host RAM as a whole.
            model = model_cls.from_pretrained(src, trust_remote_code=False, dtype=dtype,
                                              device_map=str(torch.device(device)))
        except (OSError, ValueError) as e:  # hub, gated, offline-cache and missing-file errors all land here
            raise explain_load_failure(spec, weights, e) from e
        cls.check_config(spec, model.config, weights)
        return model

    @classmethod
    def check_config(cls, spec: EncoderSpec, config: Any, weights: str) -> None:
        """The loaded config must have the token layout the spec promises."""
        for name in ("patch_size", "num_register_tokens"):
            want = getattr(spec, name)
            got = getattr(config, name, 0 if name == "num_register_tokens" else None)
            if isinstance(got, (list, tuple)):
                got = got[0]
            if got != want:
                raise ValueError(
                    f"{spec.key}: {weights} has {name}={got} in its config, but {spec.key} is published with "
                    f"{name}={want}; these are not this model's weights (use the matching registry key, or "
                    "'hf:<id>' to wrap an arbitrary model)"
                )

    @classmethod
    def build_meta(cls, spec: EncoderSpec) -> torch.nn.Module:
        _, model_cls = cls._classes()
        cfg = cls.config_for(spec, stand_in=False)
        with torch.device("meta"):
            return model_cls(cfg)

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path, safe_serialization=True)
        self._write_descriptor(path)
        return path

    def _prefix_split(self, tokens: torch.Tensor, pixels: torch.Tensor, n_prefix: int) -> torch.Tensor:
        """Patch grid ``[B, h, w, D]`` from tokens laid out as ``[prefix..., patches row-major]``."""
        b, n, d = tokens.shape
        h, w = self._grid_hw(pixels)
        if n - n_prefix != h * w:
            raise RuntimeError(
                f"{self.spec.key}: expected {n_prefix} leading tokens + {h}x{w} patch tokens, got {n} tokens in all"
            )
        return tokens[:, n_prefix:].reshape(b, h, w, d)


# -- generic wrapper: hf:<model id> --------------------------------------------------------------

#: model_type -> (family, whether the tokens start with CLS). Only types whose token layout we know.
HF_MODEL_TYPES = {
    "dinov2": "dinov2",
    "dinov2_with_registers": "dinov2_with_registers",
    "dinov3_vit": "dinov3",
    "siglip_vision_model": "siglip",
    "siglip": "siglip",
    "vit": "vit",
}


#: model_type -> (geometry, interpolation) of the image processor class transformers
#: publishes for it (its class attributes, transformers 5), used when the model's own
#: preprocessor_config.json is not at hand offline: DINOv2's BitImageProcessor resizes the
#: shortest edge and centre-crops (bicubic); SiglipImageProcessor stretches to the size
#: (bicubic); DINOv3ViTImageProcessor and ViTImageProcessor stretch (bilinear).
HF_PROCESSOR_DEFAULTS = {
    "dinov2": ("center_crop", "bicubic"),
    "dinov2_with_registers": ("center_crop", "bicubic"),
    "dinov3_vit": ("resize", "bilinear"),
    "siglip_vision_model": ("resize", "bicubic"),
    "siglip": ("resize", "bicubic"),
    "vit": ("resize", "bilinear"),
}
# PIL resample codes in preprocessor_config.json -> torch interpolation modes
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def processor_geometry(proc: dict[str, Any], default: tuple[str, str]) -> tuple[str, str]:
    """(geometry, interpolation) that a transformers ``preprocessor_config.json`` describes.

    ``size: {shortest_edge}`` with ``do_center_crop`` is ``center_crop``; ``size: {height,
    width}`` without a crop is a stretch (``resize``); anything else keeps ``default``.
    ``resample`` (a PIL code) gives the interpolation.
    """
    size = proc.get("size")
    size = {"shortest_edge": size} if isinstance(size, int) else dict(size or {})
    crop = bool(proc.get("do_center_crop", False))
    geometry = default[0]
    if size.get("shortest_edge") and crop:
        geometry = "center_crop"
    elif size.get("height") and size.get("width") and not crop:
        geometry = "resize"
    return geometry, _PIL_RESAMPLE.get(proc.get("resample"), default[1])


def _processor_dict(model_id: str) -> dict[str, Any] | None:
    """The model's own preprocessor_config.json (local directory or HF cache), or None offline."""
    from transformers.image_processing_utils import ImageProcessingMixin

    try:
        return ImageProcessingMixin.get_image_processor_dict(_resolve_hf_dir(model_id), trust_remote_code=False)[0]
    except (OSError, ValueError):  # no processor file here, or not cached and offline: the family default applies
        return None


def hf_spec(key: str) -> EncoderSpec:
    """Spec of ``hf:<model id>``, read from its config (from the Hugging Face cache or the hub)."""
    from transformers import AutoConfig

    model_id = key[3:]
    spec0 = EncoderSpec(key=key, family="hf", weights=model_id, input_size=0, patch_size=0, embed_dim=0,
                        mean=(0.0,) * 3, std=(1.0,) * 3)
    try:
        cfg = AutoConfig.from_pretrained(_resolve_hf_dir(model_id), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise explain_load_failure(spec0, model_id, e) from e
    mtype = cfg.model_type
    if mtype not in HF_MODEL_TYPES:
        raise ValueError(
            f"{key}: model_type {mtype!r} has no known token layout; supported: {', '.join(HF_MODEL_TYPES)} "
            "(or wrap a timm ViT with 'timm:<name>')"
        )
    if mtype == "siglip":
        cfg = cfg.vision_config
    family = HF_MODEL_TYPES[mtype]
    arch = {k: v for k, v in cfg.to_dict().items() if k not in ("transformers_version", "architectures", "_name_or_path")}
    patch = cfg.patch_size[0] if isinstance(cfg.patch_size, (list, tuple)) else int(cfg.patch_size)
    size = int(cfg.image_size[0] if isinstance(cfg.image_size, (list, tuple)) else cfg.image_size)
    siglip = family == "siglip"
    # normalisation and geometry: the model's own preprocessor_config.json where it is at hand,
    # else what transformers' processor class for this model type does
    # (ViTImageProcessor's defaults are 0.5 too; DINOv2/v3 use the ImageNet statistics)
    half = siglip or mtype == "vit"
    mean, std = ((0.5,) * 3, (0.5,) * 3) if half else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    geometry, interpolation = HF_PROCESSOR_DEFAULTS[mtype]
    proc = _processor_dict(model_id)
    if proc is not None:
        mean, std = tuple(proc.get("image_mean", mean)), tuple(proc.get("image_std", std))
        geometry, interpolation = processor_geometry(proc, (geometry, interpolation))
    return EncoderSpec(
        key=key, family=family, weights=model_id, input_size=size, patch_size=patch, embed_dim=int(cfg.hidden_size),
        mean=mean, std=std, geometry=geometry, interpolation=interpolation,
        num_register_tokens=int(getattr(cfg, "num_register_tokens", 0) or 0), has_cls_token=not siglip,
        global_pool="pooler" if siglip else "cls", arch=arch,
        notes=f"generic wrapper of transformers model_type {mtype!r}",
    )
