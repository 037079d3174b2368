"""The embedded default cohort: a synthetic posteroanterior chest-radiograph phantom.

No download, no licence, deterministic from a seed. Each image is drawn from
anatomy-shaped layers in attenuation space, then mapped to display intensity like a
processed radiograph (dense = bright):

- body outline with a soft-tissue gradient (thicker centrally and at the shoulders),
- two lung fields with domed hemidiaphragms and sharp costophrenic angles,
- mediastinum, spine, trachea and a heart silhouette (cardiothoracic ratio is a
  parameter, so cardiomegaly is a globally decided finding),
- posterior rib arcs and clavicles,
- lung "markings": a texture whose power spectrum falls off as ``1/f**beta``
  (beta about 3, like radiograph texture), not white noise, plus a little quantum noise,
- optional basal pleural effusion that blunts a costophrenic angle (another global finding).

It is a phantom, not a patient: every figure and table made from it says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import ndimage

from .base import Cohort

#: Global findings the phantom can carry, each decided by a large region of the image.
SYNTHETIC_FINDINGS: tuple[str, ...] = ("cardiomegaly", "effusion")


@dataclass(frozen=True)
class Phantom:
    """One synthetic radiograph and its anatomy masks (all ``[H, W]``)."""

    image: np.ndarray  # float32 in [0, 1], dense = bright
    lung_mask: np.ndarray  # bool, both lung fields
    heart_mask: np.ndarray  # bool
    params: dict = field(default_factory=dict)


def power_law_noise(shape: tuple[int, int], beta: float, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian field with power spectrum ``~ 1 / f**beta``."""
    h, w = shape
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    amp = f ** (-beta / 2.0)
    amp[0, 0] = 0.0
    spec = amp * (rng.standard_normal(amp.shape) + 1j * rng.standard_normal(amp.shape))
    field_ = np.fft.irfft2(spec, s=shape)
    field_ -= field_.mean()
    return (field_ / (field_.std() + 1e-12)).astype(np.float32)


def _smoothstep(d: np.ndarray, width: float) -> np.ndarray:
    """Soft inside-indicator from a signed distance-like value ``d`` (>0 inside)."""
    return 1.0 / (1.0 + np.exp(-np.clip(d / max(width, 1e-6), -40, 40)))


def _lung_field(X: np.ndarray, Y: np.ndarray, side: int, p: dict) -> np.ndarray:
    """Signed 'insideness' of one lung (side -1: image left = patient right, +1: image right)."""
    cx = side * p["lung_cx"]
    top, base = p["lung_top"], p["lung_base"]
    half_w = p["lung_half_w"] * (1.0 + (0.04 if side > 0 else 0.0))
    t = np.clip((Y - top) / (base - top), 0.0, 1.0)
    # the lung widens from the apex down, most of its width reached by mid-height
    width = half_w * (0.15 + 0.85 * np.sin(np.pi * 0.5 * np.clip(t * 1.35, 0, 1)) ** 0.6)
    # medial border pushed out by mediastinum/heart (more on the patient's left, image right)
    inner = p["med_half_w"] + (p["heart_bulge"] if side > 0 else 0.25 * p["heart_bulge"]) * np.exp(-((t - 0.78) / 0.22) ** 2)
    outer_edge = cx + side * width
    lateral = side * (outer_edge - X)  # >0 medial to the lateral border
    medial = side * X - inner  # >0 lateral to the medial border
    # domed hemidiaphragm: highest at mid-lung, lower at the costophrenic angle laterally
    u = (X - cx) / (half_w + 1e-6)
    dome = base - p["dome"] * (1.0 - np.clip(u, -1.2, 1.2) ** 2) - (0.02 if side < 0 else 0.0)
    below_apex = Y - top - 0.22 * (u + side * 0.15) ** 2
    above_dome = dome - Y
    return np.minimum.reduce([lateral, medial, below_apex, above_dome])


