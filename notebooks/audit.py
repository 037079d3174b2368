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
# # Audit cards: how small a change does each encoder still see?
#
# ## Key results
# {glue:text}`num-audit-headline` `cls` falls below even the mean-pooling expectation in
# {glue:text}`num-audit-flags` ({numref}`fig-audit-curves`, {numref}`tab-audit-footprint`).
# This page runs a reduced sweep to keep the book fast: {glue:text}`num-audit-sweep`.
#
# **What this shows / what it cannot show.** {glue:text}`num-audit-scope`
#
# ## Overview
# The paper's test, as one command per encoder: `cxrcore audit ENCODER --out DIR` runs a
# **footprint × contrast sweep** of the perturbation panel (a nodule-like opacity from 8 to
# 256 px; in the full sweep also an isotropic blur and a fine reticular texture), encodes
# every image **once**, probes `cls`, `patch_mean` and `roi_local` with patient-grouped
# folds, and writes a one-page audit card (`audit.html`) and every number (`audit.json`,
# checked against a published JSON Schema). This chapter runs it for each registered
# encoder and sets the cards side by side. Each card reports:
#
# - the **detectable footprint** of every series and pooling mode: the smallest footprint
#   whose AUC's lower 95% bound exceeds a threshold (0.75), in pixels and in patches;
# - the **dilution expectation** beside every measured curve (next section), estimated from
#   the same run, and the cells where `cls` falls below it;
# - a plain-language verdict.
#
# ## Prerequisites
# The pooling modes and the panel are in [Methods](../methods.md) and the
# [perturbation-panel chapter](perturbation_panel.ipynb). The default build downloads
# nothing: a synthetic phantom cohort and random-weight stand-ins of each encoder family
# (see [What the default build runs](../defaults.md)).

# %% tags=["parameters"]
cohort: str = "synthetic"  # cohort name: synthetic, nih, mimic, manifest, chestxdet10, folder
data_root: str = ""  # folder (or manifest CSV) of the cohort as the provider ships it; unused for synthetic
encoders: list = ["rad-dino", "dinov2-b14", "dinov3-vit7b16", "biomedclip", "medsiglip-448", "dino-resnet50"]  # encoder keys
stand_in: bool = True  # True: random-weight stand-ins of each encoder family (no download)
weights: dict = {}  # optional encoder key -> hub id or local directory of weights
store: dict = {}  # encoder key -> folder written by `cxrcore audit KEY --out DIR`: its store is reused (only missing chunks are encoded) and its card rewritten with these parameters; empty: audit into output_dir/cards/<key>
device: str = "cpu"  # torch device for the forward passes, e.g. cuda
dtype: str = "float32"  # float32, or bfloat16 on a GPU (bf16 weights)
input_size: dict = {}  # encoder key -> model input side (a multiple of its patch size); empty: the published size
sweep: str = "book"  # book: the nodule series at contrast 0.4 of audit-quick (6 cells); quick: audit-quick (16 cells, cxrcore audit --quick); full: audit (the command's default)
n_images: int = 20  # base images per encoder; each appears unperturbed and perturbed in every cell (20: enough patients for the bootstrap's percentile intervals)
image_size: int = 512  # side of the synthetic phantoms in pixels (synthetic cohort only)
threshold: float = 0.75  # AUC the lower 95% CI bound must exceed for a footprint to count as detected
n_splits: int = 3  # patient-grouped probe folds (cxrcore audit uses 4)
n_boot: int = 200  # bootstrap replicates for the 95% CIs (cxrcore audit: 1000, 200 with --quick)
seed: int = 0  # seed for the cohort, perturbation placement, folds and bootstrap
output_dir: str = "book/_generated/figures/audit"  # where figures, tables and each encoder's card (cards/<key>/) go

# %% tags=["remove-cell"]
# Checks and imports: stop at once on a wrong parameter, before any work.
import warnings
from pathlib import Path

import pandas as pd

from cxrcore import report
from cxrcore.audit import FULL, QUICK, audit, encoders_figure, flags_table, footprints_side_by_side
from cxrcore.cohorts import check_cohort, get_cohort
from cxrcore.encoders import check_encoders
from cxrcore.perturb import Panel, load_panel
from cxrcore.stats import FewClustersWarning

# below 20 patients per class the bootstrap warns; the tables' notes say so instead of the page printing it
warnings.filterwarnings("ignore", category=FewClustersWarning)

check_encoders(encoders)
check_cohort(cohort)
SWEEPS = ("book", "quick", "full")
if sweep not in SWEEPS:
    raise ValueError(f"sweep={sweep!r}: accepted are {list(SWEEPS)}")
encoders = report.order_encoders(encoders)

