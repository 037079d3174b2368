"""SigLIP vision towers through transformers' ``SiglipVisionModel`` (MedSigLIP-448).

Token layout of ``last_hidden_state`` (after ``post_layernorm``): patches only, no
CLS token. The global embedding of the ``cls`` pooling mode is therefore the
attention-pooling head's output (``pooler_output``, a learned-query
multi-head-attention pool over the patch tokens), which is what SigLIP trains
against text; the book says so wherever ``cls`` is reported for MedSigLIP.

Published: Sellergren et al. 2025, "MedGemma technical report", arXiv:2507.05201;
weights ``google/medsiglip-448`` (gated: accept the Health AI Developer Foundations
terms). Preprocessing is what the published ``SiglipImageProcessor`` of that repository
does (its ``preprocessor_config.json``: size 448 x 448, ``resample`` 3 = bicubic,
mean = std = 0.5): stretch straight to 448 x 448, aspect ratio not kept, no padding,
the same as ``hf:<a copy of the repository>``. Google's serving code zero-pads to a
square before that processor ("method performed in training",
github.com/Google-Health/medsiglip ``python/serving/predictor.py``); that is offered as
``load_encoder("medsiglip-448", geometry="pad_square")``, never the default. The patch
size (14 -> 32x32 grid) is read from the config.
"""

from __future__ import annotations

import torch

from .hf import HFEncoder


class SiglipEncoder(HFEncoder):
    """``SiglipVisionModel``: grid = all tokens; global = ``pooler_output``."""

    family = "siglip"
    model_class = "SiglipVisionModel"
    config_class = "SiglipVisionConfig"
    processor_class = "SiglipImageProcessor"

    def forward_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # learned position table sized for config.image_size; other sizes interpolate it
        interp = pixels.shape[-1] != self.model.config.image_size or pixels.shape[-2] != self.model.config.image_size
        out = self.model(pixel_values=pixels, interpolate_pos_encoding=interp)
        if out.pooler_output is None:
            raise RuntimeError(f"{self.spec.key}: the model has no attention-pool head (vision_use_head=False)")
        return out.pooler_output, self._prefix_split(out.last_hidden_state, pixels, 0)
