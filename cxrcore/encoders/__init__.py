"""The encoder registry: one key per published encoder, one contract (``Encoder.encode``)."""

from __future__ import annotations

from pathlib import Path

import torch

from .base import CXRCORE_ENCODER_FILE, Encoder, EncoderSpec, Encoding
from .dinov2 import Dinov2Encoder

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

REGISTRY: dict[str, tuple[EncoderSpec, type[Encoder]]] = {
    "rad-dino": (
        EncoderSpec(
            key="rad-dino", family="dinov2", weights="microsoft/rad-dino", input_size=518, patch_size=14,
            embed_dim=768, mean=(0.5307,) * 3, std=(0.2583,) * 3, geometry="center_crop",
            citation="Perez-Garcia et al. 2025, Nature Machine Intelligence 7:119 (RAD-DINO)",
        ),
        Dinov2Encoder,
    ),
    "dinov2-b14": (
        EncoderSpec(
            key="dinov2-b14", family="dinov2", weights="facebook/dinov2-base", input_size=518, patch_size=14,
            embed_dim=768, mean=_IMAGENET_MEAN, std=_IMAGENET_STD, geometry="center_crop",
            citation="Oquab et al. 2024, TMLR (DINOv2)",
            notes="run at 518 (37x37 grid); the default HF processor would crop to 224 (16x16)",
        ),
        Dinov2Encoder,
    ),
}


def list_encoders() -> list[str]:
    """Registered encoder keys."""
    return list(REGISTRY)


def encoder_spec(key: str) -> EncoderSpec:
    """Published facts of a registered encoder."""
    return _lookup(key)[0]


def _lookup(key: str) -> tuple[EncoderSpec, type[Encoder]]:
    try:
        return REGISTRY[key]
    except KeyError:
        raise KeyError(f"unknown encoder {key!r}; known encoders: {', '.join(REGISTRY)}") from None


def load_encoder(key: str, *, weights: str | None = None, stand_in: bool = False,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Encoder:
    """Load encoder ``key`` from ``weights`` (hub id or local directory; default: the published one).

    ``stand_in=True`` builds a small random-weight model of the same family, class,
    token layout and preprocessing, for offline runs and tests.
    """
    spec, cls = _lookup(key)
    if weights is not None and Path(weights, CXRCORE_ENCODER_FILE).is_file():
        import json

        desc = json.loads(Path(weights, CXRCORE_ENCODER_FILE).read_text())
        if desc.get("key") != key:
            raise ValueError(f"{weights} holds encoder {desc.get('key')!r}, not {key!r}")
        model = cls.build(spec, str(weights), stand_in=False)
        return cls(spec, model, weights=str(weights), stand_in=bool(desc.get("stand_in")), device=device, dtype=dtype)
    src = None if stand_in else (weights or spec.weights)
    model = cls.build(spec, src, stand_in=stand_in)
    return cls(spec, model, weights=src or "random-weight stand-in", stand_in=stand_in, device=device, dtype=dtype)


__all__ = ["Encoder", "EncoderSpec", "Encoding", "REGISTRY", "encoder_spec", "list_encoders", "load_encoder"]
