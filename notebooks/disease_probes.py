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
# # Disease probes: findings decided by much of the image
#
# ## Key results
# {glue:md}`num-disease-run`
#
# - **AUC per finding** ({numref}`fig-disease-auc`). {glue:md}`num-disease-auc`
# - **`patch_mean` against `cls`** ({numref}`tab-disease-paired-tests`). {glue:md}`num-disease-tests`
# - **The paper's range.** {glue:md}`num-disease-reported` ({numref}`tab-disease-reported`).
#
# :::{admonition} What this page shows, and what it cannot show
# :class: note
# {glue:md}`num-disease-scope`
# :::
#
# ```{glue:figure} fig-disease-auc
# :name: fig-disease-auc
#
# AUC of a linear probe on `cls` and on `patch_mean` for each finding (panel) and encoder,
# with 95% CIs ({glue:text}`num-disease-auc-ci`). Dashed: chance. The figure title says how
# the numbers were produced.
# ```
#
# ## Overview
# The paper contrasts small lesions with findings decided by a large part of the image:
# there the global embeddings do carry the signal (it reports disease AUCs of 0.642-0.913,
# reported, for such tasks). This page probes `cls` and `patch_mean` for each label of a
# cohort, per encoder, with patient-grouped folds, a 95% CI on every AUC and a paired test
# of `patch_mean` against `cls`. It is the counterpart of the {doc}`perturbation panel
# <perturbation_panel>`: the same encoders and probes, on a signal that covers many patches.
# `roi_local` needs a region of interest, which an image-level label does not give, so it is
# not probed here.
#
# ## Prerequisites
# {doc}`../methods` for the probe protocol. The default run uses the synthetic cohort's two
# global findings: **cardiomegaly** (an enlarged heart silhouette) and **effusion** (a basal
# opacity blunting a costophrenic angle), with random-weight stand-in encoders (see
# {doc}`../defaults`). On your own cohort, name its labels in `labels`, or point `store` at
# the output of `cxrcore extract` (plain extraction, no panel).

# %% tags=["parameters"]
cohort: str = "synthetic"  # cohort name: synthetic, nih, mimic, manifest, chestxdet10, folder
data_root: str = ""  # folder of the cohort as the provider ships it (unused for synthetic)
encoders: list = ["rad-dino", "dinov2-b14", "dinov3-vit7b16", "biomedclip", "medsiglip-448", "dino-resnet50"]  # encoder keys
stand_in: bool = True  # True: random-weight stand-ins of each encoder family (no download)
weights: dict = {}  # optional encoder key -> hub id or local directory of weights
store: dict = {}  # encoder key -> store directory written by `cxrcore extract` without a panel (a single directory string also works); empty: encode in-process
device: str = "cpu"  # torch device for in-process encoding, e.g. cuda
dtype: str = "float32"  # float32, or bfloat16 on a GPU (bf16 weights)
input_size: dict = {}  # encoder key -> model input side (a multiple of its patch size); empty: the published size
labels: list = []  # label columns to probe (an empty list means every label of the cohort)
n_images: int = 120  # images to use (the first n of the cohort's metadata order)
seed: int = 0  # seed for the cohort, folds and bootstrap
n_splits: int = 5  # outer cross-validation folds (grouped by patient)
n_boot: int = 1000  # bootstrap replicates for the 95% CIs
show_pixels: bool = False  # allow figures of a credentialed cohort's pixels (only where the data use agreement allows)
output_dir: str = "book/_generated/figures/disease_probes"  # where figures and tables are written

# %% tags=["hide-input"]
# Checks first (a wrong parameter stops here), then what the parameters imply.
import warnings

import pandas as pd

from cxrcore import report
from cxrcore.cohorts import check_cohort, get_cohort
from cxrcore.encoders import check_encoders
from cxrcore.extract import embeddings
from cxrcore.probes import out_of_fold_table
from cxrcore.stats import FewClustersWarning, auc_table, compare_table

