"""MIMIC-CXR-JPG 2.x, read from the files exactly as PhysioNet ships them."""

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
    read_csv,
)

PREFIX = "mimic-cxr-2.0.0-"
META_COLUMNS = ("dicom_id", "subject_id", "study_id", "ViewPosition")
LABEL_KEYS = ("subject_id", "study_id")
UNCERTAIN = {"ignore": np.nan, "positive": 1.0, "negative": 0.0}
#: What a blank cell (finding not mentioned) becomes.
BLANK = {"unknown": np.nan, "negative": 0.0}
NO_FINDING = "No Finding"


def _find(root: Path, stem: str) -> Path:
    for cand in (root / f"{PREFIX}{stem}.csv", root / f"{PREFIX}{stem}.csv.gz"):
        if cand.is_file():
            return cand
    raise CohortError(f"{root}: no {PREFIX}{stem}.csv(.gz). Download it from https://physionet.org/content/"
                      "mimic-cxr-jpg/ into this folder (the folder that holds files/).")


class MIMICCXRJPG(Cohort):
    """MIMIC-CXR-JPG: 377,110 JPEG radiographs of 65,379 patients (Beth Israel Deaconess, 2011-2016).

    Reads ``mimic-cxr-2.0.0-metadata.csv``, the labeler's ``-chexpert.csv`` or
    ``-negbio.csv`` (per study: 1, 0, -1 uncertain, blank = not mentioned), ``-split.csv``
    (column ``split``: train / validate / test) and images at
    ``files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg`` (``.csv.gz`` accepted too).
    ``width``/``height`` come from the metadata's ``Columns``/``Rows``.

    Parameters: ``uncertain`` says what -1 becomes: ``"ignore"`` (NaN, unknown),
    ``"positive"`` (1) or ``"negative"`` (0); ``views`` keeps these ``ViewPosition``
    values (default frontal: PA, AP; ``None``: all); ``labeler``: ``"chexpert"`` or
    ``"negbio"``; ``check_files=False`` skips the image-folder listing. Studies without a
    label row keep NaN labels.

    Blank cells (finding not mentioned in the report) follow ``blank``: ``"unknown"``
    (default, NaN) or ``"negative"`` (0). Whatever ``blank`` is, a study with
    ``No Finding == 1`` has every other blank finding set to 0: the CheXpert labeler
    marks No Finding only when no finding is positive or uncertain, so a blank there is
    a negative. This is torchxrayvision's ``MIMIC_Dataset`` behaviour (blanks NaN, No
    Finding overrides), and so the common practice, with one difference: explicit 1, 0 and
    -1 cells win over the No Finding rule. torchxrayvision overwrites them with 0 too,
    which only matters for Support Devices, the one finding the labeler allows beside No
    Finding (a radiograph with a line and no disease); overwriting it would be wrong.

    Citation: Johnson AEW, Pollard TJ, Greenbaum NR, et al. MIMIC-CXR-JPG, a large publicly
    available database of labeled chest radiographs. arXiv:1901.07042 (2019); PhysioNet.
    Licence: PhysioNet Credentialed Health Data License 1.5.0; credentialed access, CITI
    training and the data use agreement are required; pixels may not be redistributed
    (``pixels_public`` is False).
    Download: https://physionet.org/content/mimic-cxr-jpg/
    """

    name = "mimic"
    pixels_public = False
    citation = "Johnson et al., MIMIC-CXR-JPG, arXiv:1901.07042 (2019), PhysioNet"
    licence = "PhysioNet Credentialed Health Data License 1.5.0 (credentialed access, DUA)"
    homepage = "https://physionet.org/content/mimic-cxr-jpg/"

    def __init__(self, root: str | os.PathLike, *, uncertain: str = "ignore", blank: str = "unknown",
                 views: tuple[str, ...] | None = ("PA", "AP"), labeler: str = "chexpert",
                 check_files: bool = True, on_error: OnError = "raise") -> None:
        super().__init__(on_error)
        if uncertain not in UNCERTAIN:
            raise ValueError(f"uncertain={uncertain!r}: expected one of {list(UNCERTAIN)}.")
        if blank not in BLANK:
            raise ValueError(f"blank={blank!r}: expected one of {list(BLANK)}.")
        if labeler not in ("chexpert", "negbio"):
            raise ValueError(f"labeler={labeler!r}: expected 'chexpert' or 'negbio'.")
        self.root = Path(root)
        self.uncertain, self.blank, self.labeler = uncertain, blank, labeler

        meta_path = _find(self.root, "metadata")
        md = read_csv(meta_path, required=META_COLUMNS, what="MIMIC-CXR-JPG metadata file")
        for k in ("dicom_id", "subject_id", "study_id"):
            md = self._screen(md, md[k].isna().to_numpy(), f"{k} missing", file=meta_path, field=k,
                              expected="a value in every row")
        md = self._screen(md, md["dicom_id"].duplicated().to_numpy(), "duplicate image id", file=meta_path,
                          field="dicom_id", expected="each image listed once")
        sid = pd.to_numeric(md["subject_id"], errors="coerce")
        stid = pd.to_numeric(md["study_id"], errors="coerce")
        md = self._screen(md, (sid.isna() | stid.isna()).to_numpy(), "subject_id or study_id not a number",
                          file=meta_path, field="subject_id", expected="integer ids as in the release")
        md["image_id"] = md["dicom_id"].astype("string")
        md["patient_id"] = pd.to_numeric(md["subject_id"]).astype("int64").astype("string")
        md["study_id"] = pd.to_numeric(md["study_id"]).astype("int64").astype("string")
        md["view"] = md["ViewPosition"].astype("string")
        if views is not None:
            keep = md["view"].isin(list(views)).fillna(False).to_numpy(dtype=bool)
            if (~keep).any():
                self.exclude(f"view not in {tuple(views)}", int((~keep).sum()))
                md = md.loc[keep]
        # files/p10/p10000032/s50414267/<dicom_id>.jpg, built as whole-column string ops.
        md["path"] = (str(self.root / "files") + os.sep + "p" + md["patient_id"].str.slice(0, 2) + os.sep + "p"
                      + md["patient_id"] + os.sep + "s" + md["study_id"] + os.sep + md["image_id"] + ".jpg")
        if check_files:
            md = self._screen(md, ~existing_files(md["path"]), "image file missing", file=meta_path, field="dicom_id",
                              show="path", expected="the JPEG at files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg",
                              fix="Finish the download (wget -r -N -c -np ...).")
        md = self._attach_labels(md, _find(self.root, labeler))
        md = self._attach_split(md)
        md["width"] = pd.to_numeric(md["Columns"], errors="coerce") if "Columns" in md.columns else np.nan
        md["height"] = pd.to_numeric(md["Rows"], errors="coerce") if "Rows" in md.columns else np.nan
        self.metadata = md[[*METADATA_COLUMNS, *self.label_columns, "split", "width", "height"]].reset_index(drop=True)
        self.boxes = None  # MIMIC-CXR-JPG has no boxes

    def _attach_labels(self, md: pd.DataFrame, path: Path) -> pd.DataFrame:
        lab = read_csv(path, required=LABEL_KEYS, what=f"MIMIC-CXR-JPG {self.labeler} label file")
        self.label_columns = [c for c in lab.columns if c not in (*LABEL_KEYS, "_line")]
        if not self.label_columns:
            raise CohortError(f"{path}, line 1: no label columns after subject_id, study_id. Use the provider's file.")
        lab = self._screen(lab, lab["study_id"].duplicated().to_numpy(), "duplicate study in the label file",
                           file=path, field="study_id", expected="one row per study", item="label row")
        coded, blanks, bad_any = {}, {}, np.zeros(len(lab), dtype=bool)
        for col in self.label_columns:
            num, bad = coerce_labels(lab[col], allowed=(1.0, 0.0, -1.0))
            if self.on_error == "raise":  # raises naming the first bad cell
                self._screen(lab, bad.to_numpy(), "unknown label value", file=path, field=col,
                             expected="1, 0, -1 (uncertain) or blank")
            bad_any |= bad.to_numpy()
            # Blank (or bad: those rows go below) before -1 is mapped, so an uncertain cell
            # that "ignore" turns into NaN is never taken for a blank.
            blanks[col] = num.isna().to_numpy()
            coded[col] = num.mask(num == -1.0, UNCERTAIN[self.uncertain])
        healthy = (coded[NO_FINDING] == 1.0).to_numpy() if NO_FINDING in coded else np.zeros(len(lab), dtype=bool)
        for col in self.label_columns:
            fill = np.where(healthy & (col != NO_FINDING), 0.0, BLANK[self.blank])
            lab[col] = coded[col].mask(blanks[col], pd.Series(fill, index=lab.index))
        lab["study_id"] = pd.to_numeric(lab["study_id"], errors="coerce").astype("Int64").astype("string")
        # A study with a bad label cell has no trustworthy labels: its images go, counted as images.
        bad_studies = lab.loc[bad_any, "study_id"]
        drop = isin(md["study_id"], bad_studies)
        if drop.any():
            self.exclude("unknown label value", int(drop.sum()))
            md = md.loc[~drop]
        return md.merge(lab.loc[~bad_any, ["study_id", *self.label_columns]], on="study_id", how="left",
                        validate="many_to_one")

    def _attach_split(self, md: pd.DataFrame) -> pd.DataFrame:
        try:
            path = _find(self.root, "split")
        except CohortError:
            md["split"] = pd.Series(pd.NA, index=md.index, dtype="string")
            return md
        sp = read_csv(path, required=("dicom_id", "split"), what="MIMIC-CXR-JPG split file")
        sp = sp.drop_duplicates("dicom_id").astype({"dicom_id": "string", "split": "string"})
        return md.merge(sp[["dicom_id", "split"]].rename(columns={"dicom_id": "image_id"}), on="image_id", how="left")
