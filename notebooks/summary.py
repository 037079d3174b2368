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
# # Summary: where small-lesion signal is lost, chapter by chapter
#
# ## Key results
# {glue:md}`num-summary-run`
#
# - **The dilution curve** ({numref}`fig-summary-dilution`). {glue:md}`num-summary-dilution`
# - **Without a box** ({numref}`tab-summary-readouts`). {glue:md}`num-summary-readouts`
# - **Findings decided by much of the image** ({numref}`tab-summary-disease-probes`).
#   {glue:md}`num-summary-disease`
# - **Every chapter's headline AUCs** are in one table per chapter below, and the paper's
#   numbers, labelled **reported**, beside ours in {numref}`tab-summary-reported`.
#
# ```{glue:figure} fig-summary-dilution
# :name: fig-summary-dilution
#
# **The dilution curve** of the {doc}`perturbation panel <perturbation_panel>`: AUC (95%
# CI bands) of a linear probe telling a perturbed image from the same image unperturbed,
# against the footprint of a nodule-like opacity (bottom: original pixels; top: patches of
# that encoder), one line per pooling mode, one panel per encoder. Dashed: chance. The
# figure title says how the numbers were produced (with the default build: a synthetic
# phantom cohort and random-weight stand-ins, not the paper's models).
# ```
#
# ## Overview
# This page collects what the analysis chapters of this build wrote: each chapter's
# headline AUCs (`summary.csv` in its output folder), the perturbation panel's dilution
# curve and box-free readouts, the audit cards, and every chapter's table of the paper's
# numbers beside ours. Nothing is recomputed here. Our numbers are labelled with how they
# were produced; the paper's are labelled **reported** and were not computed here.

# %% tags=["parameters"]
figures_dir: str = "book/_generated/figures"  # where the analysis notebooks wrote their outputs
output_dir: str = "book/_generated/figures/summary"  # where this page's figure and tables are written

# %% tags=["hide-input"]
from pathlib import Path

import pandas as pd

from cxrcore import report

ours = report.collect_summaries(figures_dir)
label = "; ".join(sorted(set(ours["produced_with"])))
print(f"{len(ours)} headline AUCs from {ours['chapter'].nunique()} chapters: {', '.join(dict.fromkeys(ours['chapter']))}")

# %% [markdown]
# ## The dilution curve
# {numref}`fig-summary-dilution` (top of the page) is the perturbation panel's main figure,
# drawn again from the table that chapter published (`tab-perturbation-dilution.csv`). Read
# each panel left to right: where `roi_local` (green) leaves chance while `cls` (blue) and
# `patch_mean` (orange) stay near it, a change under a few patches is in the patch tokens
# but averaged away by the global embeddings.

# %%
dilution = report.read_published(figures_dir, "tab-perturbation-dilution")
fig = report.dilution_figure(dilution, title="The dilution curve: nodule footprint sweep", label=label)
report.publish_figure(fig, "fig-summary-dilution", output_dir)

# %% [markdown]
# ## One table per chapter
# Each chapter's headline AUCs with their 95% CIs, one row per encoder (and analysis where a
# chapter has several), one column per pooling mode or readout. Read each table against
# chance (0.5), and read what each chapter measures from the note under its table: the
# perturbation panel compares an image with its perturbed copy at one footprint;
# ChestX-Det10's `cls` and `patch_mean` are image-level while its `roi_local` is box-level.
#
# ```{glue:table} tab-summary-perturbation-panel
# Perturbation panel ({doc}`chapter <perturbation_panel>`): AUC [95% CI] per encoder at the
# middle of the footprint sweep, the paper's three pooling modes and the box-free readouts.
# ```
#
# ```{glue:table} tab-summary-disease-probes
# Disease probes ({doc}`chapter <disease_probes>`): AUC [95% CI] of `cls` and `patch_mean`
# per finding and encoder.
# ```
#
# ```{glue:table} tab-summary-chestxdet10
# ChestX-Det10 ({doc}`chapter <chestxdet10>`): the chapter's headline AUCs [95% CI].
# ```
#
# ```{glue:table} tab-summary-box-jitter
# Box jitter ({doc}`chapter <box_jitter>`): the chapter's headline AUCs [95% CI].
# ```
#
# ```{glue:table} tab-summary-audit
# Audit sweep ({doc}`chapter <audit>`): the chapter's headline AUCs (means over the audit
# sweep's cells, without an interval).
# ```

