"""Box-level analyses as pure functions: overlap, Gaussian box jitter, matched control boxes.

Boxes are ``(x1, y1, x2, y2)`` in original-image pixel-edge coordinates (x2/y2 exclusive),
as everywhere in cxrcore; arrays are ``[N, 4]`` float64.

- :func:`jitter_boxes` moves each box's centre by Gaussian noise (sigma in px) and
  optionally rescales it (log-normal factor), with *common random numbers*: the same
  seed gives the same standard-normal draws for every sigma, so a curve over sigma moves
  each box further along one direction instead of redrawing it (smoother curves, paired
  comparisons between sigmas).
- :func:`matched_control_boxes` gives every lesion box a non-lesion box of the same
  size from the same image, inside the lung field, overlapping no lesion. The first
  candidate is the contralateral mirror image of the box (same height, other lung),
  the classic matched control on a frontal radiograph; then random positions.
- :func:`decoy_boxes` gives every lesion-free image of a class one box of that class's
  lesion size, placed as a control would be, so that ``roi_local`` given a box can be
  scored at the image level on negatives too.
- :func:`paired_iou` / :func:`still_overlapping` say whether a moved box still touches
  the lesion it came from.
"""

from __future__ import annotations

import zlib
from typing import Callable, Sequence

import numpy as np
import pandas as pd

__all__ = [
    "as_boxes", "box_area", "intersection_area", "iou", "paired_iou", "still_overlapping", "overlap_fraction",
    "jitter_boxes", "matched_control_boxes", "control_boxes_frame", "jitter_frame", "image_seed",
    "chestxdet10_controls", "decoy_boxes",
]


def as_boxes(boxes, name: str = "boxes") -> np.ndarray:
    """``boxes`` as a float64 ``[N, 4]`` array; refuses other shapes and NaN."""
    b = np.asarray(boxes, dtype=np.float64)
    if b.size == 0:
        return b.reshape(0, 4)
    if b.ndim == 1 and b.shape[0] == 4:
        b = b[None]
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"{name} must be [N, 4] (x1, y1, x2, y2); got shape {b.shape}")
    if not np.isfinite(b).all():
        raise ValueError(f"{name} has NaN or infinite coordinates (first at row {int(np.flatnonzero(~np.isfinite(b).all(1))[0])})")
    return b


def box_area(boxes) -> np.ndarray:
    """Area of each box in px^2 (0 for empty or inverted boxes)."""
    b = as_boxes(boxes)
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def intersection_area(a, b) -> np.ndarray:
    """Pairwise intersection areas ``[len(a), len(b)]`` in px^2."""
    a, b = as_boxes(a, "a"), as_boxes(b, "b")
    w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    return np.clip(w, 0, None) * np.clip(h, 0, None)


