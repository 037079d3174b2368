"""A synthetic lesion cohort written in ChestX-Det10's own file format.

The box analyses (image-level probes by lesion size, box-level ``roi_local`` probes,
box jitter) need radiographs with small lesions and their boxes. Without a download,
this module draws them: synthetic phantoms (:func:`~cxrcore.cohorts.synthetic.make_phantom`)
with calcification-, nodule- and mass-like opacities placed in the lung fields, plus
lesion-free images, and writes them exactly as the ChestX-Det10 release is laid out:

- ``train.json`` / ``test.json``: a JSON list of ``{"file_name", "syms", "boxes"}``,
  ``boxes[k] = [x1, y1, x2, y2]`` (integer pixels) for ``syms[k]``, ``[]`` / ``[]`` for an
  image with no finding;
- ``train/`` and ``test/``: 8-bit grey PNGs (the release is 1024 x 1024; ``size`` may be
  smaller for speed, lesions keep their physical size through the pixel spacing).

It is read back only through the real loader, :class:`~cxrcore.cohorts.chestxdet10.ChestXDet10`,
so the book exercises the code a researcher runs on the real files. Two additions the
release does not have, which the loader ignores: ``lung_masks/<split>/<file_name>`` (the
phantom's lung fields, for drawing non-lesion control boxes inside the lungs) and
``synthetic_lesions.json`` (the generation parameters and every lesion's true size and
contrast; written last, so its presence means the cohort is complete).

Sizes follow the radiological definitions and the release's boxes: at the release's
1024 px (about 0.42 mm per pixel over a 43 cm detector) calcification boxes are about
10-60 px, nodules (< 3 cm, Hansell et al. 2008, Fleischner glossary) about 15-90 px,
masses (> 3 cm) about 75-250 px. Calcifications are small and dense (sharp edge, high
attenuation), nodules round with a soft edge, masses large, lobulated and heterogeneous.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from .synthetic import make_phantom

__all__ = ["LESION_CLASSES", "LESION_SPECS", "FIELD_OF_VIEW_MM", "LesionSpec", "render_lesion_image",
           "write_synthetic_chestxdet10"]

#: Side of the imaged field in mm; pixel spacing is FIELD_OF_VIEW_MM / size (0.42 mm at 1024 px).
FIELD_OF_VIEW_MM = 430.0
#: Marker file: generation parameters and per-lesion ground truth; written last.
MANIFEST = "synthetic_lesions.json"
#: Bumped whenever the drawing changes, so an old cohort on disk is regenerated.
GENERATOR_VERSION = 1


@dataclass(frozen=True)
class LesionSpec:
    """How one lesion class is drawn (diameters in mm, contrast as added attenuation)."""

    name: str
    median_mm: float  # median diameter (log-normal)
    spread: float  # sd of log diameter
    min_mm: float
    max_mm: float
    contrast: tuple[float, float]  # added attenuation at the centre, uniform range
    edge: float  # edge blur, as a fraction of the radius (a floor of 0.35 px applies)
    lobulation: float  # amplitude of the radius' low-order harmonics
    texture: float  # internal heterogeneity (fraction of the contrast)
    max_count: int  # up to this many of the class in one image


#: The three small-lesion classes of the paper, spelt as in ChestX-Det10's ``syms``.
LESION_SPECS: dict[str, LesionSpec] = {
    "Calcification": LesionSpec("Calcification", 6.0, 0.35, 2.5, 14.0, (0.9, 1.6), 0.06, 0.0, 0.0, 3),
    "Nodule": LesionSpec("Nodule", 15.0, 0.35, 5.0, 29.0, (0.25, 0.5), 0.18, 0.05, 0.05, 2),
    "Mass": LesionSpec("Mass", 48.0, 0.25, 31.0, 85.0, (0.25, 0.45), 0.22, 0.12, 0.15, 1),
}
LESION_CLASSES: tuple[str, ...] = tuple(LESION_SPECS)

# Lesion-level acceptance: at least this share of the opacity lies in the lung field.
_MIN_LUNG_FRACTION = 0.9
# Gap kept between two lesions' boxes in one image (px), so boxes never overlap.
_LESION_GAP_PX = 4


def _diameter_mm(spec: LesionSpec, rng: np.random.Generator) -> float:
    d = spec.median_mm * np.exp(rng.normal(0.0, spec.spread))
    return float(np.clip(d, spec.min_mm, spec.max_mm))


def _opacity(spec: LesionSpec, radius_px: float, rng: np.random.Generator) -> np.ndarray:
    """Projected thickness (0..1 at the centre) of one lesion on its own small canvas."""
    half = int(np.ceil(radius_px * (1.0 + 2.5 * spec.lobulation) + 3 * max(0.35, spec.edge * radius_px) + 2))
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float64)
    aspect = rng.uniform(0.8, 1.25) if spec.lobulation else rng.uniform(0.9, 1.1)
    theta = rng.uniform(0, np.pi)
    c, s = np.cos(theta), np.sin(theta)
    u, v = (c * xx + s * yy) / aspect, (-s * xx + c * yy) * aspect
    phi = np.arctan2(v, u)
    r = np.full_like(phi, radius_px)
    for k in range(2, 6):  # lobulation: a few low-order harmonics of the outline
        r *= 1.0 + spec.lobulation * rng.uniform(0.3, 1.0) / (k - 1) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    rho = np.sqrt(u * u + v * v) / np.maximum(r, 1e-6)
    t = np.sqrt(np.clip(1.0 - rho * rho, 0.0, None))  # a sphere's projected thickness
    if spec.texture:
        noise = ndimage.gaussian_filter(rng.standard_normal(t.shape), sigma=max(1.0, radius_px / 4))
        t = t * (1.0 + spec.texture * noise / (noise.std() + 1e-9))
    t = ndimage.gaussian_filter(np.clip(t, 0.0, None), sigma=max(0.35, spec.edge * radius_px))
    return t / max(float(t.max()), 1e-9)


def render_lesion_image(image_seed: int, size: int, classes: dict[str, int], rng: np.random.Generator
                        ) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """One phantom with ``classes[name]`` lesions of each class drawn into its lung fields.

    Returns the 8-bit image, the lung mask and one record per lesion (``class``, ``box``
    ``[x1, y1, x2, y2]`` in integer pixel edges, x2/y2 exclusive, ``diameter_mm``,
    ``diameter_px``, ``contrast``, ``cx``, ``cy``). Lesions are added as attenuation in
    the phantom's display model (dense = bright): ``I' = 1 - (1 - I) exp(-a t)``.
    """
    ph = make_phantom(int(image_seed), size)
    img = ph.image.astype(np.float64)
    lung = ph.lung_mask
    spacing = FIELD_OF_VIEW_MM / size
    depth = ndimage.distance_transform_edt(lung)
    placed: list[dict] = []
    # Largest first: a mass needs the most room in the lung field.
    order = [c for c in ("Mass", "Nodule", "Calcification") if classes.get(c, 0)]
    for cls in order:
        spec = LESION_SPECS[cls]
        for _ in range(int(classes[cls])):
            rec = _place_one(spec, img, lung, depth, spacing, placed, rng)
            if rec is not None:
                placed.append(rec)
    out = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return out, lung, placed


def _place_one(spec: LesionSpec, img: np.ndarray, lung: np.ndarray, depth: np.ndarray, spacing: float,
               placed: list[dict], rng: np.random.Generator) -> dict | None:
    """Draw one lesion into ``img`` (in place) inside the lung; None if it found no room."""
    h, w = img.shape
    for attempt in range(40):
        d_mm = _diameter_mm(spec, rng) * (0.93 ** max(0, attempt - 20))  # shrink only if room is scarce
        if d_mm < spec.min_mm and spec.name == "Mass":
            d_mm = spec.min_mm  # a mass stays a mass (> 3 cm) or is not placed
        radius = 0.5 * d_mm / spacing
        ok = np.flatnonzero(depth.ravel() >= 0.6 * radius)
        if ok.size == 0:
            continue
        cy, cx = np.unravel_index(ok[rng.integers(ok.size)], depth.shape)
        t = _opacity(spec, radius, rng)
        half = t.shape[0] // 2
        y0, x0 = cy - half, cx - half
        ys, xs = slice(max(0, y0), min(h, y0 + t.shape[0])), slice(max(0, x0), min(w, x0 + t.shape[1]))
        tl = t[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
        extent = tl > 0.05
        if extent.sum() < 1 or lung[ys, xs][extent].mean() < _MIN_LUNG_FRACTION:
            continue
        rows, cols = np.flatnonzero(extent.any(axis=1)), np.flatnonzero(extent.any(axis=0))
        # Annotators draw a little loose: a margin of 10-35 % of the size, at least 1 px.
        mx = max(1, int(round(rng.uniform(0.05, 0.18) * (cols[-1] - cols[0] + 1))))
        my = max(1, int(round(rng.uniform(0.05, 0.18) * (rows[-1] - rows[0] + 1))))
        box = [max(0, xs.start + int(cols[0]) - mx), max(0, ys.start + int(rows[0]) - my),
               min(w, xs.start + int(cols[-1]) + 1 + mx), min(h, ys.start + int(rows[-1]) + 1 + my)]
        g = _LESION_GAP_PX
        if any(box[0] < p["box"][2] + g and p["box"][0] < box[2] + g and box[1] < p["box"][3] + g
               and p["box"][1] < box[3] + g for p in placed):
            continue
        a = rng.uniform(*spec.contrast)
        region = img[ys, xs]
        img[ys, xs] = 1.0 - (1.0 - region) * np.exp(-a * tl)
        return {"class": spec.name, "box": [int(v) for v in box], "diameter_mm": round(d_mm, 2),
                "diameter_px": round(2 * radius, 2), "contrast": round(float(a), 4), "cx": int(cx), "cy": int(cy)}
    return None


def _plan(n_images: int, seed: int, lesion_free_fraction: float, test_fraction: float) -> list[dict]:
    """Which image gets which lesions, its split and its phantom seed; cheap, drawn up front."""
    rng = np.random.default_rng([seed, 104729])
    plan = []
    for i in range(n_images):
        free = rng.random() < lesion_free_fraction
        counts = {c: 0 for c in LESION_CLASSES}
        if not free:
            while not any(counts.values()):
                for c, spec in LESION_SPECS.items():
                    if rng.random() < 0.45:
                        # mostly one; calcifications and nodules come in small groups
                        counts[c] = int(min(spec.max_count, rng.geometric(0.65)))
        plan.append({
            "index": i,
            "file_name": f"syn{seed:04d}_{i:05d}.png",
            "split": "test" if rng.random() < test_fraction else "train",
            "image_seed": int(rng.integers(0, 2**31 - 1)),
            "lesion_seed": int(rng.integers(0, 2**31 - 1)),
            "classes": counts,
        })
    return plan


def _render_to(item: dict, size: int, tmp: str) -> dict:
    """Worker: render one planned image and write its PNG and lung mask under ``tmp``."""
    rng = np.random.default_rng(item["lesion_seed"])
    img, lung, lesions = render_lesion_image(item["image_seed"], size, item["classes"], rng)
    split = item["split"]
    Image.fromarray(img, mode="L").save(Path(tmp) / split / item["file_name"])
    Image.fromarray(lung.astype(np.uint8) * 255, mode="L").save(Path(tmp) / "lung_masks" / split / item["file_name"])
    return {"file_name": item["file_name"], "split": split, "lesions": lesions}


def _phantom_fingerprint() -> str:
    """Checksum of the phantom's source: a cohort drawn by an older phantom is redrawn, not reused."""
    from . import synthetic

    return f"{zlib.crc32(Path(synthetic.__file__).read_bytes()):08x}"


