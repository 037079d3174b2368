"""Extraction: the paired panel, one forward pass per image, the per-batch function, the base-image cache."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import cxrcore
from cxrcore.cohorts import get_cohort
from cxrcore.cohorts.base import Cohort
from cxrcore.extract import IMAGE_CACHE, BatchEncoder, Embeddings, encode_cohort, encode_panel, extract, load_item, read_with_mask
from cxrcore.perturb import PerturbationCell, footprint_box, load_panel
from cxrcore.store import read_store


@pytest.fixture(scope="module")
def encoder():
    return cxrcore.load_encoder("rad-dino", stand_in=True)


@pytest.fixture(scope="module")
def cohort():
    return get_cohort("synthetic", n_images=4, seed=2, size=112)


def test_paired_design(encoder, cohort):
    panel = load_panel("smoke")
    emb = encode_panel(cohort, encoder, panel)
    m = emb.meta
    assert isinstance(emb, Embeddings) and len(m) == 4 * len(panel) * 2
    assert emb.cells == panel.names
    for (img, cell), g in m.groupby(["image_id", "cell"]):
        assert sorted(g["arm"]) == [0, 1]  # every image unperturbed and perturbed in every cell
        assert g[["x1", "y1", "x2", "y2"]].drop_duplicates().shape[0] == 1  # same box in both arms
    # every box fully inside its image, its centre in the lung field
    for _, r in m[m.arm == 1].iterrows():
        image, mask = read_with_mask(cohort, int(r.image_index))
        assert 0 <= r.x1 < r.x2 <= image.shape[1] and 0 <= r.y1 < r.y2 <= image.shape[0]
        assert mask[int(r.center_y), int(r.center_x)]
        assert (r.x1, r.y1, r.x2, r.y2) == footprint_box((r.center_y, r.center_x), r.footprint_px, image.shape)
    # arm 0 rows of one image share one forward pass: identical cls and patch_mean
    base = m.index[(m.arm == 0) & (m.image_index == 0)]
    assert np.ptp(emb.features["cls"][base], axis=0).max() == 0
    # a perturbed image differs from its base image
    pert = m.index[(m.arm == 1) & (m.image_index == 0)]
    assert np.abs(emb.features["roi_local"][pert] - emb.features["roi_local"][base]).max() > 0


def test_notebook_call_signature(encoder, cohort):
    cell = PerturbationCell("iso_blur", 24.0, 3.0)
    emb = encode_panel(cohort, encoder, [cell], n_images=3, seed=0)
    assert set(emb.meta["cell"]) == {"iso_blur_d24_s3"} and emb.meta["arm"].sum() == 3
    assert {"image_id", "patient_id", "cell", "kind", "footprint_px", "strength", "x1", "y1", "x2", "y2", "arm"} <= set(emb.meta)
    for mode in ("cls", "patch_mean", "roi_local"):
        assert emb.features[mode].shape == (6, 64) and emb.features[mode].dtype == np.float32
    # the same rows as the loop the notebook used to write by hand: one encode() per image
    i = 1
    passes = load_item(cohort, i, [cell], seed=0)
    ref = encoder.encode([p.image for p in passes], boxes=[p.boxes for p in passes])
    rows = emb.meta.index[emb.meta.image_index == i]
    got = emb.features["roi_local"][rows][np.argsort(emb.meta.loc[rows, "arm"].to_numpy())]
    np.testing.assert_allclose(got, ref.roi_local, atol=1e-5)


def test_deterministic_and_seeded(encoder, cohort):
    a = encode_panel(cohort, encoder, "smoke", n_images=2, seed=0)
    b = encode_panel(cohort, encoder, "smoke", n_images=2, seed=0)
    c = encode_panel(cohort, encoder, "smoke", n_images=2, seed=1)
    pd.testing.assert_frame_equal(a.meta, b.meta)
    np.testing.assert_array_equal(a.features["roi_local"], b.features["roi_local"])
    assert not np.array_equal(a.meta[["x1", "y1"]].to_numpy(), c.meta[["x1", "y1"]].to_numpy())


def test_generated_base_images_are_cached(monkeypatch):
    data = get_cohort("synthetic", n_images=2, seed=3, size=96)
    calls = []
    orig = type(data).phantom
    monkeypatch.setattr(type(data), "phantom", lambda self, i: calls.append(i) or orig(self, i))
    enc_a = cxrcore.load_encoder("dinov3-vit7b16", stand_in=True)
    enc_b = cxrcore.load_encoder("biomedclip", stand_in=True)
    encode_panel(data, enc_a, "smoke")
    encode_panel(data, enc_b, "smoke")
    assert sorted(calls) == [0, 1]  # drawn once for two encoders
    img, _ = read_with_mask(data, 0)
    assert not img.flags.writeable  # a cached array cannot be changed by a caller by accident
    IMAGE_CACHE.clear()


class _BoxCohort(Cohort):
    """Two small images, the first with two boxes, the second with none."""

    name = "boxes"

    def __init__(self):
        super().__init__()
        self.label_columns = ["nodule"]
        self.metadata = pd.DataFrame({"image_id": ["a", "b"], "patient_id": ["p1", "p2"], "study_id": ["s1", "s2"],
                                      "view": "PA", "path": ["", ""], "nodule": [1.0, 0.0]})
        self.boxes = pd.DataFrame({"image_id": ["a", "a"], "class": ["Nodule", "Mass"], "x1": [10.0, 40.0],
                                   "y1": [10.0, 30.0], "x2": [30.0, 90.0], "y2": [25.0, 80.0]})
        self._img = [np.random.default_rng(k).uniform(0, 1, (100, 120)).astype(np.float32) for k in range(2)]

    def read_image(self, index):
        return self._img[index]


def test_plain_extraction_one_row_per_roi(tmp_path, encoder):
    data = _BoxCohort()
    extract(encoder, data, tmp_path / "s", num_workers=0, progress=False)
    emb = read_store(tmp_path / "s")
    m = emb.meta
    assert list(m["image_id"]) == ["a", "a", "b"] and list(m["box_index"]) == [0, 1, -1]
    assert list(m["box_class"].fillna("")) == ["Nodule", "Mass", ""] and list(m["nodule"]) == [1.0, 1.0, 0.0]
    ref = encoder.encode(data._img, boxes=[[(10, 10, 30, 25), (40, 30, 90, 80)], []])
    np.testing.assert_allclose(emb.features["roi_local"][:2], ref.roi_local, atol=1e-5)
    assert np.isnan(emb.features["roi_local"][2]).all()  # no box, no roi_local
    np.testing.assert_allclose(emb.features["cls"], ref.cls[[0, 0, 1]], atol=1e-5)


def test_encode_cohort_image_rows_or_box_rows(encoder):
    data = _BoxCohort()
    img = encode_cohort(data, encoder)
    assert list(img.meta["image_id"]) == ["a", "b"] and list(img.meta["nodule"]) == [1.0, 0.0]
    assert np.isnan(img.features["roi_local"]).all()
    roi = encode_cohort(data, encoder, boxes=True)
    assert list(roi.meta["box_index"]) == [0, 1, -1]
    np.testing.assert_allclose(roi.features["cls"][[0, 2]], img.features["cls"], atol=1e-6)


def test_batch_encoder_is_a_pure_batch_function(encoder):
    rng = np.random.default_rng(0)
    images = [rng.uniform(0, 1, (80, 90)).astype(np.float32) for _ in range(3)]
    fn = BatchEncoder("rad-dino", encoder=encoder)
    batch = {"image": images, "boxes": [[(5, 5, 40, 40)], [], [(0, 0, 20, 30), (30, 30, 80, 70)]], "image_id": ["x", "y", "z"]}
    out = fn(batch)
    assert list(out["image_id"]) == ["x", "y", "z", "z"] and list(out["box_index"]) == [0, -1, 0, 1]
    assert out["cls"].shape == (4, 64)
    # split into two batches: same rows (nothing depends on batch composition beyond the batch)
    a = fn({k: v[:1] for k, v in batch.items()})
    b = fn({k: v[1:] for k, v in batch.items()})
    np.testing.assert_allclose(np.concatenate([a["roi_local"], b["roi_local"]]), out["roi_local"], atol=1e-5)


def test_encode_images_is_one_pass_in_metadata_order_with_boxes_and_grids():
    import cxrcore
    from cxrcore.cohorts import SyntheticCohort
    from cxrcore.extract import encode_images
    from cxrcore.pooling import roi_local

    cohort = SyntheticCohort(n_images=5, seed=2, size=128)
    enc = cxrcore.load_encoder("rad-dino", stand_in=True)
    calls = []
    forward = enc.forward
    enc.forward = lambda x: calls.append(x.shape[0]) or forward(x)
    ids = cohort.metadata["image_id"].tolist()
    boxes = {ids[1]: [(10, 10, 40, 40)], ids[4]: [(0, 0, 128, 128), (60, 60, 70, 70)]}
    out = encode_images(cohort, enc, boxes=boxes, return_grid=True, batch_size=2)
    assert sum(calls) == 5 and len(calls) == 3  # each image once, in batches of 2
    assert out.cls.shape[0] == 5 and out.grid.shape[0] == 5 and len(out.geometry) == 5
    assert out.roi_image.tolist() == [1, 4, 4]
    one = enc.encode([cohort.read_image(4)], boxes=[boxes[ids[4]]])
    np.testing.assert_allclose(out.roi_local[1:], one.roi_local, atol=1e-5)
    np.testing.assert_allclose(out.cls[4], one.cls[0], atol=1e-5)
    # the stored grid re-pools any box without a forward pass
    again, _ = roi_local(out.grid[4:5], out.geometry[4:5], [boxes[ids[4]]])
    np.testing.assert_allclose(again, out.roi_local[1:], atol=1e-5)


def test_a_perturbed_image_is_reproduced_from_the_store_alone(tmp_path):
    """Cell parameters (incl. a kind's own, e.g. spacing), seed, position, centre and box are all in the store."""
    from cxrcore.extract import reproduce_perturbation
    from cxrcore.perturb import Panel

    cells = (PerturbationCell("reticular_fine", 24, 0.15, {"spacing_px": 5}), PerturbationCell("directional_blur", 24, 5),
             PerturbationCell("nodule", 16, 0.3))
    data = get_cohort("synthetic", n_images=3, seed=4, size=128)
    enc = cxrcore.load_encoder("dinov3-vit7b16", stand_in=True, input_size=64)
    extract(enc, data, tmp_path / "s", panel=Panel("custom", cells), seed=7, num_workers=0, progress=False)
    emb = read_store(tmp_path / "s")
    perturbed = emb.meta[emb.meta.arm == 1]
    assert len(perturbed) == 3 * 3
    for _, row in perturbed.iterrows():
        base = data.read_image(int(row.image_index))  # the image file alone: no lung mask, no placement map
        image, box = reproduce_perturbation(row, emb.provenance, base)
        passes = load_item(data, int(row.image_index), cells, seed=7)
        k = 1 + [c.name for c in cells].index(row.cell)
        assert np.array_equal(image, passes[k].image)  # the very pixels that were encoded
        assert tuple(box) == passes[k].boxes[0]
    with pytest.raises(Exception, match="hash"):
        reproduce_perturbation(perturbed.iloc[0], emb.provenance, data.read_image(1 - int(perturbed.iloc[0].image_index)))


def test_batches_split_passes_exactly_and_threads_change_nothing(tmp_path, encoder):
    data = get_cohort("synthetic", n_images=5, seed=2, size=96)
    calls = []
    forward = encoder.forward
    encoder.forward = lambda x: calls.append(x.shape[0]) or forward(x)
    try:
        one = extract(encoder, data, tmp_path / "one", panel="smoke", batch_size=3, chunk_size=2, num_workers=0,
                      progress=False)
        # chunks of 2 images x 4 passes: 3 + 3 + 2 per chunk, the last chunk 3 + 1; never a batch across chunks
        assert calls == [3, 3, 2, 3, 3, 2, 3, 1] and one.passes == 20 and one.batch_size == 3
        two = extract(encoder, data, tmp_path / "two", panel="smoke", batch_size=3, chunk_size=2, num_workers=0,
                      progress=False, in_flight=3)  # the GPU path's threads, on the CPU
    finally:
        encoder.forward = forward
    a, b = read_store(tmp_path / "one"), read_store(tmp_path / "two")
    pd.testing.assert_frame_equal(a.meta, b.meta)
    for m in a.features:
        np.testing.assert_array_equal(a.features[m], b.features[m])
    ref = encode_panel(data, encoder, "smoke")
    np.testing.assert_allclose(a.features["roi_local"], ref.features["roi_local"], atol=1e-5)


def test_auto_batch_size():
    from cxrcore.extract import CPU_BATCH_SIZE, _is_out_of_memory, auto_batch_size, largest_power_of_two, resolve_batch_size

    enc = cxrcore.load_encoder("rad-dino", stand_in=True)
    assert auto_batch_size(enc) == CPU_BATCH_SIZE == resolve_batch_size("auto", enc) == 16
    assert resolve_batch_size(8, enc) == 8
    with pytest.raises(ValueError, match="'auto'"):
        resolve_batch_size("many", enc)
    tried = []
    assert largest_power_of_two(lambda b: tried.append(b) or b * 3 <= 100, 512) == 32 and tried == [1, 2, 4, 8, 16, 32, 64]
    assert largest_power_of_two(lambda b: True, 512) == 512
    assert largest_power_of_two(lambda b: False, 512) == 0
    assert _is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not _is_out_of_memory(RuntimeError("shape mismatch"))


def test_pass_pins_its_pixels_for_the_dataloader(monkeypatch):
    """The DataLoader's pin-memory thread calls Pass.pin_memory (so pixels reach the GPU asynchronously)."""
    import torch
    from torch.utils.data._utils.pin_memory import pin_memory

    from cxrcore.extract import Pass

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a: pinned.append(self.shape) or self)
    p = Pass(0, None, [], [{}], pixels=torch.zeros(3, 8, 8))
    out = pin_memory((3, [p]))
    assert out[1][0] is p and pinned == [torch.Size([3, 8, 8])]


def test_weights_id_of_every_stand_in():
    """Every family's stand-in hashes (the ResNet's 0-dim BatchNorm counters included) and two loads agree."""
    from cxrcore.encoders import list_encoders
    from cxrcore.extract import weights_id

    for key in list_encoders():
        a = weights_id(cxrcore.load_encoder(key, stand_in=True))
        assert a.startswith("stand-in:") and a == weights_id(cxrcore.load_encoder(key, stand_in=True)), key
