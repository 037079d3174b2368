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
from .pooling import excluded_reasons, roi_local
from .probes import grouped_folds, out_of_fold_scores
from .readouts import READOUTS, readout_scores
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

__all__ = ["BoxLevel", "ImageStrata", "Jitter", "box_level", "image_readouts", "image_strata", "jitter_probes"]

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


def _gap_or_nan(y, s, stratum, *, groups, n_boot: int, seed: int) -> tuple[tuple, str, str]:
    """((gap, gap_low, gap_high), gap_method, note) of the large-minus-small gap, NaN limits where not estimable."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FewClustersWarning)
        try:
            g = bootstrap_auc_gap(y, s, stratum, "large", "small", n_boot=n_boot, seed=seed, groups=groups)
        except NotEstimable as err:
            auc_l = auc(y[(y == 0) | (stratum == "large")], s[(y == 0) | (stratum == "large")])
            auc_s = auc(y[(y == 0) | (stratum == "small")], s[(y == 0) | (stratum == "small")])
            return (auc_l - auc_s, np.nan, np.nan), "cluster_percentile", f"gap CI not estimable: {err}"
    few = [str(w.message).split(":")[0] for w in caught if issubclass(w.category, FewClustersWarning)]
    return (g.gap, g.ci_low, g.ci_high), g.method, "; ".join(f"gap: {x}" for x in few)


@dataclass(frozen=True)
class ImageStrata:
    """Image-level probes of ChestX-Det10 (one per encoder, class and global pooling mode).

    aucs: one row per (encoder, class, pooling) with the bootstrap CI (``ci_method``,
    ``note``); strata: the AUC of each size stratum's positives against all negatives with
    its bootstrap CI (``ci_method``) and the stratum gap (large minus small) with its
    joint-bootstrap CI (``gap_method``: "percentile" resampling rows, or
    "cluster_percentile" resampling patients where a patient has several images), and a
    ``note`` (e.g. "gap not estimable: ..."); tests: DeLong's paired test of
    ``patch_mean`` against ``cls`` (clustered by patient where a patient has several
    images; ``method``), BH-adjusted over the whole table (``p_bh``); scores: the
    out-of-fold scores by (encoder, class, pooling); folds: the patient-grouped fold of each
    image by class (the same for every encoder), for :func:`image_readouts`.
    """

    aucs: pd.DataFrame
    strata: pd.DataFrame
    tests: pd.DataFrame
    scores: dict = field(repr=False)
    folds: dict = field(default_factory=dict, repr=False)


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
    from one joint bootstrap over the shared negatives (:func:`cxrcore.stats.bootstrap_auc_gap`),
    resampling whole patients where a patient has several images, as the AUC CIs do.
    CIs resample fixed out-of-fold scores, so refitting variability is not in them.
    """
    image_stratum = {c: boxes[boxes["class"] == c].groupby("image_id")["stratum"]
                     .agg(lambda s: "large" if (s == "large").any() else "small") for c in classes}
    patients = meta["patient_id"].to_numpy()
    clustered = _patients_if_repeated(patients)
    auc_rows, strata_rows, test_rows, scores = [], [], [], {}
    class_folds = {c: grouped_folds(meta[c].to_numpy().astype(int), patients, n_splits=n_splits, seed=seed)
                   for c in classes}
    for key, emb in embeddings.items():
        for c in classes:
            y = meta[c].to_numpy().astype(int)
            folds = class_folds[c]
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
                gap, gap_how, gap_note = (np.nan, np.nan, np.nan), "", "gap: fewer than 2 positives in a stratum"
                if by["small"] is not None and by["large"] is not None:
                    gap, gap_how, gap_note = _gap_or_nan(y, s, stratum, groups=clustered, n_boot=n_boot, seed=seed)
                for st in _STRATA:
                    r = by[st] or (np.nan, np.nan, np.nan, "", "fewer than 2 positives in this stratum")
                    strata_rows.append({"encoder": key, "class": c, "pooling": mode, "stratum": st, "auc": r[0],
                                        "ci_low": r[1], "ci_high": r[2], "ci_method": r[3],
                                        "n_pos": int((stratum == st).sum()), "gap": gap[0], "gap_low": gap[1],
                                        "gap_high": gap[2], "gap_method": gap_how,
                                        "note": "; ".join(x for x in (r[4], gap_note) if x)})
            if len(modes) >= 2:
                a_mode, b_mode = modes[1], modes[0]
                d = delong_paired(y, mode_scores[a_mode], mode_scores[b_mode], groups=clustered)
                test_rows.append({"encoder": key, "class": c, "a": a_mode, "b": b_mode, "auc_a": d.auc_a,
                                  "auc_b": d.auc_b, "delta": d.delta, "ci_low": d.ci[0], "ci_high": d.ci[1], "z": d.z,
                                  "df": d.df, "p_value": d.p_value, "method": d.method, "note": d.note})
    tests = pd.DataFrame(test_rows)
    if len(tests):
        tests["p_bh"] = fdr_bh(tests["p_value"].to_numpy())
    return ImageStrata(pd.DataFrame(auc_rows), pd.DataFrame(strata_rows), tests, scores, class_folds)


