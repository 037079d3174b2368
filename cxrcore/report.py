"""The book's figures and tables: one house style, saved as files and glued under stable keys.

Keys are namespaced ``fig-<analysis>-<what>`` / ``tab-<analysis>-<what>`` /
``num-<analysis>-<what>``; every figure is written to ``<output_dir>/<key>.png`` and
every table to ``<output_dir>/<key>.csv`` as well as glued, so the book and a reader's
own scripts see the same numbers.

On a page (MyST markdown cells of the notebook):

- a figure: ```` ```{glue:figure} fig-x-y ```` with ``:name: fig-x-y`` and a caption;
- a table: ```` ```{glue:table} tab-x-y ```` with a caption (the book's extension,
  ``book/_ext/cxrcore_book.py``: a numbered "Table N", ``:name:`` defaults to the key);
- a number in prose: ``{glue:text}`num-x-y``` after :func:`glue_text`;
- refer to any of them with ``{numref}`fig-x-y``` / ``{numref}`tab-x-y```.
"""

from __future__ import annotations

import html
import math
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless everywhere: CI, papermill, clusters
# tqdm's notice that Jupyter widgets are missing is noise on a rendered page
warnings.filterwarnings("ignore", message="IProgress not found")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from . import stats  # noqa: E402  (one p-value formatter for the package)

_KEY = re.compile(r"^(fig|tab|num)-[a-z0-9]+(-[a-z0-9]+)*$")

STAND_IN_LABEL = "synthetic cohort, random-weight stand-in encoders"
PROVENANCE_FILE = "provenance.json"

#: The order encoders appear in, in every figure and table of the book: the paper's
#: five ViTs, then the ResNet-50 control. Keys not listed (``timm:...``, ``hf:...``)
#: follow in the order they first appear.
ENCODER_ORDER: tuple[str, ...] = ("rad-dino", "dinov2-b14", "dinov3-vit7b16", "biomedclip", "medsiglip-448",
                                  "dino-resnet50")

#: The order pooling modes appear in: the paper's two global readouts, the box-free
#: readouts of the same forward pass, then the box-restricted ``roi_local``.
POOLING_ORDER: tuple[str, ...] = ("cls", "patch_mean", "gem", "topk_mean", "patch_max", "mil", "roi_local")

#: One colour per pooling mode, the same in every figure of the book (seaborn "deep").
POOLING_COLORS: dict[str, str] = {
    "cls": "#4C72B0",  # blue
    "patch_mean": "#DD8452",  # orange
    "gem": "#8172B3",  # purple
    "topk_mean": "#937860",  # brown
    "patch_max": "#C44E52",  # red
    "mil": "#DA8BC3",  # pink
    "roi_local": "#55A868",  # green
}
#: One marker per pooling mode, so the modes stay apart in grey print and for readers
#: who do not tell the colours apart.
POOLING_MARKERS: dict[str, str] = {"cls": "o", "patch_mean": "s", "gem": "D", "topk_mean": "v", "patch_max": "^",
                                   "mil": "P", "roi_local": "X"}
#: The earlier name of :data:`POOLING_COLORS` (notebooks use both).
POOLING_PALETTE = POOLING_COLORS

#: Figures are drawn at the width of the book's text column so that their fonts read at
#: the size they were set in (about 12 px at 1400 px page width).
PAGE_WIDTH_IN = 7.5
CHANCE_COLOR = "0.45"


# -- provenance ----------------------------------------------------------------------------
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


# -- style, keys, files --------------------------------------------------------------------
def set_style() -> None:
    """The house style: seaborn ticks, readable sizes, no top/right spines."""
    sns.set_theme(context="notebook", style="ticks", font_scale=0.9)
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 160, "axes.spines.top": False,
                         "axes.spines.right": False, "savefig.bbox": "tight", "legend.frameon": False,
                         "axes.titlesize": 10, "axes.labelsize": 9.5, "xtick.labelsize": 8.5,
                         "ytick.labelsize": 8.5, "legend.fontsize": 8.5, "figure.titlesize": 10})


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
    """Save ``df`` as ``<output_dir>/<key>.csv`` atomically (full precision, every column)."""
    path = Path(output_dir) / f"{check_key(key)}.csv"
    _atomic_write(path, lambda p: _flat(df).to_csv(p, index=False))
    return path


def glue(key: str, value, display: bool = False) -> None:
    """Glue ``value`` under ``key`` for the book (myst-nb); a no-op outside a notebook kernel."""
    check_key(key)
    try:
        from myst_nb import glue as _glue
    except ImportError:  # running as a script without the book extras: files are still written
        return
    _glue(key, value, display=display)


def glue_text(key: str, value, fmt: str = "{}") -> None:
    """Glue ``fmt.format(value)`` as text under a ``num-...`` key, for ``{glue:text}`key``` in prose.

    The string is formatted here, so the page shows exactly what the notebook computed
    (no repr, no quotes); use :func:`format_p` / :func:`format_ci` for p-values and CIs.
    """
    if not check_key(key).startswith("num-"):
        raise ValueError(f"glue_text key {key!r} must start with 'num-' (figures are 'fig-...', tables 'tab-...')")
    text = value if fmt == "{}" and isinstance(value, str) else fmt.format(value)
    glue(key, str(text), display=False)



def glue_markdown(key: str, text: str) -> None:
    """Glue a sentence written in Markdown (code spans, emphasis) under a ``num-...`` key, for ``{glue:md}`key```.

    For prose whose wording, not only its numbers, follows the run (what a result means
    depends on which way it came out). Roles such as ``{numref}`` are not resolved inside
    it: keep them in the page's own text around the glued sentence.
    """
    if not check_key(key).startswith("num-"):
        raise ValueError(f"glue_markdown key {key!r} must start with 'num-' (figures are 'fig-...', tables 'tab-...')")
    try:
        from IPython.display import Markdown
    except ImportError:  # outside a notebook kernel there is nothing to glue into
        return
    glue(key, Markdown(str(text)), display=False)


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


def show_figure(fig, key: str, output_dir: str | os.PathLike) -> None:
    """Save ``<output_dir>/<key>.png`` and show the figure in the cell's output (not glued).

    For figures that belong inside a collapsed cell (a solution), where a ``{glue:figure}``
    on the page would give the answer away. Returns None.
    """
    save_figure(fig, key, output_dir)
    _png_in_notebooks()
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        get_ipython = None
    if get_ipython is not None and get_ipython() is not None:
        display(fig)
    plt.close(fig)


