"""Time the metadata load of a synthetic 500,000-row NIH-style and MIMIC-style cohort.

Writes the CSVs in each provider's exact header to a temporary folder (no images; the
file check is off, as it only lists folders), loads them through the cohort classes and
prints the seconds. Run: ``.venv/bin/python benchmarks/bench_metadata.py [rows]``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cxrcore.cohorts.mimic import MIMICCXRJPG
from cxrcore.cohorts.nih import NIH_LABELS, NIHChestXray14


def write_nih(root: Path, n: int, rng: np.random.Generator) -> None:
    patient = np.sort(rng.integers(1, n // 4, n))
    follow = pd.Series(patient).groupby(patient).cumcount().to_numpy()
    k = rng.integers(0, 4, n)
    choices = np.array(NIH_LABELS)
    labels = ["No Finding" if j == 0 else "|".join(rng.choice(choices, j, replace=False)) for j in k]
    df = pd.DataFrame({
        "Image Index": [f"{p:08d}_{f:03d}.png" for p, f in zip(patient, follow)],
        "Finding Labels": labels, "Follow-up #": follow, "Patient ID": patient,
        "Patient Age": rng.integers(1, 95, n), "Patient Gender": rng.choice(["M", "F"], n),
        "View Position": rng.choice(["PA", "AP"], n),
        "OriginalImage[Width": rng.integers(2000, 3000, n), "Height]": rng.integers(2000, 3000, n),
        "OriginalImagePixelSpacing[x": 0.143, "y]": 0.143,
    })
    df.to_csv(root / "Data_Entry_2017_v2020.csv", index=False)
    ids = df["Image Index"].sample(1000, random_state=0)
    x, y = rng.uniform(0, 500, 1000), rng.uniform(0, 500, 1000)
    pd.DataFrame({"Image Index": ids.to_numpy(), "Finding Label": rng.choice(["Mass", "Nodule"], 1000),
                  "Bbox [x": x, "y": y, "w": rng.uniform(10, 400, 1000), "h]": rng.uniform(10, 400, 1000)}
                 ).to_csv(root / "BBox_List_2017.csv", index=False)


def write_mimic(root: Path, n: int, rng: np.random.Generator) -> None:
    study = 50_000_000 + np.arange(n) // 2  # two images per study, three studies per patient
    subject = 10_000_000 + np.arange(n) // 6
    meta = pd.DataFrame({
        "dicom_id": [f"{i:08x}-bde0afdd-112c0b34-7bc16630-4e384014" for i in range(n)],
        "subject_id": subject, "study_id": study, "PerformedProcedureStepDescription": "CHEST (PA AND LAT)",
        "ViewPosition": rng.choice(["PA", "AP", "LATERAL", "LL"], n, p=[0.4, 0.3, 0.25, 0.05]),
        "Rows": 3056, "Columns": 2544, "StudyDate": 21800506, "StudyTime": 213014.531,
        "ProcedureCodeSequence_CodeMeaning": "CHEST (PA AND LAT)", "ViewCodeSequence_CodeMeaning": "postero-anterior",
        "PatientOrientationCodeSequence_CodeMeaning": "Erect",
    })
    meta.to_csv(root / "mimic-cxr-2.0.0-metadata.csv", index=False)
    studies = meta[["subject_id", "study_id"]].drop_duplicates()
    cols = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
            "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
            "Pneumothorax", "Support Devices"]
    vals = rng.choice([1.0, 0.0, -1.0, np.nan], (len(studies), len(cols)), p=[0.1, 0.1, 0.05, 0.75])
    lab = pd.concat([studies.reset_index(drop=True), pd.DataFrame(vals, columns=cols)], axis=1)
    lab.to_csv(root / "mimic-cxr-2.0.0-chexpert.csv", index=False)
    split = meta[["dicom_id", "study_id", "subject_id"]].assign(split="train")
    split.to_csv(root / "mimic-cxr-2.0.0-split.csv", index=False)


def main(n: int = 500_000) -> None:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for name, write, load in (
            ("NIH-style", write_nih, lambda r: NIHChestXray14(r, check_files=False)),
            ("MIMIC-style", write_mimic, lambda r: MIMICCXRJPG(r, check_files=False)),
        ):
            root = Path(tmp) / name
            root.mkdir()
            write(root, n, rng)
            t0 = time.perf_counter()
            c = load(root)
            dt = time.perf_counter() - t0
            nb = 0 if c.boxes is None else len(c.boxes)
            print(f"{name:12s} {n:,} rows -> {len(c):,} images, {nb} boxes: metadata loaded in {dt:.2f} s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 500_000)