def image_readouts(meta: pd.DataFrame, roi_rows: pd.DataFrame, roi_embeddings: Mapping[str, np.ndarray],
                   grids: Mapping[str, object], pass_ids: Mapping[str, np.ndarray], image_scores: Mapping,
                   classes: Sequence[str], *, readouts: Sequence[str] = READOUTS, n_splits: int = 5,
                   seed: int = 0, folds: Mapping[str, np.ndarray] | None = None) -> pd.DataFrame:
    """Per encoder and class: image-level out-of-fold scores of ``cls``, ``patch_mean``, a box-given ``roi_local``
    and the box-free readouts, one row per image, ready for :func:`cxrcore.readouts.gap_closure_table`.

    meta: one row per image (``image_id``, ``patient_id``, a 0/1 column per class), as
    given to :func:`image_strata`. roi_rows: one row per pooled box with ``image_id``,
    ``class``, ``kind`` ("lesion", "control" or "decoy") and ``x1, y1, x2, y2``;
    roi_embeddings: encoder -> ``[len(roi_rows), D]`` ``roi_local`` rows in ``roi_rows``
    order (NaN for a box the preprocessing cut away). grids: encoder -> its stored patch
    grids (:class:`cxrcore.store.Grids`), one encoder scored per entry, in this order;
    pass_ids: encoder -> each ``meta`` image's forward pass in those grids. image_scores:
    :attr:`ImageStrata.scores` (``(encoder, class, mode) -> scores`` in ``meta`` order), so
    ``cls`` and ``patch_mean`` are the very scores of the image-level tables.

    Each class uses :func:`image_strata`'s patient-grouped folds (pass ``folds=``
    :attr:`ImageStrata.folds`; without it they are drawn again by the same call), so every score of an image is out of fold on the same split and the paired tests
    of :func:`~cxrcore.readouts.gap_closure_table` apply. ``roi_local`` given a box is the
    mean ``roi_local`` of the image's lesion boxes of the class, or of its decoy on a
    lesion-free image (:func:`cxrcore.boxes.decoy_boxes`), probed out of fold; an image
    whose every box was cut away has no ``roi_local`` and leaves that (encoder, class) frame.

    No leakage: every trained part is fitted on training-fold images only
    (:func:`~cxrcore.readouts.readout_scores` refuses folds that share a patient or a forward
    pass). The token scorer of ``patch_max`` and ``topk_mean`` learns its patch labels from
    the **lesion boxes of training images** only: a row's ``boxes`` list holds its lesion
    boxes of the class, never a decoy or a control, and readout_scores hands the scorer the
    boxes of training rows only, so a test-fold image's boxes are never seen. ``gem`` learns
    a label-free token centre, ``mil`` image labels only.
    """
    coords = ["x1", "y1", "x2", "y2"]
    frames = []
    for key in grids:
        visible = np.isfinite(roi_embeddings[key]).all(axis=1)
        for c in classes:
            y = meta[c].to_numpy().astype(int)
            if folds is not None:
                f_c = np.asarray(folds[c])
                if len(f_c) != len(meta):
                    raise ValueError(f"image_readouts: folds[{c!r}] has {len(f_c)} entries for {len(meta)} images of "
                                     "meta; pass the ImageStrata.folds of an image_strata run on this meta")
            else:
                f_c = grouped_folds(y, meta["patient_id"].to_numpy(), n_splits=n_splits, seed=seed)
            mine = roi_rows["class"].eq(c) & roi_rows["kind"].isin(["lesion", "decoy"]) & visible
            ids = roi_rows.loc[mine, "image_id"].to_numpy()
            X_roi = pd.DataFrame(roi_embeddings[key][mine.to_numpy()]).groupby(ids).mean()
            # patch labels for the token scorer: the image's lesion boxes (none on lesion-free images)
            lesion = roi_rows[mine & roi_rows["kind"].eq("lesion")]
            patch_labels = {i: [tuple(b) for b in g[coords].to_numpy(float)] for i, g in lesion.groupby("image_id")}
            f = meta[["image_id", "patient_id"]].assign(
                encoder=key, label=y, fold=f_c, pass_id=pass_ids[key],
                boxes=[patch_labels.get(i, []) for i in meta["image_id"]],
                cls=image_scores[key, c, "cls"], patch_mean=image_scores[key, c, "patch_mean"])
            f["class"] = c
            f = f[f["image_id"].isin(X_roi.index)]  # an image whose every box was excluded has no roi_local
            f["roi_local"] = out_of_fold_scores(X_roi.loc[f["image_id"]].to_numpy(), f["label"].to_numpy(),
                                                f["patient_id"].to_numpy(), folds=f["fold"].to_numpy())
            frames.append(readout_scores(f, grids[key], "label", by=["class"], box_col="boxes", readouts=readouts,
                                         seed=seed))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


