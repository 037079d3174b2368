"""Any folder of PNG / JPEG / DICOM radiographs, with no metadata file."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from cxrcore.cohorts.base import METADATA_COLUMNS, Cohort, CohortError, OnError
from cxrcore.io import IMAGE_SUFFIXES


class FolderCohort(Cohort):
    """Every PNG, JPEG and DICOM file under ``root`` (recursively), sorted by path; no labels, no boxes.

    ``image_id`` is the path relative to ``root``; ``patient_id`` is the file stem unless
    ``patient_id`` gives a rule: a regular expression whose first group (or whole match)
    is the patient id, e.g. ``r"^(\\d{8})_"`` for NIH names, or a callable mapping the
    relative path to an id. ``view`` is unknown (NA). Files with other suffixes are skipped
    and counted in ``exclusions``. Only names are listed: no file is opened.

    Citation, licence and download: those of the images' source. ``pixels_public``
    defaults to False; set it when the images may be shown.
    """

    name = "folder"
    pixels_public = False

    def __init__(self, root: str | os.PathLike, *, patient_id: str | Callable[[str], str] | None = None,
                 suffixes: tuple[str, ...] = IMAGE_SUFFIXES, pixels_public: bool = False,
                 on_error: OnError = "raise") -> None:
        super().__init__(on_error)
        self.root = Path(root)
        self.pixels_public = pixels_public
        if not self.root.is_dir():
            raise CohortError(f"{self.root}: not a folder. Point data_root at the folder holding the images.")
        rel, skipped = [], 0
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in filenames:
                if f.startswith("."):
                    continue
                if f.lower().endswith(tuple(suffixes)):
                    rel.append(os.path.relpath(os.path.join(dirpath, f), self.root))
                else:
                    skipped += 1
        if skipped:
            self.exclude("not an image file (suffix)", skipped)
        if not rel:
            raise CohortError(f"{self.root}: no image files ({', '.join(suffixes)}) found. Check data_root.")
        md = pd.DataFrame({"image_id": pd.Series(sorted(rel), dtype="string")})
        stem = md["image_id"].str.rsplit(os.sep, n=1).str[-1].str.replace(r"\.[^.]*$", "", regex=True)
        if patient_id is None:
            md["patient_id"] = stem
        elif callable(patient_id):
            md["patient_id"] = md["image_id"].map(patient_id).astype("string")
        else:
            rx = re.compile(patient_id)
            got = md["image_id"].str.rsplit(os.sep, n=1).str[-1].str.extract(
                rx if rx.groups else re.compile(f"({patient_id})"), expand=False)
            got = got.iloc[:, 0] if isinstance(got, pd.DataFrame) else got
            md["patient_id"] = got.astype("string")
            md["_line"] = np.arange(len(md))
            md = self._screen(md, md["patient_id"].isna().to_numpy(), "patient id rule does not match the file name",
                              file=self.root, field="patient_id", show="image_id",
                              expected=f"a file name matching {patient_id!r}")
        md["study_id"] = stem.loc[md.index]
        md["view"] = pd.Series(pd.NA, index=md.index, dtype="string")
        md["path"] = str(self.root) + os.sep + md["image_id"]
        self.metadata = md[list(METADATA_COLUMNS)].reset_index(drop=True)
        self.label_columns = []
        self.boxes = None
