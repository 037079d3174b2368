"""Preprocessing geometry: pad/crop/resize as an exact affine map, and box -> patch cells.

Every encoder turns an image of any size into a square model input in one explicit
step (pad to square then resize, or resize the shortest edge then centre-crop, or
stretch). The step is recorded as a :class:`Geometry`, so a box given in original
image pixels maps to model-input pixels, and from there to the patch cells it
touches, exactly. Coordinates are continuous pixel-edge coordinates: pixel ``i``
covers ``[i, i + 1)``, a box ``(x1, y1, x2, y2)`` covers ``[x1, x2) x [y1, y2)``;
this is the convention of ``torch.nn.functional.interpolate(align_corners=False)``
used to resample, so the map is the one the pixels really went through.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

GeometryMode = Literal["pad_square", "center_crop", "resize"]
GEOMETRY_MODES: tuple[str, ...] = ("pad_square", "center_crop", "resize")

#: Overlap (in cell units) below which a box edge counts as lying on a cell boundary.
CELL_EDGE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Geometry:
    """How one original image became one model input.

    ``x_input = x_original * scale_x + offset_x`` (same for y). ``stride`` is the
    patch size of a ViT or the output stride of a CNN feature map; ``grid`` is the
    (rows, cols) of the token grid.
    """

    mode: str
    src_hw: tuple[int, int]
    input_hw: tuple[int, int]
    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float
    stride: int
    # integer steps actually applied, so `apply` reproduces them exactly
    pad: tuple[int, int, int, int] = (0, 0, 0, 0)  # left, right, top, bottom (original px)
    resized_hw: tuple[int, int] = (0, 0)  # size after resize, before crop
    crop: tuple[int, int] = (0, 0)  # top, left (resized px)

    @property
    def grid(self) -> tuple[int, int]:
        return (self.input_hw[0] // self.stride, self.input_hw[1] // self.stride)

    def to_input(self, boxes: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
        """Map boxes ``[N, 4]`` (x1, y1, x2, y2) from original to model-input pixels."""
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        out = np.empty_like(b)
        out[:, [0, 2]] = b[:, [0, 2]] * self.scale_x + self.offset_x
        out[:, [1, 3]] = b[:, [1, 3]] * self.scale_y + self.offset_y
        return out

    def to_original(self, boxes: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
        """Inverse of :meth:`to_input`."""
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        out = np.empty_like(b)
        out[:, [0, 2]] = (b[:, [0, 2]] - self.offset_x) / self.scale_x
        out[:, [1, 3]] = (b[:, [1, 3]] - self.offset_y) / self.scale_y
        return out

    def cells(self, box: Sequence[float]) -> tuple[int, int, int, int]:
        """Token-grid rows/cols ``(r0, r1, c0, c1)`` (end-exclusive) that ``box`` touches.

        A cell is touched when the box overlaps it with positive area; the result is
        clipped to the grid. Raises ``ValueError`` if the box lies wholly outside the
        model input (e.g. cropped away), since pooling nothing is never meaningful.
        """
        x1, y1, x2, y2 = self.to_input([box])[0]
        gh, gw = self.grid
        s = self.stride
        # A box edge that lies on a cell boundary up to float round-off (e.g. after the
        # scale/offset round trip) does not touch the neighbouring cell: positive overlap only.
        eps = CELL_EDGE_TOLERANCE
        c0 = max(0, math.floor(x1 / s + eps))
        r0 = max(0, math.floor(y1 / s + eps))
        c1 = min(gw, math.ceil(x2 / s - eps))
        r1 = min(gh, math.ceil(y2 / s - eps))
        if c1 <= c0 or r1 <= r0:
            raise ValueError(
                f"box {tuple(float(v) for v in box)} (original pixels of a {self.src_hw[1]}x{self.src_hw[0]} "
                f"image) maps to {tuple(round(float(v), 2) for v in (x1, y1, x2, y2))} in the "
                f"{self.input_hw[1]}x{self.input_hw[0]} model input ({self.mode}) and touches no patch cell; "
                "check that the box is in this image's pixel coordinates and not cropped away"
            )
        return r0, r1, c0, c1

    def cell_mask(self, box: Sequence[float]) -> np.ndarray:
        """Boolean ``[rows, cols]`` mask of the cells ``box`` touches."""
        r0, r1, c0, c1 = self.cells(box)
        m = np.zeros(self.grid, dtype=bool)
        m[r0:r1, c0:c1] = True
        return m

    def apply(self, image: torch.Tensor, interpolation: str = "bicubic") -> torch.Tensor:
        """Resample ``image`` ``[C, H, W]`` (float) into the model input ``[C, h, w]``."""
        if tuple(image.shape[-2:]) != self.src_hw:
            raise ValueError(f"image is {tuple(image.shape[-2:])}, geometry was made for {self.src_hw}")
        x = image.unsqueeze(0)
        left, right, top, bottom = self.pad
        if any(self.pad):
            # zero padding: the image is already scaled to [0, 1] here, so 0 is black border
            x = F.pad(x, (left, right, top, bottom), mode="constant", value=0.0)
        if tuple(x.shape[-2:]) != self.resized_hw:
            antialias = interpolation in ("bilinear", "bicubic")
            x = F.interpolate(x, size=self.resized_hw, mode=interpolation, align_corners=False, antialias=antialias)
            if interpolation == "bicubic":
                x = x.clamp(0.0, 1.0)  # bicubic overshoots; the published processors clip to the pixel range
        t, l = self.crop
        h, w = self.input_hw
        x = x[..., t : t + h, l : l + w]
        return x.squeeze(0)


def make_geometry(src_hw: tuple[int, int], size: int, stride: int, mode: str = "pad_square", *,
                  resize_short: int | None = None) -> Geometry:
    """Build the :class:`Geometry` that takes an ``src_hw`` image to a ``size`` x ``size`` input.

    ``pad_square``: pad the shorter side symmetrically to a square, then resize
    (MedSigLIP's official pipeline). ``center_crop``: resize the shortest edge to
    ``size`` (or ``resize_short``, e.g. timm's ``floor(size / crop_pct)``), then
    centre-crop ``size`` with offsets ``(resized - size) // 2`` (the Hugging Face DINOv2 /
    RAD-DINO processors; sizes truncated with int() as transformers and torchvision do).
    ``resize``: stretch to the square, aspect ratio not kept.
    """
    h, w = int(src_hw[0]), int(src_hw[1])
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {h}x{w}")
    if size % stride:
        raise ValueError(
            f"model input side {size} is not a multiple of the patch size/stride {stride}; "
            f"use a multiple of {stride} (e.g. {size - size % stride} or {size - size % stride + stride}) "
            "rather than letting the model silently crop the last partial patch"
        )
    if mode == "pad_square":
        m = max(h, w)
        left = (m - w) // 2
        top = (m - h) // 2
        s = size / m
        return Geometry(mode, (h, w), (size, size), s, s, left * s, top * s, stride,
                        pad=(left, m - w - left, top, m - h - top), resized_hw=(size, size), crop=(0, 0))
    if mode == "center_crop":
        short = size if resize_short is None else int(resize_short)
        if short < size:
            raise ValueError(f"resize_short={short} is smaller than the crop {size}; it must be >= size")
        # int(), not round(): transformers' get_resize_output_image_size and torchvision's
        # resize both truncate the long side (int(short * long / short_side)), in this order.
        if h <= w:
            rh, rw = short, int(short * w / h)
        else:
            rh, rw = int(short * h / w), short
        top, left = (rh - size) // 2, (rw - size) // 2
        sx, sy = rw / w, rh / h
        return Geometry(mode, (h, w), (size, size), sx, sy, -float(left), -float(top), stride,
                        resized_hw=(rh, rw), crop=(top, left))
    if mode == "resize":
        return Geometry(mode, (h, w), (size, size), size / w, size / h, 0.0, 0.0, stride,
                        resized_hw=(size, size), crop=(0, 0))
    raise ValueError(f"unknown geometry mode {mode!r}; expected one of {GEOMETRY_MODES}")