def iou(a, b) -> np.ndarray:
    """Pairwise intersection over union ``[len(a), len(b)]`` (0 where both are empty)."""
    inter = intersection_area(a, b)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def paired_iou(a, b) -> np.ndarray:
    """Row-wise IoU of ``a[k]`` with ``b[k]`` (e.g. a jittered box with its original)."""
    a, b = as_boxes(a, "a"), as_boxes(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired_iou: a has {a.shape[0]} boxes and b has {b.shape[0]}; pair them one to one")
    w = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    h = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = w * h
    union = box_area(a) + box_area(b) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def still_overlapping(moved, lesion, min_iou: float = 0.0) -> np.ndarray:
    """Row-wise: does ``moved[k]`` still overlap ``lesion[k]``? (IoU > ``min_iou``; 0: any shared area)."""
    return paired_iou(moved, lesion) > float(min_iou)


def overlap_fraction(moved, lesion, min_iou: float = 0.0) -> float:
    """Share of moved boxes that still overlap their lesion (NaN for no boxes)."""
    hit = still_overlapping(moved, lesion, min_iou)
    return float(hit.mean()) if hit.size else float("nan")


def _clamp_into(b: np.ndarray, image_hw) -> np.ndarray:
    """Shift boxes back inside the image without changing their size (clip if larger than the image)."""
    h, w = float(image_hw[0]), float(image_hw[1])
    out = b.copy()
    for lo, hi, side in ((0, 2, w), (1, 3, h)):
        size = np.minimum(out[:, hi] - out[:, lo], side)
        start = np.clip(out[:, lo], 0.0, side - size)
        out[:, lo], out[:, hi] = start, start + size
    return out


def jitter_boxes(boxes, sigma_px: float, *, scale_sigma: float = 0.0, seed: int | Sequence[int] = 0,
                 image_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Move each box's centre by ``N(0, sigma_px^2)`` per axis and scale it by ``exp(N(0, scale_sigma^2))``.

    One scale factor per box keeps its aspect ratio. ``seed`` fixes the standard-normal
    draws, which are the same for every ``sigma_px`` / ``scale_sigma`` (common random
    numbers), so sigma 0 with scale_sigma 0 returns the boxes unchanged. ``image_hw``:
    shift moved boxes back inside an image of that (height, width), keeping their size,
    as an annotator's box never leaves the image.
    """
    if sigma_px < 0 or scale_sigma < 0:
        raise ValueError(f"sigma_px={sigma_px} and scale_sigma={scale_sigma} must be >= 0 (pixels, log-scale)")
    b = as_boxes(boxes)
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((b.shape[0], 3))  # dx, dy, log-scale: drawn even when unused, for common numbers
    if sigma_px == 0 and scale_sigma == 0:
        out = b.copy()
    else:
        cx, cy = (b[:, 0] + b[:, 2]) / 2 + sigma_px * z[:, 0], (b[:, 1] + b[:, 3]) / 2 + sigma_px * z[:, 1]
        s = np.exp(scale_sigma * z[:, 2])
        hw, hh = (b[:, 2] - b[:, 0]) * s / 2, (b[:, 3] - b[:, 1]) * s / 2
        out = np.stack([cx - hw, cy - hh, cx + hw, cy + hh], axis=1)
    return _clamp_into(out, image_hw) if image_hw is not None else out


def _integral(mask: np.ndarray) -> np.ndarray:
    s = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    s[1:, 1:] = np.cumsum(np.cumsum(mask.astype(np.int64), axis=0), axis=1)
    return s


def _inside_fraction(integral: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Share of each box's pixels set in the mask behind ``integral`` (boxes rounded outward to pixels)."""
    h, w = integral.shape[0] - 1, integral.shape[1] - 1
    x1 = np.clip(np.floor(boxes[:, 0]), 0, w).astype(int)
    y1 = np.clip(np.floor(boxes[:, 1]), 0, h).astype(int)
    x2 = np.clip(np.ceil(boxes[:, 2]), 0, w).astype(int)
    y2 = np.clip(np.ceil(boxes[:, 3]), 0, h).astype(int)
    inside = integral[y2, x2] - integral[y1, x2] - integral[y2, x1] + integral[y1, x1]
    area = (x2 - x1) * (y2 - y1)
    return np.divide(inside, area, out=np.zeros(len(boxes)), where=area > 0)


def matched_control_boxes(boxes, image_hw: tuple[int, int], *, avoid=None, lung_mask: np.ndarray | None = None,
                          min_lung_fraction: float = 0.9, gap_px: float = 0.0, seed: int | Sequence[int] = 0,
                          max_tries: int = 500, mirror_first: bool = True) -> np.ndarray:
    """One non-lesion control box per box of one image: same size, same image, inside the lung, off every lesion.

    Candidates: the contralateral mirror box first (``mirror_first``), then ``max_tries``
    random positions inside the image. A candidate is kept when at least
    ``min_lung_fraction`` of its pixels lie in ``lung_mask`` (when given) and it stays
    ``gap_px`` clear of every box in ``avoid`` (default: ``boxes``; pass all findings of
    the image) and of the controls already chosen. Rows with no acceptable candidate are
    NaN; drop them with their lesion box.
    """
    b = as_boxes(boxes)
    h, w = int(image_hw[0]), int(image_hw[1])
    blocked = as_boxes(b if avoid is None else avoid, "avoid")
    if lung_mask is not None:
        lung_mask = np.asarray(lung_mask, dtype=bool)
        if lung_mask.shape != (h, w):
            raise ValueError(f"lung_mask is {lung_mask.shape[1]}x{lung_mask.shape[0]} px but the image is {w}x{h}; "
                             "give the mask of this image at its own size")
        integral = _integral(lung_mask)
        rows, cols = np.flatnonzero(lung_mask.any(axis=1)), np.flatnonzero(lung_mask.any(axis=0))
    # random candidates are drawn where they can succeed: inside the lung field's bounding box
    lo_x, hi_x = (cols[0], cols[-1] + 1) if lung_mask is not None and cols.size else (0, w)
    lo_y, hi_y = (rows[0], rows[-1] + 1) if lung_mask is not None and rows.size else (0, h)
    rng = np.random.default_rng(seed)
    g = float(gap_px)
    out = np.full_like(b, np.nan)
    chosen: list[np.ndarray] = []
    for k, (x1, y1, x2, y2) in enumerate(b):
        bw, bh = x2 - x1, y2 - y1
        if bw > w or bh > h:
            continue
        rand = np.stack([rng.uniform(lo_x, max(lo_x, hi_x - bw), max_tries),
                         rng.uniform(lo_y, max(lo_y, hi_y - bh), max_tries)], axis=1)
        # whole pixels, like the lesion boxes themselves
        rand = np.floor(rand)
        cand = np.column_stack([rand[:, 0], rand[:, 1], rand[:, 0] + bw, rand[:, 1] + bh])
        if mirror_first:
            cand = np.vstack([[w - x2, y1, w - x1, y2], cand])
        ok = (cand[:, 0] >= 0) & (cand[:, 2] <= w) & (cand[:, 1] >= 0) & (cand[:, 3] <= h)
        if lung_mask is not None:
            ok &= _inside_fraction(integral, cand) >= min_lung_fraction
        others = np.vstack([blocked, *chosen]) if chosen else blocked
        if len(others):
            grown = others + np.array([-g, -g, g, g])
            ok &= intersection_area(cand, grown).max(axis=1) <= 0
        hit = np.flatnonzero(ok)
        if hit.size:
            out[k] = cand[hit[0]]
            chosen.append(cand[hit[0]][None])
    return out


def image_seed(seed: int, image_id: str) -> list[int]:
    """A per-image seed from a run seed and the image id: stable whatever else is in the cohort."""
    return [int(seed), zlib.crc32(str(image_id).encode())]


def control_boxes_frame(boxes: pd.DataFrame, image_hw: Callable[[str], tuple[int, int]], *,
                        avoid: pd.DataFrame | None = None, lung_mask: Callable[[str], np.ndarray | None] | None = None,
                        min_lung_fraction: float = 0.9, gap_px: float = 0.0, seed: int = 0) -> pd.DataFrame:
    """Matched controls for a cohort's ``boxes`` frame: one row per lesion box that found a control.

    Returns ``boxes`` (index kept, so rows can be joined back) with ``cx1, cy1, cx2, cy2``,
    the control box. ``image_hw(image_id)`` gives (height, width); ``lung_mask(image_id)``
    the image's lung mask or None; ``avoid``: every finding's box (all classes), default
    ``boxes``. Controls of one image never overlap one another.
    """
    avoid = boxes if avoid is None else avoid
    by_image = {k: g[["x1", "y1", "x2", "y2"]].to_numpy(float) for k, g in avoid.groupby("image_id", sort=False)}
    parts = []
    for image_id, g in boxes.groupby("image_id", sort=False):
        hw = image_hw(image_id)
        ctrl = matched_control_boxes(g[["x1", "y1", "x2", "y2"]].to_numpy(float), hw,
                                     avoid=by_image.get(image_id, np.zeros((0, 4))),
                                     lung_mask=None if lung_mask is None else lung_mask(image_id),
                                     min_lung_fraction=min_lung_fraction, gap_px=gap_px,
                                     seed=image_seed(seed, image_id))
        parts.append(g.assign(cx1=ctrl[:, 0], cy1=ctrl[:, 1], cx2=ctrl[:, 2], cy2=ctrl[:, 3]))
    if not parts:
        return boxes.assign(cx1=np.nan, cy1=np.nan, cx2=np.nan, cy2=np.nan).iloc[:0]
    return pd.concat(parts).dropna(subset=["cx1"])


def jitter_frame(boxes: pd.DataFrame, sigma_px: float, *, scale_sigma: float = 0.0, seed: int = 0,
                 image_hw: Callable[[str], tuple[int, int]] | None = None,
                 columns: Sequence[str] = ("x1", "y1", "x2", "y2")) -> np.ndarray:
    """:func:`jitter_boxes` over a frame, seeded per image (see :func:`image_seed`); returns ``[N, 4]``.

    ``columns`` names the box columns (e.g. the control box's ``cx1, cy1, cx2, cy2``; give
    lesion and control boxes different seeds so their jitters are independent).
    """
    out = np.empty((len(boxes), 4))
    cols = list(columns)
    pos = np.arange(len(boxes))
    for image_id, idx in boxes.groupby("image_id", sort=False).indices.items():
        hw = None if image_hw is None else image_hw(image_id)
        out[pos[idx]] = jitter_boxes(boxes.iloc[idx][cols].to_numpy(float), sigma_px, scale_sigma=scale_sigma,
                                     seed=image_seed(seed, image_id), image_hw=hw)
    return out


def chestxdet10_controls(cohort, *, lung_mask_dir: str | None = None, gap_px: float = 0.0,
                         seed: int = 0) -> tuple[pd.DataFrame, dict[str, tuple[int, int]], bool]:
    """Matched control boxes for a ChestX-Det10 cohort's lesion boxes, in metadata order.

    Image sizes come from the file headers; every finding of all ten classes (not only the
    cohort's) is avoided; lung masks are read as ``<lung_mask_dir>/<split>/<file_name>``
    (default ``<root>/lung_masks``, which the synthetic cohort writes). Returns the pairs
    frame (see :func:`control_boxes_frame`), ``image_id -> (height, width)``, and whether
    lung masks were used (without them controls are kept only off the findings).
    """
    from pathlib import Path

    from PIL import Image

    from .cohorts.chestxdet10 import CHESTXDET10_CLASSES, ChestXDet10
    from .io import read_image_size

    md = cohort.metadata
    split_of = md.set_index("image_id")["split"]
    hw_of = {}
    for i, p in md.set_index("image_id")["path"].items():  # headers only
        size = read_image_size(p)
        hw_of[i] = (size.height, size.width)
    mask_dir = Path(lung_mask_dir) if lung_mask_dir else Path(cohort.root) / "lung_masks"

    def lung_mask(image_id):
        p = mask_dir / split_of[image_id] / image_id
        return np.asarray(Image.open(p)) > 0 if p.is_file() else None

    every_finding = ChestXDet10(cohort.root, classes=CHESTXDET10_CLASSES, check_files=False).boxes
    use_masks = mask_dir.is_dir()
    pairs = control_boxes_frame(cohort.boxes, hw_of.get, avoid=every_finding, lung_mask=lung_mask if use_masks else None,
                                gap_px=gap_px, seed=seed)
    order = pairs["image_id"].map({i: k for k, i in enumerate(md["image_id"])})
    pairs = pairs.assign(order=order).sort_values("order", kind="stable").drop(columns="order")
    return pairs, hw_of, use_masks


def decoy_boxes(cohort, classes: Sequence[str] | None = None, *, lung_mask_dir: str | None = None,
                gap_px: float = 0.0, seed: int = 0) -> tuple[pd.DataFrame, int]:
    """One decoy box per (lesion-free image, class) of a ChestX-Det10 cohort: a lesion's size where there is no lesion.

    The image-level comparison of ``roi_local`` with the box-free readouts needs a box on
    every image, the lesion-free ones too. Each image without a lesion of class ``c``
    (``metadata[c] == 0``) borrows the width and height of a lesion box of class ``c``
    drawn at random (with replacement) from the cohort's boxes, and that box is placed as a
    matched control is (:func:`chestxdet10_controls`: mirror position first, then random
    positions, in the lung field, ``gap_px`` clear of every finding of the release's ten
    classes and of the image's other decoys). A positive and a negative image are then both
    read through a box of lesion size, as the perturbation panel reads the same box in both
    arms, so ``roi_local`` asks "is there a lesion under this box?" and not "is there a box?".

    classes: default the cohort's ``label_columns``. seed: the donor boxes are drawn with
    ``default_rng(seed)`` class by class in ``classes`` order, and placed with seed
    ``seed + 1`` (the lesions' own controls use ``seed``, so decoys are not drawn from the
    same random positions). Returns the decoys, one row per placed decoy in metadata order
    (``image_id``, ``class``, ``stratum`` and ``x1, y1, x2, y2`` of the donor lesion box,
    which lies in another image; ``donor``, the donor's index in ``cohort.boxes``; the decoy
    itself in ``cx1, cy1, cx2, cy2``), and the number of (lesion-free image, class) pairs
    that got no decoy (no position fits, or the class has no lesion box to borrow a size
    from): count them as exclusions.
    """
    import copy

    md = cohort.metadata
    classes = list(cohort.label_columns) if classes is None else list(classes)
    rng = np.random.default_rng(seed)
    borrowed, wanted = [], 0
    for c in classes:
        donors = cohort.boxes[cohort.boxes["class"] == c]
        negatives = md.loc[md[c] == 0, "image_id"].to_numpy()
        wanted += len(negatives)
        if donors.empty:  # no lesion size to borrow: every negative of the class goes without a decoy
            continue
        drawn = donors.iloc[rng.integers(len(donors), size=len(negatives))]
        borrowed.append(drawn[["class", "x1", "y1", "x2", "y2", "stratum"]].assign(image_id=negatives,
                                                                                     donor=drawn.index))
    columns = ["class", "x1", "y1", "x2", "y2", "stratum", "image_id", "donor", "cx1", "cy1", "cx2", "cy2"]
    if not borrowed:
        return pd.DataFrame(columns=columns), wanted
    decoy_cohort = copy.copy(cohort)  # the same cohort, with the borrowed boxes as the boxes to place
    decoy_cohort.boxes = pd.concat(borrowed, ignore_index=True)
    decoys, _, _ = chestxdet10_controls(decoy_cohort, lung_mask_dir=lung_mask_dir, gap_px=gap_px, seed=seed + 1)
    return decoys, wanted - len(decoys)
