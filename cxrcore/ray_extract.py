"""Extraction on a Ray cluster (Ray Data): decode on CPUs, encode in an actor pool, one actor writes the chunks.

The same steps as :func:`cxrcore.extract.extract`, the same store: ``read_store`` serves both.

1. Decode (Ray tasks, CPUs): one dataset row per *forward batch*: the base images that
   :func:`~cxrcore.extract.extract` would put in one batch (whole images, until ``batch_size``
   passes, never across a chunk), read, perturbed and preprocessed by
   :func:`~cxrcore.extract.load_item` with the project's own readers (DICOM, 8/16-bit PNG,
   JPEG; not ``ray.data.read_images``). Row: ``[passes, 3, S, S]`` float32 pixels and the
   passes' metadata.
2. Encode (an actor pool: GPU actors on a cluster, CPU actors without GPUs): each actor
   builds its own encoder from the key and weights, and runs
   :func:`~cxrcore.extract.encode_batch` once per row. Row out: the batch's rows and
   features (embeddings, a few kB per image; no pixels).
3. Write (one actor): gathers a chunk's batches and writes the chunk with
   :func:`~cxrcore.store.write_chunk` (same provenance footer, same row layout, same
   :func:`~cxrcore.extract.rows_to_table`) the moment its last batch arrives.

How a chunk reaches one writer whole: Ray Data cannot route several rows to the same actor
of a pool short of an all-to-all group-by, which would hold every write back until all
images were encoded. So pixels travel in forward-batch rows (decode parallelism and object
sizes independent of the chunk size), and only the small encoder outputs meet at the single
writer. Writing embedding rows is cheap (~10 MB/s at 1,000 images/s); with ``store_grid``
(2 MB of float16 grid per ViT-B pass) the writer's disk becomes the limit.

Resume: chunks already in the store are not scheduled; a chunk file appears only by an
atomic rename, and a chunk done again (a retried task, a restarted job) rewrites the same
file, so a job killed at any moment and restarted ends with every image exactly once.

``ray[data]`` is an optional extra (``pip install cxrcore[ray]``); it is imported only inside
functions, so ``import cxrcore.ray_extract`` does not import Ray.
"""

from __future__ import annotations

import contextlib
import math
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
                    remove_stale_temporaries, shard_chunks, write_chunk)

__all__ = ["RayResourceError", "extract_ray", "forward_batches"]

_INSTALL_HINT = "the Ray backend needs Ray Data: pip install 'cxrcore[ray]' (or pip install 'ray[data]')"
#: CPUs the chunk-writing actor reserves (it serialises Parquet; a fraction so it never starves decoding).
WRITER_CPUS = 0.25
_PICKLE = pickle.HIGHEST_PROTOCOL


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


def forward_batches(chunks: Sequence[tuple[int, int]], batch_size: int, n_cells: int) -> list[dict]:
    """The forward batches of the Ray backend over ``chunks``, as cohort position ranges.

    Whole images (``n_cells + 1`` passes each) until a batch holds at least ``batch_size``
    passes, never across a chunk end, so that one decode task reads each image once.
    :func:`cxrcore.extract.extract` cuts its batches at exactly ``batch_size`` passes instead
    (fixed shapes for the GPU); a ViT or CNN forward pass does not mix the images of a batch,
    so the two backends' embeddings agree to float round-off (the tests hold them to 1e-5).
    """
    per = max(1, math.ceil(int(batch_size) / (n_cells + 1)))  # images per batch
    out = []
    for cs, ce in chunks:
        starts = list(range(cs, ce, per))
        out += [{"chunk_start": cs, "chunk_end": ce, "start": s, "end": min(s + per, ce), "part": k,
                 "n_parts": len(starts)} for k, s in enumerate(starts)]
    return out


# -- stage 1: decode (Ray tasks) ----------------------------------------------------------------------
# A task worker process runs many decode tasks; the cohort (its metadata may be tens of MB) is
# fetched from the object store once per process, not once per batch.
_WORKER_SHARED: dict[str, Any] = {}


def _shared(ref) -> Any:
    import ray

    key = ref.hex()
    if key not in _WORKER_SHARED:
        _WORKER_SHARED.clear()  # a newer run replaces an older one's cohort
        _WORKER_SHARED[key] = ray.get(ref)
    return _WORKER_SHARED[key]


