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
# In this run, a {glue:text}`num-teaching-footprint` px opacity covers
# {glue:text}`num-teaching-box-tokens` of the encoder's {glue:text}`num-teaching-all-tokens`
# patch tokens ({glue:text}`num-teaching-box-share` of the image). A linear probe on
# `roi_local`, the mean of the tokens under the box, tells the perturbed copy of an image
# from the original with AUC {glue:text}`num-teaching-auc-roi-local`; on `cls` it reaches
# {glue:text}`num-teaching-auc-cls` and on `patch_mean` {glue:text}`num-teaching-auc-patch-mean`
# (0.5 is chance). {glue:text}`num-teaching-verdict`
#
# This page runs the whole method at toy scale, for a class: a synthetic cohort, one
# random-weight stand-in encoder, the three pooling modes from one forward pass, a linear
# probe and a confidence interval. Every step is one call into `cxrcore`; the exercises
# open those calls up. The numbers show the mechanism, not the paper's results.
#
# :::{admonition} Learning objectives
# :class: tip
# After this lesson you can
# 1. say how `cls`, `patch_mean` and `roi_local` are read from **one** forward pass, and
#    recompute the last two from the patch tokens;
# 2. predict from the share of tokens a finding covers which pooling mode will see it;
# 3. score a pooling mode with a patient-grouped linear probe and read its AUC with a CI;
# 4. choose a test that matches a paired design, and say why resampling patients can make
#    a p-value smaller as well as larger.
# :::
#
# | section | minutes |
# |---|---:|
# | 1. Meet the data | 2 |
# | 2. One forward pass, three pooling modes (Exercise 1) | 4 |
# | 3. A small finding and a probe | 3 |
# | 4. How big must a finding be? (Exercise 2) | 3 |
# | 5. The test follows the design (Exercise 3) | 3 |
# | **total** | **15** |
#
# ## Prerequisites
# Python, a little NumPy, and what an AUC is (the probability that a randomly chosen
# positive scores above a randomly chosen negative; 0.5 is chance). No GPU, no download:
# the cohort is a synthetic phantom and the encoder a random-weight stand-in of RAD-DINO
# (same model class, patch size, input size and preprocessing; random weights).
#
# Each exercise is followed by a collapsed solution. For a class, hand out the
# {download}`students' copy without solutions <exercises/teaching_exercises.ipynb>`
# (`python book/exercises.py` writes it); the launch buttons at the top open this notebook
# in Binder or Colab.

# %% tags=["parameters"]
encoder_key: str = "rad-dino"  # encoder from cxrcore.list_encoders() (a stand-in is used)
n_images: int = 40  # base images; each appears unperturbed and perturbed
seed: int = 0  # seed for the cohort, the perturbation locations, the folds and the bootstrap
footprint_px: float = 40.0  # diameter of the nodule-like opacity of sections 2 and 3, in original pixels
footprints_px: list = [10, 20, 40, 80, 160, 320]  # diameters (px) swept in exercise 2
contrast: float = 0.3  # peak contrast of the opacity (image intensities are in [0, 1])
copies: int = 3  # exercise 3: each image copied this many times, to show pseudo-replication
n_boot: int = 500  # bootstrap replicates for the confidence intervals
output_dir: str = "book/_generated/figures/teaching"  # where figures and tables are written

# %% tags=["remove-cell"]
# Checks and bookkeeping: stop at once on a wrong parameter.
import numpy as np
import pandas as pd
from IPython.display import Markdown, display

import cxrcore
from cxrcore import report
from cxrcore.cohorts import SyntheticCohort
from cxrcore.encoders import check_encoders
from cxrcore.audit import box_cells
from cxrcore.extract import encode_panel, read_with_mask
from cxrcore.perturb import PerturbationCell
from cxrcore.pooling import POOLING_MODES
from cxrcore.probes import grouped_folds, out_of_fold_scores, out_of_fold_table
from cxrcore.stats import auc_table, bootstrap_auc

