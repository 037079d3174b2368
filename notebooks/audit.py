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
# ## Overview
# The paper's test, as one command per encoder: `cxrcore audit ENCODER --out DIR` runs a
# **footprint x contrast sweep** of the perturbation panel (a nodule-like opacity from 8 to
# 256 px at two contrasts; an isotropic blur and a fine reticular texture at two
# footprints), encodes every image **once**, probes `cls`, `patch_mean` and `roi_local`
# with patient-grouped folds, and writes an audit card (`audit.html`) and every number
# (`audit.json`, checked against a published JSON Schema). This chapter runs it for each
# registered encoder and sets the cards side by side. Each card reports:
#
# - the **detectable footprint** of every series and pooling mode: the smallest footprint
#   whose AUC's lower 95% bound exceeds a threshold (0.75), in pixels and in patches;
# - the **dilution expectation**: if a lesion shifts the k tokens under its box by
#   $\delta$ along a readout direction, averaging all N tokens shifts the image embedding by
#   $k\delta/N$, and with a between-image spread $\sigma$ a linear readout reaches
#   $\mathrm{AUC} \approx \Phi\big(k\delta / (N\sigma\sqrt{2})\big)$. $\delta$ and $\sigma$ are
#   estimated from the same run (`roi_local` and the unperturbed images). Where `cls` falls
#   below even this expectation, the global embedding discards more than averaging would.
#
# ## Prerequisites
# The pooling modes and the panel are in [Methods](../methods.md) and the perturbation-panel
# chapter. The default build downloads nothing: a synthetic phantom cohort and random-weight
# stand-ins of each encoder family run a reduced sweep (see
# [What the default build runs](../defaults.md)). Random weights have no learned features:
# what the cards show by default is the *dilution* mechanism and the pipeline, not what a
# trained encoder keeps. On real weights: `cxrcore audit rad-dino --weights /models/rad-dino
# --cohort folder --data-root /data/cxr --device cuda --out runs/rad-dino`.

# %% tags=["parameters"]
cohort: str = "synthetic"  # cohort name: synthetic, nih, mimic, manifest, chestxdet10, folder
data_root: str = ""  # folder (or manifest CSV) of the cohort as the provider ships it; unused for synthetic
encoders: list = ["rad-dino", "dinov2-b14", "dinov3-vit7b16", "biomedclip", "medsiglip-448", "dino-resnet50"]  # encoder keys
stand_in: bool = True  # True: random-weight stand-ins of each encoder family (no download)
weights: dict = {}  # optional encoder key -> hub id or local directory of weights
quick: bool = True  # True: the reduced sweep (panel audit-quick); False: the full audit panel (4 contrasts)
n_images: int = 16  # base images per encoder; each appears unperturbed and perturbed in every cell
image_size: int = 512  # side of the synthetic phantoms in pixels (synthetic cohort only)
threshold: float = 0.75  # AUC the lower 95% CI bound must exceed for a footprint to count as detected
n_splits: int = 3  # patient-grouped probe folds (3 keeps the default chapter near 2 CPU-minutes)
n_boot: int = 200  # bootstrap replicates for the 95% CIs
seed: int = 0  # seed for the cohort, perturbation placement, folds and bootstrap
output_dir: str = "book/_generated/figures/audit"  # where figures, tables and each encoder's card (cards/<key>/) go

# %%
from pathlib import Path

import pandas as pd

from cxrcore import report
from cxrcore.audit import audit, cards_figure, flags_table, footprints_side_by_side
from cxrcore.cohorts import check_cohort, get_cohort
from cxrcore.encoders import check_encoders

check_encoders(encoders)
check_cohort(cohort)
data = get_cohort(cohort, data_root or None,
                  **({"n_images": n_images, "seed": seed, "size": image_size} if cohort == "synthetic" else {}))
provenance = report.record_run(output_dir, cohort=data, stand_in=stand_in, encoders=encoders,
                               parameters={"quick": quick, "n_images": n_images, "threshold": threshold, "seed": seed})
print(f"{data.name}: auditing {len(encoders)} encoders | produced with: {provenance}")

# %% [markdown]
# ## One audit per encoder
# Each call is the `cxrcore audit` command: extraction into a resumable store (the format of
# `cxrcore extract`), the probes and the dilution expectation computed from the store, the
# card and the record written beside it.