# where an interval rests on few patients the tables' note column says so, and the page says it in words
warnings.simplefilter("ignore", FewClustersWarning)
check_encoders(encoders)
check_cohort(cohort)
data = get_cohort(cohort, data_root or None, **({"n_images": n_images, "seed": seed} if cohort == "synthetic" else {}))
task_labels = labels or data.label_columns
bad = [t for t in task_labels if t not in data.label_columns]
if bad:
    raise ValueError(f"unknown label(s) {bad} for cohort {cohort!r}; accepted: {data.label_columns}")
encoders = report.order_encoders(encoders)
store_of = store if isinstance(store, dict) else ({k: store for k in encoders} if store else {})
modes = ["cls", "patch_mean"]
provenance = report.record_run(output_dir, cohort=data, stand_in=stand_in, encoders=encoders,
                               parameters={"labels": task_labels, "n_images": n_images, "seed": seed,
                                           "store": bool(store)})
print(f"{data.name}: first {min(n_images, len(data))} images, labels {', '.join(task_labels)}; {len(encoders)} encoders "
      f"({'from stores' if store else 'encoded in-process on ' + device})")

# %% [markdown]
# ## The findings
# {numref}`fig-disease-examples` shows what a globally decided finding looks like in this
# cohort (public or synthetic cohorts only: a credentialed cohort's pixels are never shown).

# %% tags=["hide-input"]
if data.pixels_public or show_pixels:
    md = data.metadata.iloc[:n_images]
    picks = []
    for t in task_labels:
        picks += list(md.index[md[t] == 1][:2]) + list(md.index[md[t] == 0][:1])
    picks = list(dict.fromkeys(picks))[:8]
    titles = [f"{md.image_id[i]}\n" + (", ".join(t for t in task_labels if md.loc[i, t] == 1) or "none of the labels")
              for i in picks]
    report.publish_figure(report.image_grid([data.read_image(i) for i in picks], titles, ncols=4),
                          "fig-disease-examples", output_dir)
else:
    report.glue("fig-disease-examples", f"{data.name}: pixels not shown (credentialed cohort)")

# %% [markdown]
# ```{glue:figure} fig-disease-examples
# :name: fig-disease-examples
#
# Examples from the cohort with the findings each carries (generated by this build for the
# synthetic cohort; not patients).
# ```
#
# ## One forward pass per image, then one probe per label and pooling mode
# For each encoder, `embeddings` returns one row per image from a store written by
# `cxrcore extract` (checked against this page's parameters first), or encodes the images
# now. Per label, `out_of_fold_table` drops images whose label is unknown, draws one set of
# patient-grouped folds and scores `cls` and `patch_mean` on those same folds, so their AUCs
# are paired.

# %%
oof = []
for key in encoders:
    emb = embeddings("cohort", data, key, store=store_of.get(key), weights=weights.get(key), stand_in=stand_in,
                     device=device, dtype=dtype, input_size=input_size.get(key), n_images=n_images)
    features = {m: emb.features[m] for m in modes}
    for t in task_labels:
        oof.append(out_of_fold_table(emb.meta.assign(label=t, y=emb.meta[t]), features, "y", n_splits=n_splits,
                                     seed=seed).assign(encoder=key))
    print(f"{key}: {len(emb)} images encoded once each")
oof = pd.concat(oof, ignore_index=True)
table = auc_table(oof, modes, "y", by=["encoder", "label"], score_name="pooling", group_col="patient_id",
                  n_boot=n_boot, seed=seed)
tests = compare_table(oof, modes, "y", pairs=[("patch_mean", "cls")], by=["encoder", "label"],
                      group_col="patient_id", seed=seed)  # one BH family: every (encoder x label) on this page

# %% [markdown]
# ## AUC by encoder, label and pooling mode
# {numref}`tab-disease-auc` gives the numbers behind {numref}`fig-disease-auc`: AUC [95% CI]
# ({glue:text}`num-disease-auc-ci`) with the number of images with and without the
# finding. {glue:md}`num-disease-auc-notes`
#
# ```{glue:table} tab-disease-auc
# AUC [95% CI] of the `cls` and `patch_mean` probes per finding and encoder, with the
# images with (positives) and without (negatives) the finding. The CSV holds each interval's
# method and note.
# ```

# %% tags=["hide-input"]
enc_order = {e: i for i, e in enumerate(encoders)}
lab_order = {t: i for i, t in enumerate(task_labels)}
table = table.sort_values(["label", "encoder"], key=lambda s: s.map(lab_order if s.name == "label" else enc_order),
                          kind="stable").reset_index(drop=True)
