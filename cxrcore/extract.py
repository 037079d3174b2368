"""Extraction: run an encoder over a cohort (optionally through a perturbation panel).

Each image goes through the encoder once; ``cls``, ``patch_mean`` and every box's
``roi_local`` come from that single forward pass.

The work is split in three pure steps so the same code runs in a notebook, on one GPU
node (``cxrcore extract``) or under a distributed engine:

1. :func:`load_item` (in DataLoader workers): read one base image, hash it, and make its
   *passes*: the image itself (with one box per cell, or the cohort's boxes) and one
   perturbed copy per panel cell (with its box); optionally preprocess each pass.
2. :func:`encode_batch`: one forward pass over a batch of passes -> row columns. A pure
   function of the batch (and the encoder), so it maps directly onto Ray Data
   ``map_batches`` or ``dask.bag.map_partitions`` (:class:`BatchEncoder` is the callable).
3. :mod:`cxrcore.store`: rows grouped into chunks, written atomically with provenance.
"""

from __future__ import annotations

import copy
import hashlib
import os
import sys
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from . import __version__
from .cohorts.base import Cohort
from .encoders.base import Encoder, Encoding
from .geometry import Geometry
from .perturb import Panel, PerturbationCell, load_panel, placement_map, random_location  # noqa: F401  (re-exported)
from .pooling import POOLING_MODES, excluded_reasons, patch_mean, roi_local
from .store import (Embeddings, chunk_ranges, done_chunks, file_sha256, geometry_to_json, image_hash, open_store,
                    parse_shard, remove_stale_temporaries, shard_chunks, write_chunk)

__all__ = ["Embeddings", "BatchEncoder", "ExtractResult", "Pass", "encode_batch", "encode_cohort", "encode_panel", "extract",
           "load_item", "read_with_mask", "run_provenance", "weights_id"]


# -- base images, with a cache for generated cohorts -----------------------------------------------------
class _ImageCache:
    """Per-cohort LRU of (image, lung mask), bounded in bytes.

    The phantom costs ~0.4 s per 512 px image to draw; a panel notebook reads each base
    image once per encoder, so caching it makes six encoders cost one generation.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._by_cohort: "weakref.WeakKeyDictionary[Cohort, OrderedDict]" = weakref.WeakKeyDictionary()
        self._bytes: "weakref.WeakKeyDictionary[Cohort, int]" = weakref.WeakKeyDictionary()

    def get(self, cohort: Cohort, index: int):
        d = self._by_cohort.get(cohort)
        if d is None or index not in d:
            return None
        d.move_to_end(index)
        return d[index]

    def put(self, cohort: Cohort, index: int, value: tuple[np.ndarray, np.ndarray | None]) -> None:
        size = sum(v.nbytes for v in value if v is not None)
        if size > self.max_bytes:
            return
        d = self._by_cohort.setdefault(cohort, OrderedDict())
        total = self._bytes.get(cohort, 0) + size
        d[index] = value
        while total > self.max_bytes and d:
            _, old = d.popitem(last=False)
            total -= sum(v.nbytes for v in old if v is not None)
        self._bytes[cohort] = total

    def clear(self) -> None:
        self._by_cohort.clear()
        self._bytes.clear()


#: Cache of generated base images; size from CXRCORE_IMAGE_CACHE_MB (default 1024, 0 disables).
IMAGE_CACHE = _ImageCache(int(os.environ.get("CXRCORE_IMAGE_CACHE_MB", "1024")) << 20)


def read_with_mask(cohort: Cohort, index: int, *, cache: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Image ``index`` and, where the cohort knows it (the phantom), its lung mask; one read.

    Generated cohorts (``cohort.synthetic``) are cached (:data:`IMAGE_CACHE`); files are not,
    since re-reading a file is cheap and the cohort may be large. Treat the arrays as read-only.
    """
    cacheable = cache and getattr(cohort, "synthetic", False)
    if cacheable:
        hit = IMAGE_CACHE.get(cohort, index)
        if hit is not None:
            return hit
    phantom = getattr(cohort, "phantom", None)
    if phantom is None:
        out = (cohort.read_image(index), None)
    else:
        ph = phantom(index)
        out = (ph.image, ph.lung_mask)
    if cacheable:
        for a in out:
            if a is not None:
                a.setflags(write=False)
        IMAGE_CACHE.put(cohort, index, out)
    return out