def _params(n_images, seed, size, lesion_free_fraction, test_fraction) -> dict:
    return {"n_images": int(n_images), "seed": int(seed), "size": int(size),
            "lesion_free_fraction": float(lesion_free_fraction), "test_fraction": float(test_fraction),
            "generator_version": GENERATOR_VERSION, "phantom": _phantom_fingerprint()}


def _is_complete(root: Path, params: dict) -> bool:
    marker = root / MANIFEST
    if not marker.is_file():
        return False
    try:
        done = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    if done.get("params") != params:
        return False
    n = sum(1 for split in ("train", "test") if (root / split).is_dir() for _ in os.scandir(root / split))
    return n == params["n_images"] and (root / "train.json").is_file() and (root / "test.json").is_file()


def write_synthetic_chestxdet10(root: str | os.PathLike, n_images: int = 200, seed: int = 0, size: int = 1024, *,
                                lesion_free_fraction: float = 0.3, test_fraction: float = 0.15,
                                n_jobs: int | None = None) -> Path:
    """Write a synthetic lesion cohort in ChestX-Det10's layout at ``root``; return ``root``.

    Idempotent: if ``root`` already holds a complete cohort made with the same parameters,
    nothing is drawn. Atomic: the cohort is written to a temporary sibling folder and
    renamed into place, so ``root`` is never half-written; a cohort this function wrote
    earlier with other parameters is replaced. A non-empty ``root`` that it did not write
    is left alone (an error says so).

    ``size``: image side in px (the release's 1024, or smaller for speed; 256-1024).
    ``lesion_free_fraction``: share of images with no lesion. In the others each class is
    present with probability 0.45 (at least one class), so each class has negatives.
    ``n_jobs``: worker processes (default: up to 4, one per available core).
    """
    if not 1 <= int(n_images) <= 100_000:
        raise ValueError(f"n_images={n_images}: expected 1-100000 images")
    if not 256 <= int(size) <= 2048:
        raise ValueError(f"size={size}: expected an image side of 256-2048 px (the real release is 1024)")
    for name, v in (("lesion_free_fraction", lesion_free_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= float(v) < 1.0:
            raise ValueError(f"{name}={v}: expected a fraction in [0, 1)")
    root = Path(root)
    params = _params(n_images, seed, size, lesion_free_fraction, test_fraction)
    if _is_complete(root, params):
        return root
    if root.exists() and any(root.iterdir()) and not (root / MANIFEST).is_file():
        raise FileExistsError(f"{root}: exists, is not empty and was not written by write_synthetic_chestxdet10 "
                              f"(no {MANIFEST}); choose an empty or new folder.")
    plan = _plan(int(n_images), int(seed), float(lesion_free_fraction), float(test_fraction))
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.partial-"))
    try:
        for sub in ("train", "test", "lung_masks/train", "lung_masks/test"):
            (tmp / sub).mkdir(parents=True)
        workers = n_jobs if n_jobs is not None else min(4, len(os.sched_getaffinity(0)))
        workers = max(1, min(int(workers), len(plan)))
        if workers == 1 or "fork" not in get_all_start_methods():
            done = [_render_to(item, int(size), str(tmp)) for item in plan]
        else:
            # fork, not spawn: spawn re-runs the caller's script in every worker (a trap
            # for scripts without a __main__ guard). The workers use only numpy, scipy and
            # PIL, never torch, so torch's thread pools in the parent do not matter.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
                with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("fork")) as pool:
                    done = list(pool.map(_render_to, plan, [int(size)] * len(plan), [str(tmp)] * len(plan),
                                         chunksize=max(1, len(plan) // (4 * workers))))
        for split in ("train", "test"):
            entries = [{"file_name": d["file_name"], "syms": [les["class"] for les in d["lesions"]],
                        "boxes": [les["box"] for les in d["lesions"]]} for d in done if d["split"] == split]
            (tmp / f"{split}.json").write_text(json.dumps(entries))
        lesions = [{"file_name": d["file_name"], "split": d["split"], **les} for d in done for les in d["lesions"]]
        (tmp / MANIFEST).write_text(json.dumps({
            "description": "synthetic lesion cohort in ChestX-Det10's layout (cxrcore.cohorts.synthetic_lesions)",
            "params": params, "pixel_spacing_mm": FIELD_OF_VIEW_MM / int(size), "lesions": lesions}, indent=1))
        if root.exists():
            old = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.old-"))
            os.replace(root, old / "cohort")
            os.replace(tmp, root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def open_chestxdet10(data_root: str | os.PathLike | None, *, generated_root: str | os.PathLike, n_images: int = 0,
                     seed: int = 0, image_size: int = 512, **loader_kwargs):
    """The ChestX-Det10 cohort of a notebook: the release at ``data_root``, or the synthetic one.

    With ``data_root`` empty, the synthetic lesion cohort is written (once) under
    ``generated_root`` and read back through the real loader, and marked ``synthetic`` (the
    loader cannot tell generated files from the release). With a release, ``n_images``
    > 0 keeps a seeded random subset of that many images (and their boxes).
    """
    from .chestxdet10 import ChestXDet10

    if data_root:
        root = Path(data_root)
        if not root.is_dir():
            raise FileNotFoundError(f"data_root {str(data_root)!r} does not exist; give the ChestX-Det10 folder "
                                    "(train.json, test.json, train/, test/), or leave data_root empty to generate "
                                    "the synthetic lesion cohort")
    else:
        root = write_synthetic_chestxdet10(generated_root, n_images=n_images, seed=seed, size=image_size)
    data = ChestXDet10(root, **loader_kwargs)
    data.synthetic = not data_root
    if data_root and 0 < n_images < len(data):
        keep = np.sort(np.random.default_rng(seed).choice(len(data), n_images, replace=False))
        data.metadata = data.metadata.iloc[keep].reset_index(drop=True)
        data.boxes = data.boxes[data.boxes["image_id"].isin(data.metadata["image_id"])].reset_index(drop=True)
    return data
