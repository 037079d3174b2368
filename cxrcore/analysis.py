"""The paper's composed analyses: probe loops whose tables the ChestX-Det10 and box-jitter chapters print.

Each function takes embeddings that are already computed (one forward pass per image,
see :mod:`cxrcore.extract`) and returns tidy frames; the notebooks only narrate, plot
and publish them. Statistics come from :mod:`cxrcore.stats`, and every table says in a
column which procedure produced each interval and p-value.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from .boxes import jitter_frame, still_overlapping
from .pooling import roi_local
from .probes import grouped_folds, out_of_fold_scores
from .stats import (
    FewClustersWarning,
    NotEstimable,
    auc,
    bootstrap_auc,
    bootstrap_auc_gap,
    compare_table,
    delong,
    delong_paired,
    fdr_bh,
)

__all__ = ["BoxLevel", "ImageStrata", "Jitter", "box_level", "image_strata", "jitter_probes"]

_STRATA = ("small", "large")


def _patients_if_repeated(groups: np.ndarray) -> np.ndarray | None:
    """Patient ids when some patient has several rows (clustered statistics), else None."""
    return groups if pd.Series(groups).duplicated().any() else None


def _bootstrap_or_nan(y, s, *, groups, n_boot: int, seed: int) -> tuple[float, float, float, str, str]:
    """(auc, ci_low, ci_high, ci_method, note) from the (patient-cluster) bootstrap, NaN limits where not estimable."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FewClustersWarning)
        try:
            b = bootstrap_auc(y, s, n_boot=n_boot, seed=seed, groups=groups)
        except NotEstimable as err:
            return auc(y, s), np.nan, np.nan, "percentile", f"bootstrap CI not estimable: {err}"
    few = [str(w.message).split(":")[0] for w in caught if issubclass(w.category, FewClustersWarning)]
    return b.auc, b.ci_low, b.ci_high, b.method, "; ".join(([b.note] if b.note else []) + few)


@dataclass(frozen=True)
class ImageStrata:
    """Image-level probes of ChestX-Det10 (one per encoder, class and global pooling mode).

    aucs: one row per (encoder, class, pooling) with the bootstrap CI; strata: the AUC of
    each size stratum's positives against all negatives and the stratum gap (large minus
    small) with its joint-bootstrap CI; tests: DeLong's paired test of ``patch_mean``
    against ``cls`` (clustered by patient where a patient has several images), BH-adjusted
    over the whole table (``p_bh``); scores: the out-of-fold scores by (encoder, class, pooling).
    """

    aucs: pd.DataFrame
    strata: pd.DataFrame
    tests: pd.DataFrame
    scores: dict = field(repr=False)


