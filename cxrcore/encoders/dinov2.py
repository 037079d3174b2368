"""DINOv2-family ViTs through transformers' ``Dinov2Model``: RAD-DINO and DINOv2-B/14.

Token layout of ``last_hidden_state`` (after the final LayerNorm): ``[CLS, patches]``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .base import Encoder, EncoderSpec


class Dinov2Encoder(Encoder):
    """``Dinov2Model``: CLS is token 0, the patch grid follows in row-major order."""

    @staticmethod
    def build(spec: EncoderSpec, weights: str | None, stand_in: bool) -> torch.nn.Module:
        from transformers import Dinov2Config, Dinov2Model

        if stand_in:
            # Same class, patch size, input size and token layout as the published model;
            # narrow and shallow so it runs on a laptop CPU. Seeded: the same stand-in everywhere.
            cfg = Dinov2Config(image_size=spec.input_size, patch_size=spec.patch_size, hidden_size=64,
                               num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2)
            with torch.random.fork_rng():
                torch.manual_seed(0)
                return Dinov2Model(cfg)
        return Dinov2Model.from_pretrained(weights)

    def forward_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(pixel_values=pixels)
        tokens = out.last_hidden_state
        b, n, d = tokens.shape
        h, w = pixels.shape[-2] // self.spec.patch_size, pixels.shape[-1] // self.spec.patch_size
        first = 1 + self.spec.num_register_tokens
        if n - first != h * w:
            raise RuntimeError(f"{self.spec.key}: expected {h * w} patch tokens after {first} leading tokens, got {n - first}")
        return tokens[:, 0], tokens[:, first:].reshape(b, h, w, d)

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self._write_descriptor(path)
        return path