check_encoders([encoder_key])
if n_images < 10:
    raise ValueError(f"n_images={n_images} is too few for a 5-fold probe; accepted: 10 or more")
if copies < 2:
    raise ValueError(f"copies={copies}: exercise 3 needs each image at least twice; accepted: 2 or more")

# %% [markdown]
# ## 1. Meet the data
# The phantom draws two lung fields, the heart and mediastinum, ribs and clavicles, and a
# lung texture whose power spectrum falls off like a radiograph's. Some images carry a
# global finding (an enlarged heart, or a basal effusion blunting a costophrenic angle);
# {numref}`fig-teaching-cohort` shows eight.

# %%
cohort = SyntheticCohort(n_images=n_images, seed=seed, size=(512, 768))

# %% tags=["hide-input"]
provenance = report.record_run(output_dir, cohort=cohort, stand_in=True, encoders=[encoder_key],
                               parameters={"n_images": n_images, "seed": seed})
md = cohort.metadata
show = list(range(min(8, n_images)))
titles = [f"{md.image_id[i]}\n" + (", ".join(f for f in cohort.label_columns if md.loc[i, f] == 1) or "no finding")
          for i in show]
fig = report.image_grid([cohort.read_image(i) for i in show], titles, ncols=4)
report.publish_figure(fig, "fig-teaching-cohort", output_dir)

# %% [markdown]
# ```{glue:figure} fig-teaching-cohort
# :name: fig-teaching-cohort
#
# Eight synthetic phantom radiographs of the teaching cohort with their global findings
# (generated by this build; not patients).
# ```

# %% [markdown]
# ## 2. One forward pass, three pooling modes
# The encoder resamples the image to its input size in one recorded step (the *geometry*),
# cuts it into patches and returns one token per patch, plus a global token. From that one
# pass come the three embeddings ({numref}`fig-teaching-pooling-diagram`): `cls`, the
# global token; `patch_mean`, the mean of all patch tokens; `roi_local`, the mean of the
# tokens whose patches the box touches.

# %%
encoder = cxrcore.load_encoder(encoder_key, stand_in=True)
image = cohort.read_image(0)
h, w = image.shape
box = (int(0.62 * w), int(0.45 * h), int(0.62 * w) + int(footprint_px), int(0.45 * h) + int(footprint_px))
out = encoder.encode([image], boxes=[[box]], return_grid=True)
print(f"cls {out.cls.shape}, patch_mean {out.patch_mean.shape}, roi_local {out.roi_local.shape}: one vector each; "
      f"patch grid {out.grid.shape} (image, rows, columns, features)")

# %% tags=["hide-input"]
r0, r1, c0, c1 = out.geometry[0].cells(box)
n_box, n_all = (r1 - r0) * (c1 - c0), out.grid.shape[1] * out.grid.shape[2]
report.glue_text("num-teaching-footprint", footprint_px, "{:g}")
report.glue_text("num-teaching-box-tokens", n_box, "{:d}")
report.glue_text("num-teaching-all-tokens", n_all, "{:,d}")
report.glue_text("num-teaching-box-share", n_box / n_all, "{:.1%}")
fig = report.patch_grid_figure(image, out.geometry[0], box,
                               title=f"{encoder_key} stand-in: {encoder.input_size} px input, "
                                     f"{encoder.grid_shape[0]}×{encoder.grid_shape[1]} patches")
report.publish_figure(fig, "fig-teaching-pooling-diagram", output_dir)

# %% [markdown]
# ```{glue:figure} fig-teaching-pooling-diagram
# :name: fig-teaching-pooling-diagram
#
# The pooling modes on one model input of the RAD-DINO stand-in: `cls` is one global
# vector, `patch_mean` averages every patch token, `roi_local` only the tokens under the
# red box (green); the last panel enlarges the box's neighbourhood.
# ```

