"""A small-lesion audit card for any encoder: how small a change does each pooling mode still see?

``cxrcore audit ENCODER --out DIR`` (or :func:`audit`) runs the paper's test on one encoder
in one command: a footprint x contrast sweep of the perturbation panel (packaged panels
``audit`` and ``audit-quick``), each image through the encoder **once**, the paired,
patient-grouped probe design of the perturbation-panel chapter, and reports per pooling
mode

- the AUC (95% patient-cluster bootstrap CI) of every perturbation cell;
- the **detectable footprint** of every series (a kind at one strength): the smallest
  footprint whose AUC's lower CI bound exceeds ``threshold``, in original pixels and in
  patches (footprint / effective patch side in original pixels, from the stored geometry),
  or "not reached";
- the **analytic dilution expectation** beside each measured curve (see
  :func:`dilution_table`), and the cells where ``cls`` falls below even that expectation.

Extraction goes through :func:`cxrcore.extract.extract` into ``DIR/store`` (the store of
``cxrcore extract``: resumable, provenance-checked); everything after it is computed from
the store alone (:func:`analyse_store`), so a rerun skips finished chunks and a paper-scale
store made on a cluster can be audited without a model. Outputs: ``DIR/audit.json`` (every
number, validated against the packaged JSON Schema ``cxrcore/data/audit.schema.json``) and
``DIR/audit.html``, a one-page card with its figures embedded.

The dilution model (stated again on the card)
---------------------------------------------
A lesion under a box shifts the k tokens the box touches; along a readout direction w the
mean shift of those tokens is delta (what ``roi_local`` measures: the arm difference of the
roi_local embedding projected on w). If no token outside the box moves, mean pooling over
all N tokens shifts the image embedding along w by k * delta / N. If the pooled embedding's
projection on w varies between images with standard deviation sigma, is Gaussian, and has
the same spread with and without the lesion, a linear readout along w separates perturbed
from unperturbed images (different images, as in the pooled AUC) with

    AUC ~= Phi(k * delta / (N * sigma * sqrt(2))).

Estimates come from the same run: w is the mean roi_local arm difference of the *other*
folds' pairs (cross-fitted, so noise in w does not inflate delta), delta the test pairs'
roi_local difference along w, k the box's cell count from the stored geometry, N the grid's
cells, sigma the spread of unperturbed images' ``patch_mean`` along w. The measured
``patch_mean`` curve departs from the expectation when tokens outside the box move
(attention spreads the change: ``spill_ratio`` > 1), when the fitted probe finds a better
direction than w (above) or cannot estimate one from few images (below). A ``cls`` curve
below the mean-pooling expectation means the global embedding (attention pooling, a
trained head) discards more of the change than plain averaging would.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.special import ndtr

from . import __version__
from .perturb import PerturbationCell
from .pooling import POOLING_MODES
from .store import Embeddings, geometry_from_json

__all__ = ["AuditResult", "QUICK", "FULL", "SCHEMA_FILE", "analyse", "analyse_store", "audit", "cards_figure", "encoders_figure",
           "detectable_footprint", "flags_table", "footprints_side_by_side",
           "dilution_figure", "dilution_shown", "dilution_table", "footprint_table", "effective_patch_px", "box_cells", "expected_auc", "load_schema", "main",
           "register", "run", "series_name", "validate_record", "verdict_lines"]

#: Packaged JSON Schema of ``audit.json`` (Draft 7).
SCHEMA_FILE = "audit.schema.json"
SCHEMA_VERSION = 1
#: Defaults of the full and the quick sweep: panel, base images, bootstrap replicates.
FULL = {"panel": "audit", "n_images": 48, "n_boot": 1000}
QUICK = {"panel": "audit-quick", "n_images": 32, "n_boot": 200}
DEFAULT_THRESHOLD = 0.75
#: A cell is flagged (cls below the dilution expectation) only where the expected AUC is at least this.
FLAG_MIN_EXPECTED = 0.55
#: Label of the mean-pooling expectation in tables and figures.
EXPECTED = "patch_mean expected"
#: Colours of the box-free readouts (cxrcore.readouts), beside report.POOLING_PALETTE's pooling modes.
READOUT_PALETTE: dict[str, str] = {"gem": "#8172B3", "patch_max": "#C44E52", "topk_mean": "#937860", "mil": "#DA8BC3"}


# -- cells, series and geometry ----------------------------------------------------------------
def series_name(kind: str, strength: float, strength_name: str = "", params: Mapping | Sequence = ()) -> str:
    """The series a cell belongs to: its kind at one strength (cells of a series differ in footprint only)."""
    p = dict(params)
    extra = "".join(f", {k} {v:g}" for k, v in sorted(p.items()))
    sname = strength_name or "strength"
    return f"{kind}, {sname} {strength:g}{extra}"


def _cells_frame(panel_cells: Sequence[Mapping]) -> pd.DataFrame:
    """Panel provenance (``store.json``'s ``panel.cells``) -> one row per cell with its series, in panel order."""
    rows = []
    for order, d in enumerate(panel_cells):
        d = dict(d)
        kind, fp, s = d.pop("kind"), d.pop("footprint_px"), d.pop("strength")
        cell = PerturbationCell(kind, fp, s, tuple(d.items()))
        rows.append({"cell": cell.name, "kind": kind, "footprint_px": cell.footprint_px, "strength": cell.strength,
                     "strength_name": cell.strength_name, "params": dict(cell.params),
                     "series": series_name(kind, cell.strength, cell.strength_name, cell.params), "order": order})
    return pd.DataFrame(rows)


def effective_patch_px(geometry) -> float:
    """Side of one patch (token cell) in original-image pixels: stride / scale (geometric mean of x and y)."""
    return float(geometry.stride / math.sqrt(geometry.scale_x * geometry.scale_y))


def _geometries(meta: pd.DataFrame) -> list:
    """One Geometry per row, each distinct JSON parsed once (a panel shares a handful)."""
    parsed = {g: geometry_from_json(g) for g in pd.unique(meta["geometry"])}
    return [parsed[g] for g in meta["geometry"]]


def box_cells(meta: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of extraction metadata: cells the box touches (k), cells of the grid (N), effective patch side (px).

    Each row is mapped through its own image's geometry (the ``geometry`` column), so a
    cohort of mixed image sizes is counted right.
    """
    geoms = _geometries(meta)
    boxes = meta[["x1", "y1", "x2", "y2"]].to_numpy(np.float64)
    k = np.empty(len(meta))
    n = np.empty(len(meta))
    patch = np.empty(len(meta))
    for i, (g, b) in enumerate(zip(geoms, boxes)):
        r0, r1, c0, c1 = g.cells(b)
        k[i] = (r1 - r0) * (c1 - c0)
        n[i] = g.grid[0] * g.grid[1]
        patch[i] = effective_patch_px(g)
    return k, n, patch


# -- the dilution expectation ------------------------------------------------------------------
def expected_auc(shift, sigma) -> np.ndarray:
    """Binormal equal-variance AUC of a readout whose mean moves by ``shift`` with between-image SD ``sigma``.

    ``Phi(shift / (sigma * sqrt(2)))``: the probability that a perturbed image outscores a
    different, unperturbed one when both scores are Gaussian with SD ``sigma``.
    """
    shift, sigma = np.asarray(shift, np.float64), np.asarray(sigma, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return ndtr(shift / (sigma * math.sqrt(2.0)))


def _pairs(part: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Row positions of (arm 0, arm 1) of every base image in one cell, matched by image id."""
    a0 = part.index[part["arm"].to_numpy() == 0]
    a1 = part.index[part["arm"].to_numpy() == 1]
    s0 = pd.Series(a0, index=part.loc[a0, "image_id"].to_numpy())
    s1 = pd.Series(a1, index=part.loc[a1, "image_id"].to_numpy())
    common = s0.index.intersection(s1.index)
    if len(common) < len(s0) or len(common) < len(s1):
        raise ValueError(f"cell {part['cell'].iloc[0]!r}: {len(s0)} unperturbed and {len(s1)} perturbed rows "
                         f"but only {len(common)} images have both; the store is incomplete (rerun the audit to resume)")
    common = common.sort_values()
    return s0.loc[common].to_numpy(), s1.loc[common].to_numpy()


def dilution_table(emb: Embeddings, folds: np.ndarray, *, n_boot: int = 500, ci: float = 0.95,
                   seed: int = 0) -> pd.DataFrame:
    """The mean-pooling (dilution) expectation of every cell, estimated from the same run.

    ``emb``: panel rows (both arms of every cell) with ``cls``, ``patch_mean`` and
    ``roi_local``, and meta columns ``cell``, ``arm``, ``image_id``, ``patient_id``,
    ``geometry``, ``x1..y2``. ``folds``: one fold index per row (the probe's patient-grouped
    folds); the readout direction w of a fold's pairs is estimated on the other folds.
    Returns one row per cell: ``k_mean`` (cells under the box), ``n_tokens`` (N), ``delta``
    (mean roi_local shift along w), ``sigma`` (between-image SD of unperturbed patch_mean
    along w, pooled over folds), ``predicted_shift`` (mean k * delta / N), ``measured_shift``
    (mean patch_mean shift along w), ``spill_ratio`` (measured / predicted), ``expected_auc``
    with a patient-bootstrap CI (``expected_ci_low``/``expected_ci_high``; w held fixed), and
    ``auc_along_w`` (the AUC of patch_mean projected on w: the readout the model describes).
    See the module docstring for the model and its assumptions.
    """
    from .stats import auc as auc_score

    meta = emb.meta.reset_index(drop=True)
    folds = np.asarray(folds)
    if folds.shape[0] != len(meta):
        raise ValueError(f"folds has {folds.shape[0]} entries for {len(meta)} rows; give one fold index per row")
    roi, pm = emb.features["roi_local"], emb.features["patch_mean"]
    k_all, n_all, _ = box_cells(meta)
    rows = []
    for c_i, (cell, part) in enumerate(meta.groupby("cell", sort=False)):
        i0, i1 = _pairs(part)
        f = folds[i1]
        if not np.array_equal(f, folds[i0]):
            raise ValueError(f"cell {cell!r}: the two arms of an image sit in different folds; folds must be grouped by patient")
        d_roi = roi[i1].astype(np.float64) - roi[i0].astype(np.float64)
        p0, p1 = pm[i0].astype(np.float64), pm[i1].astype(np.float64)
        k = k_all[i1]
        n_tok = n_all[i1]
        fold_ids, fi = np.unique(f, return_inverse=True)
        fi = fi.reshape(-1)
        # every fold's readout direction w, from the other folds' pairs; all images projected on each
        proj0 = np.zeros((len(fold_ids), len(i1)))
        proj1 = np.zeros((len(fold_ids), len(i1)))
        delta = np.zeros(len(i1))
        for j in range(len(fold_ids)):
            test = fi == j
            w = d_roi[~test].mean(axis=0)
            norm = np.linalg.norm(w)
            if not norm > 0:  # no change at all under the boxes of the other folds: no direction, no shift
                continue
            w /= norm
            delta[test] = d_roi[test] @ w
            proj0[j], proj1[j] = p0 @ w, p1 @ w
        pred = k * delta / n_tok
        rows_ = np.arange(len(i1))
        s0, s1 = proj0[fi, rows_], proj1[fi, rows_]
        exp, sd, z0, z1 = _expectation(pred, fi, proj0, rows_, s0, s1)
        # bootstrap whole patients; each fold's w is not refitted: the CI is of the estimate given w
        groups = meta.loc[i1, "patient_id"].to_numpy()
        codes = np.unique(groups, return_inverse=True)[1].reshape(-1)
        n_groups = int(codes.max()) + 1
        single = n_groups == len(codes)  # one image per patient: a drawn patient is a drawn pair
        members = None if single else [np.flatnonzero(codes == g) for g in range(n_groups)]
        by_code = codes.argsort()
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), c_i]))
        reps = np.full(int(n_boot), np.nan)
        for r in range(reps.shape[0]):
            drawn = rng.integers(0, n_groups, n_groups)
            idx = by_code[drawn] if single else np.concatenate([members[g] for g in drawn])
            reps[r] = _expectation(pred[idx], fi[idx], proj0, idx)[0]
        lo, hi = np.nanquantile(reps, [(1 - ci) / 2, 1 - (1 - ci) / 2]) if np.isfinite(reps).any() else (np.nan, np.nan)
        measured = float(np.mean(s1 - s0))
        predicted = float(np.mean(pred))
        y = np.r_[np.zeros(len(z0)), np.ones(len(z1))]
        rows.append({"cell": cell, "n_pairs": len(i1), "k_mean": float(k.mean()), "n_tokens": float(n_tok.mean()),
                     "delta": float(np.mean(delta)), "sigma": sd, "predicted_shift": predicted,
                     "measured_shift": measured,
                     "spill_ratio": measured / predicted if abs(predicted) > 0 else np.nan,
                     "expected_auc": exp, "expected_ci_low": float(lo), "expected_ci_high": float(hi),
                     "auc_along_w": float(auc_score(y, np.r_[z0, z1])) if np.isfinite(np.r_[z0, z1]).all() else np.nan})
    return pd.DataFrame(rows)


