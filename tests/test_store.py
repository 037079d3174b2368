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
from cxrcore.store import (ProvenanceMismatchError, StoreError, chunk_info, chunk_ranges, done_chunks, missing_chunks,
                           parse_shard, read_grids, read_store, repool, shard_chunks, shard_from_environment, store_status)


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


# -- Slurm arrays and `cxrcore status` ---------------------------------------------------------------------------
def _slurm(task, count, first=0, step=1, last=None):
    last = first + step * (count - 1) if last is None else last
    return {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": str(count), "SLURM_ARRAY_TASK_MIN": str(first),
            "SLURM_ARRAY_TASK_MAX": str(last), "SLURM_ARRAY_TASK_STEP": str(step), "SLURM_ARRAY_JOB_ID": "77"}


@pytest.mark.parametrize("env, shard", [
    ({}, (0, 1)),
    (_slurm(3, 16), (3, 16)),  # --array=0-15
    (_slurm(1, 16, first=1), (0, 16)),  # --array=1-16: ids start at 1, shards at 0
    (_slurm(16, 16, first=1), (15, 16)),
    (_slurm(7, 16), (7, 16)),  # --array=0-15%4: the throttle changes neither ids nor count
    (_slurm(6, 16, step=2), (3, 16)),  # --array=0-30:2
    ({k: v for k, v in _slurm(5, 8, first=2).items() if k not in ("SLURM_ARRAY_TASK_MAX", "SLURM_ARRAY_TASK_STEP")},
     (3, 8)),  # older Slurm without MAX/STEP
])
def test_shard_from_slurm_array_variables(env, shard):
    assert shard_from_environment(env)[0] == shard


def test_uneven_slurm_index_lists_need_an_explicit_shard():
    with pytest.raises(ValueError, match="--shard i/n"):
        shard_from_environment(_slurm(9, 3, first=1, last=9))  # --array=1,2,9
    with pytest.raises(ValueError, match="--shard i/n"):
        shard_from_environment({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "4"})


def test_slurm_task_writes_its_shard_and_status_names_the_task_to_rerun(tmp_path, monkeypatch, capsys):
    from cxrcore.cli import main

    out = tmp_path / "s"
    args = ["extract", "--encoder", "dinov3-vit7b16", "--stand-in", "--cohort", "synthetic", "--n-images", "9",
            "--cohort-option", "size=64", "--chunk-size", "2", "--num-workers", "0", "--no-progress", "--out", str(out)]
    for task in (1, 2, 4):  # sbatch --array=1-4; task 3 never ran
        for k, v in _slurm(task, 4, first=1).items():
            monkeypatch.setenv(k, v)
        assert main(args) == 0
        assert f'"shard": "{task - 1}/4"' in capsys.readouterr().out
    layout = chunk_ranges(9, 2)
    assert sorted(done_chunks(out)) == sorted(c for k, c in enumerate(layout) if k % 4 != 2)
    info = chunk_info(out / "part-000000000-000000002.parquet")
    assert info["shard"] == [0, 4] and info["slurm"]["task_id"] == 1 and info["slurm"]["job_id"] == "77"
    st = store_status(out)
    assert st.images_done == 9 - 2 and st.images_missing == 2 and not st.duplicated and not st.complete
    assert st.missing == [{"start": 4, "end": 6, "images": 2, "shard": 2, "slurm_task_id": 3}]
    assert st.rerun_shards() == [2] and st.shards == 4 and st.shards_source == "chunk footers"
    assert main(["status", str(out)]) == 1
    text = capsys.readouterr().out
    assert "7 of 9 images done" in text and "rerun shard 2/4, Slurm array task 3" in text
    assert main(["status", str(out), "--json", "--shards", "8"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["images_missing"] == 2 and report["missing"][0]["shard"] == 2 % 8 and report["ok"] is False
    for k, v in _slurm(3, 4, first=1).items():
        monkeypatch.setenv(k, v)
    assert main(args) == 0
    capsys.readouterr()
    assert main(["status", str(out)]) == 0 and "9 of 9 images done" in capsys.readouterr().out


def test_status_finds_duplicated_images(tmp_path, encoder, cohort, capsys):
    from cxrcore.cli import main

    a, b = tmp_path / "a", tmp_path / "b"
    extract(encoder, cohort, a, chunk_size=2, num_workers=0, progress=False)
    extract(encoder, cohort, b, chunk_size=3, num_workers=0, progress=False)  # same run, another chunk layout
    assert store_status(a).ok
    # two stores merged by hand: positions 0-2 now in two part files
    shutil.copy(b / "part-000000000-000000003.parquet", a)
    st = store_status(a)
    assert st.complete and not st.ok
    assert [d["position"] for d in st.duplicated] == [0, 1, 2]
    assert st.duplicated[2]["files"] == ["part-000000000-000000003.parquet", "part-000000002-000000004.parquet"]
    assert st.off_layout == ["part-000000000-000000003.parquet"]
    (a / "part-000000000-000000003.parquet").unlink()
    # one image id stored at two positions (e.g. a file listed twice), and a row stored twice within a file
    p = a / "part-000000004-000000006.parquet"
    t = pq.read_table(p)
    ids = t["image_id"].to_pylist()
    t = t.set_column(t.schema.get_field_index("image_id"), "image_id", pa.array([ids[0], ids[0]]))
    pq.write_table(pa.concat_tables([t, t.slice(1, 1)]), p)
    st = store_status(a)
    assert st.duplicated_image_ids == [{"image_id": ids[0], "positions": [4, 5]}]
    assert st.duplicated == [{"position": 5, "image_id": ids[0], "files": [p.name],
                              "why": "the same (position, pass, box) row twice in one file"}]
    assert main(["status", str(a)]) == 1
    assert "duplicated image id" in capsys.readouterr().out
    # a chunk of another run is reported, not counted
    other = tmp_path / "o"
    extract(encoder, cohort, other, chunk_size=2, num_workers=0, progress=False, seed=9)
    shutil.copy(other / "part-000000000-000000002.parquet", b)
    st = store_status(b)
    assert st.foreign and "seed" in st.foreign[0]["why"] and not st.ok