table["produced_with"] = provenance
report.glue_text("num-disease-auc-ci", report.describe_methods(table))
report.glue_markdown("num-disease-auc-notes", report.notes_sentence(table))
fig = report.auc_by_pooling_figure(table, x="encoder", col="label", title="Globally decided findings", label=provenance)
report.publish_figure(fig, "fig-disease-auc", output_dir)
shown = table.assign(ci=report.with_ci(table)).pivot_table(index=["label", "encoder"], columns="pooling", values="ci",
                                                           aggfunc="first", sort=False)[modes].reset_index()
shown.columns.name = None
counts = table.drop_duplicates(["label", "encoder"])[["label", "encoder", "n_pos", "n_neg"]]
shown = shown.merge(counts, on=["label", "encoder"]).rename(
    columns={"cls": "cls: AUC [95% CI]", "patch_mean": "patch_mean: AUC [95% CI]", "n_pos": "positives",
             "n_neg": "negatives"})
report.write_summary(table.assign(analysis="disease: " + table["label"], what="label present vs absent"), output_dir)
report.publish_table(shown, "tab-disease-auc", output_dir, full=table, note=f"Produced with: {provenance}.")

# %% [markdown]
# ## Paired comparison: `patch_mean` against `cls`
# The same images and folds serve both modes, so the comparison is paired:
# {glue:text}`num-disease-test-method`. Each row's CI and p come from that one statistic.
# p-values are Benjamini-Hochberg adjusted over every (encoder x label) comparison on this
# page and printed down to 1e-16.
#
# ```{glue:table} tab-disease-paired-tests
# AUC(`patch_mean`) - AUC(`cls`) per finding and encoder, with its 95% CI, p and p adjusted
# (Benjamini-Hochberg), and the test (`method`: {glue:text}`num-disease-test-method`).
# ```

# %% tags=["hide-input"]
tests = tests.sort_values(["label", "encoder"], key=lambda s: s.map(lab_order if s.name == "label" else enc_order),
                          kind="stable").reset_index(drop=True)
report.glue_text("num-disease-test-method", report.describe_methods(tests))
shown_tests = pd.DataFrame({
    "label": tests["label"], "encoder": tests["encoder"],
    "AUC (patch_mean vs cls)": tests["auc_a"].map("{:.3f}".format) + " vs " + tests["auc_b"].map("{:.3f}".format),
    "Δ AUC [95% CI]": report.with_ci(tests, est="delta"), "p": tests["p_value"], "p (BH)": tests["p_adj"],
    "method": tests["method"]})
if shown_tests["method"].nunique() == 1:  # one procedure for every row: the caption names it
    shown_tests = shown_tests.drop(columns="method")
report.publish_table(shown_tests, "tab-disease-paired-tests", output_dir, full=tests.assign(produced_with=provenance))

# %% [markdown]
# ## The paper's numbers beside ours
# The abstract reports disease AUCs of 0.642-0.913 on globally decided tasks (**reported**,
# not recomputed here, on real cohorts with trained encoders); beside it the same range over
# this build's encoders and labels, per pooling mode.
#
# ```{glue:table} tab-disease-reported
# The abstract's disease-AUC range (reported) beside this build's, per pooling mode.
# ```

# %% tags=["hide-input"]
reported = pd.DataFrame([
    {"quantity": f"disease AUC, {m} (each encoder x label)", "reported (paper)": "0.642 to 0.913",
     "ours (this build)": report.format_range(table.loc[table["pooling"] == m, "auc"]), "ours produced with": provenance}
    for m in modes])
report.publish_table(reported, "tab-disease-reported", output_dir)

# %% [markdown]
# ## Exclusions
# Every image the cohort reader left out, and every image whose label was unknown for a
# finding (left out of that finding's probe), with the reason
# ({numref}`tab-disease-exclusions`).
#
# ```{glue:table} tab-disease-exclusions
# Images excluded, by source and reason ({glue:text}`num-disease-exclusions` in all; "none"
# when nothing was left out).
# ```

