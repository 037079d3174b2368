"""Extraction on a Ray cluster (Ray Data): decode on CPUs, encode in an actor pool, actors write the store.

The same three steps as :mod:`cxrcore.extract`, the same store: ``read_store`` serves both.

1. A CPU stage (Ray tasks) reads, perturbs and preprocesses the base images of one store
   chunk with :func:`cxrcore.extract.load_item` (the project's own readers: DICOM, 8/16-bit
   PNG, JPEG; not ``ray.data.read_images``). Its output is ONE dataset row per chunk: the
   chunk's preprocessed pixels ``[passes, 3, S, S]`` and its pass metadata.
2. An actor pool (GPU actors on a cluster, CPU actors without GPUs), each actor holding its
   own encoder built from the key and weights, runs :func:`~cxrcore.extract.encode_batch`
   over the chunk in ``batch_size`` forward passes, exactly as the single-process loop
   batches it, and writes the chunk with :func:`cxrcore.store.write_chunk`.
3. The driver only counts finished chunks.

Why one row per chunk: a chunk must reach one actor whole to be written exactly once and
atomically, and Ray Data gives no way to route several rows to the same actor short of an
all-to-all group-by, which would hold back every write until all images were encoded (and
lose the resume granularity). A chunk's pixels therefore travel as one object; the default
chunk size is capped so that object stays under ``max_chunk_mb``.

Resume: chunks already in the store are not scheduled; a chunk file appears only by an
atomic rename, and a chunk re-run (a retried task, a restarted job) rewrites the same file,
so a job killed at any moment and restarted ends with every image exactly once.

``ray[data]`` is an optional extra (``pip install cxrcore[ray]``); it is imported only inside
functions, so ``import cxrcore.ray_extract`` does not import Ray.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import time
import types
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .extract import (ExtractResult, _boxes_of, _cpu_preprocessor, default_chunk_size, encode_batch, grids_to_table,
                      load_item, rows_to_table, run_provenance)
from .perturb import Panel, PerturbationCell, load_panel
from .pooling import POOLING_MODES
from .store import (STORE_FILE, ProvenanceMismatchError, StoreError, check_provenance, done_chunks, open_store,
                    read_manifest, remove_stale_temporaries, shard_chunks, write_chunk)

__all__ = ["RayResourceError", "extract_ray"]

_INSTALL_HINT = "the Ray backend needs Ray Data: pip install 'cxrcore[ray]' (or pip install 'ray[data]')"


class RayResourceError(ValueError):
    """The Ray cluster cannot run the requested pool; Ray would wait for it forever instead of failing."""


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{_INSTALL_HINT} ({e})") from e
    return ray


def _as_dtype(dtype: "str | torch.dtype") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    d = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(d, torch.dtype):
        raise ValueError(f"dtype {dtype!r}: expected float32 or bfloat16")
    return d


# -- stage 1: decode (Ray tasks) ----------------------------------------------------------------------
# A task worker process runs many decode tasks; the cohort (its metadata may be tens of MB) is
# fetched from the object store once per process, not once per chunk.
_WORKER_SHARED: dict[str, Any] = {}


def _shared(ref) -> Any:
    import ray

    key = ref.hex()
    if key not in _WORKER_SHARED:
        _WORKER_SHARED.clear()  # a newer run replaces an older one's cohort
        _WORKER_SHARED[key] = ray.get(ref)
    return _WORKER_SHARED[key]


def _decode_chunks(batch: Mapping[str, np.ndarray], *, shared, cells: Sequence[PerturbationCell], seed: int,
                   preprocessor) -> Any:
    """One store chunk -> one row: its preprocessed pixels and its passes' metadata (pixels removed)."""
    cohort, boxes = _shared(shared)
    for start, end in zip(batch["start"], batch["end"]):
        start, end = int(start), int(end)
        n_pass = (end - start) * (len(cells) + 1)  # plain runs: one pass per image, whatever its boxes
        pixels = None
        items, k = [], 0
        for pos in range(start, end):
            passes = load_item(cohort, pos, cells, seed=seed, boxes=boxes, cache=False, preprocessor=preprocessor)
            for p in passes:
                if pixels is None:
                    pixels = np.empty((n_pass, *p.pixels.shape), np.float32)
                pixels[k] = p.pixels.numpy()
                p.pixels = None
                k += 1
            items.append(passes)
        assert k == n_pass, (start, end, k, n_pass)
        yield {"start": np.array([start]), "end": np.array([end]), "pixels": pixels[None],
               "passes": np.array([pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL)], dtype=object)}


