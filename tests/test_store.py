"""The embedding store: shards partition the cohort, provenance is enforced, grids re-pool without a forward pass."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cxrcore
from cxrcore.cohorts import get_cohort
from cxrcore.extract import encode_panel, extract, load_item
from cxrcore.perturb import load_panel
from cxrcore.store import (ProvenanceMismatchError, StoreError, chunk_ranges, missing_chunks, parse_shard, read_grids,
                           read_store, repool, shard_chunks)


@pytest.fixture(scope="module")
def encoder():
    return cxrcore.load_encoder("dinov3-vit7b16", stand_in=True)


@pytest.fixture(scope="module")
def cohort():
    return get_cohort("synthetic", n_images=6, seed=1, size=96)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 500), cs=st.integers(1, 64), k=st.integers(1, 12))
def test_shards_are_disjoint_and_cover_the_cohort(n, cs, k):
    parts = [shard_chunks(n, cs, (i, k)) for i in range(k)]
    positions = np.concatenate([np.arange(s, e) for p in parts for s, e in p])
    assert len(positions) == n and set(positions) == set(range(n))  # covers, and no position twice
    # deterministic: the same call gives the same split
    assert parts == [shard_chunks(n, cs, f"{i}/{k}") for i in range(k)]
    assert chunk_ranges(n, cs)[-1][1] == n


def test_parse_shard_errors():
    assert parse_shard("3/8") == (3, 8)
    for bad in ("8/8", "a/2", "1", "-1/2"):
        with pytest.raises(ValueError, match="i/n"):
            parse_shard(bad)


def test_sharded_runs_fill_one_store_like_a_single_run(tmp_path, encoder, cohort):
    one, many = tmp_path / "one", tmp_path / "many"
    extract(encoder, cohort, one, panel="smoke", chunk_size=2, num_workers=0, progress=False)
    for i in (2, 0):
        extract(encoder, cohort, many, panel="smoke", chunk_size=2, num_workers=0, progress=False, shard=f"{i}/3")
        with pytest.raises(StoreError, match="not written yet"):
            read_store(many)
    assert [tuple(c) for c in missing_chunks(many)] == [(2, 4)]
    extract(encoder, cohort, many, panel="smoke", chunk_size=2, num_workers=0, progress=False, shard="1/3")
    a, b = read_store(one), read_store(many)
    assert len(a) == len(b) == 6 * 3 * 2
    for m in a.features:
        np.testing.assert_array_equal(a.features[m], b.features[m])
    assert not list(many.glob(".*tmp*"))


def test_provenance_mismatch_is_refused(tmp_path, encoder, cohort):
    out = tmp_path / "s"
    extract(encoder, cohort, out, panel="smoke", chunk_size=3, num_workers=0, progress=False, n_images=3)
    other = cxrcore.load_encoder("biomedclip", stand_in=True)
    with pytest.raises(ProvenanceMismatchError, match=r"encoder\.key: stored 'dinov3-vit7b16', this run 'biomedclip'"):
        extract(other, cohort, out, panel="smoke", chunk_size=3, num_workers=0, progress=False, n_images=3)
    with pytest.raises(ProvenanceMismatchError, match="seed"):
        extract(encoder, cohort, out, panel="smoke", chunk_size=3, num_workers=0, progress=False, n_images=3, seed=5)
    with pytest.raises(ProvenanceMismatchError, match="panel"):
        extract(encoder, cohort, out, panel=None, chunk_size=3, num_workers=0, progress=False, n_images=3)
    # a chunk from another run, copied into a store whose store.json matches, is refused too
    foreign = tmp_path / "f"
    extract(encoder, cohort, foreign, panel="smoke", chunk_size=3, num_workers=0, progress=False, n_images=6)
    shutil.copy(foreign / "store.json", out / "store.json")
    with pytest.raises(ProvenanceMismatchError, match=r"part-000000000-000000003\.parquet"):
        extract(encoder, cohort, out, panel="smoke", chunk_size=3, num_workers=0, progress=False, n_images=6)


def test_rows_columns_and_provenance(tmp_path, encoder, cohort):
    out = tmp_path / "s"
    extract(encoder, cohort, out, panel="smoke", chunk_size=4, num_workers=0, progress=False)
    t = pq.read_table(out / "part-000000000-000000004.parquet")
    for m in ("cls", "patch_mean", "roi_local"):
        typ = t.schema.field(m).type
        assert isinstance(typ, pa.FixedSizeListType) and typ.value_type == pa.float32() and typ.list_size == 64
    for c in ("image_id", "patient_id", "cardiomegaly", "effusion", "cell", "arm", "seed", "image_hash", "geometry",
              "encoder", "weights_id", "cxrcore_version", "x1", "y2"):
        assert c in t.column_names, c
    prov = json.loads(t.schema.metadata[b"cxrcore.provenance"])
    assert prov["encoder"]["key"] == "dinov3-vit7b16" and prov["weights_id"].startswith("stand-in:")
    assert prov["panel"]["name"] == "smoke" and prov["cxrcore_version"] == cxrcore.__version__
    emb = read_store(out)
    assert emb.provenance == prov
    assert set(emb.cells) == {"nodule_d32_s0.05", "nodule_d32_s0.4", "iso_blur_d32_s3"}
    # the same image hashes alike in both arms and every cell
    assert (emb.meta.groupby("image_index")["image_hash"].nunique() == 1).all()


def test_grids_repool_boxes_without_a_forward_pass(tmp_path, encoder, cohort):
    out = tmp_path / "g"
    extract(encoder, cohort, out, panel="smoke", chunk_size=3, num_workers=0, progress=False, store_grid=True, n_images=3)
    emb = read_store(out)
    grids = read_grids(out)
    assert grids.grid.dtype == np.float16 and len(grids) == 3 * 4
    boxes = emb.meta[["x1", "y1", "x2", "y2"]].to_numpy()
    again = repool(grids, None, boxes, pass_ids=emb.meta["pass_id"].to_numpy())
    np.testing.assert_allclose(again, emb.features["roi_local"], atol=2e-2, rtol=2e-2)  # float16 storage
    # jittered boxes: the same numbers a new forward pass would give
    jitter = boxes + np.array([7, -5, 7, -5])
    base_rows = emb.meta.index[emb.meta["arm"] == 1]
    cells = {c.name: c for c in load_panel("smoke")}
    images = [load_item(cohort, int(r.image_index), [cells[r.cell]])[1].image for _, r in emb.meta.loc[base_rows].iterrows()]
    fresh = encoder.encode(images, boxes=[[tuple(jitter[i])] for i in base_rows]).roi_local
    np.testing.assert_allclose(repool(grids, None, jitter[base_rows], pass_ids=emb.meta.loc[base_rows, "pass_id"]), fresh,
                               atol=2e-2, rtol=2e-2)
    # array form: one grid, one geometry
    g0 = grids.grid[0]
    one = repool(g0, grids.geometry[0], [boxes[0]])
    assert one.shape == (1, g0.shape[-1])
    # a store without grids says so
    plain = tmp_path / "p"
    extract(encoder, cohort, plain, panel="smoke", chunk_size=3, num_workers=0, progress=False, n_images=3)
    with pytest.raises(StoreError, match="--store-grid"):
        read_grids(plain)


def test_read_store_matches_encode_panel(tmp_path, encoder, cohort):
    out = tmp_path / "s"
    extract(encoder, cohort, out, panel="smoke", chunk_size=4, num_workers=1, progress=False)  # worker preprocessing
    a = read_store(out)
    b = encode_panel(cohort, encoder, "smoke")
    key = ["pass_id", "box_index"]
    ia = np.lexsort(a.meta[key].to_numpy().T[::-1])
    ib = np.lexsort(b.meta[key].to_numpy().T[::-1])
    for m in a.features:
        np.testing.assert_allclose(a.features[m][ia], b.features[m][ib], atol=1e-5)
    with pytest.raises(StoreError, match="not an embedding store"):
        read_store(tmp_path / "nothing")