# -- one base image -> its forward passes ---------------------------------------------------------------
@dataclass
class Pass:
    """One forward pass worth of input: an image (or its preprocessed pixels), its boxes, its rows.

    ``rows[k]`` is the metadata of box ``k`` (or the single row of a pass without boxes).
    """

    pass_id: int
    image: np.ndarray | None
    boxes: list[tuple[float, float, float, float]]
    rows: list[dict]
    pixels: torch.Tensor | None = None  # [3, S, S], when preprocessed in a worker
    geometry: Geometry | None = None


def _labels(cohort: Cohort, row: pd.Series) -> dict:
    return {c: float(row[c]) for c in getattr(cohort, "label_columns", [])}


def _boxes_of(cohort: Cohort) -> dict[str, pd.DataFrame]:
    b = getattr(cohort, "boxes", None)
    if b is None or len(b) == 0:
        return {}
    return {k: v for k, v in b.groupby("image_id", sort=False)}


def load_item(cohort: Cohort, position: int, cells: Sequence[PerturbationCell] = (), *, seed: int = 0,
              boxes: Mapping[str, pd.DataFrame] | None = None, cache: bool = True,
              preprocessor: Encoder | None = None) -> list[Pass]:
    """Read base image ``position`` and build its passes (paired design when ``cells`` is given).

    Pass 0 is the unperturbed image. With cells, it carries one box per cell (arm 0) and
    pass ``c + 1`` the image perturbed in cell ``c`` with that same box (arm 1). Without
    cells, pass 0 carries the cohort's boxes for the image (one row per box; one row with
    no box when it has none). ``pass_id = position * (len(cells) + 1) + k`` is unique in a run.
    """
    row = cohort.metadata.iloc[position]
    base, mask = read_with_mask(cohort, position, cache=cache)
    ident = {"image_index": int(position), "image_id": str(row["image_id"]), "patient_id": str(row["patient_id"]),
             "study_id": None if pd.isna(row.get("study_id")) else str(row.get("study_id")),
             **_labels(cohort, row), "image_hash": image_hash(base), "seed": int(seed)}
    n_pass = len(cells) + 1
    pid0 = int(position) * n_pass
    passes: list[Pass] = []
    if cells:
        dist = placement_map(mask, base.shape)
        base_rows, base_boxes = [], []
        for c, cell in enumerate(cells):
            pert, box, center = cell.place_and_apply(base, mask, seed=seed, image_index=position, distance=dist)
            cmeta = {"cell": cell.name, "kind": cell.kind, "footprint_px": cell.footprint_px, "strength": cell.strength,
                     "center_y": center[0], "center_x": center[1], "box_index": 0, "box_class": None,
                     "x1": float(box[0]), "y1": float(box[1]), "x2": float(box[2]), "y2": float(box[3])}
            base_boxes.append(box)
            base_rows.append({**ident, **cmeta, "arm": 0, "pass_id": pid0, "box_index": c})
            passes.append(Pass(pid0 + c + 1, pert, [box], [{**ident, **cmeta, "arm": 1, "pass_id": pid0 + c + 1}]))
        passes.insert(0, Pass(pid0, base, base_boxes, base_rows))
    else:
        empty = {"cell": None, "kind": None, "footprint_px": np.nan, "strength": np.nan, "center_y": np.nan,
                 "center_x": np.nan, "arm": -1, "pass_id": pid0}
        b = (boxes or {}).get(ident["image_id"])
        if b is None or len(b) == 0:
            rows = [{**ident, **empty, "box_index": -1, "box_class": None, "x1": np.nan, "y1": np.nan, "x2": np.nan, "y2": np.nan}]
            bl = []
        else:
            bl = [tuple(float(v) for v in r) for r in b[["x1", "y1", "x2", "y2"]].to_numpy()]
            rows = [{**ident, **empty, "box_index": k, "box_class": str(cl), "x1": x[0], "y1": x[1], "x2": x[2], "y2": x[3]}
                    for k, (x, cl) in enumerate(zip(bl, b["class"].to_numpy()))]
        passes.append(Pass(pid0, base, bl, rows))
    if preprocessor is not None:
        for p in passes:
            x, geoms = preprocessor.preprocess([p.image])
            p.pixels, p.geometry, p.image = x[0], geoms[0], None
    return passes


