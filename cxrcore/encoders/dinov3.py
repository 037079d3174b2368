"""DINOv3 ViTs through transformers' ``DINOv3ViTModel`` (the paper's ViT-7B/16).

Token layout of ``last_hidden_state`` (after the final LayerNorm):
``[CLS, 4 registers, patches]``. Registers are neither the global embedding nor
patches: they are dropped from the grid, so ``patch_mean`` and ``roi_local`` average
patch tokens only. Positions are RoPE, so any multiple of 16 runs (224 -> 14x14,
512 -> 32x32) without interpolating a table.

Published: Simeoni et al. 2025, "DINOv3", arXiv:2508.10104; weights
``facebook/dinov3-vit7b16-pretrain-lvd1689m`` (gated: accept the DINOv3 licence).
"""

from __future__ import annotations

import torch

from .hf import HFEncoder


class Dinov3Encoder(HFEncoder):
    """``DINOv3ViTModel``: CLS is token 0, then ``num_register_tokens`` registers, then the grid."""

    family = "dinov3"
    model_class = "DINOv3ViTModel"
    config_class = "DINOv3ViTConfig"
    processor_class = "DINOv3ViTImageProcessor"

    def forward_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.model(pixel_values=pixels).last_hidden_state
        return tokens[:, 0], self._prefix_split(tokens, pixels, 1 + self.spec.num_register_tokens)
