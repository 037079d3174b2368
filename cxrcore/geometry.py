"""Preprocessing geometry: pad/crop/resize as an exact affine map, and box -> patch cells.

Every encoder turns an image of any size into a square model input in one explicit
step (pad to square then resize, or resize the shortest edge then centre-crop, or
stretch, or stretch to a larger square then centre-crop). The step is recorded as a :class:`Geometry`, so a box given in original
image pixels maps to model-input pixels, and from there to the token-grid cells it
covers, exactly. Coordinates are continuous pixel-edge coordinates: pixel ``i``
covers ``[i, i + 1)``, a box ``(x1, y1, x2, y2)`` covers ``[x1, x2) x [y1, y2)``;
this is the convention of ``torch.nn.functional.interpolate(align_corners=False)``
used to resample, so the map is the one the pixels really went through.

Resampling is torchvision's ``resize`` (``torchvision.transforms.v2.functional``), the
function the Hugging Face image processors (transformers >= 5, torchvision backend)
and open_clip's / torchvision's tensor transforms call. Float images (16-bit data are
scaled to [0, 1] floats first) are resampled in float32, no clipping. How an 8-bit image
is resampled is a convention of each reference pipeline, the ``resampler``
(:data:`RESAMPLERS`):

- ``"torchvision"``: as uint8, by torchvision's native uint8 kernel, then scaled to
  [0, 1] (it rounds and clips between the two separable passes). The Hugging Face
  processors that resize before they rescale (``BitImageProcessor``,
  ``SiglipImageProcessor``, ``ViTImageProcessor``: the default ``TorchvisionBackend._preprocess``).
- ``"pil"``: as uint8, by Pillow, then scaled: pipelines that resize PIL images
  (open_clip's preprocess, torchvision's transforms, timm's eval transform).
- ``"float"``: scaled to [0, 1] first, then resampled in float32 like any float image:
  processors that rescale before they resize (``DINOv3ViTImageProcessor._preprocess``)
  and Google's MedSigLIP serving code (divides by the dtype's maximum, pads, then calls
  ``SiglipImageProcessor(do_rescale=False)``).

torchvision resamples uint8 natively only on the CPU (on CUDA it casts to float,
interpolates, clamps and rounds, up to 13 grey levels apart), so the geometry step
always runs on the CPU (:meth:`Geometry.pixels`); the encoder copies the result to its
device.

Two library conventions differ between families and are parameters here:

- the centre-crop offset: the Hugging Face processors truncate ``(resized - size) / 2``
  (``crop_rounding="floor"``); torchvision's ``CenterCrop`` (used by open_clip and
  timm) computes ``int(round((resized - size) / 2.0))``, Python's round-half-to-even
  (``crop_rounding="round"``). For odd margins they differ by one pixel.
- which cells a box covers: a ViT patch token belongs to its ``stride x stride``
  patch, and a box covers the patches it overlaps (``cell_rule="patch"``). A CNN
  feature-map cell has no patch; its receptive field is centred on one input pixel
  (``cell_rule="rf_centre"``: a box covers the cells whose receptive-field centre lies in
  it, or the nearest one when the box falls between centres).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

GeometryMode = Literal["pad_square", "center_crop", "resize", "resize_crop"]
GEOMETRY_MODES: tuple[str, ...] = ("pad_square", "center_crop", "resize", "resize_crop")
#: modes that resize to a side (``resize_short``) larger than the input and then centre-crop
CROP_MODES: tuple[str, ...] = ("center_crop", "resize_crop")
CROP_ROUNDINGS: tuple[str, ...] = ("floor", "round")
CELL_RULES: tuple[str, ...] = ("patch", "rf_centre")
#: how an 8-bit image is resampled (see the module docstring)
RESAMPLERS: tuple[str, ...] = ("torchvision", "pil", "float")

#: Overlap (in cell units) below which a box edge counts as lying on a cell boundary.
CELL_EDGE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Geometry:
    """How one original image became one model input.

    ``x_input = x_original * scale_x + offset_x`` (same for y). ``stride`` is the
    patch size of a ViT or the output stride of a CNN feature map; ``grid`` is the
    (rows, cols) of the token grid. ``cell_rule`` and ``cell_centre0`` (the
    receptive-field centre of cell 0 in input edge coordinates, ``rf_centre`` only)
    say how a box maps to cells, see :meth:`cells`.
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
    cell_rule: str = "patch"
    cell_centre0: float = 0.0
    resampler: str = "torchvision"  # how 8-bit images are resampled: torchvision (uint8) | pil | float

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

    def visible_window(self) -> tuple[float, float, float, float]:
        """The part of the original image (x1, y1, x2, y2, original pixels) that lands in the model input.

        The whole image for ``pad_square`` and ``resize``; the crop window for ``center_crop``
        and ``resize_crop``.
        """
        h, w = self.src_hw
        x1, y1, x2, y2 = self.to_original([[0, 0, self.input_hw[1], self.input_hw[0]]])[0]
        return max(0.0, x1), max(0.0, y1), min(float(w), x2), min(float(h), y2)

    def visible_fraction(self, boxes: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
        """Fraction of each box's area (``[N]``, in [0, 1]) that is image inside the model input.

        Area cut away by a centre crop, or lying outside the image itself, is not
        visible. An empty box has fraction 0.
        """
        return _fraction_inside(boxes, self.visible_window())

    def in_image_fraction(self, boxes: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
        """Fraction of each box's area (``[N]``, in [0, 1]) inside the image's own bounds ``[0, w) x [0, h)``.

        Whatever the preprocessing: a box mostly outside its image has coordinates that
        are wrong for it (another image's, or another scale's), which is not the loss a
        centre crop causes (:meth:`visible_fraction`).
        """
        h, w = self.src_hw
        return _fraction_inside(boxes, (0.0, 0.0, float(w), float(h)))

    def cell_centres(self, axis: int) -> np.ndarray:
        """Centres of the grid's cells along ``axis`` (0: rows/y, 1: cols/x), input edge coordinates."""
        n = self.grid[axis]
        if self.cell_rule == "rf_centre":
            return self.cell_centre0 + self.stride * np.arange(n, dtype=np.float64)
        return self.stride * (np.arange(n, dtype=np.float64) + 0.5)

    def _cells_1d(self, lo: float, hi: float, axis: int) -> tuple[int, int]:
        n, s, eps = self.grid[axis], self.stride, CELL_EDGE_TOLERANCE
        if self.cell_rule == "rf_centre":
            centres = self.cell_centres(axis)
            inside = np.flatnonzero((centres >= lo) & (centres < hi))  # the box is half-open [lo, hi)
            if inside.size:
                return int(inside[0]), int(inside[-1]) + 1
            # the box falls between two centres: the cell whose receptive field is centred nearest to it
            k = int(np.clip(np.argmin(np.abs(centres - (lo + hi) / 2)), 0, n - 1))
            return k, k + 1
        # A box edge that lies on a cell boundary up to float round-off (e.g. after the
        # scale/offset round trip) does not touch the neighbouring cell: positive overlap only.
        a = max(0, math.floor(lo / s + eps))
        b = min(n, math.ceil(hi / s - eps))
        if b <= a:  # thinner than the tolerance: the patch holding its middle
            a = int(min(max(math.floor((lo + hi) / 2 / s), 0), n - 1))
            b = a + 1
        return a, b

    def cells(self, box: Sequence[float]) -> tuple[int, int, int, int]:
        """Token-grid rows/cols ``(r0, r1, c0, c1)`` (end-exclusive) that ``box`` covers.

        The box is first clipped to the visible part of the image (:meth:`visible_window`).
        ``cell_rule="patch"`` (ViTs): the patches the clipped box overlaps with positive
        area. ``cell_rule="rf_centre"`` (CNNs): the cells whose receptive-field centre lies
        in the clipped box, or, along an axis where none does, the one centred nearest
        to it, so any visible box pools at least one cell. Raises ``ValueError`` if no
        part of the box is visible (cropped away or outside the image): pooling
        nothing is never meaningful (:func:`cxrcore.pooling.roi_local` counts such boxes
        as exclusions instead of asking).
        """
        vx1, vy1, vx2, vy2 = self.visible_window()
        bx1, by1, bx2, by2 = (float(v) for v in box)
        cx1, cy1, cx2, cy2 = max(bx1, vx1), max(by1, vy1), min(bx2, vx2), min(by2, vy2)
        x1, y1, x2, y2 = self.to_input([[cx1, cy1, cx2, cy2]])[0]
        s = self.stride
        if not (x2 - x1 > CELL_EDGE_TOLERANCE * s and y2 - y1 > CELL_EDGE_TOLERANCE * s):
            xi1, yi1, xi2, yi2 = self.to_input([box])[0]
            raise ValueError(
                f"box {tuple(float(v) for v in box)} (original pixels of a {self.src_hw[1]}x{self.src_hw[0]} "
                f"image) maps to {tuple(round(float(v), 2) for v in (xi1, yi1, xi2, yi2))} in the "
                f"{self.input_hw[1]}x{self.input_hw[0]} model input ({self.mode}) and no part of it is visible there; "
                "check that the box is in this image's pixel coordinates and not cropped away"
            )
        r0, r1 = self._cells_1d(y1, y2, 0)
        c0, c1 = self._cells_1d(x1, x2, 1)
        return r0, r1, c0, c1

    def cell_mask(self, box: Sequence[float]) -> np.ndarray:
        """Boolean ``[rows, cols]`` mask of the cells ``box`` covers."""
        r0, r1, c0, c1 = self.cells(box)
        m = np.zeros(self.grid, dtype=bool)
        m[r0:r1, c0:c1] = True
        return m

    def pixels(self, image: np.ndarray, interpolation: str = "bicubic", index: int = 0) -> torch.Tensor:
        """A 2-D grey image of any dtype -> the model input ``[1, h, w]``, float32 in [0, 1], on the CPU.

        8-bit images are resampled as :attr:`resampler` says (see the module docstring);
        16-bit and float images are scaled to [0, 1] first and resampled in float32.
        Always on the CPU: torchvision's uint8 kernels exist only there.
        """
        from .io import to_unit_float

        a = np.asarray(image)
        if a.dtype == np.uint8 and a.ndim == 2 and self.resampler != "float":
            return self.apply(torch.from_numpy(np.ascontiguousarray(a))[None], interpolation).float() / 255.0
        return self.apply(torch.from_numpy(to_unit_float(a, index))[None], interpolation)

    def apply(self, image: torch.Tensor, interpolation: str = "bicubic") -> torch.Tensor:
        """Resample ``image`` ``[C, H, W]`` (float, or uint8 for 8-bit data) into the model input ``[C, h, w]``.

        The output has the input's dtype. Resampling is torchvision's ``resize``
        (antialiased for bilinear/bicubic), see the module docstring.
        """
        if tuple(image.shape[-2:]) != self.src_hw:
            raise ValueError(f"image is {tuple(image.shape[-2:])}, geometry was made for {self.src_hw}")
        if image.device.type != "cpu" and image.dtype == torch.uint8:
            # torchvision has no native uint8 kernel off the CPU: the pixels would differ (module docstring)
            raise ValueError(f"an 8-bit image on {image.device} would be resampled by a different kernel than on the "
                             "CPU; resample on the CPU (Geometry.pixels) and copy the result to the device")
        x = image.unsqueeze(0)
        left, right, top, bottom = self.pad
        if any(self.pad):
            # zero padding: 0 is black both for uint8 and for images already scaled to [0, 1]
            x = F.pad(x, (left, right, top, bottom), mode="constant", value=0)
        if tuple(x.shape[-2:]) != self.resized_hw:
            x = resample(x, self.resized_hw, interpolation, pil=self.resampler == "pil")
        t, l = self.crop
        h, w = self.input_hw
        x = x[..., t : t + h, l : l + w]
        return x.squeeze(0)


def _fraction_inside(boxes: np.ndarray | Sequence[Sequence[float]], window: Sequence[float]) -> np.ndarray:
    """Fraction of each box's area inside ``window`` (x1, y1, x2, y2); 0 for an empty box."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    vx1, vy1, vx2, vy2 = window
    iw = np.clip(np.minimum(b[:, 2], vx2) - np.maximum(b[:, 0], vx1), 0.0, None)
    ih = np.clip(np.minimum(b[:, 3], vy2) - np.maximum(b[:, 1], vy1), 0.0, None)
    area = np.clip(b[:, 2] - b[:, 0], 0.0, None) * np.clip(b[:, 3] - b[:, 1], 0.0, None)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(area > 0, iw * ih / np.where(area > 0, area, 1.0), 0.0)
    return np.clip(frac, 0.0, 1.0)


def resample(x: torch.Tensor, size: tuple[int, int], interpolation: str, *, pil: bool = False) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, C, *size]`` with torchvision's resize, as the reference processors do.

    ``pil=True``: 8-bit images are resized by Pillow (channel by channel, on the CPU), as
    pipelines that resize PIL images do (open_clip's preprocess, torchvision transforms on
    PIL images); torchvision's uint8 kernel differs from Pillow's by up to 2 grey levels in
    a few pixels. Float images always take torchvision's float path (no PIL equivalent).
    """
    import torchvision.transforms.v2.functional as tvF
    from torchvision.transforms import InterpolationMode

    try:
        mode = InterpolationMode(interpolation)
    except ValueError:
        raise ValueError(f"unknown interpolation {interpolation!r}; expected one of "
                         f"{[m.value for m in InterpolationMode]}") from None
    if pil and x.dtype == torch.uint8:
        from PIL import Image

        from torchvision.transforms.functional import pil_modes_mapping

        a = x.cpu().numpy()
        out = np.stack([np.stack([np.asarray(Image.fromarray(ch).resize((size[1], size[0]), pil_modes_mapping[mode]))
                                  for ch in img]) for img in a])
        return torch.from_numpy(out).to(x.device)
    return tvF.resize(x, list(size), interpolation=mode, antialias=True)


def center_crop_offset(resized: int, size: int, rounding: str = "floor") -> int:
    """Offset of a centred ``size`` window in ``resized`` pixels, as each library computes it.

    ``floor``: ``int((resized - size) / 2.0)`` (transformers' ``center_crop``).
    ``round``: ``int(round((resized - size) / 2.0))`` (torchvision's ``CenterCrop``, used
    by open_clip and timm; Python rounds half to even, so a margin of 1 gives 0, 3 gives 2).
    """
    if rounding == "floor":
        return int((resized - size) / 2.0)
    if rounding == "round":
        return int(round((resized - size) / 2.0))
    raise ValueError(f"unknown crop rounding {rounding!r}; expected one of {CROP_ROUNDINGS}")


def make_geometry(src_hw: tuple[int, int], size: int, stride: int, mode: str = "pad_square", *,
                  resize_short: int | None = None, crop_rounding: str = "floor", cell_rule: str = "patch",
                  cell_centre0: float = 0.0, resampler: str = "torchvision") -> Geometry:
    """Build the :class:`Geometry` that takes an ``src_hw`` image to a ``size`` x ``size`` input.

    ``pad_square``: pad the shorter side symmetrically with zeros to a square, then
    resize. ``center_crop``: resize the shortest edge to ``size`` (or ``resize_short``,
    e.g. timm's ``floor(size / crop_pct)``), then centre-crop ``size`` with the offset
    :func:`center_crop_offset` gives for ``crop_rounding`` (sizes truncated with int() as
    transformers and torchvision do). ``resize``: stretch to the square, aspect ratio
    not kept. ``resize_crop``: stretch to a ``resize_short`` x ``resize_short`` square
    (aspect not kept), then centre-crop ``size`` (timm's ``crop_mode="squash"``:
    ``Resize((floor(size / crop_pct),) * 2)`` then ``CenterCrop(size)``; a processor with
    ``size: {height, width}`` and a centre crop). ``cell_rule`` / ``cell_centre0``: see
    :meth:`Geometry.cells`.
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
    if cell_rule not in CELL_RULES:
        raise ValueError(f"unknown cell rule {cell_rule!r}; expected one of {CELL_RULES}")
    if resampler not in RESAMPLERS:
        raise ValueError(f"unknown resampler {resampler!r}; expected one of {RESAMPLERS}")
    cells = dict(cell_rule=cell_rule, cell_centre0=float(cell_centre0), resampler=resampler)
    if mode == "pad_square":
        m = max(h, w)
        left = (m - w) // 2
        top = (m - h) // 2
        s = size / m
        return Geometry(mode, (h, w), (size, size), s, s, left * s, top * s, stride,
                        pad=(left, m - w - left, top, m - h - top), resized_hw=(size, size), crop=(0, 0), **cells)
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
        top, left = center_crop_offset(rh, size, crop_rounding), center_crop_offset(rw, size, crop_rounding)
        sx, sy = rw / w, rh / h
        return Geometry(mode, (h, w), (size, size), sx, sy, -float(left), -float(top), stride,
                        resized_hw=(rh, rw), crop=(top, left), **cells)
    if mode == "resize":
        return Geometry(mode, (h, w), (size, size), size / w, size / h, 0.0, 0.0, stride,
                        resized_hw=(size, size), crop=(0, 0), **cells)
    if mode == "resize_crop":
        side = size if resize_short is None else int(resize_short)
        if side < size:
            raise ValueError(f"resize_short={side} is smaller than the crop {size}; it must be >= size")
        off = center_crop_offset(side, size, crop_rounding)
        return Geometry(mode, (h, w), (size, size), side / w, side / h, -float(off), -float(off), stride,
                        resized_hw=(side, side), crop=(off, off), **cells)
    raise ValueError(f"unknown geometry mode {mode!r}; expected one of {GEOMETRY_MODES}")
