"""The cohort contract every data source fits.

Modelled on torchxrayvision's dataset base: a row-aligned metadata frame with
harmonised columns, labels as 1 / 0 / NaN (unknown), lazily read images, and a tidy
boxes frame where the source has boxes. Metadata and boxes never touch image files.

Bad input (missing columns, unknown label values, empty, inverted or out-of-image boxes,
missing image files) raises :class:`CohortError` naming the file, line and field; a
cohort built with ``on_error="exclude"`` instead drops the item and counts it in
:attr:`Cohort.exclusions` (item, reason, count), which the book shows as the exclusion
table. Missing columns always raise: there is no item to drop. Every exclusion is
decided when the cohort is built, in the main process: reading an image (possibly in a
DataLoader worker) only ever raises, so counts are never lost with a worker's state.

Validation is vectorised (one boolean mask per rule over the whole frame), so half a
million rows load in seconds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from cxrcore import io as cxio

#: Columns every cohort's ``metadata`` has, in this order, before its label columns.
METADATA_COLUMNS: tuple[str, ...] = ("image_id", "patient_id", "study_id", "view", "path")
#: Columns of every cohort's ``boxes`` frame (one row per box, original pixels).
BOX_COLUMNS: tuple[str, ...] = ("image_id", "class", "x1", "y1", "x2", "y2", "width", "height", "area", "stratum")
#: Columns a cohort adds after its labels where the source knows them: the provider's
#: official split, and the image size in pixels (used to check boxes without opening images).
OPTIONAL_COLUMNS: tuple[str, ...] = ("split", "width", "height")
#: The two stratum values of a box.
STRATA: tuple[str, str] = ("small", "large")

OnError = Literal["raise", "exclude"]


class CohortError(ValueError):
    """A cohort's files do not match the documented format; the message says where and what to do."""


def _where(file: str | os.PathLike | None, line: int | None = None, field: str | None = None) -> str:
    parts = [str(file) if file is not None else "<cohort>"]
    if line is not None:
        parts.append(f"line {line}")
    if field is not None:
        parts.append(f"field {field!r}")
    return ", ".join(parts)


def read_csv(path: str | os.PathLike, *, required: Iterable[str] = (), what: str = "file", **kw) -> pd.DataFrame:
    """Read a CSV (``.csv`` or ``.csv.gz``), check ``required`` columns, add ``_line`` (1 = header).

    Uses pandas' pyarrow engine for speed; falls back to the C parser when a file has
    short rows (NIH's own ``BBox_List_2017.csv`` has a header wider than its rows).
    """
    path = Path(path)
    if not path.is_file():
        raise CohortError(f"{path}: {what} not found. Download it from the provider (see the cohort's docstring) "
                          "and put it under the cohort's root folder.")
    try:
        try:
            df = pd.read_csv(path, engine="pyarrow", **kw)
        except (pd.errors.ParserError, ValueError, TypeError):
            df = pd.read_csv(path, engine="c", low_memory=False, **kw)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, EOFError) as e:
        raise CohortError(f"{path}: {what} is not a readable CSV ({e}). Download it again; do not edit it in a "
                          "spreadsheet program that changes separators or quoting.") from e
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise CohortError(
            f"{_where(path, 1, missing[0])}: missing column(s) {missing} in the {what}; found {list(df.columns)}. "
            "Use the provider's file unchanged (see the cohort's docstring for the expected header)."
        )
    # Line numbers for messages: the header is line 1 (no multi-line quoted fields in these sources).
    df["_line"] = np.arange(2, len(df) + 2)
    return df


def arrow_strings(values) -> pa.Array:
    arr = pa.array(pd.Series(values, dtype="string", copy=False))
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return arr.cast(pa.large_string())


def isin(values, universe) -> np.ndarray:
    """Boolean mask: which ``values`` are in ``universe`` (strings; missing values are not in).

    Arrow's hash join: pandas' ``isin`` on string columns walks the universe in Python.
    """
    out = pc.is_in(arrow_strings(values), value_set=pc.unique(arrow_strings(universe)), skip_nulls=True)
    return out.fill_null(False).to_numpy(zero_copy_only=False)


def coerce_labels(values: pd.Series, allowed: Iterable[float] = (1.0, 0.0)) -> tuple[pd.Series, pd.Series]:
    """Numeric labels and a mask of values that are neither blank nor in ``allowed``."""
    num = pd.to_numeric(values, errors="coerce").astype("float64")
    blank = values.isna() | (values.astype("string").str.strip() == "").fillna(True)
    bad = (~blank & ~num.isin(list(allowed))).to_numpy()
    return num.where(~blank), pd.Series(bad, index=values.index)


