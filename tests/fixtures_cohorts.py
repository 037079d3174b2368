"""Fixture writers for the io and cohort tests: tiny images in each source's exact layout.

Plain functions (no conftest) so each test states what it builds. Nothing here reads
real patient images; every pixel is generated.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

def txv_data_dir() -> Path:
    """The torchxrayvision wheel's data folder (real NIH metadata files)."""
    import torchxrayvision

    return Path(torchxrayvision.__file__).parent / "data"


def ramp(h: int = 8, w: int = 10, maxval: int = 255, dtype=np.uint8) -> np.ndarray:
    """A deterministic ramp covering 0..maxval."""
    a = np.linspace(0, maxval, h * w).round().astype(dtype).reshape(h, w)
    return a


def write_png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def write_jpeg(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=95)
    return path


def write_dicom(
    path: Path,
    arr: np.ndarray,
    *,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    window: tuple[float, float] | None = None,
    voi_lut: tuple[int, int, np.ndarray] | None = None,
    rescale: tuple[float, float] | None = None,
    signed: bool = False,
) -> Path:
    """Write a single-frame 16-bit-allocated DICOM with pydicom (uncompressed, explicit LE)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image for Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientID = "P1"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_lut is not None:
        first, nbits, table = voi_lut
        item = Dataset()
        item.LUTDescriptor = [len(table), first, nbits]
        item.add_new(0x00283006, "US", [int(v) for v in table])  # LUTData; "US or OW" needs a VR
        ds.VOILUTSequence = [item]
    ds.PixelData = arr.astype(np.int16 if signed else np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


# -- NIH ChestX-ray14 ----------------------------------------------------------------------
NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
NIH_ROWS = [
    "00000001_000.png,Cardiomegaly,0,1,57,M,PA,2682,2749,0.143,0.143",
    "00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143",
    "00000002_000.png,No Finding,0,2,80,M,PA,2500,2048,0.171,0.171",
    "00000003_000.png,Hernia|Nodule,0,3,74,F,AP,2500,2048,0.168,0.168",
    "00000004_000.png,Mass|Nodule,0,4,82,M,AP,2048,2500,0.168,0.168",
]
NIH_BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
NIH_BBOX_ROWS = [
    "00000003_000.png,Nodule,10.5,20.25,30,40,,,",
    "00000004_000.png,Mass,100,100,400,300,,,",
    "00000004_000.png,Nodule,700,800,20,25,,,",
]


def make_nih(root: Path, *, rows=None, bbox_rows=None, split_folders: bool = False, image_px: int = 1024,
             write_images: bool = True, official_split: bool = True) -> Path:
    """NIH layout: Data_Entry_2017_v2020.csv, BBox_List_2017.csv, images/ (or images_001/images/ ...)."""
    rows = NIH_ROWS if rows is None else rows
    bbox_rows = NIH_BBOX_ROWS if bbox_rows is None else bbox_rows
    root.mkdir(parents=True, exist_ok=True)
    (root / "Data_Entry_2017_v2020.csv").write_text("\n".join([NIH_HEADER, *rows]) + "\n")
    if bbox_rows is not False:
        (root / "BBox_List_2017.csv").write_text("\n".join([NIH_BBOX_HEADER, *bbox_rows]) + "\n")
    names = [r.split(",")[0] for r in rows]
    if official_split:
        (root / "train_val_list.txt").write_text("\n".join(n for n in names if not n.startswith("00000004")) + "\n")
        (root / "test_list.txt").write_text("\n".join(n for n in names if n.startswith("00000004")) + "\n")
    if write_images:
        for k, name in enumerate(names):
            folder = root / (f"images_{k % 2 + 1:03d}/images" if split_folders else "images")
            write_png(folder / name, np.full((image_px, image_px), 40 + k, np.uint8))
    return root


# -- MIMIC-CXR-JPG ---------------------------------------------------------------------------
MIMIC_META_COLUMNS = [
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns",
    "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
]
MIMIC_LABELS = [
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion",
    "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices",
]
MIMIC_IMAGES = [  # dicom_id, subject, study, view
    ("02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", 10000032, 50414267, "PA"),
    ("174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962", 10000032, 50414267, "LATERAL"),
    ("2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab", 10000032, 53189527, "AP"),
    ("68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714", 10000764, 57375967, "AP"),
    ("fffabebf-74fd3a1f-673b6b41-96ec0ac9-2ab69818", 11000011, 51029426, "PA"),
]


def make_mimic(root: Path, *, labels: dict | None = None, images=None, write_images: bool = True,
               labeler: str = "chexpert", gz: bool = False) -> Path:
    """MIMIC-CXR-JPG 2.x layout: files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg and the four CSVs."""
    images = MIMIC_IMAGES if images is None else images
    root.mkdir(parents=True, exist_ok=True)
    meta = pd.DataFrame(
        [{"dicom_id": d, "subject_id": s, "study_id": st, "PerformedProcedureStepDescription": "CHEST (PA AND LAT)",
          "ViewPosition": v, "Rows": 12, "Columns": 10, "StudyDate": 21800506, "StudyTime": 213014.531,
          "ProcedureCodeSequence_CodeMeaning": "CHEST (PA AND LAT)", "ViewCodeSequence_CodeMeaning": "postero-anterior",
          "PatientOrientationCodeSequence_CodeMeaning": "Erect"} for d, s, st, v in images],
        columns=MIMIC_META_COLUMNS,
    )
    suffix = ".csv.gz" if gz else ".csv"
    meta.to_csv(root / f"mimic-cxr-2.0.0-metadata{suffix}", index=False)
    studies = meta[["subject_id", "study_id"]].drop_duplicates()
    lab = pd.DataFrame(np.nan, index=range(len(studies)), columns=MIMIC_LABELS)
    lab.insert(0, "study_id", studies["study_id"].to_numpy())
    lab.insert(0, "subject_id", studies["subject_id"].to_numpy())
    default = {50414267: {"Atelectasis": 1.0, "Cardiomegaly": -1.0, "No Finding": np.nan, "Edema": 0.0},
               53189527: {"No Finding": 1.0},
               57375967: {"Edema": -1.0, "Pneumonia": 1.0},
               51029426: {"Cardiomegaly": 0.0}}
    for st, vals in (default if labels is None else labels).items():
        for k, v in vals.items():
            lab.loc[lab["study_id"] == st, k] = v
    lab.to_csv(root / f"mimic-cxr-2.0.0-{labeler}{suffix}", index=False)
    split = meta[["dicom_id", "study_id", "subject_id"]].copy()
    split["split"] = np.where(split["subject_id"] == 11000011, "test", "train")
    split.to_csv(root / f"mimic-cxr-2.0.0-split{suffix}", index=False)
    if write_images:
        for d, s, st, _ in images:
            s = str(s)
            write_jpeg(root / "files" / f"p{s[:2]}" / f"p{s}" / f"s{st}" / f"{d}.jpg", ramp(12, 10))
    return root


# -- ChestX-Det10 ----------------------------------------------------------------------------
CXD_TRAIN = [
    {"file_name": "36199.png", "syms": ["Calcification", "Nodule"], "boxes": [[10, 10, 20, 22], [30, 30, 60, 60]]},
    {"file_name": "36200.png", "syms": [], "boxes": []},
    {"file_name": "36201.png", "syms": ["Mass", "Effusion", "Nodule"], "boxes": [[5, 5, 45, 45], [0, 0, 64, 64], [40, 2, 44, 6]]},
]
CXD_TEST = [
    {"file_name": "50001.png", "syms": ["Calcification", "Mass"], "boxes": [[1, 1, 3, 3], [2, 2, 12, 12]]},
    {"file_name": "50002.png", "syms": ["Calcification"], "boxes": [[20, 20, 40, 40]]},
]


def make_chestxdet10(root: Path, *, train=None, test=None, image_px: int = 64, write_images: bool = True) -> Path:
    """ChestX-Det10 layout: train.json / test.json and the images in train/ and test/."""
    root.mkdir(parents=True, exist_ok=True)
    for split, entries in (("train", CXD_TRAIN if train is None else train), ("test", CXD_TEST if test is None else test)):
        (root / f"{split}.json").write_text(json.dumps(entries))
        if write_images:
            for e in entries:
                write_png(root / split / e["file_name"], np.full((image_px, image_px), 90, np.uint8))
    return root
