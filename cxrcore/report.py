"""The book's figures and tables: one house style, saved as files and glued under stable keys.

Keys are namespaced ``fig-<analysis>-<what>`` / ``tab-<analysis>-<what>``; every
figure is written to ``<output_dir>/<key>.png`` and every table to
``<output_dir>/<key>.csv`` as well as glued, so the book and a reader's own scripts
see the same numbers.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless everywhere: CI, papermill, clusters
# tqdm's notice that Jupyter widgets are missing is noise on a rendered page
warnings.filterwarnings("ignore", message="IProgress not found")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from .pooling import POOLING_MODES  # noqa: E402

#: One colour per pooling mode, the same in every figure of the book.
POOLING_PALETTE: dict[str, str] = {"cls": "#4C72B0", "patch_mean": "#DD8452", "roi_local": "#55A868"}
_KEY = re.compile(r"^(fig|tab|num)-[a-z0-9]+(-[a-z0-9]+)*$")

STAND_IN_LABEL = "synthetic cohort, random-weight stand-in encoders"
PROVENANCE_FILE = "provenance.json"


def provenance_label(cohort_name: str, synthetic: bool, stand_in: bool) -> str:
    """How a result was produced, in the words every figure and table carries."""
    if synthetic and stand_in:
        return STAND_IN_LABEL
    who = "synthetic cohort" if synthetic else f"{cohort_name} cohort"
    return f"{who}, " + ("random-weight stand-in encoders" if stand_in else "published encoder weights")


def record_run(output_dir: str | os.PathLike, *, cohort, stand_in: bool, encoders: Sequence[str],
               parameters: dict | None = None) -> str:
    """Write ``<output_dir>/provenance.json`` (read by the book build for its banner); return the label."""
    import json

    label = provenance_label(cohort.name, bool(cohort.synthetic), bool(stand_in))
    # book/build.py says whether this is the default or the smoke build; "manual" otherwise
    record = {"cohort": cohort.name, "synthetic": bool(cohort.synthetic), "stand_in": bool(stand_in),
              "encoders": list(encoders), "label": label, "parameters": parameters or {},
              "build_mode": os.environ.get("CXRCORE_BUILD_MODE", "manual")}
    _atomic_write(Path(output_dir) / PROVENANCE_FILE,
                  lambda p: Path(p).write_text(json.dumps(record, indent=2, default=str)))
    return label


def set_style() -> None:
    """The house style: seaborn ticks, readable sizes, no top/right spines."""
    sns.set_theme(context="notebook", style="ticks", font_scale=0.95)
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 150, "axes.spines.top": False,
                         "axes.spines.right": False, "savefig.bbox": "tight"})


def check_key(key: str) -> str:
    if not _KEY.match(key):
        raise ValueError(f"glue key {key!r} must look like 'fig-<analysis>-<what>', 'tab-...' or 'num-...' (lower case, dashes)")
    return key


def _atomic_write(path: Path, write) -> None:
    """Write through a temp file in the same folder, then rename: never a half-written output."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_figure(fig: matplotlib.figure.Figure, key: str, output_dir: str | os.PathLike) -> Path:
    """Save ``fig`` as ``<output_dir>/<key>.png`` atomically."""
    path = Path(output_dir) / f"{check_key(key)}.png"
    _atomic_write(path, lambda p: fig.savefig(p, format="png"))
    return path


def save_table(df: pd.DataFrame, key: str, output_dir: str | os.PathLike) -> Path:
    """Save ``df`` as ``<output_dir>/<key>.csv`` atomically."""
    path = Path(output_dir) / f"{check_key(key)}.csv"
    _atomic_write(path, lambda p: df.to_csv(p, index=False))
    return path


def glue(key: str, value, display: bool = False) -> None:
    """Glue ``value`` under ``key`` for the book (myst-nb); a no-op outside a notebook kernel."""
    check_key(key)
    try:
        from myst_nb import glue as _glue
    except ImportError:  # running as a script without the book extras: files are still written
        return
    _glue(key, value, display=display)


def _png_in_notebooks() -> None:
    """Make IPython render figures as PNG: under the Agg backend it registers no formatter,
    and a glued figure without a PNG shows nothing in the book."""
    try:
        from IPython import get_ipython
        from matplotlib_inline.backend_inline import set_matplotlib_formats
    except ImportError:
        return
    if get_ipython() is not None:
        set_matplotlib_formats("png")


def publish_figure(fig, key: str, output_dir: str | os.PathLike) -> None:
    """Save ``<output_dir>/<key>.png`` and glue the figure under ``key`` (a page shows it with ``{glue:figure}``).

    Returns None so that a cell ending with this call prints nothing.
    """
    save_figure(fig, key, output_dir)
    _png_in_notebooks()
    glue(key, fig, display=False)
    plt.close(fig)  # shown through the glue only, never twice


