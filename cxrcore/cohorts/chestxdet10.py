"""ChestX-Det10, read from the official train.json / test.json and image folders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from cxrcore.cohorts.base import (
    METADATA_COLUMNS,
    Cohort,
    CohortError,
    OnError,
    existing_files,
    make_boxes,
)

#: The ten annotated categories, spelt as in the json ``syms``.
CHESTXDET10_CLASSES: tuple[str, ...] = (
    "Atelectasis", "Calcification", "Consolidation", "Effusion", "Emphysema", "Fibrosis", "Fracture", "Mass",
    "Nodule", "Pneumothorax",
)
#: The paper's small-lesion classes.
SMALL_LESION_CLASSES: tuple[str, ...] = ("Calcification", "Nodule", "Mass")


class ChestXDet10(Cohort):
    """ChestX-Det10: 3,543 NIH ChestX-ray14 images with expert boxes for 10 categories.

    Reads ``train.json`` / ``test.json`` (a list of ``{"file_name", "syms", "boxes"}``,
    ``boxes[k] = [x1, y1, x2, y2]`` in pixels for ``syms[k]``) and the images in
    ``train/`` and ``test/``. Labels are image-level, one per class in ``classes``: 1 if the
    image has a box of that class, else 0. ``boxes`` holds the boxes of ``classes`` only,
    with ``stratum`` small / large decided within class (``stratify``: ``"median"`` by
    default, see :func:`~cxrcore.cohorts.base.assign_strata`), over all boxes of the
    chosen ``splits``. The json gives no patient ids, so ``patient_id`` is the image id:
    only the official train/test split (column ``split``) is patient-safe by construction.
    The json gives no image size, so with ``check_files=True`` (default) each image's
    ``width``/``height`` is read from its header (no pixel decoding; the whole build takes
    about 0.3 s for 3,543 1024-px PNGs on a local disk, 1 s with a cold file cache) and every box is screened against it when the cohort is
    built: a box past the image raises naming the json file, entry and field, or with
    ``on_error="exclude"`` is dropped and counted, as is an image whose header cannot be
    read. ``check_files=False`` touches no image file: sizes stay NaN and an out-of-image
    box raises when its image is read.

    Citation: Liu J, Lian J, Yu Y. ChestX-Det10: Chest X-ray dataset on detection of thoracic
    abnormalities. arXiv:2006.10550 (2020).
    Licence: images from NIH ChestX-ray14 (no restrictions on use, attribution to the NIH
    Clinical Center); annotations released by Deepwise AI Lab on GitHub for research use.
    Download: https://github.com/Deepwise-AILab/ChestX-Det10-Dataset
    """

    name = "chestxdet10"
    pixels_public = True
    citation = "Liu et al., ChestX-Det10, arXiv:2006.10550 (2020)"
    licence = "NIH ChestX-ray14 images (attribution); Deepwise annotations for research use"
    homepage = "https://github.com/Deepwise-AILab/ChestX-Det10-Dataset"

    def __init__(self, root: str | os.PathLike, *, classes: tuple[str, ...] = SMALL_LESION_CLASSES,
                 stratify: str | float | dict = "median", splits: tuple[str, ...] = ("train", "test"),
                 check_files: bool = True, on_error: OnError = "raise") -> None:
        super().__init__(on_error)
        unknown = [c for c in classes if c not in CHESTXDET10_CLASSES]
        if unknown:
            raise ValueError(f"classes: {unknown} are not ChestX-Det10 categories {list(CHESTXDET10_CLASSES)}.")
        self.root = Path(root)
        self.classes = tuple(classes)
        self.label_columns = list(classes)
        images, boxes = [], []
        for split in splits:
            im, bx = self._read_split(split, check_files)
            images.append(im)
            boxes.append(bx)
        md = pd.concat(images, ignore_index=True)
        dup = md["image_id"].duplicated().to_numpy()
        md = self._screen(md, dup, "image listed twice", file=self.root / "train.json + test.json", field="file_name",
                          show="image_id", expected="each file name once across the splits")
        boxes = pd.concat(boxes, ignore_index=True)
        kept = boxes.loc[boxes["class"].isin(list(classes))]
        # Image-level labels from the syms, before box checks: a bad box does not unmake the finding.
        has = pd.crosstab(kept["image_id"], kept["class"]).reindex(columns=list(classes), fill_value=0) > 0
        known = boxes["image_id"].tolist() + md["image_id"].tolist()
        fields = {"image_id": "file_name", "x1": "boxes[0]", "y1": "boxes[1]", "x2": "boxes[2]", "y2": "boxes[3]"}
        # One split at a time, so a message names the json file the entry number refers to.
        kept = pd.concat([
            self._screen_boxes(kept.loc[(kept["_split"] == split).to_numpy()],
                               file=f"{self.root / split}.json (entry numbers are 0-based)",
                               sizes=md[["image_id", "width", "height"]], size_source="read from the image header",
                               known_ids=known, kept_ids=md["image_id"], source_fields=fields)
            for split in splits
        ])
        for c in classes:
            md[c] = md["image_id"].map(has[c]).fillna(False).astype("float64")
        self.metadata = md[[*METADATA_COLUMNS, *self.label_columns, "split", "width", "height"]].reset_index(drop=True)
        self.boxes = self._finish_boxes(kept, stratify)

    def _read_split(self, split: str, check_files: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
        path = self.root / f"{split}.json"
        if not path.is_file():
            raise CohortError(f"{path}: not found. Download {split}.json and the {split} images from "
                              f"{self.homepage} into {self.root}.")
        try:
            entries = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CohortError(f"{path}: not valid JSON ({e}). Download it again.") from e
        if not isinstance(entries, list):
            raise CohortError(f"{path}: expected a list of {{file_name, syms, boxes}} entries, got {type(entries).__name__}.")
        df = pd.DataFrame.from_records(entries)
        missing = [c for c in ("file_name", "syms", "boxes") if c not in df.columns]
        if missing:
            raise CohortError(f"{path}, entry 1, field {missing[0]!r}: missing in every entry; expected keys "
                              "file_name, syms, boxes. Use the official file unchanged.")
        df["_line"] = np.arange(len(df))  # entry number, 0-based like json indexing
        where = f"{path} (entry numbers are 0-based)"
        for k in ("syms", "boxes"):
            not_list = ~df[k].map(lambda v: isinstance(v, list)).to_numpy()  # per entry: a few thousand
            df = self._screen(df, not_list, f"{k} is not a list", file=where, field=k, expected="a JSON list")
        n_s, n_b = df["syms"].map(len), df["boxes"].map(len)
        df = self._screen(df, (n_s != n_b).to_numpy(), "syms and boxes differ in length", file=where, field="boxes",
                          expected="one box per sym")
        md = pd.DataFrame({
            "image_id": df["file_name"].astype("string").to_numpy(),
            "split": split,
            "_line": df["_line"].to_numpy(),
        })
        md["patient_id"] = md["image_id"]
        md["study_id"] = md["image_id"].str.replace(r"\.[^.]*$", "", regex=True)
        md["view"] = pd.Series(pd.NA, index=md.index, dtype="string")
        md["path"] = str(self.root / split) + os.sep + md["image_id"]
        if check_files:
            md = self._screen(md, ~existing_files(md["path"]), "image file missing", file=where, field="file_name",
                              show="path", expected=f"the image in {self.root / split}",
                              fix=f"Unzip the {split} images into {self.root / split}.")
            # The json has no sizes: read them from the headers so boxes are screened now, in
            # the main process, not on read in a DataLoader worker whose exclusions are lost.
            md = self._header_sizes(md, np.ones(len(md), dtype=bool), file=where, field="file_name")
        else:
            md["width"] = np.nan
            md["height"] = np.nan

        flat = df[["file_name", "syms", "boxes", "_line"]].explode(["syms", "boxes"]).dropna(subset=["syms"])
        ok4 = flat["boxes"].map(lambda b: isinstance(b, list) and len(b) == 4).to_numpy()
        flat = self._screen(flat, ~ok4, "box is not [x1, y1, x2, y2]", file=where, field="boxes", item="box",
                            expected="four numbers")
        flat = self._screen(flat, ~flat["syms"].isin(list(CHESTXDET10_CLASSES)).to_numpy(), "unknown box class",
                            file=where, field="syms", expected=f"one of {list(CHESTXDET10_CLASSES)}", item="box")
        xy = np.array(flat["boxes"].tolist(), dtype=object).reshape(-1, 4)
        boxes = make_boxes(flat["file_name"], flat["syms"], xy[:, 0], xy[:, 1], xy[:, 2], xy[:, 3],
                           line=flat["_line"])
        boxes["_split"] = split
        return md, boxes
