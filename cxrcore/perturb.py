"""Small-scale perturbations and the panel of cells they are run in.

Every perturbation kind is a pure function ``kind(image, center, footprint, strength,
*, seed, **params) -> (perturbed image, box)``: it changes pixels only inside its
footprint (a disk of ``footprint`` px diameter around ``center = (y, x)``) and returns
the region-of-interest box ``(x1, y1, x2, y2)`` (original pixels, end-exclusive) that
contains every changed pixel; ``roi_local`` pools the patch tokens under that box.
Anything random (an angle, a texture phase, a nodule's lobulation) is drawn from ``seed``.

The kinds, and what ``strength`` means for each:

- ``iso_blur``: isotropic Gaussian blur, ``strength`` = sigma in px. Keeps the local mean.
- ``directional_blur``: motion blur along an angle, ``strength`` = blur length in px
  (``angle_deg`` fixed, or drawn from ``seed``). Keeps the local mean.
- ``reticular_fine``: a fine net of thin lines (two crossing families), ``strength`` =
  amplitude in intensity units, ``spacing_px`` = line spacing (default 6).
- ``nodule``: a round opacity with the projected-sphere profile, ``strength`` = peak
  contrast in intensity units (images are dense = bright, so it brightens).

A *panel* is a declared grid of :class:`PerturbationCell` (kind x footprint x strength),
read from a small YAML file (:func:`load_panel`; packaged panels live in
``cxrcore/panels/``). A cell's :attr:`~PerturbationCell.name` (``nodule_d24_s0.2``) is the
one name used in code, stores, tables and figures.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from .io import to_unit_float

Box = tuple[int, int, int, int]
Center = tuple[float, float]

#: Fraction of each side that stands in for the lung field on real images without a mask.
CENTRAL_REGION = (0.2, 0.8)


def _disk(shape: tuple[int, int], center: Center, diameter: float) -> np.ndarray:
    """Soft-edged disk weight in [0, 1] (1 inside, a one-pixel ramp at the rim)."""
    cy, cx = center
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    r = np.sqrt((yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2)
    return np.clip(diameter / 2.0 - r + 0.5, 0.0, 1.0).astype(np.float32)


def footprint_box(center: Center, diameter: float, shape: tuple[int, int]) -> Box:
    """Integer box enclosing a disk footprint, clipped to the image."""
    cy, cx = center
    r = diameter / 2.0 + 1.0  # the soft rim reaches half a pixel beyond the radius
    x1, y1 = max(0, int(np.floor(cx - r))), max(0, int(np.floor(cy - r)))
    x2, y2 = min(shape[1], int(np.ceil(cx + r))), min(shape[0], int(np.ceil(cy + r)))
    return (x1, y1, x2, y2)


def _check(kind: str, diameter: float, strength: float, *, strength_name: str) -> None:
    if not diameter > 0:
        raise ValueError(f"{kind}: footprint diameter must be > 0 px, got {diameter}")
    if not strength > 0:
        raise ValueError(f"{kind}: {strength_name} must be > 0, got {strength}")


def _window(shape: tuple[int, int], box: Box, pad: int) -> tuple[slice, slice]:
    """The box grown by ``pad`` px, clipped: filters read context from here, so cost is independent of image size."""
    x1, y1, x2, y2 = box
    return (slice(max(0, y1 - pad), min(shape[0], y2 + pad)), slice(max(0, x1 - pad), min(shape[1], x2 + pad)))


def _blend(img: np.ndarray, center: Center, diameter: float, pad: int, filtered: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, Box]:
    """Replace the disk by ``filtered(window)`` with a soft rim; pixels outside the disk are copied unchanged."""
    box = footprint_box(center, diameter, img.shape)
    ys, xs = _window(img.shape, box, pad)
    window = img[ys, xs]
    w = _disk(window.shape, (center[0] - ys.start, center[1] - xs.start), diameter)
    out = img.copy()
    out[ys, xs] = np.where(w > 0, window * (1 - w) + filtered(window) * w, window)
    return out, box


def iso_blur(image: np.ndarray, center: Center, diameter: float, sigma: float, *, seed: int = 0) -> tuple[np.ndarray, Box]:
    """Isotropic Gaussian blur of standard deviation ``sigma`` px inside a disk of ``diameter`` px.

    Low-contrast by construction: the local mean is kept, only fine texture is removed.
    ``seed`` is accepted for a uniform signature; nothing here is random.
    """
    _check("iso_blur", diameter, sigma, strength_name="sigma")
    img = to_unit_float(image)
    pad = int(np.ceil(4 * sigma))
    return _blend(img, center, diameter, pad, lambda win: ndimage.gaussian_filter(win, sigma=sigma, mode="nearest"))


def _line_kernel(length: float, angle_deg: float) -> np.ndarray:
    """Normalised motion-blur kernel: a line of ``length`` px at ``angle_deg`` (0 = along x), antialiased."""
    half = max(1, int(np.ceil(length / 2.0)))
    k = np.zeros((2 * half + 1, 2 * half + 1), np.float64)
    t = np.deg2rad(angle_deg)
    n = max(2, int(np.ceil(length * 4)))
    for s in np.linspace(-length / 2.0, length / 2.0, n):
        y, x = half - s * np.sin(t), half + s * np.cos(t)  # image y points down
        y0, x0 = int(np.floor(y)), int(np.floor(x))
        fy, fx = y - y0, x - x0
        for dy, wy in ((0, 1 - fy), (1, fy)):
            for dx, wx in ((0, 1 - fx), (1, fx)):
                if 0 <= y0 + dy < k.shape[0] and 0 <= x0 + dx < k.shape[1]:
                    k[y0 + dy, x0 + dx] += wy * wx
    return (k / k.sum()).astype(np.float32)


def directional_blur(image: np.ndarray, center: Center, diameter: float, length: float, *, seed: int = 0,
                     angle_deg: float | None = None) -> tuple[np.ndarray, Box]:
    """Motion blur of ``length`` px along ``angle_deg`` (drawn uniformly from ``seed`` when None) inside a disk."""
    _check("directional_blur", diameter, length, strength_name="blur length")
    if angle_deg is None:
        angle_deg = float(np.random.default_rng(seed).uniform(0.0, 180.0))
    img = to_unit_float(image)
    kernel = _line_kernel(length, angle_deg)
    pad = kernel.shape[0] // 2 + 1
    return _blend(img, center, diameter, pad, lambda win: ndimage.convolve(win, kernel, mode="nearest"))


def reticular_fine(image: np.ndarray, center: Center, diameter: float, amplitude: float, *, seed: int = 0,
                   spacing_px: float = 6.0, line_px: float = 1.2) -> tuple[np.ndarray, Box]:
    """A fine net-like (reticular) texture inside a disk: two crossing families of thin lines.

    ``amplitude`` (intensity units) is the brightening on a line; ``spacing_px`` the
    distance between lines, ``line_px`` their width. Orientation and phase come from
    ``seed``; the lines wiggle slightly so the net is not a perfect lattice.
    """
    _check("reticular_fine", diameter, amplitude, strength_name="amplitude")
    if not spacing_px >= 2:
        raise ValueError(f"reticular_fine: spacing_px must be >= 2 px, got {spacing_px}")
    img = to_unit_float(image)
    rng = np.random.default_rng(seed)
    box = footprint_box(center, diameter, img.shape)
    x1, y1, x2, y2 = box
    yy, xx = np.mgrid[y1:y2, x1:x2].astype(np.float32)
    yy, xx = yy + 0.5 - center[0], xx + 0.5 - center[1]
    theta = rng.uniform(0, np.pi)
    net = np.zeros_like(yy)
    for t in (theta, theta + np.deg2rad(rng.uniform(55, 125))):
        u = xx * np.cos(t) + yy * np.sin(t)
        v = -xx * np.sin(t) + yy * np.cos(t)
        u = u + 0.35 * spacing_px * np.sin(2 * np.pi * v / (3.1 * spacing_px) + rng.uniform(0, 2 * np.pi))
        d = np.abs(((u / spacing_px + rng.uniform(0, 1)) % 1.0) - 0.5) * spacing_px  # px to the nearest line
        net = np.maximum(net, np.clip(line_px / 2 + 0.5 - d, 0.0, 1.0))
    w = _disk(img.shape, center, diameter)[y1:y2, x1:x2]
    out = img.copy()
    out[y1:y2, x1:x2] = np.clip(img[y1:y2, x1:x2] + amplitude * net * w, 0.0, 1.0)
    return out, box


def nodule(image: np.ndarray, center: Center, diameter: float, contrast: float, *, seed: int = 0,
           lobulation: float = 0.08) -> tuple[np.ndarray, Box]:
    """A small nodule-like opacity: projected-sphere profile ``contrast * sqrt(1 - (r/R)^2)``.

    The radius varies by up to ``lobulation`` (fraction) with angle (seeded), so the
    edge is slightly lobulated rather than a perfect circle; it never exceeds the
    footprint. Added to the image (dense = bright) and clipped to [0, 1].
    """
    _check("nodule", diameter, contrast, strength_name="contrast")
    if not 0 <= lobulation < 0.5:
        raise ValueError(f"nodule: lobulation must lie in [0, 0.5), got {lobulation}")
    img = to_unit_float(image)
    rng = np.random.default_rng(seed)
    box = footprint_box(center, diameter, img.shape)
    x1, y1, x2, y2 = box
    yy, xx = np.mgrid[y1:y2, x1:x2].astype(np.float32)
    dy, dx = yy + 0.5 - center[0], xx + 0.5 - center[1]
    r = np.sqrt(dy ** 2 + dx ** 2)
    phi = np.arctan2(dy, dx)
    wobble = sum(rng.uniform(-1, 1) * np.cos(k * phi + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)) / 3.0
    radius = diameter / 2.0 * (1.0 - lobulation * (0.5 + 0.5 * wobble))  # <= diameter / 2
    profile = np.sqrt(np.clip(1.0 - (r / radius) ** 2, 0.0, 1.0))
    out = img.copy()
    out[y1:y2, x1:x2] = np.clip(img[y1:y2, x1:x2] + contrast * profile, 0.0, 1.0)
    return out, box


#: kind -> (function, what its strength is called)
KINDS: dict[str, tuple[Callable[..., tuple[np.ndarray, Box]], str]] = {
    "iso_blur": (iso_blur, "sigma_px"),
    "directional_blur": (directional_blur, "length_px"),
    "reticular_fine": (reticular_fine, "amplitude"),
    "nodule": (nodule, "contrast"),
}


# -- where a perturbation goes ----------------------------------------------------------------
def placement_map(mask: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    """Distance (px) from each pixel to the nearest pixel outside the lung field or the image.

    ``mask`` is the lung field (the phantom's); without one, the central region
    (:data:`CENTRAL_REGION` of each side) stands in. Computed once per base image and
    shared by every cell's :func:`random_location`.
    """
    h, w = shape
    if mask is None:
        lo, hi = CENTRAL_REGION
        mask = np.zeros(shape, bool)
        mask[int(lo * h): int(np.ceil(hi * h)), int(lo * w): int(np.ceil(hi * w))] = True
    mask = np.asarray(mask, bool)
    if mask.shape != tuple(shape):
        raise ValueError(f"lung mask is {mask.shape}, image is {tuple(shape)}; give the mask of this image")
    padded = np.pad(mask, 1, constant_values=False)  # the image border counts as outside
    return ndimage.distance_transform_edt(padded)[1:-1, 1:-1].astype(np.float32)


def random_location(mask: np.ndarray | None, shape: tuple[int, int], diameter: float, rng: np.random.Generator,
                    *, distance: np.ndarray | None = None) -> Center:
    """A footprint centre ``(y, x)`` in the lung field, the whole footprint inside the image.

    The footprint is kept wholly inside ``mask`` when some place can hold it; a footprint
    wider than the field is centred where the field is deepest (its centre still inside
    the field). ``distance`` is :func:`placement_map` of the mask, if already computed.
    """
    h, w = shape
    r = diameter / 2.0 + 1.0
    if 2 * r + 2 > min(h, w):
        raise ValueError(f"footprint of {diameter} px does not fit in a {w}x{h} image")
    dist = placement_map(mask, shape) if distance is None else distance
    if not (dist > 0).any():
        raise ValueError("the lung mask is empty: no place to put a perturbation")
    # the whole footprint inside the image, always
    yy, xx = np.ogrid[:h, :w]
    in_image = (yy + 0.5 - r >= 0) & (yy + 0.5 + r <= h) & (xx + 0.5 - r >= 0) & (xx + 0.5 + r <= w)
    d = np.where(in_image, dist, 0.0)
    need = min(r + 1.0, float(d.max()))  # shrink the margin only when the field is too narrow
    ys, xs = np.nonzero(d >= need)
    k = rng.integers(len(ys))
    return float(ys[k]) + 0.5, float(xs[k]) + 0.5


# -- the panel -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PerturbationCell:
    """One cell of the panel: a kind at one footprint (disk diameter, px) and strength.

    ``params`` holds a kind's further fixed parameters (``spacing_px`` of
    ``reticular_fine``, ``angle_deg`` of ``directional_blur``) as sorted ``(name, value)``
    pairs; they appear in :attr:`name` so two cells never share a name.
    """

    kind: str
    footprint_px: float
    strength: float
    params: tuple[tuple[str, Any], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown perturbation kind {self.kind!r}; known: {', '.join(KINDS)}")
        object.__setattr__(self, "footprint_px", float(self.footprint_px))
        object.__setattr__(self, "strength", float(self.strength))
        p = dict(self.params) if not isinstance(self.params, Mapping) else dict(self.params.items())
        object.__setattr__(self, "params", tuple(sorted(p.items())))
        _check(self.kind, self.footprint_px, self.strength, strength_name=KINDS[self.kind][1])

    @property
    def name(self) -> str:
        extra = "".join(f"_{k.removesuffix('_px').removesuffix('_deg')}{v:g}" for k, v in self.params)
        return f"{self.kind}_d{self.footprint_px:g}_s{self.strength:g}{extra}"

    @property
    def strength_name(self) -> str:
        return KINDS[self.kind][1]

    def seed_for(self, seed: int, image_index: int) -> np.random.SeedSequence:
        """Seed of this cell on one base image: independent of which other cells the panel holds."""
        return np.random.SeedSequence([int(seed), int(image_index), zlib.crc32(self.name.encode())])

    def apply(self, image: np.ndarray, center: Center, *, seed: int = 0) -> tuple[np.ndarray, Box]:
        fn, _ = KINDS[self.kind]
        return fn(image, center, self.footprint_px, self.strength, seed=seed, **dict(self.params))

    def place_and_apply(self, image: np.ndarray, mask: np.ndarray | None, *, seed: int, image_index: int,
                        distance: np.ndarray | None = None) -> tuple[np.ndarray, Box, Center]:
        """Draw the location and the perturbation's own randomness from (seed, image, cell); apply."""
        ss = self.seed_for(seed, image_index)
        loc_seed, pert_seed = ss.spawn(2)
        img = np.asarray(image)
        center = random_location(mask, img.shape, self.footprint_px, np.random.default_rng(loc_seed), distance=distance)
        out, box = self.apply(img, center, seed=int(pert_seed.generate_state(1)[0]))
        return out, box, center

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "footprint_px": self.footprint_px, "strength": self.strength, **dict(self.params)}