# -- one batch of passes -> rows ---------------------------------------------------------------------------
def encode_batch(encoder: Encoder, passes: Sequence[Pass], *, store_grid: bool = False) -> tuple[list[dict], dict[str, np.ndarray], dict | None]:
    """One forward pass over ``passes`` -> (row metadata, ``features[mode] [rows, D]``, grids or None).

    Pure in the batch: the same passes give the same rows wherever this runs. ``roi_local``
    rows without a box are NaN. Grids (``store_grid``) are float16, one per pass.
    """
    if not passes:
        return [], {m: np.zeros((0, 0), np.float32) for m in POOLING_MODES}, None
    boxes = [p.boxes for p in passes]
    if all(p.pixels is not None for p in passes):
        # preprocessed in a DataLoader worker: same steps as Encoder.encode, split at the forward pass
        x = torch.stack([p.pixels for p in passes]).to(encoder.device)
        geoms = [p.geometry for p in passes]
        glob, grid = encoder.forward(x)
        roi, owner, visible = roi_local(grid, geoms, boxes, return_visible=True)
        excluded = excluded_reasons(visible)
        cls_, pm = glob.cpu().numpy(), patch_mean(grid).cpu().numpy()
        grid_np = grid.cpu().numpy() if store_grid else None
    else:
        enc = encoder.encode([p.image for p in passes], boxes=boxes, return_grid=store_grid)
        roi, owner, cls_, pm, geoms, grid_np = enc.roi_local, enc.roi_image, enc.cls, enc.patch_mean, enc.geometry, enc.grid
        visible, excluded = enc.roi_visible, enc.roi_excluded
    dim = cls_.shape[1]
    rows: list[dict] = []
    f_cls, f_pm, f_roi = [], [], []
    k = 0
    for b, p in enumerate(passes):
        gj = geometry_to_json(geoms[b])
        for j, r in enumerate(p.rows):
            rows.append({**r, "geometry": gj, "roi_visible": np.nan, "roi_excluded": None})
            f_cls.append(cls_[b])
            f_pm.append(pm[b])
            if p.boxes:
                assert owner[k + j] == b
                f_roi.append(roi[k + j])  # NaN when the box was excluded; the row says why
                rows[-1].update(roi_visible=float(visible[k + j]), roi_excluded=excluded[k + j] or None)
            else:
                f_roi.append(np.full(dim, np.nan, np.float32))
        k += len(p.boxes)
    feats = {"cls": np.stack(f_cls).astype(np.float32), "patch_mean": np.stack(f_pm).astype(np.float32),
             "roi_local": np.stack(f_roi).astype(np.float32)}
    grids = None
    if store_grid:
        grids = {"pass_id": np.array([p.pass_id for p in passes], np.int64), "grid": grid_np.astype(np.float16),
                 "geometry": [geometry_to_json(g) for g in geoms]}
    return rows, feats, grids