_KEYS = ("chunk_start", "chunk_end", "start", "end", "part", "n_parts")


def _decode(batch: Mapping[str, np.ndarray], *, shared, cells: Sequence[PerturbationCell], seed: int, preprocessor):
    """Forward-batch descriptors -> rows of preprocessed pixels ``[passes, 3, S, S]`` and the passes (pixels removed)."""
    cohort, boxes = _shared(shared)
    for i in range(len(batch["start"])):
        start, end = int(batch["start"][i]), int(batch["end"][i])
        n_pass = (end - start) * (len(cells) + 1)  # plain runs: one pass per image, whatever its boxes
        pixels, items, k = None, [], 0
        for pos in range(start, end):
            passes = load_item(cohort, pos, cells, seed=seed, boxes=boxes, cache=False, preprocessor=preprocessor)
            for p in passes:
                if pixels is None:
                    pixels = np.empty((n_pass, *p.pixels.shape), np.float32)
                pixels[k] = p.pixels.numpy()
                p.pixels = None
                k += 1
            items.append(passes)
        if k != n_pass:
            raise AssertionError(f"positions [{start}, {end}): {k} passes, expected {n_pass}")
        yield {**{c: np.array([int(batch[c][i])]) for c in _KEYS}, "pixels": pixels[None],
               "passes": np.array([pickle.dumps(items, protocol=_PICKLE)], dtype=object)}


# -- stage 2: encode (actor pool) -----------------------------------------------------------------------
def _encoder_check(encoder, provenance: Mapping, common: Mapping, where: str) -> None:
    """Refuse an actor whose encoder differs from the one the store's provenance records (other weights on its node)."""
    mine = run_provenance(encoder, types.SimpleNamespace(name=common["cohort_name"]), panel=common["panel"],
                          seed=common["seed"], n_images=common["n_images"], cohort_options=common["cohort_options"],
                          store_grid=common["store_grid"])
    try:
        check_provenance(provenance, mine, "the store's run (encoder as built by the driver's probe task)")
    except ProvenanceMismatchError as e:
        raise ProvenanceMismatchError(f"{where} built a different encoder than the probe task did; make the weights "
                                      f"identical on every node. {e}") from None


class _Encoder:
    """A Ray Data actor: builds its own encoder once, then one forward pass per forward-batch row."""

    def __init__(self, *, key: str, weights: str | None, stand_in: bool, device: str, dtype: torch.dtype,
                 input_size: int | None, resize_short: int | None, provenance: Mapping, store_grid: bool,
                 common: Mapping) -> None:
        import ray

        from .encoders import load_encoder

        self.encoder = load_encoder(key, weights=weights, stand_in=stand_in, device=device, dtype=dtype,
                                    input_size=input_size, resize_short=resize_short)
        _encoder_check(self.encoder, provenance, common, f"the encoder actor on Ray node {ray.util.get_node_ip_address()}")
        self.store_grid = store_grid

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {c: [] for c in (*_KEYS, "n_pass", "result")}
        for i in range(len(batch["start"])):
            items = pickle.loads(batch["passes"][i])
            pixels = batch["pixels"][i]
            passes = [p for ps in items for p in ps]
            with warnings.catch_warnings():
                # read-only views into the object store; encode_batch only reads them (torch.stack copies)
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                for k, p in enumerate(passes):
                    p.pixels = torch.from_numpy(pixels[k])
            rows, feats, grids = encode_batch(self.encoder, passes, store_grid=self.store_grid)
            for c in _KEYS:
                out[c].append(int(batch[c][i]))
            out["n_pass"].append(len(passes))
            out["result"].append(pickle.dumps((rows, feats, grids), protocol=_PICKLE))
        return {c: np.array(v, dtype=object if c == "result" else np.int64) for c, v in out.items()}