# %% tags=["hide-input"]
kept = oof.drop_duplicates(["encoder", "label", "image_id"]).groupby("label").size() / len(encoders)
n_used = min(n_images, len(data)) if n_images else len(data)
unknown_label = pd.DataFrame([{"source": "label unknown", "reason": f"{t}: no 1/0 label", "count": int(n_used - kept.get(t, 0))}
                              for t in task_labels if n_used - kept.get(t, 0) > 0], columns=["source", "reason", "count"])
exclusions = pd.concat([data.exclusions.assign(source="cohort reader")[["source", "reason", "count"]], unknown_label],
                       ignore_index=True)
report.publish_table(exclusions, "tab-disease-exclusions", output_dir)
report.glue_text("num-disease-exclusions", int(exclusions["count"].sum()) if len(exclusions) else 0, "{:d}")

# %% [markdown]
# ## What we did
# - Encoded each image once per encoder (or read it from a checked `cxrcore extract` store) and probed `cls`
#   and `patch_mean` for every label on the same patient-grouped folds.
# - Put a 95% CI on every AUC and compared `patch_mean` with `cls` by a paired test (named in the table),
#   Benjamini-Hochberg adjusted over the page.
# - Set this build's AUC range beside the paper's reported range.
#
# Every number on this page was computed by the build that rendered it.
#
# ## What's next
# - {doc}`perturbation_panel`: the same encoders and probes on a change confined to a few patches.
# - {doc}`chestxdet10`: real lesions with boxes, small against large.

# %% tags=["remove-input"]
# The key results in words, from the tables above (glued into the prose at the top of the page).
n_enc = len(encoders)
report.glue_markdown("num-disease-run", (
    f"This run: the first {n_used} images of the {data.name} cohort, labels {', '.join(task_labels)}, through "
    f"{n_enc} encoder{'s' * (n_enc > 1)} ({', '.join(encoders)}); {provenance}."))
report.glue_markdown("num-disease-auc", " ".join(
    f"{t}: `cls` {report.format_range(table[(table['label'] == t) & (table['pooling'] == 'cls')]['auc'])}, "
    f"`patch_mean` {report.format_range(table[(table['label'] == t) & (table['pooling'] == 'patch_mean')]['auc'])} "
    "(range over the encoders)." for t in task_labels))
sig = tests[tests["p_adj"] < 0.05]
report.glue_markdown("num-disease-tests", (
    f"`patch_mean` minus `cls` runs {report.format_range(tests['delta'], signed=True)} AUC; {len(sig)} of {len(tests)} "
    "differences have a Benjamini-Hochberg adjusted p below 0.05"
    + (f" ({', '.join(f'{r.encoder}, {r.label}: {r.delta:+.3f}' for r in sig.itertuples())})." if 0 < len(sig) <= 6
       else ".")))
report.glue_markdown("num-disease-reported", (
    f"Over every encoder and label, `cls` reaches {report.format_range(table[table['pooling'] == 'cls']['auc'])} and "
    f"`patch_mean` {report.format_range(table[table['pooling'] == 'patch_mean']['auc'])}; the paper reports "
    "0.642 to 0.913 (reported) with trained encoders on real cohorts"))
scope = {
    (True, True): "Random-weight stand-ins on synthetic phantoms. This shows the probes and statistics at work on "
                  "findings spread over many patches, the counterpart of the perturbation panel's few-patch change. "
                  "It **cannot** show how well a trained encoder recognises a disease: random weights have no learned "
                  "features (an AUC here says only how far a drawn heart or effusion moves random features), and the "
                  "phantom's findings are drawn shapes.",
    (True, False): f"Random-weight stand-ins on real radiographs ({data.name}): how much of each label a global "
                   "embedding of random features can carry; not what a trained encoder represents.",
    (False, True): "Published weights on synthetic phantoms: whether the trained encoders' global embeddings carry a "
                   "drawn, large finding; the phantom is not a radiograph.",
    (False, False): f"Published weights on real radiographs ({data.name}): the paper's disease probes. Labels mined "
                    "from reports are noisy, and an image-level AUC says nothing about small findings (see the "
                    "ChestX-Det10 chapter).",
}
report.glue_markdown("num-disease-scope", scope[(bool(stand_in), bool(data.synthetic))])