@dataclass(frozen=True)
class Panel:
    """A named grid of perturbation cells, as declared in a panel file."""

    name: str
    cells: tuple[PerturbationCell, ...]
    description: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        names = [c.name for c in self.cells]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"panel {self.name!r} ({self.source or 'in code'}) declares cell(s) {dup} twice")
        if not self.cells:
            raise ValueError(f"panel {self.name!r} ({self.source or 'in code'}) has no cells")

    def __iter__(self):
        return iter(self.cells)

    def __len__(self) -> int:
        return len(self.cells)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.cells]

    def table(self):
        """One row per cell: ``cell``, ``kind``, ``footprint_px``, ``strength``, ``strength_name``, params."""
        import pandas as pd

        return pd.DataFrame([{"cell": c.name, **c.to_dict(), "strength_name": c.strength_name} for c in self.cells])


def list_panels() -> list[str]:
    """Names of the panels shipped in ``cxrcore/panels/``."""
    return sorted(p.name[:-4] for p in resources.files("cxrcore").joinpath("panels").iterdir() if p.name.endswith(".yml"))


def _grid_values(block: Mapping, key: str, where: str) -> list:
    if key not in block:
        raise ValueError(f"{where}: missing field {key!r}; each block needs kind, footprint_px and strength")
    v = block[key]
    vals = list(v) if isinstance(v, (list, tuple)) else [v]
    if not vals:
        raise ValueError(f"{where}: field {key!r} is an empty list")
    return vals


