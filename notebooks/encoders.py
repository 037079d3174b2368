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
# # The encoders: what each model is, how it is run, what it costs
#
# ## Key results
# The six encoders of the paper differ {glue:text}`num-encoders-gflops-ratio`-fold in work per
# image, from {glue:text}`num-encoders-gflops-min` GFLOPs ({glue:text}`num-encoders-cheapest`) to
# {glue:text}`num-encoders-gflops-max` GFLOPs ({glue:text}`num-encoders-dearest`), and their
# token grids from {glue:text}`num-encoders-grid-min` to {glue:text}`num-encoders-grid-max`
# cells, so a lesion of a given size covers very different numbers of tokens
# ({numref}`tab-encoders-runs`). Extracting `cls`, `patch_mean` and `roi_local` for all six
# over the paper's 492,724-image pool, ChestX-Det10 and the default perturbation panel is
# estimated at {glue:text}`num-encoders-gpuh-total` GPU-hours of forward passes, of which
# {glue:text}`num-encoders-gpuh-dearest-share` go to {glue:text}`num-encoders-dearest`
# ({numref}`tab-encoders-gpu-hours`; assumption: {glue:text}`num-encoders-gpuh-assumption`).
#
# **What this shows / what it cannot show.** The facts of {numref}`tab-encoders-what` and
# the counts of {numref}`tab-encoders-runs` come from each model's published configuration
# and processor, built at full size on PyTorch's `meta` device (no weights, no download):
# they hold for the published models whatever weights this build had. The token-layout
# checks of {numref}`tab-encoders-token-checks` run on random-weight stand-ins of the same
# model classes: they show that the three pooling modes read the tokens the paper means,
# not what the trained models represent. The GPU-hours are an estimate from FLOPs and an
# assumed throughput, not a measurement; decoding is assumed to keep up (see
# [Reproducibility](../reproducibility.md)).
#
# ## Overview
# The paper's claims rest on reading `cls`, `patch_mean` and `roi_local` from the same
# forward pass of each encoder, and each family lays out its tokens differently. The
# referee asked for a table of what each model is; {numref}`tab-encoders-what` and
# {numref}`tab-encoders-runs` are that table, split in two for reading (every field is in
# one CSV under each).
#
# ## Prerequisites
# [Methods](../methods.md), for what the three pooling modes are.

# %% tags=["parameters"]
encoders: list = ["rad-dino", "dinov2-b14", "dinov3-vit7b16", "biomedclip", "medsiglip-448", "dino-resnet50"]  # encoder keys
achieved_tflops: float = 0.0  # bf16 TFLOP/s measured on your GPU (benchmarks/gpu_extract.py); 0: the stated assumption
seed: int = 0  # seed for the random test images of the token-layout checks
output_dir: str = "book/_generated/figures/encoders"  # where tables are written

# %% tags=["remove-cell"]
# Checks and imports: stop at once on a wrong parameter.
import numpy as np
import pandas as pd

import cxrcore
from cxrcore import report
from cxrcore.encoders import check_encoders
from cxrcore.extract import gpu_hours_table

check_encoders(encoders)
if achieved_tflops < 0:
    raise ValueError(f"achieved_tflops={achieved_tflops}: accepted are a measured TFLOP/s > 0, or 0 for the stated assumption")
encoders = report.order_encoders(encoders)

# %% [markdown]
# ## What each encoder is
# Every fact below is a field of the encoder's registered specification
# (`cxrcore.encoder_spec(key)`), written from its model card, configuration and paper; the
# citation says where to read more.

# %%
specs = {key: cxrcore.encoder_spec(key) for key in encoders}
facts = pd.DataFrame([{
    "encoder": key, "pretraining data": s.pretraining_data, "objective": s.objective,
    "input (px)": s.input_size, "why this input size": s.input_size_reason, "token layout": s.token_layout,
    "embedding used as cls": s.cls_embedding, "licence": s.licence, "gated": s.gated, "citation": s.citation,
    "weights": s.weights, "patch / stride (px)": s.patch_size, "grid": f"{s.grid[0]}×{s.grid[1]}",
    "register tokens": s.num_register_tokens, "width": s.embed_dim, "parameters (M)": s.num_params / 1e6,
    "GFLOPs per image": s.gflops, "cls mode is": s.global_pool, "preprocessing": s.geometry,
} for key, s in specs.items()])

# %% tags=["remove-cell"]
# arXiv numbers ("2508.10104") stay in the CSV and on the References page: on the page they read as long decimals
short = facts.assign(citation=facts["citation"].str.replace(r",?\s*arXiv:\S+", "", regex=True))
report.publish_table(short[["encoder", "pretraining data", "objective", "licence", "gated", "citation"]],
                     "tab-encoders-what", output_dir, full=facts,
                     note="Full references (with arXiv numbers) are on the References page and in the CSV.")
