"""AUC, DeLong tests, bootstrap confidence intervals, BH-FDR and permutation floors.

Every function is pure and returns a float, a small frozen dataclass or a tidy
DataFrame. Labels are 0/1 (or bool) with 1 the positive class; higher scores mean
"more positive". AUCs are never flipped: a probe that ranks backwards reports an AUC
below 0.5, because flipping would lift every chance-floor estimate above 0.5.

All AUC machinery rests on DeLong placement values: for positive i, V10_i is the share
of negatives it outscores (ties count one half); for negative j, V01_j is the share of
positives that outscore it. AUC = mean(V10) = mean(V01).

References: DeLong, DeLong & Clarke-Pearson 1988, Biometrics 44:837 (variance and
paired test); Sun & Xu 2014, IEEE Signal Processing Letters 21:1389 (fast midrank
algorithm); Efron 1987, JASA 82:171 (BCa intervals); Benjamini & Hochberg 1995, JRSS-B
57:289 (FDR).
"""

from __future__ import annotations

import math
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from scipy.special import log_ndtr, ndtr, ndtri

__all__ = [
    "AUCResult",
    "BootstrapResult",
    "PairedDeLongResult",
    "PermutationFloor",
    "auc",
    "auc_table",
    "bootstrap_auc",
    "compare_table",
    "delong",
    "delong_paired",
    "fdr_bh",
    "permutation_floor",
]

_LN10 = math.log(10.0)


# -- input checks ------------------------------------------------------------------------
def _as_labels(y_true, name: str = "y_true") -> np.ndarray:
    """Return ``y_true`` as a bool array, refusing anything but 0/1 labels."""
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one label per row); got shape {y.shape}")
    if y.dtype == bool:
        return y
    if y.dtype.kind not in "iuf":
        raise ValueError(
            f"{name} must hold 0/1 or bool labels; got dtype {y.dtype}. "
            "Map the label column to 0/1 (1 = positive) first."
        )
    if y.dtype.kind == "f" and np.isnan(y).any():
        raise ValueError(
            f"{name} has {int(np.isnan(y).sum())} NaN labels (first at row "
            f"{int(np.flatnonzero(np.isnan(y))[0])}); drop unlabelled rows before scoring."
        )
    bad = (y != 0) & (y != 1)
    if bad.any():
        raise ValueError(
            f"{name} must hold only 0/1 labels; found {np.unique(y[bad])[:5].tolist()} "
            f"(first at row {int(np.flatnonzero(bad)[0])}). Map it to 0/1 (1 = positive) first."
        )
    return y == 1


def _as_score(score, n: int, name: str = "score") -> np.ndarray:
    """Return ``score`` as float64, refusing NaN and length mismatches."""
    s = np.asarray(score, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one score per row); got shape {s.shape}")
    if s.shape[0] != n:
        raise ValueError(
            f"y_true has {n} rows but {name} has {s.shape[0]}; they must be aligned row by row."
        )
    nan = np.isnan(s)
    if nan.any():
        raise ValueError(
            f"{name} has {int(nan.sum())} NaN values (first at row {int(np.flatnonzero(nan)[0])}); "
            "drop or impute those rows before computing an AUC."
        )
    return s


def _check_classes(y: np.ndarray, need: int = 1, what: str = "an AUC") -> tuple[int, int]:
    m = int(y.sum())
    n = int(y.shape[0] - m)
    if m < need or n < need:
        raise ValueError(
            f"y_true has {m} positives and {n} negatives; {what} needs at least {need} of each "
            "class. Pool strata or drop this one."
        )
    return m, n