class BatchEncoder:
    """The per-batch work as a callable for distributed engines (Ray Data ``map_batches``, Dask).

    ``BatchEncoder("rad-dino", stand_in=True)(batch)`` takes a dict of columns with
    ``image`` (2-D arrays) and optional ``boxes`` (one list of boxes per image); any other
    column is passed through, repeated once per box. Returns a dict of columns with
    ``cls``, ``patch_mean``, ``roi_local`` (``[rows, D]``; NaN rows where an image has no box).
    For Ray: ``ds.map_batches(BatchEncoder, fn_constructor_kwargs={...}, batch_format="numpy",
    concurrency=n_gpus, num_gpus=1)``.
    """

    def __init__(self, key: str, *, stand_in: bool = False, weights: str | None = None, device: str = "cpu",
                 encoder: Encoder | None = None) -> None:
        from .encoders import load_encoder

        self.encoder = encoder or load_encoder(key, weights=weights, stand_in=stand_in, device=device)

    def __call__(self, batch: Mapping[str, Sequence]) -> dict[str, np.ndarray]:
        images = list(batch["image"])
        boxes = list(batch["boxes"]) if "boxes" in batch else [[] for _ in images]
        others = [k for k in batch if k not in ("image", "boxes")]
        passes = []
        for i, (img, bl) in enumerate(zip(images, boxes)):
            bl = [tuple(float(v) for v in b) for b in (bl if bl is not None else [])]
            base = {k: batch[k][i] for k in others}
            rows = [dict(base, box_index=j) for j in range(len(bl))] or [dict(base, box_index=-1)]
            passes.append(Pass(i, np.asarray(img), bl, rows))
        rows, feats, _ = encode_batch(self.encoder, passes)
        out = {k: np.asarray([r[k] for r in rows]) for k in rows[0] if k != "geometry"} if rows else {}
        out.update(feats)
        return out


# -- provenance -----------------------------------------------------------------------------------------------
def _state_dict_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def weights_id(encoder: Encoder) -> str:
    """What weights ran: a content hash for stand-ins and local files, the hub revision where it is cached.

    Local directories hash their weight files (``*.safetensors``, ``*.bin``, ``*.pt``,
    ``*.pth``, ``*.json``). A hub id is resolved offline from the local Hugging Face cache;
    if not cached the id alone is recorded (``@unresolved``).
    """
    if encoder.stand_in and not Path(str(encoder.weights)).exists():
        return f"stand-in:{_state_dict_hash(encoder.model)}"
    p = Path(str(encoder.weights))
    if p.is_file():
        return f"sha256:{file_sha256(p)[:16]}"
    if p.is_dir():
        h = hashlib.sha256()
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".json"))
        for f in files:
            h.update(str(f.relative_to(p)).encode())
            h.update(file_sha256(f).encode())
        return f"dir-sha256:{h.hexdigest()[:16]}"
    repo = str(encoder.weights).removeprefix("hf-hub:")
    try:
        from huggingface_hub import try_to_load_from_cache

        got = try_to_load_from_cache(repo, "config.json")
        if isinstance(got, str):
            return f"hub:{repo}@{Path(got).parent.name}"
    except (ImportError, ValueError, OSError):
        pass
    return f"hub:{repo}@unresolved"


def run_provenance(encoder: Encoder, cohort: Cohort, *, panel: Panel | None, seed: int, n_images: int,
                   cohort_options: Mapping | None = None, store_grid: bool = False) -> dict:
    """Everything that decides a store's content; two runs may share a store exactly when this is equal."""
    enc = encoder.provenance()
    enc.pop("citation", None)
    enc.pop("notes", None)
    return {
        "schema": 1,
        "cxrcore_version": __version__,
        "encoder": enc,
        "weights_id": weights_id(encoder),
        "cohort": {"name": getattr(cohort, "name", type(cohort).__name__), "n_images": int(n_images),
                   "options": dict(cohort_options or {})},
        "panel": None if panel is None else {"name": panel.name, "cells": [c.to_dict() for c in panel]},
        "seed": int(seed),
        "store_grid": bool(store_grid),
    }


# -- rows -> Arrow ---------------------------------------------------------------------------------------------------
_META_TYPES: dict[str, pa.DataType] = {
    "image_index": pa.int64(), "image_id": pa.string(), "patient_id": pa.string(), "study_id": pa.string(),
    "cell": pa.string(), "kind": pa.string(), "footprint_px": pa.float64(), "strength": pa.float64(),
    "arm": pa.int8(), "box_index": pa.int32(), "box_class": pa.string(),
    "x1": pa.float64(), "y1": pa.float64(), "x2": pa.float64(), "y2": pa.float64(),
    "center_y": pa.float64(), "center_x": pa.float64(), "pass_id": pa.int64(), "seed": pa.int64(),
    "image_hash": pa.string(), "geometry": pa.string(),
    # box rows: fraction of the box inside the model input; why its roi_local is null (null when pooled)
    "roi_visible": pa.float64(), "roi_excluded": pa.string(),
}