def make_phantom(seed: int, size: int = 768, *, ctr: float | None = None, effusion: str | None = None) -> Phantom:
    """Generate one synthetic chest radiograph.

    ``size``: square side in pixels (512-1024 typical). ``ctr``: cardiothoracic ratio
    (default drawn from 0.38-0.48; above 0.5 is cardiomegaly). ``effusion``: ``None``,
    ``"left"`` or ``"right"`` (patient side) for a basal effusion blunting that angle.
    """
    if not 64 <= size <= 4096:
        raise ValueError(f"phantom size {size} out of range; use 64-4096 px (512-1024 typical)")
    rng = np.random.default_rng(seed)
    n = size
    coords = (np.arange(n, dtype=np.float32) + 0.5) / n
    X, Y = np.meshgrid(coords * 2 - 1, coords, indexing="xy")  # X in [-1, 1], Y in [0, 1] top->bottom
    X = X + rng.normal(0, 0.015)  # patient not perfectly centred
    ang = rng.normal(0, 0.015)
    X, Y = X * np.cos(ang) - (Y - 0.5) * np.sin(ang), X * np.sin(ang) + (Y - 0.5) * np.cos(ang) + 0.5

    p = dict(
        lung_cx=rng.uniform(0.40, 0.46), lung_half_w=rng.uniform(0.33, 0.38), lung_top=rng.uniform(0.10, 0.15),
        lung_base=rng.uniform(0.72, 0.80), dome=rng.uniform(0.05, 0.09), med_half_w=rng.uniform(0.09, 0.12),
        ctr=float(ctr) if ctr is not None else rng.uniform(0.38, 0.48), body_half_w=rng.uniform(0.86, 0.95),
        beta=rng.uniform(2.8, 3.2), exposure=rng.uniform(0.9, 1.1), gamma=rng.uniform(0.85, 1.15),
        effusion=effusion,
    )
    thorax_w = 2 * (p["lung_cx"] + p["lung_half_w"])
    heart_w = p["ctr"] * thorax_w
    p["heart_bulge"] = max(0.0, heart_w * 0.62 - p["med_half_w"])

    # -- attenuation layers (arbitrary units) ------------------------------------------------
    neck = _smoothstep(0.20 - np.abs(X), 0.02) * _smoothstep(0.10 - Y, 0.03)
    trunk_half = p["body_half_w"] - 0.10 * np.clip(0.5 - Y, 0, None) - 0.25 * np.clip(0.12 - Y, 0, None) / 0.12
    body = np.maximum(_smoothstep(trunk_half - np.abs(X), 0.025), neck)
    shoulders = _smoothstep(0.16 - Y, 0.05) * _smoothstep(np.abs(X) - 0.45, 0.08)
    soft = body * (0.45 + 0.30 * (1 - X ** 2) + 0.15 * Y) + 0.30 * shoulders * body
    abdomen = _smoothstep(Y - (p["lung_base"] - 0.02), 0.03) * body

    lungs_soft = [_smoothstep(_lung_field(X, Y, s, p), 0.006) for s in (-1, 1)]
    lung = np.maximum(*lungs_soft)

    # heart: an ellipse sitting on the left hemidiaphragm, extending to the patient's left
    hx, hy = 0.25 * heart_w * 0.9, p["lung_base"] - 0.13
    heart_d = 1 - (((X - hx * 0.55) / (heart_w * 0.55)) ** 2 + ((Y - hy) / 0.15) ** 2)
    heart = _smoothstep(heart_d, 0.04) * _smoothstep(p["lung_base"] - 0.01 - Y, 0.02)  # sits on the diaphragm
    mediast = _smoothstep(p["med_half_w"] * (1 + 0.6 * Y) - np.abs(X), 0.01) * _smoothstep(p["lung_base"] + 0.02 - Y, 0.02)
    spine = _smoothstep(0.055 - np.abs(X), 0.006)
    vert = 0.5 + 0.5 * np.cos(2 * np.pi * Y / rng.uniform(0.045, 0.055))  # vertebral bodies and discs
    trachea = _smoothstep(0.028 - np.abs(X + 0.01 * np.sin(6 * Y)), 0.004) * _smoothstep(0.38 - Y, 0.02) * _smoothstep(Y - 0.02, 0.02)

    # posterior ribs: arcs from the spine running laterally and downward
    ribs = np.zeros_like(X)
    n_ribs = 10
    for side in (-1, 1):
        for k in range(n_ribs):
            y0 = p["lung_top"] - 0.04 + k * (p["lung_base"] - p["lung_top"]) / (n_ribs - 0.5) + rng.normal(0, 0.004)
            xs = side * X
            xl = np.clip(xs / (p["lung_cx"] + p["lung_half_w"]), 0, None)
            arc = y0 - 0.035 * xl + 0.13 * xl ** 2.5 + 0.25 * np.clip(xl - 0.8, 0, None) ** 2
            thick = 0.013 + 0.003 * k / n_ribs
            d = np.abs(Y - arc)
            band = _smoothstep(thick - d, 0.003) * _smoothstep(xs - 0.06, 0.01) * _smoothstep(p["lung_cx"] + p["lung_half_w"] + 0.04 - xs, 0.02)
            cortex = _smoothstep(thick - d, 0.002) - _smoothstep(thick * 0.55 - d, 0.002)  # brighter edges
            ribs += band * (0.6 + 0.8 * cortex)
    for side in (-1, 1):
        for k in range(6):
            y0 = p["lung_top"] + 0.10 + k * 0.085 + rng.normal(0, 0.004)
            xl = np.clip(side * X / (p["lung_cx"] + p["lung_half_w"]), 0, 1.1)
            arc = y0 + 0.12 * np.clip(1 - xl, 0, None) ** 1.5 - 0.12
            d = np.abs(Y - arc)
            ribs += 0.45 * _smoothstep(0.009 - d, 0.003) * _smoothstep(xl - 0.35, 0.05) * _smoothstep(1.0 - xl, 0.03)
    # clavicles rise laterally from the sternal ends
    clav_y = p["lung_top"] + 0.05 - 0.10 * np.clip(np.abs(X) - 0.1, 0, None) + 0.05 * np.clip(np.abs(X) - 0.1, 0, None) ** 2
    clavicles = _smoothstep(0.018 - np.abs(Y - clav_y), 0.004) * _smoothstep(np.abs(X) - 0.08, 0.01) * _smoothstep(0.70 - np.abs(X), 0.02)
    # hila and the vessels fanning out of them: denser near the hilum, fading to the periphery
    hilum_d = np.minimum(np.hypot(X + p["med_half_w"] + 0.06, (Y - 0.45) * 1.3), np.hypot(X - p["med_half_w"] - 0.07, (Y - 0.43) * 1.3))
    hila = np.exp(-hilum_d / 0.10)

    texture = power_law_noise((n, n), p["beta"], rng)
    fine = power_law_noise((n, n), 2.0, rng)

    mu = (
        1.00 * soft
        - 0.55 * lung * body
        + 0.07 * lung * (texture + 0.3 * fine)  # vascular / interstitial markings
        + 0.30 * np.maximum(heart, mediast) * body
        + 0.10 * hila * lung * (1 + 0.8 * np.clip(texture, 0, None))
        + 0.12 * spine * (0.8 + 0.2 * vert) * body
        - 0.30 * trachea
        + 0.16 * ribs * body * (0.5 + 0.5 * lung)
        + 0.30 * clavicles * body
        + 0.35 * abdomen
    )
    if effusion is not None:
        if effusion not in ("left", "right"):
            raise ValueError(f"effusion must be None, 'left' or 'right', got {effusion!r}")
        side = 1 if effusion == "left" else -1  # patient left is image right
        meniscus = (p["lung_base"] - rng.uniform(0.10, 0.16)) + 0.08 * (1 - np.clip(side * X / (p["lung_cx"] + p["lung_half_w"]), 0, 1)) ** 2
        fluid = _smoothstep(Y - meniscus, 0.015) * lungs_soft[0 if side < 0 else 1]
        mu = mu + 0.8 * fluid * body

    mu = ndimage.gaussian_filter(mu, sigma=max(0.6, n / 900))
    img = 1.0 - np.exp(-p["exposure"] * np.clip(mu, 0, None) * 1.6)  # dense = bright
    img = img ** p["gamma"]
    img = img + rng.normal(0, 0.006, img.shape)  # quantum noise
    lo, hi = np.percentile(img, [0.5, 99.8])
    img = np.clip((img - lo) / (hi - lo + 1e-9) * 0.92 + 0.03, 0, 1).astype(np.float32)

    lung_mask = lung > 0.5
    heart_mask = (heart > 0.5) & (body > 0.5)
    return Phantom(image=img, lung_mask=lung_mask, heart_mask=heart_mask, params=p)