# %% tags=["hide-input"]
CHAPTERS = ("perturbation_panel", "disease_probes", "chestxdet10", "box_jitter", "audit")
for chapter in CHAPTERS:
    sub = ours[ours["chapter"] == chapter].copy()
    sub["AUC [95% CI]"] = report.with_ci(sub)
    rows = ["analysis", "encoder"] if sub["analysis"].nunique() > 1 else ["encoder"]
    wide = sub.pivot_table(index=rows, columns="pooling", values="AUC [95% CI]", aggfunc="first", sort=False)
    wide = wide[report.order_pooling(wide.columns)].reset_index() if len(sub) else pd.DataFrame(columns=rows)
    wide.columns.name = None
    if len(sub):
        wide = wide.sort_values(rows, key=lambda s: s.map({e: i for i, e in enumerate(report.order_encoders(s))})
                                if s.name == "encoder" else s, kind="stable").reset_index(drop=True)
    whats = "; ".join(dict.fromkeys(f"{a}: {w}" if len(rows) > 1 else str(w) for a, w in zip(sub["analysis"], sub["what"])))
    note = (f"What is compared: {whats}. Produced with: {'; '.join(sorted(set(sub['produced_with'])))}." if len(sub)
            else f"The {chapter} chapter wrote no summary in this build.")
    report.publish_table(wide, f"tab-summary-{chapter.replace('_', '-')}", output_dir, full=sub.drop(columns="AUC [95% CI]"),
                         note=note)

# %% [markdown]
# ## Recovery without a box
# The perturbation panel also scores four box-free readouts of the same forward pass
# ({doc}`perturbation_panel`, section "Recovery without a box"). {numref}`tab-summary-readouts`
# gives, per readout, what it needs and how much of the `roi_local` - `cls` gap it closes at
# the middle of the footprint sweep, over the encoders.
#
# ```{glue:table} tab-summary-readouts
# Box-free readouts at the middle of the footprint sweep: what each needs, the share of the
# `roi_local` - `cls` gap it closes (median and range over the encoders), the encoders for
# which that share's 95% CI lies above 0, and the false-positive rate on lesion-free images
# at 90% sensitivity (range over the encoders) beside `cls`'s.
# ```