def panel_from_dict(d: Mapping, source: str = "") -> Panel:
    """Build a :class:`Panel` from the parsed YAML (see ``cxrcore/panels/default.yml`` for the format)."""
    where = source or "panel"
    if not isinstance(d, Mapping) or "cells" not in d:
        raise ValueError(f"{where}: expected a mapping with 'name' and a 'cells' list of blocks")
    cells: list[PerturbationCell] = []
    for b, block in enumerate(d["cells"]):
        w = f"{where}, cells[{b}]"
        if not isinstance(block, Mapping):
            raise ValueError(f"{w}: expected a mapping with kind, footprint_px, strength (and params); got {block!r}")
        unknown = set(block) - {"kind", "footprint_px", "strength", "params"}
        if unknown:
            raise ValueError(f"{w}: unknown field(s) {sorted(unknown)}; allowed: kind, footprint_px, strength, params")
        kind = block.get("kind")
        if kind not in KINDS:
            raise ValueError(f"{w}: unknown kind {kind!r}; known: {', '.join(KINDS)}")
        params = dict(block.get("params") or {})
        for fp in _grid_values(block, "footprint_px", w):
            for s in _grid_values(block, "strength", w):
                try:
                    cells.append(PerturbationCell(kind, fp, s, tuple(params.items())))
                except (TypeError, ValueError) as e:
                    raise ValueError(f"{w}: {e}") from e
    return Panel(str(d.get("name") or Path(source).stem or "panel"), tuple(cells), str(d.get("description", "")).strip(), source)