def rows_to_table(rows: list[dict], feats: Mapping[str, np.ndarray], provenance: Mapping, label_columns: Sequence[str]) -> pa.Table:
    cols: dict[str, pa.Array] = {}
    for name, typ in _META_TYPES.items():
        vals = [r.get(name) for r in rows]
        if typ in (pa.float64(),):
            vals = [None if v is None or (isinstance(v, float) and np.isnan(v)) else v for v in vals]
        cols[name] = pa.array(vals, typ)
    for c in label_columns:
        cols[c] = pa.array([r.get(c) for r in rows], pa.float64(), from_pandas=True)
    enc = provenance["encoder"]
    n = len(rows)
    cols["encoder"] = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([enc["key"]]))
    cols["weights_id"] = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([provenance["weights_id"]]))
    cols["cxrcore_version"] = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([provenance["cxrcore_version"]]))
    for m in POOLING_MODES:
        f = np.ascontiguousarray(feats[m], np.float32)
        mask = np.isnan(f).all(axis=1) if m == "roi_local" else None
        cols[m] = pa.FixedSizeListArray.from_arrays(pa.array(f.ravel()), f.shape[1],
                                                    mask=pa.array(mask) if mask is not None and mask.any() else None)
    return pa.table(cols)


def grids_to_table(grids: Mapping[str, Any]) -> pa.Table:
    g = grids["grid"]
    n, h, w, d = g.shape
    flat = pa.array(np.ascontiguousarray(g, np.float16).ravel(), pa.float16())
    return pa.table({"pass_id": pa.array(grids["pass_id"], pa.int64()),
                     "grid": pa.FixedSizeListArray.from_arrays(flat, h * w * d),
                     "grid_h": pa.array(np.full(n, h, np.int32)), "grid_w": pa.array(np.full(n, w, np.int32)),
                     "dim": pa.array(np.full(n, d, np.int32)), "geometry": pa.array(grids["geometry"], pa.string())})


# -- the in-memory panel ----------------------------------------------------------------------------------------
def encode_panel(cohort: Cohort, encoder: Encoder, cells: "Sequence[PerturbationCell] | Panel | str", *,
                 n_images: int | None = None, seed: int = 0, batch_size: int = 16, progress: bool = False,
                 return_grid: bool = False) -> Embeddings:
    """Paired perturbation panel: every base image unperturbed and perturbed in every cell.

    Rows: one per (base image, cell, arm), ``arm`` 0 = unperturbed, 1 = perturbed, with
    the same box in both arms so ``roi_local`` compares like with like. The base image
    is encoded once (with one box per cell); each perturbed copy once. ``cells`` is a list
    of cells, a :class:`~cxrcore.perturb.Panel`, or a panel name / YAML path. Base images
    of generated cohorts are cached, so a second encoder does not redraw them.
    """
    panel = load_panel(cells)
    n = len(cohort) if n_images is None else min(int(n_images), len(cohort))
    it: Iterable[int] = range(n)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"{encoder.key} panel", unit="img")
    return _encode_in_batches(encoder, (load_item(cohort, i, panel.cells, seed=seed) for i in it), batch_size)


def encode_cohort(cohort: Cohort, encoder: Encoder, *, n_images: int | None = None, boxes: bool = False,
                  batch_size: int = 16, progress: bool = False) -> Embeddings:
    """Plain (unperturbed) extraction in memory: one row per image, with its labels.

    ``boxes=True`` gives one row per box of the cohort instead (``roi_local`` pooled under
    it; images without boxes keep one row with NaN ``roi_local``). For cohorts too large
    for memory, use :func:`extract` (the ``cxrcore extract`` command) and read the store.
    """
    n = len(cohort) if n_images is None else min(int(n_images), len(cohort))
    by_image = _boxes_of(cohort) if boxes else {}
    it: Iterable[int] = range(n)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"{encoder.key} {getattr(cohort, 'name', '')}", unit="img")
    return _encode_in_batches(encoder, (load_item(cohort, i, (), boxes=by_image) for i in it), batch_size)


