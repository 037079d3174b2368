"""Pooling is a pure function of the token grid and the geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxrcore.geometry import make_geometry
from cxrcore.pooling import POOLING_MODES, patch_mean, roi_local


def _grid(b=2, h=4, w=4, d=3):
    # token value = its flat cell index (and a per-image offset), so every pooled value is checkable by hand
    g = torch.arange(h * w, dtype=torch.float32).view(1, h, w, 1).expand(b, h, w, d).clone()
    g += 100 * torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1)
    return g


def test_pooling_names_are_the_papers():
    assert POOLING_MODES == ("cls", "patch_mean", "roi_local")


def test_patch_mean_is_the_mean_of_all_cells():
    g = _grid()
    np.testing.assert_allclose(patch_mean(g).numpy(), [[7.5] * 3, [107.5] * 3])


def test_roi_local_of_one_cell_and_of_the_whole_input():
    geo = make_geometry((64, 64), 64, 16, "pad_square")
    g = _grid()
    roi, owner = roi_local(g, [geo, geo], [[(16, 32, 32, 48)], [(0, 0, 64, 64), (1, 1, 2, 2)]])
    np.testing.assert_allclose(roi[:, 0], [9.0, 107.5, 100.0])  # row 2 col 1 = cell 9; whole = mean; corner cell
    assert owner.tolist() == [0, 1, 1]
    np.testing.assert_allclose(roi[1], patch_mean(g)[1].numpy())


def test_roi_local_follows_the_geometry():
    # a 32x64 image padded to a square: its top half of the input is padding, boxes land in rows 1..2
    geo = make_geometry((32, 64), 64, 16, "pad_square")
    roi, _ = roi_local(_grid(b=1), [geo], [[(0, 0, 16, 16)]])
    assert roi[0, 0] == 4.0  # original (0..16, 0..16) -> input rows 16..32 -> cell (1, 0)


def test_no_boxes_gives_empty_arrays_of_the_right_width():
    geo = make_geometry((64, 64), 64, 16, "pad_square")
    roi, owner = roi_local(_grid(), [geo, geo], None)
    assert roi.shape == (0, 3) and owner.shape == (0,)
    roi, owner = roi_local(_grid(), [geo, geo], [[], []])
    assert roi.shape == (0, 3) and owner.shape == (0,)


@pytest.mark.parametrize("boxes, match", [
    ([[(0, 0, 10, 10)]], "one \\(possibly empty\\) list of boxes per image"),
    ([[(10, 10, 5, 20)], []], "empty or inverted"),
    ([[(0, 0, 10)], []], "must be \\(x1, y1, x2, y2\\)"),
])
def test_bad_boxes_say_what_is_wrong(boxes, match):
    geo = make_geometry((64, 64), 64, 16, "pad_square")
    with pytest.raises(ValueError, match=match):
        roi_local(_grid(), [geo, geo], boxes)


def test_grid_and_geometry_must_agree():
    geo = make_geometry((64, 64), 32, 16, "pad_square")  # a 2x2 grid
    with pytest.raises(ValueError, match="does not match its geometry's grid"):
        roi_local(_grid(b=1), [geo], [[(0, 0, 4, 4)]])


@pytest.mark.parametrize("mode", ["resize", "center_crop"])
def test_a_box_outside_its_image_is_counted_as_a_coordinate_error_not_a_crop(mode):
    from cxrcore.pooling import exclusion_reason, outside_image_reason

    geo = make_geometry((64, 128), 64, 16, mode)  # center_crop keeps x in [32, 96)
    boxes = [[(200, 0, 230, 20),  # wholly outside the 128 x 64 image
              (120, 0, 160, 20),  # 8/40 inside the image
              (0, 0, 20, 20)]]  # inside the image; cropped away by the centre crop only
    roi, _, visible, reasons = roi_local(_grid(b=1), [geo], boxes, return_visible=True, return_reasons=True)
    out, crop = outside_image_reason(), exclusion_reason()
    assert reasons.tolist() == [out, out, crop if mode == "center_crop" else ""]
    assert out != crop and "image bounds" in out and "cropped away" in crop
    assert np.isnan(roi[:2]).all() and np.isfinite(roi[2]).all() == (mode == "resize")
    np.testing.assert_allclose(visible, [0, 0.2 if mode == "resize" else 0, 1 if mode == "resize" else 0])