def image_strata(meta: pd.DataFrame, boxes: pd.DataFrame, embeddings: Mapping[str, Mapping[str, np.ndarray]],
                 classes: Sequence[str], *, n_splits: int = 5, seed: int = 0, n_boot: int = 1000,
                 modes: Sequence[str] = ("cls", "patch_mean")) -> ImageStrata:
    """Per encoder and class: a probe on each global pooling mode, its AUC by lesion-size stratum and the gap.

    meta: one row per image with ``image_id``, ``patient_id`` and a 0/1 column per class;
    boxes: the cohort's boxes (``image_id``, ``class``, ``stratum``); an image is "large"
    for a class if any of its boxes of that class is large. embeddings: encoder ->
    pooling mode -> ``[n_images, D]`` in ``meta`` order. One set of patient-grouped folds
    per class serves every mode, so the modes' scores are paired. Stratum AUCs reuse those
    out-of-fold scores (a stratum's positives against all negatives); the gap's CI comes
    from one joint bootstrap over the shared negatives (:func:`cxrcore.stats.bootstrap_auc_gap`).
    CIs resample fixed out-of-fold scores, so refitting variability is not in them.
    """
    image_stratum = {c: boxes[boxes["class"] == c].groupby("image_id")["stratum"]
                     .agg(lambda s: "large" if (s == "large").any() else "small") for c in classes}
    patients = meta["patient_id"].to_numpy()
    clustered = _patients_if_repeated(patients)
    auc_rows, strata_rows, test_rows, scores = [], [], [], {}
    for key, emb in embeddings.items():
        for c in classes:
            y = meta[c].to_numpy().astype(int)
            folds = grouped_folds(y, patients, n_splits=n_splits, seed=seed)
            stratum = meta["image_id"].map(image_stratum[c]).fillna("none").to_numpy()
            mode_scores = {}
            for mode in modes:
                s = mode_scores[mode] = scores[key, c, mode] = out_of_fold_scores(emb[mode], y, patients, folds=folds)
                a, lo, hi, how, note = _bootstrap_or_nan(y, s, groups=clustered, n_boot=n_boot, seed=seed)
                auc_rows.append({"encoder": key, "class": c, "pooling": mode, "auc": a, "ci_low": lo, "ci_high": hi,
                                 "n_pos": int(y.sum()), "n_neg": int((y == 0).sum()), "ci_method": how, "note": note})
                by = {}
                for st in _STRATA:
                    keep = (y == 0) | (stratum == st)
                    enough = (stratum == st).sum() >= 2 and (y == 0).sum() >= 2
                    by[st] = _bootstrap_or_nan(y[keep], s[keep], groups=None if clustered is None else clustered[keep],
                                               n_boot=n_boot, seed=seed) if enough else None
                gap = (np.nan, np.nan, np.nan)
                if by["small"] is not None and by["large"] is not None:
                    g = bootstrap_auc_gap(y, s, stratum, "large", "small", n_boot=n_boot, seed=seed)
                    gap = (g.gap, g.ci_low, g.ci_high)
                for st in _STRATA:
                    r = by[st] or (np.nan, np.nan, np.nan, "", "fewer than 2 positives in this stratum")
                    strata_rows.append({"encoder": key, "class": c, "pooling": mode, "stratum": st, "auc": r[0],
                                        "ci_low": r[1], "ci_high": r[2], "n_pos": int((stratum == st).sum()),
                                        "gap": gap[0], "gap_low": gap[1], "gap_high": gap[2]})
            if len(modes) >= 2:
                a_mode, b_mode = modes[1], modes[0]
                d = delong_paired(y, mode_scores[a_mode], mode_scores[b_mode], groups=clustered)
                test_rows.append({"encoder": key, "class": c, "a": a_mode, "b": b_mode, "auc_a": d.auc_a,
                                  "auc_b": d.auc_b, "delta": d.delta, "ci_low": d.ci[0], "ci_high": d.ci[1], "z": d.z,
                                  "df": d.df, "p_value": d.p_value, "method": d.method, "note": d.note})
    tests = pd.DataFrame(test_rows)
    if len(tests):
        tests["p_bh"] = fdr_bh(tests["p_value"].to_numpy())
    return ImageStrata(pd.DataFrame(auc_rows), pd.DataFrame(strata_rows), tests, scores)


@dataclass(frozen=True)
class BoxLevel:
    """Box-level ``roi_local`` probes: lesion box vs matched control, per encoder and class.

    table: AUC with the image-cluster bootstrap CI (``ci_low``/``ci_high``, ``ci_method``),
    the clustered DeLong CI (``delong_low``/``delong_high``) and that same procedure's test
    of AUC = 0.5 (``z_vs_chance``, ``df``, ``p_value``; ``delong_method`` names it:
    "wald" with Obuchowski's variance and a t reference, or "exact_pairs" where the
    variance is 0), BH-adjusted over the table (``p_bh``), AUC per size stratum, counts and
    a ``note``. skipped: (encoder, class, reason) for cells that could not be probed.
    """

    table: pd.DataFrame
    skipped: list
    scores: dict = field(repr=False)