def encode_images(cohort: Cohort, encoder: Encoder, *, boxes: Mapping[str, Sequence] | None = None,
                  return_grid: bool = False, batch_size: int = 8) -> Encoding:
    """Every image of ``cohort`` through ``encoder`` once, in metadata order, as one :class:`Encoding`.

    ``boxes`` maps an ``image_id`` to its boxes (original pixels); their ``roi_local`` rows
    come back image by image in metadata order, each image's in the order given, with
    ``roi_image`` the image's row in ``cohort.metadata``. ``return_grid`` keeps the patch
    grids (and ``geometry``) so other boxes can be re-pooled later without a forward pass.
    """
    ids = cohort.metadata["image_id"].tolist()
    parts: list[Encoding] = []
    for start in range(0, len(ids), batch_size):
        batch = ids[start:start + batch_size]
        parts.append(encoder.encode([cohort.read_image(start + k) for k in range(len(batch))],
                                    boxes=[list((boxes or {}).get(i, [])) for i in batch], return_grid=return_grid))
        parts[-1].roi_image = parts[-1].roi_image + start
    return Encoding(
        cls=np.concatenate([e.cls for e in parts]), patch_mean=np.concatenate([e.patch_mean for e in parts]),
        roi_local=np.concatenate([e.roi_local for e in parts]), roi_image=np.concatenate([e.roi_image for e in parts]),
        geometry=[g for e in parts for g in e.geometry],
        grid=np.concatenate([e.grid for e in parts]) if return_grid else None,
    )


def _encode_in_batches(encoder: Encoder, items: Iterable[list[Pass]], batch_size: int) -> Embeddings:
    """Gather the forward passes of ``items`` into batches of about ``batch_size`` and encode each once."""
    rows: list[dict] = []
    feats: dict[str, list[np.ndarray]] = {m: [] for m in POOLING_MODES}
    pending: list[Pass] = []

    def flush() -> None:
        r, f, _ = encode_batch(encoder, pending)
        rows.extend(r)
        for m in POOLING_MODES:
            feats[m].append(f[m])
        pending.clear()

    for passes in items:
        pending.extend(passes)
        if len(pending) >= batch_size:
            flush()
    if pending:
        flush()
    return Embeddings(pd.DataFrame(rows), {m: np.concatenate(v) for m, v in feats.items()})


# -- the store-writing extraction ---------------------------------------------------------------------------
@dataclass
class ExtractResult:
    """What a call to :func:`extract` did."""

    out: Path
    shard: tuple[int, int]
    chunks_total: int  # chunks this shard owns
    chunks_done_before: int  # already in the store when the run started (resumed)
    chunks_written: int
    images: int  # base images encoded in this run
    passes: int  # forward passes (images + perturbed copies)
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


class _Items(torch.utils.data.Dataset):
    def __init__(self, cohort, positions, cells, seed, boxes, preprocessor) -> None:
        self.cohort, self.positions, self.cells, self.seed = cohort, positions, cells, seed
        self.boxes, self.preprocessor = boxes, preprocessor

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, k: int) -> tuple[int, list[Pass]]:
        pos = int(self.positions[k])
        return pos, load_item(self.cohort, pos, self.cells, seed=self.seed, boxes=self.boxes, cache=False,
                              preprocessor=self.preprocessor)


def _identity(x):
    return x


def _cpu_preprocessor(encoder: Encoder) -> Encoder:
    """A copy of ``encoder`` without its model, preprocessing on the CPU: cheap to send to DataLoader workers."""
    pre = copy.copy(encoder)
    pre.model = None
    pre.device = torch.device("cpu")
    pre._mean, pre._std = encoder._mean.cpu(), encoder._std.cpu()
    return pre