# %% tags=["hide-input"]
readouts = report.read_published(figures_dir, "tab-perturbation-readouts")
mid = sorted(readouts["footprint_px"].unique())[readouts["footprint_px"].nunique() // 2]
at_mid = readouts[(readouts["footprint_px"] == mid) & ~readouts["score"].isin(["cls", "patch_mean", "roi_local"])]
rows = []
for score, g in at_mid.groupby("score", sort=False):
    has_gap = g[g["gap"].abs() >= 0.05]
    rows.append({"score": score, "needs": g["needs"].iloc[0],
                 "share of gap closed, median (range)": (
                     "no gap to close" if has_gap.empty else f"{has_gap['closure'].median():.2f}" + (
                         f" ({report.format_range(has_gap['closure'], '{:.2f}')})" if len(has_gap) > 1 else "")),
                 "CI above 0": f"{int((has_gap['closure_ci_low'] > 0).sum())} of {len(has_gap)} encoders",
                 "false-positive rate": report.format_range(g["fpr"]), "cls false-positive rate": report.format_range(g["fpr_cls"])})
summary_readouts = pd.DataFrame(rows, columns=["score", "needs", "share of gap closed, median (range)", "CI above 0",
                                                "false-positive rate", "cls false-positive rate"])
summary_readouts = summary_readouts.sort_values("score", key=lambda s: s.map(
    {m: i for i, m in enumerate(report.POOLING_ORDER)}), kind="stable").reset_index(drop=True)
report.publish_table(summary_readouts, "tab-summary-readouts", output_dir, full=at_mid,
                     note=f"Footprint {mid:g} px; produced with: {label}.")

# %% [markdown]
# ## Audit cards
# The {doc}`audit chapter <audit>` runs the paper's test as one command per encoder
# (`cxrcore audit`) and writes a one-page card for each. {glue:md}`num-summary-audit-cards`
#
# ## The paper's numbers, beside ours
# The abstract's figures, as reported (not recomputed here), next to the same quantity from
# this build, as each chapter computed it. With stand-in encoders and a synthetic cohort the
# two are not expected to agree; the comparison shows which quantity each chapter estimates.
#
# ```{glue:table} tab-summary-reported
# The paper's numbers (reported) beside this build's, per chapter.
# ```

# %% tags=["hide-input"]
comparison = report.collect_reported(figures_dir)[["analysis", "quantity", "reported (paper)", "ours (this build)",
                                                   "ours produced with"]].rename(columns={"analysis": "chapter"})
report.publish_table(comparison, "tab-summary-reported", output_dir)

# %% [markdown]
# ## What we did
# - Drew the perturbation panel's dilution curve again as the book's headline figure.
# - Collected every chapter's headline AUCs into one table per chapter, and the box-free readouts' gap closure.
# - Linked the audit cards, and set the paper's reported values beside ours, each labelled with where it came from.
#
# ## What's next
# {doc}`../limitations` says what these numbers cannot show; {doc}`../reproducibility` how to
# run every chapter on real data and real weights.

# %% tags=["remove-input"]
# The key results in words, from what the chapters wrote (glued into the prose at the top of the page).
report.glue_markdown("num-summary-run", (
    f"This build: {ours['chapter'].nunique()} chapters, {ours['encoder'].nunique()} encoders; {label}."))
fp = dilution["footprint_px"]


def span(px, mode):
    return report.format_range(dilution[(dilution["footprint_px"] == px) & (dilution["pooling"] == mode)]["auc"])


report.glue_markdown("num-summary-dilution", (
    f"At the smallest footprint ({fp.min():g} px), `roi_local` reaches AUC {span(fp.min(), 'roi_local')} over the "
    f"encoders and `cls` {span(fp.min(), 'cls')}; at {mid:g} px, {span(mid, 'roi_local')} against {span(mid, 'cls')}; "
    f"at the largest ({fp.max():g} px), {span(fp.max(), 'roi_local')} against {span(fp.max(), 'cls')}."))
closing = at_mid[at_mid["gap"].abs() >= 0.05]
if len(closing) and closing["closure"].notna().any():
    med = closing.groupby("score")["closure"].median().sort_values(ascending=False)
    report.glue_markdown("num-summary-readouts", (
        f"At {mid:g} px, the box-free readouts close a median share of the `roi_local` - `cls` gap of "
        + ", ".join(f"{v:.2f} (`{k}`)" for k, v in med.items()) + "; what each needs is in the table."))
else:
    report.glue_markdown("num-summary-readouts", f"At {mid:g} px there is no `roi_local` - `cls` gap to close.")
disease = ours[ours["chapter"] == "disease_probes"]
report.glue_markdown("num-summary-disease", (
    "Over every encoder and finding, `cls` reaches AUC "
    f"{report.format_range(disease[disease['pooling'] == 'cls']['auc'])} and `patch_mean` "
    f"{report.format_range(disease[disease['pooling'] == 'patch_mean']['auc'])}; the paper reports 0.642 to 0.913 "
    "(reported)." if len(disease) else "The disease-probe chapter wrote no summary in this build."))
cards = sorted(Path(figures_dir).glob("audit/cards/*/audit.html"))
report.glue_markdown("num-summary-audit-cards", (
    "The cards of this build: " + ", ".join(f"[{p.parent.name}](path:{report.page_path(p, output_dir)})" for p in cards)
    + "." if cards else "No audit card was written in this build."))
