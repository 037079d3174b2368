"""The three pooling modes of the paper, taken from ONE forward pass.

- ``cls``: the encoder's global embedding (the CLS token for ViTs with one; the
  attention-pool head for SigLIP, which has no CLS; global average pool for a CNN).
- ``patch_mean``: the mean over all final-layer patch tokens (registers excluded).
- ``roi_local``: the mean over the patch tokens whose cells a region-of-interest box
  touches, the box given in original-image pixels and mapped through the exact
  preprocessing :class:`~cxrcore.geometry.Geometry`.

Pooling is a pure function of tokens and geometry, so ROIs can be re-pooled later
from a stored patch grid (the box-jitter analysis) without a new forward pass.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .geometry import Geometry

POOLING_MODES: tuple[str, ...] = ("cls", "patch_mean", "roi_local")

Box = Sequence[float]


def patch_mean(grid: torch.Tensor) -> torch.Tensor:
    """Mean over all patch tokens: ``[B, h, w, D] -> [B, D]``."""
    return grid.float().mean(dim=(1, 2))


def roi_local(
    grid: torch.Tensor | np.ndarray,
    geometries: Sequence[Geometry],
    boxes: Sequence[Sequence[Box]] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the patch tokens each box touches.

    ``grid`` is ``[B, h, w, D]``; ``boxes[i]`` lists image ``i``'s boxes in its own
    original pixels. Returns ``(roi [n_boxes, D] float32, roi_image [n_boxes] int)``
    where ``roi_image`` says which image each row came from, in input order.
    """
    g = torch.as_tensor(grid)
    d = g.shape[-1]
    if boxes is None:
        return np.zeros((0, d), np.float32), np.zeros(0, np.int64)
    if len(boxes) != g.shape[0]:
        raise ValueError(f"boxes has {len(boxes)} entries but there are {g.shape[0]} images; give one (possibly empty) list of boxes per image")
    rows: list[torch.Tensor] = []
    owner: list[int] = []
    for i, (geom, img_boxes) in enumerate(zip(geometries, boxes)):
        if tuple(g.shape[1:3]) != geom.grid:
            raise ValueError(f"image {i}: token grid {tuple(g.shape[1:3])} does not match its geometry's grid {geom.grid}")
        for box in img_boxes or ():
            if len(box) != 4:
                raise ValueError(f"image {i}: box {box!r} must be (x1, y1, x2, y2)")
            x1, y1, x2, y2 = (float(v) for v in box)
            if not (x2 > x1 and y2 > y1):
                raise ValueError(f"image {i}: box {tuple(box)} is empty or inverted; expected x2 > x1 and y2 > y1")
            r0, r1, c0, c1 = geom.cells(box)
            rows.append(g[i, r0:r1, c0:c1].float().mean(dim=(0, 1)))
            owner.append(i)
    if not rows:
        return np.zeros((0, d), np.float32), np.zeros(0, np.int64)
    return torch.stack(rows).cpu().numpy().astype(np.float32), np.asarray(owner, np.int64)