# -- numbers in words ----------------------------------------------------------------------
def format_p(p: float, *, prefix: bool = False) -> str:
    """A p-value for reading, by :func:`cxrcore.stats.format_p` (two significant digits, "< 1e-16" in the far
    tail, "not estimable" for NaN); ``prefix`` gives ``p = 0.0067`` / ``p < 1e-16`` for prose.

    Between 1e-4 and 1e-3 two significant digits need five decimals ("0.00076"); there, as for
    every small number in the book's tables, the page shows them in scientific notation ("7.6e-04").
    """
    if p is None:
        p = float("nan")
    text = stats.format_p(p)
    if re.fullmatch(r"0\.\d{5,}", text):
        text = f"{float(p):.1e}"
    if not prefix or text == "not estimable":
        return text
    return f"p {text}" if text.startswith("<") else f"p = {text}"


def format_ci(est: float, lo: float, hi: float, fmt: str = "{:.3f}") -> str:
    """'0.774 [0.713, 0.837]'; '0.774' without a CI; 'not estimable' without an estimate."""
    if est is None or pd.isna(est):
        return "not estimable"
    if lo is None or hi is None or pd.isna(lo) or pd.isna(hi):
        return fmt.format(est)
    return f"{fmt.format(est)} [{fmt.format(lo)}, {fmt.format(hi)}]"


def with_ci(df: pd.DataFrame, est: str = "auc", lo: str = "ci_low", hi: str = "ci_high", fmt: str = "{:.3f}") -> pd.Series:
    """'0.712 [0.650, 0.771]' strings for a table column ('0.712' where the row has no CI)."""
    if not len(df):
        return pd.Series([], dtype=str)
    return pd.Series([format_ci(r[est], r[lo], r[hi], fmt) for _, r in df.iterrows()], index=df.index, dtype=str)



def format_range(values, fmt: str = "{:.3f}", *, signed: bool = False) -> str:
    """'0.500 to 0.524' for the smallest and largest of ``values`` (one value if they agree; 'none' if empty).

    NaNs are ignored; ``signed`` writes a sign on both ends ('+0.412 to +0.488'), as
    differences are written in the book.
    """
    v = pd.Series(values, dtype=float).dropna()
    if v.empty:
        return "none"
    f = (lambda x: ("+" if x >= 0 else "") + fmt.format(x)) if signed else fmt.format
    lo, hi = f(float(v.min())), f(float(v.max()))
    return lo if lo == hi else f"{lo} to {hi}"


#: The words for each procedure a ``cxrcore.stats`` table names in its method column, for captions and prose.
#: A code not listed here is shown as it is (so a new procedure is never described as an old one).
METHOD_WORDS: dict[str, str] = {
    "percentile": "bootstrap percentile interval (patients resampled where a patient has several rows)",
    "cluster_percentile": "patient-cluster bootstrap, percentile interval",
    "bca": "bootstrap BCa interval (Efron 1987)",
    "score": "score interval of the AUC (Newcombe 2006, method 5)",
    "score_clustered": "score interval of the AUC widened by Obuchowski's clustered design effect, t reference "
                       "(df capped at patients - 1)",
    "delong": "DeLong's test (DeLong et al. 1988), normal reference",
    "delong_clustered": "DeLong's test clustered by patient (Obuchowski 1997), t reference (Satterthwaite df, "
                        "capped at patients - 1)",
    "paired_swap": "exact paired-swap permutation test on the scores' ranks (Bandos et al. 2005), no interval "
                   "(variance of the difference 0)",
    "wilson": "Wilson interval (Wilson 1927)",
    "wilson_design_effect": "Wilson interval on the design-effect effective number of pairs, t-corrected "
                            "(Korn and Graubard 1998)",
    "none": "no interval (not estimable)",
}
_METHOD_COLUMNS = ("ci_method", "method", "diff_method")


def describe_methods(table: "pd.DataFrame | pd.Series | Sequence[str]", column: str | None = None) -> str:
    """The procedures a statistics table used, in words, most frequent first, with row counts where several.

    ``table``: a frame returned by :mod:`cxrcore.stats` (its ``column``, default the first
    of ``ci_method``, ``method``, ``diff_method`` it has) or the method codes themselves.
    Words come from :data:`METHOD_WORDS`; an unknown code is shown as it is, in backticks.
    """
    if isinstance(table, pd.DataFrame):
        col = column or next((c for c in _METHOD_COLUMNS if c in table.columns), None)
        if col is None:
            raise ValueError(f"describe_methods: the table has none of the columns {list(_METHOD_COLUMNS)}; "
                             f"it has {list(table.columns)}")
        codes = table[col]
    else:
        codes = pd.Series(list(table), dtype=object)
    counts = codes.dropna().astype(str).loc[lambda s: s != ""].value_counts(sort=True)
    if counts.empty:
        return "none"
    words = [METHOD_WORDS.get(c, f"`{c}`") for c in counts.index]
    if len(words) == 1:
        return words[0]
    return "; ".join(f"{w}, for {n} row{'' if n == 1 else 's'}" for w, n in zip(words, counts.tolist()))


def notes_sentence(table: pd.DataFrame, column: str = "note") -> str:
    """One sentence for a page: how many rows of a statistics table carry a note, with the first as an example."""
    notes = table[column].fillna("").astype(str) if column in table.columns else pd.Series([], dtype=str)
    if not (notes != "").any():
        return "No row carries a note."
    return (f"{int((notes != '').sum())} of {len(table)} rows carry a note (`{column}` column of the CSV), e.g. "
            f"\"{notes[notes != ''].iloc[0]}\".")


# -- tables for reading --------------------------------------------------------------------
_P_COL = re.compile(r"(p|q)([ _-]?(value|val|adj|adjusted))?([ _-]?\(.*\)|[ _-](bh|fdr|holm))?", re.I)
_COUNT_COL = re.compile(r"^(n|count|k)$|^n[ _]|[ _]n$|count|^#|images|boxes|patients|excluded|replicates", re.I)
_NOTE_COLUMNS = ("produced with", "produced_with", "ours produced with")


def _flat(df: pd.DataFrame) -> pd.DataFrame:
    """Row labels as columns (a pivot's index is data; a RangeIndex is not) and one header row."""
    out = df.copy()
    if not isinstance(out.index, pd.RangeIndex) or out.index.name is not None:
        out = out.reset_index()
    if isinstance(out.columns, pd.MultiIndex):
        out.columns = [" / ".join(str(p) for p in c if str(p) != "") for c in out.columns]
    out.columns = [str(c) for c in out.columns]
    out.columns.name = None
    return out


def _is_p_column(name: str) -> bool:
    """p- and q-value columns ("p", "p_value", "p_adj", "q value", "p (BH)"), never "log10_p"."""
    n = name.strip().lower()
    return bool(_P_COL.fullmatch(n)) or (not n.startswith("log") and ("p_value" in n or "p-value" in n))


def _format_number(v, fmt: str) -> str:
    v = float(v)
    if not math.isfinite(v):
        return "–" if math.isnan(v) else ("∞" if v > 0 else "−∞")
    if v != 0 and abs(v) < 5e-4:  # "0.000" would hide it; scientific keeps it readable
        return f"{v:.1e}"
    if abs(v) >= 1e3:
        return f"{v:,.0f}"
    return fmt.format(v)