def box_level(roi_rows: pd.DataFrame, embeddings: Mapping[str, np.ndarray], classes: Sequence[str], *,
              n_splits: int = 5, seed: int = 0, n_boot: int = 1000) -> BoxLevel:
    """Per encoder and class: a probe on ``roi_local`` telling lesion boxes from their matched controls.

    roi_rows: one row per box with ``class``, ``kind`` ("lesion" or "control"), ``image_id``
    and ``stratum``; embeddings: encoder -> ``[n_boxes, D]`` ``roi_local`` rows in
    ``roi_rows`` order. Folds are grouped by image, so a lesion and its control never fall
    on two sides of a split, and both CIs and the test treat the image as the unit.
    """
    rows, skipped, scores = [], [], {}
    for key, X in embeddings.items():
        for c in classes:
            sel = (roi_rows["class"] == c).to_numpy()
            sub = roi_rows[sel]
            y = (sub["kind"] == "lesion").to_numpy().astype(int)
            groups = sub["image_id"].to_numpy()
            n_images = int(sub["image_id"].nunique())
            k = min(n_splits, n_images)
            if k < 2:
                skipped.append((key, c, f"{n_images} image(s) with a {c} box; a probe needs 2"))
                continue
            s = scores[key, c] = out_of_fold_scores(np.asarray(X)[sel], y, groups,
                                                    folds=grouped_folds(y, groups, n_splits=k, seed=seed))
            a, lo, hi, how, note = _bootstrap_or_nan(y, s, groups=groups, n_boot=n_boot, seed=seed)
            try:
                dl = delong(y, s, groups=groups)
                dl_vals = (dl.ci[0], dl.ci[1], dl.z, dl.df, dl.p_value, dl.method)
                note = "; ".join(x for x in (note, dl.note) if x)
            except NotEstimable as err:
                dl_vals = (np.nan, np.nan, np.nan, np.nan, np.nan, "wald")
                note = "; ".join(x for x in (note, f"DeLong not estimable: {err}") if x)
            row = {"encoder": key, "class": c, "pooling": "roi_local", "auc": a, "ci_low": lo, "ci_high": hi,
                   "ci_method": how, "delong_low": dl_vals[0], "delong_high": dl_vals[1], "z_vs_chance": dl_vals[2],
                   "df": dl_vals[3], "p_value": dl_vals[4], "delong_method": dl_vals[5], "n_boxes": int(y.sum()),
                   "n_images": n_images}
            for st in _STRATA:
                keep = (sub["stratum"] == st).to_numpy()
                row[f"auc_{st}"] = auc(y[keep], s[keep]) if 0 < y[keep].sum() < keep.sum() else np.nan
            rows.append({**row, "note": note})
    table = pd.DataFrame(rows)
    if len(table):
        table["p_bh"] = fdr_bh(table["p_value"].to_numpy())
    return BoxLevel(table, skipped, scores)


@dataclass(frozen=True)
class Jitter:
    """Box-jitter results: AUC per (encoder, sigma, scale), overlap shares, paired tests against no jitter."""

    table: pd.DataFrame
    overlap: pd.DataFrame
    tests: pd.DataFrame
    scores: dict = field(repr=False)


def _setting(sigma, scale) -> str:
    return f"sigma {sigma:g}, scale {scale:g}"