_NO_REASON = "roi_local row is NaN (reason not recorded)"
_PARTNER = "pair left out with it: its other box was excluded"
_EXCLUSION_COLUMNS = ["reason", "count", "item"]


def _exclusion_rows(reasons: np.ndarray, key: dict) -> list[dict]:
    """One row per distinct non-empty reason: ``key`` columns, reason, count, item "box"."""
    r = pd.Series(np.asarray(reasons, dtype=object))
    r = r[r != ""]
    return [{**key, "reason": str(k), "count": int(v), "item": "box"} for k, v in r.value_counts(sort=False).sort_index().items()]


def _drop_pairs(nan_rows: np.ndarray, reasons: np.ndarray, pair_ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(keep, reason per row): rows with a NaN embedding leave with their reason, their pair's other rows with _PARTNER."""
    why = np.full(nan_rows.shape[0], "", dtype=object)
    why[nan_rows] = [r if isinstance(r, str) and r else _NO_REASON for r in reasons[nan_rows]]
    if pair_ids is not None and nan_rows.any():
        partner = pd.Series(pair_ids).isin(set(pd.Series(pair_ids)[nan_rows])).to_numpy() & ~nan_rows
        why[partner] = _PARTNER
    return why == "", why


@dataclass(frozen=True)
class BoxLevel:
    """Box-level ``roi_local`` probes: lesion box vs matched control, per encoder and class.

    table: AUC with the image-cluster bootstrap CI (``ci_low``/``ci_high``, ``ci_method``),
    the clustered score CI (``score_low``/``score_high``; Newcombe's interval with
    Obuchowski's design effect, see :func:`cxrcore.stats.delong`) and that same procedure's
    test of AUC = 0.5 (``z_vs_chance``, ``df``, ``p_value``; ``score_method`` names it),
    BH-adjusted over the table (``p_bh``), AUC per size stratum, counts (``n_boxes``
    lesion boxes used, ``n_images``, ``n_excluded`` boxes left out) and a ``note``.
    exclusions: the boxes left out, counted per (encoder, class, reason) (``item`` "box"):
    a box whose ``roi_local`` row is NaN (e.g. cropped away by the preprocessing, with the
    reason :mod:`cxrcore.pooling` recorded) leaves with its pair's other box. skipped:
    (encoder, class, reason) for cells that could not be probed.
    """

    table: pd.DataFrame
    skipped: list
    scores: dict = field(repr=False)
    exclusions: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["encoder", "class"] + _EXCLUSION_COLUMNS))


