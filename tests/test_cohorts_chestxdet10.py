"""ChestX-Det10: fixtures in the official json layout; strata within class."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cxrcore.cohorts.base import BOX_COLUMNS, METADATA_COLUMNS, CohortError, assign_strata, make_boxes
from cxrcore.cohorts.chestxdet10 import ChestXDet10
from fixtures_cohorts import CXD_TEST, CXD_TRAIN, make_chestxdet10


def test_layout_labels_and_boxes(tmp_path):
    c = ChestXDet10(make_chestxdet10(tmp_path / "cxd"))
    md, b = c.metadata, c.boxes
    assert list(md.columns[:5]) == list(METADATA_COLUMNS) and c.label_columns == ["Calcification", "Nodule", "Mass"]
    assert len(md) == 5 and list(md["split"]) == ["train"] * 3 + ["test"] * 2
    assert md.set_index("image_id").loc["36201.png", ["Calcification", "Nodule", "Mass"]].tolist() == [0, 1, 1]
    assert (md.set_index("image_id").loc["36200.png", c.label_columns] == 0).all()
    assert list(b.columns) == list(BOX_COLUMNS)
    assert set(b["class"]) == {"Calcification", "Nodule", "Mass"}  # Effusion box left out: not studied
    assert len(b) == 7
    assert b.iloc[0][["x1", "y1", "x2", "y2", "width", "height", "area"]].tolist() == [10, 10, 20, 22, 10, 12, 120]
    assert c.read_image(0).shape == (64, 64)
    assert len(c.exclusions) == 0


def test_median_strata_within_class(tmp_path):
    b = ChestXDet10(make_chestxdet10(tmp_path / "cxd"), check_files=False).boxes
    assert set(b["stratum"]) <= {"small", "large"}
    for cls, g in b.groupby("class"):
        med = g["area"].median()
        assert (g["stratum"] == np.where(g["area"] <= med, "small", "large")).all(), cls
    # Calcification areas 120, 4, 400 -> median 120 -> small, small, large
    cal = b[b["class"] == "Calcification"].sort_values("area")
    assert list(cal["stratum"]) == ["small", "small", "large"]


def test_other_strata_rules(tmp_path):
    root = make_chestxdet10(tmp_path / "cxd", write_images=False)
    fixed = ChestXDet10(root, stratify=100.0, check_files=False).boxes
    assert (fixed["stratum"] == np.where(fixed["area"] <= 100, "small", "large")).all()
    q = ChestXDet10(root, stratify="quantile:0.1", check_files=False).boxes
    assert (q.groupby("class")["stratum"].apply(lambda s: (s == "small").sum()) == 1).all()
    per = ChestXDet10(root, stratify={"Calcification": 1e9, "Nodule": 0, "Mass": 0}, check_files=False).boxes
    assert set(per.loc[per["class"] == "Calcification", "stratum"]) == {"small"}
    assert set(per.loc[per["class"] != "Calcification", "stratum"]) == {"large"}
    with pytest.raises(ValueError, match="stratify"):
        ChestXDet10(root, stratify="mean", check_files=False)


def test_assign_strata_exact_values():
    b = make_boxes(["a"] * 4, ["Nodule"] * 4, [0, 0, 0, 0], [0, 0, 0, 0], [1, 2, 3, 4], [1, 1, 1, 1])
    assert list(assign_strata(b)) == ["small", "small", "large", "large"]


def test_splits_and_classes_params(tmp_path):
    root = make_chestxdet10(tmp_path / "cxd", write_images=False)
    c = ChestXDet10(root, splits=("test",), classes=("Calcification",), check_files=False)
    assert len(c) == 2 and c.label_columns == ["Calcification"] and len(c.boxes) == 2
    with pytest.raises(ValueError, match="Cancer"):
        ChestXDet10(root, classes=("Cancer",))


# -- bad inputs ----------------------------------------------------------------------------
def _with(train_entry):
    return [*CXD_TRAIN, train_entry]


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ({"file_name": "9.png", "syms": ["Nodule"], "boxes": [[10, 10, 10, 20]]}, "empty box"),
        ({"file_name": "9.png", "syms": ["Nodule"], "boxes": [[30, 10, 20, 20]]}, "inverted box"),
        ({"file_name": "9.png", "syms": ["Nodule"], "boxes": [[-1, 10, 20, 20]]}, "box outside the image"),
        ({"file_name": "9.png", "syms": ["Nodule"], "boxes": [[1, 1, 2]]}, r"box is not \[x1, y1, x2, y2\]"),
        ({"file_name": "9.png", "syms": ["Tumour"], "boxes": [[1, 1, 5, 5]]}, "unknown box class"),
        ({"file_name": "9.png", "syms": ["Nodule", "Mass"], "boxes": [[1, 1, 5, 5]]}, "syms and boxes differ"),
    ],
)
def test_bad_entry(tmp_path, entry, reason):
    root = make_chestxdet10(tmp_path / "cxd", train=_with(entry), write_images=False)
    with pytest.raises(CohortError, match=reason):
        ChestXDet10(root, check_files=False)
    c = ChestXDet10(root, check_files=False, on_error="exclude")
    assert c.exclusions["count"].sum() == 1
    assert len(c.boxes) == 7


def test_box_outside_image_screened_when_built(tmp_path):
    # The json gives no size: it is read from each image header when the cohort is built,
    # so the out-of-image box is raised or counted before any image is read.
    root = make_chestxdet10(tmp_path / "cxd", train=_with({"file_name": "9.png", "syms": ["Mass"], "boxes": [[10, 10, 80, 30]]}))
    with pytest.raises(CohortError, match=r"train.json \(entry numbers are 0-based\), line 3, field 'boxes\[2\]': "
                                          r"box outside the image \(value 80.0\); expected x2 <= the image width read"):
        ChestXDet10(root)
    c = ChestXDet10(root, on_error="exclude")
    assert (c.metadata[["width", "height"]] == 64).all().all()
    assert "9.png" not in set(c.boxes["image_id"]) and len(c.boxes) == 7
    assert c.exclusions.to_dict("records") == [{"reason": "box outside the image", "count": 1, "item": "box"}]


def test_read_only_raises_and_never_changes_the_cohort(tmp_path):
    # Without sizes (check_files=False) the box can only be caught on read; reading may run
    # in a DataLoader worker, whose state is lost, so it raises and drops nothing.
    root = make_chestxdet10(tmp_path / "cxd", train=_with({"file_name": "9.png", "syms": ["Mass"], "boxes": [[10, 10, 80, 30]]}))
    c = ChestXDet10(root, check_files=False, on_error="exclude")
    assert c.metadata["width"].isna().all()
    i = int(np.flatnonzero(c.metadata["image_id"] == "9.png")[0])
    before = c.boxes.copy()
    with pytest.raises(CohortError, match=r"9.png: box .* exceeds the image's 64x64 px.*check_files=True"):
        c.read_image(i)
    pd.testing.assert_frame_equal(c.boxes, before)
    assert len(c.exclusions) == 0


def test_unreadable_image_header_counted_when_built(tmp_path):
    root = make_chestxdet10(tmp_path / "cxd")
    (root / "train" / "36199.png").write_bytes(b"not a png")
    with pytest.raises(CohortError, match=r"train.json.*line 0, field 'file_name': image file unreadable.*36199.png"):
        ChestXDet10(root)
    c = ChestXDet10(root, on_error="exclude")
    assert "36199.png" not in set(c.metadata["image_id"]) and len(c) == 4
    ex = c.exclusions.set_index("reason")["count"]
    assert ex["image file unreadable (corrupt, truncated or unsupported)"] == 1
    assert ex["box of an excluded image"] == 2 and len(c.boxes) == 5


def test_header_read_of_a_missing_image_is_counted(tmp_path, monkeypatch):
    # A file listed in the folder but gone when its header is read (a race, or a broken
    # link) is an exclusion counted when the cohort is built.
    root = make_chestxdet10(tmp_path / "cxd")
    (root / "test" / "50002.png").unlink()
    (root / "test" / "50002.png").symlink_to(root / "test" / "nowhere.png")
    with pytest.raises(CohortError, match=r"test.json.*field 'file_name': image file missing"):
        ChestXDet10(root)
    c = ChestXDet10(root, on_error="exclude")
    ex = c.exclusions.set_index("reason")["count"]
    assert ex["image file missing"] == 1 and ex["box of an excluded image"] == 1 and len(c) == 4


def test_missing_image_and_json(tmp_path):
    root = make_chestxdet10(tmp_path / "cxd")
    (root / "test" / "50002.png").unlink()
    with pytest.raises(CohortError, match=r"test.json.*entry numbers are 0-based.*line 1, field 'file_name': image file missing"):
        ChestXDet10(root)
    c = ChestXDet10(root, on_error="exclude")
    ex = c.exclusions.set_index("reason")["count"]
    assert ex["image file missing"] == 1 and ex["box of an excluded image"] == 1
    (root / "train.json").unlink()
    with pytest.raises(CohortError, match="train.json: not found"):
        ChestXDet10(root)


def test_corrupt_json(tmp_path):
    root = make_chestxdet10(tmp_path / "cxd", write_images=False)
    (root / "test.json").write_text('[{"file_name": "1.png", ')
    with pytest.raises(CohortError, match="not valid JSON"):
        ChestXDet10(root, check_files=False)
    (root / "test.json").write_text(json.dumps([{"file_name": "1.png", "boxes": []}]))
    with pytest.raises(CohortError, match="field 'syms': missing"):
        ChestXDet10(root, check_files=False)


def test_median_rule_splits_ties_at_the_median_into_halves():
    import pandas as pd

    from cxrcore.cohorts.base import assign_strata

    boxes = pd.DataFrame({"class": ["Calcification"] * 6 + ["Nodule"] * 5,
                          "area": [49, 49, 49, 49, 49, 81, 1, 2, 3, 4, 5]})
    got = assign_strata(boxes).tolist()
    # integer areas tie: "area <= median" alone would put 5 of 6 calcifications in "small"
    assert got[:6].count("small") == 3 and got[:6].count("large") == 3
    assert got[5] == "large"  # the largest box is never small
    assert got[6:] == ["small", "small", "small", "large", "large"]  # continuous areas: the plain median split