# -- stage 3: write (one actor) ---------------------------------------------------------------------------
class _ChunkWriter:
    """A Ray Data actor (the pool's only one): gathers each chunk's batches and writes the chunk once it is whole."""

    def __init__(self, *, out: str, provenance: Mapping, label_columns: Sequence[str], store_grid: bool) -> None:
        import ray

        self.out = Path(out)
        if not (self.out / STORE_FILE).is_file():
            raise StoreError(f"{self.out / STORE_FILE}: not visible from Ray node {ray.util.get_node_ip_address()}; "
                             "the store directory must be on a file system the whole cluster can write (a shared --out)")
        self.provenance, self.label_columns, self.store_grid = dict(provenance), list(label_columns), store_grid
        self.parts: dict[tuple[int, int], dict[int, tuple]] = {}

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        done: dict[str, list] = {"start": [], "end": [], "passes": [], "rows": []}
        for i in range(len(batch["start"])):
            key = (int(batch["chunk_start"][i]), int(batch["chunk_end"][i]))
            parts = self.parts.setdefault(key, {})
            # keyed by part: a batch delivered twice (a retried task) is kept once
            parts[int(batch["part"][i])] = (int(batch["n_pass"][i]), pickle.loads(batch["result"][i]))
            if len(parts) == int(batch["n_parts"][i]):
                del self.parts[key]
                ordered = [parts[k] for k in sorted(parts)]
                n_rows = self._write(*key, [r for _, r in ordered])
                done["start"].append(key[0])
                done["end"].append(key[1])
                done["passes"].append(sum(n for n, _ in ordered))
                done["rows"].append(n_rows)
        return {c: np.asarray(v, np.int64) for c, v in done.items()}

    def _write(self, start: int, end: int, results: list[tuple]) -> int:
        # as extract.extract's write(): one rows_to_table / grids_to_table over the chunk's rows in position order
        rows = [r for res in results for r in res[0]]
        feats = {m: np.concatenate([res[1][m] for res in results]) for m in POOLING_MODES}
        table = rows_to_table(rows, feats, self.provenance, self.label_columns)
        gt = None
        if self.store_grid:
            gs = [res[2] for res in results]
            gt = grids_to_table({"pass_id": np.concatenate([g["pass_id"] for g in gs]),
                                 "grid": np.concatenate([g["grid"] for g in gs]),
                                 "geometry": [x for g in gs for x in g["geometry"]]})
        write_chunk(self.out, start, end, table, self.provenance, gt)
        return table.num_rows


def _probe(key: str, weights, stand_in: bool, device: str, dtype: torch.dtype, input_size, resize_short,
           common: Mapping):
    """On a worker with an encoder actor's resources: the run's provenance and a model-free CPU preprocessor.

    Remote, so the driver (often a small head node) never loads the weights.
    """
    from .encoders import load_encoder

    enc = load_encoder(key, weights=weights, stand_in=stand_in, device=device, dtype=dtype, input_size=input_size,
                       resize_short=resize_short)
    prov = run_provenance(enc, types.SimpleNamespace(name=common["cohort_name"]), panel=common["panel"],
                          seed=common["seed"], n_images=common["n_images"], cohort_options=common["cohort_options"],
                          store_grid=common["store_grid"])
    return prov, _cpu_preprocessor(enc)


