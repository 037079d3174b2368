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
# # The method in 15 minutes on a laptop CPU
#
# ## Overview
# This is the whole method of the paper at toy scale, for a class: a small synthetic
# cohort, one random-weight stand-in encoder, the three pooling modes taken from one
# forward pass, one linear probe and one confidence interval. Every step is one call
# into `cxrcore`; the exercises ask you to open those calls up.
#
# ## Prerequisites
# Python and a little NumPy; what an AUC is. No GPU, no download: the cohort is a
# synthetic phantom and the encoder a random-weight stand-in of RAD-DINO (same model
# class, patch size, input size and preprocessing, random weights), so the numbers
# below show the mechanism, not the paper's results.
#
# Cells tagged `solution` hold the answers; `python book/exercises.py` writes a copy of
# this notebook without them for students.

# %% tags=["parameters"]
encoder_key: str = "rad-dino"  # encoder from cxrcore.list_encoders() (a stand-in is used)
n_images: int = 40  # base images; each appears unperturbed and perturbed
seed: int = 0  # seed for the cohort, the perturbation locations, the folds and the bootstrap
footprint_px: float = 40.0  # diameter of the nodule-like opacity, in original pixels
contrast: float = 0.3  # peak contrast of the opacity (image intensities are in [0, 1])
n_boot: int = 500  # bootstrap replicates for the confidence interval
output_dir: str = "book/_generated/figures/teaching"  # where figures and tables are written

# %%
import numpy as np
import pandas as pd

import cxrcore
from cxrcore import report
from cxrcore.cohorts import SyntheticCohort
from cxrcore.extract import encode_panel
from cxrcore.perturb import PerturbationCell
from cxrcore.pooling import POOLING_MODES
from cxrcore.probes import grouped_folds, out_of_fold_scores
from cxrcore.stats import bootstrap_auc

if encoder_key not in cxrcore.list_encoders():
    raise ValueError(f"unknown encoder {encoder_key!r}; accepted: {cxrcore.list_encoders()}")
if n_images < 10:
    raise ValueError(f"n_images={n_images} is too few for a 5-fold probe; accepted: 10 or more")

# %% [markdown]
# ## 1. Meet the data
# The phantom draws two lung fields, the heart and mediastinum, ribs and clavicles, and a
# lung texture whose power spectrum falls off like a radiograph's. Some images carry a
# global finding (an enlarged heart, or a basal effusion blunting a costophrenic angle).

# %%
cohort = SyntheticCohort(n_images=n_images, seed=seed, size=(512, 768))
provenance = report.record_run(output_dir, cohort=cohort, stand_in=True, encoders=[encoder_key])
md = cohort.metadata
show = list(range(min(8, n_images)))
titles = [f"{md.image_id[i]}\n" + (", ".join(f for f in cohort.label_columns if md.loc[i, f] == 1) or "no finding")
          for i in show]
fig = report.image_grid([cohort.read_image(i) for i in show], titles, ncols=4,
                        suptitle="Synthetic phantom radiographs (not patients)")
report.publish_figure(fig, "fig-teaching-cohort", output_dir)

# %% [markdown]
# ## 2. One forward pass, three pooling modes
# The encoder resamples the image to its input size in one explicit step, cuts it into
# patches and returns one token per patch (plus a CLS token). From that single pass:

# %%
encoder = cxrcore.load_encoder(encoder_key, stand_in=True)
image = cohort.read_image(0)
box = (int(0.62 * image.shape[1]), int(0.45 * image.shape[0]), int(0.62 * image.shape[1]) + 40, int(0.45 * image.shape[0]) + 40)
out = encoder.encode([image], boxes=[[box]], return_grid=True)
print(encoder)
print("cls", out.cls.shape, "| patch_mean", out.patch_mean.shape, "| roi_local", out.roi_local.shape,
      "| patch grid", out.grid.shape)
fig = report.patch_grid_figure(image, out.geometry[0], box,
                               title=f"{encoder_key} stand-in: input {encoder.input_size} px, {encoder.grid_shape[0]}x{encoder.grid_shape[1]} patch grid")
report.publish_figure(fig, "fig-teaching-pooling-diagram", output_dir)

# %% [markdown]
# ### Exercise 1
# Recompute `patch_mean` and `roi_local` yourself from `out.grid` (shape `[1, h, w, D]`)
# and the cells the box touches (`out.geometry[0].cells(box)` gives `(r0, r1, c0, c1)`),
# and check they equal the encoder's.