# %% [markdown]
# ## The sweep this page runs
# `cxrcore audit` sweeps the packaged `audit` panel by default (`--quick`: `audit-quick`).
# The book's default is the nodule series at contrast 0.4 of `audit-quick`, six footprints
# from 8 to 256 px, so that six encoders fit in the book's time budget; `sweep="quick"` or
# `"full"` runs the command's own sweeps.

# %%
quick_panel = load_panel(QUICK["panel"])
panel = {"book": Panel("audit-book", tuple(c for c in quick_panel if c.kind == "nodule" and c.strength == 0.4),
                       description="the nodule series at contrast 0.4 of audit-quick (the book's reduced sweep)"),
         "quick": quick_panel, "full": load_panel(FULL["panel"])}[sweep]
data = get_cohort(cohort, data_root or None,
                  **({"n_images": n_images, "seed": seed, "size": image_size} if cohort == "synthetic" else {}))

# %% tags=["remove-cell"]
provenance = report.record_run(output_dir, cohort=data, stand_in=stand_in, encoders=encoders,
                               parameters={"sweep": sweep, "n_images": n_images, "threshold": threshold, "seed": seed})
report.glue_text("num-audit-sweep", f"{len(panel)} cells ({', '.join(c.name for c in panel.cells[:2])}, ...), "
                                    f"{min(n_images, len(data))} images, {n_splits} probe folds and {n_boot} bootstrap "
                                    f"replicates per encoder, where cxrcore audit runs {len(load_panel(FULL['panel']))} "
                                    f"cells, {FULL['n_images']} images, 4 folds and {FULL['n_boot']} replicates"
                                    if sweep == "book" else f"the {panel.name} panel ({len(panel)} cells)")

# %% [markdown]
# ## One audit per encoder
# Each call is the `cxrcore audit` command: extraction into a resumable store (the format of
# `cxrcore extract`), the probes and the dilution expectation computed from the store, the
# card and the record written beside it.

# %%
results = {}
for key in encoders:
    out = Path(store[key]) if key in store else Path(output_dir) / "cards" / key
    results[key] = audit(key, weights=weights.get(key), stand_in=stand_in, cohort=cohort, data_root=data_root or None,
                         panel=panel, out=out, seed=seed, n_images=n_images, n_boot=n_boot, n_splits=n_splits,
                         threshold=threshold, image_size=image_size, device=device, dtype=dtype,
                         input_size=input_size.get(key), progress=False)

# %% tags=["remove-cell"]
runs = pd.DataFrame([{"encoder": k, "cells": len(r.record["panel"]["cells"]),
                      "forward passes": r.record["store"]["forward_passes"],
                      "chunks resumed": r.record["store"]["chunks_resumed"],
                      "wall seconds": r.record["timing"]["wall_seconds"], "CPU seconds": r.record["timing"]["cpu_seconds"],
                      "card": f"cards/{k}/audit.html" if k not in store else str(Path(store[k]) / "audit.html")}
                     for k, r in results.items()])
report.publish_table(runs, "tab-audit-runs", output_dir, floatfmt="{:.1f}")

# %% [markdown]
# ```{glue:table} tab-audit-runs
# One audit per encoder: cells of the sweep, forward passes (every image once unperturbed
# and once per cell), chunks resumed from an earlier run, wall and CPU time, and where the
# card is.
# ```
#
# ## The dilution model: what plain averaging would keep
# A lesion under a box shifts the *k* tokens the box touches by *δ* (on average) along a
# readout direction *w*. If **no token outside the box moves**, mean pooling over all *N*
# tokens shifts the image embedding along *w* by *k*·*δ*/*N*. If the pooled embedding's
# projection on *w* varies between images with standard deviation *σ*, is **Gaussian** and
# has the **same spread with and without the lesion**, a linear readout along *w*
# separates perturbed from unperturbed images (different images, as the pooled AUC does)
# with
#
# <p style="text-align: center">AUC<sub>expected</sub> ≈ Φ( <i>k</i>·<i>δ</i> / (<i>N</i>·<i>σ</i>·√2) ),</p>
#
# the equal-variance binormal AUC (Φ: the standard normal distribution function). Every
# quantity comes from the same run: *w* is the mean `roi_local` difference of the *other*
# folds' pairs (cross-fitted, so noise in *w* does not inflate *δ*), *δ* the test pairs'
# `roi_local` shift along *w*, *k* the box's cell count from the stored geometry, *N* the
# grid's cells, *σ* the spread of the unperturbed images' `patch_mean` along *w*. The
# model is a yardstick, not a fit, and the measurement departs from it for known reasons:
#
# - **above** the expectation: tokens outside the box moved too (attention spreads the
#   change; the *spill ratio*, measured over predicted `patch_mean` shift, is above 1), or
#   the fitted probe found a better direction than *w*;
# - **below**: the probe could not estimate a direction from few images, or the spread is
#   not the same with and without the lesion;
# - a **`cls` below the expectation** is the signature the audit looks for: the global
#   embedding (an attention pool, a trained head) discards more of the change than plain
#   averaging would. A cell is flagged when `cls`'s upper 95% bound lies below an
#   expectation of at least 0.55.