def _expectation(pred: np.ndarray, fi: np.ndarray, proj0: np.ndarray, idx: np.ndarray, s0=None, s1=None):
    """Expected AUC from per-pair predicted shifts ``pred`` (pairs in folds ``fi``).

    ``proj0[j]``: the unperturbed patch_mean of every image projected on fold j's w; sigma_j is
    its SD over the images ``idx`` (all images, not only the fold's: w comes from roi_local
    differences, not from patch_mean levels, and the spread is then estimated from n images
    rather than n / folds). Returns (expected AUC, sigma pooled over folds, and, when ``s0`` /
    ``s1`` are given, the projections standardised by their fold's mean and sigma).
    """
    sub = proj0[:, idx]
    sd = sub.std(axis=1, ddof=1) if sub.shape[1] > 1 else np.full(len(proj0), np.nan)
    mu = sub.mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        z_pred = pred / sd[fi]
        z0 = None if s0 is None else (s0 - mu[fi]) / sd[fi]
        z1 = None if s1 is None else (s1 - mu[fi]) / sd[fi]
    ok = np.isfinite(z_pred)
    exp = float(expected_auc(np.mean(z_pred[ok]), 1.0)) if ok.any() else np.nan
    return exp, float(np.sqrt(np.nanmean(sd ** 2))), z0, z1


# -- detectable footprint ------------------------------------------------------------------------
def detectable_footprint(table: pd.DataFrame, threshold: float = DEFAULT_THRESHOLD, *, score_col: str = "pooling",
                         bound: str = "ci_low", series_col: str = "series") -> pd.DataFrame:
    """Per series and score: the smallest footprint whose ``bound`` (the AUC's lower CI bound) exceeds ``threshold``.

    ``table`` has ``series_col``, ``score_col``, ``footprint_px``, ``footprint_patches`` and
    ``bound``. Returns one row per (series, score) with ``footprint_px`` /
    ``footprint_patches`` (NaN where not reached), ``reached``, ``largest_px`` (the largest
    footprint tried) and ``threshold``. The smallest such footprint, not the start of an
    unbroken run: a noisy curve may dip above it again, which the per-cell AUCs show.
    """
    rows = []
    for (series, score), part in table.groupby([series_col, score_col], sort=False):
        part = part.sort_values("footprint_px")
        ok = part[part[bound] > threshold]
        first = ok.iloc[0] if len(ok) else None
        rows.append({series_col: series, score_col: score, "threshold": float(threshold),
                     "footprint_px": float(first["footprint_px"]) if first is not None else np.nan,
                     "footprint_patches": float(first["footprint_patches"]) if first is not None else np.nan,
                     "reached": first is not None, "largest_px": float(part["footprint_px"].max())})
    return pd.DataFrame(rows)