def _cell(v, fmt: str) -> str:
    """One table cell as text: no reprs (paths, lists, numpy scalars) ever reach a page."""
    if v is None:
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,d}" if abs(int(v)) >= 10_000 else f"{int(v):d}"
    if isinstance(v, (float, np.floating)):
        return _format_number(v, fmt)
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    if isinstance(v, Mapping):
        return ", ".join(f"{k}={_cell(x, fmt)}" for k, x in v.items())
    if isinstance(v, (list, tuple, set, np.ndarray, pd.Series)):
        return ", ".join(_cell(x, fmt) for x in v)
    if np.ndim(v) == 0 and pd.isna(v):
        return "–"
    return str(v)


def format_for_reading(df: pd.DataFrame, floatfmt: str = "{:.3f}") -> pd.DataFrame:
    """The table as strings for a page: three decimals, integers as integers, p-values by :func:`format_p`.

    A pivot's row labels become columns (no index column is shown); a float column whose
    values are all whole numbers and that counts something (its name, or a value above 1)
    is shown as integers ("2", not "2.0"); values below 0.0005 in magnitude are shown in
    scientific notation rather than as 0.000; NaN is shown as "–".
    """
    out = _flat(df)
    shown = {}
    for c in out.columns:
        s = out[c]
        if pd.api.types.is_bool_dtype(s):
            shown[c] = [_cell(v, floatfmt) if not pd.isna(v) else "–" for v in s]
        elif pd.api.types.is_integer_dtype(s):
            shown[c] = [_cell(int(v), floatfmt) if not pd.isna(v) else "–" for v in s]
        elif pd.api.types.is_float_dtype(s):
            finite = s[np.isfinite(s.to_numpy(dtype=float, na_value=np.nan))]
            whole = len(finite) > 0 and bool((finite == np.round(finite)).all())
            if _is_p_column(c):
                shown[c] = [format_p(v) for v in s]
            elif whole and (finite.abs().max() > 1 or _COUNT_COL.search(c)):
                shown[c] = [_cell(int(v), floatfmt) if np.isfinite(v) else _format_number(v, floatfmt) for v in s]
            else:
                shown[c] = [_format_number(v, floatfmt) if not pd.isna(v) else "–" for v in s]
        else:
            shown[c] = [_cell(v, floatfmt) for v in s]
    return pd.DataFrame(shown, columns=list(out.columns))


def _md_escape(text: str) -> str:
    """Escape what MyST would read as markup in a table cell (pipes, emphasis, math, roles, links)."""
    text = text.replace("\\", "\\\\").replace("\n", " ")
    return re.sub(r"([|*_`\[\]<>$~{}#])", r"\\\1", text)


class GluedTable:
    """A table as glued for the book: MyST markdown (for ``{glue:table}``) and HTML (elsewhere).

    ``shown`` is the string frame on the page, ``notes`` the sentences under it, ``csv``
    the path of the full table (relative to the page) the download link points at.
    """

    def __init__(self, shown: pd.DataFrame, notes: Sequence[str], csv: str, n_rows: int, n_cols: int):
        self.shown, self.notes, self.csv, self.n_rows, self.n_cols = shown, list(notes), csv, n_rows, n_cols

    def _link_text(self) -> str:
        return f"full table as CSV ({self.n_rows} rows × {self.n_cols} columns)"

    def _repr_markdown_(self) -> str:
        cols = list(self.shown.columns)
        lines = ["| " + " | ".join(_md_escape(c) for c in cols) + " |",
                 "|" + "|".join(":---" if self.shown[c].map(_is_texty).all() else "---:" for c in cols) + "|"]
        for row in self.shown.itertuples(index=False):
            lines.append("| " + " | ".join(_md_escape(v) for v in row) + " |")
        if self.shown.empty:  # a table with no rows still says so, under its number and caption
            lines.append("| " + " | ".join(["none"] + [""] * (len(cols) - 1)) + " |")
        foot = " ".join(_md_escape(n) for n in self.notes)
        lines += ["", f"{foot} [{self._link_text()}](path:{self.csv})".strip()]
        return "\n".join(lines) + "\n"

    def _repr_html_(self) -> str:
        body = self.shown.to_html(index=False, escape=True, border=0, classes="cxr-table")
        foot = " ".join(html.escape(n) for n in self.notes)
        return f'{body}\n<p class="cxr-table-note">{foot} <a href="{html.escape(self.csv)}">{self._link_text()}</a></p>'

    def __repr__(self) -> str:  # what a cell shows if someone displays it: never the whole frame
        return f"<table: {self.n_rows} rows × {self.n_cols} columns, full table in {self.csv}>"


def _is_texty(v: str) -> bool:
    """Left-align text, right-align numbers (and CIs, which start with a number)."""
    return not re.match(r"^[−+-]?[<]?\d|^–$", v)


def _page_relative(path: Path, output_dir: Path) -> str:
    """``path`` relative to the page that shows it: book/build.py says where pages land
    (CXRCORE_PAGE_DIR); otherwise pages sit two levels above their outputs (``figures/<notebook>/``)."""
    page_dir = os.environ.get("CXRCORE_PAGE_DIR") or str(output_dir.resolve().parent.parent)
    return Path(os.path.relpath(path.resolve(), Path(page_dir).resolve())).as_posix()



def page_path(path: str | os.PathLike, output_dir: str | os.PathLike) -> str:
    """``path`` as a link target on the page that shows ``output_dir``'s figures (for ``[text](path:...)`` links).

    The same rule the tables' CSV links follow: where book/build.py says pages land, else
    two levels above ``output_dir``.
    """
    return _page_relative(Path(path), Path(output_dir))


def table_for_page(df: pd.DataFrame, *, floatfmt: str = "{:.3f}", max_columns: int = 8, max_rows: int = 40,
                   note: str = "") -> tuple[pd.DataFrame, list[str]]:
    """What :func:`publish_table` shows: the formatted table cut to the page, and the notes under it.

    A "produced with" column that is the same on every row becomes one note; columns
    beyond ``max_columns`` and rows beyond ``max_rows`` stay in the CSV, and a note says so.
    """
    shown = format_for_reading(df, floatfmt=floatfmt)
    notes = [note] if note else []
    for c in [c for c in shown.columns if c.lower() in _NOTE_COLUMNS]:
        values = shown[c].unique()
        if len(values) == 1 and len(shown) > 0:
            notes.append(f"{c[0].upper() + c[1:].replace('_', ' ')}: {values[0]}.")
            shown = shown.drop(columns=c)
    n_cols = shown.shape[1]
    if n_cols > max_columns:
        shown = shown.iloc[:, :max_columns]
        notes.append(f"Showing {max_columns} of {n_cols} columns;")
    if len(shown) > max_rows:
        notes.append(f"Showing the first {max_rows} of {len(shown)} rows;")
        shown = shown.head(max_rows)
    return shown, notes


