# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The encoders: published specifications and token layouts
#
# ## Overview
# The paper's claims rest on reading `cls`, `patch_mean` and `roi_local` from the same
# forward pass of each encoder, and each family lays out its tokens differently. This page
# computes each registered encoder's published facts from its real configuration (the
# full-size model built on PyTorch's `meta` device: no weights, no download), and checks
# the token layout of each family's stand-in in this build.
#
# ## Prerequisites
# [Methods](../methods.md), for what the three pooling modes are.

# %% tags=["parameters"]
encoders: list = ["rad-dino", "dinov2-b14", "dinov3-vit7b16", "biomedclip", "medsiglip-448", "dino-resnet50"]  # encoder keys
seed: int = 0  # seed for the test images
output_dir: str = "book/_generated/figures/encoders"  # where tables are written

# %%
import numpy as np
import pandas as pd

import cxrcore
from cxrcore import report
from cxrcore.encoders import check_encoders

check_encoders(encoders)

# %% [markdown]
# ## Published specifications
# Parameter counts and GFLOPs (per image at the input size) are computed from the
# published configurations in this build; `cls` says what the `cls` pooling mode is for
# that family. MedSigLIP has **no CLS token**: its `cls` mode is the attention-pooling
# head's output (`pooler_output`). The ResNet-50 control has no tokens: its layer-4 cells
# (stride 32) are the "patches", and its `cls` mode is global average pooling, which is
# the mean of those cells, i.e. **equal to its `patch_mean` by construction**: any result
# on which `cls` and `patch_mean` differ cannot come from it.

# %%
rows = []
for key in encoders:
    s = cxrcore.encoder_spec(key)
    rows.append({"encoder": key, "weights": s.weights, "input": s.input_size, "patch/stride": s.patch_size,
                 "grid": f"{s.grid[0]}x{s.grid[1]}", "registers": s.num_register_tokens, "dim": s.embed_dim,
                 "params (M)": s.num_params / 1e6, "GFLOPs": s.gflops, "cls is": s.global_pool,
                 "geometry": s.geometry, "gated": s.gated})
specs = pd.DataFrame(rows)
report.publish_table(specs, "tab-encoders-specs", output_dir, floatfmt="{:,.1f}")
specs

# %% [markdown]
# ## Token layout, checked on the stand-ins
# Each stand-in has the published model's class, token layout, input size and
# preprocessing, with small random weights. Three checks per encoder, on two square
# images so that no pixel is cropped: `roi_local` of a full-image box equals `patch_mean`;
# a box inside one patch cell gives that cell's token; and, for the ResNet, `cls` equals
# `patch_mean`.

# %%
rng = np.random.default_rng(seed)
checks = []
for key in encoders:
    enc = cxrcore.load_encoder(key, stand_in=True)
    side = enc.input_size * 2
    images = [rng.random((side, side), dtype=np.float32) for _ in range(2)]
    s = enc.spec.patch_size * 2  # one input cell in original pixels
    boxes = [[(0, 0, side, side), (3 * s + 2, 2 * s + 2, 3 * s + 6, 2 * s + 6)]] * 2
    out = enc.encode(images, boxes=boxes, return_grid=True)
    full = out.roi_local[out.roi_image == 0][0]
    one = out.roi_local[out.roi_image == 0][1]
    checks.append({
        "encoder": key, "grid": "x".join(map(str, out.grid.shape[1:3])), "dim": out.cls.shape[1],
        "full box == patch_mean": bool(np.allclose(full, out.patch_mean[0], atol=1e-5)),
        "one-cell box == that token": bool(np.allclose(one, out.grid[0, 2, 3], atol=1e-5)),
        "cls == patch_mean": bool(np.allclose(out.cls, out.patch_mean, atol=1e-5)),
    })
checks = pd.DataFrame(checks)
report.publish_table(checks, "tab-encoders-token-checks", output_dir)
assert checks["full box == patch_mean"].all() and checks["one-cell box == that token"].all()
resnet = checks[checks.encoder == "dino-resnet50"]
assert resnet["cls == patch_mean"].all() and not checks[checks.encoder != "dino-resnet50"]["cls == patch_mean"].any()
checks

# %% [markdown]
# ## What we did
# - Computed every encoder's input size, grid, registers, width, parameters and GFLOPs from its real configuration.
# - Checked on each stand-in that the pooling modes read the tokens the paper means: a full-image box gives
#   `patch_mean`, a one-cell box gives that cell, and only the ResNet has `cls` equal to `patch_mean`.
