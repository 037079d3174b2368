"""DINOv2-family ViTs through transformers' ``Dinov2Model``: RAD-DINO and DINOv2-B/14.

Token layout of ``last_hidden_state`` (after the final LayerNorm): ``[CLS, patches]``
(``Dinov2WithRegistersModel``: ``[CLS, registers, patches]``). The global embedding is
the CLS token. Positional embeddings are interpolated by the model, so 518 px runs
the published 37x37 grid.
"""

from __future__ import annotations

import torch

from .hf import HFEncoder


class Dinov2Encoder(HFEncoder):
    """``Dinov2Model``: CLS is token 0, the patch grid follows in row-major order."""

    family = "dinov2"
    model_class = "Dinov2Model"
    config_class = "Dinov2Config"
    processor_class = "BitImageProcessor"

    def forward_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.model(pixel_values=pixels).last_hidden_state
        return tokens[:, 0], self._prefix_split(tokens, pixels, 1 + self.spec.num_register_tokens)


class Dinov2RegistersEncoder(Dinov2Encoder):
    """``Dinov2WithRegistersModel`` (only reachable as ``hf:<id>``): registers follow CLS."""

    family = "dinov2_with_registers"
    model_class = "Dinov2WithRegistersModel"
    config_class = "Dinov2WithRegistersConfig"


class HFViTEncoder(Dinov2Encoder):
    """Plain ``ViTModel`` (only reachable as ``hf:<id>``): ``[CLS, patches]``."""

    family = "vit"
    model_class = "ViTModel"
    config_class = "ViTConfig"
    processor_class = "ViTImageProcessor"

    @classmethod
    def build(cls, spec, weights, stand_in, **kwargs):  # noqa: ANN001 - same signature as the base
        model = super().build(spec, weights, stand_in, **kwargs)
        model.pooler = None  # the pooler is a tanh head on CLS, not part of the frozen tokens
        return model

    def forward_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = self._grid_hw(pixels)
        interp = (h * w) != self.model.embeddings.patch_embeddings.num_patches
        tokens = self.model(pixel_values=pixels, interpolate_pos_encoding=interp).last_hidden_state
        return tokens[:, 0], self._prefix_split(tokens, pixels, 1)
