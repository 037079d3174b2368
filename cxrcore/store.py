"""The embedding store: Parquet chunks written atomically, checked for provenance, read back as one table.

Layout of a store directory::

    store.json                       run provenance (encoder, weights id, cohort, panel, seed, ...)
    part-000000000-000000256.parquet embedding rows of cohort positions [0, 256): one row per
                                     (image, cell, arm, box); cls / patch_mean / roi_local as
                                     fixed-size float32 lists
    grids-000000000-000000256.parquet  (with --store-grid) one row per forward pass: the
                                     float16 patch grid and its geometry, for :func:`repool`

A chunk is complete exactly when its ``part-`` file exists: the file is written to a
temporary name and renamed (``os.replace``, atomic on POSIX), and its grids file, if any,
is renamed into place before it. A run killed at any moment therefore leaves only whole
chunks behind, and a restart skips them: every image ends up in the store exactly once.
Every chunk carries the run's provenance in its Parquet footer; a chunk whose provenance
does not match the current run is refused, never mixed in. The footer also says which
shard (``i/n``) wrote the chunk, so :func:`store_status` can name the job to rerun for a
chunk that is still missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .geometry import Geometry
from .pooling import POOLING_MODES, roi_local

#: Bumped whenever the row layout changes; part of every store's provenance.
STORE_SCHEMA_VERSION = 1
STORE_FILE = "store.json"
PROVENANCE_KEY = b"cxrcore.provenance"
CHUNK_KEY = b"cxrcore.chunk"
_PART_RE = re.compile(r"^part-(\d{9})-(\d{9})\.parquet$")


class StoreError(ValueError):
    """A store on disk does not match what was asked of it; the message says which file and what to do."""


class ProvenanceMismatchError(StoreError):
    """A chunk (or store.json) was made by a different encoder, weights or parameters than this run."""


# -- the in-memory result -------------------------------------------------------------------------
@dataclass
class Embeddings:
    """Row-aligned metadata and one ``[N, D]`` float32 array per pooling mode.

    ``roi_local`` rows without a box are NaN. ``provenance`` is the run's provenance
    (as in ``store.json``, also for embeddings encoded in-process by
    :func:`cxrcore.extract.embeddings`). ``grids`` holds the float16 patch grid of every
    forward pass (looked up by ``meta["pass_id"]``) when they were asked for.
    """

    meta: pd.DataFrame
    features: dict[str, np.ndarray]
    provenance: dict | None = None
    grids: "Grids | None" = None

    def __len__(self) -> int:
        return len(self.meta)

    def subset(self, mask: np.ndarray | pd.Series) -> "Embeddings":
        m = np.asarray(mask, dtype=bool)
        return Embeddings(self.meta[m].reset_index(drop=True), {k: v[m] for k, v in self.features.items()}, self.provenance,
                          self.grids)

    def cell(self, name: str) -> "Embeddings":
        """The rows (both arms) of one perturbation cell."""
        if "cell" not in self.meta or name not in set(self.meta["cell"].dropna()):
            known = sorted(set(self.meta["cell"].dropna())) if "cell" in self.meta else []
            raise KeyError(f"no perturbation cell {name!r} in these embeddings; cells: {known}")
        return self.subset(self.meta["cell"] == name)

    @property
    def cells(self) -> list[str]:
        """Perturbation cells present, in first-seen order."""
        return list(dict.fromkeys(self.meta["cell"].dropna())) if "cell" in self.meta else []


# -- provenance ----------------------------------------------------------------------------------
def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(provenance: Mapping) -> str:
    """Short stable hash of a run's provenance: equal exactly when the provenance is equal."""
    return hashlib.sha256(canonical_json(provenance).encode()).hexdigest()[:16]


