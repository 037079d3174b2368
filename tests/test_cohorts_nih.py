"""NIH ChestX-ray14: the real metadata from the torchxrayvision wheel, and fixtures in NIH's layout."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxrcore.cohorts.base import BOX_COLUMNS, METADATA_COLUMNS, CohortError
from cxrcore.cohorts.nih import NIH_LABELS, NIHChestXray14
from fixtures_cohorts import NIH_BBOX_ROWS, NIH_ROWS, make_nih, txv_data_dir


@pytest.fixture(scope="module")
def real():
    return NIHChestXray14(txv_data_dir(), check_files=False)


def test_real_metadata_counts(real):
    md = real.metadata
    assert len(md) == 112_120
    assert md["patient_id"].nunique() == 30_805
    assert list(md.columns[: len(METADATA_COLUMNS)]) == list(METADATA_COLUMNS)
    assert list(md.columns[5 : 5 + 14]) == list(NIH_LABELS) == real.label_columns
    assert set(md["view"]) == {"PA", "AP"}
    # Published per-finding counts (Wang et al. 2017, v2020 file).
    assert md["Hernia"].sum() == 227 and md["Infiltration"].sum() == 19_894
    assert md[real.label_columns].isin([0.0, 1.0]).all().all()
    assert len(real.exclusions) == 0


def test_real_boxes(real):
    b = real.boxes
    assert len(b) == 984 and list(b.columns) == list(BOX_COLUMNS)
    assert b["image_id"].nunique() == 880
    assert set(b["class"]) == {"Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
                               "Pneumonia", "Pneumothorax"}
    assert set(b["stratum"]) == {"small", "large"}
    assert (b["x2"] <= 1024).all() and (b["y2"] <= 1024).all() and (b["area"] > 0).all()
    for _, g in b.groupby("class"):
        assert (g.loc[g["stratum"] == "small", "area"] <= g["area"].median()).all()


def test_fixture_layout_and_labels(tmp_path):
    c = NIHChestXray14(make_nih(tmp_path / "nih"))
    md = c.metadata
    assert list(md["image_id"]) == [r.split(",")[0] for r in NIH_ROWS]
    assert list(md["patient_id"]) == ["00000001", "00000001", "00000002", "00000003", "00000004"]
    assert md.loc[1, "study_id"] == "00000001_001"
    assert md.loc[1, ["Cardiomegaly", "Emphysema", "Mass"]].tolist() == [1.0, 1.0, 0.0]
    assert (md.loc[2, c.label_columns] == 0).all()  # No Finding
    assert list(md["split"]) == ["train_val"] * 4 + ["test"]
    assert md.loc[0, "original_width"] == 2682 and md.loc[0, "width"] == 1024
    img = c.read_image(0)
    assert img.shape == (1024, 1024) and img.dtype == np.float32


def test_twelve_folder_layout(tmp_path):
    c = NIHChestXray14(make_nih(tmp_path / "nih", split_folders=True, image_px=16, bbox_rows=False))
    assert c.metadata["path"].str.contains("images_00[12]/images").all()
    assert c.read_image(3).shape == (16, 16)
    assert c.boxes is None


def test_boxes_from_xywh(tmp_path):
    c = NIHChestXray14(make_nih(tmp_path / "nih", write_images=False), check_files=False)
    b = c.boxes
    assert b.loc[0, ["x1", "y1", "x2", "y2"]].tolist() == [10.5, 20.25, 40.5, 60.25]
    assert b.loc[0, ["width", "height", "area"]].tolist() == [30, 40, 1200]
    # Within class: Nodule areas 1200 and 500 -> median 850.
    assert dict(zip(b["class"] + b["image_id"], b["stratum"])) == {
        "Nodule00000003_000.png": "large", "Mass00000004_000.png": "small", "Nodule00000004_000.png": "small"}


def test_views_filter_counts_exclusion(tmp_path):
    c = NIHChestXray14(make_nih(tmp_path / "nih", write_images=False), check_files=False, views=("PA",))
    assert set(c.metadata["view"]) == {"PA"}
    ex = c.exclusions.set_index("reason")["count"]
    assert ex["view not in ('PA',)"] == 2
    assert ex["box of an excluded image"] == 3 and len(c.boxes) == 0


# -- bad inputs: one test per kind ------------------------------------------------------------
def test_missing_data_entry(tmp_path):
    with pytest.raises(CohortError, match="Data_Entry_2017"):
        NIHChestXray14(tmp_path)


def test_missing_column(tmp_path):
    root = make_nih(tmp_path / "nih", write_images=False)
    p = root / "Data_Entry_2017_v2020.csv"
    p.write_text(p.read_text().replace("View Position", "View"))
    with pytest.raises(CohortError, match=r"Data_Entry_2017_v2020.csv, line 1, field 'View Position'.*missing"):
        NIHChestXray14(root, check_files=False)


def test_unknown_label_value(tmp_path):
    rows = NIH_ROWS[:2] + [NIH_ROWS[2].replace("No Finding", "Pneumonitis")] + NIH_ROWS[3:]
    root = make_nih(tmp_path / "nih", rows=rows, write_images=False)
    with pytest.raises(CohortError, match=r"line 4, field 'Finding Labels': unknown label value.*Pneumonitis"):
        NIHChestXray14(root, check_files=False)
    c = NIHChestXray14(root, check_files=False, on_error="exclude")
    assert len(c) == 4 and c.exclusions.set_index("reason")["count"]["unknown label value"] == 1


def test_missing_image_file(tmp_path):
    root = make_nih(tmp_path / "nih", image_px=8, bbox_rows=[])
    (root / "images" / "00000002_000.png").unlink()
    with pytest.raises(CohortError, match=r"line 4, field 'Image Index': image file missing.*00000002_000.png"):
        NIHChestXray14(root)
    c = NIHChestXray14(root, on_error="exclude")
    assert "00000002_000.png" not in set(c.metadata["image_id"]) and len(c) == 4
    assert c.exclusions.to_dict("records") == [{"reason": "image file missing", "count": 1, "item": "image"}]


@pytest.mark.parametrize(
    ("row", "reason", "field"),
    [
        ("00000003_000.png,Nodule,1000,20,30,40", "box outside the image", "w"),
        ("00000003_000.png,Nodule,-3,20,30,40", "box outside the image", "Bbox [x"),
        ("00000003_000.png,Nodule,10,20,0,40", "empty box", "w"),
        ("00000003_000.png,Nodule,10,20,30,-4", "inverted box", "h]"),
        ("00000003_000.png,Nodule,10,abc,30,40", "box coordinate not a number", "y"),
        ("99999999_000.png,Nodule,10,20,30,40", "box for an image not in the metadata", "Image Index"),
        ("00000003_000.png,Bump,10,20,30,40", "unknown box class", "Finding Label"),
    ],
)
def test_bad_box(tmp_path, row, reason, field):
    root = make_nih(tmp_path / "nih", bbox_rows=[NIH_BBOX_ROWS[1], row], write_images=False)
    with pytest.raises(CohortError, match=rf"BBox_List_2017.csv, line 3, field '{__import__('re').escape(field)}': {reason}"):
        NIHChestXray14(root, check_files=False)
    c = NIHChestXray14(root, check_files=False, on_error="exclude")
    assert len(c.boxes) == 1
    ex = c.exclusions
    assert ex.loc[ex["reason"].str.startswith(reason.split(" (")[0]), "count"].sum() == 1
    assert set(ex["item"]) == {"box"}


def test_image_size_differs_from_metadata_on_read(tmp_path):
    # A resized NIH copy: the 1024-px boxes no longer fit it.
    root = make_nih(tmp_path / "nih", image_px=512)
    c = NIHChestXray14(root)
    assert c.read_image(0).shape == (512, 512)  # no boxes on this image: fine
    with pytest.raises(CohortError, match="512x512 px but the metadata says 1024x1024"):
        c.read_image(3)
    # Reading only raises, whatever on_error is (a DataLoader worker's changes are lost);
    # check_images() reads the headers when the cohort is built and drops and counts the boxes.
    c = NIHChestXray14(root, on_error="exclude")
    n_boxes = len(c.boxes)
    with pytest.raises(CohortError, match="512x512 px but the metadata says 1024x1024"):
        c.read_image(3)
    assert len(c.boxes) == n_boxes and len(c.exclusions) == 0
    c.check_images()
    assert len(c.boxes) == 0 and len(c) == 5
    assert c.exclusions.to_dict("records") == [
        {"reason": "image size differs from the metadata", "count": n_boxes, "item": "box"}]
    with pytest.raises(CohortError, match=r"boxes, line 0, field 'image_id': image size differs from the metadata"):
        NIHChestXray14(root).check_images()


def test_check_images_counts_corrupt(tmp_path):
    root = make_nih(tmp_path / "nih", image_px=8, bbox_rows=[])
    (root / "images" / "00000001_001.png").write_bytes(b"not a png")
    c = NIHChestXray14(root, on_error="exclude").check_images()
    assert len(c) == 4
    assert c.exclusions["reason"].str.contains("unreadable").any()
    with pytest.raises(Exception, match="00000001_001.png"):
        NIHChestXray14(root).check_images()
