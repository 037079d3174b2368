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

Analyses get their embeddings through one function, :func:`embeddings`: from a store
written by ``cxrcore extract`` (checked against the analysis's parameters) or, without a
store, encoded in-process (:func:`encode_panel`, :func:`encode_cohort`).
"""

from __future__ import annotations

import copy
import hashlib
import os
import sys
import threading
import time
import weakref
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from . import __version__
from .cohorts.base import Cohort
from .encoders.base import DESCRIPTIVE_FIELDS, Encoder, Encoding
from .geometry import Geometry
from .perturb import Panel, PerturbationCell, load_panel, placement_map, random_location  # noqa: F401  (re-exported)
from .pooling import POOLING_MODES, excluded_reasons, patch_mean, roi_local
from .store import (Embeddings, Grids, ProvenanceMismatchError, StoreError, canonical_json, chunk_ranges, done_chunks,
                    file_sha256, geometry_from_json, geometry_to_json, image_hash, open_store, parse_shard, read_grids,
                    read_manifest, read_store, remove_stale_temporaries, repool, shard_chunks, write_chunk)

__all__ = ["Embeddings", "BatchEncoder", "ExtractResult", "Pass", "StoreMismatchError", "auto_batch_size", "embeddings",
           "encode_batch", "encode_cohort", "encode_images", "encode_panel", "extract", "gpu_hours_table", "load_item",
           "read_with_mask", "reproduce_perturbation", "run_provenance", "weights_id"]


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

    def pin_memory(self) -> "Pass":
        """Page-lock the pixels (the DataLoader's pin-memory thread calls this), so the copy to the GPU is asynchronous."""
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


def _labels(cohort: Cohort, row: pd.Series) -> dict:
    return {c: float(row[c]) for c in getattr(cohort, "label_columns", [])}


def box_table(cohort: Cohort, boxes: "bool | pd.DataFrame | Mapping[str, Sequence] | None" = True) -> pd.DataFrame:
    """The boxes to pool ``roi_local`` under, as one table (``image_id``, ``class``, ``x1``, ``y1``, ``x2``, ``y2``).

    ``True``/``None``: the cohort's own boxes; ``False``: none; a DataFrame with those
    columns (``class`` optional), or a mapping ``image_id -> [(x1, y1, x2, y2), ...]``.
    Rows keep their order: an image's boxes are pooled in the order given.
    """
    cols = ["image_id", "class", "x1", "y1", "x2", "y2"]
    if boxes is False:
        return pd.DataFrame(columns=cols)
    if boxes is None or boxes is True:
        b = getattr(cohort, "boxes", None)
        return pd.DataFrame(columns=cols) if b is None else b
    if isinstance(boxes, pd.DataFrame):
        missing = [c for c in cols if c != "class" and c not in boxes]
        if missing:
            raise ValueError(f"box table lacks column(s) {missing}; expected image_id, x1, y1, x2, y2 (original pixels, "
                             "x2/y2 exclusive) and optionally class")
        b = boxes.copy()
        if "class" not in b:
            b["class"] = None
        b["image_id"] = b["image_id"].astype(str)
        return b
    rows = [{"image_id": str(i), "class": None, "x1": float(x[0]), "y1": float(x[1]), "x2": float(x[2]), "y2": float(x[3])}
            for i, bl in boxes.items() for x in bl]
    return pd.DataFrame(rows, columns=cols)


def _boxes_of(cohort: Cohort, boxes: "bool | pd.DataFrame | Mapping[str, Sequence] | None" = True) -> dict[str, pd.DataFrame]:
    b = box_table(cohort, boxes)
    if len(b) == 0:
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
            classes = b["class"].to_numpy() if "class" in b else [None] * len(bl)
            rows = [{**ident, **empty, "box_index": k, "box_class": None if cl is None or pd.isna(cl) else str(cl),
                     "x1": x[0], "y1": x[1], "x2": x[2], "y2": x[3]}
                    for k, (x, cl) in enumerate(zip(bl, classes))]
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
        # one asynchronous copy per pass from its page-locked pixels, stacked on the device
        x = torch.stack([p.pixels.to(encoder.device, non_blocking=True) for p in passes])
        geoms = [p.geometry for p in passes]
        glob, grid = encoder.forward(x)
        roi, owner, visible, excluded = roi_local(grid, geoms, boxes, return_visible=True, return_reasons=True)
        cls_, pm = glob.cpu().numpy(), patch_mean(grid).cpu().numpy()
        grid_np = grid.half().cpu().numpy() if store_grid else None  # float16 on the device: half the copy
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
        grids = {"pass_id": np.array([p.pass_id for p in passes], np.int64), "grid": grid_np.astype(np.float16, copy=False),
                 "geometry": [geometry_to_json(g) for g in geoms]}
    return rows, feats, grids


class BatchEncoder:
    """The per-batch work as a callable for distributed engines (Ray Data ``map_batches``, Dask).

    ``BatchEncoder("rad-dino", stand_in=True)(batch)`` takes a dict of columns with
    ``image`` (2-D arrays) and optional ``boxes`` (one list of boxes per image); any other
    column is passed through, repeated once per box. Returns a dict of columns with
    ``cls``, ``patch_mean``, ``roi_local`` (``[rows, D]``; NaN rows where an image has no box).
    The store-writing Ray pipeline is :func:`cxrcore.ray_extract.extract_ray` (``cxrcore extract --backend ray``).
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
        # reshape(-1): a 0-dim tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def weights_id(encoder: Encoder) -> str:
    """What weights ran: a content hash for stand-ins and local files, the hub revision where it is cached.

    Local directories hash their weight files (``*.safetensors``, ``*.bin``, ``*.pt``,
    ``*.pth``, ``*.json``). A hub id is resolved offline from the local Hugging Face cache;
    if not cached the id alone is recorded (``@unresolved``).
    """
    if encoder.stand_in and not Path(str(encoder.weights)).exists():
        return f"stand-in:{_state_dict_hash(encoder.model)}"
    return weights_source_id(str(encoder.weights))


def weights_source_id(weights: str) -> str:
    """:func:`weights_id` of a weights source (local file, directory or hub id) without loading a model."""
    p = Path(str(weights)).expanduser()
    if p.is_file():
        return f"sha256:{file_sha256(p)[:16]}"
    if p.is_dir():
        h = hashlib.sha256()
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".json"))
        for f in files:
            h.update(str(f.relative_to(p)).encode())
            h.update(file_sha256(f).encode())
        return f"dir-sha256:{h.hexdigest()[:16]}"
    repo = str(weights).removeprefix("hf-hub:")
    try:
        from huggingface_hub import try_to_load_from_cache

        # transformers repos carry config.json, open_clip repos open_clip_config.json: either pins the snapshot
        for name in ("config.json", "open_clip_config.json"):
            got = try_to_load_from_cache(repo, name)
            if isinstance(got, str):
                return f"hub:{repo}@{Path(got).parent.name}"
    except (ImportError, ValueError, OSError):
        pass
    return f"hub:{repo}@unresolved"


def boxes_fingerprint(boxes: pd.DataFrame) -> dict:
    """Provenance of an explicit box table (``extract(boxes=...)``): its size and a hash of its rows."""
    cols = [c for c in ("image_id", "class", "x1", "y1", "x2", "y2") if c in boxes]
    h = hashlib.sha256(canonical_json(boxes[cols].astype(object).where(boxes[cols].notna(), None).values.tolist()).encode())
    return {"rows": int(len(boxes)), "sha256": h.hexdigest()[:16]}


def run_provenance(encoder: Encoder, cohort: Cohort, *, panel: Panel | None, seed: int, n_images: int,
                   cohort_options: Mapping | None = None, store_grid: bool = False,
                   boxes: pd.DataFrame | None = None) -> dict:
    """Everything that decides a store's content; two runs may share a store exactly when this is equal.

    ``boxes``: an explicit box table replacing the cohort's boxes (recorded by its hash;
    absent from the provenance when the cohort's own boxes are used).
    """
    enc = encoder.provenance()
    enc.pop("citation", None)
    enc.pop("notes", None)
    extra = {} if boxes is None else {"boxes": boxes_fingerprint(boxes)}
    return {**extra,
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


# -- in memory: panel, cohort, images ----------------------------------------------------------------------------
def _n_of(cohort: Cohort, n_images: int | None) -> int:
    return len(cohort) if n_images is None else min(int(n_images), len(cohort))


def encode_panel(cohort: Cohort, encoder: Encoder, cells: "Sequence[PerturbationCell] | Panel | str", *,
                 n_images: int | None = None, seed: int = 0, batch_size: int = 16, progress: bool = False,
                 return_grid: bool = False) -> Embeddings:
    """Paired perturbation panel: every base image unperturbed and perturbed in every cell.

    Rows: one per (base image, cell, arm), ``arm`` 0 = unperturbed, 1 = perturbed, with
    the same box in both arms so ``roi_local`` compares like with like. The base image
    is encoded once (with one box per cell); each perturbed copy once. ``cells`` is a list
    of cells, a :class:`~cxrcore.perturb.Panel`, or a panel name / YAML path. Base images
    of generated cohorts are cached, so a second encoder does not redraw them.
    ``return_grid`` keeps every forward pass's float16 patch grid (``.grids``, by ``pass_id``).
    """
    panel = load_panel(cells)
    it: Iterable[int] = range(_n_of(cohort, n_images))
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"{encoder.key} panel", unit="img")
    return _encode_in_batches(encoder, (load_item(cohort, i, panel.cells, seed=seed) for i in it), batch_size, return_grid)


def encode_cohort(cohort: Cohort, encoder: Encoder, *, n_images: int | None = None,
                  boxes: "bool | pd.DataFrame | Mapping[str, Sequence]" = False, batch_size: int = 16,
                  progress: bool = False, return_grid: bool = False, seed: int = 0) -> Embeddings:
    """Plain (unperturbed) extraction in memory: one row per image, with its labels.

    ``boxes=True`` gives one row per box of the cohort instead (``roi_local`` pooled under
    it; images without boxes keep one row with NaN ``roi_local``); a box table or a mapping
    ``image_id -> boxes`` (see :func:`box_table`) pools those boxes instead. For cohorts too
    large for memory, use :func:`extract` (the ``cxrcore extract`` command) and read the
    store with :func:`embeddings`.
    """
    by_image = _boxes_of(cohort, boxes) if boxes is not False else {}
    it: Iterable[int] = range(_n_of(cohort, n_images))
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"{encoder.key} {getattr(cohort, 'name', '')}", unit="img")
    # the seed is recorded on every row, as `cxrcore extract --seed` records it (a store and this agree row for row)
    return _encode_in_batches(encoder, (load_item(cohort, i, (), boxes=by_image, seed=seed) for i in it), batch_size,
                              return_grid)


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
    starts = list(range(0, len(ids), batch_size))
    for start in starts:
        batch = ids[start:start + batch_size]
        parts.append(encoder.encode([cohort.read_image(start + k) for k in range(len(batch))],
                                    boxes=[list((boxes or {}).get(i, [])) for i in batch], return_grid=return_grid))
    # concat keeps each excluded box's visible fraction and reason beside its NaN row
    return Encoding.concat(parts, image_offsets=starts)


def _grids_from_parts(parts: Sequence[Mapping[str, Any]]) -> Grids:
    return Grids(np.concatenate([g["pass_id"] for g in parts]), np.concatenate([g["grid"] for g in parts]),
                 [geometry_from_json(x) for g in parts for x in g["geometry"]])


def _encode_in_batches(encoder: Encoder, items: Iterable[list[Pass]], batch_size: int, return_grid: bool = False) -> Embeddings:
    """Gather the forward passes of ``items`` into batches of about ``batch_size`` and encode each once."""
    rows: list[dict] = []
    feats: dict[str, list[np.ndarray]] = {m: [] for m in POOLING_MODES}
    grids: list[dict] = []
    pending: list[Pass] = []

    def flush() -> None:
        r, f, g = encode_batch(encoder, pending, store_grid=return_grid)
        rows.extend(r)
        for m in POOLING_MODES:
            feats[m].append(f[m])
        if g is not None:
            grids.append(g)
        pending.clear()

    for passes in items:
        pending.extend(passes)
        if len(pending) >= batch_size:
            flush()
    if pending:
        flush()
    return Embeddings(pd.DataFrame(rows), {m: np.concatenate(v) for m, v in feats.items()},
                      grids=_grids_from_parts(grids) if return_grid else None)


# -- batch size -----------------------------------------------------------------------------------------------
#: Forward-pass batch size on the CPU (``batch_size="auto"`` there): larger batches gain nothing on a few cores.
CPU_BATCH_SIZE = 16
#: Largest batch ``batch_size="auto"`` tries on a GPU; beyond a few hundred images a ViT's throughput is flat.
MAX_AUTO_BATCH = 512


def largest_power_of_two(fits: Callable[[int], bool], limit: int) -> int:
    """The largest power of two ``b <= limit`` with ``fits(b)``, trying 1, 2, 4, ... until one does not fit.

    Doubling (not bisection) because memory grows about linearly with the batch, so the
    first failure is at most twice the answer; returns 0 when even 1 does not fit.
    """
    best, b = 0, 1
    while b <= limit and fits(b):
        best, b = b, b * 2
    return best


def _is_out_of_memory(e: BaseException) -> bool:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in text or "ALLOC_FAILED" in text)


def auto_batch_size(encoder: Encoder, *, in_flight: int = 1, limit: int = MAX_AUTO_BATCH) -> int:
    """The forward-pass batch size for ``batch_size="auto"``.

    CPU: :data:`CPU_BATCH_SIZE`. CUDA: the largest power of two ``b <= limit`` for which a
    probe forward pass (plus ``patch_mean``) of ``b * in_flight`` images at the encoder's
    input size runs without running out of GPU memory; ``in_flight`` batches are on the
    GPU at once during :func:`extract`. The probe uses the real model, dtype and input
    size, so what it finds holds for the run (the allocator cache is emptied after each try).
    """
    if encoder.device.type != "cuda":
        return CPU_BATCH_SIZE
    size = encoder.input_size

    def fits(b: int) -> bool:
        try:
            x = torch.zeros(b * in_flight, 3, size, size, device=encoder.device)
            glob, grid = encoder.forward(x)
            patch_mean(grid)
            torch.cuda.synchronize(encoder.device)
            return True
        except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
            if not _is_out_of_memory(e):
                raise
            return False
        finally:
            x = glob = grid = None  # noqa: F841  (free before emptying the cache)
            torch.cuda.empty_cache()

    b = largest_power_of_two(fits, limit)
    if b == 0:
        raise RuntimeError(f"{encoder.key}: even one image at {size} px does not fit in the memory of {encoder.device}; "
                           "use a larger GPU, --dtype bfloat16, or a smaller --input-size")
    return b


def resolve_batch_size(batch_size: "int | str", encoder: Encoder, in_flight: int = 1) -> int:
    if isinstance(batch_size, str):
        if batch_size.strip().lower() == "auto":
            return auto_batch_size(encoder, in_flight=in_flight)
        try:
            batch_size = int(batch_size)
        except ValueError:
            raise ValueError(f"--batch-size {batch_size!r}: expected a positive integer or 'auto'") from None
    if int(batch_size) < 1:
        raise ValueError(f"--batch-size {batch_size}: expected a positive integer or 'auto'")
    return int(batch_size)


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
    batch_size: int = 0  # forward-pass batch size used (after "auto")
    startup_seconds: float = 0.0  # until the first decoded image arrived (store checks, worker start, first decode)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")

    @property
    def steady_images_per_s(self) -> float:
        """Images/s after start-up (slightly optimistic: workers have prefetched a few images by then)."""
        run = self.seconds - self.startup_seconds
        return (self.images - 1) / run if self.images > 1 and run > 0 else float("nan")


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


class _BatchRunner:
    """Runs :func:`encode_batch` with up to ``depth`` batches in flight.

    On a GPU each batch runs in its own thread and CUDA stream: while one batch's results
    are copied back and turned into rows, the next batch's host-to-device copy and forward
    pass already run, so the GPU does not wait for Python. ``depth=1`` (the CPU) runs each
    batch when it is submitted.
    """

    def __init__(self, encoder: Encoder, store_grid: bool, depth: int) -> None:
        self.encoder, self.store_grid, self.depth = encoder, store_grid, depth
        self._pool = ThreadPoolExecutor(depth, thread_name_prefix="cxrcore-encode") if depth > 1 else None
        self._local = threading.local()

    def _run(self, passes: list[Pass]):
        if self.encoder.device.type == "cuda":
            stream = getattr(self._local, "stream", None)
            if stream is None:
                stream = self._local.stream = torch.cuda.Stream(device=self.encoder.device)
            with torch.cuda.stream(stream):
                return encode_batch(self.encoder, passes, store_grid=self.store_grid)
        return encode_batch(self.encoder, passes, store_grid=self.store_grid)

    def submit(self, passes: list[Pass]) -> Future:
        if self._pool is not None:
            return self._pool.submit(self._run, passes)
        f: Future = Future()
        f.set_result(self._run(passes))
        return f

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def extract(encoder: Encoder, cohort: Cohort, out: str | os.PathLike, *, panel: "Panel | str | Sequence[PerturbationCell] | None" = None,
            n_images: int | None = None, seed: int = 0, shard: "str | tuple[int, int] | None" = None,
            store_grid: bool = False, batch_size: "int | str" = 16, num_workers: int | None = None,
            chunk_size: int | None = None, progress: bool = True, cohort_options: Mapping | None = None,
            preprocess_in_workers: bool = True, boxes: "pd.DataFrame | Mapping[str, Sequence] | None" = None,
            chunk_info: Mapping | None = None, in_flight: int | None = None) -> ExtractResult:
    """Run ``encoder`` over ``cohort`` (through ``panel`` if given) into the store at ``out``; resumable.

    Chunks already in ``out`` are checked against this run's provenance and skipped; a
    mismatch raises :class:`cxrcore.store.ProvenanceMismatchError`. ``shard="i/n"`` does
    only this job's chunks (every n-th). Images are decoded (and perturbed, and
    preprocessed) in ``num_workers`` DataLoader workers (default: CPU count - 1, at most 8
    on the CPU, at most 32 on a GPU). On a GPU, the workers' pixels are page-locked
    (``pin_memory``) and copied asynchronously, and ``in_flight`` batches (default 2) run
    at once (:class:`_BatchRunner`). ``batch_size="auto"``: :func:`auto_batch_size`.
    ``boxes`` replaces the cohort's boxes (plain extraction only; see :func:`box_table`).
    ``chunk_info`` is recorded in every chunk's footer beside the shard (e.g. the Slurm task).
    """
    t0 = time.perf_counter()
    pan = None if panel is None else load_panel(panel)
    cells = tuple(pan.cells) if pan is not None else ()
    if pan is not None and boxes is not None:
        raise ValueError("boxes are for plain extraction; a panel places its own box per cell (give one or the other)")
    n = _n_of(cohort, n_images)
    if n < 1:
        raise ValueError(f"cohort {getattr(cohort, 'name', '?')} has no images to extract")
    i_shard = parse_shard(shard)
    cs = int(chunk_size or default_chunk_size(store_grid, len(cells)))
    on_gpu = encoder.device.type == "cuda"
    depth = int(in_flight or (2 if on_gpu else 1))
    bs = resolve_batch_size(batch_size, encoder, depth)
    table = None if boxes is None else box_table(cohort, boxes)
    prov = run_provenance(encoder, cohort, panel=pan, seed=seed, n_images=n, cohort_options=cohort_options,
                          store_grid=store_grid, boxes=table)
    out = open_store(out, prov, {"n_images": n, "chunk_size": cs})
    mine = shard_chunks(n, cs, i_shard)
    remove_stale_temporaries(out, mine)
    done = done_chunks(out)
    todo = [c for c in mine if c not in done]
    positions = np.concatenate([np.arange(s, e) for s, e in todo]) if todo else np.zeros(0, np.int64)
    if num_workers is None:
        num_workers = max(0, min(32 if on_gpu else 8, (os.cpu_count() or 1) - 1))
    pre = _cpu_preprocessor(encoder) if preprocess_in_workers else None
    by_image = {} if cells else _boxes_of(cohort, True if table is None else table)
    dataset = _Items(cohort, positions, cells, seed, by_image, pre)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers,
                                         collate_fn=_identity, prefetch_factor=4 if num_workers else None,
                                         pin_memory=on_gpu and pre is not None)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(positions), unit="img", desc=f"{encoder.key} -> {out.name}", disable=not progress,
               file=sys.stderr, smoothing=0.1)
    label_columns = list(getattr(cohort, "label_columns", []))
    info = {**dict(chunk_info or {}), "shard": list(i_shard)}
    runner = _BatchRunner(encoder, store_grid, depth)
    inflight: deque[tuple[tuple[int, int], bool, Future]] = deque()
    acc: dict[str, Any] = {"rows": [], "feats": {m: [] for m in POOLING_MODES}, "grids": []}
    counts = {"passes": 0, "written": 0}

    def collect_one() -> None:
        chunk, last, fut = inflight.popleft()
        r, f, g = fut.result()
        acc["rows"].extend(r)
        for m in POOLING_MODES:
            acc["feats"][m].append(f[m])
        if g is not None:
            acc["grids"].append(g)
        if last:
            write(*chunk)

    def write(start: int, end: int) -> None:
        tbl = rows_to_table(acc["rows"], {m: np.concatenate(v) for m, v in acc["feats"].items()}, prov, label_columns)
        gt = None
        if store_grid:
            parts = acc["grids"]
            gt = grids_to_table({"pass_id": np.concatenate([g["pass_id"] for g in parts]),
                                 "grid": np.concatenate([g["grid"] for g in parts]),
                                 "geometry": [x for g in parts for x in g["geometry"]]})
        write_chunk(out, start, end, tbl, prov, gt, chunk_info=info)
        acc["rows"], acc["grids"] = [], []
        acc["feats"] = {m: [] for m in POOLING_MODES}
        counts["written"] += 1

    def submit(batch: list[Pass], chunk: tuple[int, int], last: bool) -> None:
        inflight.append((chunk, last, runner.submit(batch)))
        counts["passes"] += len(batch)
        while len(inflight) > depth:  # keep `depth` batches running while this thread turns results into rows
            collect_one()

    chunk_iter = iter(todo)
    cur = next(chunk_iter, None)
    pending: list[Pass] = []
    n_img = 0
    t_first = None
    try:
        for pos, passes in loader:
            if t_first is None:
                t_first = time.perf_counter()
            assert cur is not None and cur[0] <= pos < cur[1], (pos, cur)
            pending.extend(passes)
            n_img += 1
            end_of_chunk = pos == cur[1] - 1
            while len(pending) >= bs and not (end_of_chunk and len(pending) == bs):
                submit(pending[:bs], cur, False)
                pending = pending[bs:]
            if end_of_chunk:  # batches never span chunks: a chunk is written once its last batch is back
                submit(pending, cur, True)
                pending = []
                cur = next(chunk_iter, None)
            bar.update(1)
        while inflight:
            collect_one()
    finally:
        runner.close()
        bar.close()
    return ExtractResult(out, i_shard, len(mine), len(mine) - len(todo), counts["written"], n_img, counts["passes"],
                         time.perf_counter() - t0, bs, (t_first or time.perf_counter()) - t0)


# -- re-deriving a perturbed image from the store -------------------------------------------------------------
def reproduce_perturbation(row: Mapping, provenance: Mapping, base: np.ndarray) -> tuple[np.ndarray, tuple]:
    """The perturbed image of one store row (``arm`` 0 or 1 of a panel cell), from the row and the store's provenance.

    Needs only what the store records: the cell's parameters (provenance ``panel.cells``),
    ``seed``, ``image_index``, the placed ``center_y``/``center_x`` and the box; and the base
    image, checked against the row's ``image_hash``. The perturbation's own randomness comes
    from (seed, image, cell) exactly as when the panel was drawn. Returns (image, box);
    raises if the base image or the re-derived box differs from the store.
    """
    from .perturb import PerturbationCell

    if image_hash(base) != row["image_hash"]:
        raise StoreError(f"image {row['image_id']!r}: the base image given hashes to {image_hash(base)}, the store "
                         f"recorded {row['image_hash']}; this is not the image the store was made from")
    cells = {}
    for d in (provenance.get("panel") or {}).get("cells", []):
        d = dict(d)
        c = PerturbationCell(d.pop("kind"), d.pop("footprint_px"), d.pop("strength"), tuple(d.items()))
        cells[c.name] = c
    if row["cell"] not in cells:
        raise StoreError(f"cell {row['cell']!r} is not in the store's panel {sorted(cells)}")
    cell = cells[row["cell"]]
    # the same two draws as PerturbationCell.place_and_apply: the location (recorded) and the perturbation's own
    _, pert_seed = cell.seed_for(int(row["seed"]), int(row["image_index"])).spawn(2)
    image, box = cell.apply(np.asarray(base), (float(row["center_y"]), float(row["center_x"])),
                            seed=int(pert_seed.generate_state(1)[0]))
    stored = tuple(float(row[k]) for k in ("x1", "y1", "x2", "y2"))
    if tuple(float(v) for v in box) != stored:
        raise StoreError(f"image {row['image_id']!r}, cell {row['cell']!r}: re-derived box {box} differs from the "
                         f"stored box {stored}")
    return image, box


# -- the one entry point for analyses -------------------------------------------------------------------------
class StoreMismatchError(ProvenanceMismatchError):
    """A store does not match the analysis asking for it; the message names the field and both values."""


_DROP_META = ("encoder", "weights_id", "cxrcore_version")  # constant per store: in .provenance


def _tidy_meta(meta: pd.DataFrame) -> pd.DataFrame:
    """One set of column types whether rows come from a store or from an in-process run."""
    m = meta.drop(columns=[c for c in _DROP_META if c in meta]).reset_index(drop=True)
    for name, typ in _META_TYPES.items():
        if name not in m:
            continue
        if pa.types.is_integer(typ):
            m[name] = m[name].astype("int64")
        elif pa.types.is_floating(typ):
            m[name] = pd.to_numeric(m[name], errors="coerce").astype("float64")
        else:
            m[name] = m[name].astype(object).where(m[name].notna(), None)
    first = [c for c in _META_TYPES if c in m]
    return m[first + [c for c in m.columns if c not in first]]


def _torch_dtype(dtype: "str | torch.dtype") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    key = str(dtype).removeprefix("torch.").lower()
    if key not in names:
        raise ValueError(f"dtype {dtype!r}: expected float32 or bfloat16")
    return names[key]


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _mismatch(store: Path, field: str, stored: Any, wanted: Any, fix: str) -> StoreMismatchError:
    return StoreMismatchError(f"store {store}: {field} is {stored!r} in the store but {wanted!r} in this analysis. {fix}")


def _store_for(store: "str | os.PathLike | Mapping[str, str | os.PathLike]", key: str) -> Path:
    if isinstance(store, Mapping):
        if key not in store:
            raise KeyError(f"store has no directory for encoder {key!r}; it maps {sorted(store)}. Add {key!r}: <store "
                           "directory>, or run without a store for this encoder")
        return Path(store[key])
    return Path(store)


def _expected_encoder(key: str, encoder: "Encoder | None", weights: "str | None", stand_in: bool,
                      dtype: torch.dtype, input_size: int | None, resize_short: int | None = None) -> dict:
    """What the store's ``encoder`` provenance must say for this analysis, without loading the model."""
    from dataclasses import asdict

    from .encoders import encoder_options, encoder_spec
    from .encoders.base import read_descriptor

    if encoder is not None:
        d = encoder.provenance()
        d.update(weights_id=weights_id(encoder))
    else:
        spec = encoder_spec(key)
        desc = read_descriptor(weights)
        d = asdict(spec)
        d.pop("arch", None)
        size, geometry, resize_short = encoder_options(key, weights=weights, input_size=input_size,
                                                       resize_short=resize_short)
        d.update(weights="random-weight stand-in" if stand_in else str(weights if weights is not None else spec.weights),
                 stand_in=bool(stand_in or (desc and desc.get("stand_in"))), input_size=size, geometry=geometry,
                 resize_short=resize_short, patch_size=int(spec.patch_size), dtype=str(dtype))
        if weights is not None and Path(str(weights)).expanduser().exists():
            d["weights_id"] = weights_source_id(str(weights))
    for k in DESCRIPTIVE_FIELDS:  # the published model's table facts are not provenance (Encoder.provenance drops them)
        d.pop(k, None)
    return d


def _check_store(d: Path, prov: Mapping, *, kind: str, cohort: Cohort, expected_encoder: Mapping, panel: Panel | None,
                 seed: int) -> None:
    """Stop with the first field where the store's provenance differs from the analysis's parameters."""
    fix_extract = "Extract a store with these parameters (`cxrcore extract ...`), or pass the store's value."
    if prov.get("cxrcore_version") != __version__:
        raise _mismatch(d, "cxrcore_version", prov.get("cxrcore_version"), __version__,
                        "The store was written by another version of cxrcore: re-extract it with this one.")
    enc = prov.get("encoder", {})
    want = dict(expected_encoder)
    if enc.get("key") != want["key"]:
        raise _mismatch(d, "encoder", enc.get("key"), want["key"], "Give the store of this encoder (a dict encoder -> "
                        "store directory for several).")
    if bool(enc.get("stand_in")) != bool(want["stand_in"]):
        raise _mismatch(d, "stand_in", enc.get("stand_in"), want["stand_in"], fix_extract)
    if "weights_id" in want:
        if prov.get("weights_id") != want["weights_id"]:
            raise _mismatch(d, "weights (content hash)", prov.get("weights_id"), want["weights_id"], fix_extract)
    elif not want["stand_in"] and str(enc.get("weights")) != str(want["weights"]):
        raise _mismatch(d, "weights", enc.get("weights"), want["weights"], fix_extract)
    if int(enc.get("input_size", -1)) != int(want["input_size"]):
        raise _mismatch(d, "input_size", enc.get("input_size"), want["input_size"], fix_extract)
    if enc.get("resize_short") != want.get("resize_short"):  # an option of the run, like input_size
        raise _mismatch(d, "resize_short", enc.get("resize_short"), want.get("resize_short"),
                        "Pass resize_short= the store's value (the store was extracted with --resize-short), or "
                        "extract again with this one.")
    if _dtype_name(enc.get("dtype")) != _dtype_name(want["dtype"]):
        raise _mismatch(d, "dtype", _dtype_name(enc.get("dtype")), _dtype_name(want["dtype"]),
                        "Pass dtype= the store's dtype, or extract again with --dtype.")
    # the encoder's published preprocessing and token layout as this code has them
    for k in sorted(set(want) - {"key", "stand_in", "weights", "weights_id", "input_size", "resize_short", "dtype"}):
        if canonical_json(enc.get(k)) != canonical_json(want[k]):
            raise _mismatch(d, f"encoder.{k}", enc.get(k), want[k], "The encoder's preprocessing changed since the "
                            "store was written: re-extract it.")
    c_name = getattr(cohort, "name", type(cohort).__name__)
    if prov.get("cohort", {}).get("name") != c_name:
        raise _mismatch(d, "cohort", prov.get("cohort", {}).get("name"), c_name, fix_extract)
    stored_panel = prov.get("panel")
    if kind == "cohort" and stored_panel is not None:
        raise _mismatch(d, "panel", stored_panel.get("name"), None, "This is a perturbation-panel store; a cohort "
                        "analysis needs a store extracted without --panel.")
    if kind == "panel":
        if stored_panel is None:
            raise _mismatch(d, "panel", None, panel.name, "Extract the store with --panel.")
        want_cells = [c.to_dict() for c in panel]
        if canonical_json(stored_panel.get("cells")) != canonical_json(want_cells):
            names = [c.name for c in panel]
            stored_names = [_cell_name(c) for c in stored_panel.get("cells", [])]
            raise _mismatch(d, "panel", f"{stored_panel.get('name')} {stored_names}", f"{panel.name} {names}", fix_extract)
    # a generated cohort's seed shows in its pixels, which _from_store checks by hash
    if kind == "panel" and int(prov.get("seed", -1)) != int(seed):
        raise _mismatch(d, "seed", prov.get("seed"), seed, "Pass the store's seed, or extract again with --seed.")


def _cell_name(d: Mapping) -> str:
    from .perturb import PerturbationCell

    d = dict(d)
    try:
        return PerturbationCell(d.pop("kind"), d.pop("footprint_px"), d.pop("strength"), tuple(d.items())).name
    except (KeyError, ValueError):
        return canonical_json(d)


def _from_store(kind: str, d: Path, cohort: Cohort, n: int, *, boxes, return_grid: bool, check_images: int) -> Embeddings:
    prov = read_manifest(d)["provenance"]
    md = cohort.metadata.iloc[:n]
    ids = md["image_id"].astype(str).tolist()
    position = {i: k for k, i in enumerate(ids)}
    image_rows_only = kind == "cohort" and boxes is False
    emb = read_store(d, image_ids=ids, modes=("cls", "patch_mean") if image_rows_only else POOLING_MODES)
    meta = emb.meta
    stored = meta.drop_duplicates("image_index")
    have = set(stored["image_id"])
    lack = [i for i in ids if i not in have]
    if lack:
        raise StoreError(f"store {d}: {len(lack)} of this analysis's {n} images are not in the store (first: {lack[0]!r}); "
                         f"it was extracted for {prov['cohort']['n_images']} images of cohort {prov['cohort']['name']!r}. "
                         "Extract them (a larger --n-images, the same cohort), or analyse fewer images.")
    dup = stored["image_id"].duplicated()
    if dup.any():
        raise StoreError(f"store {d}: image {stored.loc[dup, 'image_id'].iloc[0]!r} is stored at two positions; "
                         f"run `cxrcore status {d}`")
    if kind == "panel":
        moved = stored[stored["image_index"] != stored["image_id"].map(position)]
        if len(moved):
            r = moved.iloc[0]
            raise _mismatch(d, f"position of image {r.image_id!r}", int(r.image_index), position[r.image_id],
                            "Perturbations are placed by (seed, position): the panel store must list the cohort in "
                            "the same order.")
    for _, r in stored.sort_values("image_id", key=lambda s: s.map(position)).head(check_images).iterrows():
        h = image_hash(read_with_mask(cohort, position[r.image_id])[0])
        if h != r.image_hash:
            raise _mismatch(d, f"pixels of image {r.image_id!r} (image_hash)", r.image_hash, h,
                            "The store was made from other images (another cohort version, size or seed).")
    feats = emb.features
    if image_rows_only:
        first = ~meta.duplicated("image_index").to_numpy()
        meta = meta[first].reset_index(drop=True)
        feats = {m: v[first] for m, v in feats.items()}
        feats["roi_local"] = np.full_like(feats["cls"], np.nan)
        meta = meta.assign(box_index=-1, box_class=None, x1=np.nan, y1=np.nan, x2=np.nan, y2=np.nan,
                           roi_visible=np.nan, roi_excluded=None)
    elif kind == "cohort":
        meta, feats = _select_boxes(d, prov, cohort, meta, feats, boxes)
    if kind == "cohort":
        # analyses index images by their position in their own cohort
        order = np.argsort(meta["image_id"].map(position).to_numpy(), kind="stable")
        meta = meta.iloc[order].reset_index(drop=True)
        feats = {m: v[order] for m, v in feats.items()}
        meta["image_index"] = meta["image_id"].map(position).astype("int64")
    grids = None
    if return_grid:
        if not prov.get("store_grid"):
            raise StoreError(f"store {d}: extracted without --store-grid, so it holds no patch grids; re-extract with "
                             "--store-grid, or run without return_grid")
        grids = read_grids(d, pass_ids=meta["pass_id"].unique())
    return Embeddings(meta, feats, prov, grids)


def _select_boxes(d: Path, prov: Mapping, cohort: Cohort, meta: pd.DataFrame, feats: dict, boxes) -> tuple[pd.DataFrame, dict]:
    """Rows for the boxes the analysis asks for: stored rows where the store pooled that box, else re-pooled from grids."""
    want = box_table(cohort, True if boxes is None else boxes)
    by_image = {k: v for k, v in want.groupby("image_id", sort=False)} if len(want) else {}
    coords = ["x1", "y1", "x2", "y2"]
    out_rows, roi, take, need = [], [], [], []
    for image_id, g in meta.groupby("image_id", sort=False):
        first = g.index[0]
        w = by_image.get(image_id)
        if w is None or len(w) == 0:
            out_rows.append({**meta.loc[first].to_dict(), "box_index": -1, "box_class": None,
                             **{c: np.nan for c in coords}, "roi_visible": np.nan, "roi_excluded": None})
            take.append(first)
            roi.append(np.full(feats["cls"].shape[1], np.nan, np.float32))
            continue
        have = g.dropna(subset=coords)
        for k, (cl, *xy) in enumerate(w[["class", *coords]].itertuples(index=False)):
            hit = have.index[np.isclose(have[coords].to_numpy(float), np.asarray(xy, float), atol=1e-6).all(axis=1)]
            row = {**meta.loc[first].to_dict(), "box_index": k, "box_class": None if cl is None or pd.isna(cl) else str(cl),
                   **dict(zip(coords, map(float, xy)))}
            if len(hit):
                # the stored box's own visibility and exclusion reason, not its image's first row's
                row.update(roi_visible=meta.at[hit[0], "roi_visible"], roi_excluded=meta.at[hit[0], "roi_excluded"])
                roi.append(feats["roi_local"][hit[0]])
            else:
                geom = geometry_from_json(meta.at[first, "geometry"])
                frac = float(geom.visible_fraction([xy])[0])
                reason = excluded_reasons(np.array([frac]), in_image=geom.in_image_fraction([xy]))[0]
                row.update(roi_visible=frac, roi_excluded=reason or None)
                roi.append(None)
                need.append((len(roi) - 1, int(meta.loc[first, "pass_id"]), xy))
            out_rows.append(row)
            take.append(first)
    if need:
        if not prov.get("store_grid"):
            _, pid, xy = need[0]
            raise StoreError(f"store {d}: {len(need)} box(es) this analysis asks for were not pooled when the store was "
                             f"written (first: {tuple(xy)} on pass {pid}) and the store has no patch grids to re-pool "
                             "them. Extract with --boxes <table of these boxes>, or with --store-grid.")
        grids = read_grids(d, pass_ids=sorted({pid for _, pid, _ in need}))
        again = repool(grids, None, [xy for _, _, xy in need], pass_ids=[pid for _, pid, _ in need])
        for (k, _, _), v in zip(need, again):
            roi[k] = v
    take = np.asarray(take, np.int64)
    out = {m: feats[m][take] for m in ("cls", "patch_mean")}
    out["roi_local"] = np.stack(roi).astype(np.float32) if roi else np.zeros((0, feats["cls"].shape[1]), np.float32)
    return pd.DataFrame(out_rows, columns=meta.columns), out


def embeddings(kind: str, cohort: Cohort, encoder: "str | Encoder", *,
               store: "str | os.PathLike | Mapping[str, str | os.PathLike] | None" = None,
               weights: "str | os.PathLike | Mapping[str, str] | None" = None, stand_in: bool = False,
               device: str = "cpu", dtype: "str | torch.dtype" = "float32", input_size: int | None = None,
               resize_short: int | None = None,
               panel: "Panel | str | Sequence[PerturbationCell] | None" = None, seed: int = 0,
               n_images: int | None = None, boxes: "bool | pd.DataFrame | Mapping[str, Sequence] | None" = None,
               return_grid: bool = False, batch_size: int = 16, check_images: int = 2,
               progress: bool = False) -> Embeddings:
    """The embeddings an analysis needs: read from a ``cxrcore extract`` store if ``store`` is given, else encoded now.

    ``kind="panel"``: the paired perturbation panel (``panel`` required), one row per
    (image, cell, arm), as :func:`encode_panel`. ``kind="cohort"``: plain extraction, as
    :func:`encode_cohort`: one row per image (``boxes=None``/``False``), or one row per box
    (``boxes=True``: the cohort's boxes; a box table or ``image_id -> boxes`` mapping:
    those boxes, see :func:`box_table`; images without a box keep one row, NaN ``roi_local``).

    ``store``: a store directory, or a dict encoder key -> directory. The store is checked
    against this call before anything is read: code version, ``encoder``, ``stand_in``,
    ``weights`` (content hash for local files), ``input_size``, ``resize_short``, ``dtype``, the encoder's
    preprocessing, ``cohort`` (name; every one of the first ``n_images`` image ids present,
    the pixels of the first ``check_images`` images hashing as stored, which also catches
    a generated cohort drawn with another seed or size), ``panel`` (its cells) and, for a
    panel, ``seed`` and each image's position (placements are drawn per position). A
    difference raises :class:`StoreMismatchError` naming the field and both values. The
    store may hold more images than asked: rows are selected by image id (the first
    ``n_images`` of ``cohort.metadata``; None or 0: all). Boxes the store did not pool are
    re-pooled from its float16 grids (``--store-grid``), else the error says how to
    extract them. ``device`` and ``batch_size`` matter only without a store.

    Without a store, the encoder (a key, loaded with ``weights``/``stand_in``/``device``/
    ``dtype``/``input_size``/``resize_short``; or an :class:`Encoder` already loaded) runs in-process.

    Returns :class:`~cxrcore.store.Embeddings` with ``meta`` (same columns and types either
    way; ``image_index`` is the row of ``cohort.metadata``), ``features[mode]`` float32,
    ``provenance`` (the store's, or this run's in the same form) and, with
    ``return_grid=True``, ``grids`` (float16 patch grids by ``pass_id``).
    """
    from .encoders import load_encoder

    if kind not in ("panel", "cohort"):
        raise ValueError(f"kind {kind!r}: expected 'panel' (perturbation panel) or 'cohort' (plain extraction)")
    if kind == "panel" and panel is None:
        raise ValueError("kind='panel' needs panel= (a packaged panel name such as 'default', a YAML file or cells)")
    if kind == "panel" and boxes not in (None, False):
        raise ValueError("kind='panel' places one box per cell; boxes= is for kind='cohort'")
    if kind == "cohort" and panel is not None:
        raise ValueError("kind='cohort' is plain extraction; panel= is for kind='panel'")
    key = encoder if isinstance(encoder, str) else encoder.key
    w = weights.get(key) if isinstance(weights, Mapping) else weights
    dt = _torch_dtype(dtype)
    pan = load_panel(panel) if panel is not None else None
    n = len(cohort) if not n_images else min(int(n_images), len(cohort))
    if store is not None:
        d = _store_for(store, key)
        prov = read_manifest(d)["provenance"]
        expected = _expected_encoder(key, None if isinstance(encoder, str) else encoder, None if w is None else str(w),
                                     stand_in, dt, input_size, resize_short)
        _check_store(d, prov, kind=kind, cohort=cohort, expected_encoder=expected, panel=pan, seed=seed)
        emb = _from_store(kind, d, cohort, n, boxes=False if boxes is None and kind == "cohort" else boxes,
                          return_grid=return_grid, check_images=check_images)
    else:
        enc = encoder if not isinstance(encoder, str) else load_encoder(
            key, weights=w, stand_in=stand_in, device=device, dtype=dt, input_size=input_size,
            resize_short=resize_short)
        if kind == "panel":
            emb = encode_panel(cohort, enc, pan, n_images=n, seed=seed, batch_size=batch_size, progress=progress,
                               return_grid=return_grid)
        else:
            emb = encode_cohort(cohort, enc, n_images=n, boxes=False if boxes is None else boxes,
                                batch_size=batch_size, progress=progress, return_grid=return_grid, seed=seed)
        emb.provenance = run_provenance(enc, cohort, panel=pan, seed=seed, n_images=n, store_grid=return_grid)
    emb.meta = _tidy_meta(emb.meta)
    return emb


# -- what the paper's extraction costs ----------------------------------------------------------------------
#: Images of the paper's cohorts: the aggregate pool (NIH ChestX-ray14 112,120 + MIMIC-CXR-JPG + Emory-CXR) and ChestX-Det10.
PAPER_COHORTS: dict[str, int] = {"NIH + MIMIC-CXR-JPG + Emory pool": 492_724, "ChestX-Det10": 3_543}
#: NVIDIA H100 SXM bf16 tensor-core peak, dense (the datasheet's 1,979 TFLOP/s assumes 2:4 sparsity).
H100_BF16_DENSE_TFLOPS = 989.0
#: Assumed model-FLOP utilisation of a frozen forward pass in bf16 at a batch that fills the GPU.
ASSUMED_MFU = 0.40


def gpu_hours_table(encoders: Sequence[str] | None = None, n_images: Mapping[str, int] | None = None, *,
                    rate_source: "str | float | Mapping[str, float]" = "stated",
                    peak_tflops: float = H100_BF16_DENSE_TFLOPS, mfu: float = ASSUMED_MFU,
                    panel: "Panel | str | None" = "default", panel_cohort: str | None = None) -> pd.DataFrame:
    """Estimated GPU-hours of the forward passes per encoder for the paper's cohorts (a tidy table).

    Work per image is the encoder's ``spec.gflops`` (counted on the full-size architecture
    at its published input size). The rate comes from ``rate_source``:

    - ``"stated"``: ``peak_tflops * mfu`` (default: an H100's 989 dense bf16 TFLOP/s at an
      assumed 40 % utilisation), the same FLOP rate for every encoder;
    - a number: an achieved TFLOP/s, e.g. what ``benchmarks/gpu_extract.py`` measured;
    - a mapping encoder -> images/s measured for that encoder (others fall back to ``"stated"``).

    ``n_images`` (default :data:`PAPER_COHORTS`) maps a cohort to its size; with ``panel``,
    the perturbation panel's forward passes are added for ``panel_cohort`` (default: the
    first cohort): images x (cells + 1), every image once unperturbed and once per cell.
    Decoding, pooling and writing are assumed hidden behind the forward pass (enough
    DataLoader workers: ``benchmarks/bench_decode.py``). Columns: ``encoder``, ``workload``,
    ``images``, ``forward_passes``, ``gflops_per_pass``, ``passes_per_s``, ``rate_source``,
    ``gpu_hours``.
    """
    from .encoders import encoder_spec, list_encoders

    cohorts = dict(PAPER_COHORTS if n_images is None else n_images)
    pan = None if panel is None else load_panel(panel)
    target = panel_cohort or next(iter(cohorts))
    if pan is not None and target not in cohorts:
        raise KeyError(f"panel_cohort {target!r} is not one of the cohorts {list(cohorts)}")
    work = [(name, n, n) for name, n in cohorts.items()]
    if pan is not None:
        work.append((f"panel {pan.name!r} ({len(pan)} cells) on {target}", cohorts[target], cohorts[target] * (len(pan) + 1)))
    rows = []
    for key in (list(encoders) if encoders is not None else list_encoders()):
        gflops = float(encoder_spec(key).gflops)
        if isinstance(rate_source, Mapping) and key in rate_source:
            rate, src = float(rate_source[key]), "measured images/s"
        elif isinstance(rate_source, (int, float)) and not isinstance(rate_source, bool):
            rate, src = float(rate_source) * 1e3 / gflops, f"measured {float(rate_source):.0f} TFLOP/s"
        elif rate_source == "stated" or isinstance(rate_source, Mapping):
            rate, src = peak_tflops * mfu * 1e3 / gflops, f"stated {peak_tflops:g} TFLOP/s x {mfu:.0%} MFU"
        else:
            raise ValueError(f"rate_source {rate_source!r}: expected 'stated', an achieved TFLOP/s, or encoder -> images/s")
        for name, images, passes in work:
            rows.append({"encoder": key, "workload": name, "images": int(images), "forward_passes": int(passes),
                         "gflops_per_pass": gflops, "passes_per_s": rate, "rate_source": src,
                         "gpu_hours": passes / rate / 3600.0})
    return pd.DataFrame(rows)