def default_chunk_size(store_grid: bool, n_cells: int) -> int:
    """Images per chunk: ~512 rows' worth of passes, fewer when grids (large) are kept in memory until written."""
    per_image = n_cells + 1
    return max(1, (64 if store_grid else 512) // per_image)


def extract(encoder: Encoder, cohort: Cohort, out: str | os.PathLike, *, panel: "Panel | str | Sequence[PerturbationCell] | None" = None,
            n_images: int | None = None, seed: int = 0, shard: "str | tuple[int, int] | None" = None,
            store_grid: bool = False, batch_size: int = 16, num_workers: int | None = None,
            chunk_size: int | None = None, progress: bool = True, cohort_options: Mapping | None = None,
            preprocess_in_workers: bool = True) -> ExtractResult:
    """Run ``encoder`` over ``cohort`` (through ``panel`` if given) into the store at ``out``; resumable.

    Chunks already in ``out`` are checked against this run's provenance and skipped; a
    mismatch raises :class:`cxrcore.store.ProvenanceMismatchError`. ``shard="i/n"`` does
    only this job's chunks (every n-th). Images are decoded (and perturbed, and
    preprocessed) in ``num_workers`` DataLoader workers (default: CPU count - 1, at most 8).
    """
    t0 = time.perf_counter()
    pan = None if panel is None else load_panel(panel)
    cells = tuple(pan.cells) if pan is not None else ()
    n = len(cohort) if n_images is None else min(int(n_images), len(cohort))
    if n < 1:
        raise ValueError(f"cohort {getattr(cohort, 'name', '?')} has no images to extract")
    i_shard = parse_shard(shard)
    cs = int(chunk_size or default_chunk_size(store_grid, len(cells)))
    prov = run_provenance(encoder, cohort, panel=pan, seed=seed, n_images=n, cohort_options=cohort_options,
                          store_grid=store_grid)
    out = open_store(out, prov, {"n_images": n, "chunk_size": cs})
    mine = shard_chunks(n, cs, i_shard)
    remove_stale_temporaries(out, mine)
    done = done_chunks(out)
    todo = [c for c in mine if c not in done]
    positions = np.concatenate([np.arange(s, e) for s, e in todo]) if todo else np.zeros(0, np.int64)
    if num_workers is None:
        num_workers = max(0, min(8, (os.cpu_count() or 1) - 1))
    pre = _cpu_preprocessor(encoder) if preprocess_in_workers else None
    dataset = _Items(cohort, positions, cells, seed, _boxes_of(cohort) if not cells else {}, pre)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers,
                                         collate_fn=_identity, prefetch_factor=4 if num_workers else None)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(positions), unit="img", desc=f"{encoder.key} -> {out.name}", disable=not progress,
               file=sys.stderr, smoothing=0.1)
    label_columns = list(getattr(cohort, "label_columns", []))
    chunk_iter = iter(todo)
    cur = next(chunk_iter, None)
    rows: list[dict] = []
    feats: dict[str, list[np.ndarray]] = {m: [] for m in POOLING_MODES}
    grid_parts: list[dict] = []
    pending: list[Pass] = []
    n_img = n_pass = written = 0

    def flush() -> None:
        nonlocal n_pass
        if not pending:
            return
        r, f, g = encode_batch(encoder, pending, store_grid=store_grid)
        rows.extend(r)
        for m in POOLING_MODES:
            feats[m].append(f[m])
        if g is not None:
            grid_parts.append(g)
        n_pass += len(pending)
        pending.clear()

    def write(start: int, end: int) -> None:
        nonlocal written
        flush()
        table = rows_to_table(rows, {m: np.concatenate(v) for m, v in feats.items()}, prov, label_columns)
        gt = None
        if store_grid:
            gt = grids_to_table({"pass_id": np.concatenate([g["pass_id"] for g in grid_parts]),
                                 "grid": np.concatenate([g["grid"] for g in grid_parts]),
                                 "geometry": [x for g in grid_parts for x in g["geometry"]]})
        write_chunk(out, start, end, table, prov, gt)
        rows.clear()
        grid_parts.clear()
        for m in POOLING_MODES:
            feats[m].clear()
        written += 1

    try:
        for pos, passes in loader:
            assert cur is not None and cur[0] <= pos < cur[1], (pos, cur)
            pending.extend(passes)
            n_img += 1
            if len(pending) >= batch_size:
                flush()
            if pos == cur[1] - 1:
                write(*cur)
                cur = next(chunk_iter, None)
            bar.update(1)
    finally:
        bar.close()
    return ExtractResult(out, i_shard, len(mine), len(mine) - len(todo), written, n_img, n_pass,
                         time.perf_counter() - t0)