def _embedding_and_reasons(value, roi_rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """roi_local rows and, per row, why a NaN row was excluded (an Encoding's own reasons, else the rows' column)."""
    if hasattr(value, "roi_local") and hasattr(value, "roi_excluded"):  # an Encoding: its own reasons
        return np.asarray(value.roi_local), np.asarray(value.roi_excluded, dtype=object)
    if "roi_excluded" in roi_rows.columns:
        return np.asarray(value), roi_rows["roi_excluded"].fillna("").to_numpy(dtype=object)
    return np.asarray(value), np.full(len(roi_rows), "", dtype=object)


def box_level(roi_rows: pd.DataFrame, embeddings: Mapping[str, np.ndarray], classes: Sequence[str], *,
              n_splits: int = 5, seed: int = 0, n_boot: int = 1000) -> BoxLevel:
    """Per encoder and class: a probe on ``roi_local`` telling lesion boxes from their matched controls.

    roi_rows: one row per box with ``class``, ``kind`` ("lesion" or "control"), ``image_id``
    and ``stratum``, optionally ``pair`` (the lesion-control pair id) and ``roi_excluded``
    (why a box was not pooled, as the store's rows carry it); embeddings: encoder ->
    ``[n_boxes, D]`` ``roi_local`` rows in ``roi_rows`` order, or that encoder's
    :class:`~cxrcore.encoders.base.Encoding`, whose own ``roi_excluded`` then gives the
    reasons (boxes cropped away depend on the encoder's geometry). A NaN row is left out
    with its pair (both boxes of ``pair``, else the row alone) and counted with its reason
    in ``exclusions`` and ``n_excluded``; one cropped-away box never stops the analysis.
    Folds are grouped by image, so a lesion and its control never fall on two sides of a
    split, and both CIs and the test treat the image as the unit.
    """
    rows, skipped, scores, excl = [], [], {}, []
    pair_ids = roi_rows["pair"].to_numpy() if "pair" in roi_rows.columns else None
    for key, value in embeddings.items():
        X_all, reasons_all = _embedding_and_reasons(value, roi_rows)
        if X_all.shape[0] != len(roi_rows):
            raise ValueError(f"embeddings[{key!r}] has {X_all.shape[0]} rows but roi_rows has {len(roi_rows)}; "
                             "give one roi_local row per box, in roi_rows order")
        for c in classes:
            sel = (roi_rows["class"] == c).to_numpy()
            keep, why = _drop_pairs(~np.isfinite(X_all[sel]).all(axis=1), reasons_all[sel],
                                    None if pair_ids is None else pair_ids[sel])
            excl += _exclusion_rows(why, {"encoder": key, "class": c})
            n_excluded = int((~keep).sum())
            sub = roi_rows[sel][keep]
            y = (sub["kind"] == "lesion").to_numpy().astype(int)
            groups = sub["image_id"].to_numpy()
            n_images = int(sub["image_id"].nunique())
            k = min(n_splits, n_images)
            if k < 2 or y.sum() == 0 or y.sum() == y.size:
                skipped.append((key, c, f"{n_images} image(s) with a {c} lesion and control box left"
                                        f"{f' ({n_excluded} boxes excluded)' if n_excluded else ''}; a probe needs 2"))
                continue
            s = out_of_fold_scores(X_all[sel][keep], y, groups, folds=grouped_folds(y, groups, n_splits=k, seed=seed))
            scores[key, c] = np.full(keep.shape[0], np.nan)  # aligned with the class's roi_rows, NaN where left out
            scores[key, c][keep] = s
            a, lo, hi, how, note = _bootstrap_or_nan(y, s, groups=groups, n_boot=n_boot, seed=seed)
            try:
                dl = delong(y, s, groups=groups)
                dl_vals = (dl.ci[0], dl.ci[1], dl.z, dl.df, dl.p_value)
                note = "; ".join(x for x in (note, dl.note) if x)
            except NotEstimable as err:
                dl_vals = (np.nan, np.nan, np.nan, np.nan, np.nan)
                note = "; ".join(x for x in (note, f"score CI and test not estimable: {err}") if x)
            if n_excluded:
                note = "; ".join(x for x in (note, f"{n_excluded} boxes excluded (see exclusions)") if x)
            row = {"encoder": key, "class": c, "pooling": "roi_local", "auc": a, "ci_low": lo, "ci_high": hi,
                   "ci_method": how, "score_low": dl_vals[0], "score_high": dl_vals[1], "z_vs_chance": dl_vals[2],
                   "df": dl_vals[3], "p_value": dl_vals[4], "score_method": "score_clustered",
                   "n_boxes": int(y.sum()), "n_images": n_images, "n_excluded": n_excluded}
            for st in _STRATA:
                keep_st = (sub["stratum"] == st).to_numpy()
                row[f"auc_{st}"] = auc(y[keep_st], s[keep_st]) if 0 < y[keep_st].sum() < keep_st.sum() else np.nan
            rows.append({**row, "note": note})
    table = pd.DataFrame(rows)
    if len(table):
        table["p_bh"] = fdr_bh(table["p_value"].to_numpy())
    return BoxLevel(table, skipped, scores, pd.DataFrame(excl, columns=["encoder", "class"] + _EXCLUSION_COLUMNS))


@dataclass(frozen=True)
class Jitter:
    """Box-jitter results: AUC per (encoder, sigma, scale), overlap shares, paired tests against no jitter.

    table: one row per (encoder, sigma, scale) with the image-cluster bootstrap CI
    (``ci_method``), ``n_excluded`` (boxes left out in that setting) and a ``note``;
    tests: :func:`cxrcore.stats.compare_table`'s rows (``method`` names each test), on
    the pairs whose boxes were pooled in both settings; exclusions: boxes left out per
    (encoder, sigma_px, scale_sigma, reason) with their ``count`` (``item`` "box").
    """

    table: pd.DataFrame
    overlap: pd.DataFrame
    tests: pd.DataFrame
    scores: dict = field(repr=False)
    exclusions: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(
        columns=["encoder", "sigma_px", "scale_sigma"] + _EXCLUSION_COLUMNS))


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
    the probe is refitted on the same image-grouped folds. A box the preprocessing cut
    away (below :data:`cxrcore.pooling.MIN_VISIBLE_FRACTION` of it inside the model input)
    is not pooled; its pair leaves that setting and is counted in ``exclusions`` with the
    reason (:func:`cxrcore.pooling.excluded_reasons`). Each setting's AUC carries an
    image-cluster bootstrap CI; each is compared with the unjittered boxes (sigma 0, scale
    0) by :func:`cxrcore.stats.compare_table` (DeLong's paired test clustered by image,
    BH-adjusted over every setting of every encoder) on the pairs present in both.
    """
    pairs = pairs.reset_index(drop=True)
    lesion0 = pairs[["x1", "y1", "x2", "y2"]].to_numpy(float)
    n = len(pairs)
    y = np.r_[np.ones(n, int), np.zeros(n, int)]
    groups = np.r_[pairs["image_id"].to_numpy(), pairs["image_id"].to_numpy()]
    stratum = np.r_[pairs["stratum"].to_numpy(), pairs["stratum"].to_numpy()]
    folds = grouped_folds(y, groups, n_splits=min(n_splits, pairs["image_id"].nunique()), seed=seed)
    position = {i: k for k, i in enumerate(image_ids)}
    rows, overlap_rows, scores, excl = [], [], {}, []
    pair_of_row = np.r_[np.arange(n), np.arange(n)]
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
                feats, _, visible = roi_local(grid, geoms, per_image, return_visible=True)
                X = np.empty_like(feats)
                X[order] = feats
                reasons = np.empty(2 * n, dtype=object)
                reasons[order] = excluded_reasons(visible)
                keep, why = _drop_pairs(reasons != "", reasons, pair_of_row)
                excl += _exclusion_rows(why, {"encoder": key, "sigma_px": sigma, "scale_sigma": scale})
                s = np.full(2 * n, np.nan)
                s[keep] = out_of_fold_scores(X[keep], y[keep], groups[keep], folds=folds[keep])
                scores[key, sigma, scale] = s
                a, lo, hi, how, note = _bootstrap_or_nan(y[keep], s[keep], groups=groups[keep], n_boot=n_boot,
                                                         seed=seed)
                n_excluded = int((~keep).sum())
                if n_excluded:
                    note = "; ".join(x for x in (note, f"{n_excluded} boxes excluded (see exclusions)") if x)
                row = {"encoder": key, "sigma_px": sigma, "scale_sigma": scale, "pooling": "roi_local", "auc": a,
                       "ci_low": lo, "ci_high": hi, "still_overlapping": float(hit.mean())}
                for st in _STRATA:
                    k_st = keep & (stratum == st)
                    row[f"auc_{st}"] = auc(y[k_st], s[k_st]) if 0 < y[k_st].sum() < k_st.sum() else np.nan
                rows.append({**row, "ci_method": how, "n_excluded": n_excluded, "note": note})
    tested = [(_setting(sg, sc), _setting(0, 0.0)) for sc in scale_sigmas for sg in sigmas_px if (sg, sc) != (0, 0.0)]
    tests = pd.DataFrame()
    if tested:
        wide = pd.concat([pd.DataFrame({"encoder": key, "image_id": groups, "label": y,
                                        **{_setting(sg, sc): scores[key, sg, sc] for sg in sigmas_px for sc in scale_sigmas}})
                          for key in grids], ignore_index=True)
        # a pair excluded in either setting leaves that comparison only (NaN scores)
        tests = compare_table(wide, sorted({c for p in tested for c in p}), "label", pairs=tested, by=["encoder"],
                              group_col="image_id", seed=seed, dropna=True)
    return Jitter(pd.DataFrame(rows), pd.DataFrame(overlap_rows), tests, scores,
                  pd.DataFrame(excl, columns=["encoder", "sigma_px", "scale_sigma"] + _EXCLUSION_COLUMNS))
