"""NIH ChestX-ray14, read from the files exactly as the NIH Clinical Center ships them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from cxrcore.cohorts.base import (
    METADATA_COLUMNS,
    Cohort,
    CohortError,
    OnError,
    arrow_strings,
    isin,
    make_boxes,
    read_csv,
)

#: The 14 findings, spelt as in ``Finding Labels``.
NIH_LABELS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
NO_FINDING = "No Finding"
#: Every released PNG is 1024 x 1024; ``BBox_List_2017.csv`` is in these pixels, while
#: ``OriginalImage[Width,Height]`` is the size of the DICOM before NIH resized it.
NIH_IMAGE_SIZE = 1024
#: The box file says "Infiltrate" where the label file says "Infiltration": one name per concept.
BOX_CLASS_ALIASES = {"Infiltrate": "Infiltration"}

DATA_ENTRY_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
BBOX_NAMES = ("BBox_List_2017.csv",)
DATA_ENTRY_COLUMNS = ("Image Index", "Finding Labels", "Patient ID", "View Position")
BBOX_COLUMNS_SRC = ("Image Index", "Finding Label", "Bbox [x", "y", "w", "h]")


def _find(root: Path, names) -> Path | None:
    for n in names:
        for cand in (root / n, root / (n + ".gz")):
            if cand.is_file():
                return cand
    return None


class NIHChestXray14(Cohort):
    """NIH ChestX-ray14: 112,120 frontal radiographs of 30,805 patients, 14 text-mined findings.

    Reads ``Data_Entry_2017_v2020.csv`` (or the original ``Data_Entry_2017.csv``; ``.gz``
    also accepted), images under ``images/`` or the twelve ``images_001/images/`` ...
    folders, the official ``train_val_list.txt`` / ``test_list.txt`` (column ``split``:
    ``train_val`` / ``test``) and ``BBox_List_2017.csv`` (984 boxes of 8 findings,
    ``Bbox [x, y, w, h]`` in the released 1024-px images; ``Infiltrate`` harmonised to
    ``Infiltration``). Labels are 1/0 (the source has no uncertain value); ``study_id`` is
    the image's follow-up visit (the file stem); ``width``/``height`` are the released
    1024 px, the DICOM's size is kept as ``original_width``/``original_height``.

    Parameters: ``views`` keeps only these ``View Position`` values (``None``: all);
    ``stratify`` is the box stratum rule (see :func:`~cxrcore.cohorts.base.assign_strata`);
    ``check_files=False`` skips the image-folder listing (metadata only).

    Citation: Wang X, Peng Y, Lu L, Lu Z, Bagheri M, Summers RM. ChestX-ray8: Hospital-scale
    chest X-ray database and benchmarks on weakly-supervised classification and localization
    of common thorax diseases. CVPR 2017.
    Licence: NIH Clinical Center, no restrictions on use; link the download site, cite the
    paper and acknowledge the NIH Clinical Center.
    Download: https://nihcc.app.box.com/v/ChestXray-NIHCC
    """

    name = "nih"
    pixels_public = True
    citation = "Wang et al., ChestX-ray8, CVPR 2017"
    licence = "NIH Clinical Center: no restrictions on use; attribution required"
    homepage = "https://nihcc.app.box.com/v/ChestXray-NIHCC"

    def __init__(self, root: str | os.PathLike, *, data_entry: str | os.PathLike | None = None,
                 bbox_list: str | os.PathLike | None = None, views: tuple[str, ...] | None = None,
                 stratify: str | float | dict = "median", check_files: bool = True,
                 on_error: OnError = "raise") -> None:
        super().__init__(on_error)
        self.root = Path(root)
        self.label_columns = list(NIH_LABELS)
        entry = Path(data_entry) if data_entry is not None else _find(self.root, DATA_ENTRY_NAMES)
        if entry is None:
            raise CohortError(f"{self.root}: no Data_Entry_2017_v2020.csv or Data_Entry_2017.csv. Download it from "
                              f"{self.homepage} into this folder, or pass data_entry=.")
        self.source_file = entry
        df = read_csv(entry, required=DATA_ENTRY_COLUMNS, what="NIH data entry file")
        df = self._parse(df, entry, views)
        if check_files:
            df = self._attach_paths(df, entry)
        else:
            df["path"] = str(self.root / "images") + os.sep + df["image_id"]
        df = self._attach_split(df)
        extra = ["split", "width", "height", "original_width", "original_height", "age", "sex"]
        self.metadata = df[[*METADATA_COLUMNS, *self.label_columns, *extra]].reset_index(drop=True)

        bbox = Path(bbox_list) if bbox_list is not None else _find(self.root, BBOX_NAMES)
        self.boxes = None if bbox is None else self._read_boxes(bbox, known=self._all_ids, stratify=stratify)

    # -- metadata ---------------------------------------------------------------------------
    def _parse(self, df: pd.DataFrame, entry: Path, views) -> pd.DataFrame:
        df["image_id"] = df["Image Index"].astype("string").str.strip()
        df = self._screen(df, df["image_id"].isna().to_numpy() | (df["image_id"] == "").fillna(True).to_numpy(),
                          "image id missing", file=entry, field="Image Index", expected="a file name like 00000001_000.png")
        df = self._screen(df, df["image_id"].duplicated().to_numpy(), "duplicate image id", file=entry,
                          field="Image Index", expected="each image listed once")
        self._all_ids = df["image_id"]
        pid = pd.to_numeric(df["Patient ID"], errors="coerce")
        df = self._screen(df, pid.isna().to_numpy(), "patient id missing or not a number", file=entry,
                          field="Patient ID", expected="an integer patient number")
        df["patient_id"] = pd.to_numeric(df["Patient ID"]).astype("int64").astype("string").str.zfill(8)
        df["study_id"] = df["image_id"].str.replace(r"\.[^.]*$", "", regex=True)
        df["view"] = df["View Position"].astype("string").str.strip()
        df = self._screen(df, ~df["view"].isin(["PA", "AP"]).to_numpy(), "unknown view position", file=entry,
                          field="View Position", expected="PA or AP")
        if views is not None:
            keep = df["view"].isin(list(views)).to_numpy()
            if (~keep).any():
                self.exclude(f"view not in {tuple(views)}", int((~keep).sum()))
                df = df.loc[keep]

        # Labels, vectorised with Arrow: one entry per (image, token), then a scatter into a 0/1 matrix.
        df = df.reset_index(drop=True)
        lists = pc.split_pattern(arrow_strings(df["Finding Labels"]), "|")
        tokens = pc.utf8_trim_whitespace(pc.list_flatten(lists))
        rows = pc.list_parent_indices(lists).to_numpy()
        allowed = [*NIH_LABELS, NO_FINDING]
        codes = pc.index_in(tokens, value_set=pa.array(allowed, pa.large_string())).fill_null(-1).to_numpy()
        n = len(df)
        unknown = np.bincount(rows[codes < 0], minlength=n) > 0
        unknown |= df["Finding Labels"].isna().to_numpy()  # a blank cell has no token at all
        none = np.bincount(rows[codes == len(NIH_LABELS)], minlength=n) > 0
        mixed = none & (np.bincount(rows, minlength=n) > 1)
        mat = np.zeros((n, len(NIH_LABELS)), dtype="float64")
        hit = (codes >= 0) & (codes < len(NIH_LABELS))
        mat[rows[hit], codes[hit]] = 1.0
        df[list(NIH_LABELS)] = mat
        df = self._screen(df, unknown, "unknown label value", file=entry, field="Finding Labels",
                          expected=f"'|'-separated values from {allowed}")
        df = self._screen(df, mixed[df.index.to_numpy()], "'No Finding' together with a finding", file=entry,
                          field="Finding Labels", expected="either 'No Finding' or a list of findings")

        df["width"] = float(NIH_IMAGE_SIZE)
        df["height"] = float(NIH_IMAGE_SIZE)
        for src, dst in (("OriginalImage[Width", "original_width"), ("Height]", "original_height"),
                         ("Patient Age", "age")):
            df[dst] = pd.to_numeric(df[src], errors="coerce") if src in df.columns else np.nan
        df["sex"] = df["Patient Gender"].astype("string") if "Patient Gender" in df.columns else pd.NA
        return df

    def _attach_paths(self, df: pd.DataFrame, entry: Path) -> pd.DataFrame:
        folders = [self.root / "images"] + sorted(self.root.glob("images_*/images"))
        folders = [f for f in folders if f.is_dir()]
        # One listing per folder, then a vectorised lookup: no stat per image.
        where = {}
        for f in folders:
            with os.scandir(f) as it:
                where.update((e.name, os.path.join(f, e.name)) for e in it)
        df["path"] = df["image_id"].map(where).astype("string")
        hint = "under images/ or images_001/images/ ... images_012/images/"
        df = self._screen(df, df["path"].isna().to_numpy(), "image file missing", file=entry, field="Image Index",
                          show="image_id", expected=f"the file {hint} of {self.root}",
                          fix="Unpack all twelve images_XXX.tar.gz archives.")
        return df

    def _attach_split(self, df: pd.DataFrame) -> pd.DataFrame:
        df["split"] = pd.Series(pd.NA, index=df.index, dtype="string")
        for name, value in (("train_val_list.txt", "train_val"), ("test_list.txt", "test")):
            p = _find(self.root, (name,))
            if p is not None:
                names = pd.Index(pd.read_csv(p, header=None, names=["n"], dtype=str)["n"].str.strip())
                df.loc[isin(df["image_id"], names), "split"] = value
        return df

    # -- boxes ------------------------------------------------------------------------------
    def _read_boxes(self, path: Path, known: pd.Series, stratify) -> pd.DataFrame:
        raw = read_csv(path, required=BBOX_COLUMNS_SRC, what="NIH bounding-box file")
        cls = raw["Finding Label"].astype("string").str.strip().replace(BOX_CLASS_ALIASES)
        x, y = raw["Bbox [x"], raw["y"]
        num = lambda s: pd.to_numeric(s, errors="coerce")  # noqa: E731
        boxes = make_boxes(raw["Image Index"].astype("string").str.strip(), cls, num(x), num(y),
                           num(x) + num(raw["w"]), num(y) + num(raw["h]"]), line=raw["_line"])
        boxes = self._screen(boxes, ~boxes["class"].isin(list(NIH_LABELS)).to_numpy(), "unknown box class",
                             file=path, field="Finding Label", show="class", expected=f"one of {list(NIH_LABELS)}",
                             item="box")
        boxes = self._screen_boxes(
            boxes, file=path, sizes=self.metadata[["image_id", "width", "height"]], known_ids=known,
            kept_ids=self.metadata["image_id"],
            source_fields={"image_id": "Image Index", "x1": "Bbox [x", "y1": "y", "x2": "w", "y2": "h]"},
        )
        return self._finish_boxes(boxes, stratify)