def publish_table(df: pd.DataFrame, key: str, output_dir: str | os.PathLike, *, floatfmt: str = "{:.3f}",
                  full: pd.DataFrame | None = None, max_columns: int = 8, max_rows: int = 40, note: str = "") -> None:
    """Save the full table as ``<output_dir>/<key>.csv`` and glue ``df`` for reading under ``key``.

    ``df`` is what the page shows (see :func:`table_for_page`); ``full`` (default ``df``)
    is what the CSV under the table holds, at full precision. On the page::

        ```{glue:table} tab-x-y
        Caption, referred to as {numref}`tab-x-y`.
        ```

    Returns None so that a cell ending with this call prints nothing.
    """
    output_dir = Path(output_dir)
    csv = save_table(df if full is None else full, key, output_dir)
    full_flat = _flat(df if full is None else full)
    shown, notes = table_for_page(df, floatfmt=floatfmt, max_columns=max_columns, max_rows=max_rows, note=note)
    glue(key, GluedTable(shown, notes, _page_relative(csv, output_dir), *full_flat.shape), display=False)


def format_table(df: pd.DataFrame, floatfmt: str = "{:.3f}"):
    """A pandas Styler of :func:`format_for_reading` (no index), for showing a table in a notebook."""
    # the theme's table classes, so a table shown in a cell output reads like a published one
    return format_for_reading(df, floatfmt=floatfmt).style.hide(axis="index").set_table_attributes(
        'class="table cxr-table"')


# -- orders and colours --------------------------------------------------------------------
def _ordered(values: Iterable[str], order: Sequence[str]) -> list[str]:
    seen = list(dict.fromkeys(values))
    return [v for v in order if v in seen] + [v for v in seen if v not in order]


def order_encoders(values: Iterable[str]) -> list[str]:
    """``values`` in :data:`ENCODER_ORDER` (unlisted keys after, as they came)."""
    return _ordered(values, ENCODER_ORDER)


def order_pooling(values: Iterable[str]) -> list[str]:
    """``values`` in :data:`POOLING_ORDER` (unlisted modes after, as they came)."""
    return _ordered(values, POOLING_ORDER)


def pooling_color(mode: str) -> str:
    """The book's colour for ``mode``; an unknown mode is an error, never a colour by chance."""
    try:
        return POOLING_COLORS[mode]
    except KeyError:
        raise ValueError(f"pooling mode {mode!r} has no colour; add it to cxrcore.report.POOLING_COLORS "
                         f"(and POOLING_ORDER, POOLING_MARKERS): the book uses one colour per mode") from None


def _auc_axis(ax, chance: float = 0.5) -> None:
    """AUC axes run 0 to 1 (a whisker never leaves the plot) with the chance line."""
    ax.set_ylim(-0.02, 1.02)
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.axhline(chance, color=CHANCE_COLOR, ls="--", lw=1, zorder=0)


def _legend_below(fig, axes, modes: Sequence[str], title: str = "pooling") -> None:
    """One legend for the figure, below the panels (constrained layout keeps it off the data)."""
    handles = [plt.Line2D([], [], color=pooling_color(m), marker=POOLING_MARKERS.get(m, "o"), ls="-", lw=1.4, ms=5)
               for m in modes]
    fig.legend(handles, modes, title=title, loc="outside lower center", ncol=min(len(modes), 7), frameon=False,
               title_fontsize=8.5)


def _label_title(fig, title: str, label: str | None) -> None:
    text = "\n".join(t for t in (title, f"({label})" if label else "") if t)
    if text:
        fig.suptitle(text, fontsize=9.5)


def _panel_grid(n: int, col_wrap: int, panel_h: float, extra_h: float = 1.1, width: float = PAGE_WIDTH_IN):
    """Panels wrapped ``col_wrap`` to a row, at most as wide as the page, laid out so titles and legend fit."""
    ncols = max(1, min(n, col_wrap))
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, panel_h * nrows + extra_h), sharey=True,
                             squeeze=False, layout="constrained")
    return fig, axes, nrows, ncols


# -- figures -------------------------------------------------------------------------------
def auc_by_pooling_figure(table: pd.DataFrame, *, x: str = "encoder", col: str | None = None, col_wrap: int = 3,
                          title: str = "", chance: float = 0.5, label: str | None = STAND_IN_LABEL):
    """Point-and-interval plot of AUC per pooling mode (colour) along ``x``, one panel per ``col`` value.

    ``table`` has columns ``pooling``, ``auc``, ``ci_low``, ``ci_high``, ``x`` (and ``col``);
    rows without a CI are drawn as hollow points. Encoders follow :data:`ENCODER_ORDER`
    wherever they are ``x`` or ``col``. ``label`` says how the numbers were produced and
    is printed on the figure.
    """
    set_style()
    missing = [c for c in ("pooling", "auc", "ci_low", "ci_high", x, *([col] if col else [])) if c not in table.columns]
    if missing:
        raise ValueError(f"auc_by_pooling_figure: the table lacks column(s) {missing}; it has {list(table.columns)}")
    cols = [None] if col is None else (order_encoders(table[col]) if col == "encoder" else list(dict.fromkeys(table[col])))
    panel_h = 2.6
    modes = order_pooling(table["pooling"])
    # as wide as its points need (a lone panel of three points is not stretched over the page)
    n_x = max(table[table[col] == c][x].nunique() if c is not None else table[x].nunique() for c in cols)
    per_panel = 0.9 + 0.3 * n_x * (1 if x == "pooling" else len(modes))
    ncols_ = max(1, min(len(cols), col_wrap))
    width = min(PAGE_WIDTH_IN, max(4.2, ncols_ * per_panel + 0.8))
    fig, axes, nrows, ncols = _panel_grid(len(cols), col_wrap, panel_h, width=width)
    step = 0.0 if x == "pooling" else 0.8 / max(len(modes), 1)  # along x = pooling each mode has its own place
    for k, ax in enumerate(axes.ravel()):
        if k >= len(cols):
            ax.axis("off")
            continue
        c = cols[k]
        sub = table if c is None else table[table[col] == c]
        xs = (order_encoders(sub[x]) if x == "encoder" else order_pooling(sub[x]) if x == "pooling"
              else list(dict.fromkeys(sub[x])))
        _auc_axis(ax, chance)
        for j, m in enumerate(modes):
            s = sub[sub["pooling"] == m].drop_duplicates(x).set_index(x).reindex(xs)
            pos = np.arange(len(xs)) + (j - (len(modes) - 1) / 2) * step
            has_ci = s["ci_low"].notna() & s["ci_high"].notna()
            err = np.vstack([(s["auc"] - s["ci_low"]).where(has_ci, 0).clip(lower=0),
                             (s["ci_high"] - s["auc"]).where(has_ci, 0).clip(lower=0)])
            colour = pooling_color(m)
            ax.errorbar(pos, s["auc"], yerr=err, fmt=POOLING_MARKERS.get(m, "o"), color=colour, capsize=2, ms=4.5,
                        lw=1.2, mfc=colour)
            if (~has_ci & s["auc"].notna()).any():  # estimates without a CI are hollow, so a reader sees it
                ax.plot(pos[~has_ci.to_numpy()], s["auc"][~has_ci], POOLING_MARKERS.get(m, "o"), color=colour,
                        mfc="white", ms=4.5)
        long = len(xs) > 3 or max((len(str(v)) for v in xs), default=0) > 10
        ax.set_xticks(np.arange(len(xs)), [str(v) for v in xs], rotation=35 if long else 0,
                      ha="right" if long else "center", fontsize=8)
        ax.set_xlim(-0.6, len(xs) - 0.4)
        ax.set_xlabel("")
        if c is not None:
            ax.set_title(str(c), fontsize=9.5)
    for r in range(nrows):
        axes[r, 0].set_ylabel("AUC (95% CI)")
    _legend_below(fig, axes, modes)
    _label_title(fig, title, label)
    return fig