def publish_table(df: pd.DataFrame, key: str, output_dir: str | os.PathLike, *, floatfmt: str = "{:.3f}") -> None:
    """Save ``<output_dir>/<key>.csv`` and glue the table, rendered as HTML, under ``key``."""
    save_table(df, key, output_dir)
    glue(key, format_table(df, floatfmt=floatfmt), display=False)


def format_table(df: pd.DataFrame, floatfmt: str = "{:.3f}"):
    """A pandas Styler with fixed float format and no index, for HTML rendering in the book."""
    floats = [c for c in df.columns if pd.api.types.is_float_dtype(df[c])]
    return df.style.format({c: floatfmt for c in floats}, na_rep="–").hide(axis="index")


def with_ci(df: pd.DataFrame, est: str = "auc", lo: str = "ci_low", hi: str = "ci_high", fmt: str = "{:.3f}") -> pd.Series:
    """'0.712 [0.650, 0.771]' strings for a table column ('0.712' where the row has no CI)."""
    def one(r) -> str:
        if pd.isna(r[est]):
            return "not estimable"
        if pd.isna(r[lo]) or pd.isna(r[hi]):
            return fmt.format(r[est])
        return f"{fmt.format(r[est])} [{fmt.format(r[lo])}, {fmt.format(r[hi])}]"

    return df.apply(one, axis=1).astype(str) if len(df) else pd.Series([], dtype=str)


def auc_by_pooling_figure(table: pd.DataFrame, *, x: str = "encoder", col: str | None = None, col_wrap: int = 4,
                          title: str = "", chance: float = 0.5, label: str = STAND_IN_LABEL):
    """Point-and-interval plot of AUC per pooling mode (colour) along ``x``, one panel per ``col`` value.

    ``table`` has columns ``pooling``, ``auc``, ``ci_low``, ``ci_high``, ``x`` (and ``col``);
    rows without a CI are drawn as points. Panels wrap after ``col_wrap``. ``label`` says
    how the numbers were produced and is printed on the figure.
    """
    set_style()
    cols = [None] if col is None else list(dict.fromkeys(table[col]))
    ncols = min(len(cols), col_wrap)
    nrows = int(np.ceil(len(cols) / ncols))
    nx = table[x].nunique()
    width = max(3.2, 1.6 + 0.55 * nx)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols + 1.2, 3.3 * nrows + 0.6), sharey=True, squeeze=False)
    modes = [m for m in POOLING_MODES if m in set(table["pooling"])]
    for k, ax in enumerate(axes.ravel()):
        if k >= len(cols):
            ax.axis("off")
            continue
        c = cols[k]
        sub = table if c is None else table[table[col] == c]
        xs = list(dict.fromkeys(sub[x]))
        for j, m in enumerate(modes):
            s = sub[sub["pooling"] == m].set_index(x).reindex(xs)
            pos = np.arange(len(xs)) + (j - (len(modes) - 1) / 2) * 0.22
            err = np.vstack([(s["auc"] - s["ci_low"]).fillna(0).clip(lower=0), (s["ci_high"] - s["auc"]).fillna(0).clip(lower=0)])
            ax.errorbar(pos, s["auc"], yerr=err, fmt="o", color=POOLING_PALETTE[m], label=m, capsize=2.5, ms=5, lw=1.3)
        ax.axhline(chance, color="0.5", ls="--", lw=1)
        rot = 40 if (len(xs) > 3 or max(len(str(v)) for v in xs) > 10) else 0
        ax.set_xticks(np.arange(len(xs)), [str(v) for v in xs], rotation=rot, ha="right" if rot else "center", fontsize=8)
        ax.set_ylim(0.3, 1.02)
        ax.set_xlabel("")
        if c is not None:
            ax.set_title(str(c), fontsize=10)
    for r in range(nrows):
        axes[r, 0].set_ylabel("AUC (95% CI)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, title="pooling", frameon=False, loc="center right", fontsize=8)
    if title or label:
        fig.suptitle(f"{title}\n({label})" if label else title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 1.0 / (width * ncols + 1.2), 1))
    return fig


