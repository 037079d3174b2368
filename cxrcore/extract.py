"""Extraction: run an encoder over a cohort (optionally through a perturbation panel).

Each image goes through the encoder once; ``cls``, ``patch_mean`` and every box's
``roi_local`` come from that single forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from .cohorts.base import Cohort
from .encoders.base import Encoder
from .perturb import PerturbationCell, random_location
from .pooling import POOLING_MODES


@dataclass
class Embeddings:
    """Row-aligned metadata and one ``[N, D]`` float32 array per pooling mode."""

    meta: pd.DataFrame
    features: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.meta)

    def subset(self, mask: np.ndarray | pd.Series) -> "Embeddings":
        m = np.asarray(mask, dtype=bool)
        return Embeddings(self.meta[m].reset_index(drop=True), {k: v[m] for k, v in self.features.items()})


def read_with_mask(cohort: Cohort, index: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Image ``index`` and, where the cohort knows it (the phantom), its lung mask; one read."""
    phantom = getattr(cohort, "phantom", None)
    if phantom is None:
        return cohort.read_image(index), None
    ph = phantom(index)
    return ph.image, ph.lung_mask


def encode_panel(cohort: Cohort, encoder: Encoder, cells: Sequence[PerturbationCell], *, n_images: int | None = None,
                 seed: int = 0, batch_size: int = 8, progress: bool = False) -> Embeddings:
    """Paired perturbation panel: every base image unperturbed and perturbed in every cell.

    Rows: one per (base image, cell, arm), ``arm`` 0 = unperturbed, 1 = perturbed, with
    the same box in both arms so ``roi_local`` compares like with like. The base image
    is encoded once (with one box per cell); each perturbed copy once.
    """
    n = len(cohort) if n_images is None else min(int(n_images), len(cohort))
    rows: list[dict] = []
    feats: dict[str, list[np.ndarray]] = {m: [] for m in POOLING_MODES}
    it = range(n)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"{encoder.key} panel", unit="img")
    pending: list[tuple[np.ndarray, list, list[dict]]] = []

    def flush() -> None:
        if not pending:
            return
        enc = encoder.encode([p[0] for p in pending], boxes=[p[1] for p in pending])
        k = 0
        for b, (_, bxs, metas) in enumerate(pending):
            for j, meta in enumerate(metas):
                rows.append(meta)
                feats["cls"].append(enc.cls[b])
                feats["patch_mean"].append(enc.patch_mean[b])
                feats["roi_local"].append(enc.roi_local[k + j])
            k += len(bxs)
        pending.clear()

    for i in it:
        row = cohort.metadata.iloc[i]
        base, mask = read_with_mask(cohort, i)
        base_boxes, base_metas = [], []
        for c, cell in enumerate(cells):
            rng = np.random.default_rng([seed, i, c])
            center = random_location(mask, base.shape, cell.footprint_px, rng)
            pert, box = cell.apply(base, center)
            meta = {"image_id": row["image_id"], "patient_id": row["patient_id"], "cell": cell.name,
                    "kind": cell.kind, "footprint_px": cell.footprint_px, "strength": cell.strength,
                    "x1": box[0], "y1": box[1], "x2": box[2], "y2": box[3]}
            base_boxes.append(box)
            base_metas.append({**meta, "arm": 0})
            pending.append((pert, [box], [{**meta, "arm": 1}]))
        pending.append((base, base_boxes, base_metas))
        if len(pending) >= batch_size:
            flush()
    flush()
    meta = pd.DataFrame(rows)
    return Embeddings(meta, {m: np.stack(v).astype(np.float32) for m, v in feats.items()})
