"""The preprocessing geometry is an exact affine map, and box -> cells follows it, for every family."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cxrcore.encoders import REGISTRY
from cxrcore.geometry import GEOMETRY_MODES, make_geometry

# (input size, stride, mode) of every registered family, at the published size and at another multiple
FAMILY_GEOMS = sorted({(s.input_size, s.patch_size, s.geometry) for s in REGISTRY.values()})
NON_NATIVE = [(size + 2 * stride, stride, mode) for size, stride, mode in FAMILY_GEOMS]
ALL_GEOMS = FAMILY_GEOMS + NON_NATIVE

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def geometry_cases(draw, square: bool | None = None):
    size, stride, mode = draw(st.sampled_from(ALL_GEOMS))
    if draw(st.booleans()) and square is not False:
        h = w = size  # native: the image already is the model input
    else:
        h = draw(st.integers(16, 3000))
        w = h if square else draw(st.integers(16, 3000))
    return make_geometry((h, w), size, stride, mode)


@given(geometry_cases(), st.data())
@SETTINGS
def test_box_inside_one_cell_gives_that_cell(g, data):
    gh, gw = g.grid
    r = data.draw(st.integers(0, gh - 1))
    c = data.draw(st.integers(0, gw - 1))
    s = g.stride
    # the content region of the input (padding excluded): the cell must overlap it
    lo_x, lo_y, hi_x, hi_y = g.to_input([[0, 0, g.src_hw[1], g.src_hw[0]]])[0]
    x_lo, x_hi = max(c * s, lo_x), min((c + 1) * s, hi_x)
    y_lo, y_hi = max(r * s, lo_y), min((r + 1) * s, hi_y)
    if x_hi - x_lo < 1e-3 or y_hi - y_lo < 1e-3:
        return  # the cell is pure padding: no original-pixel box lands there
    fx = sorted(data.draw(st.lists(st.floats(0, 1), min_size=2, max_size=2)))
    fy = sorted(data.draw(st.lists(st.floats(0, 1), min_size=2, max_size=2)))
    x1, x2 = x_lo + fx[0] * (x_hi - x_lo), x_lo + fx[1] * (x_hi - x_lo)
    y1, y2 = y_lo + fy[0] * (y_hi - y_lo), y_lo + fy[1] * (y_hi - y_lo)
    if x2 - x1 < 1e-3 * s or y2 - y1 < 1e-3 * s:
        return
    box = g.to_original([[x1, y1, x2, y2]])[0]
    assert g.cells(box) == (r, r + 1, c, c + 1)


@given(geometry_cases())
@SETTINGS
def test_box_covering_the_model_input_gives_every_cell(g):
    s = g.input_hw[0]
    box = g.to_original([[0, 0, s, s]])[0]
    assert g.cells(box) == (0, g.grid[0], 0, g.grid[1])
    assert g.cell_mask(box).all()


@given(geometry_cases())
@SETTINGS
def test_full_image_box_covers_all_cells_unless_padded(g):
    full = [0, 0, g.src_hw[1], g.src_hw[0]]
    r0, r1, c0, c1 = g.cells(full)
    if g.mode != "pad_square" or g.src_hw[0] == g.src_hw[1]:
        assert (r0, r1, c0, c1) == (0, g.grid[0], 0, g.grid[1])
    else:  # the padded band is not image: only the cells the content touches
        x1, y1, x2, y2 = g.to_input([full])[0]
        assert c0 == int(np.floor(x1 / g.stride + 1e-6)) and r0 == int(np.floor(y1 / g.stride + 1e-6))
        assert c1 == int(np.ceil(x2 / g.stride - 1e-6)) and r1 == int(np.ceil(y2 / g.stride - 1e-6))


@given(geometry_cases(), st.data())
@SETTINGS
def test_cells_are_exactly_those_the_box_overlaps(g, data):
    h, w = g.src_hw
    x1 = data.draw(st.floats(0, w - 1))
    y1 = data.draw(st.floats(0, h - 1))
    x2 = data.draw(st.floats(x1 + 0.5, w))
    y2 = data.draw(st.floats(y1 + 0.5, h))
    bx1, by1, bx2, by2 = g.to_input([[x1, y1, x2, y2]])[0]
    s = g.stride
    try:
        r0, r1, c0, c1 = g.cells([x1, y1, x2, y2])
    except ValueError:  # wholly cropped away: no cell overlaps with positive area
        assert bx2 <= 1e-6 * s or by2 <= 1e-6 * s or bx1 >= g.input_hw[1] - 1e-6 * s or by1 >= g.input_hw[0] - 1e-6 * s
        return
    tol = 1e-6 * s
    for c in range(g.grid[1]):
        overlaps = min(bx2, (c + 1) * s) - max(bx1, c * s) > tol
        assert overlaps == (c0 <= c < c1), (c, (bx1, bx2))
    for r in range(g.grid[0]):
        overlaps = min(by2, (r + 1) * s) - max(by1, r * s) > tol
        assert overlaps == (r0 <= r < r1), (r, (by1, by2))


@given(geometry_cases(), st.data())
@SETTINGS
def test_to_input_and_to_original_are_inverse(g, data):
    b = np.array([data.draw(st.lists(st.floats(-100, 3000), min_size=4, max_size=4))])
    np.testing.assert_allclose(g.to_original(g.to_input(b)), b, rtol=1e-9, atol=1e-6)


@pytest.mark.parametrize("mode", GEOMETRY_MODES)
@pytest.mark.parametrize("src_hw", [(300, 200), (200, 300), (250, 250)])
def test_the_map_is_the_one_the_pixels_went_through(mode, src_hw):
    """The centroid of a bright block lands where the affine map says (to a fraction of a pixel)."""
    h, w = src_hw
    img = torch.zeros(1, h, w)
    y1, y2, x1, x2 = h // 3, h // 3 + 40, w // 4, w // 4 + 30
    img[0, y1:y2, x1:x2] = 1.0
    g = make_geometry(src_hw, 112, 14, mode)
    out = g.apply(img, "bilinear")[0]
    assert tuple(out.shape) == g.input_hw
    ys, xs = torch.meshgrid(torch.arange(out.shape[0]) + 0.5, torch.arange(out.shape[1]) + 0.5, indexing="ij")
    cy, cx = float((out * ys).sum() / out.sum()), float((out * xs).sum() / out.sum())
    bx1, by1, bx2, by2 = g.to_input([[x1, y1, x2, y2]])[0]
    assert abs(cx - (bx1 + bx2) / 2) < 0.25 and abs(cy - (by1 + by2) / 2) < 0.25


def test_input_side_not_a_multiple_of_the_patch_is_an_error():
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        make_geometry((512, 512), 520, 14, "pad_square")


def test_box_outside_the_input_is_an_error_that_names_the_box():
    g = make_geometry((100, 400), 224, 16, "center_crop")  # crops the left and right ends away
    with pytest.raises(ValueError, match="no part of it is visible"):
        g.cells([0, 0, 20, 50])


@pytest.mark.parametrize("hw", [(1024, 1280), (3000, 2022), (2544, 3056), (700, 1000)])
def test_center_crop_matches_the_hf_image_processor(hw):
    # /tmp/rev/resize.py: round() gave 648 for 1024x1280 where transformers and torchvision give 647.
    from PIL import Image
    from transformers import BitImageProcessor
    from transformers.image_transforms import get_resize_output_image_size

    h, w = hw
    g = make_geometry(hw, 518, 14, "center_crop")
    assert g.resized_hw == tuple(get_resize_output_image_size(np.zeros((h, w, 3), np.uint8), size=518,
                                                                default_to_square=False))
    yy, xx = np.mgrid[0:h, 0:w]
    img = ((np.sin(xx / 37.0) * np.cos(yy / 23.0) + 1) * 127.5).astype(np.uint8)  # smooth, no symmetry
    common = dict(do_resize=True, size={"shortest_edge": 518}, resample=Image.BICUBIC, do_rescale=True,
                  rescale_factor=1 / 255, do_normalize=False, do_convert_rgb=True)
    pil = Image.fromarray(img).convert("RGB")
    resized = BitImageProcessor(**common, do_center_crop=False)(images=pil, return_tensors="pt")["pixel_values"]
    assert tuple(resized.shape[-2:]) == g.resized_hw
    ref = BitImageProcessor(**common, do_center_crop=True, crop_size={"height": 518, "width": 518})(
        images=pil, return_tensors="pt")["pixel_values"][0, 0]
    ours = g.apply(torch.from_numpy(img.astype(np.float32) / 255)[None], "bicubic")[0]
    assert ours.shape == ref.shape == (518, 518)
    err = (ours - ref).abs().mean().item()
    # same crop window: far closer than a one-pixel shift in either direction
    shifted = min((ours[:, 1:] - ref[:, :-1]).abs().mean().item(), (ours[1:] - ref[:-1]).abs().mean().item(),
                  (ours[:, :-1] - ref[:, 1:]).abs().mean().item(), (ours[:-1] - ref[1:]).abs().mean().item())
    assert err < 0.01 and err < shifted / 3, (err, shifted)


# -- resize_crop (timm's crop_mode="squash"), box fractions, the CPU rule --------------------------------------
@pytest.mark.parametrize("src_hw, size, side, rounding", [((700, 1000), 384, 404, "round"),
                                                          ((150, 180), 224, 248, "round"),
                                                          ((451, 449), 224, 256, "floor"),
                                                          ((300, 200), 112, 117, "round")])
def test_resize_crop_maps_a_ramp_exactly(src_hw, size, side, rounding):
    """Stretch to side x side, crop size: a linear ramp (value = the pixel centre's original coordinate)
    comes out, away from the borders, as the original coordinate the affine map gives each output pixel
    (on average; each pixel to the antialiasing filter's discretisation, < 0.1 px), where a crop one pixel
    off would move every value by w / side > 0.7 px."""
    h, w = src_hw
    g = make_geometry(src_hw, size, 16, "resize_crop", resize_short=side, crop_rounding=rounding)
    off = int(round((side - size) / 2.0)) if rounding == "round" else int((side - size) / 2.0)
    assert g.resized_hw == (side, side) and g.crop == (off, off) and g.input_hw == (size, size)
    xs = torch.arange(w, dtype=torch.float32) + 0.5
    ramp = xs.view(1, 1, w).expand(1, h, w).contiguous()
    out = g.apply(ramp, "bilinear")[0, size // 2]
    centres = g.to_original([[j + 0.5, 0, j + 0.5, 0] for j in range(size)])[:, 0]
    inner = slice(8, size - 8)  # the antialiasing kernel is cut at the image border only
    err = out[inner].numpy() - centres[inner]
    assert abs(err.mean()) < 0.01 and np.abs(err).max() < 0.1, (err.mean(), np.abs(err).max())
    # the visible window is the crop's, in original pixels
    vx1, vy1, vx2, vy2 = g.visible_window()
    np.testing.assert_allclose([vx1, vx2], [off * w / side, (off + size) * w / side])
    np.testing.assert_allclose([vy1, vy2], [off * h / side, (off + size) * h / side])


def test_in_image_fraction_is_against_the_image_not_the_crop():
    g = make_geometry((700, 1000), 518, 14, "center_crop")  # keeps x in [150, 850)
    boxes = [(0, 0, 100, 100), (950, 10, 1150, 60), (1200, 10, 1300, 60), (-50, 300, 50, 400)]
    np.testing.assert_allclose(g.in_image_fraction(boxes), [1.0, 0.25, 0.0, 0.5])
    np.testing.assert_allclose(g.visible_fraction(boxes), [0.0, 0.0, 0.0, 0.0])


def test_eight_bit_images_on_another_device_are_not_resampled_there():
    """torchvision has a native uint8 kernel only on the CPU; elsewhere it casts, clamps and rounds (other pixels)."""
    g = make_geometry((150, 180), 112, 14, "resize")
    with pytest.raises(ValueError, match="resample on the CPU"):
        g.apply(torch.zeros(1, 150, 180, dtype=torch.uint8, device="meta"))