# -- stage 2: encode and write (actor pool) ------------------------------------------------------------
class _ChunkWriter:
    """A Ray Data actor: builds its own encoder once, then encodes whole chunks and writes them to the store."""

    def __init__(self, *, key: str, weights: str | None, stand_in: bool, device: str, dtype: torch.dtype,
                 input_size: int | None, provenance: Mapping, out: str, label_columns: Sequence[str],
                 store_grid: bool, batch_size: int, cohort_name: str, panel: Panel | None, seed: int, n_images: int,
                 cohort_options: Mapping | None) -> None:
        import ray

        from .encoders import load_encoder

        node = ray.util.get_node_ip_address()
        self.out = Path(out)
        if not (self.out / STORE_FILE).is_file():
            raise StoreError(f"{self.out / STORE_FILE}: not visible from Ray node {node}; the store directory must be on "
                             "a file system every node of the cluster can write (give --out a shared path)")
        self.encoder = load_encoder(key, weights=weights, stand_in=stand_in, device=device, dtype=dtype,
                                    input_size=input_size)
        mine = run_provenance(self.encoder, types.SimpleNamespace(name=cohort_name), panel=panel, seed=seed,
                              n_images=n_images, cohort_options=cohort_options, store_grid=store_grid)
        try:
            check_provenance(provenance, mine, f"the store's run (encoder as built by the driver's probe)")
        except ProvenanceMismatchError as e:
            raise ProvenanceMismatchError(f"Ray node {node} built a different encoder than the probe did; make the "
                                          f"weights identical on every node. {e}") from None
        self.provenance = dict(provenance)
        self.label_columns = list(label_columns)
        self.store_grid, self.batch_size = store_grid, int(batch_size)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        done: dict[str, list] = {"start": [], "end": [], "passes": [], "rows": []}
        for i in range(len(batch["start"])):
            start, end = int(batch["start"][i]), int(batch["end"][i])
            items = pickle.loads(batch["passes"][i])
            pixels = batch["pixels"][i]
            with warnings.catch_warnings():
                # read-only views into the object store; encode_batch only reads them (torch.stack copies)
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                k = 0
                for passes in items:
                    for p in passes:
                        p.pixels = torch.from_numpy(pixels[k])
                        k += 1
            rows, n_rows = self._write(start, end, items)
            done["start"].append(start)
            done["end"].append(end)
            done["passes"].append(k)
            done["rows"].append(n_rows)
        return {k: np.asarray(v, np.int64) for k, v in done.items()}

    def _write(self, start: int, end: int, items: list) -> tuple[list, int]:
        # Batches are formed as in cxrcore.extract.extract: whole images, flushed once >= batch_size passes,
        # never across a chunk boundary, so both backends run the very same forward passes.
        rows: list[dict] = []
        feats: dict[str, list[np.ndarray]] = {m: [] for m in POOLING_MODES}
        grid_parts: list[dict] = []
        pending: list = []

        def flush() -> None:
            if not pending:
                return
            r, f, g = encode_batch(self.encoder, pending, store_grid=self.store_grid)
            rows.extend(r)
            for m in POOLING_MODES:
                feats[m].append(f[m])
            if g is not None:
                grid_parts.append(g)
            pending.clear()

        for passes in items:
            pending.extend(passes)
            if len(pending) >= self.batch_size:
                flush()
        flush()
        table = rows_to_table(rows, {m: np.concatenate(v) for m, v in feats.items()}, self.provenance, self.label_columns)
        gt = None
        if self.store_grid:
            gt = grids_to_table({"pass_id": np.concatenate([g["pass_id"] for g in grid_parts]),
                                 "grid": np.concatenate([g["grid"] for g in grid_parts]),
                                 "geometry": [x for g in grid_parts for x in g["geometry"]]})
        write_chunk(self.out, start, end, table, self.provenance, gt)
        return rows, table.num_rows


def _probe(key: str, weights, stand_in: bool, device: str, dtype: torch.dtype, input_size, cohort_name: str,
           panel, seed: int, n_images: int, cohort_options, store_grid: bool):
    """On a worker with an actor's resources: the run's provenance and a model-free CPU preprocessor.

    Run remotely so the driver (often a small head node) never loads the weights.
    """
    from .encoders import load_encoder

    enc = load_encoder(key, weights=weights, stand_in=stand_in, device=device, dtype=dtype, input_size=input_size)
    prov = run_provenance(enc, types.SimpleNamespace(name=cohort_name), panel=panel, seed=seed, n_images=n_images,
                          cohort_options=cohort_options, store_grid=store_grid)
    return prov, _cpu_preprocessor(enc)