# %%
results = {}
for key in encoders:
    results[key] = audit(key, weights=weights.get(key), stand_in=stand_in, cohort=cohort, data_root=data_root or None,
                         quick=quick, out=Path(output_dir) / "cards" / key, seed=seed, n_images=n_images,
                         n_boot=n_boot, n_splits=n_splits, threshold=threshold, image_size=image_size, progress=False)
    t = results[key].record["timing"]
    print(f"{key}: {len(results[key].record['panel']['cells'])} cells, {t['wall_seconds']:.0f} s "
          f"-> {results[key].paths['html']}")

# %% [markdown]
# ## The dilution curves, side by side
# {numref}`fig-audit-curves` shows every encoder's card figure: the out-of-fold AUC of each
# pooling mode against the footprint, beside the analytic mean-pooling expectation. The
# x axis gives the footprint in pixels and, in brackets, in patches of that encoder (a patch
# covers ~14 original pixels at RAD-DINO's 518 input, ~37 at a 224 input), which is why the
# same opacity is "larger" for some encoders than for others.

# %%
fig = cards_figure(results, threshold=threshold, label=provenance)
report.publish_figure(fig, "fig-audit-curves", output_dir)

# %% [markdown]
# ```{glue:figure} fig-audit-curves
# :name: fig-audit-curves
#
# AUC (95% patient-cluster bootstrap CI) against footprint per encoder (rows) and series (columns), one colour per pooling mode; dashed with a band: the mean-pooling (dilution) expectation; dotted: the detection threshold; red crosses: cells where `cls`'s upper 95% bound lies below an expectation of at least 0.55. The figure title says how the numbers were produced.
# ```

# %% [markdown]
# ## Detectable footprint per encoder
# The table reads the curves at the threshold: the smallest footprint at which each pooling
# mode's lower 95% bound clears it ("not reached" up to the largest footprint tried), and the
# footprint at which plain averaging would be expected to ("patch_mean expected").

# %%
footprints = footprints_side_by_side(results)
footprints["produced_with"] = provenance
report.publish_table(footprints, "tab-audit-footprint", output_dir)
footprints

# %% [markdown]
# ## Where `cls` loses more than averaging would
# The model predicts the `patch_mean` curve from `roi_local` and the spread between images.
# The *spill ratio* (measured over predicted `patch_mean` shift along the readout
# direction) says whether tokens outside the box moved too (above 1); a `cls` below the
# expectation is the signature of an attention pool or a training objective that discards
# a change averaging would keep. Per encoder: the cells where `cls`'s upper 95% bound lies
# below an expectation of at least 0.55, the median spill ratio, and the cells where
# `patch_mean` beats the expectation (its lower bound above it: the probe found a better
# direction than the mean difference). Every cell's estimates are in
# `tab-audit-dilution-raw.csv`.

# %%
flags = flags_table(results).assign(produced_with=provenance)
dilution = pd.concat([r.dilution.assign(encoder=k) for k, r in results.items()], ignore_index=True)
report.save_table(dilution, "tab-audit-dilution-raw", output_dir)
report.publish_table(flags, "tab-audit-flags", output_dir)
flags

# %% [markdown]
# ## The verdicts
# Each card opens with its verdict in plain words; here they are together. "Detected" means
# the AUC's lower 95% bound exceeds the threshold; footprints are disk diameters in original
# pixels (patches of that encoder in brackets).

# %%
verdicts = pd.DataFrame([{"encoder": k, "verdict": v} for k, r in results.items() for v in r.findings])
verdicts["produced_with"] = provenance
auc = pd.concat([r.auc.assign(encoder=k) for k, r in results.items()], ignore_index=True)
report.save_table(auc, "tab-audit-auc-raw", output_dir)
summary = auc.groupby(["encoder", "pooling"], sort=False)["auc"].mean().reset_index()
report.write_summary(summary.assign(analysis="audit sweep", ci_low=float("nan"), ci_high=float("nan"),
                                    what=f"mean AUC over the {auc['cell'].nunique()} cells of the audit sweep",
                                    produced_with=provenance), output_dir)
report.publish_table(verdicts, "tab-audit-verdicts", output_dir)
verdicts

# %% [markdown]
# ## What we did
# - Ran `cxrcore audit` for every encoder: one forward pass per image of a footprint x contrast sweep, stored
#   resumably; patient-grouped probes per cell for `cls`, `patch_mean` and `roi_local`; bootstrapped CIs.
# - Read off each pooling mode's detectable footprint and set each curve beside the analytic dilution
#   expectation estimated from the same run, flagging where `cls` falls below it.
# - Wrote each encoder's card (`cards/<encoder>/audit.html`) and record (`audit.json`, schema-checked).
#
# Every number on this page was computed by the build that rendered it.