def _fp(px: float, patches: float) -> str:
    return f"{px:g} px ({patches:.1f} patches)"


#: How the card names a perturbation kind in its verdict.
KIND_WORDS = {"nodule": "nodule-like opacity", "iso_blur": "isotropic blur", "directional_blur": "directional blur",
              "reticular_fine": "fine reticular texture"}


def verdict_lines(detectable: pd.DataFrame, dilution: pd.DataFrame, *, threshold: float, label: str,
                  stand_in: bool, synthetic: bool, preamble: bool = True) -> list[str]:
    """The card's plain-language verdict: per series, from which footprint each pooling mode detects the change.

    ``detectable``: :func:`detectable_footprint` rows with ``series``, ``kind``,
    ``strength_name``, ``strength``; ``dilution``: :func:`dilution_table` rows with
    ``cls_below_expectation``. ``preamble``: start with how the numbers were produced and
    what "detected" means (False: the findings only).
    """
    lines = []
    if preamble and (stand_in or synthetic):
        what = " and ".join(w for w, on in (("a random-weight stand-in encoder", stand_in),
                                             ("a synthetic phantom cohort", synthetic)) if on)
        lines.append(f"Produced with {what} ({label}): this card checks the pipeline and shows the dilution "
                     "mechanism; it says nothing about the published model.")
    if preamble:
        lines.append(f"Detected means the AUC's lower 95% bound exceeds {threshold:g}; footprints are disk diameters "
                     "in original pixels (patches in brackets).")
    for series, part in detectable.groupby("series", sort=False):
        first = part.iloc[0]
        what = KIND_WORDS.get(first["kind"], first["kind"]) + series[len(first["kind"]):]
        d = part.set_index("pooling")
        largest = float(part["largest_px"].max())
        modes = [m for m in ("roi_local", "patch_mean", "cls") if m in d.index]
        if not any(d.loc[m, "reached"] for m in modes):
            text = f"no pooling mode detects it at any footprint up to {largest:g} px"
        else:
            bits = []
            roi_fp = d.loc["roi_local", "footprint_px"] if "roi_local" in d.index and d.loc["roi_local", "reached"] else None
            for m in modes:
                r = d.loc[m]
                if not r["reached"]:
                    bits.append(f"{m} does not detect it up to {largest:g} px")
                elif m == "cls" and roi_fp is not None and r["footprint_px"] > roi_fp:
                    bits.append(f"cls detects it only from {_fp(r['footprint_px'], r['footprint_patches'])}, missing "
                                f"the footprints from {roi_fp:g} px that roi_local already detects")
                else:
                    bits.append(f"{m} detects it from {_fp(r['footprint_px'], r['footprint_patches'])}")
            text = "; ".join(bits)
        box_free = [m for m in READOUT_PALETTE if m in d.index]
        if box_free:
            text += "; without a box at test time: " + ", ".join(
                f"{m} from {d.loc[m, 'footprint_px']:g} px" if d.loc[m, "reached"] else f"{m} not up to {largest:g} px"
                for m in box_free)
        if EXPECTED in d.index:
            r = d.loc[EXPECTED]
            text += ("; averaging all tokens (the dilution expectation) would detect it from "
                     f"{_fp(r['footprint_px'], r['footprint_patches'])}" if r["reached"] else
                     "; averaging all tokens (the dilution expectation) would not detect it at these footprints")
        lines.append(f"{what[:1].upper()}{what[1:]}: {text}.")
    flagged = dilution[dilution["cls_below_expectation"]] if "cls_below_expectation" in dilution else dilution.iloc[:0]
    if len(flagged):
        lines.append(f"cls falls below even the mean-pooling expectation in {len(flagged)} of {len(dilution)} cells "
                     f"({', '.join(flagged['cell'])}): there the global embedding discards more of the change than "
                     "averaging all tokens would.")
    else:
        lines.append("cls is nowhere significantly below the mean-pooling expectation (its upper 95% bound "
                     f"reaches the expectation wherever averaging would give an AUC of {FLAG_MIN_EXPECTED:g} or more).")
    return lines


# -- the analysis, from a store or from embeddings ---------------------------------------------------
@dataclass
class AuditResult:
    """What an audit found. ``record`` is the content of ``audit.json``; the frames are its tidy parts."""

    record: dict
    auc: pd.DataFrame  # one row per cell x pooling mode
    dilution: pd.DataFrame  # one row per cell
    detectable: pd.DataFrame  # one row per series x pooling mode (and the expectation)
    comparisons: pd.DataFrame  # roi_local / patch_mean vs cls per cell
    verdict: list[str]
    out: Path | None = None
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def findings(self) -> list[str]:
        """The verdict without its preamble (how it was produced, what 'detected' means): for side-by-side tables."""
        r = self.record
        return verdict_lines(self.detectable, self.dilution, threshold=r["parameters"]["threshold"], label=r["label"],
                             stand_in=r["stand_in"], synthetic=r["synthetic"], preamble=False)


def analyse(emb: Embeddings, panel_cells: Sequence[Mapping], *, n_splits: int = 4, n_boot: int = 1000,
            threshold: float = DEFAULT_THRESHOLD, seed: int = 0, ci: float = 0.95, probe=None, grids=None,
            readouts: Sequence[str] = ()) -> dict[str, Any]:
    """Probe, AUCs, paired comparisons, dilution expectation, detectable footprints: the audit's numbers.

    ``emb``: panel rows (every cell, both arms); ``panel_cells``: the panel's cells as
    dicts (``kind``, ``footprint_px``, ``strength``, params), as in a store's provenance.
    ``grids`` (a :class:`cxrcore.store.Grids` of the same run) and ``readouts`` (names from
    :data:`cxrcore.readouts.READOUTS`): add the box-free readouts beside the pooling modes,
    on the same folds, and their gap-closure table (:func:`cxrcore.readouts.gap_closure_table`).
    Returns a dict of tidy frames (``auc``, ``dilution``, ``detectable``, ``comparisons``,
    ``gap_closure`` (empty without readouts), ``oof``).
    """
    from .probes import out_of_fold_table
    from .stats import auc_table, compare_table

    cells = _cells_frame(panel_cells)
    meta = emb.meta.reset_index(drop=True)
    unknown = sorted(set(meta["cell"].dropna()) - set(cells["cell"]))
    if unknown:
        raise ValueError(f"cells {unknown} are in the embeddings but not in the panel; pass the panel the store was made with")
    meta = meta.assign(_row=np.arange(len(meta)))
    emb = Embeddings(meta, emb.features, emb.provenance)
    modes = [m for m in POOLING_MODES if m in emb.features]
    oof = out_of_fold_table(meta, {m: emb.features[m] for m in modes}, "arm", by=["cell"], n_splits=n_splits,
                            seed=seed, probe=probe)
    folds = np.full(len(meta), -1, np.int64)
    folds[oof["_row"].to_numpy()] = oof["fold"].to_numpy()
    readouts = list(readouts)
    gap = pd.DataFrame()
    if readouts:
        from .readouts import gap_closure_table, readout_scores

        if grids is None:
            raise ValueError("readouts need the stored token grids: extract with store_grid=True (cxrcore audit --readouts)")
        oof = readout_scores(oof, grids, "arm", by=["cell"], readouts=readouts, probe=probe, seed=seed)
        gap = gap_closure_table(oof, "arm", readouts=readouts, by=["cell"], n_boot=n_boot, ci=ci, seed=seed)
    _, _, patch = box_cells(meta)
    patch_px = pd.Series(patch).groupby(meta["cell"].to_numpy()).median()
    info = cells.set_index("cell")
    scores = modes + readouts
    table = auc_table(oof, scores, "arm", by=["cell"], score_name="pooling", group_col="patient_id", n_boot=n_boot,
                      ci=ci, seed=seed)
    table = _with_cell_info(table, info, patch_px)
    comparisons = compare_table(oof, scores, "arm", pairs=[(a, "cls") for a in ("roi_local", "patch_mean", *readouts)
                                                           if a in scores],
                                by=["cell"], family=["a"], group_col="patient_id", ci=ci, seed=seed)
    dil = dilution_table(emb, folds, n_boot=n_boot, ci=ci, seed=seed)
    dil = _with_cell_info(dil, info, patch_px)
    cls = table[table["pooling"] == "cls"].set_index("cell")
    dil["cls_auc"] = dil["cell"].map(cls["auc"])
    dil["cls_ci_high"] = dil["cell"].map(cls["ci_high"])
    # only where averaging alone would see something: below FLAG_MIN_EXPECTED there is too little for cls to lose
    dil["cls_below_expectation"] = ((dil["cls_ci_high"] < dil["expected_auc"])
                                    & (dil["expected_auc"] >= FLAG_MIN_EXPECTED)).fillna(False).astype(bool)
    expected_rows = dil.assign(pooling=EXPECTED, auc=dil["expected_auc"], ci_low=dil["expected_ci_low"],
                               ci_high=dil["expected_ci_high"])
    det = detectable_footprint(pd.concat([table, expected_rows[table.columns.intersection(expected_rows.columns)]],
                                         ignore_index=True), threshold)
    det = det.merge(cells.drop_duplicates("series")[["series", "kind", "strength", "strength_name"]], on="series")
    order = {s: i for i, s in enumerate(dict.fromkeys(cells.sort_values("order")["series"]))}
    det = det.sort_values(["series", "pooling"], key=lambda s: s.map(order) if s.name == "series" else s.map(
        {m: i for i, m in enumerate([*POOLING_MODES, EXPECTED, *readouts])})).reset_index(drop=True)
    if len(gap):
        gap = _with_cell_info(gap, info, patch_px)
    return {"auc": table, "dilution": dil, "detectable": det, "comparisons": comparisons, "gap_closure": gap, "oof": oof}


