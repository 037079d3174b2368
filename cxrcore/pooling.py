"""The three pooling modes of the paper, taken from ONE forward pass.

- ``cls``: the encoder's global embedding (the CLS token for ViTs with one; the
  attention-pool head for SigLIP, which has no CLS; global average pool for a CNN).
- ``patch_mean``: the mean over all final-layer patch tokens (registers excluded).
- ``roi_local``: the mean over the patch tokens of the cells a region-of-interest box
  covers, the box given in original-image pixels and mapped through the exact
  preprocessing :class:`~cxrcore.geometry.Geometry` (:meth:`~cxrcore.geometry.Geometry.cells`).

A box is not pooled, its ``roi_local`` row NaN with a counted reason, for one of two
causes, told apart because they mean different things (a batch never fails for one box):

- :func:`outside_image_reason`: less than :data:`MIN_VISIBLE_FRACTION` of the box lies
  inside its image's own bounds. Its coordinates are wrong for this image (a
  coordinate error), whatever the preprocessing; checked first.
- :func:`exclusion_reason`: the box is inside its image, but the preprocessing cut it
  away (a centre crop drops the image's long ends), so less than
  :data:`MIN_VISIBLE_FRACTION` of it is image inside the model input (its visible
  fraction, ``roi_visible``). Pooling is a pure function of tokens and geometry, so ROIs can be re-pooled
later from a stored patch grid (the box-jitter analysis) without a new forward pass.
Means are taken in float32 whatever dtype the encoder ran in.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .geometry import Geometry

POOLING_MODES: tuple[str, ...] = ("cls", "patch_mean", "roi_local")

#: A box is pooled only when at least this fraction of its area is image inside the model
#: input. Half: a box more cut away than kept describes mostly tissue the encoder never
#: saw. Override per call (``min_visible=``) or for a session by setting this attribute.
MIN_VISIBLE_FRACTION = 0.5

Box = Sequence[float]


def patch_mean(grid: torch.Tensor) -> torch.Tensor:
    """Mean over all patch tokens: ``[B, h, w, D] -> [B, D]`` (float32)."""
    return grid.float().mean(dim=(1, 2))


def exclusion_reason(min_visible: float | None = None) -> str:
    """The reason recorded for a box inside its image that the preprocessing cut away (one string per threshold)."""
    t = MIN_VISIBLE_FRACTION if min_visible is None else float(min_visible)
    return f"box cropped away: less than {t:.0%} of it inside the model input"


def outside_image_reason(min_visible: float | None = None) -> str:
    """The reason recorded for a box mostly outside its image's bounds: a coordinate error, not a crop."""
    t = MIN_VISIBLE_FRACTION if min_visible is None else float(min_visible)
    return (f"box outside the image bounds: less than {t:.0%} of it inside the image "
            "(check that its coordinates are this image's pixels)")


def excluded_reasons(visible: np.ndarray, min_visible: float | None = None,
                     in_image: np.ndarray | None = None) -> np.ndarray:
    """Per box: ``""`` when pooled, else the reason (object array aligned with ``visible``).

    ``in_image`` (:meth:`~cxrcore.geometry.Geometry.in_image_fraction`) tells a box
    outside its image (:func:`outside_image_reason`) from one cropped away
    (:func:`exclusion_reason`); without it every exclusion is counted as cropped away.
    """
    t = MIN_VISIBLE_FRACTION if min_visible is None else float(min_visible)
    v = np.asarray(visible, np.float64)
    out = np.full(v.shape, "", dtype=object)
    out[(v < t) | (v <= 0)] = exclusion_reason(t)
    if in_image is not None:
        f = np.asarray(in_image, np.float64)
        out[(f < t) | (f <= 0)] = outside_image_reason(t)
    return out


def _check_box(i: int, box: Box) -> tuple[float, float, float, float]:
    if len(box) != 4:
        raise ValueError(f"image {i}: box {box!r} must be (x1, y1, x2, y2)")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(np.isfinite((x1, y1, x2, y2))) or not (x2 > x1 and y2 > y1):
        raise ValueError(f"image {i}: box {tuple(box)} is empty or inverted (or not finite); expected x2 > x1 and y2 > y1")
    return x1, y1, x2, y2


def roi_local(
    grid: torch.Tensor | np.ndarray,
    geometries: Sequence[Geometry],
    boxes: Sequence[Sequence[Box]] | None,
    *,
    min_visible: float | None = None,
    return_visible: bool = False,
    return_reasons: bool = False,
) -> tuple[np.ndarray, ...]:
    """Mean of the patch tokens of the cells each box covers.

    ``grid`` is ``[B, h, w, D]``; ``boxes[i]`` lists image ``i``'s boxes in its own
    original pixels. Returns ``(roi [n_boxes, D] float32, roi_image [n_boxes] int)``, and
    with ``return_visible=True`` also ``visible [n_boxes]`` (the fraction of each box
    inside the model input), rows in input order. A box whose visible fraction is
    below ``min_visible`` (default :data:`MIN_VISIBLE_FRACTION`) or zero keeps its row,
    filled with NaN, as does a box less than ``min_visible`` inside its image's bounds;
    ``return_reasons=True`` appends the reason per row (``""`` when pooled, see
    :func:`excluded_reasons`).
    """
    g = torch.as_tensor(grid)
    d = g.shape[-1]
    t = MIN_VISIBLE_FRACTION if min_visible is None else float(min_visible)
    empty = (np.zeros((0, d), np.float32), np.zeros(0, np.int64))

    def result(out: tuple, visible: np.ndarray, reasons: np.ndarray) -> tuple:
        return (*out, *((visible,) if return_visible else ()), *((reasons,) if return_reasons else ()))

    nothing = (np.zeros(0), np.zeros(0, dtype=object))
    if boxes is None:
        return result(empty, *nothing)
    if len(boxes) != g.shape[0]:
        raise ValueError(f"boxes has {len(boxes)} entries but there are {g.shape[0]} images; give one (possibly empty) list of boxes per image")
    rows: list[torch.Tensor | None] = []
    owner: list[int] = []
    visible: list[np.ndarray] = []
    reasons: list[np.ndarray] = []
    for i, (geom, img_boxes) in enumerate(zip(geometries, boxes)):
        if tuple(g.shape[1:3]) != geom.grid:
            raise ValueError(f"image {i}: token grid {tuple(g.shape[1:3])} does not match its geometry's grid {geom.grid}")
        checked = [_check_box(i, box) for box in img_boxes or ()]
        if not checked:
            continue
        vis = geom.visible_fraction(checked)
        why = excluded_reasons(vis, t, geom.in_image_fraction(checked))  # the one rule for what is pooled
        visible.append(vis)
        reasons.append(why)
        for box, r in zip(checked, why):
            owner.append(i)
            if r:
                rows.append(None)
                continue
            r0, r1, c0, c1 = geom.cells(box)
            rows.append(g[i, r0:r1, c0:c1].float().mean(dim=(0, 1)))
    if not owner:
        return result(empty, *nothing)
    roi = np.full((len(owner), d), np.nan, np.float32)
    kept = [k for k, r in enumerate(rows) if r is not None]
    if kept:
        roi[kept] = torch.stack([rows[k] for k in kept]).cpu().numpy().astype(np.float32)
    return result((roi, np.asarray(owner, np.int64)), np.concatenate(visible).astype(np.float64),
                  np.concatenate(reasons))
