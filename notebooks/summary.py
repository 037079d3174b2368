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
# # Summary: AUC by pooling mode, per encoder, per analysis
#
# ## Overview
# One figure and one table per analysis, collected from the chapters of this build, with
# the paper's numbers beside them where its abstract gives them. Our numbers are labelled
# with how they were produced; the paper's are labelled **reported** and were not
# computed here.
#
# ## Prerequisites
# The analysis chapters; this page only collects what they wrote (`summary.csv` in each
# chapter's output folder).

# %% tags=["parameters"]
figures_dir: str = "book/_generated/figures"  # where the analysis notebooks wrote their outputs
output_dir: str = "book/_generated/figures/summary"  # where this page's figure and tables are written

# %%
import pandas as pd

from cxrcore import report

ours = report.collect_summaries(figures_dir)
analyses = list(dict.fromkeys(ours["analysis"]))
print(f"{len(ours)} headline AUCs from {len(analyses)} analyses:", analyses)
print("produced with:", sorted(set(ours["produced_with"])))

# %% [markdown]
# ## The headline figure

# %%
label = "; ".join(sorted(set(ours["produced_with"])))
fig = report.auc_by_pooling_figure(ours, x="encoder", col="analysis", col_wrap=3, title="AUC by pooling mode", label=label)
report.publish_figure(fig, "fig-summary-headline", output_dir)

# %% [markdown]
# ```{glue:figure} fig-summary-headline
# :name: fig-summary-headline
#
# Headline AUC by pooling mode, per encoder (x) and analysis (panel), collected from this
# build's chapters; how they were produced is in the figure title. Read each panel against
# chance (dashed), not across panels: in the ChestX-Det10 panels `cls` and `patch_mean` are
# image-level (class present vs absent) while `roi_local` is box-level (lesion vs matched
# control box); the perturbation panel shows each mode's mean over the panel's cells.
# ```

# %% [markdown]
# ## One table per analysis
# AUC with its 95% bootstrap CI for each encoder (rows) and pooling mode (columns).

# %%
tables = {}
for a in analyses:
    sub = ours[ours["analysis"] == a].copy()
    sub["AUC [95% CI]"] = report.with_ci(sub)
    wide = sub.pivot_table(index="encoder", columns="pooling", values="AUC [95% CI]", aggfunc="first").reset_index()
    wide.columns.name = None
    wide.insert(1, "what", sub["what"].iloc[0])
    wide["produced with"] = sub["produced_with"].iloc[0]
    tables[a] = wide
    key = "tab-summary-" + "".join(ch if ch.isalnum() else "-" for ch in a.lower()).strip("-").replace("--", "-")
    report.publish_table(wide, key, output_dir)
    print(a)
    display(wide)

# %% [markdown]
# ## The paper's numbers, beside ours
# The abstract's figures, as reported (not recomputed here), next to the same quantity
# from this build, as each chapter computed it. With stand-in encoders and a synthetic
# cohort the two are not expected to agree; the comparison shows which quantity each
# chapter estimates.

# %%
comparison = report.collect_reported(figures_dir)[["analysis", "quantity", "reported (paper)", "ours (this build)", "ours produced with"]]
report.publish_table(comparison, "tab-summary-reported", output_dir)
comparison

# %% [markdown]
# ## What we did
# - Collected every chapter's headline AUCs into one figure and one table per analysis.
# - Set the paper's reported values beside ours, each labelled with where it came from.