class SyntheticCohort(Cohort):
    """Synthetic phantom cohort (the embedded default): one patient per image, nothing to download.

    Labels are the global findings in :data:`SYNTHETIC_FINDINGS`, each present with
    probability ``prevalence``: cardiomegaly sets the cardiothoracic ratio to
    0.52-0.60, effusion adds a basal effusion on a random side. Images are drawn on
    demand from ``seed``; the same (seed, index) always gives the same image.

    Citation: this project. Licence: same as the code.
    """

    name = "synthetic"
    synthetic = True

    def __init__(self, n_images: int = 200, seed: int = 0, size: int | tuple[int, int] = (512, 1024),
                 prevalence: float = 0.5) -> None:
        super().__init__()
        if n_images < 1:
            raise ValueError(f"n_images must be >= 1, got {n_images}")
        lo, hi = (size, size) if isinstance(size, int) else size
        if not 64 <= lo <= hi <= 4096:
            raise ValueError(f"size must be a side or (min, max) side in 64-4096 px, got {size!r}")
        rng = np.random.default_rng([seed, 7919])
        sizes = rng.integers(lo, hi + 1, n_images)
        labels = {f: (rng.random(n_images) < prevalence).astype(float) for f in SYNTHETIC_FINDINGS}
        ids = [f"syn{seed:04d}_{i:06d}" for i in range(n_images)]
        self.seed = seed
        self.label_columns = list(SYNTHETIC_FINDINGS)
        self.metadata = pd.DataFrame({
            "image_id": ids,
            "patient_id": [f"synp{seed:04d}_{i:06d}" for i in range(n_images)],
            "study_id": ids,
            "view": "PA",
            "path": [f"synthetic://{seed}/{i}" for i in range(n_images)],
            "height": sizes,
            "width": sizes,
            **labels,
        })
        self._image_seeds = rng.integers(0, 2**31 - 1, n_images)
        self._effusion_side = np.where(rng.random(n_images) < 0.5, "left", "right")
        self._ctr = np.where(labels["cardiomegaly"] == 1, rng.uniform(0.52, 0.60, n_images), np.nan)

    def phantom(self, index: int) -> Phantom:
        """The full phantom (image and masks) for row ``index``."""
        row = self.metadata.iloc[index]
        return make_phantom(
            int(self._image_seeds[index]), int(row["height"]),
            ctr=None if np.isnan(self._ctr[index]) else float(self._ctr[index]),
            effusion=self._effusion_side[index] if row["effusion"] == 1 else None,
        )

    def read_image(self, index: int) -> np.ndarray:
        return self.phantom(index).image