report.publish_text_table(facts[["encoder", "input (px)", "grid", "token layout", "embedding used as cls", "parameters (M)",
                                 "GFLOPs per image"]].assign(grid=[f"{s.grid[0]}×{s.grid[1]} of {s.patch_size} px"
                                                                   for s in specs.values()]),
                          "tab-encoders-runs", output_dir, full=facts, floatfmt="{:,.1f}",
                          text_columns=["grid", "token layout", "embedding used as cls"])
why = "\n".join(f"- **{k}, {s.input_size} px**: {s.input_size_reason}." for k, s in specs.items())
gflops = facts.set_index("encoder")["GFLOPs per image"]
grids = {k: s.grid[0] * s.grid[1] for k, s in specs.items()}
report.glue_text("num-encoders-gflops-min", gflops.min(), "{:,.1f}")
report.glue_text("num-encoders-gflops-max", gflops.max(), "{:,.0f}")
report.glue_text("num-encoders-gflops-ratio", gflops.max() / gflops.min(), "{:,.0f}")
report.glue_text("num-encoders-cheapest", gflops.idxmin())
report.glue_text("num-encoders-dearest", gflops.idxmax())
report.glue_text("num-encoders-grid-min", "{0}×{0}".format(int(round(min(grids.values()) ** 0.5))))
report.glue_text("num-encoders-grid-max", "{0}×{0}".format(int(round(max(grids.values()) ** 0.5))))

# %% [markdown]
# ```{glue:table} tab-encoders-what
# What each encoder is: pretraining data, objective, licence, whether the weights are
# gated on the Hugging Face Hub (accept the licence on the model page first), and the
# citation. From the registered specifications; the CSV holds every field.
# ```
#
# ```{glue:table} tab-encoders-runs
# How each encoder is run: input side, token grid, token layout, what the `cls` pooling
# mode reads, parameters of the image tower and forward GFLOPs per image at that input,
# counted on the `meta` device.
# ```
#
# Why each encoder runs at its input size, as its specification (`spec.input_size_reason`)
# records it:

# %% tags=["remove-input"]
from IPython.display import Markdown, display

display(Markdown(why))

# %% [markdown]
# Two rows of {numref}`tab-encoders-runs` need a word. **DINOv2-B/14 runs at 518**
# although its published processor crops to 224: DINOv2 ends pretraining at 518, and
# RAD-DINO, fine-tuned from it, runs at 518, so both DINOv2-family encoders see the same
# 37×37 grid and a lesion spans the same number of patches (`input_size=224` reproduces
# the processor). **DINOv3 ViT-7B runs at its processor's 224** (a 14×14 grid): its
# rotary position embeddings would run at any multiple of 16, at about (side/224)² the
# cost of a 6.7-billion-parameter model. MedSigLIP has **no CLS token**: its `cls` mode is
# the attention-pooling head's output. The ResNet-50 control has no tokens: its layer-4
# cells (stride 32) are the "patches", and its `cls` mode is global average pooling, which
# is the mean of those cells, i.e. **equal to its `patch_mean` by construction**: a result
# on which `cls` and `patch_mean` differ cannot come from it.

# %% [markdown]
# ## What the paper's extraction costs
# `cxrcore.extract.gpu_hours_table` turns each encoder's GFLOPs into forward-pass time for
# the paper's cohorts; its throughput assumption is stated with the numbers.

# %%
hours = gpu_hours_table(encoders, rate_source=achieved_tflops or "stated")

# %% tags=["remove-cell"]
def _workload(name: str) -> str:
    return "panel" if name.startswith("panel") else "ChestX-Det10" if name == "ChestX-Det10" else "pool"


column = hours["workload"].map(_workload)
wide = hours.assign(column=column).pivot_table(index="encoder", columns="column", values="gpu_hours", aggfunc="sum",
                                               sort=False)
wide = wide.reindex(encoders)[["pool", "ChestX-Det10", "panel"]]
wide["total"] = wide.sum(axis=1)
rate = hours.drop_duplicates("encoder").set_index("encoder").reindex(encoders)
n_pool = int(hours.loc[column == "pool", "images"].iloc[0])
n_cxd = int(hours.loc[column == "ChestX-Det10", "images"].iloc[0])
panel_row = hours[column == "panel"].iloc[0]


def _h(v: float) -> str:
    """GPU-hours for reading: three decimals, and '< 0.001' rather than a number with no digits left."""
    return f"{v:,.3f}" if v >= 0.0005 else "< 0.001"


shown = pd.DataFrame({"encoder": encoders, "GFLOPs per image": rate["gflops_per_pass"].to_numpy(),
                      "images/s (assumed)": rate["passes_per_s"].round().astype(int).to_numpy(),
                      f"pool ({n_pool:,} images)": wide["pool"].map(_h).to_numpy(),
                      f"ChestX-Det10 ({n_cxd:,})": wide["ChestX-Det10"].map(_h).to_numpy(),
                      f"panel ({int(panel_row['forward_passes']):,} passes)": wide["panel"].map(_h).to_numpy(),
                      "total": wide["total"].map(_h).to_numpy()})
