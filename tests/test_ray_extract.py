"""The Ray Data backend: same store as the single-process path, resumable after a kill, Ray optional.

One local Ray instance for the module (4 CPUs declared on a 2-core machine, so an actor holding
its CPUs cannot starve the decode tasks; a small object store; no dashboard, no usage stats).
Every test has a hard timeout (pytest-timeout, thread method: the process is ended even if
Ray blocks in C++).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import cxrcore
from cxrcore.cohorts import ChestXDet10, FolderCohort
from cxrcore.extract import extract
from cxrcore.perturb import load_panel
from cxrcore.store import list_parts, read_grids, read_manifest, read_store
from fixtures_cohorts import make_chestxdet10, write_dicom, write_png

pytestmark = [pytest.mark.timeout(240, method="thread"), pytest.mark.xdist_group("ray"),
              # raised inside Ray Data when it copies its own DataContext, not by anything here
              pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")]

ROOT = Path(__file__).resolve().parent.parent
INPUT = 112  # stand-in input side (a multiple of RAD-DINO's patch 14), small so the forward pass is cheap
N_IMAGES = 30


def _ray_env() -> dict:
    """Environment of Ray processes: no usage stats (offline), this checkout's cxrcore, no cluster to attach to."""
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="Ray Data backend: pip install -e '.[ray]' (part of the dev extra)")
    with pytest.MonkeyPatch.context() as mp:
        # Ray's processes inherit the driver's environment when it starts them
        env = _ray_env()
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.setenv("PYTHONPATH", env["PYTHONPATH"])
        mp.delenv("RAY_ADDRESS", raising=False)
        ray.init(address="local", num_cpus=4, object_store_memory=256 * 2**20, include_dashboard=False,
                 logging_level="WARNING")
        yield ray
        ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A few dozen radiographs in the formats a real cohort has: 8-bit PNG, 16-bit PNG, 12-bit DICOM."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        h, w = int(rng.integers(60, 100)), int(rng.integers(60, 100))
        if i % 5 == 4:
            write_dicom(root / f"dcm_{i:02d}.dcm", rng.integers(0, 4096, (h, w)).astype(np.uint16), bits_stored=12)
        elif i % 2:
            write_png(root / f"p16_{i:02d}.png", rng.integers(0, 65536, (h, w)).astype(np.uint16))
        else:
            write_png(root / f"p8_{i:02d}.png", rng.integers(0, 256, (h, w)).astype(np.uint8))
    return root


@pytest.fixture(scope="module")
def encoder():
    return cxrcore.load_encoder("rad-dino", stand_in=True, input_size=INPUT)


@pytest.fixture(scope="module")
def panel_reference(folder, encoder, tmp_path_factory):
    """The single-process store of the smoke panel over the folder."""
    out = tmp_path_factory.mktemp("ref") / "panel"
    extract(encoder, FolderCohort(folder), out, panel="smoke", chunk_size=4, batch_size=5, num_workers=0, progress=False)
    return out


def assert_same_store(got: Path, ref: Path) -> None:
    a, b = read_store(got), read_store(ref)
    assert a.provenance == b.provenance  # same encoder, weights id, cohort, panel, seed, code version
    pd.testing.assert_frame_equal(a.meta, b.meta)  # same ids, rows, boxes, hashes, geometry, in the same order
    for m in ("cls", "patch_mean", "roi_local"):
        np.testing.assert_allclose(a.features[m], b.features[m], atol=1e-5, rtol=0, err_msg=m)