# %% tags=["solution"]
r0, r1, c0, c1 = out.geometry[0].cells(box)
mine_patch_mean = out.grid[0].mean(axis=(0, 1))
mine_roi = out.grid[0, r0:r1, c0:c1].mean(axis=(0, 1))
print("patch_mean matches:", np.allclose(mine_patch_mean, out.patch_mean[0], atol=1e-5))
print("roi_local matches:", np.allclose(mine_roi, out.roi_local[0], atol=1e-5))
print(f"the box covers {(r1 - r0) * (c1 - c0)} of {out.grid.shape[1] * out.grid.shape[2]} tokens: "
      f"patch_mean dilutes a signal confined to it {out.grid.shape[1] * out.grid.shape[2] / ((r1 - r0) * (c1 - c0)):.0f}-fold")

# %% [markdown]
# ## 3. A small finding, and a probe
# Each base image gets a small nodule-like opacity in the lung field; the same box is
# pooled in both arms. A standardised L2 logistic regression, cross-validated with folds
# grouped by patient, scores every image out of fold; the same folds serve all three modes.

# %%
cell = PerturbationCell("nodule", footprint_px, contrast)
emb = encode_panel(cohort, encoder, [cell], seed=seed)
y = emb.meta["arm"].to_numpy()
groups = emb.meta["patient_id"].to_numpy()
folds = grouped_folds(y, groups, n_splits=5, seed=seed)
rows = []
for mode in POOLING_MODES:
    scores = out_of_fold_scores(emb.features[mode], y, groups, folds=folds)
    b = bootstrap_auc(y, scores, n_boot=n_boot, seed=seed)
    rows.append({"encoder": encoder_key, "pooling": mode, "auc": b.auc, "ci_low": b.ci_low, "ci_high": b.ci_high})
table = pd.DataFrame(rows)
fig = report.auc_by_pooling_figure(table, x="encoder", title=f"Teaching run: {cell.name}, {n_images} pairs")
report.publish_figure(fig, "fig-teaching-auc", output_dir)
report.publish_table(table.assign(**{"AUC [95% CI]": report.with_ci(table)})[["encoder", "pooling", "AUC [95% CI]"]],
                     "tab-teaching-auc", output_dir)
table

# %% [markdown]
# ### Exercise 2
# Halve `footprint_px` (or `contrast`) and re-run the cell above. Which pooling mode loses
# the signal first, and why? Write the number of tokens the box covers next to each AUC.

# %% tags=["solution"]
small = PerturbationCell("nodule", footprint_px / 2, contrast)
emb_small = encode_panel(cohort, encoder, [small], seed=seed)
aucs = {m: bootstrap_auc(y, out_of_fold_scores(emb_small.features[m], y, groups, folds=folds), n_boot=200, seed=seed).auc
        for m in POOLING_MODES}
print(small.name, {m: round(a, 3) for m, a in aucs.items()})
print("cls and patch_mean average over the whole image; roi_local only over the few tokens under the box,"
      " so a smaller finding is diluted far less in roi_local.")

# %% [markdown]
# ### Exercise 3
# The probe's AUC is an estimate. Use `cxrcore.stats.delong_paired` to test whether
# `roi_local` beats `cls` on the same images (paired, same folds).

# %% tags=["solution"]
from cxrcore.stats import delong_paired

s_roi = out_of_fold_scores(emb.features["roi_local"], y, groups, folds=folds)
s_cls = out_of_fold_scores(emb.features["cls"], y, groups, folds=folds)
test = delong_paired(y, s_roi, s_cls)
print(f"roi_local {test.auc_a:.3f} vs cls {test.auc_b:.3f}: z = {test.z:.2f}, p = {test.p_value:.2g}")

# %% [markdown]
# ## What we did
# - Drew a synthetic cohort and encoded each image **once** with a stand-in encoder.
# - Read `cls`, `patch_mean` and `roi_local` from that single pass and saw how much the
#   whole-image modes dilute a signal confined to a few patches.
# - Probed each mode with patient-grouped folds and put a bootstrap CI on each AUC.
#
# Next: the [perturbation panel](perturbation_panel.ipynb) runs the same design over a
# grid of perturbation kinds and sizes, for every encoder.
