"""Small-scale perturbations: pure functions of (image, location, parameters) -> (image, box).

Every perturbation changes pixels only inside its footprint and returns the
region-of-interest box ``(x1, y1, x2, y2)`` (original pixels, end-exclusive) that
contains every changed pixel; ``roi_local`` pools the patch tokens under that box.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

Box = tuple[int, int, int, int]


def _disk(shape: tuple[int, int], center: tuple[float, float], diameter: float) -> np.ndarray:
    """Soft-edged disk weight in [0, 1] (1 inside, a one-pixel ramp at the rim)."""
    cy, cx = center
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    r = np.sqrt((yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2)
    return np.clip(diameter / 2.0 - r + 0.5, 0.0, 1.0)


def footprint_box(center: tuple[float, float], diameter: float, shape: tuple[int, int]) -> Box:
    """Integer box enclosing a disk footprint, clipped to the image."""
    cy, cx = center
    r = diameter / 2.0 + 1.0  # the soft rim reaches half a pixel beyond the radius
    x1, y1 = max(0, int(np.floor(cx - r))), max(0, int(np.floor(cy - r)))
    x2, y2 = min(shape[1], int(np.ceil(cx + r))), min(shape[0], int(np.ceil(cy + r)))
    return (x1, y1, x2, y2)


def iso_blur(image: np.ndarray, center: tuple[float, float], diameter: float, sigma: float) -> tuple[np.ndarray, Box]:
    """Isotropic Gaussian blur of standard deviation ``sigma`` px inside a disk of ``diameter`` px.

    Low-contrast by construction: the local mean is kept, only fine texture is removed.
    """
    if diameter <= 0 or sigma <= 0:
        raise ValueError(f"iso_blur needs diameter > 0 and sigma > 0, got diameter={diameter}, sigma={sigma}")
    img = np.asarray(image, dtype=np.float32)
    box = footprint_box(center, diameter, img.shape)
    x1, y1, x2, y2 = box
    pad = int(np.ceil(4 * sigma))
    # blur only a padded window around the footprint: cost independent of image size
    wy1, wx1 = max(0, y1 - pad), max(0, x1 - pad)
    wy2, wx2 = min(img.shape[0], y2 + pad), min(img.shape[1], x2 + pad)
    window = img[wy1:wy2, wx1:wx2]
    blurred = ndimage.gaussian_filter(window, sigma=sigma, mode="nearest")
    w = _disk(window.shape, (center[0] - wy1, center[1] - wx1), diameter)
    out = img.copy()
    out[wy1:wy2, wx1:wx2] = window * (1 - w) + blurred * w
    return out, box


def random_location(mask: np.ndarray | None, shape: tuple[int, int], diameter: float,
                    rng: np.random.Generator) -> tuple[float, float]:
    """A footprint centre ``(y, x)`` inside ``mask`` (e.g. the lung field) with the footprint fully in the image.

    Without a mask, the central region (middle 60% of each side) stands in for the lungs.
    """
    h, w = shape
    r = int(np.ceil(diameter / 2.0)) + 2
    if 2 * r >= min(h, w):
        raise ValueError(f"footprint of {diameter} px does not fit in a {w}x{h} image")
    if mask is None:
        mask = np.zeros(shape, bool)
        mask[int(0.2 * h) : int(0.8 * h), int(0.2 * w) : int(0.8 * w)] = True
    # keep the whole footprint inside the mask and the image
    inner = ndimage.binary_erosion(mask, structure=np.ones((3, 3)), iterations=r, border_value=0)
    ys, xs = np.nonzero(inner)
    if len(ys) == 0:
        raise ValueError(f"no location inside the mask can hold a {diameter} px footprint")
    k = rng.integers(len(ys))
    return float(ys[k]) + 0.5, float(xs[k]) + 0.5


@dataclass(frozen=True)
class PerturbationCell:
    """One cell of the panel: a kind at one footprint and strength."""

    kind: str
    footprint_px: float
    strength: float

    @property
    def name(self) -> str:
        return f"{self.kind}_d{self.footprint_px:g}_s{self.strength:g}"

    def apply(self, image: np.ndarray, center: tuple[float, float]) -> tuple[np.ndarray, Box]:
        if self.kind == "iso_blur":
            return iso_blur(image, center, self.footprint_px, self.strength)
        raise ValueError(f"unknown perturbation kind {self.kind!r}; known: iso_blur")