def make_boxes(image_id, cls, x1, y1, x2, y2, line=None) -> pd.DataFrame:
    """A boxes frame in :data:`BOX_COLUMNS` order (stratum unset) plus ``_line`` for messages."""
    b = pd.DataFrame({"image_id": pd.Series(image_id, dtype="string").to_numpy(),
                      "class": pd.Series(cls, dtype="string").to_numpy()})
    for k, v in (("x1", x1), ("y1", y1), ("x2", x2), ("y2", y2)):
        b[k] = pd.to_numeric(pd.Series(np.asarray(v, dtype=object)), errors="coerce").astype("float64").to_numpy()
    b["width"] = b["x2"] - b["x1"]
    b["height"] = b["y2"] - b["y1"]
    b["area"] = b["width"] * b["height"]
    b["stratum"] = pd.Series(pd.NA, index=b.index, dtype="string")
    b["_line"] = np.arange(len(b)) if line is None else np.asarray(line)
    return b


def assign_strata(boxes: pd.DataFrame, rule: str | float | dict = "median") -> pd.Series:
    """``"small"`` / ``"large"`` per box, decided within each class by area (px^2).

    ``rule``: ``"median"`` (the paper's default: the smaller half of the class's boxes by
    area is small, i.e. small if area <= the median; boxes tied at the median are split
    between the halves in file order, since integer pixel areas tie often and sending
    every tie to "small" can leave "large" nearly empty), ``"quantile:q"`` (small if area <= the class's q-quantile), a number (a
    fixed area threshold in px^2 for every class) or a dict ``class -> threshold``.
    """
    if len(boxes) == 0:
        return pd.Series([], index=boxes.index, dtype="string")
    grouped = boxes.groupby("class", observed=True)["area"]
    if isinstance(rule, dict):
        missing = sorted(set(boxes["class"]) - set(rule))
        if missing:
            raise ValueError(f"stratify: no area threshold for class(es) {missing}; give one per class.")
        threshold = boxes["class"].map(rule).astype("float64")
    elif isinstance(rule, (int, float)) and not isinstance(rule, bool):
        threshold = pd.Series(float(rule), index=boxes.index)
    elif rule == "median":
        rank = grouped.rank(method="first")
        half = grouped.transform("size").add(1) // 2
        return pd.Series(np.where(rank <= half, STRATA[0], STRATA[1]), index=boxes.index, dtype="string")
    elif isinstance(rule, str) and rule.startswith("quantile:"):
        q = float(rule.split(":", 1)[1])
        if not 0.0 < q < 1.0:
            raise ValueError(f"stratify={rule!r}: the quantile must lie strictly between 0 and 1.")
        threshold = grouped.transform(lambda a: a.quantile(q))
    else:
        raise ValueError(f"stratify={rule!r}: expected 'median', 'quantile:<q>', an area in px^2, or a dict class -> area.")
    return pd.Series(np.where(boxes["area"] <= threshold, STRATA[0], STRATA[1]), index=boxes.index, dtype="string")


def existing_files(paths: pd.Series) -> np.ndarray:
    """Mask of ``paths`` that exist, from one directory listing per folder (no per-file stat)."""
    s = paths.astype("string")
    parents = s.str.rpartition(os.sep)[0]
    found: set[str] = set()
    for parent in parents.dropna().unique():
        try:
            with os.scandir(parent or ".") as it:
                found.update(os.path.join(parent, e.name) for e in it)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue  # no folder: every file in it is missing, which the caller reports
    return isin(s, list(found))