def patches_per_px(encoder, image_hw: tuple[int, int] | None = None) -> float:
    """Token-grid cells per original-image pixel for ``encoder`` on images of ``image_hw``.

    Multiply a footprint in pixels by this to get it in patches (the width of one ViT
    patch, or one cell of a CNN's output grid, in the model's input). ``encoder`` may
    also be a :class:`~cxrcore.geometry.Geometry` (or its JSON, as a store's ``geometry``
    column holds it): the geometry of one image, so no model needs loading.
    """
    from .geometry import Geometry

    if isinstance(encoder, str):
        from .store import geometry_from_json

        encoder = geometry_from_json(encoder)
    g = encoder if isinstance(encoder, Geometry) else encoder.geometry_for(tuple(image_hw))
    return float(g.scale_x) / float(g.stride)


def footprint_sweep(cells: pd.DataFrame, kind: str = "nodule") -> pd.DataFrame:
    """The footprint sweep of a panel: the cells of one ``kind`` and strength that run over the most footprints.

    ``cells``: :meth:`cxrcore.perturb.Panel.table` (``cell``, ``kind``, ``footprint_px``,
    ``strength`` and the cell's other parameters). Returns those rows sorted by footprint
    (a series with a single footprint if the panel has no sweep; empty without ``kind``).
    Ties go to the series declared first. The dilution curve is drawn along it.
    """
    need = ["cell", "kind", "footprint_px", "strength"]
    missing = [c for c in need if c not in cells.columns]
    if missing:
        raise ValueError(f"footprint_sweep: the cell table lacks column(s) {missing}; it has {list(cells.columns)}")
    sub = cells[cells["kind"] == kind]
    if sub.empty:
        return sub.copy()
    params = [c for c in sub.columns if c not in ("cell", "footprint_px", "strength_name")]
    # one series per (strength, other parameters), numbered in the order declared (NaN parameters group too)
    series = sub.groupby(params, dropna=False, sort=False).ngroup()
    n = sub.groupby(series, sort=False)["footprint_px"].nunique()
    best = n.index[int(np.argmax(n.to_numpy()))]
    return sub[series == best].sort_values("footprint_px").reset_index(drop=True)


def dilution_figure(table: pd.DataFrame, *, patches_per_px: Mapping[str, float] | None = None, col_wrap: int = 3,
                    chance: float = 0.5, title: str = "", label: str | None = STAND_IN_LABEL):
    """The dilution curve: AUC against lesion footprint, one line per pooling mode, one panel per encoder.

    ``table``: one row per (``encoder``, ``pooling``, ``footprint_px``) with ``auc``,
    ``ci_low``, ``ci_high`` (one sweep: filter the panel to one kind and strength first).
    The footprint (disk diameter in original pixels) runs on a log2 axis at the bottom;
    the top axis gives it in patches, from ``patches_per_px`` (encoder -> factor, see
    :func:`patches_per_px`) or from a ``footprint_patches`` column. CIs are bands.
    """
    set_style()
    need = ["encoder", "pooling", "footprint_px", "auc", "ci_low", "ci_high"]
    missing = [c for c in need if c not in table.columns]
    if missing:
        raise ValueError(f"dilution_figure: the table lacks column(s) {missing}; it has {list(table.columns)}")
    dup = table.duplicated(["encoder", "pooling", "footprint_px"])
    if dup.any():
        r = table[dup].iloc[0]
        raise ValueError(f"dilution_figure: several rows for encoder {r['encoder']!r}, pooling {r['pooling']!r}, "
                         f"footprint {r['footprint_px']} px; pass one sweep (filter the cells to one kind and strength)")
    encoders = order_encoders(table["encoder"])
    modes = order_pooling(table["pooling"])
    panel_h = 2.35
    fig, axes, nrows, ncols = _panel_grid(len(encoders), col_wrap, panel_h, extra_h=1.3)
    xs_all = np.sort(table["footprint_px"].unique().astype(float))
    for k, ax in enumerate(axes.ravel()):
        if k >= len(encoders):
            ax.axis("off")
            continue
        enc = encoders[k]
        sub = table[table["encoder"] == enc]
        _auc_axis(ax, chance)
        for m in modes:
            s = sub[sub["pooling"] == m].sort_values("footprint_px")
            if s.empty:
                continue
            colour = pooling_color(m)
            ax.fill_between(s["footprint_px"], s["ci_low"], s["ci_high"], color=colour, alpha=0.15, lw=0)
            ax.plot(s["footprint_px"], s["auc"], marker=POOLING_MARKERS.get(m, "o"), color=colour, lw=1.4, ms=4)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs_all, [f"{v:g}" for v in xs_all], fontsize=8)
        ax.minorticks_off()
        ax.set_xlim(xs_all[0] / 1.25, xs_all[-1] * 1.25)
        factor = None
        if patches_per_px is not None and enc in patches_per_px:
            factor = float(patches_per_px[enc])
        elif "footprint_patches" in sub.columns and sub["footprint_patches"].notna().any():
            factor = float(np.median(sub["footprint_patches"] / sub["footprint_px"]))
        if factor:
            top = ax.secondary_xaxis("top", functions=(lambda v, f=factor: v * f, lambda v, f=factor: v / f))
            top.set_xticks(xs_all * factor, [f"{v * factor:.2g}" for v in xs_all], fontsize=7.5)
            top.minorticks_off()
            top.tick_params(length=2, pad=1)
            top.set_xlabel("patches", fontsize=7.5, labelpad=1)
        ax.set_title(enc, fontsize=9.5, pad=4)
        if k // ncols == nrows - 1 or k + ncols >= len(encoders):
            ax.set_xlabel("footprint (px)")
    for r in range(nrows):
        axes[r, 0].set_ylabel("AUC (95% CI)")
    _legend_below(fig, axes, modes)
    _label_title(fig, title, label)
    return fig