# -- the driver -----------------------------------------------------------------------------------------
def _connect(ray, address: str | None) -> None:
    """Keep the current Ray connection, or connect to ``address`` (or ``$RAY_ADDRESS``), or start a local instance."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        ray.init(address=address)
        return
    # A local instance: offline, no dashboard, and more CPUs declared than the machine has, so that actors holding
    # their CPUs for the whole run can never leave the decode tasks without one (a deadlock on small machines).
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=max(4, 2 * (os.cpu_count() or 1)), include_dashboard=False)


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
        raise RuntimeError(f"a Ray actor failed to start: {last}") from e


def _check_resources(ray, num_actors: int | None, num_gpus_per_actor: float | None, num_cpus_per_actor: float | None,
                     num_cpus_per_decode: float, device: str | None) -> tuple[int, float, float, str]:
    """Resolve the pool size, per-actor resources and device; refuse what the cluster cannot run (Ray would hang)."""
    res = ray.cluster_resources()
    gpus, cpus = float(res.get("GPU", 0)), float(res.get("CPU", 0))
    dev_type = None if device is None else torch.device(device).type
    if num_gpus_per_actor is None:
        num_gpus_per_actor = (0.0 if dev_type == "cpu" else 1.0 if dev_type == "cuda" or gpus >= 1 else 0.0)
    if num_gpus_per_actor > 0 and dev_type == "cpu":
        raise ValueError(f"device={device!r} with num_gpus_per_actor={num_gpus_per_actor:g}: the actors would hold GPUs "
                         "and not use them; give device='cuda', or num_gpus_per_actor=0 to encode on CPUs")
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
        if dev_type not in (None, "cpu"):
            raise ValueError(f"device={device!r} with num_gpus_per_actor=0: Ray would not give the actors a GPU; "
                             "give num_gpus_per_actor >= 1, or device='cpu'")
        num_actors = num_actors or 1
        if num_cpus_per_actor is None:
            # a CPU forward pass runs as many threads as CPUs reserved (Ray sets OMP_NUM_THREADS)
            num_cpus_per_actor = max(2.0, float(num_cpus_per_decode) + 1)
        if float(num_cpus_per_actor) == float(num_cpus_per_decode):
            # equal requests let Ray Data fuse decoding into the encoder actors: one actor would then decode and
            # encode in turn, and the CPU decode stage would be gone
            raise ValueError(f"num_cpus_per_actor={num_cpus_per_actor:g} equals num_cpus_per_decode: Ray Data would "
                             "fuse decoding into the encoder actors. Give the two stages different CPU counts.")
    if num_actors < 1:
        raise ValueError(f"num_actors={num_actors}: expected >= 1")
    need = num_actors * num_cpus_per_actor + WRITER_CPUS + num_cpus_per_decode
    if cpus < need:
        raise RayResourceError(
            f"{num_actors} encoder actor(s) x {num_cpus_per_actor:g} CPU, the chunk writer ({WRITER_CPUS:g} CPU) and one "
            f"decode task x {num_cpus_per_decode:g} CPU need {need:g} CPUs; the Ray cluster has {cpus:g}, so decoding "
            "could never run. Lower num_actors or num_cpus_per_actor, or declare more CPUs (ray start --num-cpus N).")
    dev = device or ("cuda" if num_gpus_per_actor > 0 else "cpu")
    return int(num_actors), float(num_gpus_per_actor), float(num_cpus_per_actor), dev


def _pipeline(ray, batches: list[dict], *, decode: dict, encode: dict, write: dict, num_decoders: int | None,
              num_cpus_per_decode: float, num_actors: int, num_cpus_per_actor: float, num_gpus_per_actor: float):
    """The three stages as one Ray Dataset (lazy: nothing runs until it is iterated)."""
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    ds = ray.data.from_items(batches, override_num_blocks=len(batches))
    ds.context.enable_progress_bars = False  # one bar, ours, counting images
    ds = ds.map_batches(_decode, batch_size=1, batch_format="numpy", compute=TaskPoolStrategy(size=num_decoders),
                        num_cpus=num_cpus_per_decode, fn_kwargs=decode)
    ds = ds.map_batches(_Encoder, batch_size=1, batch_format="numpy", compute=ActorPoolStrategy(size=num_actors),
                        num_cpus=num_cpus_per_actor, num_gpus=num_gpus_per_actor, fn_constructor_kwargs=encode)
    return ds.map_batches(_ChunkWriter, batch_size=None, batch_format="numpy", compute=ActorPoolStrategy(size=1),
                          num_cpus=WRITER_CPUS, fn_constructor_kwargs=write)


def extract_ray(encoder: str, cohort, out: str | os.PathLike, *,
                panel: "Panel | str | Sequence[PerturbationCell] | None" = None, n_images: int | None = None,
                seed: int = 0, store_grid: bool = False, batch_size: int = 16, chunk_size: int | None = None,
                weights: str | None = None, stand_in: bool = False, device: str | None = None,
                dtype: "str | torch.dtype" = "float32", input_size: int | None = None,
                resize_short: int | None = None, address: str | None = None,
                num_actors: int | None = None, num_gpus_per_actor: float | None = None,
                num_cpus_per_actor: float | None = None, num_cpus_per_decode: float = 1,
                num_decoders: int | None = None, progress: bool = True,
                cohort_options: Mapping | None = None) -> ExtractResult:
    """:func:`cxrcore.extract.extract` on a Ray cluster: the same store (same chunks, rows, provenance); resumable.

    ``encoder``: an encoder key; every actor builds the encoder itself from ``weights`` /
    ``stand_in`` / ``dtype`` / ``input_size`` / ``resize_short`` (the weights must be readable on every node,
    and ``out`` writable from every node). ``address``: a Ray cluster (``"auto"``: the one
    this machine belongs to); default: the current Ray connection (kept as it is), else
    ``$RAY_ADDRESS``, else a new local instance (never a stale cluster found in /tmp/ray),
    left running as Ray Data leaves it. ``num_gpus_per_actor``: default 0
    for ``device="cpu"``, 1 for ``device="cuda"``, else 1 when the cluster has GPUs and 0 when
    not (CPU actors run ``num_cpus_per_actor`` threads, default 2); ``device``: default
    ``cuda`` for GPU actors. ``num_actors``: default one per GPU (one on CPUs).
    ``num_decoders``: most decode tasks at once (default: as many as free CPUs allow).
    ``batch_size`` and ``chunk_size`` mean what they mean for ``extract()``, with the same
    defaults, so either backend resumes the other's store. Raises :class:`RayResourceError`
    at once when the cluster cannot host the pool.
    """
    if not isinstance(encoder, str):
        raise TypeError(f"extract_ray takes an encoder key (e.g. 'rad-dino'), not {type(encoder).__name__}: each Ray "
                        "actor builds its own encoder from the key, weights, stand_in, dtype, input_size and "
                        "resize_short")
    ray = _import_ray()
    t0 = time.perf_counter()
    pan = None if panel is None else load_panel(panel)
    cells = tuple(pan.cells) if pan is not None else ()
    n = len(cohort) if n_images is None else min(int(n_images), len(cohort))
    if n < 1:
        raise ValueError(f"cohort {getattr(cohort, 'name', '?')} has no images to extract")
    dt = _as_dtype(dtype)
    _connect(ray, address)
    n_act, gpa, cpa, dev = _check_resources(ray, num_actors, num_gpus_per_actor, num_cpus_per_actor,
                                            num_cpus_per_decode, device)
    common = dict(cohort_name=getattr(cohort, "name", type(cohort).__name__), panel=pan, seed=int(seed), n_images=n,
                  cohort_options=dict(cohort_options or {}), store_grid=bool(store_grid))
    enc_args = dict(key=encoder, weights=weights, stand_in=stand_in, device=dev, dtype=dt, input_size=input_size,
                    resize_short=resize_short)
    probe = ray.remote(_probe).options(num_cpus=cpa, num_gpus=gpa)
    with _plain_errors(ray):
        prov, pre = ray.get(probe.remote(encoder, weights, stand_in, dev, dt, input_size, resize_short, common))

    cs = int(chunk_size or default_chunk_size(store_grid, len(cells)))
    out = open_store(out, prov, {"n_images": n, "chunk_size": cs})
    mine = shard_chunks(n, cs, (0, 1))
    remove_stale_temporaries(out, mine)
    done = done_chunks(out)
    todo = [c for c in mine if c not in done]
    written = images = passes = 0
    if todo:
        shared = ray.put((cohort, _boxes_of(cohort) if not cells else {}))
        ds = _pipeline(ray, forward_batches(todo, batch_size, len(cells)),
                       decode=dict(shared=shared, cells=cells, seed=int(seed), preprocessor=pre),
                       encode=dict(**enc_args, provenance=prov, store_grid=bool(store_grid), common=common),
                       write=dict(out=str(out), provenance=prov, store_grid=bool(store_grid),
                                  label_columns=list(getattr(cohort, "label_columns", []))),
                       num_decoders=num_decoders, num_cpus_per_decode=num_cpus_per_decode, num_actors=n_act,
                       num_cpus_per_actor=cpa, num_gpus_per_actor=gpa)
        from tqdm.auto import tqdm

        with _plain_errors(ray), tqdm(total=sum(e - s for s, e in todo), unit="img",
                                      desc=f"{encoder} (ray) -> {out.name}", disable=not progress) as bar:
            for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
                k = int(np.sum(b["end"] - b["start"]))
                written += len(b["start"])
                images += k
                passes += int(np.sum(b["passes"]))
                bar.update(k)
        missing = sorted(set(todo) - done_chunks(out))
        if missing:  # e.g. the writer actor died and was restarted, losing the batches it held
            raise StoreError(f"{out}: {len(missing)} chunk(s) not written by this run (first: positions "
                             f"[{missing[0][0]}, {missing[0][1]})); a Ray worker was lost. Run again to resume.")
    return ExtractResult(out, (0, 1), len(mine), len(mine) - len(todo), written, images, passes,
                         time.perf_counter() - t0)