class Cohort:
    """Base class: a set of radiographs with harmonised metadata.

    Subclasses set ``name``, ``metadata`` (a DataFrame with :data:`METADATA_COLUMNS`
    then one float column per label in ``label_columns``, then any of
    :data:`OPTIONAL_COLUMNS` the source knows), ``boxes`` (a DataFrame with
    :data:`BOX_COLUMNS` or ``None``) and may override :meth:`read_image` (the default
    reads ``metadata.path``). ``exclusions`` is a tidy frame ``reason -> count`` of the
    items left out and why. ``synthetic`` is True for generated cohorts so every figure
    can say so. ``on_error`` is ``"raise"`` (default) or ``"exclude"``.
    """

    name: str = "cohort"
    synthetic: bool = False
    #: Whether the book may show this cohort's pixels (False for credentialed data).
    pixels_public: bool = True
    #: Reference, data-use terms and download page, for the book's data section.
    citation: str = ""
    licence: str = ""
    homepage: str = ""
    label_columns: list[str]
    metadata: pd.DataFrame
    boxes: pd.DataFrame | None = None

    def __init__(self, on_error: OnError = "raise") -> None:
        if on_error not in ("raise", "exclude"):
            raise ValueError(f"on_error={on_error!r}: expected 'raise' or 'exclude'.")
        self.on_error = on_error
        self.label_columns = []
        self._exclusions: dict[tuple[str, str], int] = {}

    # -- images -------------------------------------------------------------------------
    def read_image(self, index: int) -> np.ndarray:
        """Return row ``index``'s image as a 2-D float32 array in [0, 1] (full bit depth kept).

        Boxes whose bounds could not be checked when the cohort was built (no size known)
        are checked here against the real image size; a bad one raises, whatever
        ``on_error`` is, because state changed here would be lost in a DataLoader worker.
        """
        row = self.metadata.iloc[index]
        img = cxio.read_image(row["path"])
        if self.boxes is not None and len(self.boxes):
            self._check_boxes_on_read(row, img.shape)
        return img

    def __len__(self) -> int:
        return len(self.metadata)

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self.read_image(i)

    def check_images(self) -> "Cohort":
        """Read every image's header (not its pixels) and screen the boxes against the real sizes.

        Unreadable or missing images raise or are excluded; unknown ``width``/``height``
        are filled from the headers; boxes of an image whose size differs from the
        metadata, or that reach past the image, raise or are excluded and counted. Opt-in
        for cohorts whose metadata already gives sizes (NIH, MIMIC), because it opens every
        file; returns ``self`` so it chains.
        """
        md = self.metadata.copy()
        md["_line"] = np.arange(len(md))  # metadata row numbers in messages
        given = md.reindex(columns=["width", "height"]).astype("float64")
        md = self._header_sizes(md.drop(columns=["width", "height"], errors="ignore"), np.ones(len(md), dtype=bool),
                                file=f"{self.name} metadata (row numbers are 0-based)", field="path")
        given = given.loc[md.index]
        dropped = self.metadata.loc[~self.metadata.index.isin(md.index), "image_id"]
        self.metadata = self.metadata.loc[md.index].reset_index(drop=True)
        self._drop_boxes_of(dropped, "box of an excluded image")
        header = md[["image_id", "width", "height"]].reset_index(drop=True)
        if self.boxes is not None and len(self.boxes):
            differs = ((given["width"].notna() & (given["width"] != md["width"]))
                       | (given["height"].notna() & (given["height"] != md["height"]))).to_numpy()
            boxes = self.boxes.copy()
            boxes["_line"] = np.arange(len(boxes))
            bad = isin(boxes["image_id"], md.loc[differs, "image_id"])
            boxes = self._screen(boxes, bad, "image size differs from the metadata", file=f"{self.name} boxes",
                                 field="image_id", expected="boxes of an image whose header size matches the metadata "
                                 "(boxes are in the provider's full-size pixels)",
                                 fix="Use the provider's full-size images.", item="box")
            boxes = self._screen_box_bounds(boxes, header, file=f"{self.name} boxes", name=lambda k: k,
                                            source="read from the image header")
            self.boxes = boxes.drop(columns="_line").reset_index(drop=True)
        if "width" in self.metadata.columns:
            for k in ("width", "height"):
                self.metadata[k] = self.metadata[k].astype("float64").fillna(header[k])
        return self

    # -- exclusions ---------------------------------------------------------------------
    def exclude(self, reason: str, count: int = 1, item: str = "image") -> None:
        """Count ``count`` items (``"image"`` or ``"box"``) left out for ``reason``."""
        key = (item, reason)
        self._exclusions[key] = self._exclusions.get(key, 0) + int(count)

    @property
    def exclusions(self) -> pd.DataFrame:
        """Items left out, as a tidy frame with columns ``reason``, ``count`` and ``item``."""
        return pd.DataFrame(
            {"reason": [r for _, r in self._exclusions], "count": list(self._exclusions.values()),
             "item": [i for i, _ in self._exclusions]},
            columns=["reason", "count", "item"],
        )

    # -- validation helpers for subclasses -----------------------------------------------
    def _screen(self, frame: pd.DataFrame, bad, reason: str, *, file, field: str | None, expected: str,
                fix: str = "", item: str = "image", show: str | None = None) -> pd.DataFrame:
        """Drop the rows where ``bad`` (counted under ``reason``) or raise naming the first one."""
        bad = np.asarray(bad, dtype=bool)
        n = int(bad.sum())
        if n == 0:
            return frame
        if self.on_error == "raise":
            pos = int(np.argmax(bad))
            line = int(frame["_line"].iloc[pos]) if "_line" in frame.columns else None
            col = show or field
            # Column first, then row: a row of a numeric frame would upcast ids to float.
            v = frame[col].iloc[pos] if col is not None and col in frame.columns else None
            v = v.item() if isinstance(v, np.generic) else v  # "2.0", not "np.float64(2.0)"
            value = f" (value {v!r})" if col is not None and col in frame.columns else ""
            more = f"; {n - 1} more such row(s)" if n > 1 else ""
            raise CohortError(
                f"{_where(file, line, field)}: {reason}{value}{more}; expected {expected}. "
                f"{fix + ' ' if fix else ''}Or build the cohort with on_error='exclude' to drop and count them."
            )
        self.exclude(reason, n, item)
        return frame.loc[~bad]

    def _screen_boxes(self, boxes: pd.DataFrame, *, file, sizes: pd.DataFrame | None = None,
                      known_ids: Iterable[str] = (), kept_ids: Iterable[str] | None = None,
                      source_fields: dict[str, str] | None = None,
                      size_source: str = "given in the metadata") -> pd.DataFrame:
        """Check boxes: numbers, known image, not empty, not inverted, inside the image.

        ``known_ids``: every image id the source lists; ``kept_ids``: those still in the
        metadata (boxes of excluded images are counted, not raised). ``sizes``: frame with
        ``image_id``, ``width``, ``height`` (NaN where unknown: read_image then raises on an
        out-of-image box); ``size_source`` says where the sizes came from, for messages.
        """
        f = source_fields or {}
        name = lambda k: f.get(k, k)  # noqa: E731 - the source's own field name in messages
        for k in ("x1", "y1", "x2", "y2"):
            boxes = self._screen(boxes, ~np.isfinite(boxes[k].to_numpy()), "box coordinate not a number",
                                 file=file, field=name(k), show=k, expected="a finite number of pixels", item="box")
        boxes = self._screen(boxes, ~isin(boxes["image_id"], known_ids), "box for an image not in the metadata",
                             file=file, field=name("image_id"), show="image_id",
                             expected="an image id listed in the metadata", item="box")
        if kept_ids is not None:
            gone = ~isin(boxes["image_id"], kept_ids)
            if gone.any():
                self.exclude("box of an excluded image", int(gone.sum()), "box")
                boxes = boxes.loc[~gone]
        for lo, hi, dim in (("x1", "x2", "width"), ("y1", "y2", "height")):
            boxes = self._screen(boxes, (boxes[dim] == 0).to_numpy(), "empty box (zero width or height)",
                                 file=file, field=name(hi), show=hi, expected=f"{hi} > {lo}", item="box")
            boxes = self._screen(boxes, (boxes[dim] < 0).to_numpy(), "inverted box (x2 < x1 or y2 < y1)",
                                 file=file, field=name(hi), show=hi, expected=f"{hi} > {lo}",
                                 fix="Boxes are (x1, y1, x2, y2) in pixels.", item="box")
        for k in ("x1", "y1"):
            boxes = self._screen(boxes, (boxes[k] < 0).to_numpy(), "box outside the image",
                                 file=file, field=name(k), show=k, expected=f"{k} >= 0", item="box")
        if sizes is not None:
            boxes = self._screen_box_bounds(boxes, sizes, file=file, name=name, source=size_source)
        return boxes

    def _screen_box_bounds(self, boxes: pd.DataFrame, sizes: pd.DataFrame, *, file, name,
                           source: str = "given in the metadata") -> pd.DataFrame:
        """Screen ``x2 <= width`` and ``y2 <= height`` (``sizes``: image_id, width, height; NaN = unknown)."""
        if not len(boxes):
            return boxes
        wh = boxes[["image_id"]].merge(sizes[["image_id", "width", "height"]].drop_duplicates("image_id"),
                                       on="image_id", how="left")
        wh.index = boxes.index
        for k, dim in (("x2", "width"), ("y2", "height")):
            limit = wh[dim].to_numpy(dtype="float64")
            boxes = self._screen(boxes, boxes[k].to_numpy() > np.where(np.isnan(limit), np.inf, limit),
                                 "box outside the image", file=file, field=name(k), show=k,
                                 expected=f"{k} <= the image {dim} {source}", item="box")
            wh = wh.loc[boxes.index]
        return boxes

    def _finish_boxes(self, boxes: pd.DataFrame, stratify) -> pd.DataFrame:
        boxes = boxes.copy()
        boxes["stratum"] = assign_strata(boxes, stratify)
        return boxes[list(BOX_COLUMNS)].reset_index(drop=True)

    def _drop_boxes_of(self, image_ids, reason: str) -> None:
        if self.boxes is None or not len(self.boxes):
            return
        gone = pd.Series(isin(self.boxes["image_id"], image_ids), index=self.boxes.index)
        if gone.any():
            self.exclude(reason, int(gone.sum()), "box")
            self.boxes = self.boxes.loc[~gone].reset_index(drop=True)

    def _check_boxes_on_read(self, row: pd.Series, shape: tuple[int, ...]) -> None:
        # Raise only, never drop: read_image runs in DataLoader worker processes, where any
        # change to self.boxes or the exclusion counts is lost when the worker exits. Boxes
        # are screened against image sizes when the cohort is built (check_files=True or
        # check_images()); reaching this means the cohort was built without those sizes.
        h, w = shape[:2]
        mine = (self.boxes["image_id"] == row["image_id"]).to_numpy(dtype=bool, copy=True)
        if not mine.any():
            return
        meta_w, meta_h = row.get("width", np.nan), row.get("height", np.nan)
        if pd.notna(meta_w) and pd.notna(meta_h) and (int(meta_w), int(meta_h)) != (w, h):
            detail = (f"image is {w}x{h} px but the metadata says {int(meta_w)}x{int(meta_h)}; its boxes would be "
                      "wrong. Use the provider's full-size images")
        else:
            b = self.boxes.loc[mine]
            out = ((b["x2"] > w) | (b["y2"] > h)).to_numpy()
            if not out.any():
                return
            detail = f"box {b.loc[out].iloc[0][['x1', 'y1', 'x2', 'y2']].tolist()} exceeds the image's {w}x{h} px"
        raise CohortError(f"{row['path']}: {detail}. Check the box file; to drop and count such boxes instead, build "
                          "the cohort with check_files=True and on_error='exclude' (or call check_images()), which "
                          "screens every box against its image's size before any image is read.")

    def _header_sizes(self, frame: pd.DataFrame, rows, *, file, field: str, show: str = "path") -> pd.DataFrame:
        """Fill ``width``/``height`` of ``frame``'s ``rows`` (bool mask) from the image headers.

        Headers only (no pixel decoding). An image whose header cannot be read raises
        naming ``file``, line and ``field``, or, with ``on_error="exclude"``, is dropped
        and counted ("image file missing" / "image file unreadable ...").
        """
        frame = frame.copy()
        for k in ("width", "height"):
            if k not in frame.columns:
                frame[k] = np.nan
            frame[k] = frame[k].astype("float64")
        rows = np.asarray(rows, dtype=bool)
        idx = np.flatnonzero(rows)
        paths = frame[show].to_numpy()[idx] if show in frame.columns else frame["path"].to_numpy()[idx]
        w = np.full(len(frame), np.nan)
        h = np.full(len(frame), np.nan)
        missing = np.zeros(len(frame), dtype=bool)
        unreadable = np.zeros(len(frame), dtype=bool)
        first_error: dict[str, str] = {}
        for i, p in zip(idx, paths):
            try:
                size = cxio.read_image_size(p)
            except cxio.ImageReadError as e:
                kind = "missing" if isinstance(e, cxio.ImageMissingError) else "unreadable"
                (missing if kind == "missing" else unreadable)[i] = True
                first_error.setdefault(kind, str(e))
                continue
            w[i], h[i] = size.width, size.height
        frame.loc[rows, "width"] = w[rows]
        frame.loc[rows, "height"] = h[rows]
        frame = self._screen(frame, missing, "image file missing", file=file, field=field, show=show,
                             expected="an image file whose header gives its size",
                             fix=first_error.get("missing", ""))
        # The first screen raised or dropped every missing row, so ``~missing`` aligns the rest.
        frame = self._screen(frame, unreadable[~missing],
                             "image file unreadable (corrupt, truncated or unsupported)", file=file, field=field,
                             show=show, expected="a readable PNG, JPEG or DICOM header",
                             fix=first_error.get("unreadable", ""))
        return frame

    def __repr__(self) -> str:
        nb = 0 if self.boxes is None else len(self.boxes)
        return f"{type(self).__name__}(name={self.name!r}, images={len(self)}, boxes={nb}, labels={self.label_columns})"