# %% tags=["remove-cell"]
fig = encoders_figure(results, threshold=threshold, label=provenance,
                      title="Small-lesion audit: AUC against footprint per encoder")
report.publish_figure(fig, "fig-audit-curves", output_dir)

# %% [markdown]
# ```{glue:figure} fig-audit-curves
# :name: fig-audit-curves
#
# The audit curves of every encoder side by side: out-of-fold AUC (95% patient-cluster
# bootstrap CI) of each pooling mode against the lesion footprint (px, and patches of that
# encoder in brackets); dashed with a band: the mean-pooling (dilution) expectation; dotted:
# the detection threshold; dashed grey: chance; red crosses: cells where `cls`'s upper 95%
# bound lies below an expectation of at least 0.55.
# ```
#
# The x axis gives the footprint in pixels and, in brackets, in patches of that encoder (a
# patch covers about 14 original pixels at RAD-DINO's 518 input, about 37 at a 224 input),
# which is why the same opacity is "larger" for some encoders than for others.
#
# ## Detectable footprint per encoder
# {numref}`tab-audit-footprint` reads the curves at the threshold: the smallest footprint
# at which each pooling mode's lower 95% bound clears it ("not reached" up to the largest
# footprint tried), and the footprint at which plain averaging would be expected to
# ("patch_mean expected").

# %% tags=["remove-cell"]
footprints = footprints_side_by_side(results)
few = (f" With {min(n_images, len(data))} patients per arm (fewer than 20) the bootstrap's percentile intervals run "
       "narrow (cxrcore.stats.FewClustersWarning)." if min(n_images, len(data)) < 20 else "")
report.publish_table(footprints, "tab-audit-footprint", output_dir,
                     note=f"Produced with: {provenance}. Footprints are disk diameters in original pixels (patches of "
                          f"that encoder in brackets); detected: the AUC's lower 95% bound exceeds {threshold:g}." + few)
flags = flags_table(results)
dilution = pd.concat([r.dilution.assign(encoder=k) for k, r in results.items()], ignore_index=True)
auc = pd.concat([r.auc.assign(encoder=k) for k, r in results.items()], ignore_index=True)
report.save_table(auc, "tab-audit-auc-raw", output_dir)
report.publish_table(flags.rename(columns={"which": "cells flagged"}), "tab-audit-flags", output_dir, full=dilution,
                     note=f"Produced with: {provenance}. Every cell's δ, σ, k, N, shifts and expectation are in the CSV.")
verdicts = pd.DataFrame([{"encoder": k, "verdict": v} for k, r in results.items() for v in r.findings])
report.publish_table(verdicts, "tab-audit-verdicts", output_dir, note=f"Produced with: {provenance}.")

series = auc["series"].iloc[0]
det = pd.concat([r.detectable.assign(encoder=k) for k, r in results.items()], ignore_index=True)
det = det[det["series"] == series].set_index(["encoder", "pooling"])


def _reach(k: str, m: str) -> str:
    r = det.loc[(k, m)]
    return f"{r['footprint_px']:g} px" if r["reached"] else "not reached"


roi_first = [k for k in results if det.loc[(k, "roi_local"), "reached"]]
report.glue_text("num-audit-headline",
                 f"On the {series} series, roi_local reaches the threshold in {len(roi_first)} of {len(results)} "
                 "encoders (" + "; ".join(f"{k}: roi_local {_reach(k, 'roi_local')}, cls {_reach(k, 'cls')}"
                                          for k in results) + ").")
n_flag = int(flags["cls below expectation"].sum())
report.glue_text("num-audit-flags", f"{n_flag} of {int(flags['cells'].sum())} (encoder × cell) cells"
                 + (f", in {', '.join(flags.loc[flags['cls below expectation'] > 0, 'encoder'])}" if n_flag else ""))
if data.synthetic and stand_in:
    scope = ("The cards run on synthetic phantoms with random-weight stand-ins: they check the audit pipeline and "
             "show the dilution mechanism (a random network's tokens still change under an opacity, and averaging "
             "dilutes that change in proportion to the share of tokens it covers). They say nothing about the "
             "published encoders; run `cxrcore audit` with their weights for that.")
elif not stand_in:
    scope = ("The cards use published weights: they say from which footprint each encoder's pooling modes carry "
             "a nodule-like change on this cohort, and whether its cls discards more than averaging would. Synthetic "
             "opacities are not lesions: a footprint detected here is a lower bound on what a real lesion of that "
             "size needs, not a clinical detection limit.")