# -- placement values (Sun & Xu 2014) ------------------------------------------------------
def _below_counts(sorted_ref: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query: reference values strictly below it, and at or below it.

    One binary search per query; the second ('right') search runs only for queries that
    actually tie with a reference value, which continuous scores almost never do.
    """
    lo = np.searchsorted(sorted_ref, q, "left")
    tie = sorted_ref[np.minimum(lo, sorted_ref.shape[0] - 1)] == q
    if not tie.any():
        return lo, lo
    hi = lo.copy()
    hi[tie] = np.searchsorted(sorted_ref, q[tie], "right")
    return lo, hi


def _placements(y: np.ndarray, s: np.ndarray, split=None) -> tuple[float, np.ndarray, np.ndarray]:
    """Return (AUC, V10 for positives in row order, V01 for negatives in row order).

    Sun & Xu's midrank identity V10_i = (Tz_i - Tx_i)/n equals "negatives below x_i plus
    half the ties"; with both classes sorted, one binary search per positive gives it
    exactly as an integer count, so no float rank sums can drift from pROC's values.
    """
    # split: (positive rows, negative rows), to share the masking between scores
    pos, neg = (s[y], s[~y]) if split is None else (s.take(split[0]), s.take(split[1]))
    m, n = pos.shape[0], neg.shape[0]
    # Sorted queries keep binary searches branch-predictable (about 5x faster than
    # searching in row order); results go back to row order, which the paired
    # covariance needs.
    pos_order, neg_order = np.argsort(pos), np.argsort(neg)
    pos_sorted, neg_sorted = pos[pos_order], neg[neg_order]
    lo, hi = _below_counts(neg_sorted, pos_sorted)
    twice_below = np.empty(m, dtype=np.int64)
    twice_below[pos_order] = lo + hi
    # The negatives' side needs no second search: sorted negative j lies above positive i
    # iff j >= hi_i, and at or above it iff j >= lo_i, so counts are cumulative histograms.
    pos_below = np.cumsum(np.bincount(hi, minlength=n + 1)[:n])
    pos_at_or_below = pos_below if lo is hi else np.cumsum(np.bincount(lo, minlength=n + 1)[:n])
    twice_above = np.empty(n, dtype=np.int64)
    twice_above[neg_order] = 2 * m - (pos_below + pos_at_or_below)
    # Integer numerator: the AUC is the correctly rounded value of an exact rational.
    auc_value = float(twice_below.sum()) / (2.0 * m * n)
    return auc_value, twice_below / (2.0 * n), twice_above / (2.0 * m)


def auc(y_true, score) -> float:
    """Area under the ROC curve (Mann-Whitney U / mn) with midranks for ties; never flipped."""
    y = _as_labels(y_true)
    s = _as_score(score, y.shape[0])
    m, n = _check_classes(y)
    # sum over positives of 2 x (negatives below + half ties), an exact integer count
    lo, hi = _below_counts(np.sort(s[~y]), np.sort(s[y]))
    numer = int(lo.sum()) + int(hi.sum())
    return numer / (2.0 * m * n)


# -- DeLong -------------------------------------------------------------------------------
@dataclass(frozen=True)
class AUCResult:
    """One AUC with its DeLong variance and a confidence interval."""

    auc: float
    variance: float
    ci: tuple[float, float]
    n_pos: int
    n_neg: int
    method: str = "wald"
    level: float = 0.95

    @property
    def se(self) -> float:
        return math.sqrt(self.variance)


@dataclass(frozen=True)
class PairedDeLongResult:
    """Two correlated AUCs on the same rows, their DeLong covariance and the paired z-test."""

    auc_a: float
    auc_b: float
    cov: np.ndarray = field(repr=False)
    z: float
    p_value: float
    log10_p: float
    n_pos: int
    n_neg: int

    @property
    def delta(self) -> float:
        """auc_a - auc_b."""
        return self.auc_a - self.auc_b

    @property
    def se_delta(self) -> float:
        return math.sqrt(max(self.cov[0, 0] + self.cov[1, 1] - 2.0 * self.cov[0, 1], 0.0))


def _scatter1(v: np.ndarray) -> float:
    """Sum of squared deviations from the mean."""
    d = v - v.mean()
    return float(np.dot(d, d))


def _scatter2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """2x2 matrix of sums of cross-products of deviations (np.cov without its overhead)."""
    da, db = a - a.mean(), b - b.mean()
    ab = float(np.dot(da, db))
    return np.array([[float(np.dot(da, da)), ab], [ab, float(np.dot(db, db))]])


def _variance(v10: np.ndarray, v01: np.ndarray) -> float:
    # (m-1, n-1) denominators, as in DeLong 1988 eq. 4 and R pROC.
    m, n = v10.shape[0], v01.shape[0]
    return _scatter1(v10) / (m * (m - 1.0)) + _scatter1(v01) / (n * (n - 1.0))


def _cluster_codes(groups, y: np.ndarray, what: str = "y_true") -> np.ndarray:
    g = np.asarray(groups)
    if g.shape != y.shape:
        raise ValueError(f"groups has {g.shape[0]} rows but {what} has {y.shape[0]}; pass one patient id per row.")
    if pd.isna(g).any():
        raise ValueError("groups has missing patient ids; fill them (e.g. with the image id) first.")
    return np.unique(g, return_inverse=True)[1].reshape(-1)


def _clustered_variance(y: np.ndarray, codes: np.ndarray, theta: float, v10: np.ndarray, v01: np.ndarray) -> float:
    """Obuchowski's (1997) variance of a placement-based AUC (or AUC difference) with clusters.

    Per cluster i: a_i = sum of its positives' V10 - m_i * theta, b_i = sum of its
    negatives' V01 - n_i * theta. var = I / (I - 1) * sum_i (a_i / M + b_i / N)^2, which is
    Obuchowski's S10 / M + S01 / N + 2 S11 / (M N) written as one sum (a cluster-robust
    sandwich: a patient's positive and negative images may be correlated).
    """
    n_cl = int(codes.max()) + 1
    if n_cl < 2:
        raise ValueError("a clustered DeLong variance needs at least two patients (groups).")
    m, n = v10.shape[0], v01.shape[0]
    a = np.bincount(codes[y], weights=v10 - theta, minlength=n_cl)
    b = np.bincount(codes[~y], weights=v01 - theta, minlength=n_cl)
    t = a / m + b / n
    return float(n_cl / (n_cl - 1.0) * np.dot(t, t))


def delong(y_true, score, method: str = "wald", level: float = 0.95, *, groups=None) -> AUCResult:
    """AUC with DeLong variance and a ``level`` CI.

    method: "wald" (AUC +/- z*SE, clipped to [0, 1], as pROC's ci.auc) or "logit"
    (Wald on logit(AUC) by the delta method, back-transformed; stays inside (0, 1)).
    groups: one patient id per row; when given, the variance is Obuchowski's clustered
    DeLong variance (several images of one patient are not independent draws).
    DeLong et al. 1988, Biometrics 44:837; placements by Sun & Xu 2014; clusters:
    Obuchowski 1997, Biometrics 53:567.
    """
    if method not in ("wald", "logit"):
        raise ValueError(f"method must be 'wald' or 'logit'; got {method!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95; got {level!r}")
    y = _as_labels(y_true)
    s = _as_score(score, y.shape[0])
    m, n = _check_classes(y, need=2, what="a DeLong variance")
    a, v10, v01 = _placements(y, s)
    if groups is None:
        var = _variance(v10, v01)
    else:
        var = _clustered_variance(y, _cluster_codes(groups, y), a, v10, v01)
    zq = float(ndtri(0.5 + level / 2.0))
    se = math.sqrt(var)
    if se == 0.0:
        ci = (a, a)
    elif method == "wald":
        ci = (max(0.0, a - zq * se), min(1.0, a + zq * se))
    else:
        # se > 0 implies 0 < AUC < 1, so the logit is finite.
        centre, half = math.log(a / (1.0 - a)), zq * se / (a * (1.0 - a))
        ci = (1.0 / (1.0 + math.exp(-(centre - half))), 1.0 / (1.0 + math.exp(-(centre + half))))
    return AUCResult(auc=a, variance=var, ci=ci, n_pos=m, n_neg=n, method=method, level=level)


def _two_sided_log_p(z: float) -> float:
    """Natural log of the two-sided normal p-value, exact far into the tail."""
    # log_ndtr(-|z|) is norm.logsf(|z|) without scipy.stats' per-call overhead.
    return math.log(2.0) + float(log_ndtr(-abs(z)))


def delong_paired(y_true, score_a, score_b) -> PairedDeLongResult:
    """DeLong's paired test that two scores on the same rows have equal AUC.

    The z statistic uses the (m-1, n-1) covariance convention of R pROC's
    roc.test(method="delong"); p comes from the log survival function so z = 40 still has
    a finite ``log10_p``. A zero difference with zero variance gives z = 0, p = 1.
    DeLong et al. 1988, Biometrics 44:837; Sun & Xu 2014, IEEE SPL 21:1389.
    """
    y = _as_labels(y_true)
    sa = _as_score(score_a, y.shape[0], "score_a")
    sb = _as_score(score_b, y.shape[0], "score_b")
    m, n = _check_classes(y, need=2, what="a DeLong covariance")
    split = (np.flatnonzero(y), np.flatnonzero(~y))
    auc_a, v10a, v01a = _placements(y, sa, split)
    auc_b, v10b, v01b = _placements(y, sb, split)
    cov = _scatter2(v10a, v10b) / (m * (m - 1.0)) + _scatter2(v01a, v01b) / (n * (n - 1.0))
    # Variance of the difference from the differenced placements, not from the 2x2
    # matrix: identical predictors then give exactly 0 rather than rounding noise.
    var_d = _scatter1(v10a - v10b) / (m * (m - 1.0)) + _scatter1(v01a - v01b) / (n * (n - 1.0))
    delta = auc_a - auc_b
    if var_d <= 0.0:
        if delta == 0.0:
            z, log_p = 0.0, 0.0
        else:
            z, log_p = math.copysign(math.inf, delta), -math.inf
    else:
        z = delta / math.sqrt(var_d)
        log_p = min(0.0, _two_sided_log_p(z))
    return PairedDeLongResult(
        auc_a=auc_a,
        auc_b=auc_b,
        cov=cov,
        z=z,
        p_value=math.exp(log_p),
        log10_p=log_p / _LN10,
        n_pos=m,
        n_neg=n,
    )


# -- bootstrap ----------------------------------------------------------------------------
@dataclass(frozen=True)
class BootstrapResult:
    """Bootstrap CI of an AUC and, when two scores were given, of their paired difference.

    ``difference`` is ``auc - auc_b``; ``replicates`` holds the bootstrap AUCs
    (shape (n_boot,) or (n_boot, 2)); replicates with an empty class are NaN.
    """

    auc: float
    ci_low: float
    ci_high: float
    method: str
    n_boot: int
    level: float
    n_pos: int
    n_neg: int
    n_groups: int | None = None
    auc_b: float | None = None
    ci_low_b: float | None = None
    ci_high_b: float | None = None
    difference: float | None = None
    diff_ci_low: float | None = None
    diff_ci_high: float | None = None
    replicates: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def ci(self) -> tuple[float, float]:
        return (self.ci_low, self.ci_high)

    @property
    def diff_ci(self) -> tuple[float, float] | None:
        if self.difference is None:
            return None
        return (self.diff_ci_low, self.diff_ci_high)


class _Ranker:
    """Precomputed geometry of one score for weighted resampled AUCs.

    Positives are sorted once; every negative gets the pair (positives strictly below,
    positives at or below) and negatives sharing a pair share a key. A replicate that
    weights positives by w then needs only a cumulative sum over positives and one gather
    per drawn negative: AUC* = sum over drawn negatives of A[key], with
    A = W - (Cw[lo] + Cw[hi]) / 2 the weighted positives above (ties one half).
    """

    def __init__(self, pos: np.ndarray, neg: np.ndarray):
        self.order = np.argsort(pos, kind="stable")
        xs = pos[self.order]
        m = xs.shape[0]
        lo = np.searchsorted(xs, neg, "left").astype(np.int64)
        hi = np.searchsorted(xs, neg, "right").astype(np.int64)
        pairs, key = np.unique(lo * (m + 1) + hi, return_inverse=True)
        self.ulo = pairs // (m + 1)
        self.uhi = pairs % (m + 1)
        self.key = key.astype(np.intp).reshape(-1)

    def above(self, w_rows: np.ndarray) -> np.ndarray:
        """Weighted count of positives above each negative key; ``w_rows`` in positive row order."""
        cw = np.zeros(w_rows.shape[0] + 1)
        np.cumsum(w_rows[self.order], out=cw[1:])
        return cw[-1] - 0.5 * (cw[self.ulo] + cw[self.uhi])


def _within_wins(pos: np.ndarray, neg: np.ndarray, cl_pos: np.ndarray, cl_neg: np.ndarray, n_groups: int) -> np.ndarray:
    """Per patient: positives above negatives within that patient (ties one half)."""
    out = np.zeros(n_groups)
    order_p, order_n = np.argsort(cl_pos, kind="stable"), np.argsort(cl_neg, kind="stable")
    bp = np.searchsorted(cl_pos[order_p], np.arange(n_groups + 1))
    bn = np.searchsorted(cl_neg[order_n], np.arange(n_groups + 1))
    both = np.flatnonzero((np.diff(bp) > 0) & (np.diff(bn) > 0))
    for g in both:  # patients hold a handful of images: a loop over patients, not pairs
        p = pos[order_p[bp[g]:bp[g + 1]]][:, None]
        q = neg[order_n[bn[g]:bn[g + 1]]][None, :]
        out[g] = (p > q).sum() + 0.5 * (p == q).sum()
    return out


def _bootstrap_chunk(
    rankers: list[_Ranker],
    m: int,
    n: int,
    n_rep: int,
    seed: np.random.SeedSequence,
    clusters: tuple | None,
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n_rep, len(rankers)))
    idx_dtype = np.int32 if max(m, n) < 2**31 - 1 else np.int64
    for r in range(n_rep):
        if clusters is None:
            # Stratified: m positives and n negatives drawn separately, so every
            # replicate keeps the observed prevalence.
            w = np.bincount(rng.integers(0, m, m, dtype=idx_dtype), minlength=m).astype(np.float64)
            drawn = rng.integers(0, n, n, dtype=idx_dtype)
            for k, rk in enumerate(rankers):
                out[r, k] = rk.above(w)[rk.key[drawn]].sum() / (float(m) * n)
        else:
            strata, n_clusters, cl_pos, cl_neg, within_pairs, within_wins = clusters
            counts = np.zeros(n_clusters)
            for members in strata:
                counts += np.bincount(
                    members[rng.integers(0, members.shape[0], members.shape[0])], minlength=n_clusters
                )
            w, u = counts[cl_pos], counts[cl_neg]
            copies = counts * counts - counts  # copy-to-copy pairs of each patient drawn more than once
            total = w.sum() * u.sum() - copies @ within_pairs
            for k, rk in enumerate(rankers):
                wins = (u * rk.above(w)[rk.key]).sum() - copies @ within_wins[k]
                out[r, k] = wins / total if total > 0 else np.nan
    return out


def _jackknife(v10: np.ndarray, v01: np.ndarray, theta: float) -> np.ndarray:
    """Leave-one-out AUCs in closed form from placements (no refits)."""
    m, n = v10.shape[0], v01.shape[0]
    return np.concatenate([(m * theta - v10) / (m - 1), (n * theta - v01) / (n - 1)])


def _cluster_jackknife(
    pos: np.ndarray,
    neg: np.ndarray,
    cl_pos: np.ndarray,
    cl_neg: np.ndarray,
    n_clusters: int,
    v10: np.ndarray,
    v01: np.ndarray,
    theta: float,
) -> np.ndarray:
    """Leave-one-cluster-out AUCs in closed form.

    Removing cluster c removes its rows' placement sums but counts its own
    positive-negative pairs twice, so those within-cluster pairs are added back; they
    are counted with one sort on (cluster, score rank) keys.
    """
    m, n = pos.shape[0], neg.shape[0]
    ranks = np.unique(np.concatenate([pos, neg]), return_inverse=True)[1].reshape(-1)
    r_pos, r_neg = ranks[:m].astype(np.int64), ranks[m:].astype(np.int64)
    width = int(ranks.max()) + 2
    neg_keys = np.sort(cl_neg.astype(np.int64) * width + r_neg)
    base = cl_pos.astype(np.int64) * width
    start = np.searchsorted(neg_keys, base, "left")
    below = np.searchsorted(neg_keys, base + r_pos, "left") - start
    at_or_below = np.searchsorted(neg_keys, base + r_pos, "right") - start
    within = np.bincount(cl_pos, weights=0.5 * (below + at_or_below), minlength=n_clusters)
    removed = (
        n * np.bincount(cl_pos, weights=v10, minlength=n_clusters)
        + m * np.bincount(cl_neg, weights=v01, minlength=n_clusters)
        - within
    )
    m_c = np.bincount(cl_pos, minlength=n_clusters)
    n_c = np.bincount(cl_neg, minlength=n_clusters)
    denom = (m - m_c) * (n - n_c)
    ok = denom > 0  # a cluster holding every positive (or negative) has no jackknife value
    return (m * n * theta - removed[ok]) / denom[ok]


def _percentile_interval(reps: np.ndarray, alpha: float) -> tuple[float, float]:
    lo, hi = np.nanquantile(reps, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


def _bca_interval(theta: float, reps: np.ndarray, jack: np.ndarray, alpha: float) -> tuple[float, float]:
    """Efron 1987 BCa: bias correction from the replicates, acceleration from the jackknife."""
    reps = reps[~np.isnan(reps)]
    b = reps.shape[0]
    # AUC replicates are discrete; counting ties with theta as one half keeps z0 = 0
    # when the distribution is degenerate (e.g. perfect separation).
    prop = (np.count_nonzero(reps < theta) + 0.5 * np.count_nonzero(reps == theta)) / b
    prop = min(max(prop, 0.5 / b), 1.0 - 0.5 / b)
    z0 = float(ndtri(prop))
    d = jack.mean() - jack
    ss = float((d**2).sum())
    accel = float((d**3).sum()) / (6.0 * ss**1.5) if ss > 0 else 0.0
    qs = []
    for zq in (ndtri(alpha / 2.0), ndtri(1.0 - alpha / 2.0)):
        qs.append(float(ndtr(z0 + (z0 + zq) / (1.0 - accel * (z0 + zq)))))
    lo, hi = np.quantile(reps, qs)
    return float(lo), float(hi)


def _n_workers(n_jobs: int | None) -> int:
    if n_jobs is None or n_jobs < 1:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not every platform has sched_getaffinity
            return max(1, os.cpu_count() or 1)
    return int(n_jobs)


_CHUNK = 64  # replicates per seed; results do not depend on the number of threads


def bootstrap_auc(
    y_true,
    score,
    score_b=None,
    *,
    n_boot: int = 2000,
    ci: float = 0.95,
    method: str = "percentile",
    groups=None,
    seed: int | np.random.SeedSequence = 0,
    n_jobs: int | None = None,
) -> BootstrapResult:
    """Stratified bootstrap CI of an AUC, or of two AUCs and their paired difference.

    Positives and negatives are resampled separately. With ``groups`` (one patient id
    per row) whole patients are resampled instead, stratified by whether a patient has
    any positive row, so images of one patient never act as independent draws.
    ``score_b`` is scored on the same replicates, giving a CI for ``auc - auc_b``.
    method: "percentile" or "bca" (Efron 1987, JASA 82:171), whose acceleration comes from
    the closed-form jackknife of the DeLong placements (DeLong et al. 1988).
    seed: an int or a SeedSequence; the same seed gives the same replicates whatever
    ``n_jobs`` is (threads; the hot loops release the GIL).
    """
    if method not in ("percentile", "bca"):
        raise ValueError(f"method must be 'percentile' or 'bca'; got {method!r}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), e.g. 0.95; got {ci!r}")
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be a positive integer; got {n_boot!r}")
    n_boot = int(n_boot)
    y = _as_labels(y_true)
    scores = [_as_score(score, y.shape[0], "score")]
    if score_b is not None:
        scores.append(_as_score(score_b, y.shape[0], "score_b"))
    m, n = _check_classes(y, need=2, what="a bootstrap CI")

    cl_pos = cl_neg = None
    n_groups = None
    if groups is not None:
        codes = _cluster_codes(groups, y)
        n_groups = int(codes.max()) + 1
        cl_pos, cl_neg = codes[y], codes[~y]

    # Resample the smaller class by counts and gather the larger: the per-replicate cost
    # is then dominated by one random draw and two gathers over the larger class.
    # Swapping classes and negating scores leaves every AUC unchanged.
    swap = m > n
    thetas, rankers, placements = [], [], []
    for s in scores:
        pos, neg = (-s[~y], -s[y]) if swap else (s[y], s[~y])
        a, v10, v01 = _placements(y, s)
        thetas.append(a)
        placements.append((v10, v01))
        rankers.append(_Ranker(pos, neg))
    mm, nn = (n, m) if swap else (m, n)

    clusters = None
    if groups is not None:
        cp, cn = (cl_neg, cl_pos) if swap else (cl_pos, cl_neg)
        has_pos = np.zeros(n_groups, dtype=bool)
        has_pos[cl_pos] = True
        strata = [s for s in (np.flatnonzero(has_pos), np.flatnonzero(~has_pos)) if s.shape[0] > 0]
        # Within-patient (positive, negative) wins per patient and per score, and the number
        # of such pairs. A patient drawn c times would otherwise contribute c**2 copies of
        # its within-patient pairs (c of them real, c*(c-1) between copies of itself), so the
        # replicates over-weight within-patient pairs and, in a paired design where those
        # pairs differ from between-patient ones, are biased (percentile CIs that miss the
        # estimate). Removing the copy-to-copy pairs keeps their share as in the sample.
        within_pairs = np.bincount(cl_pos, minlength=n_groups) * np.bincount(cl_neg, minlength=n_groups)
        within_wins = [_within_wins(sc[y], sc[~y], cl_pos, cl_neg, n_groups) for sc in scores]
        clusters = (strata, n_groups, cp, cn, within_pairs.astype(np.float64), within_wins)

    n_chunks = -(-n_boot // _CHUNK)
    root = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    seeds = root.spawn(n_chunks)
    sizes = [min(_CHUNK, n_boot - i * _CHUNK) for i in range(n_chunks)]
    workers = min(_n_workers(n_jobs), n_chunks)
    if workers > 1:
        # NumPy's random fills, gathers and sums release the GIL, so threads scale.
        with ThreadPoolExecutor(max_workers=workers) as pool:
            parts = list(
                pool.map(lambda a: _bootstrap_chunk(rankers, mm, nn, a[0], a[1], clusters), zip(sizes, seeds))
            )
    else:
        parts = [_bootstrap_chunk(rankers, mm, nn, k, sd, clusters) for k, sd in zip(sizes, seeds)]
    reps = np.concatenate(parts, axis=0)

    alpha = 1.0 - ci

    def interval(theta, rep, jack_fn):
        if method == "percentile":
            return _percentile_interval(rep, alpha)
        return _bca_interval(theta, rep, jack_fn(), alpha)

    def jack_for(k):
        v10, v01 = placements[k]
        if groups is None:
            return _jackknife(v10, v01, thetas[k])
        s = scores[k]
        return _cluster_jackknife(s[y], s[~y], cl_pos, cl_neg, n_groups, v10, v01, thetas[k])

    lo, hi = interval(thetas[0], reps[:, 0], lambda: jack_for(0))
    extra = {}
    if score_b is not None:
        lo_b, hi_b = interval(thetas[1], reps[:, 1], lambda: jack_for(1))
        d_lo, d_hi = interval(
            thetas[0] - thetas[1], reps[:, 0] - reps[:, 1], lambda: jack_for(0) - jack_for(1)
        )
        extra = dict(
            auc_b=thetas[1],
            ci_low_b=lo_b,
            ci_high_b=hi_b,
            difference=thetas[0] - thetas[1],
            diff_ci_low=d_lo,
            diff_ci_high=d_hi,
        )
    return BootstrapResult(
        auc=thetas[0],
        ci_low=lo,
        ci_high=hi,
        method=method,
        n_boot=n_boot,
        level=ci,
        n_pos=m,
        n_neg=n,
        n_groups=n_groups,
        replicates=reps if score_b is not None else reps[:, 0],
        **extra,
    )


# -- multiplicity -------------------------------------------------------------------------
def fdr_bh(p_values) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values over one declared family; NaN stays NaN.

    Benjamini & Hochberg 1995, JRSS-B 57:289 (via statsmodels' multipletests).
    """
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(p_values, dtype=np.float64).reshape(-1)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    if ((p[ok] < 0) | (p[ok] > 1)).any():
        raise ValueError(f"p_values must lie in [0, 1]; got min {p[ok].min()}, max {p[ok].max()}")
    if ok.any():
        out[ok] = multipletests(p[ok], method="fdr_bh")[1]
    return out


# -- permutation floor --------------------------------------------------------------------
@dataclass(frozen=True)
class PermutationFloor:
    """Out-of-fold probe AUC on the true labels against the same probe on shuffled labels.

    ``floor`` is the ``quantile`` of the null AUCs: the AUC a probe reaches by chance with
    this sample size, feature dimension and fold plan. ``p_value`` is (1 + #null >= observed)
    / (1 + n_permutations).
    """

    observed_auc: float
    null_mean: float
    null_sd: float
    floor: float
    quantile: float
    p_value: float
    n_permutations: int
    permute: str
    null: np.ndarray = field(repr=False, compare=False)

    def to_frame(self) -> pd.DataFrame:
        """One tidy row (the null replicates left out)."""
        row = asdict(self)
        row.pop("null")
        return pd.DataFrame([row])


def _shuffle_labels(y: np.ndarray, codes: np.ndarray | None, permute: str, rng: np.random.Generator) -> np.ndarray:
    if codes is None:
        return rng.permutation(y)
    if permute == "within":
        # Shuffle inside each group: order rows by (group, random key), then hand each
        # group's own labels back in that shuffled order.
        order = np.lexsort((rng.random(y.shape[0]), codes))
        by_group = np.argsort(codes, kind="stable")
        out = np.empty_like(y)
        out[order] = y[by_group]
        return out
    # "between": every row of a patient carries that patient's label, so the patients'
    # labels are permuted among patients.
    group_label = np.zeros(int(codes.max()) + 1, dtype=y.dtype)
    group_label[codes] = y
    return rng.permutation(group_label)[codes]


def permutation_floor(
    X,
    y,
    groups=None,
    *,
    folds=None,
    probe=None,
    n_permutations: int = 100,
    permute: str = "within",
    quantile: float = 0.95,
    n_splits: int = 5,
    seed: int = 0,
) -> PermutationFloor:
    """Chance floor of a grouped-CV probe: its out-of-fold AUC with labels shuffled.

    groups: patient (or source-image) id per row; outer folds never split a group.
    permute: "within" shuffles labels among the rows of each group (the null for
    paired designs such as clean vs perturbed copies of one image; sklearn's
    permutation_test_score semantics) and reuses one fold plan; "between" permutes
    whole groups' labels (for labels constant within a patient) and rebuilds the
    grouped folds for every permutation so each fold keeps both classes.
    probe: an unfitted estimator with ``fit(X, y, groups)``; a LinearProbe with a single
    C (e.g. ``LinearProbe(Cs=(1.0,))``) keeps many permutations affordable.
    """
    from .probes import grouped_folds, out_of_fold_scores

    if permute not in ("within", "between"):
        raise ValueError(f"permute must be 'within' or 'between'; got {permute!r}")
    if int(n_permutations) < 1:
        raise ValueError(f"n_permutations must be a positive integer; got {n_permutations!r}")
    yb = _as_labels(y, "y").astype(np.int64)
    codes = None
    if groups is not None:
        g = np.asarray(groups)
        if g.shape[0] != yb.shape[0]:
            raise ValueError(f"groups has {g.shape[0]} rows but y has {yb.shape[0]}; pass one id per row.")
        codes = np.unique(g, return_inverse=True)[1].reshape(-1)
        n_g = int(codes.max()) + 1
        lo = np.full(n_g, 2)
        hi = np.full(n_g, -1)
        np.minimum.at(lo, codes, yb)
        np.maximum.at(hi, codes, yb)
        mixed = lo != hi
        if permute == "within" and not mixed.any():
            raise ValueError(
                "every group has a single label, so shuffling within groups changes nothing; "
                "use permute='between' to permute labels among patients."
            )
        if permute == "between" and mixed.any():
            raise ValueError(
                f"{int(mixed.sum())} groups hold both labels, so labels cannot be permuted as whole "
                "groups; use permute='within'."
            )
    if folds is None:
        folds = grouped_folds(yb, groups, n_splits=n_splits, seed=seed)
    observed = auc(yb, out_of_fold_scores(X, yb, groups, folds=folds, probe=probe))
    rng = np.random.default_rng(seed)
    null = np.empty(int(n_permutations))
    for i in range(null.shape[0]):
        yp = _shuffle_labels(yb, codes, permute, rng)
        f = folds if permute == "within" or codes is None else grouped_folds(yp, groups, n_splits=n_splits, seed=seed + 1 + i)
        null[i] = auc(yp, out_of_fold_scores(X, yp, groups, folds=f, probe=probe))
    return PermutationFloor(
        observed_auc=observed,
        null_mean=float(null.mean()),
        null_sd=float(null.std(ddof=1)) if null.shape[0] > 1 else float("nan"),
        floor=float(np.quantile(null, quantile)),
        quantile=quantile,
        p_value=float((1 + np.count_nonzero(null >= observed)) / (1 + null.shape[0])),
        n_permutations=int(null.shape[0]),
        permute=permute,
        null=null,
    )


# -- tidy tables for the book -------------------------------------------------------------
def _as_list(cols) -> list[str]:
    if cols is None:
        return []
    if isinstance(cols, str):
        return [cols]
    return list(cols)


def _iter_strata(df: pd.DataFrame, by: list[str]) -> Iterable[tuple[dict, pd.DataFrame]]:
    if not by:
        yield {}, df
        return
    for key, part in df.groupby(by, sort=True, observed=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        yield dict(zip(by, key)), part


def _stratum_seed(seed: int, key: dict, score: str) -> np.random.SeedSequence:
    # Seed from the stratum's own name, so adding or dropping other strata never changes
    # this stratum's interval.
    # str() not repr(): numpy scalars' repr changed between NumPy 1 and 2.
    tag = zlib.crc32("|".join(f"{k}={v}" for k, v in sorted(key.items())).encode() + b"|" + str(score).encode())
    return np.random.SeedSequence([int(seed), tag])


def _check_columns(df: pd.DataFrame, cols: list[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise KeyError(f"{what} {missing} not in the frame; its columns are {list(df.columns)}")


def _stratum_label(key: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in key.items()) or "the whole frame"


def auc_table(
    df: pd.DataFrame,
    score_cols,
    label_col: str,
    by=None,
    *,
    n_boot: int = 2000,
    ci: float = 0.95,
    method: str = "percentile",
    group_col: str | None = None,
    seed: int = 0,
    score_name: str = "score",
    dropna: bool = False,
    n_jobs: int | None = None,
) -> pd.DataFrame:
    """Tidy AUCs with CIs: one row per stratum of ``by`` and per score column.

    df: one row per image (or box) with one score column per pooling mode, e.g.
    ``auc_table(oof, ["cls", "patch_mean", "roi_local"], "label",
    by=["encoder", "cell"], score_name="pooling", group_col="patient_id")``.
    method: "percentile" or "bca" (bootstrap, see :func:`bootstrap_auc`) or "delong"
    (DeLong Wald interval, no resampling). group_col: patient ids; the bootstrap then
    resamples whole patients and "delong" uses Obuchowski's clustered variance (see
    :func:`delong`), so no method ignores the patients. Each stratum's seed derives from ``seed`` and
    the stratum's name, so results do not depend on which other strata are present.
    dropna: drop rows whose score is NaN (e.g. roi_local for images without a box)
    instead of raising.
    """
    score_cols, by = _as_list(score_cols), _as_list(by)
    _check_columns(df, score_cols + [label_col] + by + _as_list(group_col), "columns")
    rows = []
    for key, part in _iter_strata(df, by):
        for col in score_cols:
            sub = part.dropna(subset=[col]) if dropna else part
            y, s = sub[label_col].to_numpy(), sub[col].to_numpy()
            try:
                if method == "delong":
                    r = delong(y, s, level=ci, groups=None if group_col is None else sub[group_col].to_numpy())
                    lo, hi, nb = r.ci[0], r.ci[1], 0
                    a, m, n = r.auc, r.n_pos, r.n_neg
                else:
                    r = bootstrap_auc(
                        y,
                        s,
                        n_boot=n_boot,
                        ci=ci,
                        method=method,
                        groups=None if group_col is None else sub[group_col].to_numpy(),
                        seed=_stratum_seed(seed, key, col),
                        n_jobs=n_jobs,
                    )
                    lo, hi, nb = r.ci_low, r.ci_high, r.n_boot
                    a, m, n = r.auc, r.n_pos, r.n_neg
            except ValueError as err:
                raise ValueError(f"stratum {_stratum_label(key)}, score column {col!r}: {err}") from err
            rows.append({**key, score_name: col, "auc": a, "ci_low": lo, "ci_high": hi,
                         "n_pos": m, "n_neg": n, "method": method, "n_boot": nb})
    return pd.DataFrame(rows, columns=by + [score_name, "auc", "ci_low", "ci_high", "n_pos", "n_neg", "method", "n_boot"])


def compare_table(
    df: pd.DataFrame,
    score_cols,
    label_col: str,
    pairs: Sequence[tuple[str, str]] | None = None,
    by=None,
    *,
    family=None,
    dropna: bool = False,
    group_col: str | None = None,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
    n_jobs: int | None = None,
) -> pd.DataFrame:
    """Paired AUC comparisons per stratum, BH-adjusted within each declared family.

    df: one row per image with one score column per pooling mode (the same rows and
    folds for each, so the test is paired). pairs: (a, b) column pairs, tested as
    auc_a - auc_b; default: every other column against the first, e.g. score_cols
    ["cls", "patch_mean", "roi_local"] gives patch_mean vs cls and roi_local vs cls.
    family: columns (from ``by``, or "a"/"b") whose values split the rows into separate
    BH families; None makes the whole table one family. The family is part of the
    analysis plan: declare it before looking at p-values.

    group_col: patient ids. Where a stratum has a patient with several rows, the
    comparison is the patient-cluster bootstrap of the paired difference
    (:func:`bootstrap_auc` with ``score_b`` and ``groups``, ``n_boot`` replicates): ``ci_low``
    / ``ci_high`` are its percentile interval, ``se`` the SD of the bootstrap differences,
    and ``z = delta / se`` with a two-sided normal p (a cluster-robust Wald test). The p is
    taken from z rather than from the share of replicates past 0 because that share
    cannot go below 1 / n_boot, and the book prints p far smaller (``log10_p``). Where
    every patient has one row (or without group_col) it is DeLong's paired test with a
    Wald CI of the difference. ``method`` says which was used per row.
    DeLong et al. 1988; Benjamini & Hochberg 1995.
    """
    score_cols, by, family = _as_list(score_cols), _as_list(by), _as_list(family)
    if pairs is None:
        if len(score_cols) < 2:
            raise ValueError("compare_table needs at least two score columns or explicit pairs.")
        pairs = [(c, score_cols[0]) for c in score_cols[1:]]
    pairs = [tuple(p) for p in pairs]
    used = sorted({c for p in pairs for c in p}, key=str)
    _check_columns(df, used + [label_col] + by + _as_list(group_col), "columns")
    bad_family = [c for c in family if c not in by + ["a", "b"]]
    if bad_family:
        raise ValueError(f"family columns {bad_family} must be among by={by} or 'a'/'b'.")
    zq = float(ndtri(0.5 + ci / 2.0))
    rows = []
    for key, part in _iter_strata(df, by):
        for a, b in pairs:
            sub = part.dropna(subset=[a, b]) if dropna else part
            y, sa, sb = sub[label_col].to_numpy(), sub[a].to_numpy(), sub[b].to_numpy()
            g = None if group_col is None else sub[group_col].to_numpy()
            try:
                if g is not None and pd.Series(g).duplicated().any():
                    row = _cluster_bootstrap_comparison(y, sa, sb, g, n_boot=n_boot, ci=ci,
                                                        seed=_stratum_seed(seed, key, f"{a} vs {b}"), n_jobs=n_jobs)
                else:
                    r = delong_paired(y, sa, sb)
                    half = zq * r.se_delta
                    row = {"auc_a": r.auc_a, "auc_b": r.auc_b, "delta": r.delta, "se": r.se_delta,
                           "ci_low": max(-1.0, r.delta - half), "ci_high": min(1.0, r.delta + half), "z": r.z,
                           "p_value": r.p_value, "log10_p": r.log10_p, "n_pos": r.n_pos, "n_neg": r.n_neg,
                           "method": "delong", "n_boot": 0}
            except ValueError as err:
                raise ValueError(f"stratum {_stratum_label(key)}, pair {a!r} vs {b!r}: {err}") from err
            n_groups = len(pd.unique(g)) if g is not None else row["n_pos"] + row["n_neg"]
            rows.append({**key, "a": a, "b": b, **row, "n_groups": n_groups})
    cols = by + ["a", "b", "auc_a", "auc_b", "delta", "se", "z", "p_value", "log10_p", "p_adj", "family", "n_pos",
                 "n_neg", "ci_low", "ci_high", "method", "n_boot", "n_groups"]
    out = pd.DataFrame(rows, columns=[c for c in cols if c not in ("p_adj", "family")])
    if out.empty:
        return pd.DataFrame(columns=cols)
    if family:
        out["family"] = out[family].astype(str).agg(lambda r: ", ".join(f"{k}={v}" for k, v in r.items()), axis=1)
    else:
        out["family"] = "all"
    out["p_adj"] = np.nan
    for _, idx in out.groupby("family", sort=False).groups.items():
        out.loc[idx, "p_adj"] = fdr_bh(out.loc[idx, "p_value"].to_numpy())
    return out[cols]


def _cluster_bootstrap_comparison(y, sa, sb, groups, *, n_boot: int, ci: float, seed, n_jobs) -> dict:
    """One compare_table row from the patient-cluster bootstrap of ``auc(sa) - auc(sb)``."""
    r = bootstrap_auc(y, sa, score_b=sb, groups=groups, n_boot=n_boot, ci=ci, seed=seed, n_jobs=n_jobs)
    diffs = r.replicates[:, 0] - r.replicates[:, 1]
    diffs = diffs[np.isfinite(diffs)]
    se = float(np.std(diffs, ddof=1)) if diffs.shape[0] > 1 else float("nan")
    delta = float(r.difference)
    if not se > 0.0:  # identical scores on every replicate
        z, log_p = (0.0, 0.0) if delta == 0.0 else (math.copysign(math.inf, delta), -math.inf)
    else:
        z = delta / se
        log_p = min(0.0, _two_sided_log_p(z))
    return {"auc_a": r.auc, "auc_b": r.auc_b, "delta": delta, "se": se, "ci_low": r.diff_ci_low,
            "ci_high": r.diff_ci_high, "z": z, "p_value": math.exp(log_p), "log10_p": log_p / _LN10,
            "n_pos": r.n_pos, "n_neg": r.n_neg, "method": "cluster_bootstrap", "n_boot": r.n_boot}


@dataclass(frozen=True)
class GapResult:
    """Difference of two strata's AUCs against the same negatives, with a joint bootstrap CI."""

    gap: float  # auc_a - auc_b
    auc_a: float
    auc_b: float
    ci_low: float
    ci_high: float
    n_a: int
    n_b: int
    n_neg: int
    n_boot: int


def _auc_against(pos: np.ndarray, neg_sorted: np.ndarray) -> float:
    lo = np.searchsorted(neg_sorted, pos, "left")
    hi = np.searchsorted(neg_sorted, pos, "right")
    return float((lo + hi).sum()) / (2.0 * pos.shape[0] * neg_sorted.shape[0])


def bootstrap_auc_gap(y_true, score, stratum, a: str = "large", b: str = "small", *, n_boot: int = 2000,
                      ci: float = 0.95, seed: int = 0) -> GapResult:
    """AUC of stratum ``a``'s positives minus stratum ``b``'s, both against all negatives.

    One joint bootstrap: every replicate resamples the negatives once and each stratum's
    positives separately, and computes both AUCs on that replicate, so the gap's
    percentile CI carries the correlation through the shared negatives (two separately
    seeded bootstraps would not). ``stratum`` labels each positive row (negatives' values
    are ignored). Rows are treated as independent (one image per patient).
    """
    y = _as_labels(y_true)
    s = _as_score(score, y.shape[0], "score")
    st = np.asarray(stratum).astype(str)
    if st.shape[0] != y.shape[0]:
        raise ValueError(f"stratum has {st.shape[0]} rows, y_true {y.shape[0]}; give one stratum per row")
    neg = s[~y]
    pa, pb = s[y & (st == a)], s[y & (st == b)]
    for name, arr in ((f"stratum {a!r}", pa), (f"stratum {b!r}", pb), ("negatives", neg)):
        if arr.shape[0] < 2:
            raise ValueError(f"{name} has {arr.shape[0]} rows; a gap needs at least 2 in each stratum and 2 negatives")
    auc_a, auc_b = _auc_against(pa, np.sort(neg)), _auc_against(pb, np.sort(neg))
    rng = np.random.default_rng(seed)
    reps = np.empty(int(n_boot))
    for r in range(reps.shape[0]):
        ns = np.sort(neg[rng.integers(0, neg.shape[0], neg.shape[0])])
        reps[r] = (_auc_against(pa[rng.integers(0, pa.shape[0], pa.shape[0])], ns)
                   - _auc_against(pb[rng.integers(0, pb.shape[0], pb.shape[0])], ns))
    lo, hi = _percentile_interval(reps, 1.0 - ci)
    return GapResult(auc_a - auc_b, auc_a, auc_b, lo, hi, pa.shape[0], pb.shape[0], neg.shape[0], reps.shape[0])


def within_pair_table(df: pd.DataFrame, score_cols, pair_col: str, arm_col: str = "arm", by=None,
                      ci: float = 0.95) -> pd.DataFrame:
    """Within-pair AUC: the share of pairs whose arm-1 row outscores its arm-0 row (ties one half).

    For a paired design (each ``pair_col`` value has one row with ``arm_col`` 0 and one
    with 1) this is the AUC conditional on the pair: between-pair differences, which
    dominate a pooled AUC when the perturbation moves the score less than images differ,
    cancel. CI: Wilson interval of the proportion (statsmodels). Tidy: one row per stratum
    of ``by`` and score column.
    """
    from statsmodels.stats.proportion import proportion_confint

    score_cols, by = _as_list(score_cols), _as_list(by)
    _check_columns(df, score_cols + [pair_col, arm_col] + by, "columns")
    rows = []
    for key, part in _iter_strata(df, by):
        wide = part.pivot_table(index=pair_col, columns=arm_col, values=score_cols, aggfunc="first")
        for col in score_cols:
            if (col, 0) not in wide.columns or (col, 1) not in wide.columns:
                raise ValueError(f"stratum {_stratum_label(key)}: {arm_col!r} must take the values 0 and 1")
            d = (wide[(col, 1)] - wide[(col, 0)]).dropna().to_numpy()
            n = d.shape[0]
            wins = float((d > 0).sum() + 0.5 * (d == 0).sum())
            lo, hi = proportion_confint(wins, n, alpha=1 - ci, method="wilson") if n else (np.nan, np.nan)
            rows.append({**key, "pooling": col, "within_pair_auc": wins / n if n else np.nan,
                         "ci_low": lo, "ci_high": hi, "n_pairs": n})
    return pd.DataFrame(rows)