# %% [markdown]
# ### Exercise 1
# Recompute `patch_mean` and `roi_local` yourself from `out.grid` (shape `[1, rows, columns,
# features]`) and the cells the box touches (`out.geometry[0].cells(box)` gives
# `(r0, r1, c0, c1)`, end-exclusive), and check they equal the encoder's. How many times
# is a change confined to the box diluted in `patch_mean`?

# %% tags=["solution"]
r0, r1, c0, c1 = out.geometry[0].cells(box)
mine_patch_mean = out.grid[0].mean(axis=(0, 1))
mine_roi_local = out.grid[0, r0:r1, c0:c1].mean(axis=(0, 1))
same = np.allclose(mine_patch_mean, out.patch_mean[0], atol=1e-5) and np.allclose(mine_roi_local, out.roi_local[0], atol=1e-5)
n_box, n_all = (r1 - r0) * (c1 - c0), out.grid.shape[1] * out.grid.shape[2]
display(Markdown(
    f"Both recomputed embeddings {'equal' if same else 'differ from'} the encoder's. The box touches "
    f"{n_box} of {n_all:,} tokens, so a change confined to it moves `roi_local` by its full size but "
    f"`patch_mean` by 1/{n_all / n_box:.0f} of it: the whole-image mean dilutes it {n_all / n_box:.0f}-fold. "
    "`cls` is a learned (here random) weighting of all tokens, so it dilutes the change in a similar way."))

# %% [markdown]
# ## 3. A small finding, and a probe
# Each base image gets a nodule-like opacity in the lung field ({numref}`fig-teaching-before-after`);
# the same box is pooled in both arms. A standardised L2 logistic regression, cross-validated with
# folds grouped by patient (an image and its perturbed copy always share a fold), scores every
# image out of fold; the same folds serve all three modes. The bootstrap resamples patients.

# %%
cell = PerturbationCell("nodule", footprint_px, contrast)
emb = encode_panel(cohort, encoder, [cell], seed=seed)
y = emb.meta["arm"].to_numpy()  # 1 = perturbed copy, 0 = original
groups = emb.meta["patient_id"].to_numpy()
folds = grouped_folds(y, groups, n_splits=5, seed=seed)
scores = {mode: out_of_fold_scores(emb.features[mode], y, groups, folds=folds) for mode in POOLING_MODES}
rows = []
for mode in POOLING_MODES:
    b = bootstrap_auc(y, scores[mode], n_boot=n_boot, seed=seed, groups=groups)
    rows.append({"encoder": encoder_key, "pooling": mode, "auc": b.auc, "ci_low": b.ci_low, "ci_high": b.ci_high})
table = pd.DataFrame(rows)

# %% tags=["hide-input"]
base, mask = read_with_mask(cohort, 0)
perturbed, pbox, _ = cell.place_and_apply(base, mask, seed=seed, image_index=0)
fig = report.before_after_figure(base, perturbed, pbox, title=f"{cell.name} on {cohort.metadata.image_id[0]}")
report.publish_figure(fig, "fig-teaching-before-after", output_dir)
fig = report.auc_by_pooling_figure(table, x="pooling", title=f"{cell.name}, {n_images} pairs", label=provenance)
report.publish_figure(fig, "fig-teaching-auc", output_dir)
report.publish_table(table.assign(**{"AUC [95% CI]": report.with_ci(table), "produced with": provenance})[
    ["encoder", "pooling", "AUC [95% CI]", "produced with"]], "tab-teaching-auc", output_dir, full=table)
by_mode = table.set_index("pooling")
for mode in POOLING_MODES:
    report.glue_text(f"num-teaching-auc-{mode.replace('_', '-')}",
                     report.format_ci(*by_mode.loc[mode, ["auc", "ci_low", "ci_high"]]))
above = [m for m in POOLING_MODES if by_mode.loc[m, "ci_low"] > 0.5]
if above == ["roi_local"]:
    verdict = ("Only roi_local's 95% CI excludes chance: the signal is in the patch tokens under the box and is "
               "diluted when all tokens are averaged, the paper's claim in miniature.")