def _diff(a: Mapping, b: Mapping, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif canonical_json(va) != canonical_json(vb):
            out.append(f"{prefix}{k}: stored {va!r}, this run {vb!r}")
    return out


def check_provenance(stored: Mapping, current: Mapping, where: str) -> None:
    """Raise :class:`ProvenanceMismatchError` naming ``where`` and every differing field."""
    if canonical_json(stored) == canonical_json(current):
        return
    diffs = _diff(json.loads(canonical_json(stored)), json.loads(canonical_json(current)))
    shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
    raise ProvenanceMismatchError(
        f"{where} was made by a different run ({shown}). Refusing to mix embeddings from different encoders or "
        "parameters in one store: write to a new --out directory, or rerun with the parameters the store was made with."
    )


def file_sha256(path: str | os.PathLike, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def image_hash(image: np.ndarray) -> str:
    """Content hash of decoded pixels (shape, dtype and values): the same image from any file format hashes alike."""
    a = np.ascontiguousarray(image)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{a.shape}{a.dtype.str}".encode())
    h.update(memoryview(a).cast("B"))
    return h.hexdigest()


# -- chunk files -----------------------------------------------------------------------------------
def part_name(start: int, end: int) -> str:
    return f"part-{start:09d}-{end:09d}.parquet"


def grids_name(start: int, end: int) -> str:
    return f"grids-{start:09d}-{end:09d}.parquet"


def chunk_ranges(n: int, chunk_size: int) -> list[tuple[int, int]]:
    """Cohort positions ``[start, end)`` of every chunk; the same for every shard of a run."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


def parse_shard(spec: str | tuple[int, int] | None) -> tuple[int, int]:
    """``"i/n"`` (0-based ``i``) -> ``(i, n)``."""
    if spec is None:
        return (0, 1)
    if isinstance(spec, tuple):
        i, n = spec
    else:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(spec))
        if not m:
            raise ValueError(f"--shard {spec!r}: expected i/n with 0 <= i < n, e.g. 0/4 (SLURM: $SLURM_ARRAY_TASK_ID/4)")
        i, n = int(m.group(1)), int(m.group(2))
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {i}/{n}: expected i/n with 0 <= i < n and n >= 1")
    return int(i), int(n)


#: The job-array variables Slurm sets in every array task (https://slurm.schedmd.com/job_array.html).
SLURM_ARRAY_VARIABLES = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN",
                         "SLURM_ARRAY_TASK_MAX", "SLURM_ARRAY_TASK_STEP", "SLURM_ARRAY_JOB_ID")


def shard_from_environment(environ: Mapping[str, str] | None = None) -> tuple[tuple[int, int], dict | None]:
    """The shard of this Slurm array task, ``((i, n), slurm)``; ``((0, 1), None)`` outside an array.

    ``i`` counts tasks from 0 whatever the array's first index: ``--array=1-16`` gives
    ``SLURM_ARRAY_TASK_ID`` 1..16 and ``i`` 0..15; a step (``--array=0-30:2``) is divided
    out; a throttle (``--array=0-15%4``) changes only how many run at once, not the ids
    or the count. An index list that is not one evenly stepped range (``--array=1,2,9``)
    cannot be mapped to shards: the error says to pass ``--shard i/n``. ``slurm`` holds
    the array's variables (recorded in each chunk, so ``cxrcore status`` can name the
    task to rerun).
    """
    env = os.environ if environ is None else environ
    if "SLURM_ARRAY_TASK_ID" not in env:
        return (0, 1), None
    try:
        task = int(env["SLURM_ARRAY_TASK_ID"])
        count = int(env["SLURM_ARRAY_TASK_COUNT"])
        first = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        step = int(env.get("SLURM_ARRAY_TASK_STEP", 1) or 1)
        last = int(env.get("SLURM_ARRAY_TASK_MAX", first + step * (count - 1)))
    except (KeyError, ValueError) as e:
        raise ValueError(f"Slurm array variables {({k: env.get(k) for k in SLURM_ARRAY_VARIABLES})} are incomplete or "
                         f"not integers ({e}); pass --shard i/n explicitly") from None
    if count < 1 or step < 1 or last != first + step * (count - 1) or (task - first) % step or not first <= task <= last:
        raise ValueError(
            f"Slurm array task {task} of an array with SLURM_ARRAY_TASK_MIN={first}, SLURM_ARRAY_TASK_MAX={last}, "
            f"SLURM_ARRAY_TASK_STEP={step}, SLURM_ARRAY_TASK_COUNT={count}: the indices are not one evenly stepped "
            "range (e.g. --array=1,2,9), so the shard cannot be derived; pass --shard i/n explicitly "
            "(0 <= i < n, one i per task)"
        )
    slurm = {"job_id": env.get("SLURM_ARRAY_JOB_ID"), "task_id": task, "task_min": first, "task_step": step,
             "task_count": count}
    return ((task - first) // step, count), slurm


def shard_chunks(n_images: int, chunk_size: int, shard: tuple[int, int]) -> list[tuple[int, int]]:
    """The chunks shard ``i`` of ``n`` owns: every n-th chunk, starting at chunk ``i``.

    Disjoint across shards and covering the cohort; a chunk is never split, so shards
    never write the same file and a store may be finished with a different ``n``.
    """
    i, n = parse_shard(shard)
    return [r for k, r in enumerate(chunk_ranges(n_images, chunk_size)) if k % n == i]


def _atomic_write_table(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())  # so a crash of the machine, not only of the process, leaves whole chunks
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_chunk(directory: str | os.PathLike, start: int, end: int, rows: pa.Table, provenance: Mapping,
                grids: pa.Table | None = None, *, chunk_info: Mapping | None = None) -> Path:
    """Write one chunk atomically: grids first (if any), then the part file that marks the chunk complete.

    ``chunk_info`` is recorded in the chunk's footer beside its range, e.g. ``{"shard": [i, n]}``
    (what :func:`store_status` reads to name the shard to rerun) and ``{"slurm": {...}}``.
    """
    d = Path(directory)
    info = {**dict(chunk_info or {}), "start": start, "end": end, "rows": rows.num_rows}
    meta = {PROVENANCE_KEY: canonical_json(provenance).encode(), CHUNK_KEY: canonical_json(info).encode()}
    if grids is not None:
        _atomic_write_table(grids.replace_schema_metadata(meta), d / grids_name(start, end))
    path = d / part_name(start, end)
    _atomic_write_table(rows.replace_schema_metadata(meta), path)
    return path


def chunk_provenance(path: str | os.PathLike) -> dict:
    """The provenance stored in a chunk's Parquet footer (reads only the footer)."""
    try:
        md = pq.read_schema(path).metadata or {}
    except (pa.ArrowInvalid, OSError) as e:
        raise StoreError(f"{path}: not a readable Parquet chunk ({e}); delete it and rerun to redo that chunk") from e
    if PROVENANCE_KEY not in md:
        raise StoreError(f"{path}: no cxrcore provenance in its footer; it was not written by cxrcore extract. "
                         "Move it out of the store directory.")
    return json.loads(md[PROVENANCE_KEY])


def chunk_info(path: str | os.PathLike) -> dict:
    """What a chunk's footer says about the chunk itself (range, rows, shard, Slurm task), without reading rows."""
    md = pq.read_schema(path).metadata or {}
    return json.loads(md[CHUNK_KEY]) if CHUNK_KEY in md else {}


def list_parts(directory: str | os.PathLike) -> list[tuple[int, int, Path]]:
    d = Path(directory)
    out = []
    for p in sorted(d.glob("part-*.parquet")):
        m = _PART_RE.match(p.name)
        if m:
            out.append((int(m.group(1)), int(m.group(2)), p))
    return out


def remove_stale_temporaries(directory: str | os.PathLike, chunks: Sequence[tuple[int, int]]) -> int:
    """Delete temporary files a killed run left for ``chunks`` (only this shard's chunks: others may be in flight)."""
    d = Path(directory)
    names = {part_name(s, e) for s, e in chunks} | {grids_name(s, e) for s, e in chunks}
    n = 0
    for p in d.glob(".*.tmp-*"):
        if p.name[1:].split(".tmp-")[0] in names:
            p.unlink(missing_ok=True)
            n += 1
    return n


def open_store(directory: str | os.PathLike, provenance: Mapping, layout: Mapping) -> Path:
    """Create the store directory, or check an existing one against this run's provenance.

    ``layout`` (``n_images``, ``chunk_size``) fixes which chunks exist; it is part of what
    must match. Every existing chunk's footer is checked too, so a chunk copied in from
    another run is refused.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    record = {"provenance": dict(provenance), "layout": dict(layout), "fingerprint": fingerprint(provenance)}
    sf = d / STORE_FILE
    if sf.exists():
        try:
            stored = json.loads(sf.read_text())
        except json.JSONDecodeError as e:
            raise StoreError(f"{sf}: not valid JSON ({e}); this directory is not a cxrcore store, or it was edited. "
                             "Write to a new --out directory.") from e
        check_provenance(stored.get("provenance", {}), record["provenance"], f"store {d} ({STORE_FILE})")
        check_provenance(stored.get("layout", {}), record["layout"], f"store {d} ({STORE_FILE}, chunk layout)")
    else:
        tmp = sf.with_name(f".{STORE_FILE}.tmp-{socket.gethostname()}-{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
        os.replace(tmp, sf)  # shards racing here write identical content
    expected = set(chunk_ranges(int(layout["n_images"]), int(layout["chunk_size"])))
    for s, e, p in list_parts(d):
        if (s, e) not in expected:
            raise StoreError(f"{p}: covers positions [{s}, {e}), which is not a chunk of this run's layout {dict(layout)}; "
                             "write to a new --out directory")
        check_provenance(chunk_provenance(p), record["provenance"], str(p))
    return d


def done_chunks(directory: str | os.PathLike) -> set[tuple[int, int]]:
    return {(s, e) for s, e, _ in list_parts(directory)}


# -- reading -------------------------------------------------------------------------------------------
def read_manifest(directory: str | os.PathLike) -> dict:
    sf = Path(directory) / STORE_FILE
    if not sf.is_file():
        raise StoreError(f"{directory}: no {STORE_FILE}; not an embedding store (run `cxrcore extract --out {directory}`)")
    return json.loads(sf.read_text())


def missing_chunks(directory: str | os.PathLike) -> list[tuple[int, int]]:
    """Chunks of the store's layout not yet written (a run in progress, killed, or shards still to run)."""
    lay = read_manifest(directory)["layout"]
    return sorted(set(chunk_ranges(int(lay["n_images"]), int(lay["chunk_size"]))) - done_chunks(directory))


@dataclass
class StoreStatus:
    """What :func:`store_status` found; ``to_dict()`` is the ``cxrcore status --json`` output."""

    directory: str
    n_images: int
    chunk_size: int
    shards: int | None  # shard count used to name the shard of a missing chunk (None: unknown)
    shards_source: str  # "argument", "chunk footers", "chunk footers (most common of ...)" or "unknown"
    chunks_total: int
    chunks_done: int
    images_done: int  # distinct positions stored in chunks of this run
    missing: list[dict]  # one per layout chunk with missing images: start, end, images, shard, slurm_task_id
    duplicated: list[dict]  # one per position stored twice: position, image_id, files, why
    duplicated_image_ids: list[dict]  # one per image id stored at more than one position
    foreign: list[dict]  # part files not of this run (provenance differs or unreadable): file, why
    off_layout: list[str]  # part files whose range is not a chunk of the layout (read, reported)

    @property
    def images_missing(self) -> int:
        return int(sum(m["images"] for m in self.missing))

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def ok(self) -> bool:
        """Complete, nothing stored twice, nothing foreign: safe to analyse."""
        return self.complete and not self.duplicated and not self.duplicated_image_ids and not self.foreign

    def rerun_shards(self) -> list[int]:
        return sorted({m["shard"] for m in self.missing if m["shard"] is not None})

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return {**asdict(self), "images_missing": self.images_missing, "complete": self.complete, "ok": self.ok,
                "rerun_shards": self.rerun_shards()}


def store_status(directory: str | os.PathLike, *, shards: int | None = None) -> StoreStatus:
    """Images done, missing and stored twice in a (possibly sharded, possibly hand-merged) store.

    Reads every part file's positions and image ids (not its embeddings). A position is
    *duplicated* when two part files hold it (an overlapping layout, or stores merged by
    hand) or one file holds the same (position, pass, box) row twice; an image id is
    duplicated when it is stored at two positions. Part files made by another run
    (provenance differs) are *foreign*: reported, their rows not counted. Each missing
    chunk is named with the shard that owns it (chunk ``k`` belongs to shard ``k % n``):
    ``n`` is ``shards`` if given, else the shard count recorded in the chunk footers.
    """
    from collections import Counter

    d = Path(directory)
    manifest = read_manifest(d)
    lay = manifest["layout"]
    n, cs = int(lay["n_images"]), int(lay["chunk_size"])
    layout = chunk_ranges(n, cs)
    expected = set(layout)
    holders: dict[int, list[str]] = {}
    ids_at: dict[str, set[int]] = {}
    duplicated: list[dict] = []
    foreign: list[dict] = []
    off_layout: list[str] = []
    shard_counts: Counter = Counter()
    slurm_of: dict[int, dict] = {}
    id_of: dict[int, str] = {}
    for s, e, p in list_parts(d):
        try:
            prov = chunk_provenance(p)
            info = chunk_info(p)
            t = pq.read_table(p, columns=["image_index", "image_id", "pass_id", "box_index"]).to_pandas()
        except (StoreError, pa.ArrowInvalid, OSError, KeyError) as ex:
            foreign.append({"file": p.name, "why": f"unreadable: {ex}"})
            continue
        if canonical_json(prov) != canonical_json(manifest["provenance"]):
            diffs = _diff(json.loads(canonical_json(prov)), json.loads(canonical_json(manifest["provenance"])))
            foreign.append({"file": p.name, "why": "made by a different run: " + "; ".join(diffs[:3])})
            continue
        if (s, e) not in expected:
            off_layout.append(p.name)
        if "shard" in info:
            shard_counts[int(info["shard"][1])] += 1
            if info.get("slurm"):
                slurm_of.setdefault(int(info["shard"][1]), info["slurm"])
        rep = t[t.duplicated(["image_index", "pass_id", "box_index"])]
        for pos in sorted(set(rep["image_index"])):
            duplicated.append({"position": int(pos), "image_id": str(rep.loc[rep.image_index == pos, "image_id"].iloc[0]),
                               "files": [p.name], "why": "the same (position, pass, box) row twice in one file"})
        for pos, iid in t[["image_index", "image_id"]].drop_duplicates().itertuples(index=False):
            holders.setdefault(int(pos), []).append(p.name)
            ids_at.setdefault(str(iid), set()).add(int(pos))
            id_of[int(pos)] = str(iid)
    for pos, files in sorted(holders.items()):
        if len(files) > 1:
            duplicated.append({"position": pos, "image_id": id_of[pos], "files": files,
                               "why": f"stored in {len(files)} part files"})
    dup_ids = [{"image_id": i, "positions": sorted(ps)} for i, ps in sorted(ids_at.items()) if len(ps) > 1]
    if shards is not None:
        n_shards, source = int(shards), "argument"
    elif len(shard_counts) == 1:
        n_shards, source = next(iter(shard_counts)), "chunk footers"
    elif shard_counts:
        n_shards = shard_counts.most_common(1)[0][0]
        source = f"chunk footers (most common of {sorted(shard_counts)}; pass --shards to choose)"
    else:
        n_shards, source = None, "unknown (no chunk records one; pass --shards n)"
    slurm = slurm_of.get(n_shards) if n_shards else None
    missing = []
    for k, (s, e) in enumerate(layout):
        gone = sum(1 for pos in range(s, e) if pos not in holders)
        if gone:
            shard = k % n_shards if n_shards else None
            task = slurm["task_min"] + shard * slurm["task_step"] if slurm and shard is not None else None
            missing.append({"start": s, "end": e, "images": gone, "shard": shard, "slurm_task_id": task})
    done = sum(1 for pos in holders if 0 <= pos < n)
    return StoreStatus(str(d), n, cs, n_shards, source, len(layout), len(layout) - len(missing), done, missing,
                       duplicated, dup_ids, foreign, off_layout)


def _fixed_to_numpy(col: pa.ChunkedArray | pa.Array, dim: int, dtype=np.float32) -> np.ndarray:
    """A fixed-size-list column -> ``[N, dim]`` array; null lists become NaN rows."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    if n == 0:
        return np.zeros((0, dim), dtype)
    if arr.null_count:
        valid = arr.is_valid().to_numpy(zero_copy_only=False)
        filled = np.full((n, dim), np.nan, dtype)
        flat = arr.filter(pa.array(valid)).flatten().to_numpy(zero_copy_only=False)
        filled[valid] = flat.reshape(-1, dim).astype(dtype, copy=False)
        return filled
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(n, dim).astype(dtype, copy=False)


def iter_store(directory: str | os.PathLike, *, columns: Sequence[str] | None = None,
               allow_incomplete: bool = False) -> Iterator[tuple[Path, pa.Table]]:
    """Yield ``(path, table)`` chunk by chunk (memory flat in store size), every chunk's provenance checked."""
    d = Path(directory)
    manifest = read_manifest(d)
    if not allow_incomplete:
        miss = missing_chunks(d)
        if miss:
            raise StoreError(
                f"{d}: {len(miss)} chunk(s) not written yet (first: positions [{miss[0][0]}, {miss[0][1]})); the run "
                "was interrupted or some --shard jobs have not finished. Rerun the same `cxrcore extract` command to "
                "resume, or read with allow_incomplete=True."
            )
    for _, _, p in list_parts(d):
        check_provenance(chunk_provenance(p), manifest["provenance"], str(p))
        yield p, pq.read_table(p, columns=list(columns) if columns else None)


def read_store(directory: str | os.PathLike, *, allow_incomplete: bool = False,
               cells: Sequence[str] | None = None, image_ids: Sequence[str] | None = None,
               modes: Sequence[str] = POOLING_MODES) -> Embeddings:
    """Read a store into :class:`Embeddings` (``meta`` plus ``features[mode]``), in chunk order.

    ``cells`` keeps only those perturbation cells, ``image_ids`` only those images (rows
    are filtered chunk by chunk, so reading a subset of a large store needs memory for
    the subset only), ``modes`` only those pooling modes. Checks that no (image, cell,
    arm, box) appears twice.
    """
    import pyarrow.compute as pc

    manifest = read_manifest(directory)
    bad = [m for m in modes if m not in POOLING_MODES]
    if bad:
        raise ValueError(f"unknown pooling mode(s) {bad}; stores hold {list(POOLING_MODES)}")
    want_ids = None if image_ids is None else pa.array([str(i) for i in image_ids], pa.string())
    metas, feats = [], {m: [] for m in modes}
    for _, t in iter_store(directory, allow_incomplete=allow_incomplete):
        if cells is not None:
            t = t.filter(pc.is_in(t["cell"], value_set=pa.array(list(cells), pa.string())))
        if want_ids is not None:
            t = t.filter(pc.is_in(t["image_id"], value_set=want_ids))
        dim = t.schema.field("cls").type.list_size
        for m in modes:
            feats[m].append(_fixed_to_numpy(t[m], dim))
        metas.append(t.drop_columns(list(POOLING_MODES)).to_pandas())
    if not metas:
        raise StoreError(f"{directory}: no chunks written yet; run `cxrcore extract` first")
    meta = pd.concat(metas, ignore_index=True)
    key = ["image_index", "pass_id", "box_index"]
    dup = meta.duplicated(key)
    if dup.any():
        raise StoreError(f"{directory}: {int(dup.sum())} duplicated row(s), first {meta.loc[dup, key].iloc[0].to_dict()}; "
                         "the store was written by overlapping runs (`cxrcore status` lists them). Re-extract into a "
                         "new directory.")
    return Embeddings(meta, {m: np.concatenate(v) for m, v in feats.items()}, manifest["provenance"])


# -- stored patch grids and re-pooling -------------------------------------------------------------
def geometry_to_json(g: Geometry) -> str:
    from dataclasses import asdict

    return canonical_json(asdict(g))


def geometry_from_json(s: str) -> Geometry:
    d = json.loads(s)
    return Geometry(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass
class Grids:
    """Stored patch grids: ``grid [N, h, w, D]`` (float16), one geometry and one ``pass_id`` per forward pass."""

    pass_id: np.ndarray
    grid: np.ndarray
    geometry: list[Geometry]

    def __len__(self) -> int:
        return len(self.pass_id)

    def index(self, pass_ids: Sequence[int]) -> np.ndarray:
        """Positions of ``pass_ids`` in this object (raises if one is not stored)."""
        pos = pd.Index(self.pass_id).get_indexer(np.asarray(pass_ids))
        if (pos < 0).any():
            raise KeyError(f"pass_id {np.asarray(pass_ids)[pos < 0][0]} has no stored grid; extract with --store-grid")
        return pos


def read_grids(directory: str | os.PathLike, *, pass_ids: Sequence[int] | None = None) -> Grids:
    """Read the float16 patch grids of a store extracted with ``--store-grid`` (only complete chunks)."""
    d = Path(directory)
    manifest = read_manifest(d)
    ids, grids, geoms = [], [], []
    want = None if pass_ids is None else pa.array(np.asarray(pass_ids, np.int64))
    for s, e, _ in list_parts(d):
        p = d / grids_name(s, e)
        if not p.exists():
            raise StoreError(f"{p}: missing; this store was extracted without --store-grid, so ROIs cannot be re-pooled "
                             "without a new forward pass. Re-extract with --store-grid.")
        check_provenance(chunk_provenance(p), manifest["provenance"], str(p))
        t = pq.read_table(p)
        if want is not None:
            import pyarrow.compute as pc

            t = t.filter(pc.is_in(t["pass_id"], value_set=want))
        if t.num_rows == 0:
            continue
        h, w, dim = (int(t[c][0].as_py()) for c in ("grid_h", "grid_w", "dim"))
        grids.append(_fixed_to_numpy(t["grid"], h * w * dim, np.float16).reshape(-1, h, w, dim))
        ids.append(t["pass_id"].to_numpy())
        geoms += [geometry_from_json(g) for g in t["geometry"].to_pylist()]
    if not grids:
        return Grids(np.zeros(0, np.int64), np.zeros((0, 0, 0, 0), np.float16), [])
    return Grids(np.concatenate(ids), np.concatenate(grids), geoms)


def repool(grids: "Grids | np.ndarray", geometry: "Geometry | Sequence[Geometry] | None", boxes,
           pass_ids: Sequence[int] | None = None) -> np.ndarray:
    """``roi_local`` for new boxes from stored grids, no forward pass: one box per grid, ``[N, D]`` float32.

    ``grids``: a :class:`Grids` (then ``geometry`` may be None and ``pass_ids`` picks the
    passes, one per box) or an array ``[N, h, w, D]`` / ``[h, w, D]`` with its geometry
    (one, or one per grid). ``boxes``: ``[N, 4]`` in original pixels. The pooling is
    :func:`cxrcore.pooling.roi_local`, the very function the encoders use, in float32.
    """
    import torch

    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    if isinstance(grids, Grids):
        pos = grids.index(pass_ids) if pass_ids is not None else np.arange(len(grids))
        g, geoms = grids.grid[pos], [grids.geometry[k] for k in pos]
    else:
        g = np.asarray(grids)
        if g.ndim == 3:
            g = g[None]
        geoms = [geometry] * len(g) if isinstance(geometry, Geometry) else list(geometry)
    if len(g) != len(b) or len(geoms) != len(b):
        raise ValueError(f"repool: {len(g)} grids, {len(geoms)} geometries and {len(b)} boxes; give one box per grid")
    out = np.empty((len(b), g.shape[-1]), np.float32)
    step = 256  # bounded float32 copies of the float16 grids
    for s in range(0, len(b), step):
        t = torch.from_numpy(np.ascontiguousarray(g[s:s + step], dtype=np.float32))
        roi, _ = roi_local(t, geoms[s:s + step], [[tuple(x)] for x in b[s:s + step]])
        out[s:s + step] = roi
    return out