# -- the driver -----------------------------------------------------------------------------------------
def _connect(ray, address: str | None) -> bool:
    """Use the current Ray connection, or connect to ``address``, or start a local instance; True if we connected."""
    if ray.is_initialized():
        return False
    if address is not None:
        ray.init(address=address, log_to_driver=True)
        return True
    # A local instance: offline, no dashboard, and more CPUs declared than the machine has, so that actors holding
    # their CPUs for the whole run can never leave the decode tasks without a CPU (a deadlock on small machines).
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=max(4, 2 * (os.cpu_count() or 1)), include_dashboard=False)
    return True


@contextlib.contextmanager
def _plain_errors(ray):
    """Re-raise a remote failure as the project's own exception (an unreadable file names itself), not Ray's wrapper."""
    try:
        yield
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, Exception):
            raise e.cause from e
        raise
    except ray.exceptions.ActorDiedError as e:
        if not e.actor_init_failed:
            raise
        # the actor's exception object does not survive; its message is the last line of the remote traceback
        last = str(e).strip().splitlines()[-1]
        raise RuntimeError(f"a Ray encoder actor failed to start: {last}") from e


def _check_resources(ray, num_actors: int | None, num_gpus_per_actor: float | None, num_cpus_per_actor: float | None,
                     num_cpus_per_decode: float) -> tuple[int, float, float]:
    """Resolve the pool size and per-actor resources, and refuse what the cluster cannot run (Ray would hang)."""
    res = ray.cluster_resources()
    gpus, cpus = float(res.get("GPU", 0)), float(res.get("CPU", 0))
    if num_gpus_per_actor is None:
        num_gpus_per_actor = 1.0 if gpus >= 1 else 0.0
    if num_gpus_per_actor > 0:
        if gpus < num_gpus_per_actor:
            raise RayResourceError(
                f"num_gpus_per_actor={num_gpus_per_actor:g} but the Ray cluster has {gpus:g} GPU(s) "
                f"(resources: {dict(res)}); Ray would wait for a GPU forever. Pass num_gpus_per_actor=0 "
                "(--num-gpus-per-actor 0) to encode on CPUs, or connect to a cluster with GPUs (--address).")
        if num_actors is None:
            num_actors = max(1, int(gpus // num_gpus_per_actor))
        if num_actors * num_gpus_per_actor > gpus:
            raise RayResourceError(f"{num_actors} encoder actors x {num_gpus_per_actor:g} GPU need "
                                   f"{num_actors * num_gpus_per_actor:g} GPUs; the Ray cluster has {gpus:g}. "
                                   "Lower num_actors.")
        if num_cpus_per_actor is None:
            num_cpus_per_actor = 1.0
    else:
        num_actors = num_actors or 1
        if num_cpus_per_actor is None:
            # a CPU forward pass uses as many threads as CPUs reserved (Ray sets OMP_NUM_THREADS); differing from the
            # decode stage's request also keeps Ray Data from fusing the two stages into one
            num_cpus_per_actor = max(2.0, float(num_cpus_per_decode) + 1)
    if num_actors < 1:
        raise ValueError(f"num_actors={num_actors}: expected >= 1")
    need = num_actors * num_cpus_per_actor + num_cpus_per_decode
    if cpus < need:
        raise RayResourceError(
            f"{num_actors} encoder actor(s) x {num_cpus_per_actor:g} CPU plus one decode task x {num_cpus_per_decode:g} "
            f"CPU need {need:g} CPUs; the Ray cluster has {cpus:g}, so decoding could never run. Lower num_actors or "
            "num_cpus_per_actor, or start Ray with more CPUs declared (ray start --num-cpus N).")
    return int(num_actors), float(num_gpus_per_actor), float(num_cpus_per_actor)


def _chunk_size(out: Path, chunk_size: int | None, store_grid: bool, n_cells: int, input_size: int,
                max_chunk_mb: float) -> int:
    if chunk_size is not None:
        return int(chunk_size)
    if (out / STORE_FILE).is_file():  # resuming: keep the store's layout, whichever backend started it
        try:
            return int(read_manifest(out)["layout"]["chunk_size"])
        except (KeyError, TypeError, ValueError):
            pass  # open_store reports what is wrong with the file
    per_image = (n_cells + 1) * 3 * input_size * input_size * 4  # float32 pixels of an image's passes
    return max(1, min(default_chunk_size(store_grid, n_cells), int(max_chunk_mb * 2**20 // per_image)))


def extract_ray(encoder: str, cohort, out: str | os.PathLike, *,
                panel: "Panel | str | Sequence[PerturbationCell] | None" = None, n_images: int | None = None,
                seed: int = 0, store_grid: bool = False, batch_size: int = 16, chunk_size: int | None = None,
                weights: str | None = None, stand_in: bool = False, device: str | None = None,
                dtype: "str | torch.dtype" = "float32", input_size: int | None = None, address: str | None = None,
                num_actors: int | None = None, num_gpus_per_actor: float | None = None,
                num_cpus_per_actor: float | None = None, num_cpus_per_decode: float = 1, max_chunk_mb: float = 256,
                progress: bool = True, cohort_options: Mapping | None = None) -> ExtractResult:
    """:func:`cxrcore.extract.extract` on a Ray cluster: the same store, written by encoder actors; resumable.

    ``encoder``: an encoder key; every actor builds it itself from ``weights`` / ``stand_in``
    / ``dtype`` / ``input_size`` (the weights must be readable on every node, ``out`` writable
    from every node). ``address``: a Ray cluster (``"auto"``: the one this machine belongs
    to); default: the current Ray connection, else a new local instance (left running, as
    Ray Data does). ``num_gpus_per_actor`` defaults to 1 when the cluster has GPUs, else 0
    (CPU actors); ``num_actors`` to one actor per GPU (one on CPUs); ``device`` to ``cuda``
    for GPU actors. ``chunk_size`` defaults to the existing store's, else to
    :func:`~cxrcore.extract.default_chunk_size` capped so one chunk's float32 pixels stay
    under ``max_chunk_mb`` (a chunk travels through the object store as one row).
    Raises :class:`RayResourceError` at once when the cluster cannot host the pool.
    """
    if not isinstance(encoder, str):
        raise TypeError(f"extract_ray takes an encoder key (e.g. 'rad-dino'), not {type(encoder).__name__}: each Ray "
                        "actor builds its own encoder from the key, weights, stand_in, dtype and input_size")
    ray = _import_ray()
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    t0 = time.perf_counter()
    pan = None if panel is None else load_panel(panel)
    cells = tuple(pan.cells) if pan is not None else ()
    n = len(cohort) if n_images is None else min(int(n_images), len(cohort))
    if n < 1:
        raise ValueError(f"cohort {getattr(cohort, 'name', '?')} has no images to extract")
    dt = _as_dtype(dtype)
    _connect(ray, address)
    n_act, gpa, cpa = _check_resources(ray, num_actors, num_gpus_per_actor, num_cpus_per_actor, num_cpus_per_decode)
    dev = device or ("cuda" if gpa > 0 else "cpu")
    cohort_name = getattr(cohort, "name", type(cohort).__name__)
    enc_args = dict(key=encoder, weights=weights, stand_in=stand_in, device=dev, dtype=dt, input_size=input_size)
    common = dict(cohort_name=cohort_name, panel=pan, seed=int(seed), n_images=n,
                  cohort_options=dict(cohort_options or {}), store_grid=bool(store_grid))
    probe = ray.remote(_probe).options(num_cpus=cpa, num_gpus=gpa)
    with _plain_errors(ray):
        prov, pre = ray.get(probe.remote(encoder, weights, stand_in, dev, dt, input_size, **common))

    out = Path(out)
    cs = _chunk_size(out, chunk_size, store_grid, len(cells), pre.input_size, max_chunk_mb)
    out = open_store(out, prov, {"n_images": n, "chunk_size": cs})
    mine = shard_chunks(n, cs, (0, 1))
    remove_stale_temporaries(out, mine)
    done = done_chunks(out)
    todo = [c for c in mine if c not in done]
    written = images = passes = 0
    if todo:
        shared = ray.put((cohort, _boxes_of(cohort) if not cells else {}))
        ds = ray.data.from_items([{"start": s, "end": e} for s, e in todo], override_num_blocks=len(todo))
        ds.context.enable_progress_bars = False  # one bar, ours, counting images
        ds = ds.map_batches(_decode_chunks, batch_size=1, batch_format="numpy", compute=TaskPoolStrategy(),
                            num_cpus=num_cpus_per_decode,
                            fn_kwargs=dict(shared=shared, cells=cells, seed=int(seed), preprocessor=pre))
        ds = ds.map_batches(_ChunkWriter, batch_size=1, batch_format="numpy", compute=ActorPoolStrategy(size=n_act),
                            num_cpus=cpa, num_gpus=gpa,
                            fn_constructor_kwargs=dict(**enc_args, provenance=prov, out=str(out),
                                                       label_columns=list(getattr(cohort, "label_columns", [])),
                                                       batch_size=batch_size, **common))
        from tqdm.auto import tqdm

        with _plain_errors(ray), tqdm(total=sum(e - s for s, e in todo), unit="img",
                                      desc=f"{encoder} (ray) -> {out.name}", disable=not progress) as bar:
            for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
                k = int(np.sum(b["end"] - b["start"]))
                written += len(b["start"])
                images += k
                passes += int(np.sum(b["passes"]))
                bar.update(k)
    return ExtractResult(out, (0, 1), len(mine), len(mine) - len(todo), written, images, passes,
                         time.perf_counter() - t0)