elif not above:
    verdict = ("No mode's 95% CI excludes chance in this run: too few images or too faint a finding to tell; "
               "exercise 2 sweeps larger findings.")
elif len(above) == len(POOLING_MODES):
    verdict = ("All three modes' 95% CIs exclude chance: at this size the finding moves the whole-image "
               "embeddings too; exercise 2 shows from which size on.")
else:
    verdict = f"The 95% CIs of {' and '.join(above)} exclude chance."
report.glue_text("num-teaching-verdict", verdict)

# %% [markdown]
# ```{glue:figure} fig-teaching-before-after
# :name: fig-teaching-before-after
#
# The perturbation of section 3 on one image: where it lies, the crop before and after,
# and their difference (after − before). The dashed box is what `roi_local` pools in both arms.
# ```
#
# ```{glue:figure} fig-teaching-auc
# :name: fig-teaching-auc
#
# AUC (95% patient-cluster bootstrap CI) of the linear probe telling perturbed from
# unperturbed images, per pooling mode; the dashed line is chance. Teaching run on the
# synthetic cohort with a random-weight stand-in.
# ```
#
# ```{glue:table} tab-teaching-auc
# The AUCs of {numref}`fig-teaching-auc` with their 95% patient-cluster bootstrap CIs.
# ```

# %% [markdown]
# ### Exercise 2
# How big must a finding be before each pooling mode sees it? Encode the cohort with
# opacities of the diameters in `footprints_px` (one `encode_panel` call takes a list of
# cells), score each cell and pooling mode as above, and plot AUC against footprint.
# Next to each footprint, write how many tokens its box covers. Which mode sees the
# smallest finding, and how large must a finding be before `cls` and `patch_mean` follow?

# %% tags=["solution"]
sweep = [PerturbationCell("nodule", float(d), contrast) for d in footprints_px]
emb_sweep = encode_panel(cohort, encoder, sweep, seed=seed)  # every image once per cell, the base image once
oof = out_of_fold_table(emb_sweep.meta, emb_sweep.features, "arm", by=["cell"], n_splits=5, seed=seed)
curve = auc_table(oof, list(POOLING_MODES), "arm", by=["cell"], score_name="pooling", group_col="patient_id",
                  n_boot=n_boot, seed=seed)
# tokens under each box, through the geometry of the box's own image (the images differ in size)
boxes = emb_sweep.meta.query("arm == 1")
tokens = boxes.assign(tokens=box_cells(boxes)[0]).groupby("cell")["tokens"].mean().round()
curve = curve.assign(footprint_px=curve["cell"].map({c.name: c.footprint_px for c in sweep}),
                     tokens=curve["cell"].map(tokens), encoder=encoder_key)
fig = report.dilution_figure(curve, patches_per_px={encoder_key: report.patches_per_px(encoder, image.shape)},
                             title="AUC against footprint", label=provenance)
report.show_figure(fig, "fig-teaching-dilution", output_dir)
wide = curve.pivot_table(index=["footprint_px", "tokens"], columns="pooling", values="auc").reset_index()
display(report.format_table(wide))
first = {m: next((f"{d:g} px" for d, a in zip(wide["footprint_px"], wide[m]) if a >= 0.75), "none in the sweep")
         for m in POOLING_MODES}
display(Markdown(
    f"AUC 0.75 is first reached by `roi_local` at {first['roi_local']}, by `patch_mean` at {first['patch_mean']} "
    f"and by `cls` at {first['cls']}. `roi_local` averages only the tokens under the box, so however small the "
    "finding, it fills much of what is averaged; `patch_mean` averages all tokens, so the finding must cover a "
    "sizeable share of the image before the mean moves by more than it varies between images; `cls` behaves "
    "like a weighted mean here. That is the dilution the paper measures."))