def test_panel_run_equals_single_process(ray_cluster, folder, panel_reference, tmp_path):
    from cxrcore.ray_extract import extract_ray

    out = tmp_path / "ray"
    res = extract_ray("rad-dino", FolderCohort(folder), out, stand_in=True, input_size=INPUT, panel="smoke",
                      chunk_size=4, batch_size=5, progress=False)
    assert (res.chunks_total, res.chunks_written, res.images) == (8, 8, N_IMAGES)
    assert res.passes == N_IMAGES * (len(load_panel("smoke")) + 1)  # the base image and one copy per cell
    assert_same_store(out, panel_reference)
    assert read_manifest(out) == read_manifest(panel_reference)  # same layout, so either backend resumes the other
    formats = read_store(out).meta["image_id"].str.rsplit(".", n=1).str[-1]
    assert set(formats) == {"png", "dcm"}
    # a second call has nothing left to do
    again = extract_ray("rad-dino", FolderCohort(folder), out, stand_in=True, input_size=INPUT, panel="smoke",
                        chunk_size=4, batch_size=5, progress=False)
    assert (again.chunks_done_before, again.chunks_written, again.images) == (8, 0, 0)


def test_plain_run_with_boxes_and_grids_equals_single_process(ray_cluster, encoder, tmp_path):
    from cxrcore.ray_extract import extract_ray

    cohort = ChestXDet10(make_chestxdet10(tmp_path / "cxd"))
    ref, out = tmp_path / "one", tmp_path / "ray"
    extract(encoder, cohort, ref, store_grid=True, chunk_size=2, batch_size=3, num_workers=0, progress=False)
    res = extract_ray("rad-dino", cohort, out, stand_in=True, input_size=INPUT, store_grid=True, chunk_size=2,
                      batch_size=3, progress=False)
    assert res.chunks_written == 3 and res.passes == len(cohort)
    assert_same_store(out, ref)
    meta = read_store(out).meta
    assert (meta["box_index"] >= 0).sum() == len(cohort.boxes)  # one row per box: roi_local under each
    assert set(cohort.label_columns) <= set(meta.columns)
    ga, gb = read_grids(out), read_grids(ref)
    np.testing.assert_array_equal(ga.pass_id, gb.pass_id)
    np.testing.assert_allclose(ga.grid.astype(np.float32), gb.grid.astype(np.float32), atol=2e-3)  # float16 grids



def test_resize_short_reaches_the_probe_and_every_actor(ray_cluster, folder, tmp_path):
    """extract_ray(resize_short=...) gives the store extract() gives with an encoder loaded with it."""
    from cxrcore.ray_extract import extract_ray

    short = INPUT + 2 * 14  # a centre crop of INPUT out of a larger short side (RAD-DINO's geometry is center_crop)
    enc = cxrcore.load_encoder("rad-dino", stand_in=True, input_size=INPUT, resize_short=short)
    ref, out = tmp_path / "one", tmp_path / "ray"
    extract(enc, FolderCohort(folder), ref, chunk_size=10, batch_size=5, num_workers=0, progress=False)
    extract_ray("rad-dino", FolderCohort(folder), out, stand_in=True, input_size=INPUT, resize_short=short,
                chunk_size=10, batch_size=5, progress=False)
    assert read_store(out).provenance["encoder"]["resize_short"] == short
    assert_same_store(out, ref)

KILLED_JOB = """
import sys, time
import ray
ray.init(address="local", num_cpus=4, object_store_memory=128 * 2**20, include_dashboard=False, logging_level="WARNING")
from cxrcore.cohorts import FolderCohort
from cxrcore.ray_extract import extract_ray

class SlowFolder(FolderCohort):
    # same cohort (name "folder", same images), slower to read, so the kill lands mid-run
    def read_image(self, index):
        time.sleep(0.3)
        return super().read_image(index)

extract_ray("rad-dino", SlowFolder(sys.argv[1]), sys.argv[2], stand_in=True, input_size={input}, panel="smoke",
            chunk_size=2, batch_size=5, progress=False)
print("FINISHED")
"""