def image_grid(images: Sequence[np.ndarray], titles: Sequence[str] | None = None, boxes: Sequence | None = None,
               ncols: int = 4, size: float | None = None, suptitle: str = ""):
    """Grey images in a grid, optional titles and boxes ``(x1, y1, x2, y2)`` (or lists of them) drawn in red.

    The grid is as wide as the page; ``size`` (inches per image) is kept for callers that
    set it and only caps the width.
    """
    set_style()
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols))
    side = min(PAGE_WIDTH_IN / ncols, size or PAGE_WIDTH_IN)
    fig, axes = plt.subplots(nrows, ncols, figsize=(side * ncols, side * nrows + (0.4 if suptitle else 0)),
                             squeeze=False)
    for k, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if k >= n:
            continue
        ax.imshow(images[k], cmap="gray", vmin=0, vmax=1, interpolation="lanczos")
        if titles is not None:
            ax.set_title(titles[k], fontsize=8)
        if boxes is not None and boxes[k] is not None:
            for b in _box_list(boxes[k]):
                _draw_box(ax, b)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9.5)
    fig.tight_layout()
    return fig


def _box_list(b) -> list:
    return list(b) if len(b) and np.ndim(b[0]) else [b]


def _draw_box(ax, box, colour: str = "red", lw: float = 1.2, ls: str = "-") -> None:
    x1, y1, x2, y2 = box
    ax.add_patch(plt.Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, ec=colour, lw=lw, ls=ls))