def jitter_probes(pairs: pd.DataFrame, grids: Mapping[str, tuple], image_ids: Sequence[str],
                  image_hw: Callable[[str], tuple[int, int]], *, sigmas_px: Sequence[float],
                  scale_sigmas: Sequence[float], px_per_sigma: float = 1.0, n_splits: int = 5, seed: int = 0,
                  n_boot: int = 1000) -> Jitter:
    """Jitter every lesion and control box, re-pool ``roi_local`` from stored grids, re-probe, compare with no jitter.

    pairs: one row per lesion box with a matched control (``image_id``, ``stratum``, lesion
    ``x1, y1, x2, y2`` and control ``cx1, cy1, cx2, cy2``); grids: encoder -> (grid
    ``[n_images, h, w, D]``, geometries) in ``image_ids`` order, so no setting costs a
    forward pass. Lesion and control boxes are jittered independently (seeds ``seed`` and
    ``seed + 1``, the same draws at every sigma, so a box moves further along one
    direction as sigma grows) by ``sigma * px_per_sigma`` px, kept inside the image, and
    the probe is refitted on the same image-grouped folds. Each setting's AUC carries an
    image-cluster bootstrap CI; each is compared with the unjittered boxes (sigma 0, scale
    0) by :func:`cxrcore.stats.compare_table` (DeLong's paired test clustered by image,
    BH-adjusted over every setting of every encoder).
    """
    pairs = pairs.reset_index(drop=True)
    lesion0 = pairs[["x1", "y1", "x2", "y2"]].to_numpy(float)
    n = len(pairs)
    y = np.r_[np.ones(n, int), np.zeros(n, int)]
    groups = np.r_[pairs["image_id"].to_numpy(), pairs["image_id"].to_numpy()]
    stratum = np.r_[pairs["stratum"].to_numpy(), pairs["stratum"].to_numpy()]
    folds = grouped_folds(y, groups, n_splits=min(n_splits, pairs["image_id"].nunique()), seed=seed)
    position = {i: k for k, i in enumerate(image_ids)}
    rows, overlap_rows, scores = [], [], {}
    for scale in scale_sigmas:
        for sigma in sigmas_px:
            s_px = float(sigma) * px_per_sigma
            lesion = jitter_frame(pairs, s_px, scale_sigma=scale, seed=seed, image_hw=image_hw)
            control = jitter_frame(pairs, s_px, scale_sigma=scale, seed=seed + 1, image_hw=image_hw,
                                   columns=("cx1", "cy1", "cx2", "cy2"))
            hit = still_overlapping(lesion, lesion0)
            for st in ("all",) + _STRATA:
                keep = np.ones(n, bool) if st == "all" else (pairs["stratum"] == st).to_numpy()
                overlap_rows.append({"sigma_px": sigma, "sigma_image_px": s_px, "scale_sigma": scale, "stratum": st,
                                     "still_overlapping": float(hit[keep].mean()), "n_boxes": int(keep.sum())})
            # per image: its lesion boxes, then its controls; `order` maps pooled rows back to y's rows
            per_image = [[] for _ in image_ids]
            where = [[] for _ in image_ids]
            for offset, boxes in ((0, lesion), (n, control)):
                for k, image_id in enumerate(pairs["image_id"]):
                    per_image[position[image_id]].append(boxes[k].tolist())
                    where[position[image_id]].append(offset + k)
            order = np.concatenate([w for w in where if w]).astype(int)
            for key, (grid, geoms) in grids.items():
                feats, _ = roi_local(grid, geoms, per_image)
                X = np.empty_like(feats)
                X[order] = feats
                s = scores[key, sigma, scale] = out_of_fold_scores(X, y, groups, folds=folds)
                a, lo, hi, how, note = _bootstrap_or_nan(y, s, groups=groups, n_boot=n_boot, seed=seed)
                row = {"encoder": key, "sigma_px": sigma, "scale_sigma": scale, "pooling": "roi_local", "auc": a,
                       "ci_low": lo, "ci_high": hi, "still_overlapping": float(hit.mean())}
                for st in _STRATA:
                    keep = stratum == st
                    row[f"auc_{st}"] = auc(y[keep], s[keep]) if 0 < y[keep].sum() < keep.sum() else np.nan
                rows.append({**row, "ci_method": how, "note": note})
    tested = [(_setting(sg, sc), _setting(0, 0.0)) for sc in scale_sigmas for sg in sigmas_px if (sg, sc) != (0, 0.0)]
    tests = pd.DataFrame()
    if tested:
        wide = pd.concat([pd.DataFrame({"encoder": key, "image_id": groups, "label": y,
                                        **{_setting(sg, sc): scores[key, sg, sc] for sg in sigmas_px for sc in scale_sigmas}})
                          for key in grids], ignore_index=True)
        tests = compare_table(wide, sorted({c for p in tested for c in p}), "label", pairs=tested, by=["encoder"],
                              group_col="image_id", seed=seed)
    return Jitter(pd.DataFrame(rows), pd.DataFrame(overlap_rows), tests, scores)