def _session_members(sid: int) -> list[int]:
    """Live processes of session ``sid`` (the killed job's Ray processes, if any survived)."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                out.append(int(p.name))
    return out


@pytest.mark.slow  # two Ray instances and a job killed mid-run: ~40 s on 2 busy cores
def test_killed_run_resumes_to_every_image_exactly_once(ray_cluster, folder, panel_reference, tmp_path):
    from cxrcore.ray_extract import extract_ray

    out = tmp_path / "ray"
    script = tmp_path / "job.py"
    script.write_text(KILLED_JOB.format(input=INPUT))
    job = subprocess.Popen([sys.executable, str(script), str(folder), str(out)], env=_ray_env(), cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    n_chunks = N_IMAGES // 2
    try:
        deadline = time.monotonic() + 150
        while not (out.is_dir() and list_parts(out)):
            if job.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the job ended or stalled before its first chunk:\n{job.communicate()[0][-3000:]}")
            time.sleep(0.01)
        os.killpg(job.pid, signal.SIGKILL)  # driver, Ray's processes and workers: the whole job, mid-chunk
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        job.communicate(timeout=30)
        for pid in _session_members(job.pid):  # anything that left the process group
            os.kill(pid, signal.SIGKILL)
    at_kill = len(list_parts(out))
    assert 1 <= at_kill < n_chunks, f"the kill should land mid-run, found {at_kill} of {n_chunks} chunks"

    res = extract_ray("rad-dino", FolderCohort(folder), out, stand_in=True, input_size=INPUT, panel="smoke",
                      chunk_size=2, batch_size=5, progress=False)
    assert res.chunks_done_before == at_kill and res.chunks_written == n_chunks - at_kill
    assert not list(out.glob(".*.tmp-*"))  # no half-written chunk left behind
    emb = read_store(out)  # raises on any duplicated (image, pass, box) row
    assert sorted(set(emb.meta["image_index"])) == list(range(N_IMAGES))
    assert len(emb) == len(read_store(panel_reference))
    assert_same_store(out, panel_reference)


def test_an_unreadable_file_fails_the_run_naming_the_file(ray_cluster, folder, tmp_path):
    from cxrcore.io import ImageReadError
    from cxrcore.ray_extract import extract_ray

    root = tmp_path / "imgs"
    for p in sorted(folder.glob("p8_*.png"))[:3]:
        (root / p.name).parent.mkdir(exist_ok=True)
        (root / p.name).write_bytes(p.read_bytes())
    (root / "p8_99.png").write_text("<html>not an image</html>")
    with pytest.raises(ImageReadError) as e:
        extract_ray("rad-dino", FolderCohort(root), tmp_path / "s", stand_in=True, input_size=INPUT, chunk_size=2,
                    progress=False)
    # the reader's own exception and message, not Ray's wrapper with a remote traceback in front
    assert type(e.value) is ImageReadError and str(e.value).startswith(f"{root / 'p8_99.png'}: not a readable image")
    assert [p.name for _, _, p in list_parts(tmp_path / "s")] in ([], ["part-000000000-000000002.parquet"])


def test_gpu_request_on_a_cluster_without_gpus_fails_fast(ray_cluster, folder, tmp_path):
    from cxrcore.ray_extract import RayResourceError, extract_ray

    t = time.monotonic()
    with pytest.raises(RayResourceError, match=r"num_gpus_per_actor=1 but the Ray cluster has 0 GPU.*num_gpus_per_actor=0"):
        extract_ray("rad-dino", FolderCohort(folder), tmp_path / "gpu", stand_in=True, num_gpus_per_actor=1,
                    progress=False)
    with pytest.raises(RayResourceError, match=r"8 encoder actor\(s\) x 2 CPU, .* need 17.25 CPUs; the Ray cluster has 4"):
        extract_ray("rad-dino", FolderCohort(folder), tmp_path / "cpu", stand_in=True, num_actors=8, progress=False)
    with pytest.raises(RayResourceError, match=r"num_gpus_per_actor=1 but the Ray cluster has 0 GPU"):
        extract_ray("rad-dino", FolderCohort(folder), tmp_path / "cuda", stand_in=True, device="cuda", progress=False)
    with pytest.raises(ValueError, match="would fuse decoding into the encoder actors"):
        extract_ray("rad-dino", FolderCohort(folder), tmp_path / "fused", stand_in=True, num_cpus_per_actor=1,
                    progress=False)
    assert time.monotonic() - t < 20
    assert not any((tmp_path / d).exists() for d in ("gpu", "cpu", "cuda", "fused"))  # refused before any store


@pytest.mark.parametrize("cpus,gpus", [(2.0, 0.0), (1.0, 1.0)])
def test_decode_and_encode_are_separate_stages(ray_cluster, capsys, cpus, gpus):
    """Ray Data fuses a task stage into the next actor stage when their resources agree; ours must stay apart."""
    from cxrcore.ray_extract import _pipeline, forward_batches

    ds = _pipeline(ray_cluster, forward_batches([(0, 4)], 2, 0), decode={}, encode={}, write={}, num_decoders=None,
                   num_cpus_per_decode=1, num_actors=1, num_cpus_per_actor=cpus, num_gpus_per_actor=gpus)
    ds.explain()  # plans only; nothing runs (a GPU stage on this GPU-less cluster would wait forever)
    physical = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert [ln.strip(" +-") for ln in physical.strip(" -\n").splitlines()] == [
        "ActorPoolMapOperator[MapBatches(_ChunkWriter)]", "ActorPoolMapOperator[MapBatches(_Encoder)]",
        "TaskPoolMapOperator[MapBatches(_decode)]", "InputDataBuffer[Input]"]


def test_an_actor_with_other_weights_is_refused(encoder):
    from cxrcore.extract import run_provenance
    from cxrcore.ray_extract import _encoder_check
    from cxrcore.store import ProvenanceMismatchError

    common = dict(cohort_name="folder", panel=None, seed=0, n_images=3, cohort_options={}, store_grid=False)
    prov = run_provenance(encoder, FolderCohort.__new__(FolderCohort), panel=None, seed=0, n_images=3)
    _encoder_check(encoder, prov, common, "actor")  # the same encoder passes
    other = dict(prov, weights_id="sha256:0123456789abcdef")
    with pytest.raises(ProvenanceMismatchError, match=r"actor built a different encoder.*weights_id: stored 'sha256:0123"):
        _encoder_check(encoder, other, common, "actor")


@pytest.mark.parametrize("panel,batch_size,chunk_size", [("smoke", 5, 4), ("smoke", 16, 7), (None, 3, 5), (None, 16, 4)])
def test_forward_batches_cover_every_image_once_within_its_chunk(panel, batch_size, chunk_size):
    """Each image of each chunk in exactly one batch, in order; a batch holds at least batch_size passes unless it
    ends its chunk (so a chunk is written when its last batch returns)."""
    from cxrcore.ray_extract import forward_batches

    n = 11
    chunks = [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]
    n_cells = len(load_panel(panel)) if panel else 0
    batches = forward_batches(chunks, batch_size, n_cells)
    assert [i for b in batches for i in range(b["start"], b["end"])] == list(range(n))
    for b in batches:
        assert b["chunk_start"] <= b["start"] < b["end"] <= b["chunk_end"]
        if b["end"] < b["chunk_end"]:
            assert (b["end"] - b["start"]) * (n_cells + 1) >= batch_size
    for cs, ce in chunks:
        parts = [b for b in batches if b["chunk_start"] == cs]
        assert [b["part"] for b in parts] == list(range(len(parts))) and all(b["n_parts"] == len(parts) for b in parts)


def test_an_encoder_object_is_refused_with_the_reason(folder, encoder, tmp_path):
    from cxrcore.ray_extract import extract_ray

    with pytest.raises(TypeError, match="each Ray actor builds its own encoder"):
        extract_ray(encoder, FolderCohort(folder), tmp_path / "x")


def test_ray_is_optional_and_never_imported_by_cxrcore():
    code = textwrap.dedent("""
        import sys
        import cxrcore, cxrcore.extract, cxrcore.store, cxrcore.cli, cxrcore.ray_extract
        loaded = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
        assert not loaded, loaded
        sys.modules["ray"] = None  # as if Ray were not installed
        from cxrcore.ray_extract import extract_ray
        try:
            extract_ray("rad-dino", None, "x")
        except ImportError as e:
            assert "pip install 'cxrcore[ray]'" in str(e), e
            print("OK")
    """)
    r = subprocess.run([sys.executable, "-c", code], env=_ray_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stderr[-3000:]
