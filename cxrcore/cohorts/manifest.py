"""A documented manifest CSV that any institution can fill for its own cohort (the Emory-style cohort)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from cxrcore.cohorts.base import (
    METADATA_COLUMNS,
    Cohort,
    CohortError,
    OnError,
    coerce_labels,
    existing_files,
    isin,
    make_boxes,
    read_csv,
)

MANIFEST_SCHEMA = """\
Manifest CSV (UTF-8, comma-separated, one row per image, header on line 1)

| column       | required | meaning |
|--------------|----------|---------|
| path         | yes      | image file (PNG, JPEG or DICOM), relative to the manifest's folder or absolute |
| patient_id   | yes      | pseudonymous patient id; every split is made at this level |
| image_id     | no       | unique image id (default: the path) |
| study_id     | no       | study / accession id (default: the image id) |
| view         | no       | PA, AP, LATERAL, LL ... (free text, upper-cased) |
| split        | no       | a fixed split for the image, e.g. train / test |
| width        | no       | image width in pixels (lets boxes be checked without opening images; |
|              |          | left blank, it is read from the image header of every image with boxes) |
| height       | no       | image height in pixels (likewise) |
| label_<name> | no       | one column per finding: 1 (present), 0 (absent) or blank (unknown) |

Any other column is an error (a typo in a label column must not pass silently).

Boxes (optional), a second CSV, by default `<manifest stem>_boxes.csv` beside it,
one row per box, pixel-edge coordinates of the original image, x2 / y2 exclusive:

| column   | meaning |
|----------|---------|
| image_id | an image_id (or path, if the manifest has no image_id) of the manifest |
| class    | finding name |
| x1, y1   | top-left corner, pixels, >= 0 |
| x2, y2   | bottom-right corner, pixels, > x1 / > y1, <= width / height |
"""

REQUIRED = ("path", "patient_id")
OPTIONAL = ("image_id", "study_id", "view", "split", "width", "height")
BOX_REQUIRED = ("image_id", "class", "x1", "y1", "x2", "y2")
LABEL_PREFIX = "label_"


class ManifestCohort(Cohort):
    """A cohort described by a manifest CSV: the route for institutional data with no public release.

    The paper's Emory-CXR cohort has no public release; an institution fills this
    manifest for its own images (schema in :data:`MANIFEST_SCHEMA`, shown in the book).
    ``csv_path`` is the manifest, or a folder holding ``manifest.csv``. Validation is
    strict: every rule of the schema gives an error naming file, line and field (or, with
    ``on_error="exclude"``, a counted exclusion). Label columns drop their ``label_``
    prefix. Every box is screened against its image's size when the cohort is built:
    the manifest's ``width``/``height``, or, where those are blank and ``check_files`` is
    True, the size read from the image header (an unreadable header raises or, with
    ``on_error="exclude"``, excludes and counts the image). With ``check_files=False`` and
    no sizes, an out-of-image box raises when its image is read. ``stratify``: the box stratum rule (see
    :func:`~cxrcore.cohorts.base.assign_strata`).

    Citation, licence and download: those of the institution's own data; ``pixels_public``
    defaults to False because institutional pixels may not be shown.
    """

    name = "manifest"
    pixels_public = False
    citation = "institutional cohort described by a manifest CSV"
    licence = "set by the data owner"
    homepage = ""

    def __init__(self, csv_path: str | os.PathLike, *, boxes_csv: str | os.PathLike | None = None,
                 stratify: str | float | dict = "median", check_files: bool = True, pixels_public: bool = False,
                 name: str = "manifest", on_error: OnError = "raise") -> None:
        super().__init__(on_error)
        path = Path(csv_path)
        if path.is_dir():
            path = path / "manifest.csv"
        self.source_file, self.root = path, path.parent
        self.name, self.pixels_public = name, pixels_public
        df = read_csv(path, required=REQUIRED, what="manifest", dtype={"path": str, "patient_id": str,
                                                                       "image_id": str, "study_id": str})
        cols = [c for c in df.columns if c != "_line"]
        extra = [c for c in cols if c not in (*REQUIRED, *OPTIONAL) and not c.startswith(LABEL_PREFIX)]
        if extra:
            raise CohortError(f"{path}, line 1, field {extra[0]!r}: unknown column(s) {extra}; expected the columns "
                              f"of MANIFEST_SCHEMA, label columns named label_<finding>. Rename or remove them.")
        label_src = [c for c in cols if c.startswith(LABEL_PREFIX)]
        self.label_columns = [c[len(LABEL_PREFIX):] for c in label_src]

        for k in REQUIRED:
            blank = df[k].isna().to_numpy() | (df[k].astype("string").str.strip() == "").fillna(True).to_numpy()
            df = self._screen(df, blank, f"{k} missing", file=path, field=k, expected="a value in every row")
        p = df["path"].astype("string").str.strip()
        rel = ~p.str.startswith(os.sep)
        df["path"] = p.where(~rel, str(self.root) + os.sep + p)
        df["image_id"] = (df["image_id"].astype("string") if "image_id" in df.columns else p).fillna(p)
        df = self._screen(df, df["image_id"].duplicated().to_numpy(), "duplicate image id", file=path,
                          field="image_id" if "image_id" in cols else "path", show="image_id",
                          expected="each image once")
        df["patient_id"] = df["patient_id"].astype("string").str.strip()
        df["study_id"] = df["study_id"].astype("string").fillna(df["image_id"]) if "study_id" in cols else df["image_id"]
        df["view"] = df["view"].astype("string").str.strip().str.upper() if "view" in cols else \
            pd.Series(pd.NA, index=df.index, dtype="string")
        df["split"] = df["split"].astype("string") if "split" in cols else pd.Series(pd.NA, index=df.index, dtype="string")
        for k in ("width", "height"):
            if k in cols:
                v = pd.to_numeric(df[k], errors="coerce")
                bad = (df[k].notna() & (v.isna() | (v <= 0))).to_numpy()
                df = self._screen(df, bad, f"{k} not a positive number", file=path, field=k,
                                  expected="a size in pixels or blank")
                df[k] = pd.to_numeric(df[k], errors="coerce").astype("float64")
            else:
                df[k] = np.nan
        for src, dst in zip(label_src, self.label_columns):
            num, bad = coerce_labels(df[src])
            df = self._screen(df, bad.loc[df.index].to_numpy(), "unknown label value", file=path, field=src,
                              expected="1, 0 or blank (unknown)")
            df[dst] = num.loc[df.index]
        if check_files:
            df = self._screen(df, ~existing_files(df["path"]), "image file missing", file=path, field="path",
                              expected="an existing image file", fix="Fix the path (relative to the manifest's folder).")
        bpath = Path(boxes_csv) if boxes_csv is not None else path.with_name(path.stem + "_boxes.csv")
        raw = None
        if boxes_csv is not None or bpath.is_file():
            raw = read_csv(bpath, required=BOX_REQUIRED, what="manifest boxes file", dtype={"image_id": str, "class": str})
            if check_files:
                # Sizes left blank: read them from the headers of the images that have boxes, so
                # every box is screened now (in the main process), not on read in a worker.
                need = (df["width"].isna() | df["height"].isna()).to_numpy() & isin(df["image_id"], raw["image_id"])
                if need.any():
                    df = self._header_sizes(df, need, file=path, field="path")
        self.metadata = df[[*METADATA_COLUMNS, *self.label_columns, *OPTIONAL[3:]]].reset_index(drop=True)

        self.boxes = None
        if raw is not None:
            boxes = make_boxes(raw["image_id"], raw["class"], raw["x1"], raw["y1"], raw["x2"], raw["y2"],
                               line=raw["_line"])
            boxes = self._screen_boxes(boxes, file=bpath, sizes=self.metadata[["image_id", "width", "height"]],
                                       known_ids=pd.concat([df["image_id"], self._dropped_ids(df)]),
                                       kept_ids=self.metadata["image_id"],
                                       size_source="(the manifest's, or read from the image header where blank)")
            self.boxes = self._finish_boxes(boxes, stratify)

    def _dropped_ids(self, df: pd.DataFrame) -> pd.Series:
        # Ids of rows excluded above are re-read from the file so their boxes count as
        # "box of an excluded image" rather than "box for an image not in the metadata".
        raw = pd.read_csv(self.source_file, dtype=str, usecols=lambda c: c in ("image_id", "path"))
        ids = raw["image_id"] if "image_id" in raw.columns else raw["path"]
        return ids.dropna().astype("string")
