"""The analyses' entry point: a store written by ``cxrcore extract`` gives the embeddings an in-process run gives,
and a store that does not match the analysis stops with the field and both values."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import cxrcore
import cxrcore.extract as ex
from cxrcore.cli import main
from cxrcore.cohorts import get_cohort
from cxrcore.cohorts.synthetic_lesions import open_chestxdet10
from cxrcore.extract import StoreMismatchError, embeddings, encode_panel, gpu_hours_table
from cxrcore.store import StoreError

SYN = {"n_images": 5, "seed": 1, "size": 96}
CLI_SYN = ["--cohort", "synthetic", "--n-images", "5", "--seed", "1", "--cohort-option", "size=96"]
RUN = ["--num-workers", "0", "--no-progress"]


def _same(a, b, atol=1e-5):
    pd.testing.assert_frame_equal(a.meta, b.meta)
    assert set(a.features) == set(b.features)
    for m in a.features:
        assert a.features[m].dtype == np.float32
        np.testing.assert_allclose(a.features[m], b.features[m], atol=atol, rtol=0)


@pytest.fixture(scope="module")
def panel_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("panel") / "s"
    rc = main(["extract", "--encoder", "rad-dino", "--stand-in", *CLI_SYN, "--panel", "smoke", "--store-grid",
               "--chunk-size", "2", *RUN, "--out", str(out)])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def lesions(tmp_path_factory):
    return open_chestxdet10("", generated_root=tmp_path_factory.mktemp("cxd"), n_images=8, image_size=256)


@pytest.fixture(scope="module")
def box_store(tmp_path_factory, lesions):
    out = tmp_path_factory.mktemp("boxes") / "s"
    rc = main(["extract", "--encoder", "biomedclip", "--stand-in", "--cohort", "chestxdet10", "--data-root",
               str(lesions.root), "--store-grid", "--chunk-size", "3", *RUN, "--out", str(out)])
    assert rc == 0
    return out


def test_panel_from_store_equals_in_process(panel_store):
    cohort = get_cohort("synthetic", **SYN)
    kw = dict(stand_in=True, panel="smoke", seed=1)
    stored = embeddings("panel", cohort, "rad-dino", store=panel_store, return_grid=True, **kw)
    fresh = embeddings("panel", cohort, "rad-dino", return_grid=True, **kw)
    assert len(stored.meta) == 5 * 3 * 2 and stored.provenance["panel"]["name"] == "smoke"
    _same(stored, fresh)
    # the encoder-key -> store mapping form, and a subset of the store's images
    few = embeddings("panel", cohort, "rad-dino", store={"rad-dino": panel_store}, n_images=2, **kw)
    _same(few, fresh.subset(fresh.meta["image_index"] < 2))
    # grids, float16 both ways, found by pass_id
    assert stored.grids.grid.dtype == fresh.grids.grid.dtype == np.float16
    pid = stored.meta["pass_id"].to_numpy()
    np.testing.assert_allclose(stored.grids.grid[stored.grids.index(pid)].astype(np.float32),
                               fresh.grids.grid[fresh.grids.index(pid)].astype(np.float32), atol=1e-3)


def test_cohort_with_boxes_from_store_equals_in_process(box_store, lesions):
    kw = dict(stand_in=True)
    stored = embeddings("cohort", lesions, "biomedclip", store=box_store, boxes=True, **kw)
    fresh = embeddings("cohort", lesions, "biomedclip", boxes=True, **kw)
    assert len(stored.meta) == len(lesions.boxes) + (len(lesions) - lesions.boxes["image_id"].nunique())
    assert stored.meta["box_class"].dropna().tolist() == lesions.boxes["class"].tolist()
    _same(stored, fresh)
    # one row per image, as the disease-probe analyses read it
    _same(embeddings("cohort", lesions, "biomedclip", store=box_store, **kw),
          embeddings("cohort", lesions, "biomedclip", **kw))


def test_boxes_the_store_did_not_pool(box_store, lesions, tmp_path):
    shifted = lesions.boxes[["image_id", "class", "x1", "y1", "x2", "y2"]].copy()
    shifted[["x1", "x2"]] += 20.0
    fresh = embeddings("cohort", lesions, "biomedclip", stand_in=True, boxes=shifted)
    # not pooled when extracted: re-pooled from the store's float16 grids
    regrid = embeddings("cohort", lesions, "biomedclip", stand_in=True, store=box_store, boxes=shifted)
    np.testing.assert_allclose(regrid.features["roi_local"], fresh.features["roi_local"], atol=2e-2)
    # a store extracted with exactly these boxes (cxrcore extract --boxes) gives them to 1e-5
    table = tmp_path / "boxes.csv"
    shifted.to_csv(table, index=False)
    out = tmp_path / "exact"
    assert main(["extract", "--encoder", "biomedclip", "--stand-in", "--cohort", "chestxdet10", "--data-root",
                 str(lesions.root), "--boxes", str(table), *RUN, "--out", str(out)]) == 0
    _same(embeddings("cohort", lesions, "biomedclip", stand_in=True, store=out, boxes=shifted), fresh)
    # neither pooled nor grids: the error says what to extract
    with pytest.raises(StoreError, match="--boxes"):
        embeddings("cohort", lesions, "biomedclip", stand_in=True, store=out, boxes=True)


@pytest.mark.parametrize("change, field", [
    ({"encoder": "dinov2-b14"}, "encoder is 'rad-dino' in the store but 'dinov2-b14'"),
    ({"stand_in": False}, "stand_in is True in the store but False"),
    ({"dtype": "bfloat16"}, "dtype is 'float32' in the store but 'bfloat16'"),
    ({"input_size": 112}, "input_size is 518 in the store but 112"),
    ({"resize_short": 600}, "resize_short is 518 in the store but 600"),
    ({"seed": 2}, "seed is 1 in the store but 2"),
    ({"panel": "default"}, "panel is \"smoke ["),
    ({"kind": "cohort", "panel": None}, "panel is 'smoke' in the store but None"),
])
def test_a_store_that_does_not_match_stops_naming_the_field(panel_store, change, field):
    args = {"kind": "panel", "encoder": "rad-dino", "stand_in": True, "panel": "smoke", "seed": 1, **change}
    with pytest.raises(StoreMismatchError) as e:
        embeddings(args.pop("kind"), get_cohort("synthetic", **SYN), args.pop("encoder"), store=panel_store, **args)
    assert field in str(e.value) and str(panel_store) in str(e.value)


def test_other_images_or_code_version_are_refused(panel_store, monkeypatch):
    kw = dict(stand_in=True, panel="smoke", seed=1)
    with pytest.raises(StoreMismatchError, match=r"pixels of image .* \(image_hash\)"):
        embeddings("panel", get_cohort("synthetic", **{**SYN, "size": 112}), "rad-dino", store=panel_store, **kw)
    with pytest.raises(StoreError, match="not in the store"):
        embeddings("panel", get_cohort("synthetic", **{**SYN, "n_images": 7}), "rad-dino", store=panel_store, **kw)
    monkeypatch.setattr(ex, "__version__", "9.9.9")
    with pytest.raises(StoreMismatchError, match="cxrcore_version is '.*' in the store but '9.9.9'"):
        embeddings("panel", get_cohort("synthetic", **SYN), "rad-dino", store=panel_store, **kw)


def test_local_weights_are_checked_by_content(tmp_path):
    cohort = get_cohort("synthetic", n_images=2, seed=0, size=64)
    a, b = tmp_path / "a", tmp_path / "b"
    cxrcore.load_encoder("dino-resnet50", stand_in=True).save(a)
    other = cxrcore.load_encoder("dino-resnet50", stand_in=True)
    with __import__("torch").no_grad():
        next(other.model.parameters()).add_(1.0)
    other.save(b)
    out = tmp_path / "s"
    assert main(["extract", "--encoder", "dino-resnet50", "--weights", str(a), "--cohort", "synthetic", "--n-images", "2",
                 "--cohort-option", "size=64", *RUN, "--out", str(out)]) == 0
    moved = tmp_path / "moved"
    a.rename(moved)  # moving the weights is fine: their content is what is checked
    got = embeddings("cohort", cohort, "dino-resnet50", weights={"dino-resnet50": str(moved)}, store=out)
    _same(got, embeddings("cohort", cohort, "dino-resnet50", weights=str(moved)))
    with pytest.raises(StoreMismatchError, match="weights"):
        embeddings("cohort", cohort, "dino-resnet50", weights=str(b), store=out)


def test_encode_panel_returns_grids():
    cohort = get_cohort("synthetic", n_images=2, seed=0, size=64)
    emb = encode_panel(cohort, cxrcore.load_encoder("rad-dino", stand_in=True), "smoke", return_grid=True)
    g = emb.grids
    assert g is not None and g.grid.dtype == np.float16 and len(g) == 2 * 4  # base + 3 perturbed per image
    assert set(g.pass_id) == set(emb.meta["pass_id"]) and len(g.geometry) == len(g)
    assert encode_panel(cohort, cxrcore.load_encoder("rad-dino", stand_in=True), "smoke").grids is None


def test_gpu_hours_table():
    t = gpu_hours_table(["rad-dino", "dino-resnet50"], {"pool": 1000, "det": 10}, panel="smoke")
    assert list(t.columns) == ["encoder", "workload", "images", "forward_passes", "gflops_per_pass", "passes_per_s",
                               "rate_source", "gpu_hours"]
    assert len(t) == 2 * 3
    r = t[(t.encoder == "rad-dino") & (t.workload == "pool")].iloc[0]
    gflops = cxrcore.encoder_spec("rad-dino").gflops
    assert r.gflops_per_pass == pytest.approx(gflops)
    assert r.gpu_hours == pytest.approx(1000 * gflops / (989e3 * 0.40) / 3600)
    panel_row = t[(t.encoder == "rad-dino") & t.workload.str.startswith("panel")].iloc[0]
    assert panel_row.forward_passes == 1000 * 4 and panel_row.images == 1000
    # measured rates replace the stated one: images/s per encoder, or an achieved TFLOP/s for all
    m = gpu_hours_table(["rad-dino", "dino-resnet50"], {"pool": 3600}, panel=None, rate_source={"rad-dino": 1.0})
    assert m.set_index("encoder").loc["rad-dino", "gpu_hours"] == pytest.approx(1.0)
    assert m.set_index("encoder").loc["dino-resnet50", "rate_source"].startswith("stated")
    f = gpu_hours_table(["rad-dino"], {"pool": 3600}, panel=None, rate_source=gflops / 1e3)
    assert f.gpu_hours.iloc[0] == pytest.approx(1.0)
    assert gpu_hours_table(["rad-dino"], panel=None).images.tolist() == [492_724, 3_543]


def test_a_store_extracted_with_resize_short_is_read_back_only_with_it(tmp_path):
    out = tmp_path / "rs"
    assert main(["extract", "--encoder", "dino-resnet50", "--stand-in", "--resize-short", "256", "--cohort", "synthetic",
                 "--n-images", "5", "--cohort-option", "size=96", *RUN, "--out", str(out)]) == 0
    cohort = get_cohort("synthetic", **{**SYN, "seed": 0})
    fresh = embeddings("cohort", cohort, "dino-resnet50", stand_in=True, resize_short=256)
    _same(embeddings("cohort", cohort, "dino-resnet50", stand_in=True, store=out, resize_short=256), fresh)
    # the option changes the pixels (a 224 crop of a 256 side, not the whole 224 side)
    other = embeddings("cohort", cohort, "dino-resnet50", stand_in=True)
    assert not np.allclose(other.features["cls"], fresh.features["cls"], atol=1e-3)
    with pytest.raises(StoreMismatchError, match=r"resize_short is 256 in the store but 224 in this analysis.*"
                                                 r"--resize-short"):
        embeddings("cohort", cohort, "dino-resnet50", stand_in=True, store=out)


def test_in_process_cohort_rows_record_the_seed_as_a_store_does():
    cohort = get_cohort("synthetic", **SYN)
    emb = embeddings("cohort", cohort, "rad-dino", stand_in=True, seed=3, n_images=2)
    assert set(emb.meta["seed"]) == {3}