def image_grid(images: Sequence[np.ndarray], titles: Sequence[str] | None = None, boxes: Sequence | None = None,
               ncols: int = 4, size: float = 2.4, suptitle: str = ""):
    """Grey images in a grid, optional titles and boxes ``(x1, y1, x2, y2)`` (or lists of them) drawn in red."""
    set_style()
    n = len(images)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for k, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if k >= n:
            continue
        ax.imshow(images[k], cmap="gray", vmin=0, vmax=1, interpolation="lanczos")
        if titles is not None:
            ax.set_title(titles[k], fontsize=8)
        if boxes is not None and boxes[k] is not None:
            bl = boxes[k] if len(boxes[k]) and np.ndim(boxes[k][0]) else [boxes[k]]
            for b in bl:
                x1, y1, x2, y2 = b
                ax.add_patch(plt.Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, ec="red", lw=1.2))
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def patch_grid_figure(image: np.ndarray, geometry, box, *, title: str = ""):
    """The three pooling modes drawn on one model input: the token grid, the box and the cells it touches.

    ``image`` is the original 2-D image in [0, 1]; ``geometry`` the encoder's
    :class:`~cxrcore.geometry.Geometry` for it; ``box`` in original pixels.
    """
    import torch

    set_style()
    x = geometry.apply(torch.from_numpy(np.asarray(image, np.float32))[None], "bilinear")[0].numpy()
    gh, gw = geometry.grid
    s = geometry.stride
    r0, r1, c0, c1 = geometry.cells(box)
    bx1, by1, bx2, by2 = geometry.to_input([box])[0]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.9))
    panels = [("cls", "one global embedding\n(CLS token / pooler / GAP)"),
              ("patch_mean", f"mean of all {gh * gw} patch tokens"),
              ("roi_local", f"mean of the {(r1 - r0) * (c1 - c0)} tokens under the box")]
    for ax, (mode, text) in zip(axes, panels):
        ax.imshow(x, cmap="gray", vmin=0, vmax=1)
        for k in range(gw + 1):
            ax.axvline(k * s - 0.5, color="w", lw=0.3, alpha=0.5)
        for k in range(gh + 1):
            ax.axhline(k * s - 0.5, color="w", lw=0.3, alpha=0.5)
        colour = POOLING_PALETTE[mode]
        if mode == "patch_mean":
            ax.add_patch(plt.Rectangle((-0.5, -0.5), gw * s, gh * s, color=colour, alpha=0.25))
        elif mode == "roi_local":
            ax.add_patch(plt.Rectangle((c0 * s - 0.5, r0 * s - 0.5), (c1 - c0) * s, (r1 - r0) * s, color=colour, alpha=0.45))
            ax.add_patch(plt.Rectangle((bx1 - 0.5, by1 - 0.5), bx2 - bx1, by2 - by1, fill=False, ec="red", lw=1.2))
        else:
            for side in ax.spines.values():  # the whole input -> one vector: frame it
                side.set_visible(True)
                side.set_color(colour)
                side.set_linewidth(4)
        ax.set_title(f"{mode}: {text}", fontsize=9, color=colour)
        ax.set_xticks([])
        ax.set_yticks([])
        if mode != "cls":
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


SUMMARY_FILE = "summary.csv"
SUMMARY_COLUMNS = ("analysis", "encoder", "pooling", "auc", "ci_low", "ci_high", "what", "produced_with")


def write_summary(rows: pd.DataFrame, output_dir: str | os.PathLike) -> Path:
    """Write an analysis's headline AUCs (``SUMMARY_COLUMNS``) for the summary chapter to collect."""
    missing = [c for c in SUMMARY_COLUMNS if c not in rows.columns]
    if missing:
        raise ValueError(f"summary rows lack column(s) {missing}; expected {list(SUMMARY_COLUMNS)}")
    path = Path(output_dir) / SUMMARY_FILE
    _atomic_write(path, lambda p: rows[list(SUMMARY_COLUMNS)].to_csv(p, index=False))
    return path


def _check_one_build(paths: Sequence[Path]) -> None:
    """Refuse to collect outputs of the smoke and the default build side by side."""
    import json

    modes = {}
    for p in paths:
        prov = p.parent / PROVENANCE_FILE
        modes[p.parent.name] = json.loads(prov.read_text()).get("build_mode", "manual") if prov.is_file() else "unknown"
    if len(set(modes.values())) > 1:
        raise ValueError(f"the analyses' outputs come from different builds {modes}; rebuild them together "
                         "(python book/build.py, or --smoke for all) before summarising")


def collect_summaries(figures_dir: str | os.PathLike) -> pd.DataFrame:
    """Every analysis's ``summary.csv`` under ``figures_dir``, concatenated (all from one build)."""
    paths = sorted(Path(figures_dir).glob(f"*/{SUMMARY_FILE}"))
    if not paths:
        raise FileNotFoundError(f"no {SUMMARY_FILE} under {figures_dir}: run the analysis notebooks first")
    _check_one_build(paths)
    return pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)


REPORTED_COLUMNS = ("quantity", "reported (paper)", "ours (this build)", "ours produced with")


def collect_reported(figures_dir: str | os.PathLike) -> pd.DataFrame:
    """Every analysis's reported-vs-ours table (``tab-<analysis>-reported.csv``), concatenated."""
    paths = sorted(Path(figures_dir).glob("*/tab-*-reported.csv"))
    if not paths:
        raise FileNotFoundError(f"no tab-*-reported.csv under {figures_dir}: run the analysis notebooks first")
    _check_one_build(paths)
    frames = []
    for p in paths:
        df = pd.read_csv(p)
        missing = [c for c in REPORTED_COLUMNS if c not in df.columns]
        if missing:
            raise ValueError(f"{p}: lacks column(s) {missing}; expected {list(REPORTED_COLUMNS)}")
        frames.append(df[list(REPORTED_COLUMNS)].assign(analysis=p.parent.name))
    return pd.concat(frames, ignore_index=True)
