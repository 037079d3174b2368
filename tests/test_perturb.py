"""Perturbations: deterministic from their seed, change pixels only inside their box and footprint."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cxrcore.perturb import (KINDS, Panel, PerturbationCell, footprint_box, list_panels, load_panel, panel_examples,
                             placement_map, random_location)

STRENGTH = {"iso_blur": 3.0, "directional_blur": 12.0, "reticular_fine": 0.2, "nodule": 0.3}


def _texture(h: int = 96, w: int = 112, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(0.2, 0.8, (h, w)).astype(np.float32)


@pytest.mark.parametrize("kind", list(KINDS))
def test_deterministic_from_seed(kind):
    img = _texture()
    cell = PerturbationCell(kind, 20, STRENGTH[kind])
    a, box_a, c_a = cell.place_and_apply(img, None, seed=3, image_index=5)
    b, box_b, c_b = cell.place_and_apply(img, None, seed=3, image_index=5)
    assert box_a == box_b and c_a == c_b
    np.testing.assert_array_equal(a, b)
    # another seed moves it (the location is drawn from 1000s of candidates)
    _, box_c, _ = cell.place_and_apply(img, None, seed=4, image_index=5)
    assert box_c != box_a


@pytest.mark.parametrize("kind", list(KINDS))
@settings(max_examples=25, deadline=None)
@given(cy=st.floats(0, 96), cx=st.floats(0, 112), d=st.floats(3, 60), seed=st.integers(0, 2**31 - 1))
def test_changes_only_inside_box_and_footprint(kind, cy, cx, d, seed):
    img = _texture()
    out, box = KINDS[kind][0](img, (cy, cx), d, STRENGTH[kind], seed=seed)
    assert out.shape == img.shape and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert box == footprint_box((cy, cx), d, img.shape)
    x1, y1, x2, y2 = box
    changed = out != img
    inside = np.zeros_like(changed)
    inside[y1:y2, x1:x2] = True
    assert not (changed & ~inside).any(), "a pixel outside the returned box changed"
    # and outside the footprint disk itself (plus its one-pixel soft rim)
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    r = np.hypot(yy + 0.5 - cy, xx + 0.5 - cx)
    assert not (changed & (r > d / 2 + 0.5)).any(), "a pixel outside the footprint changed"
    # the input is never modified in place
    np.testing.assert_array_equal(img, _texture())


@pytest.mark.parametrize("kind", list(KINDS))
def test_perturbation_is_visible(kind):
    img = _texture(seed=1)
    out, (x1, y1, x2, y2) = KINDS[kind][0](img, (48.0, 56.0), 24, STRENGTH[kind], seed=0)
    assert np.abs(out - img)[y1:y2, x1:x2].mean() > 0.005


def test_blur_keeps_mean_nodule_brightens():
    img = _texture(seed=2)
    for kind in ("iso_blur", "directional_blur"):
        out, (x1, y1, x2, y2) = KINDS[kind][0](img, (48.0, 56.0), 30, STRENGTH[kind])
        assert abs(out[y1:y2, x1:x2].mean() - img[y1:y2, x1:x2].mean()) < 0.01
        assert out[y1:y2, x1:x2].std() < img[y1:y2, x1:x2].std()
    out, (x1, y1, x2, y2) = KINDS["nodule"][0](img, (48.0, 56.0), 30, 0.1)
    assert out[y1:y2, x1:x2].mean() > img[y1:y2, x1:x2].mean() + 0.02


def test_directional_blur_smooths_along_its_angle_only():
    rng = np.random.default_rng(0)
    img = np.repeat(rng.uniform(0.2, 0.8, (1, 120)), 120, axis=0).astype(np.float32)  # vertical stripes
    along, _ = KINDS["directional_blur"][0](img, (60.0, 60.0), 60, 15, angle_deg=90)  # blur along y: stripes unchanged
    across, _ = KINDS["directional_blur"][0](img, (60.0, 60.0), 60, 15, angle_deg=0)
    assert np.abs(along - img).max() < 1e-4
    assert np.abs(across - img).max() > 0.05


def test_placement_inside_lung_mask_and_image():
    mask = np.zeros((200, 160), bool)
    mask[40:150, 20:70] = True
    dist = placement_map(mask, mask.shape)
    for s in range(50):
        cy, cx = random_location(mask, mask.shape, 30, np.random.default_rng(s), distance=dist)
        x1, y1, x2, y2 = footprint_box((cy, cx), 30, mask.shape)
        assert mask[y1:y2, x1:x2].all()
    # wider than the field: centred where the field is deepest, still in the image
    cy, cx = random_location(mask, mask.shape, 80, np.random.default_rng(0))
    assert mask[int(cy), int(cx)]
    x1, y1, x2, y2 = footprint_box((cy, cx), 80, mask.shape)
    assert x1 >= 0 and y1 >= 0 and x2 <= 160 and y2 <= 200
    # no mask: the central region
    for s in range(20):
        cy, cx = random_location(None, (100, 100), 10, np.random.default_rng(s))
        assert 20 <= cy <= 80 and 20 <= cx <= 80


def test_cell_seed_does_not_depend_on_other_cells():
    img = _texture()
    a = PerturbationCell("nodule", 16, 0.2)
    b = PerturbationCell("iso_blur", 16, 3)
    alone = panel_examples(img, [a], seed=1, image_index=2)[0]
    with_other = panel_examples(img, [b, a], seed=1, image_index=2)[1]
    assert alone[2] == with_other[2]
    np.testing.assert_array_equal(alone[1], with_other[1])


def test_names_and_panel_files(tmp_path):
    assert PerturbationCell("iso_blur", 24, 3).name == "iso_blur_d24_s3"
    assert PerturbationCell("reticular_fine", 48, 0.1, (("spacing_px", 6),)).name == "reticular_fine_d48_s0.1_spacing6"
    assert {"default", "smoke"} <= set(list_panels())
    for name in list_panels():
        p = load_panel(name)
        assert len(p) == len(set(p.names))
        assert list(p.table()["cell"]) == p.names
    f = tmp_path / "p.yml"
    f.write_text("name: t\ncells:\n  - kind: nodule\n    footprint_px: [8, 16]\n    strength: [0.1, 0.2]\n")
    assert load_panel(f).names == ["nodule_d8_s0.1", "nodule_d8_s0.2", "nodule_d16_s0.1", "nodule_d16_s0.2"]
    f.write_text("name: t\ncells:\n  - kind: noduel\n    footprint_px: 8\n    strength: 0.1\n")
    with pytest.raises(ValueError, match=r"cells\[0\].*unknown kind 'noduel'"):
        load_panel(f)
    f.write_text("name: t\ncells:\n  - kind: nodule\n    footprint_px: 8\n    strength: [0.1, 0.1]\n")
    with pytest.raises(ValueError, match="twice"):
        load_panel(f)
    with pytest.raises(FileNotFoundError, match="packaged panels"):
        load_panel("no_such_panel")
    with pytest.raises(ValueError, match="contrast must be > 0"):
        PerturbationCell("nodule", 8, 0)


def test_panel_examples_for_the_figure():
    img = _texture(128, 128)
    panel = load_panel("smoke")
    ex = panel_examples(img, panel, seed=0, image_index=0)
    assert [c.name for c, _, _ in ex] == panel.names
    for cell, pert, (x1, y1, x2, y2) in ex:
        diff = pert != img
        assert diff.any() and not diff[:y1].any() and not diff[y2:].any() and not diff[:, :x1].any() and not diff[:, x2:].any()
    assert isinstance(load_panel(panel), Panel)