def load_panel(panel: "str | os.PathLike | Panel | Iterable[PerturbationCell]") -> Panel:
    """A panel from a YAML file path, a packaged panel name (``"default"``, ``"smoke"``), or cells in code."""
    import yaml

    if isinstance(panel, Panel):
        return panel
    if isinstance(panel, PerturbationCell):
        return Panel("custom", (panel,))
    if not isinstance(panel, (str, os.PathLike)):
        return Panel("custom", tuple(panel))
    p = Path(panel)
    if not p.suffix and not p.exists():
        res = resources.files("cxrcore").joinpath("panels", f"{panel}.yml")
        if not res.is_file():
            raise FileNotFoundError(f"no panel named {str(panel)!r}; packaged panels: {', '.join(list_panels())}, "
                                    "or give the path of a .yml file")
        text, source = res.read_text(), f"cxrcore/panels/{panel}.yml"
    else:
        if not p.is_file():
            raise FileNotFoundError(f"panel file {p} not found; give a .yml path or one of: {', '.join(list_panels())}")
        text, source = p.read_text(), str(p)
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{source}: not valid YAML ({e})") from e
    return panel_from_dict(d, source)


def panel_examples(image: np.ndarray, cells: "Panel | Sequence[PerturbationCell] | str", *, mask: np.ndarray | None = None,
                   seed: int = 0, image_index: int = 0) -> list[tuple[PerturbationCell, np.ndarray, Box]]:
    """Every cell applied to one base image, exactly as extraction places it: ``[(cell, perturbed, box), ...]``.

    For the book's figure ("each cell on one image, with the box"): pass the images and
    boxes to ``cxrcore.report.image_grid``. With the same ``seed`` and ``image_index`` the
    perturbations are the ones the extraction encodes for that image.
    """
    panel = load_panel(cells)
    img = to_unit_float(image)
    dist = placement_map(mask, img.shape)
    out = []
    for cell in panel:
        pert, box, _ = cell.place_and_apply(img, mask, seed=seed, image_index=image_index, distance=dist)
        out.append((cell, pert, box))
    return out