def patch_grid_figure(image: np.ndarray, geometry, box, *, title: str = "", zoom: bool = True):
    """The pooling modes drawn on one model input: the token grid, the box and the cells it touches.

    ``image`` is the original 2-D image in [0, 1]; ``geometry`` the encoder's
    :class:`~cxrcore.geometry.Geometry` for it; ``box`` in original pixels. With ``zoom``
    a fourth panel enlarges the box's neighbourhood so the cells under it can be counted.
    """
    import torch

    set_style()
    x = geometry.apply(torch.from_numpy(np.array(image, np.float32))[None], "bilinear")[0].numpy()  # a copy: cached images are read-only
    gh, gw = geometry.grid
    s = geometry.stride
    r0, r1, c0, c1 = geometry.cells(box)
    bx1, by1, bx2, by2 = geometry.to_input([box])[0]
    n_box = (r1 - r0) * (c1 - c0)
    panels = [("cls", "one global vector"),
              ("patch_mean", f"mean of all {gh * gw:,} tokens"),
              ("roi_local", f"mean of the {n_box} tokens\nunder the box")]
    if zoom:
        panels.append(("zoom", f"{gh}×{gw} grid, {s} px patches:\n{n_box} of {gh * gw:,} tokens "
                               f"({100 * n_box / (gh * gw):.1f}%)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(PAGE_WIDTH_IN, PAGE_WIDTH_IN / len(panels) + 0.75))

    def grid_lines(ax, lw):
        for k in range(gw + 1):
            ax.axvline(k * s - 0.5, color="w", lw=lw, alpha=0.55)
        for k in range(gh + 1):
            ax.axhline(k * s - 0.5, color="w", lw=lw, alpha=0.55)

    for ax, (mode, text) in zip(axes, panels):
        ax.imshow(x, cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        if mode == "zoom":
            colour = POOLING_COLORS["roi_local"]
            half = max(4, (r1 - r0), (c1 - c0)) * s * 1.5
            cx, cy = (bx1 + bx2) / 2, (by1 + by2) / 2
            grid_lines(ax, 0.6)
            ax.add_patch(plt.Rectangle((c0 * s - 0.5, r0 * s - 0.5), (c1 - c0) * s, (r1 - r0) * s, color=colour,
                                       alpha=0.45))
            _draw_box(ax, (bx1, by1, bx2, by2), lw=1.5)
            ax.set_xlim(cx - half, cx + half)
            ax.set_ylim(cy + half, cy - half)
            ax.set_title(text, fontsize=8.5)
            for side in ax.spines.values():
                side.set_visible(True)
                side.set_color("0.3")
            continue
        grid_lines(ax, 0.25)
        colour = POOLING_COLORS[mode]
        if mode == "patch_mean":
            ax.add_patch(plt.Rectangle((-0.5, -0.5), gw * s, gh * s, color=colour, alpha=0.3))
        elif mode == "roi_local":
            ax.add_patch(plt.Rectangle((c0 * s - 0.5, r0 * s - 0.5), (c1 - c0) * s, (r1 - r0) * s, color=colour,
                                       alpha=0.6))
            _draw_box(ax, (bx1, by1, bx2, by2))
        for side in ax.spines.values():
            side.set_visible(mode == "cls")  # the whole input -> one vector: frame it
            side.set_color(colour)
            side.set_linewidth(4)
        ax.set_title(f"{mode}\n{text}", fontsize=8.5, color=colour)
    if title:
        fig.suptitle(title, fontsize=9.5)
    fig.tight_layout()
    return fig


def before_after_figure(before: np.ndarray, after: np.ndarray, box, *, title: str = "", context: bool = True,
                        margin: int | None = None):
    """A perturbation shown as before / after / difference, cropped around its box.

    ``before`` and ``after`` are the same 2-D image in [0, 1] without and with the
    perturbation; ``box`` is ``(x1, y1, x2, y2)`` in their pixels. The crop reaches
    ``margin`` px beyond the box (default: 1.5 box sides, at least 48 px), so "small"
    is seen at full resolution; with ``context`` a first panel shows where the crop lies.
    The difference is after - before on a symmetric diverging scale with its colour bar.
    """
    set_style()
    before, after = np.asarray(before, np.float32), np.asarray(after, np.float32)
    if before.shape != after.shape or before.ndim != 2:
        raise ValueError(f"before {before.shape} and after {after.shape} must be the same 2-D image")
    x1, y1, x2, y2 = (float(v) for v in box)
    h, w = before.shape
    half = margin if margin is not None else max(48, int(1.5 * max(x2 - x1, y2 - y1)))
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    r0, r1 = int(max(0, cy - (y2 - y1) / 2 - half)), int(min(h, cy + (y2 - y1) / 2 + half))
    c0, c1 = int(max(0, cx - (x2 - x1) / 2 - half)), int(min(w, cx + (x2 - x1) / 2 + half))
    crop_box = (x1 - c0, y1 - r0, x2 - c0, y2 - r0)
    diff = (after - before)[r0:r1, c0:c1]
    lim = float(np.abs(diff).max()) or 1e-6
    n = 4 if context else 3
    fig, axes = plt.subplots(1, n, figsize=(PAGE_WIDTH_IN, PAGE_WIDTH_IN / n + 0.6))
    k = 0
    if context:
        ax = axes[0]
        ax.imshow(after, cmap="gray", vmin=0, vmax=1)
        _draw_box(ax, (c0, r0, c1, r1), colour="#FFD400", lw=1.0)
        ax.set_title(f"whole image\n({w}×{h} px)", fontsize=8.5)
        k = 1
    for ax, img, name in ((axes[k], before[r0:r1, c0:c1], "before"), (axes[k + 1], after[r0:r1, c0:c1], "after")):
        ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        _draw_box(ax, crop_box, lw=1.0, ls="--")
        ax.set_title(f"{name}\n({c1 - c0}×{r1 - r0} px crop)", fontsize=8.5)
    ax = axes[k + 2]
    im = ax.imshow(diff, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    _draw_box(ax, crop_box, colour="black", lw=1.0, ls="--")
    ax.set_title("after − before", fontsize=8.5)
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    cb.ax.tick_params(labelsize=7)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9.5)
    fig.tight_layout()
    return fig


# -- summaries across notebooks ------------------------------------------------------------
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
    """Every analysis's ``summary.csv`` under ``figures_dir``, concatenated (all from one build).

    The rows keep :data:`SUMMARY_COLUMNS`, plus ``chapter``: the notebook that wrote them
    (its output folder's name, e.g. ``perturbation_panel``).
    """
    paths = sorted(Path(figures_dir).glob(f"*/{SUMMARY_FILE}"))
    if not paths:
        raise FileNotFoundError(f"no {SUMMARY_FILE} under {figures_dir}: run the analysis notebooks first")
    _check_one_build(paths)
    return pd.concat([pd.read_csv(p).assign(chapter=p.parent.name) for p in paths], ignore_index=True)



def read_published(figures_dir: str | os.PathLike, key: str) -> pd.DataFrame:
    """The full table another chapter of this build published as ``<figures_dir>/<chapter>/<key>.csv``.

    For pages that collect (the summary): exactly one chapter must have written ``key``,
    and it must come from the same build as the other chapters' summaries.
    """
    paths = sorted(Path(figures_dir).glob(f"*/{check_key(key)}.csv"))
    if len(paths) != 1:
        raise FileNotFoundError(f"{key}.csv: expected it under one chapter's folder of {figures_dir}, found "
                                f"{[str(p) for p in paths] or 'none'}; run the chapter that publishes it first")
    _check_one_build(paths + sorted(Path(figures_dir).glob(f"*/{SUMMARY_FILE}")))
    return pd.read_csv(paths[0])


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


# -- box-level pages (ChestX-Det10 strata, box jitter) ---------------------------------------
#: Line style per box-scale jitter setting in :func:`jitter_figure` (scale sd 0 first: solid).
SCALE_LINESTYLES: tuple[str, ...] = ("-", "--", ":", "-.")
#: One grey per size stratum of lesion boxes (the overlap panel of :func:`jitter_figure`), apart from the mode colours.
STRATUM_COLORS: dict[str, str] = {"small": "0.15", "large": "0.55", "all": "0.75"}


def stratum_figure(table: pd.DataFrame, *, modes: Sequence[str] = ("cls", "patch_mean"), col: str = "class",
                   col_wrap: int = 3, chance: float = 0.5, title: str = "", label: str | None = STAND_IN_LABEL):
    """AUC of the small and the large stratum per encoder, one panel per ``col`` value (e.g. lesion class).

    ``table``: one row per (``encoder``, ``col``, ``pooling``, ``stratum``) with ``auc``,
    ``ci_low``, ``ci_high`` (the strata frame of :func:`cxrcore.analysis.image_strata`).
    Each pooling mode has its colour and marker; the small stratum is drawn hollow, the
    large one filled, side by side, so the stratum gap reads as the distance between a
    hollow and a filled point. Rows without a CI get no whisker.
    """
    set_style()
    need = ["encoder", col, "pooling", "stratum", "auc", "ci_low", "ci_high"]
    missing = [c for c in need if c not in table.columns]
    if missing:
        raise ValueError(f"stratum_figure: the table lacks column(s) {missing}; it has {list(table.columns)}")
    modes = [m for m in order_pooling(modes) if m in set(table["pooling"])]
    cols = list(dict.fromkeys(table[col]))
    encoders = order_encoders(table["encoder"])
    n_x = len(encoders)
    width = min(PAGE_WIDTH_IN, max(4.2, min(len(cols), col_wrap) * (0.9 + 0.42 * n_x * len(modes)) + 0.8))
    fig, axes, nrows, ncols = _panel_grid(len(cols), col_wrap, 2.7, width=width, extra_h=1.4)
    slots = [(m, st) for m in modes for st in ("small", "large")]
    step = 0.8 / len(slots)
    for k, ax in enumerate(axes.ravel()):
        if k >= len(cols):
            ax.axis("off")
            continue
        sub = table[table[col] == cols[k]]
        _auc_axis(ax, chance)
        for j, (m, st) in enumerate(slots):
            s = sub[(sub["pooling"] == m) & (sub["stratum"] == st)].drop_duplicates("encoder").set_index("encoder")
            s = s.reindex(encoders)
            pos = np.arange(n_x) + (j - (len(slots) - 1) / 2) * step
            has_ci = s["ci_low"].notna() & s["ci_high"].notna()
            err = np.vstack([(s["auc"] - s["ci_low"]).where(has_ci, 0).clip(lower=0),
                             (s["ci_high"] - s["auc"]).where(has_ci, 0).clip(lower=0)])
            colour = pooling_color(m)
            ax.errorbar(pos, s["auc"], yerr=err, fmt=POOLING_MARKERS.get(m, "o"), color=colour, capsize=1.5, ms=4.5,
                        lw=1.1, mfc="white" if st == "small" else colour, mew=1.2)
        long = n_x > 3
        ax.set_xticks(np.arange(n_x), encoders, rotation=35 if long else 0, ha="right" if long else "center",
                      fontsize=8)
        ax.set_xlim(-0.6, n_x - 0.4)
        ax.set_title(str(cols[k]), fontsize=9.5)
    for r in range(nrows):
        axes[r, 0].set_ylabel("AUC vs all negatives\n(95% CI)")
    handles = [plt.Line2D([], [], color=pooling_color(m), marker=POOLING_MARKERS.get(m, "o"), ls="none", ms=5.5,
                          mfc="white" if st == "small" else pooling_color(m), mew=1.2) for m, st in slots]
    fig.legend(handles, [f"{m}, {st}" for m, st in slots], title="pooling, stratum (hollow: small)",
               loc="outside lower center", ncol=min(len(slots), 4), frameon=False, title_fontsize=8.5)
    _label_title(fig, title, label)
    return fig


def jitter_figure(table: pd.DataFrame, overlap: pd.DataFrame | None = None, *, x_label: str = "jitter sigma (px)",
                  col_wrap: int = 3, chance: float = 0.5, title: str = "", label: str | None = STAND_IN_LABEL):
    """``roi_local`` AUC against box-jitter sigma, one panel per encoder, one line per scale setting, CI bands.

    ``table``: one row per (``encoder``, ``sigma_px``, ``scale_sigma``) with ``auc``,
    ``ci_low``, ``ci_high`` (:func:`cxrcore.analysis.jitter_probes`' ``table``). With
    ``overlap`` (its ``overlap`` frame: ``sigma_px``, ``scale_sigma``, ``stratum``,
    ``still_overlapping``) a last panel shows the share of jittered lesion boxes that still
    overlap their lesion, per size stratum, on the same sigma axis (0 to 1, not an AUC).
    """
    set_style()
    need = ["encoder", "sigma_px", "scale_sigma", "auc", "ci_low", "ci_high"]
    missing = [c for c in need if c not in table.columns]
    if missing:
        raise ValueError(f"jitter_figure: the table lacks column(s) {missing}; it has {list(table.columns)}")
    encoders = order_encoders(table["encoder"])
    scales = sorted(table["scale_sigma"].unique())
    if len(scales) > len(SCALE_LINESTYLES):
        raise ValueError(f"jitter_figure draws at most {len(SCALE_LINESTYLES)} scale settings; got {scales}")
    n = len(encoders) + (overlap is not None)
    fig, axes, nrows, ncols = _panel_grid(n, col_wrap, 2.5, extra_h=1.5)
    colour = pooling_color("roi_local")
    xs = np.sort(table["sigma_px"].unique().astype(float))
    for k, ax in enumerate(axes.ravel()):
        if k >= n:
            ax.axis("off")
            continue
        if k < len(encoders):
            sub = table[table["encoder"] == encoders[k]]
            _auc_axis(ax, chance)
            for scale, ls in zip(scales, SCALE_LINESTYLES):
                s = sub[sub["scale_sigma"] == scale].sort_values("sigma_px")
                ax.fill_between(s["sigma_px"], s["ci_low"], s["ci_high"], color=colour, alpha=0.12, lw=0)
                ax.plot(s["sigma_px"], s["auc"], ls, marker=POOLING_MARKERS["roi_local"], color=colour, lw=1.4, ms=4)
            ax.set_title(encoders[k], fontsize=9.5)
        else:
            ax.set_ylim(-0.02, 1.02)
            ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
            for st in [s for s in ("small", "large", "all") if s in set(overlap["stratum"])]:
                for scale, ls in zip(scales, SCALE_LINESTYLES):
                    o = overlap[(overlap["stratum"] == st) & (overlap["scale_sigma"] == scale)].sort_values("sigma_px")
                    ax.plot(o["sigma_px"], o["still_overlapping"], ls, marker="o", ms=3.5, lw=1.3,
                            color=STRATUM_COLORS[st])
            ax.set_title("lesion boxes still on their lesion", fontsize=9.5)
            ax.set_ylabel("share", fontsize=9)
            ax.tick_params(labelleft=True)
        ax.set_xticks(xs, [f"{v:g}" for v in xs], fontsize=8)
        ax.set_xlabel(x_label, fontsize=8.5)
    for r in range(nrows):
        axes[r, 0].set_ylabel("AUC, lesion vs control\n(95% CI)")
    handles = [plt.Line2D([], [], color=colour, ls=ls, lw=1.4) for _, ls in zip(scales, SCALE_LINESTYLES)]
    names = [f"roi_local, scale sd {s:g}" for s in scales]
    if overlap is not None:
        strata = [s for s in ("small", "large", "all") if s in set(overlap["stratum"])]
        handles += [plt.Line2D([], [], color=STRATUM_COLORS[s], marker="o", ms=4, lw=1.3) for s in strata]
        names += [f"overlap, {s} boxes" for s in strata]
    fig.legend(handles, names, loc="outside lower center", ncol=min(len(names), 3), frameon=False)
    _label_title(fig, title, label)
    return fig


def reference_line(fig, y: float, text: str, *, axes: Sequence | None = None) -> None:
    """A horizontal line (e.g. a value the paper reports) on every AUC panel of ``fig``, labelled once.

    Drawn dotted in dark grey, apart from the chance line; ``text`` sits above the line at the
    left edge of the first panel only (the same line on every panel needs one label).
    ``axes``: the panels to mark (default: every visible panel with a title).
    """
    targets = axes if axes is not None else [a for a in fig.axes if a.get_visible() and a.axison and a.get_title()]
    for k, ax in enumerate(targets):
        ax.axhline(y, color="0.25", ls=":", lw=1.1, zorder=1)
        if k == 0:
            note = ax.annotate(text, xy=(0.02, y), xycoords=("axes fraction", "data"), xytext=(0, 2),
                               textcoords="offset points", fontsize=7, color="0.25", va="bottom", annotation_clip=False)
            note.set_in_layout(False)  # a label wider than a narrow panel must not squeeze the layout


class _TextColumnsTable(GluedTable):
    """A :class:`GluedTable` whose ``text_columns`` are left-aligned even where a value starts with a digit."""

    def __init__(self, *args, text_columns: Sequence[str] = ()):
        super().__init__(*args)
        self.text_columns = set(text_columns)

    def _repr_markdown_(self) -> str:
        lines = super()._repr_markdown_().split("\n")
        lines[1] = "|" + "|".join(":---" if c in self.text_columns or self.shown[c].map(_is_texty).all() else "---:"
                                  for c in self.shown.columns) + "|"
        return "\n".join(lines)


def publish_text_table(df: pd.DataFrame, key: str, output_dir: str | os.PathLike, *, text_columns: Sequence[str],
                       floatfmt: str = "{:.3f}", full: pd.DataFrame | None = None, max_columns: int = 8,
                       max_rows: int = 40, note: str = "") -> None:
    """:func:`publish_table` for tables of prose: ``text_columns`` read left-aligned.

    :func:`publish_table` right-aligns a column whose values start with a digit (numbers, CIs);
    a column of sentences where one starts with a number ("518: the published processor ...",
    "7x7 layer4 cells ...") would be right-aligned too, which reads badly. Returns None.
    """
    missing = [c for c in text_columns if c not in df.columns]
    if missing:
        raise ValueError(f"publish_text_table: text_columns {missing} are not columns of the table {list(df.columns)}")
    output_dir = Path(output_dir)
    csv = save_table(df if full is None else full, key, output_dir)
    full_flat = _flat(df if full is None else full)
    shown, notes = table_for_page(df, floatfmt=floatfmt, max_columns=max_columns, max_rows=max_rows, note=note)
    glue(key, _TextColumnsTable(shown, notes, _page_relative(csv, output_dir), *full_flat.shape,
                                text_columns=[c for c in text_columns if c in shown.columns]), display=False)