def _with_cell_info(df: pd.DataFrame, info: pd.DataFrame, patch_px: pd.Series) -> pd.DataFrame:
    out = df.copy()
    for c in ("series", "kind", "footprint_px", "strength", "order"):
        out[c] = out["cell"].map(info[c])
    out["patch_px"] = out["cell"].map(patch_px)
    out["footprint_patches"] = out["footprint_px"] / out["patch_px"]
    return out.sort_values(["order"], kind="stable").drop(columns="order").reset_index(drop=True)


def analyse_store(store: str | os.PathLike, *, readouts: Sequence[str] = (), **kw) -> dict[str, Any]:
    """:func:`analyse` on a panel store written by ``cxrcore extract`` / :func:`audit` (no model needed).

    ``readouts``: box-free readouts to add; the store must hold grids (``--store-grid``).
    """
    from .store import read_grids, read_store

    emb = read_store(store)
    panel = (emb.provenance or {}).get("panel")
    if not panel:
        raise ValueError(f"{store}: the store was extracted without a perturbation panel; an audit needs one "
                         "(cxrcore extract --panel audit, or cxrcore audit)")
    grids = read_grids(store) if readouts else None
    return analyse(emb, panel["cells"], grids=grids, readouts=readouts, **kw)


# -- figures and the card -------------------------------------------------------------------------
def dilution_figure(auc: pd.DataFrame, dilution: pd.DataFrame, *, threshold: float = DEFAULT_THRESHOLD,
                    title: str = "", label: str = "", axes=None, ncols: int = 4):
    """Measured AUC per pooling mode against footprint, one panel per series, with the dilution expectation.

    The dashed line and band are the mean-pooling expectation (its bootstrap CI); the
    dotted line is the detection threshold; a red cross marks a cell where ``cls`` falls
    below the expectation. Footprint axes are logarithmic, labelled in px and patches.
    ``axes``: a sequence of matplotlib axes, one per series (to set encoders side by side).
    """
    import matplotlib.pyplot as plt

    from .report import POOLING_PALETTE, set_style

    set_style()
    series = list(dict.fromkeys(auc["series"]))
    fig = None
    if axes is None:
        nc = min(ncols, len(series))
        nr = int(math.ceil(len(series) / nc))
        fig, ax_arr = plt.subplots(nr, nc, figsize=(3.4 * nc + 1.4, 3.0 * nr + 0.8), sharey=True, squeeze=False)
        axes = list(ax_arr.ravel())
        for ax in axes[len(series):]:
            ax.axis("off")
    present = set(auc["pooling"])
    modes = [m for m in (*POOLING_MODES, *READOUT_PALETTE) if m in present]
    palette = {**POOLING_PALETTE, **READOUT_PALETTE}
    for ax, s in zip(axes, series):
        sub = auc[auc["series"] == s]
        d = dilution[dilution["series"] == s].sort_values("footprint_px")
        for j, m in enumerate(modes):
            r = sub[sub["pooling"] == m].sort_values("footprint_px")
            x = r["footprint_px"].to_numpy() * 2 ** ((j - (len(modes) - 1) / 2) * 0.05)  # small dodge on the log axis
            err = np.vstack([(r["auc"] - r["ci_low"]).clip(lower=0), (r["ci_high"] - r["auc"]).clip(lower=0)])
            box_free = m in READOUT_PALETTE
            ax.errorbar(x, r["auc"], yerr=err, fmt="s:" if box_free else "o-", color=palette[m], label=m, capsize=2,
                        ms=3.5 if box_free else 4, lw=1.0 if box_free else 1.2)
        if len(d):
            ax.plot(d["footprint_px"], d["expected_auc"], ls="--", color=POOLING_PALETTE["patch_mean"], lw=1.3,
                    label="mean-pooling expectation")
            ax.fill_between(d["footprint_px"], d["expected_ci_low"], d["expected_ci_high"],
                            color=POOLING_PALETTE["patch_mean"], alpha=0.15, lw=0)
            bad = d[d["cls_below_expectation"]]
            if len(bad):
                ax.plot(bad["footprint_px"], bad["cls_auc"], "x", color="red", ms=8, mew=2,
                        label="cls below expectation")
        ax.axhline(0.5, color="0.5", ls="--", lw=0.8)
        ax.axhline(threshold, color="0.3", ls=":", lw=1)
        fps = sorted(sub["footprint_px"].unique())
        ax.set_xscale("log", base=2)
        ax.set_xticks(fps)
        pp = sub.drop_duplicates("footprint_px").set_index("footprint_px")["footprint_patches"]
        ax.set_xticklabels([f"{f:g}\n({pp[f]:.1f})" for f in fps], fontsize=7)
        ax.minorticks_off()
        ax.set_ylim(0.0, 1.02)
        ax.set_title(s, fontsize=9)
        ax.set_xlabel("footprint, px (patches)", fontsize=8)
    axes[0].set_ylabel("AUC (95% CI)")
    if fig is not None:
        handles, labels = axes[0].get_legend_handles_labels()
        for ax in axes[1:len(series)]:  # the red cross may appear only in a later panel
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        fig.legend(handles, labels, frameon=False, loc="lower center", ncol=len(labels), fontsize=8)
        sup = "\n".join(t for t in (title, f"({label})" if label else "") if t)
        if sup:
            fig.suptitle(sup, fontsize=10)
        fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def cards_figure(results: Mapping[str, "AuditResult"], *, threshold: float = DEFAULT_THRESHOLD, label: str = "",
                 title: str = "Small-lesion audit: AUC against footprint, per encoder (rows) and series (columns)"):
    """Several audits side by side: one row of :func:`dilution_figure` panels per encoder (same series in each row)."""
    import matplotlib.pyplot as plt

    from .report import set_style

    set_style()
    keys = list(results)
    series = list(dict.fromkeys(s for k in keys for s in results[k].auc["series"]))
    fig, axes = plt.subplots(len(keys), len(series), figsize=(3.1 * len(series) + 1.2, 2.6 * len(keys) + 1.0),
                             sharey=True, squeeze=False)
    for i, k in enumerate(keys):
        r = results[k]
        dilution_figure(r.auc, r.dilution, threshold=threshold, axes=list(axes[i]))
        axes[i, 0].set_ylabel(f"{k}\nAUC (95% CI)", fontsize=9)
        if i < len(keys) - 1:
            for ax in axes[i]:
                ax.set_xlabel("")
        if i:
            for ax in axes[i]:
                ax.set_title("")
    handles, labels = {}, {}
    for ax in axes.ravel():
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), frameon=False, loc="lower center", ncol=len(handles), fontsize=8)
    fig.suptitle("\n".join(t for t in (title, f"({label})" if label else "") if t), fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def encoders_figure(results: Mapping[str, "AuditResult"], *, series: str | None = None,
                    threshold: float = DEFAULT_THRESHOLD, col_wrap: int = 3, title: str = "", label: str = ""):
    """Several encoders' audit curves side by side: one panel per encoder for one series of the sweep.

    ``results``: encoder key -> :class:`AuditResult`. Each panel is
    :func:`dilution_figure` for that encoder (AUC per pooling mode against
    footprint in px and patches, the mean-pooling expectation dashed with its band, the
    detection threshold dotted, red crosses where ``cls`` falls below the expectation).
    ``series``: which series (a kind at one strength; default: the first of the sweep).
    Panels wrap ``col_wrap`` to a row, encoders in the book's order
    (:data:`cxrcore.report.ENCODER_ORDER`), one legend below. (The audit draws in the
    book's house style, so it imports :mod:`cxrcore.report`; report never imports the audit.)
    """
    import matplotlib.pyplot as plt

    from .report import PAGE_WIDTH_IN, order_encoders, set_style

    set_style()
    keys = order_encoders(results)
    if not keys:
        raise ValueError("encoders_figure: no audit results to draw")
    first = results[keys[0]].auc
    series = series or first["series"].iloc[0]
    missing = [k for k in keys if series not in set(results[k].auc["series"])]
    if missing:
        raise ValueError(f"encoders_figure: series {series!r} is not in the audits of {missing}; "
                         f"series there: {sorted(set(first['series']))}")
    ncols = max(1, min(len(keys), col_wrap))
    nrows = int(np.ceil(len(keys) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(PAGE_WIDTH_IN, 2.5 * nrows + 1.3), sharey=True, squeeze=False,
                             layout="constrained")
    handles: dict[str, object] = {}
    for k, ax in enumerate(axes.ravel()):
        if k >= len(keys):
            ax.axis("off")
            continue
        r = results[keys[k]]
        dilution_figure(r.auc[r.auc["series"] == series], r.dilution[r.dilution["series"] == series],
                        threshold=threshold, axes=[ax])
        ax.set_title(keys[k], fontsize=9.5)
        ax.set_ylabel("AUC (95% CI)" if k % ncols == 0 else "")
        if k // ncols < nrows - 1 and k + ncols < len(keys):
            ax.set_xlabel("")
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=min(len(handles), 3),
               frameon=False, fontsize=8)
    text = "\n".join(t for t in (title, series, f"({label})" if label else "") if t)
    if text:
        fig.suptitle(text, fontsize=9.5)
    return fig


def footprints_side_by_side(results: Mapping[str, "AuditResult"]) -> pd.DataFrame:
    """Detectable footprints of several audits: one row per series and pooling mode, one column per encoder."""
    parts = []
    for k, r in results.items():
        d = r.detectable
        parts.append(d.assign(encoder=k, shown=[_fp(x.footprint_px, x.footprint_patches) if x.reached
                                                else f"not reached (<= {x.largest_px:g} px)" for x in d.itertuples()]))
    long = pd.concat(parts, ignore_index=True)
    wide = long.pivot_table(index=["series", "pooling"], columns="encoder", values="shown", aggfunc="first",
                            sort=False).reset_index()
    wide.columns.name = None
    return wide[["series", "pooling", *results]]


def flags_table(results: Mapping[str, "AuditResult"]) -> pd.DataFrame:
    """Per audit: cells where cls falls below the dilution expectation, the median spill ratio, and the cells where
    the fitted ``patch_mean`` probe beats the expectation (its lower CI bound above it)."""
    rows = []
    for key, r in results.items():
        d = r.dilution.set_index("cell")
        pm = r.auc[r.auc["pooling"] == "patch_mean"].set_index("cell")["ci_low"].reindex(d.index)
        flagged = d.index[d["cls_below_expectation"]]
        rows.append({"encoder": key, "cells": len(d), "cls below expectation": len(flagged),
                     "which": ", ".join(flagged) or "none", "median spill ratio": float(d["spill_ratio"].median()),
                     "patch_mean above expectation": int((pm > d["expected_auc"]).sum())})
    return pd.DataFrame(rows)


def footprint_table(detectable: pd.DataFrame) -> pd.DataFrame:
    """Detectable footprints for reading: one row per series, one column per pooling mode ('24 px (1.7 patches)')."""
    d = detectable.assign(shown=[_fp(r.footprint_px, r.footprint_patches) if r.reached else f"not reached (<= {r.largest_px:g} px)"
                                 for r in detectable.itertuples()])
    wide = d.pivot_table(index="series", columns="pooling", values="shown", aggfunc="first", sort=False)
    wide = wide[[c for c in [*POOLING_MODES, EXPECTED] if c in wide.columns] +
                [c for c in wide.columns if c not in (*POOLING_MODES, EXPECTED)]].reset_index()
    wide.columns.name = None
    return wide


def dilution_shown(dilution: pd.DataFrame) -> pd.DataFrame:
    """The dilution table for reading: one row per cell, formatted, expectation and its CI in one column."""
    def num(v, fmt):
        return "–" if pd.isna(v) else fmt.format(v)

    d = dilution
    return pd.DataFrame({
        "series": d["series"], "footprint": [f"{a:g} px ({b:.1f})" for a, b in zip(d["footprint_px"], d["footprint_patches"])],
        "k / N": [f"{a:.1f} / {b:.0f}" for a, b in zip(d["k_mean"], d["n_tokens"])],
        "δ": [num(v, "{:.3g}") for v in d["delta"]], "σ": [num(v, "{:.3g}") for v in d["sigma"]],
        "shift predicted": [num(v, "{:.3g}") for v in d["predicted_shift"]],
        "shift measured": [num(v, "{:.3g}") for v in d["measured_shift"]],
        "spill ratio": [num(v, "{:.2f}") for v in d["spill_ratio"]],
        "expected AUC [95% CI]": [f"{num(a, '{:.3f}')} [{num(b, '{:.3f}')}, {num(c, '{:.3f}')}]"
                                  for a, b, c in zip(d["expected_auc"], d["expected_ci_low"], d["expected_ci_high"])],
        "AUC along w": [num(v, "{:.3f}") for v in d["auc_along_w"]],
        "cls AUC": [num(v, "{:.3f}") for v in d["cls_auc"]],
        "cls below": ["yes" if v else "" for v in d["cls_below_expectation"]],
    })


def _box_free_section(record: Mapping) -> str:
    """The card's 'without a box' section: gap closure of each box-free readout (empty without readouts)."""
    from .readouts import needs_table

    rows = record.get("gap_closure") or []
    if not rows:
        return ""
    g = pd.DataFrame(rows)
    g = g[~g["score"].isin(["cls", "roi_local"])]

    def ci(a, lo, hi, fmt="{:.2f}"):
        if a is None or pd.isna(a):
            return "–"
        return fmt.format(a) + ("" if lo is None or pd.isna(lo) else f" [{fmt.format(lo)}, {fmt.format(hi)}]")

    shown = pd.DataFrame({
        "series": g["series"], "footprint": [f"{v:g} px" for v in g["footprint_px"]], "score": g["score"],
        "AUC [95% CI]": [ci(a, b, c, "{:.3f}") for a, b, c in zip(g["auc"], g["auc_ci_low"], g["auc_ci_high"])],
        "roi_local - cls gap": [f"{v:.3f}" for v in g["gap"]],
        "share of the gap closed [95% CI]": [ci(a, b, c) for a, b, c in zip(g["closure"], g["closure_ci_low"], g["closure_ci_high"])],
        "p vs cls (BH)": ["–" if pd.isna(p) else f"{p:.2g}" for p in g["p_adj"]],
        f"FPR at {g['sensitivity'].iloc[0]:.0%} sensitivity (cls)": [f"{a:.2f} ({b:.2f})" for a, b in zip(g["fpr"], g["fpr_cls"])],
    })
    needs = needs_table(["cls", "patch_mean", "roi_local", *record["parameters"].get("readouts", [])])
    return ("<h2>Without a box: box-free readouts</h2><p>Readouts of the same forward pass's patch-token grid that need no "
            "box at test time. <i>Share of the gap closed</i> = (AUC &minus; AUC<sub>cls</sub>) / (AUC<sub>roi_local</sub> "
            "&minus; AUC<sub>cls</sub>), with a patient-bootstrap CI (blank where the gap is under 0.05); the FPR is "
            "measured on the unperturbed images at the threshold keeping that share of perturbed ones. What each needs:</p>"
            + _html_table(needs) + "<details><summary>Gap closure per cell</summary>" + _html_table(shown) + "</details>")


def _png_base64(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _html_table(df: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = []
    for row in df.itertuples(index=False):
        cells = []
        for v in row:
            if isinstance(v, float):
                v = "–" if np.isnan(v) else f"{v:.3f}"
            cells.append(f"<td>{html.escape(str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em;color:#222}
h1{font-size:1.45em;margin-bottom:.2em}h2{font-size:1.1em;margin-top:1.4em;border-bottom:1px solid #ddd}
.banner{background:#fff3cd;border:1px solid #e0c36a;padding:.6em .8em;border-radius:4px;margin:.8em 0}
.meta{color:#555;font-size:.9em}table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left}th{background:#f4f4f4}
img{max-width:100%}ul.verdict li{margin:.35em 0}code{background:#f4f4f4;padding:0 .2em}
details{margin:.6em 0}
"""


def card_html(record: Mapping, auc: pd.DataFrame, dilution: pd.DataFrame, detectable: pd.DataFrame) -> str:
    """The one-page, self-contained audit card (figures inline as base64 PNG)."""
    from .report import with_ci

    enc, coh, par = record["encoder"], record["cohort"], record["parameters"]
    label = record["label"]
    fig = dilution_figure(auc, dilution, threshold=par["threshold"], ncols=2,
                          title=f"{enc['key']}: AUC against footprint, per pooling mode", label=label)
    img = _png_base64(fig)
    banner = ""
    if record["stand_in"] or record["synthetic"]:
        banner = (f"<div class='banner'><b>{html.escape(label)}.</b> "
                  + ("The encoder is a random-weight stand-in of its family, not the published model. " if record["stand_in"] else "")
                  + ("The images are synthetic phantoms, not patients. " if record["synthetic"] else "")
                  + "Numbers on this card test the pipeline and show the dilution mechanism only.</div>")
    verdict = "".join(f"<li>{html.escape(v)}</li>" for v in record["verdict"])
    per_cell = auc.assign(**{"AUC [95% CI]": with_ci(auc)}).pivot_table(
        index=["series", "footprint_px"], columns="pooling", values="AUC [95% CI]", aggfunc="first", sort=False).reset_index()
    per_cell.columns.name = None
    dil_shown = dilution_shown(dilution)
    code = record["code"]
    version = code["cxrcore_version"] + (f" (git {code['git_commit']}{', modified' if code.get('git_dirty') else ''})"
                                         if code.get("git_commit") else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Small-lesion audit: {html.escape(enc['key'])}</title>
<style>{_CSS}</style></head><body>
<h1>Small-lesion audit card: <code>{html.escape(enc['key'])}</code></h1>
<div class="meta">weights <code>{html.escape(str(enc['weights']))}</code> (id <code>{html.escape(enc['weights_id'])}</code>) ·
input {enc['input_size']} px, grid {enc['grid'][0]}x{enc['grid'][1]}, patch {enc['patch_size']} px ·
cohort <code>{html.escape(coh['name'])}</code>, {coh['n_images']} base images · panel <code>{html.escape(record['panel']['name'])}</code>
({len(record['panel']['cells'])} cells) · seed {par['seed']} · {record['created_utc']}</div>
{banner}
<h2>Verdict</h2>
<ul class="verdict">{verdict}</ul>
<h2>Dilution curves</h2>
<img alt="AUC against footprint per pooling mode, with the mean-pooling expectation" src="data:image/png;base64,{img}">
<p>Each point: out-of-fold AUC of a linear probe telling perturbed from unperturbed images (95% patient-cluster
bootstrap CI, {par['n_boot']} replicates, {par['n_splits']} patient-grouped folds). Dashed: the analytic
mean-pooling expectation with its bootstrap band; dotted: the threshold {par['threshold']:g}; red crosses: cells where
<code>cls</code>'s upper 95% bound is below an expectation of at least {FLAG_MIN_EXPECTED:g}.</p>
<h2>Detectable footprint</h2>
<p>The smallest footprint whose AUC lower 95% bound exceeds {par['threshold']:g}; patches = footprint / effective patch
side in original pixels ({enc['effective_patch_px']:.1f} px for these images).</p>
{_html_table(footprint_table(detectable))}
<h2>The dilution model</h2>
<p>A lesion under a box shifts the k tokens the box touches by &delta; (on average) along a readout direction w. If no
token outside the box moves, mean pooling over all N tokens shifts the image embedding along w by k&middot;&delta;/N;
with a between-image spread &sigma; of the pooled embedding along w (Gaussian, the same with and without the lesion) a
linear readout along w reaches AUC &asymp; &Phi;(k&middot;&delta; / (N&middot;&sigma;&middot;&radic;2)). Here w is the mean
<code>roi_local</code> arm difference of the other folds' pairs (cross-fitted), &delta; the held-out pairs'
<code>roi_local</code> difference along w, k the box's cell count from the stored geometry, N the grid's cells and
&sigma; the spread of unperturbed images' <code>patch_mean</code> along w. <i>spill ratio</i> = measured / predicted
<code>patch_mean</code> shift: above 1, attention spread the change beyond the box. The fitted probe may beat the
expectation (it can find a direction where images vary less) or fall short of it (it must estimate a direction from
few images).</p>
{_html_table(dil_shown)}
{_box_free_section(record)}
<details><summary>AUC of every cell and pooling mode</summary>{_html_table(per_cell)}</details>
<h2>Provenance</h2>
<div class="meta">cxrcore {html.escape(version)} · encoder spec: <code>{html.escape(json.dumps(enc['spec'], default=str))}</code> ·
store <code>{html.escape(record['store']['path'])}</code> · wall {record['timing']['wall_seconds']:.1f} s, CPU
{record['timing']['cpu_seconds']:.1f} s · every number is in <code>audit.json</code>.</div>
</body></html>
"""


# -- the record (audit.json) and its schema ---------------------------------------------------------
def load_schema() -> dict:
    """The packaged JSON Schema of ``audit.json``."""
    return json.loads(resources.files("cxrcore").joinpath("data", SCHEMA_FILE).read_text())


def validate_record(record: Mapping) -> None:
    """Raise ``jsonschema.ValidationError`` (naming the field) if ``record`` does not match the schema."""
    import jsonschema

    jsonschema.Draft7Validator(load_schema()).validate(record)


def _clean(v):
    """JSON-safe values: NaN -> None, numpy scalars -> Python."""
    if isinstance(v, Mapping):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return None if not np.isfinite(v) else float(v)
    return v


def _records(df: pd.DataFrame, cols: Sequence[str]) -> list[dict]:
    return [_clean(r) for r in df[[c for c in cols if c in df.columns]].to_dict("records")]


def _git_version() -> tuple[str | None, bool | None]:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None, None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, timeout=10)
        return sha.stdout.strip(), bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None, None


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_record(found: Mapping[str, pd.DataFrame], *, encoder: Mapping, cohort: Mapping, panel: Mapping,
                 parameters: Mapping, store: Mapping, timing: Mapping, label: str, stand_in: bool,
                 synthetic: bool) -> dict:
    """Assemble ``audit.json`` from :func:`analyse`'s frames and the run's facts; validated against the schema."""
    git, dirty = _git_version()
    dil = found["dilution"]
    verdict = verdict_lines(found["detectable"], dil, threshold=parameters["threshold"], label=label,
                            stand_in=stand_in, synthetic=synthetic)
    record = {
        "schema_version": SCHEMA_VERSION,
        "kind": "cxrcore-audit",
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "code": {"cxrcore_version": __version__, "git_commit": git, "git_dirty": dirty},
        "label": label, "stand_in": bool(stand_in), "synthetic": bool(synthetic),
        "encoder": dict(encoder), "cohort": dict(cohort), "panel": dict(panel), "parameters": dict(parameters),
        "store": dict(store),
        "auc": _records(found["auc"], ["cell", "series", "kind", "strength", "footprint_px", "footprint_patches",
                                       "pooling", "auc", "ci_low", "ci_high", "n_pos", "n_neg", "method", "n_boot"]),
        "comparisons": _records(found["comparisons"], ["cell", "a", "b", "auc_a", "auc_b", "delta", "se", "ci_low",
                                                       "ci_high", "z", "p_value", "log10_p", "p_adj", "family", "method"]),
        "dilution": _records(dil, ["cell", "series", "kind", "strength", "footprint_px", "footprint_patches", "n_pairs",
                                   "k_mean", "n_tokens", "delta", "sigma", "predicted_shift", "measured_shift",
                                   "spill_ratio", "expected_auc", "expected_ci_low", "expected_ci_high", "auc_along_w",
                                   "cls_auc", "cls_ci_high", "cls_below_expectation"]),
        "detectable": _records(found["detectable"], ["series", "kind", "strength", "pooling", "threshold", "reached",
                                                     "footprint_px", "footprint_patches", "largest_px"]),
        "gap_closure": _records(found.get("gap_closure", pd.DataFrame()),
                                ["cell", "series", "footprint_px", "footprint_patches", "score", "needs", "auc",
                                 "auc_ci_low", "auc_ci_high", "gap", "closure", "closure_ci_low", "closure_ci_high",
                                 "delta", "delta_ci_low", "delta_ci_high", "p_value", "p_adj", "fpr", "fpr_ci_low",
                                 "fpr_ci_high", "fpr_cls", "sensitivity"]),
        "flags": [str(c) for c in dil.loc[dil["cls_below_expectation"], "cell"]],
        "verdict": verdict,
        "timing": _clean(dict(timing)),
    }
    record = _clean(record)
    validate_record(record)
    return record


# -- the command ------------------------------------------------------------------------------
def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (DataLoader workers); this process only off POSIX."""
    try:
        import resource
    except ImportError:  # Windows: no rusage of children
        return time.process_time()
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def audit(encoder_key: str, *, weights: str | os.PathLike | None = None, stand_in: bool = False,
          cohort: str = "synthetic", data_root: str | os.PathLike | None = None, device: str = "cpu",
          dtype=None, input_size: int | None = None, resize_short: int | None = None, quick: bool = False,
          out: str | os.PathLike = "audit",
          seed: int = 0, n_images: int | None = None, n_boot: int | None = None, n_splits: int = 4,
          threshold: float = DEFAULT_THRESHOLD, panel: str | os.PathLike | None = None, image_size: int = 512,
          cohort_options: Mapping | None = None, batch_size: int = 16, num_workers: int | None = None,
          progress: bool = True, encoder=None, readouts: bool | Sequence[str] = False) -> AuditResult:
    """Run the small-lesion audit of one encoder into ``out`` (resumable); return what it found.

    ``encoder_key``: a registered key, ``timm:<name>``, ``hf:<id>`` or an open_clip id
    (``open_clip:<model name>[@<pretrained tag>]``, ``open_clip:hf-hub:<org>/<repo>``,
    ``open_clip:local-dir:<dir>``; :mod:`cxrcore.encoders.openclip`). ``quick``: the
    reduced sweep (panel ``audit-quick``, 32 images, 200 bootstrap replicates) instead of
    the full one (``audit``, 48, 1000); ``n_images``/``n_boot``/``panel`` override either.
    ``cohort``: any cohort name (``synthetic`` is generated at ``image_size`` px; the
    others read ``data_root``). ``dtype``, ``input_size``, ``resize_short``: as :func:`cxrcore.load_encoder`
    (``"bfloat16"`` loads bf16 weights on a GPU).
    ``encoder``: an already loaded encoder (the book reuses one); it must match ``encoder_key``.
    ``readouts``: True (all) or names of box-free readouts (:mod:`cxrcore.readouts`) to add
    beside the pooling modes; the patch grids are then stored (``out/store-grids``, float16:
    about passes x grid cells x width x 2 bytes, ~1 GB for the full sweep of a 768-wide ViT).
    Writes ``out/store`` (the extraction store), ``out/audit.json`` and ``out/audit.html``.
    """
    import torch

    from .cohorts import GENERATED, check_cohort, get_cohort
    from .encoders import check_encoders, load_encoder
    from .extract import extract, weights_id
    from .perturb import load_panel
    from .report import provenance_label
    from .store import fingerprint, read_manifest, read_store

    t0, c0 = time.perf_counter(), _cpu_seconds()
    check_encoders([encoder_key])
    check_cohort(cohort)
    if not 0.5 <= float(threshold) < 1.0:
        raise ValueError(f"threshold {threshold!r}: expected an AUC in [0.5, 1), e.g. 0.75")
    defaults = QUICK if quick else FULL
    n_images = int(n_images or defaults["n_images"])
    n_boot = int(n_boot or defaults["n_boot"])
    pan = load_panel(panel or defaults["panel"])
    opts = dict(cohort_options or {})
    if cohort in GENERATED:
        opts.setdefault("n_images", n_images)
        opts.setdefault("seed", seed)
        opts.setdefault("size", image_size)
    data = get_cohort(cohort, None if data_root in (None, "") else str(data_root), **opts)
    n_images = min(n_images, len(data))
    if encoder is None:
        encoder = load_encoder(encoder_key, weights=weights, stand_in=stand_in, device=device,
                               dtype=dtype or torch.float32, input_size=input_size, resize_short=resize_short)
    elif encoder.key != encoder_key:
        raise ValueError(f"encoder {encoder.key!r} was passed for encoder_key {encoder_key!r}; they must agree")
    from .readouts import READOUTS

    box_free = list(READOUTS) if readouts is True else list(readouts or ())
    bad = [r for r in box_free if r not in READOUTS]
    if bad:
        raise ValueError(f"unknown readout(s) {bad}; accepted: {list(READOUTS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # a store with grids has another provenance than one without: they live side by side
    store_dir = out / ("store-grids" if box_free else "store")
    res = extract(encoder, data, store_dir, panel=pan, n_images=n_images, seed=seed, batch_size=batch_size,
                  num_workers=num_workers, progress=progress, cohort_options=opts, store_grid=bool(box_free))
    t_extract = time.perf_counter() - t0
    t1 = time.perf_counter()
    emb = read_store(store_dir)
    panel_cells = emb.provenance["panel"]["cells"]
    grids = None
    if box_free:
        from .store import read_grids

        grids = read_grids(store_dir)
    found = analyse(emb, panel_cells, n_splits=n_splits, n_boot=n_boot, threshold=threshold, seed=seed, grids=grids,
                    readouts=box_free)
    del grids
    g = encoder.grid_shape
    is_synthetic = bool(getattr(data, "synthetic", False))
    label = provenance_label(data.name, is_synthetic, bool(encoder.stand_in))
    enc_rec = {"key": encoder.key, "family": encoder.spec.family, "weights": str(encoder.weights),
               "weights_id": weights_id(encoder), "stand_in": bool(encoder.stand_in), "input_size": encoder.input_size,
               "patch_size": encoder.patch_size, "grid": [int(g[0]), int(g[1])], "n_tokens": int(g[0] * g[1]),
               "effective_patch_px": float(found["auc"]["patch_px"].median()),
               "device": str(encoder.device), "dtype": str(encoder.dtype), "spec": _clean(encoder.provenance())}
    cells_rec = [{**_clean({k: v for k, v in r.items() if k != "order"})} for r in _cells_frame(panel_cells).to_dict("records")]
    manifest = read_manifest(store_dir)
    parameters = {"seed": int(seed), "n_images": int(n_images), "n_boot": n_boot, "n_splits": int(n_splits),
                  "threshold": float(threshold), "ci_level": 0.95, "quick": bool(quick), "image_size": int(image_size),
                  "pooling": list(POOLING_MODES), "readouts": box_free}
    timing = {"extract_seconds": t_extract, "analysis_seconds": time.perf_counter() - t1,
              "wall_seconds": time.perf_counter() - t0, "cpu_seconds": _cpu_seconds() - c0}
    record = build_record(
        found, encoder=enc_rec,
        cohort={"name": data.name, "synthetic": is_synthetic, "n_images": int(n_images), "options": _clean(opts)},
        panel={"name": pan.name, "description": pan.description, "cells": cells_rec},
        parameters=parameters,
        store={"path": store_dir.name, "fingerprint": manifest.get("fingerprint"), "chunks_total": res.chunks_total,
               "chunks_resumed": res.chunks_done_before, "chunks_written": res.chunks_written,
               "forward_passes": res.passes},
        timing=timing, label=label, stand_in=bool(encoder.stand_in), synthetic=is_synthetic)
    page = card_html(record, found["auc"], found["dilution"], found["detectable"])
    # timing is measured once the card is drawn too; the card shows the figure known before it was drawn
    record["timing"]["wall_seconds"] = time.perf_counter() - t0
    record["timing"]["cpu_seconds"] = _cpu_seconds() - c0
    validate_record(record)
    paths = {"json": out / "audit.json", "html": out / "audit.html", "store": store_dir}
    _atomic_text(paths["json"], json.dumps(record, indent=2))
    _atomic_text(paths["html"], page)
    return AuditResult(record, found["auc"], found["dilution"], found["detectable"], found["comparisons"],
                       record["verdict"], out, paths)


# -- command line ------------------------------------------------------------------------------
EXAMPLES = """\
examples:
  # the 5-minute check, no download: random-weight stand-in, synthetic phantoms, reduced sweep
  cxrcore audit rad-dino --stand-in --quick --out runs/audit-rad-dino
  # published weights on a GPU, your own images (any folder of PNG/JPEG/DICOM), the full sweep
  cxrcore audit rad-dino --weights /models/rad-dino --cohort folder --data-root /data/cxr --device cuda --out runs/a
  # any timm ViT or transformers vision model
  cxrcore audit timm:vit_base_patch16_224 --weights /models/vit.safetensors --device cuda --out runs/b
"""


def _key_value(text: str) -> tuple[str, object]:
    import yaml

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--cohort-option {text!r}: expected KEY=VALUE, e.g. size=512")
    k, v = text.split("=", 1)
    return k.strip(), yaml.safe_load(v)


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``audit`` sub-command to ``subparsers`` (of ``cxrcore``'s parser); returns its parser."""
    a = subparsers.add_parser("audit", help="small-lesion audit card of one encoder: footprint x contrast sweep, "
                              "detectable footprint per pooling mode, dilution expectation (audit.json + audit.html)",
                              description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("encoder", help="encoder key (cxrcore.list_encoders()), or timm:<name> / hf:<id> / "
                   "open_clip:<model name>[@<pretrained tag>] / open_clip:hf-hub:<org>/<repo> / open_clip:local-dir:<dir>")
    w = a.add_mutually_exclusive_group()
    w.add_argument("--stand-in", action="store_true", help="random-weight stand-in of the encoder's family (no download)")
    w.add_argument("--weights", help="hub id, local directory or checkpoint file of the weights (default: the published ones)")
    a.add_argument("--cohort", default="synthetic", help="cohort name: synthetic (default), folder, manifest, nih, "
                   "mimic, chestxdet10")
    a.add_argument("--data-root", help="folder (or manifest) of the cohort; not needed for synthetic")
    a.add_argument("--cohort-option", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                   help="extra keyword for the cohort (repeatable)")
    a.add_argument("--quick", action="store_true", help=f"reduced sweep: panel {QUICK['panel']}, {QUICK['n_images']} "
                   f"images, {QUICK['n_boot']} bootstrap replicates (full: {FULL['panel']}, {FULL['n_images']}, {FULL['n_boot']})")
    a.add_argument("--panel", help="override the sweep: a packaged panel name or a .yml file")
    a.add_argument("--n-images", type=int, help="base images (each unperturbed and perturbed in every cell)")
    a.add_argument("--n-boot", type=int, help="bootstrap replicates of every CI")
    a.add_argument("--n-splits", type=int, default=4, help="patient-grouped probe folds (default 4)")
    a.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"AUC the lower 95%% CI bound must exceed to call a footprint detected (default {DEFAULT_THRESHOLD})")
    a.add_argument("--readouts", action="store_true", help="also the box-free readouts (gem, patch_max, topk_mean, "
                   "mil; cxrcore.readouts) from the stored patch grids (float16, kept in DIR/store-grids)")
    a.add_argument("--seed", type=int, default=0, help="seed of the cohort, placements, folds and bootstrap")
    a.add_argument("--image-size", type=int, default=512, help="side of the synthetic phantoms (px)")
    a.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    a.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="weights and forward-pass dtype, as for cxrcore extract (bfloat16 on GPUs)")
    a.add_argument("--input-size", type=int, help="override the encoder's input side (a multiple of its patch size)")
    a.add_argument("--resize-short", type=int, help="side resized to before the centre crop of a crop geometry "
                   "(default: the encoder's crop ratio at its input size), e.g. --input-size 224 --resize-short 256: "
                   "DINOv2's published processor")
    a.add_argument("--batch-size", type=int, default=16, help="forward-pass batch size")
    a.add_argument("--num-workers", type=int, help="DataLoader workers (default: CPU count - 1, max 8)")
    a.add_argument("--no-progress", action="store_true", help="no progress bar")
    a.add_argument("--out", required=True, help="output folder: store/, audit.json, audit.html (an existing one is resumed)")
    a.set_defaults(run=run)
    return a


def run(args: argparse.Namespace) -> int:
    """Run the ``audit`` sub-command; prints the verdict and where the card is."""
    res = audit(args.encoder, weights=args.weights, stand_in=args.stand_in, cohort=args.cohort, data_root=args.data_root,
                device=args.device, dtype=args.dtype, input_size=args.input_size, resize_short=args.resize_short,
                quick=args.quick, out=args.out, seed=args.seed, n_images=args.n_images, n_boot=args.n_boot,
                n_splits=args.n_splits, threshold=args.threshold, panel=args.panel, image_size=args.image_size,
                cohort_options=dict(args.cohort_option), batch_size=args.batch_size, num_workers=args.num_workers,
                progress=not args.no_progress, readouts=bool(args.readouts))
    for line in res.verdict:
        print(f"- {line}")
    t = res.record["timing"]
    print(json.dumps({"card": str(res.paths["html"]), "json": str(res.paths["json"]),
                      "wall_seconds": round(t["wall_seconds"], 1), "cpu_seconds": round(t["cpu_seconds"], 1),
                      "resumed_chunks": res.record["store"]["chunks_resumed"]}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``cxrcore audit`` on its own (``python -m cxrcore.audit ...``), with the same error handling as ``cxrcore``."""
    from .encoders import WeightsUnavailableError
    from .store import StoreError

    p = argparse.ArgumentParser(prog="cxrcore")
    sub = p.add_subparsers(dest="command", required=True)
    register(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv if argv[:1] == ["audit"] else ["audit", *argv])
    try:
        return args.run(args)
    except (StoreError, WeightsUnavailableError, ValueError, KeyError, FileNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"cxrcore audit: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