assumption = str(panel_row["rate_source"]).replace(" x ", " × ")
if not achieved_tflops:
    assumption = (f"{assumption}, i.e. an NVIDIA H100 SXM's dense bf16 peak at an assumed 40% model-FLOP "
                  "utilisation, the same FLOP rate for every encoder, decoding and writing hidden behind the forward pass")
report.publish_table(shown, "tab-encoders-gpu-hours", output_dir, full=hours, floatfmt="{:,.1f}",
                     note=f"Estimated, not measured: {assumption}.")
report.glue_text("num-encoders-gpuh-assumption", assumption)
report.glue_text("num-encoders-gpuh-total", wide["total"].sum(), "{:,.1f}")
report.glue_text("num-encoders-gpuh-dearest-share", wide["total"].max() / wide["total"].sum(), "{:.0%}")
# each cell on its own, for the reproducibility page (a {glue:text} reference from another document)
for key in encoders:
    for col in ("pool", "ChestX-Det10", "panel", "total"):
        report.glue_text(f"num-encoders-gpuh-{key}-{col.lower().replace('-', '')}", _h(wide.loc[key, col]))
report.glue_text("num-encoders-gpuh-panel-passes", f"{int(panel_row['forward_passes']):,}")
report.glue_text("num-encoders-gpuh-panel-name", panel_row["workload"].split(" on ")[0])

# %% [markdown]
# ```{glue:table} tab-encoders-gpu-hours
# Estimated GPU-hours of forward passes per encoder for the paper's cohorts: the
# aggregate pool (NIH ChestX-ray14, MIMIC-CXR-JPG and Emory), ChestX-Det10, and the default
# perturbation panel on the pool (every image once unperturbed and once per cell). Work
# per image is the encoder's GFLOPs; the rate is the stated assumption under the table.
# ```
#
# The estimate is forward passes only. On a GPU node decoding is the usual bottleneck (a
# 2048² PNG takes about 25 ms on one core): `python benchmarks/bench_decode.py --gpu-rate
# 1000` prints how many decoding workers a given rate needs, and
# `benchmarks/gpu_extract.py` measures the achieved rate, which `achieved_tflops=` turns
# into this table for your hardware.

# %% [markdown]
# ## Token layout, checked on the stand-ins
# Each stand-in has the published model's class, token layout, input size and
# preprocessing, with small random weights. Three checks per encoder, on two square
# images so that no pixel is cropped: `roi_local` of a full-image box equals `patch_mean`;
# a box inside one patch cell gives that cell's token; and, for the ResNet only, `cls`
# equals `patch_mean` ({numref}`tab-encoders-token-checks`).

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
        "encoder": key, "grid": "×".join(map(str, out.grid.shape[1:3])), "stand-in width": out.cls.shape[1],
        "full box == patch_mean": bool(np.allclose(full, out.patch_mean[0], atol=1e-5)),
        "one-cell box == that token": bool(np.allclose(one, out.grid[0, 2, 3], atol=1e-5)),
        "cls == patch_mean": bool(np.allclose(out.cls, out.patch_mean, atol=1e-5)),
    })
checks = pd.DataFrame(checks)
assert checks["full box == patch_mean"].all() and checks["one-cell box == that token"].all()
is_gap = checks["encoder"].map(lambda k: specs[k].global_pool == "gap")
assert (checks["cls == patch_mean"] == is_gap).all(), "cls equals patch_mean exactly for the global-average-pool encoders"

# %% tags=["remove-cell"]
report.publish_table(checks, "tab-encoders-token-checks", output_dir,
                     note="Random-weight stand-ins (small widths) of each published model class.")

# %% [markdown]
# ```{glue:table} tab-encoders-token-checks
# Token-layout checks on the stand-ins: a full-image box pools to `patch_mean`, a box
# inside one cell to that cell's token, and only the global-average-pool ResNet has
# `cls` equal to `patch_mean`.
# ```

# %% [markdown]
# ## What we did
# - Read every encoder's published facts from its registered specification, and counted
#   parameters and GFLOPs on the full-size architecture built on the `meta` device.
# - Turned GFLOPs into estimated GPU-hours for the paper's cohorts under a stated
#   throughput assumption (or your measured one).
# - Checked on each stand-in that the pooling modes read the tokens the paper means: a
#   full-image box gives `patch_mean`, a one-cell box gives that cell, and only the ResNet
#   has `cls` equal to `patch_mean`.
#
# ## What's next
# The [perturbation panel](perturbation_panel.ipynb) reads the three pooling modes of
# each encoder on small synthetic lesions; [Reproducibility](../reproducibility.md) runs
# them on the paper's cohorts.
