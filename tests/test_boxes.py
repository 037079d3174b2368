"""Box analyses: jitter is deterministic and sigma 0 is the identity; overlap; controls avoid lesions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cxrcore.boxes import (
    as_boxes, box_area, control_boxes_frame, intersection_area, iou, jitter_boxes, jitter_frame,
    matched_control_boxes, overlap_fraction, paired_iou, still_overlapping,
)

BOXES = np.array([[10, 20, 30, 40], [100, 100, 180, 150], [0, 0, 5, 5]], float)


def test_sigma_zero_is_identity_and_seed_is_deterministic():
    assert np.array_equal(jitter_boxes(BOXES, 0.0, seed=3), BOXES)
    assert np.array_equal(jitter_boxes(BOXES, 0.0, scale_sigma=0.0, seed=3, image_hw=(200, 200)), BOXES)
    a, b = jitter_boxes(BOXES, 7.0, scale_sigma=0.2, seed=1), jitter_boxes(BOXES, 7.0, scale_sigma=0.2, seed=1)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, jitter_boxes(BOXES, 7.0, scale_sigma=0.2, seed=2))


def test_common_random_numbers_across_sigma():
    # the same seed moves each box along the same direction; sigma only sets how far
    d5 = jitter_boxes(BOXES, 5.0, seed=0) - BOXES
    d10 = jitter_boxes(BOXES, 10.0, seed=0) - BOXES
    assert np.allclose(d10, 2 * d5)


def test_jitter_keeps_size_and_scale_keeps_aspect():
    moved = jitter_boxes(BOXES, 12.0, seed=0)
    assert np.allclose(moved[:, 2] - moved[:, 0], BOXES[:, 2] - BOXES[:, 0])
    scaled = jitter_boxes(BOXES, 0.0, scale_sigma=0.3, seed=0)
    ratio = (scaled[:, 2] - scaled[:, 0]) / (BOXES[:, 2] - BOXES[:, 0])
    assert np.allclose(ratio, (scaled[:, 3] - scaled[:, 1]) / (BOXES[:, 3] - BOXES[:, 1]))
    assert np.allclose((scaled[:, :2] + scaled[:, 2:]) / 2, (BOXES[:, :2] + BOXES[:, 2:]) / 2)  # centres stay


def test_jitter_statistics_match_sigma():
    many = np.tile([[500.0, 500.0, 520.0, 520.0]], (20000, 1))
    d = jitter_boxes(many, 10.0, seed=0)[:, 0] - 500.0
    assert abs(d.mean()) < 0.3 and abs(d.std() - 10.0) < 0.3


@settings(max_examples=50, deadline=None)
@given(st.floats(0, 60), st.floats(0, 0.5), st.integers(0, 2**31 - 1))
def test_jittered_boxes_stay_inside_the_image(sigma, scale, seed):
    out = jitter_boxes(BOXES, sigma, scale_sigma=scale, seed=seed, image_hw=(200, 190))
    assert (out[:, 0] >= 0).all() and (out[:, 1] >= 0).all()
    assert (out[:, 2] <= 190 + 1e-9).all() and (out[:, 3] <= 200 + 1e-9).all()
    assert (out[:, 2] > out[:, 0]).all() and (out[:, 3] > out[:, 1]).all()


def test_overlap_and_iou_exact_values():
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], float)
    b = np.array([[5, 5, 15, 15], [10, 0, 20, 10], [0, 0, 10, 10]], float)
    assert np.allclose(paired_iou(a, b), [25 / 175, 0.0, 1.0])
    assert still_overlapping(a, b).tolist() == [True, False, True]  # touching edges do not overlap
    assert overlap_fraction(a, b) == pytest.approx(2 / 3)
    assert overlap_fraction(a, b, min_iou=0.5) == pytest.approx(1 / 3)
    assert np.allclose(np.diag(iou(a, b)), paired_iou(a, b))
    assert intersection_area(a[:1], b).tolist() == [[25, 0, 100]]
    assert box_area(b).tolist() == [100, 100, 100]
    assert np.isnan(overlap_fraction(np.zeros((0, 4)), np.zeros((0, 4))))


def test_overlap_fraction_falls_with_sigma():
    lesions = np.tile([[100.0, 100.0, 120.0, 120.0]], (4000, 1))
    fr = [overlap_fraction(jitter_boxes(lesions, s, seed=0), lesions) for s in (0, 5, 10, 20, 40)]
    assert fr[0] == 1.0 and all(x >= y for x, y in zip(fr, fr[1:])) and fr[-1] < 0.5


def test_bad_boxes_are_refused():
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        as_boxes([[1, 2, 3]])
    with pytest.raises(ValueError, match="NaN"):
        as_boxes([[1, 2, np.nan, 4]])
    with pytest.raises(ValueError, match=">= 0"):
        jitter_boxes(BOXES, -1.0)
    with pytest.raises(ValueError, match="pair them"):
        paired_iou(BOXES, BOXES[:2])


def _lungs(h=256, w=256):
    m = np.zeros((h, w), bool)
    m[40:220, 20:110] = True  # image-left lung
    m[40:220, 146:236] = True  # image-right lung
    return m


def test_control_boxes_same_size_inside_lung_and_off_lesions():
    lung = _lungs()
    lesions = np.array([[30, 60, 60, 90], [70, 150, 100, 200], [160, 100, 170, 110]], float)
    ctrl = matched_control_boxes(lesions, lung.shape, lung_mask=lung, gap_px=4, seed=0)
    assert np.isfinite(ctrl).all()
    assert np.allclose(ctrl[:, 2] - ctrl[:, 0], lesions[:, 2] - lesions[:, 0])
    assert np.allclose(ctrl[:, 3] - ctrl[:, 1], lesions[:, 3] - lesions[:, 1])
    grown = lesions + np.array([-4, -4, 4, 4])
    assert intersection_area(ctrl, grown).max() == 0
    assert intersection_area(ctrl, ctrl)[~np.eye(3, dtype=bool)].max() == 0  # controls do not overlap each other
    for x1, y1, x2, y2 in ctrl.astype(int):
        assert lung[y1:y2, x1:x2].mean() >= 0.9
    # the first lesion's mirror (same height, other lung) is free, so it is the control
    assert ctrl[0].tolist() == [256 - 60, 60, 256 - 30, 90]


def test_control_boxes_respect_every_finding_and_give_nan_when_impossible():
    lung = _lungs()
    lesion = np.array([[30, 60, 60, 90]], float)
    other = np.array([[150, 40, 240, 220]], float)  # a big finding covering the mirror lung
    ctrl = matched_control_boxes(lesion, lung.shape, avoid=np.vstack([lesion, other]), lung_mask=lung, seed=1)
    assert intersection_area(ctrl, other).max() == 0 and ctrl[0, 2] <= 110
    huge = np.array([[20, 40, 110, 220]], float)  # the whole left lung: nowhere else fits
    assert np.isnan(matched_control_boxes(huge, lung.shape, avoid=np.vstack([huge, other]), lung_mask=lung)).all()
    with pytest.raises(ValueError, match="mask"):
        matched_control_boxes(lesion, (128, 128), lung_mask=lung)


def test_control_boxes_deterministic():
    lung = _lungs()
    lesions = np.array([[30, 60, 60, 90], [180, 60, 200, 80]], float)
    a = matched_control_boxes(lesions, lung.shape, lung_mask=lung, seed=5, mirror_first=False)
    b = matched_control_boxes(lesions, lung.shape, lung_mask=lung, seed=5, mirror_first=False)
    assert np.array_equal(a, b)


def test_frame_helpers():
    lung = _lungs()
    df = pd.DataFrame({"image_id": ["a", "a", "b"], "class": ["Nodule", "Mass", "Nodule"],
                       "x1": [30, 160, 40], "y1": [60, 100, 60], "x2": [60, 200, 50], "y2": [90, 150, 70]})
    ctrl = control_boxes_frame(df, lambda i: (256, 256), lung_mask=lambda i: lung, gap_px=2, seed=0)
    assert list(ctrl.index) == [0, 1, 2]
    for _, r in ctrl.iterrows():
        mine = df[df["image_id"] == r["image_id"]][["x1", "y1", "x2", "y2"]].to_numpy(float)
        assert intersection_area([[r.cx1, r.cy1, r.cx2, r.cy2]], mine).max() == 0
    j0 = jitter_frame(df, 0.0, seed=0)
    assert np.array_equal(j0, df[["x1", "y1", "x2", "y2"]].to_numpy(float))
    j1, j2 = jitter_frame(df, 8.0, seed=0), jitter_frame(df.iloc[::-1], 8.0, seed=0)[::-1]
    # image b's jitter does not depend on image a being there or on the frame's order of images
    assert np.array_equal(j1[2], jitter_frame(df.iloc[2:], 8.0, seed=0)[0])
    assert np.allclose(j1[2], j2[2])


def test_chestxdet10_controls_on_the_synthetic_release(tmp_path):
    from cxrcore.boxes import chestxdet10_controls
    from cxrcore.cohorts.synthetic_lesions import open_chestxdet10

    data = open_chestxdet10("", generated_root=tmp_path / "det", n_images=24, seed=3, image_size=256)
    pairs, hw_of, used_masks = chestxdet10_controls(data, gap_px=2, seed=0)
    assert used_masks  # the synthetic release writes lung masks
    assert set(hw_of) == set(data.metadata["image_id"]) and all(hw == (256, 256) for hw in hw_of.values())
    assert len(pairs) > 0 and set(pairs.index) <= set(data.boxes.index)
    order = {i: k for k, i in enumerate(data.metadata["image_id"])}
    ranks = pairs["image_id"].map(order).to_numpy()
    assert (np.diff(ranks) >= 0).all(), "pairs come back in metadata order"
    same = (pairs[["x2", "y2"]].to_numpy() - pairs[["x1", "y1"]].to_numpy()
            == pairs[["cx2", "cy2"]].to_numpy() - pairs[["cx1", "cy1"]].to_numpy())
    assert same.all(), "a control has its lesion's size"
    for _, r in pairs.iterrows():
        lesions = data.boxes.loc[data.boxes["image_id"] == r["image_id"], ["x1", "y1", "x2", "y2"]].to_numpy(float)
        ix = np.minimum(r.cx2, lesions[:, 2]) - np.maximum(r.cx1, lesions[:, 0])
        iy = np.minimum(r.cy2, lesions[:, 3]) - np.maximum(r.cy1, lesions[:, 1])
        assert not ((ix > 0) & (iy > 0)).any(), "a control never overlaps a lesion of its image"


@pytest.fixture(scope="module")
def synthetic_release(tmp_path_factory):
    from cxrcore.cohorts.synthetic_lesions import open_chestxdet10

    return open_chestxdet10("", generated_root=tmp_path_factory.mktemp("decoys") / "det", n_images=24, seed=3,
                            image_size=256)


def test_decoys_one_per_lesion_free_image_and_class_with_a_lesion_size_of_that_class(synthetic_release):
    from PIL import Image

    from cxrcore.boxes import decoy_boxes

    data = synthetic_release
    md, classes = data.metadata, list(data.label_columns)
    gap = 16.0  # the notebook's control_gap_px
    decoys, n_without = decoy_boxes(data, gap_px=gap, seed=0)
    assert len(decoys) > 0 and 0 <= n_without
    assert len(decoys) + n_without == sum(int((md[c] == 0).sum()) for c in classes)
    assert not decoys.duplicated(["image_id", "class"]).any(), "at most one decoy per (image, class)"
    for c in classes:
        negatives = set(md.loc[md[c] == 0, "image_id"])
        assert set(decoys.loc[decoys["class"] == c, "image_id"]) <= negatives, f"a {c} decoy on an image with a {c}"
    donor = data.boxes.loc[decoys["donor"]]
    assert (donor["class"].to_numpy() == decoys["class"].to_numpy()).all(), "the size comes from a box of the class"
    size = decoys[["cx2", "cy2"]].to_numpy() - decoys[["cx1", "cy1"]].to_numpy()
    np.testing.assert_array_equal(size, donor[["x2", "y2"]].to_numpy() - donor[["x1", "y1"]].to_numpy())
    np.testing.assert_array_equal(decoys[["x1", "y1", "x2", "y2"]].to_numpy(), donor[["x1", "y1", "x2", "y2"]].to_numpy())
    split_of = md.set_index("image_id")["split"]
    for image_id, g in decoys.groupby("image_id"):
        placed = g[["cx1", "cy1", "cx2", "cy2"]].to_numpy(float)
        findings = data.boxes.loc[data.boxes["image_id"] == image_id, ["x1", "y1", "x2", "y2"]].to_numpy(float)
        grown = findings + np.array([-gap, -gap, gap, gap])  # gap_px clear of every finding
        assert intersection_area(placed, grown).max(initial=0) == 0, f"a decoy of {image_id} touches a finding"
        inter = intersection_area(placed, placed)
        assert (inter[~np.eye(len(placed), dtype=bool)] == 0).all(), f"two decoys of {image_id} overlap"
        lung = np.asarray(Image.open(data.root / "lung_masks" / split_of[image_id] / image_id)) > 0
        for x1, y1, x2, y2 in placed.astype(int):
            assert lung[y1:y2, x1:x2].mean() >= 0.9, f"a decoy of {image_id} is outside the lung field"
    ranks = decoys["image_id"].map({i: k for k, i in enumerate(md["image_id"])}).to_numpy()
    assert (np.diff(ranks) >= 0).all(), "decoys come back in metadata order"
    again, _ = decoy_boxes(data, gap_px=gap, seed=0)
    pd.testing.assert_frame_equal(again, decoys)
    other, _ = decoy_boxes(data, gap_px=gap, seed=1)
    assert not other[["cx1", "cy1"]].equals(decoys[["cx1", "cy1"]])


def test_decoys_that_do_not_fit_are_counted(synthetic_release):
    import copy

    from cxrcore.boxes import decoy_boxes

    data = synthetic_release
    md = data.metadata
    wanted = sum(int((md[c] == 0).sum()) for c in data.label_columns)
    no_mass = copy.copy(data)
    no_mass.boxes = data.boxes[data.boxes["class"] != "Mass"]  # Mass has no size to lend
    decoys, n_without = decoy_boxes(no_mass, gap_px=2, seed=0)
    assert "Mass" not in set(decoys["class"]) and n_without >= int((md["Mass"] == 0).sum())
    assert len(decoys) + n_without == wanted
    # a decoy as large as the image fits nowhere in the lung field: every (image, class) pair is counted
    huge = copy.copy(data)
    huge.boxes = data.boxes.assign(x1=0.0, y1=0.0, x2=256.0, y2=256.0)
    decoys, n_without = decoy_boxes(huge, gap_px=0, seed=0)
    assert len(decoys) == 0 and n_without == wanted