else:
    scope = ("The cards use real images with random-weight stand-ins: they check the pipeline on these images and "
             "show the dilution mechanism, not what a trained encoder keeps.")
report.glue_text("num-audit-scope", scope.replace("`", ""))
summary = auc.groupby(["encoder", "pooling"], sort=False)["auc"].mean().reset_index()
_ = report.write_summary(summary.assign(analysis="audit sweep", ci_low=float("nan"), ci_high=float("nan"),
                                        what=f"mean AUC over the {auc['cell'].nunique()} cells of the audit sweep",
                                        produced_with=provenance), output_dir)

# %% [markdown]
# ```{glue:table} tab-audit-footprint
# Detectable footprint per series and pooling mode (rows) and encoder (columns), and the
# footprint at which the mean-pooling expectation would be detected.
# ```
#
# ## Where `cls` loses more than averaging would
# {numref}`tab-audit-flags` gives, per encoder, the cells where `cls`'s upper 95% bound lies
# below an expectation of at least 0.55, the median spill ratio, and the cells where
# `patch_mean` beats the expectation (its lower bound above it: the probe found a better
# direction than the mean difference).
#
# ```{glue:table} tab-audit-flags
# Per encoder: cells of the sweep, cells where `cls` falls below the dilution expectation
# (and which), the median spill ratio, and cells where `patch_mean` beats the expectation.
# ```
#
# ## The verdicts, and what they mean for a team choosing an encoder
# Each card opens with its verdict in plain words ({numref}`tab-audit-verdicts`). To choose
# an encoder for a task with small findings, read them in this order:
#
# 1. **`roi_local`'s detectable footprint** is the smallest change the encoder's patch
#    tokens carry at all. Convert the findings you care about to pixels of your images (on
#    a 1024-px-wide radiograph of a 35-cm field, 1 px is about 0.34 mm, so a 6-mm nodule is
#    about 18 px): an encoder whose `roi_local` does not reach the threshold at that size
#    does not represent it, whatever head you train.
# 2. **`cls`'s (and `patch_mean`'s) footprint** is what an image-level classifier on the
#    global embedding can see. The distance between it and `roi_local`'s is the price of
#    using the global embedding: if it is large, plan for a region of interest (a detector,
#    a box) or a box-free readout of the patch tokens (`cxrcore audit --readouts`, and the
#    ChestX-Det10 chapter's "Recovery without a box").
# 3. **`cls` below the expectation** means the global embedding throws away more than
#    averaging would: prefer a readout of the patch tokens over `cls` for that encoder.
# 4. **Patches matter.** The same opacity covers more patches at a finer grid (518 px, 14-px
#    patches) than at 224 px: higher input resolution helps `roi_local`, while mean pooling
#    dilutes over more tokens.
#
# ```{glue:table} tab-audit-verdicts
# Each encoder's verdict, as its card states it.
# ```
#
# ## Running `cxrcore audit` on your own encoder
# ```bash
# # the 5-minute check, no download: a stand-in, synthetic phantoms, the reduced sweep
# cxrcore audit rad-dino --stand-in --quick --out runs/audit-rad-dino
# # published weights on a GPU, your own images (a folder of PNG/JPEG/DICOM), the full sweep
# cxrcore audit rad-dino --weights /models/rad-dino --cohort folder --data-root /data/cxr \
#     --device cuda --dtype bfloat16 --out runs/audit-rad-dino-gpu
# # any timm ViT or transformers vision model, with the box-free readouts
# cxrcore audit timm:vit_base_patch16_224 --weights /models/vit.safetensors \
#     --device cuda --readouts --out runs/vit
# ```
# Every run writes `DIR/audit.json` (every number, the encoder spec, weights hash, cohort,
# code version and seed, validated against `cxrcore/data/audit.schema.json`), `DIR/audit.html`
# (the card) and `DIR/store/` (the extraction store; a rerun resumes it). To set your card
# beside the published encoders' on this page, run this notebook with `-y '{"encoders":
# [...], "store": {"<key>": "runs/<dir>"}, "sweep": "full"}'`.
#
# ## What we did
# - Ran `cxrcore audit` for every encoder: one forward pass per image of a footprint sweep,
#   stored resumably; patient-grouped probes per cell for `cls`, `patch_mean` and
#   `roi_local`; patient-cluster bootstrap CIs.
# - Read off each pooling mode's detectable footprint and set each curve beside the
#   analytic dilution expectation estimated from the same run, flagging where `cls` falls
#   below it.
# - Wrote each encoder's card (`cards/<encoder>/audit.html`) and record (`audit.json`,
#   schema-checked).
#
# ## What's next
# [Reproducibility](../reproducibility.md) for real weights on a GPU; the
# [ChestX-Det10 chapter](chestxdet10.ipynb) for the same question on annotated lesions.