# %% [markdown]
# ### Exercise 3
# Is `roi_local` better than `cls` on these images, or could the difference be chance?
# Both modes score the same images with the same folds, so the test is paired. Each patient
# contributes two images, one in each arm. Test it two ways: with
# `cxrcore.stats.compare_table(..., group_col="patient_id")`, DeLong's paired test with the
# variance clustered by patient (Obuchowski 1997), and with `cxrcore.stats.delong_paired`, which
# treats the 2n images as independent. **Predict first**: which p-value will be smaller? Then copy every image
# `copies` times (as if each patient had been filmed that many times, identically) and test
# again both ways. What changes, and why?

# %% tags=["solution"]
from cxrcore.stats import compare_table, delong_paired


def both_tests(df):
    """roi_local vs cls: paired DeLong clustered by patient, and paired DeLong with images as independent."""
    cluster = compare_table(df, ["cls", "roi_local"], "arm", pairs=[("roi_local", "cls")], group_col="patient_id",
                            seed=seed).iloc[0]
    naive = delong_paired(df["arm"], df["roi_local"], df["cls"])
    return {"AUC difference": cluster.delta, "p (clustered by patient)": cluster.p_value,
            "p (images as independent)": naive.p_value}


scored = emb.meta.assign(roi_local=scores["roi_local"], cls=scores["cls"])
copied = pd.concat([scored] * copies, ignore_index=True)  # the same rows again: no new information
tests = pd.DataFrame([{"data": f"as collected: {len(scored)} images", **both_tests(scored)},
                      {"data": f"every image {copies} times: {len(copied)} images", **both_tests(copied)}])
display(report.format_table(tests))
smaller = tests.loc[0, "p (clustered by patient)"] < tests.loc[0, "p (images as independent)"]
pairs = scored.pivot_table(index="patient_id", columns="arm", values="cls")  # a patient's two images
display(Markdown(
    f"As collected, the p clustered by patient is the {'*smaller*' if smaller else '*larger*'} one here"
    f"{'' if smaller else ' (unusually for a paired design)'}. Each patient is in both arms, and a patient's "
    f"original and perturbed images score alike (correlation of their `cls` scores {pairs[0].corr(pairs[1]):.2f}). "
    "Clustering by patient keeps each pair together, so the spread between patients, which moves both images of a "
    "pair, cancels out of the comparison; treating images as independent counts it as noise (a paired against a "
    "two-sample t-test). Copied, the images-as-independent p shrinks, because it believes it has more data, while "
    "the p clustered by patient stays: copies carry no new information. Several images of one patient in one arm is "
    "the usual case in real cohorts, and there ignoring patients makes p too *small*. The rule is not that "
    "clustering makes p larger: the unit of the variance is the unit that was sampled, the patient."))

# %% [markdown]
# ## What we did
# - Drew a synthetic cohort and encoded each image **once** with a stand-in encoder.
# - Read `cls`, `patch_mean` and `roi_local` from that single pass, and counted how many
#   tokens a small box covers: the share that `patch_mean` dilutes a local change by.
# - Probed each mode with patient-grouped folds and put a patient-cluster bootstrap CI on
#   each AUC; swept the footprint to see which mode sees the smallest finding.
# - Tested `roi_local` against `cls` with a test that follows the design.
#
# :::{admonition} Key takeaways
# :class: important
# - One forward pass gives every pooling mode; they differ only in which tokens are averaged.
# - A finding covering *k* of *N* tokens moves the whole-image mean by about *k*/*N* of
#   its local effect: small findings vanish in `patch_mean` (and, for these encoders, in
#   `cls`) long before they vanish from the tokens under them.
# - Read an AUC with its CI, from out-of-fold scores with folds grouped by patient.
# - Resample what was sampled. With both arms in every patient, pairing makes the test
#   sharper; with several images per patient in one arm, ignoring patients makes it
#   falsely sharp.
# :::
#
# ## What's next
# The [perturbation panel](perturbation_panel.ipynb) runs the same design over a grid of
# perturbation kinds and footprints, for every encoder, and draws the dilution curve of
# exercise 2 for each; [Methods](../methods.md) states the protocol in full.
