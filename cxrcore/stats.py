"""AUC, DeLong tests, bootstrap confidence intervals, BH-FDR and permutation floors.

Every function is pure and returns a float, a small frozen dataclass or a tidy
DataFrame. Labels are 0/1 (or bool) with 1 the positive class; higher scores mean
"more positive". AUCs are never flipped: a probe that ranks backwards reports an AUC
below 0.5, because flipping would lift every chance-floor estimate above 0.5.

All AUC machinery rests on DeLong placement values: for positive i, V10_i is the share
of negatives it outscores (ties count one half); for negative j, V01_j is the share of
positives that outscore it. AUC = mean(V10) = mean(V01). Every pair comparison in this
module goes through one counter, :func:`_below_counts`.

Which procedure gives which number:

- one AUC: DeLong's variance with a normal reference (pROC), or with ``groups``
  Obuchowski's clustered variance with a t reference (Satterthwaite df); where the
  variance is 0 (AUC 0 or 1, or every pair tied) an exact Clopper-Pearson interval on
  disjoint pairs; or a (patient-cluster) bootstrap percentile/BCa interval.
- two AUCs on the same rows: the same DeLong / clustered DeLong test, its p and its CI
  from one z (or t) statistic, so they cannot disagree; where the variance of the
  difference is 0, an exact paired-swap permutation p.

References: DeLong, DeLong & Clarke-Pearson 1988, Biometrics 44:837 (variance and
paired test); Sun & Xu 2014, IEEE Signal Processing Letters 21:1389 (fast midrank
algorithm); Obuchowski 1997, Biometrics 53:567 (clustered data); Satterthwaite 1946,
Biometrics Bulletin 2:110 (df); Clopper & Pearson 1934, Biometrika 26:404 (exact
interval); Efron 1987, JASA 82:171 (BCa intervals); Benjamini & Hochberg 1995, JRSS-B
57:289 (FDR); Wilson 1927, JASA 22:209 and Korn & Graubard 1998, Survey Methodology
24:193 (proportions from clustered samples).
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from scipy.stats import beta as beta_dist
from scipy.stats import norm
from scipy.stats import t as t_dist

from .probes import _group_codes, _labels01, grouped_folds, out_of_fold_scores

__all__ = [
    "AUCResult",
    "BootstrapResult",
    "FewClustersWarning",
    "GapResult",
    "NotEstimable",
    "PairedDeLongResult",
    "PermutationFloor",
    "auc",
    "auc_table",
    "bootstrap_auc",
    "bootstrap_auc_gap",
    "compare_table",
    "delong",
    "delong_paired",
    "fdr_bh",
    "format_p",
    "permutation_floor",
    "within_pair_table",
]

_LN10 = math.log(10.0)

# A patient-cluster bootstrap needs this many patients with a positive row and with a
# negative row (below it, raise), and warns below FEW_GROUPS. In seeded simulations
# (benchmarks/sim_stats.py) the 95% percentile interval of one AUC covered 0.84 of the
# time with 5 positive patients, 0.88-0.90 with 10 to 20 and 0.94 with 40, and a paired
# difference's interval excluded a true 0 in 9-12% of samples with ~9 positive patients.
MIN_GROUPS = 5
FEW_GROUPS = 20


class NotEstimable(ValueError):
    """A statistic that the data cannot support (e.g. every positive in one patient).

    The table functions turn it into a row with the estimate, NaN where the interval or
    p-value would be, and the reason in the ``note`` column.
    """


class FewClustersWarning(UserWarning):
    """Fewer patients per class than a patient-cluster bootstrap interval needs to be trusted."""


# -- input checks ------------------------------------------------------------------------
def _labels(y_true, name: str = "y_true") -> np.ndarray:
    """0/1 labels as bool (the check itself is probes._labels01, shared with the probes)."""
    return _labels01(y_true, name).astype(bool)


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


@dataclass(frozen=True)
class _Clusters:
    """Patients (clusters) of one label vector: code per row and which classes each holds."""

    codes: np.ndarray
    has_pos: np.ndarray
    has_neg: np.ndarray

    @property
    def n(self) -> int:
        return int(self.has_pos.shape[0])

    @property
    def n_pos(self) -> int:
        """Patients with a positive row (Obuchowski's I10)."""
        return int(self.has_pos.sum())

    @property
    def n_neg(self) -> int:
        """Patients with a negative row (Obuchowski's I01)."""
        return int(self.has_neg.sum())

    @property
    def disjoint_pairs(self) -> int:
        """Most positive-negative pairs that use every patient at most once (independent pairs)."""
        both = int((self.has_pos & self.has_neg).sum())
        pos_only, neg_only = self.n_pos - both, self.n_neg - both
        k = min(pos_only, neg_only)
        # left-over one-class patients pair with mixed ones, and mixed ones with each other
        k_mixed = min(abs(pos_only - neg_only), both)
        return k + k_mixed + (both - k_mixed) // 2


def _clusters(groups, y: np.ndarray) -> _Clusters:
    """Cluster layout; ``groups=None`` makes every row its own patient."""
    codes = _group_codes(groups, y.shape[0], "y_true")
    n = int(codes.max()) + 1 if codes.size else 0
    return _Clusters(codes, np.bincount(codes[y], minlength=n) > 0, np.bincount(codes[~y], minlength=n) > 0)


def _repeats(groups) -> bool:
    """Whether some patient has several rows (then the clustered procedures apply)."""
    return groups is not None and bool(pd.Series(np.asarray(groups)).duplicated().any())


# -- pair counting and placement values (Sun & Xu 2014) -----------------------------------
def _below_counts(sorted_ref: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query: reference values strictly below it, and at or below it.

    The one pair counter of this module. One binary search per query; the second
    ('right') search runs only for queries that actually tie with a reference value,
    which continuous scores almost never do.
    """
    lo = np.searchsorted(sorted_ref, q, "left")
    tie = sorted_ref[np.minimum(lo, sorted_ref.shape[0] - 1)] == q
    if not tie.any():
        return lo, lo
    hi = lo.copy()
    hi[tie] = np.searchsorted(sorted_ref, q[tie], "right")
    return lo, hi


def _auc_of(pos: np.ndarray, neg_sorted: np.ndarray) -> float:
    """AUC of positive scores against sorted negative scores (ties one half), from exact integer counts."""
    lo, hi = _below_counts(neg_sorted, np.sort(pos))  # sorted queries: branch-predictable searches
    return (int(lo.sum()) + int(hi.sum())) / (2.0 * pos.shape[0] * neg_sorted.shape[0])


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


def _within_cluster_wins(pos, neg, cl_pos, cl_neg, n_clusters: int) -> np.ndarray:
    """Per patient: its positives' wins over its own negatives (ties one half).

    Scores become joint ranks and each row the key (patient, rank), so one sorted array
    of negative keys answers every positive's within-patient count with the same
    counter as the AUC itself.
    """
    m = pos.shape[0]
    ranks = np.unique(np.concatenate([pos, neg]), return_inverse=True)[1].reshape(-1).astype(np.int64)
    width = int(ranks.max()) + 1 if ranks.size else 1
    neg_keys = np.sort(cl_neg.astype(np.int64) * width + ranks[m:])
    base = cl_pos.astype(np.int64) * width
    lo, hi = _below_counts(neg_keys, base + ranks[:m])
    start = np.searchsorted(neg_keys, base, "left")  # the patient's first negative key
    return np.bincount(cl_pos, weights=0.5 * (lo + hi) - start, minlength=n_clusters)


def auc(y_true, score) -> float:
    """Area under the ROC curve (Mann-Whitney U / mn) with midranks for ties; never flipped."""
    y = _labels(y_true)
    s = _as_score(score, y.shape[0])
    _check_classes(y)
    return _auc_of(s[y], np.sort(s[~y]))


# -- reference distributions -------------------------------------------------------------
def _quantile(level: float, df: float) -> float:
    """Two-sided critical value: normal for df = inf, else Student t."""
    q = 0.5 + level / 2.0
    return float(norm.ppf(q)) if math.isinf(df) else float(t_dist.ppf(q, df))


def _log_p(z: float, df: float) -> float:
    """Natural log of the two-sided p of z (normal for df = inf, else t), exact far into the tail."""
    tail = norm.logsf(abs(z)) if math.isinf(df) else t_dist.logsf(abs(z), df)
    return min(0.0, math.log(2.0) + float(tail))


def _exact_pairs(theta: float, k: int, level: float, null: float) -> tuple[tuple[float, float], float]:
    """Clopper-Pearson interval and two-sided p for an AUC from ``k`` independent pairs.

    k positive-negative pairs that share no patient are independent, each concordant with
    chance P(X > Y) <= AUC, so the number concordant is at most Binomial(k, AUC): the
    exact binomial interval (Clopper & Pearson 1934) of k * theta successes bounds the
    AUC, e.g. (alpha/2)^(1/k) below an observed AUC of 1. Ties count one half (the beta
    form accepts a fractional count). Used only where DeLong's variance is 0, so the
    interval does not collapse onto the estimate. Returns ((low, high), log p vs null).
    """
    x = theta * k
    a = 1.0 - level
    lo = 0.0 if x <= 0 else float(beta_dist.ppf(a / 2.0, x, k - x + 1))
    hi = 1.0 if x >= k else float(beta_dist.ppf(1.0 - a / 2.0, x + 1, k - x))
    # the same two one-sided binomial tests the interval inverts, so p < 1 - level
    # exactly when the interval excludes the null
    log_upper = 0.0 if x <= 0 else float(beta_dist.logcdf(null, x, k - x + 1))  # P(>= x | null)
    log_lower = 0.0 if x >= k else float(beta_dist.logsf(null, x + 1, k - x))  # P(<= x | null)
    return (lo, hi), min(0.0, math.log(2.0) + min(log_upper, log_lower))


# -- DeLong -------------------------------------------------------------------------------
@dataclass(frozen=True)
class AUCResult:
    """One AUC with its DeLong variance, a confidence interval and a test against ``null``.

    method: "wald" or "logit" (the interval's scale), or "exact_pairs" where the variance
    was 0 (see :func:`delong`). df: degrees of freedom of the t reference (inf: normal).
    z, p_value, log10_p test AUC = ``null`` on the interval's scale, so p < 1 - level
    exactly when the interval excludes the null.
    """

    auc: float
    variance: float
    ci: tuple[float, float]
    n_pos: int
    n_neg: int
    method: str = "wald"
    level: float = 0.95
    df: float = math.inf
    null: float = 0.5
    z: float = math.nan
    p_value: float = math.nan
    log10_p: float = math.nan
    n_groups: int | None = None
    note: str = ""

    @property
    def se(self) -> float:
        return math.sqrt(self.variance)


@dataclass(frozen=True)
class PairedDeLongResult:
    """Two correlated AUCs on the same rows, their DeLong covariance and the paired test.

    ``ci`` is the ``level`` interval of ``auc_a - auc_b`` from the same statistic as the
    p-value (NaN where the variance of the difference is 0). method: "delong",
    "delong_clustered" (Obuchowski 1997, t reference with ``df``) or "paired_swap" (exact
    or Monte Carlo permutation p where the variance is 0).
    """

    auc_a: float
    auc_b: float
    cov: np.ndarray = field(repr=False)
    z: float
    p_value: float
    log10_p: float
    n_pos: int
    n_neg: int
    ci: tuple[float, float] = (math.nan, math.nan)
    level: float = 0.95
    df: float = math.inf
    method: str = "delong"
    n_groups: int | None = None
    note: str = ""

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


def _cluster_sums(cl: _Clusters, y: np.ndarray, theta: float, v10: np.ndarray, v01: np.ndarray):
    """Per patient: sum over its positives of V10 - theta, and over its negatives of V01 - theta."""
    a = np.bincount(cl.codes[y], weights=v10 - theta, minlength=cl.n)
    b = np.bincount(cl.codes[~y], weights=v01 - theta, minlength=cl.n)
    return a, b


def _obuchowski(cl: _Clusters, m: int, n: int, ab1, ab2=None) -> tuple[float, float, float]:
    """Obuchowski's (1997) clustered (co)variance terms S10/M, S01/N and 2 S11/(M N).

    ab1, ab2: per-patient sums (a, b) from :func:`_cluster_sums` of one score each (the
    same score twice gives its variance; differenced sums give the variance of a
    difference). The positive-side term is scaled by I10/(I10 - 1), the negative-side
    term by I01/(I01 - 1) and the within-patient cross term by I/(I - 1), I10 and I01
    counting patients with a positive and with a negative row, as in Obuchowski's paper
    and iMRMC's doAUCcluster. With one row per patient the terms are DeLong's
    (m-1, n-1) variance exactly and the cross term is 0.
    """
    i10, i01, i = cl.n_pos, cl.n_neg, cl.n
    if i10 < 2 or i01 < 2:
        which = "positive" if i10 < 2 else "negative"
        rows = m if i10 < 2 else n
        raise NotEstimable(
            f"all {rows} {which} rows are in {min(i10, i01)} patient(s); Obuchowski's clustered variance needs "
            f"{which} rows in at least 2 patients (I10 = {i10}, I01 = {i01}). Report the AUC without an "
            "interval, or pool strata so that more patients hold each class."
        )
    (a1, b1), (a2, b2) = ab1, ab1 if ab2 is None else ab2
    s10 = i10 / (i10 - 1.0) * float(a1 @ a2) / (float(m) * m)
    s01 = i01 / (i01 - 1.0) * float(b1 @ b2) / (float(n) * n)
    s11 = i / (i - 1.0) * float(a1 @ b2 + a2 @ b1) / (float(m) * n)
    return s10, s01, s11


def _satterthwaite(s10: float, s01: float, cl: _Clusters) -> float:
    """Welch-Satterthwaite df of S10/M + S01/N, each estimated from I10 - 1 and I01 - 1 df.

    The within-patient cross term is left out of the df. With few patients on one side
    the df falls towards I10 - 1 (or I01 - 1) and the t reference widens the interval: in
    seeded simulations with ~9 positive patients the test then rejected 5.0% of true
    nulls at alpha 0.05, against 7.9% with a normal reference (benchmarks/sim_stats.py).
    """
    num = (s10 + s01) ** 2
    den = s10**2 / (cl.n_pos - 1.0) + s01**2 / (cl.n_neg - 1.0)
    return num / den if den > 0 else math.inf


def _check_reference(reference: str) -> None:
    if reference not in ("t", "normal"):
        raise ValueError(f"reference must be 't' (Satterthwaite df) or 'normal' (as iMRMC's doAUCcluster); got {reference!r}")


def delong(y_true, score, method: str = "wald", level: float = 0.95, *, groups=None, null: float = 0.5,
           reference: str = "t") -> AUCResult:
    """AUC with DeLong variance, a ``level`` CI and a test of AUC = ``null``.

    method: "wald" (AUC +/- q*SE, clipped to [0, 1], as pROC's ci.auc) or "logit"
    (Wald on logit(AUC) by the delta method, back-transformed; inside (0, 1) wherever the
    variance is positive).
    groups: one patient id per row; the variance is then Obuchowski's clustered DeLong
    variance (several images of one patient are not independent draws) and, with
    ``reference="t"``, the reference a t distribution with Satterthwaite df (see
    :func:`_satterthwaite`); ``reference="normal"`` reproduces iMRMC's doAUCcluster. It raises :class:`NotEstimable` when all
    positive (or all negative) rows are in one patient: the variance is then undefined.
    Where the variance is 0 (AUC 0 or 1, or every pair tied) no Wald interval exists;
    the interval and p are then the exact Clopper-Pearson ones on the largest set of
    positive-negative pairs that share no patient (``method="exact_pairs"``, see
    :func:`_exact_pairs`), so an AUC of 1 from 3 + 3 rows gives [0.292, 1] and p = 0.25.
    DeLong et al. 1988, Biometrics 44:837; placements by Sun & Xu 2014; clusters:
    Obuchowski 1997, Biometrics 53:567; exact interval: Clopper & Pearson 1934.
    """
    if method not in ("wald", "logit"):
        raise ValueError(f"method must be 'wald' or 'logit'; got {method!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95; got {level!r}")
    if not 0.0 < null < 1.0:
        raise ValueError(f"null must be an AUC in (0, 1), e.g. 0.5 for chance; got {null!r}")
    _check_reference(reference)
    y = _labels(y_true)
    s = _as_score(score, y.shape[0])
    m, n = _check_classes(y, need=2, what="a DeLong variance")
    a, v10, v01 = _placements(y, s)
    cl = None if groups is None else _clusters(groups, y)
    n_groups = None if cl is None else cl.n
    if cl is None:
        var, df = _variance(v10, v01), math.inf
    else:
        s10, s01, s11 = _obuchowski(cl, m, n, _cluster_sums(cl, y, a, v10, v01))
        var, df = max(s10 + s01 + s11, 0.0), _satterthwaite(s10, s01, cl) if reference == "t" else math.inf
    common = dict(auc=a, variance=var, n_pos=m, n_neg=n, level=level, null=null, n_groups=n_groups)
    if var <= 0.0:
        k = min(m, n) if cl is None else cl.disjoint_pairs
        ci, log_p = _exact_pairs(a, k, level, null)
        return AUCResult(ci=ci, method="exact_pairs", df=math.inf, z=math.nan, p_value=math.exp(log_p),
                         log10_p=log_p / _LN10, note=f"DeLong variance 0 (AUC {a:g}): exact Clopper-Pearson "
                         f"interval and p on {k} positive-negative pairs that share no patient", **common)
    se = math.sqrt(var)
    q = _quantile(level, df)
    if method == "wald":
        ci = (max(0.0, a - q * se), min(1.0, a + q * se))
        z = (a - null) / se
    else:
        # se > 0 implies 0 < AUC < 1, so the logit is finite.
        centre, se_logit = math.log(a / (1.0 - a)), se / (a * (1.0 - a))
        ci = (1.0 / (1.0 + math.exp(-(centre - q * se_logit))), 1.0 / (1.0 + math.exp(-(centre + q * se_logit))))
        z = (centre - math.log(null / (1.0 - null))) / se_logit
    log_p = _log_p(z, df)
    return AUCResult(ci=ci, method=method, df=df, z=z, p_value=math.exp(log_p), log10_p=log_p / _LN10, **common)


def _paired_swap_log_p(y, sa, sb, units: np.ndarray, delta: float, n_permutations: int, seed) -> tuple[float, str]:
    """Two-sided permutation p of auc(a) - auc(b) with the two scores swapped within units.

    Under the null that a unit's (a, b) scores are exchangeable, every swap pattern is
    equally likely; p is the share of patterns whose |difference| reaches the observed
    one: all 2^U patterns when U <= 12 units (exact; 3 + 3 rows, one perfect score and
    one constant, give p = 0.25), else ``n_permutations`` random ones with (1 + count) /
    (1 + n_permutations). Units are patients when groups are given, else rows.
    """
    n_units = int(units.max()) + 1
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    if n_units <= 12:
        patterns = np.array(list(itertools.product((False, True), repeat=n_units)), dtype=bool)
        exact = True
    else:
        patterns = np.random.default_rng(seed).random((int(n_permutations), n_units)) < 0.5
        exact = False
    tol = 1e-12 * max(1.0, abs(delta))
    count = 0
    for swap in patterns:
        sw = swap[units]
        a2, b2 = np.where(sw, sb, sa), np.where(sw, sa, sb)
        d = _auc_of(a2[pos], np.sort(a2[neg])) - _auc_of(b2[pos], np.sort(b2[neg]))
        count += abs(d) >= abs(delta) - tol
    if exact:
        return math.log(count / patterns.shape[0]), f"exact over all {patterns.shape[0]} swap patterns"
    return math.log((1 + count) / (1 + patterns.shape[0])), f"Monte Carlo over {patterns.shape[0]} random swap patterns"


def delong_paired(y_true, score_a, score_b, *, groups=None, level: float = 0.95, n_permutations: int = 2000,
                  seed: int | np.random.SeedSequence = 0, reference: str = "t") -> PairedDeLongResult:
    """DeLong's paired test that two scores on the same rows have equal AUC, with the CI of the difference.

    Without groups: the z statistic uses the (m-1, n-1) covariance convention of R pROC's
    roc.test(method="delong") and a normal reference. With groups (one patient id per
    row): Obuchowski's (1997) clustered covariance and a t reference with Satterthwaite df
    (see :func:`_satterthwaite`); this is the test the tables use wherever a patient has
    several rows. ``reference="normal"`` refers the clustered z to the normal instead, as
    iMRMC's doAUCcluster does (its size runs high with few patients). The CI of ``auc_a - auc_b`` is delta +/- q * SE from the same reference,
    so p < 1 - level exactly when the CI excludes 0. p comes from the log survival
    function, so z = 40 still has a finite ``log10_p`` (print it with :func:`format_p`).
    Where the variance of the difference is 0 no Wald test exists: a zero difference gives
    z = 0, p = 1; a nonzero one (e.g. a perfect against a constant score) gets the exact
    paired-swap permutation p (:func:`_paired_swap_log_p`, ``n_permutations`` and
    ``seed`` used only there) and no interval.
    DeLong et al. 1988, Biometrics 44:837; Sun & Xu 2014, IEEE SPL 21:1389; Obuchowski
    1997, Biometrics 53:567.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95; got {level!r}")
    _check_reference(reference)
    y = _labels(y_true)
    sa = _as_score(score_a, y.shape[0], "score_a")
    sb = _as_score(score_b, y.shape[0], "score_b")
    m, n = _check_classes(y, need=2, what="a DeLong covariance")
    split = (np.flatnonzero(y), np.flatnonzero(~y))
    auc_a, v10a, v01a = _placements(y, sa, split)
    auc_b, v10b, v01b = _placements(y, sb, split)
    cl = None if groups is None else _clusters(groups, y)
    if cl is None:
        cov = _scatter2(v10a, v10b) / (m * (m - 1.0)) + _scatter2(v01a, v01b) / (n * (n - 1.0))
        # Variance of the difference from the differenced placements, not from the 2x2
        # matrix: identical predictors then give exactly 0 rather than rounding noise.
        var_d = _scatter1(v10a - v10b) / (m * (m - 1.0)) + _scatter1(v01a - v01b) / (n * (n - 1.0))
        df, method = math.inf, "delong"
    else:
        sums_a = _cluster_sums(cl, y, auc_a, v10a, v01a)
        sums_b = _cluster_sums(cl, y, auc_b, v10b, v01b)
        c_ab = sum(_obuchowski(cl, m, n, sums_a, sums_b))
        cov = np.array([[sum(_obuchowski(cl, m, n, sums_a)), c_ab], [c_ab, sum(_obuchowski(cl, m, n, sums_b))]])
        diff = (sums_a[0] - sums_b[0], sums_a[1] - sums_b[1])
        s10, s01, s11 = _obuchowski(cl, m, n, diff)
        df = _satterthwaite(s10, s01, cl) if reference == "t" else math.inf
        var_d, method = max(s10 + s01 + s11, 0.0), "delong_clustered"
    delta = auc_a - auc_b
    ci, note = (math.nan, math.nan), ""
    if var_d > 0.0:
        se = math.sqrt(var_d)
        z = delta / se
        log_p = _log_p(z, df)
        q = _quantile(level, df)
        ci = (max(-1.0, delta - q * se), min(1.0, delta + q * se))
    elif delta == 0.0:
        z, log_p = 0.0, 0.0
        note = "the two scores order every positive-negative pair alike: difference 0, variance 0, no interval"
    else:
        units = np.arange(y.shape[0]) if cl is None else cl.codes
        log_p, how = _paired_swap_log_p(y, sa, sb, units, delta, n_permutations, seed)
        z, df, method = math.nan, math.inf, "paired_swap"
        note = f"variance of the difference 0: paired-swap permutation p ({how}), no interval"
    return PairedDeLongResult(
        auc_a=auc_a,
        auc_b=auc_b,
        cov=cov,
        z=z,
        p_value=math.exp(log_p),
        log10_p=log_p / _LN10,
        n_pos=m,
        n_neg=n,
        ci=ci,
        level=level,
        df=df,
        method=method,
        n_groups=None if cl is None else cl.n,
        note=note,
    )


# -- bootstrap ----------------------------------------------------------------------------
@dataclass(frozen=True)
class BootstrapResult:
    """Bootstrap CI of an AUC and, when two scores were given, of their paired difference.

    ``difference`` is ``auc - auc_b``; ``replicates`` holds the bootstrap AUCs
    (shape (n_boot,) or (n_boot, 2)); replicates with an empty class are NaN. ``method``
    is "exact_pairs" where the AUC is 0 or 1 and the interval is the exact one of
    :func:`delong` instead (every replicate then equals the estimate); ``note`` says so.
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
    note: str = ""

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
        m = pos.shape[0]
        lo, hi = _below_counts(pos[self.order], neg)
        pairs, key = np.unique(lo.astype(np.int64) * (m + 1) + hi, return_inverse=True)
        self.ulo = pairs // (m + 1)
        self.uhi = pairs % (m + 1)
        self.key = key.astype(np.intp).reshape(-1)

    def above(self, w_rows: np.ndarray) -> np.ndarray:
        """Weighted count of positives above each negative key; ``w_rows`` in positive row order."""
        cw = np.zeros(w_rows.shape[0] + 1)
        np.cumsum(w_rows[self.order], out=cw[1:])
        return cw[-1] - 0.5 * (cw[self.ulo] + cw[self.uhi])


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
    positive-negative pairs twice, so those within-cluster pairs are added back.
    """
    m, n = pos.shape[0], neg.shape[0]
    within = _within_cluster_wins(pos, neg, cl_pos, cl_neg, n_clusters)
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
    z0 = float(norm.ppf(prop))
    d = jack.mean() - jack
    ss = float((d**2).sum())
    accel = float((d**3).sum()) / (6.0 * ss**1.5) if ss > 0 else 0.0
    zq = norm.ppf([alpha / 2.0, 1.0 - alpha / 2.0])
    qs = norm.cdf(z0 + (z0 + zq) / (1.0 - accel * (z0 + zq)))
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


def _check_cluster_counts(cl: _Clusters, min_groups: int, what: str) -> None:
    """Raise below ``min_groups`` patients per class, warn below FEW_GROUPS."""
    few = min(cl.n_pos, cl.n_neg)
    counts = f"{cl.n_pos} clusters (groups) with a positive row and {cl.n_neg} with a negative row"
    if few < min_groups:
        raise NotEstimable(
            f"{counts}; {what} needs at least {min_groups} of each (it resamples whole groups, and with fewer "
            "the replicates take only a handful of values). Pool strata, or use delong(..., groups=...) "
            "(Obuchowski's clustered variance with a t reference), whose size holds with few patients."
        )
    if few < FEW_GROUPS:
        warnings.warn(
            f"{counts} (fewer than {FEW_GROUPS}): {what}'s percentile interval runs too narrow with this few "
            "clusters (95% intervals covered 0.84-0.90 in simulation with 5-20); prefer delong(..., groups=...).",
            FewClustersWarning,
            stacklevel=3,
        )


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
    min_groups: int = MIN_GROUPS,
) -> BootstrapResult:
    """Stratified bootstrap CI of an AUC, or of two AUCs and their paired difference.

    Positives and negatives are resampled separately. With ``groups`` (one patient id
    per row) whole patients are resampled instead, stratified by whether a patient has
    any positive row, so images of one patient never act as independent draws; it then
    needs ``min_groups`` patients with a positive row and as many with a negative row
    (:class:`NotEstimable` otherwise) and warns (:class:`FewClustersWarning`) below
    ``FEW_GROUPS`` = 20. ``score_b`` is scored on the same replicates, giving a CI for
    ``auc - auc_b``. method: "percentile" or "bca" (Efron 1987, JASA 82:171), whose
    acceleration comes from the closed-form jackknife of the DeLong placements (DeLong et
    al. 1988). An AUC of 0 or 1 makes every replicate equal to it, so its interval is the
    exact one of :func:`delong` instead (``method="exact_pairs"``). seed: an int or a
    SeedSequence; the same seed gives the same replicates whatever ``n_jobs`` is
    (threads; the hot loops release the GIL).
    """
    if method not in ("percentile", "bca"):
        raise ValueError(f"method must be 'percentile' or 'bca'; got {method!r}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), e.g. 0.95; got {ci!r}")
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be a positive integer; got {n_boot!r}")
    n_boot = int(n_boot)
    y = _labels(y_true)
    scores = [_as_score(score, y.shape[0], "score")]
    if score_b is not None:
        scores.append(_as_score(score_b, y.shape[0], "score_b"))
    m, n = _check_classes(y, need=2, what="a bootstrap CI")

    cl = _clusters(groups, y)  # groups=None: every row its own cluster (for the exact interval's pairs)
    cl_pos = cl_neg = None
    n_groups = None
    if groups is not None:
        _check_cluster_counts(cl, int(min_groups), "a patient-cluster bootstrap")
        n_groups = cl.n
        cl_pos, cl_neg = cl.codes[y], cl.codes[~y]

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
        strata = [s for s in (np.flatnonzero(cl.has_pos), np.flatnonzero(~cl.has_pos)) if s.shape[0] > 0]
        # Within-patient (positive, negative) wins per patient and per score, and the number
        # of such pairs. A patient drawn c times would otherwise contribute c**2 copies of
        # its within-patient pairs (c of them real, c*(c-1) between copies of itself), so the
        # replicates over-weight within-patient pairs and, in a paired design where those
        # pairs differ from between-patient ones, are biased (percentile CIs that miss the
        # estimate). Removing the copy-to-copy pairs keeps their share as in the sample.
        within_pairs = np.bincount(cl_pos, minlength=n_groups) * np.bincount(cl_neg, minlength=n_groups)
        within_wins = [_within_cluster_wins(sc[y], sc[~y], cl_pos, cl_neg, n_groups) for sc in scores]
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
    notes = []

    def interval(theta, rep, jack_fn, boundary_ok=True):
        if boundary_ok and theta in (0.0, 1.0):
            k = cl.disjoint_pairs
            notes.append(f"AUC {theta:g}: every replicate equals it, so the interval is the exact "
                         f"Clopper-Pearson one on {k} pairs that share no patient")
            return _exact_pairs(theta, k, ci, 0.5)[0]
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
    out_method = "exact_pairs" if notes else method
    extra = {}
    if score_b is not None:
        lo_b, hi_b = interval(thetas[1], reps[:, 1], lambda: jack_for(1))
        d_lo, d_hi = interval(
            thetas[0] - thetas[1], reps[:, 0] - reps[:, 1], lambda: jack_for(0) - jack_for(1), boundary_ok=False
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
        method=out_method,
        n_boot=n_boot,
        level=ci,
        n_pos=m,
        n_neg=n,
        n_groups=n_groups,
        replicates=reps if score_b is not None else reps[:, 0],
        note="; ".join(notes),
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
    if permute not in ("within", "between"):
        raise ValueError(f"permute must be 'within' or 'between'; got {permute!r}")
    if int(n_permutations) < 1:
        raise ValueError(f"n_permutations must be a positive integer; got {n_permutations!r}")
    yb = _labels01(y, "y")
    codes = None
    if groups is not None:
        codes = _group_codes(groups, yb.shape[0], "y")
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
    (DeLong interval, no resampling). group_col: patient ids; the bootstrap then
    resamples whole patients, and "delong" uses Obuchowski's clustered variance with a t
    reference wherever a patient has several rows (see :func:`delong`), so no method
    ignores the patients. The ``method`` column names the procedure of each row
    ("percentile", "bca", "delong", "delong_clustered", or "exact_pairs" where the AUC is
    0 or 1). A stratum whose data cannot support an interval (e.g. every positive in one
    patient, or fewer than 5 patients per class for the cluster bootstrap) keeps its AUC
    with NaN limits and the reason in ``note``; rows with fewer than 20 patients per class
    say so in ``note`` and raise one :class:`FewClustersWarning`. Each stratum's seed
    derives from ``seed`` and the stratum's name, so results do not depend on which other
    strata are present. dropna: drop rows whose score is NaN (e.g. roi_local for images
    without a box) instead of raising.
    """
    if method not in ("percentile", "bca", "delong"):
        raise ValueError(f"method must be 'percentile', 'bca' or 'delong'; got {method!r}")
    score_cols, by = _as_list(score_cols), _as_list(by)
    _check_columns(df, score_cols + [label_col] + by + _as_list(group_col), "columns")
    rows, n_few = [], 0
    for key, part in _iter_strata(df, by):
        for col in score_cols:
            sub = part.dropna(subset=[col]) if dropna else part
            y, s = sub[label_col].to_numpy(), sub[col].to_numpy()
            g = None if group_col is None else sub[group_col].to_numpy()
            try:
                try:
                    if method == "delong":
                        r = delong(y, s, level=ci, groups=g if _repeats(g) else None)
                        lo, hi, nb, note = r.ci[0], r.ci[1], 0, r.note
                        how = r.method if r.method == "exact_pairs" else ("delong" if r.n_groups is None else "delong_clustered")
                    else:
                        with warnings.catch_warnings(record=True) as caught:
                            warnings.simplefilter("always", FewClustersWarning)
                            r = bootstrap_auc(y, s, n_boot=n_boot, ci=ci, method=method, groups=g,
                                              seed=_stratum_seed(seed, key, col), n_jobs=n_jobs)
                        few = [w for w in caught if issubclass(w.category, FewClustersWarning)]
                        for w in caught:
                            if w not in few:
                                warnings.warn(w.message, w.category, stacklevel=2)
                        n_few += bool(few)
                        lo, hi, nb, how = r.ci_low, r.ci_high, r.n_boot, r.method
                        note = "; ".join(([r.note] if r.note else []) + [str(w.message).split(":")[0] for w in few[:1]])
                    a, m, n = r.auc, r.n_pos, r.n_neg
                except NotEstimable as err:
                    yb = _labels(y, label_col)
                    a, m, n = auc(yb, s), int(yb.sum()), int((~yb).sum())
                    lo = hi = math.nan
                    nb, note = 0, f"not estimable: {err}"
                    how = "delong_clustered" if method == "delong" else method
            except ValueError as err:
                raise ValueError(f"stratum {_stratum_label(key)}, score column {col!r}: {err}") from err
            rows.append({**key, score_name: col, "auc": a, "ci_low": lo, "ci_high": hi,
                         "n_pos": m, "n_neg": n, "method": how, "n_boot": nb, "note": note})
    if n_few:
        warnings.warn(f"{n_few} rows of this AUC table come from a patient-cluster bootstrap with fewer than "
                      f"{FEW_GROUPS} clusters in a class, where percentile intervals run narrow; see the note "
                      "column, or use method='delong'.", FewClustersWarning, stacklevel=2)
    return pd.DataFrame(rows, columns=by + [score_name, "auc", "ci_low", "ci_high", "n_pos", "n_neg", "method",
                                            "n_boot", "note"])


_COMPARE_COLUMNS = ["a", "b", "auc_a", "auc_b", "delta", "se", "df", "z", "p_value", "log10_p", "p_adj", "family",
                    "n_pos", "n_neg", "ci_low", "ci_high", "method", "n_groups", "note"]


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
    ci: float = 0.95,
    seed: int = 0,
    n_permutations: int = 2000,
    n_boot: int | None = None,
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

    Every row is one procedure, named in ``method``, whose p-value and CI come from the
    same statistic (p < 1 - ci exactly when the CI excludes 0): "delong", DeLong's paired
    test (pROC's convention, normal reference), where each patient has one row or
    without ``group_col``; "delong_clustered", the same test with Obuchowski's (1997)
    clustered covariance and a t reference with Satterthwaite df (``df``), where a patient
    has several rows (in seeded simulations with ~9 positive patients it rejected 5.0% of
    true nulls at 0.05; the patient-cluster bootstrap z-test it replaces rejected 8-10%);
    "paired_swap", the exact (or ``n_permutations`` Monte Carlo, seeded per stratum)
    paired-swap permutation p where the variance of the difference is 0, with no CI. A
    stratum that cannot be tested (every positive in one patient) keeps its AUCs with NaN
    statistics and the reason in ``note``. Print p with :func:`format_p`.
    n_boot, n_jobs: no longer used (the comparison no longer bootstraps); passing them warns.
    DeLong et al. 1988; Obuchowski 1997; Benjamini & Hochberg 1995.
    """
    if n_boot is not None or n_jobs is not None:
        warnings.warn("compare_table no longer bootstraps (its test is DeLong's, clustered by patient where a "
                      "patient has several rows); n_boot and n_jobs are ignored and will be removed: drop them.",
                      DeprecationWarning, stacklevel=2)
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
    rows = []
    for key, part in _iter_strata(df, by):
        for a, b in pairs:
            sub = part.dropna(subset=[a, b]) if dropna else part
            y, sa, sb = sub[label_col].to_numpy(), sub[a].to_numpy(), sub[b].to_numpy()
            g = None if group_col is None else sub[group_col].to_numpy()
            clustered = _repeats(g)
            try:
                try:
                    r = delong_paired(y, sa, sb, groups=g if clustered else None, level=ci,
                                      n_permutations=n_permutations, seed=_stratum_seed(seed, key, f"{a} vs {b}"))
                    row = {"auc_a": r.auc_a, "auc_b": r.auc_b, "delta": r.delta, "se": r.se_delta, "df": r.df,
                           "z": r.z, "p_value": r.p_value, "log10_p": r.log10_p, "n_pos": r.n_pos, "n_neg": r.n_neg,
                           "ci_low": r.ci[0], "ci_high": r.ci[1], "method": r.method, "note": r.note}
                except NotEstimable as err:
                    yb = _labels(y, label_col)
                    auc_a, auc_b = auc(yb, sa), auc(yb, sb)
                    nan = math.nan
                    row = {"auc_a": auc_a, "auc_b": auc_b, "delta": auc_a - auc_b, "se": nan, "df": nan, "z": nan,
                           "p_value": nan, "log10_p": nan, "n_pos": int(yb.sum()), "n_neg": int((~yb).sum()),
                           "ci_low": nan, "ci_high": nan, "method": "delong_clustered", "note": f"not estimable: {err}"}
            except ValueError as err:
                raise ValueError(f"stratum {_stratum_label(key)}, pair {a!r} vs {b!r}: {err}") from err
            n_groups = len(pd.unique(g)) if g is not None else row["n_pos"] + row["n_neg"]
            rows.append({**key, "a": a, "b": b, **row, "n_groups": n_groups})
    cols = by + _COMPARE_COLUMNS
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


def format_p(p, floor: float = 1e-16, digits: int = 2) -> str:
    """A p-value as printed in the book: ``digits`` significant digits, "< 1e-16" below ``floor``.

    A p far in the tail of a normal or t approximation (DeLong, Obuchowski, a Wald z) is
    not accurate to any digit, so printing 1e-300 is false precision; below ``floor`` the
    text says only that p is smaller. NaN (a test that could not be done) gives
    "not estimable".
    """
    p = float(p)
    if math.isnan(p):
        return "not estimable"
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"a p-value lies in [0, 1]; got {p!r}")
    if p < floor:
        return f"< {floor:.0e}".replace("e-0", "e-")
    return f"{p:.{int(digits)}g}"


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


def bootstrap_auc_gap(y_true, score, stratum, a: str = "large", b: str = "small", *, n_boot: int = 2000,
                      ci: float = 0.95, seed: int = 0) -> GapResult:
    """AUC of stratum ``a``'s positives minus stratum ``b``'s, both against all negatives.

    One joint bootstrap: every replicate resamples the negatives once and each stratum's
    positives separately, and computes both AUCs on that replicate, so the gap's
    percentile CI carries the correlation through the shared negatives (two separately
    seeded bootstraps would not). ``stratum`` labels each positive row (negatives' values
    are ignored). Rows are treated as independent (one image per patient).
    """
    y = _labels(y_true)
    s = _as_score(score, y.shape[0], "score")
    st = np.asarray(stratum).astype(str)
    if st.shape[0] != y.shape[0]:
        raise ValueError(f"stratum has {st.shape[0]} rows, y_true {y.shape[0]}; give one stratum per row")
    neg = s[~y]
    pa, pb = s[y & (st == a)], s[y & (st == b)]
    for name, arr in ((f"stratum {a!r}", pa), (f"stratum {b!r}", pb), ("negatives", neg)):
        if arr.shape[0] < 2:
            raise ValueError(f"{name} has {arr.shape[0]} rows; a gap needs at least 2 in each stratum and 2 negatives")
    auc_a, auc_b = _auc_of(pa, np.sort(neg)), _auc_of(pb, np.sort(neg))
    rng = np.random.default_rng(seed)
    reps = np.empty(int(n_boot))
    for r in range(reps.shape[0]):
        ns = np.sort(neg[rng.integers(0, neg.shape[0], neg.shape[0])])
        reps[r] = (_auc_of(pa[rng.integers(0, pa.shape[0], pa.shape[0])], ns)
                   - _auc_of(pb[rng.integers(0, pb.shape[0], pb.shape[0])], ns))
    lo, hi = _percentile_interval(reps, 1.0 - ci)
    return GapResult(auc_a - auc_b, auc_a, auc_b, lo, hi, pa.shape[0], pb.shape[0], neg.shape[0], reps.shape[0])


def _proportion_ci(w: np.ndarray, codes: np.ndarray | None, level: float) -> tuple[float, float, str, str]:
    """Wilson interval of the mean of ``w`` (wins in [0, 1]); clustered by ``codes`` when given.

    Clustered: the Wilson interval on the effective sample size n / deff, deff the ratio of
    the cluster-robust variance of the mean to the binomial one (Kish's design effect),
    times (z / t_{G-1})^2 for the G - 1 df of that variance (Korn & Graubard 1998, Survey
    Methodology 24:193, who do this for the Clopper-Pearson interval). Where every win is
    1 (or 0) the design effect is 0 / 0; the number of patients then stands in for n_eff,
    as if each patient's pairs agreed fully (conservative).
    """
    from statsmodels.stats.proportion import proportion_confint

    n = w.shape[0]
    p = float(w.mean())
    n_groups = n if codes is None else int(codes.max()) + 1
    if codes is None or n_groups == n:
        n_eff, how, note = float(n), "wilson", ""
    elif n_groups < 2:
        return math.nan, math.nan, "wilson_design_effect", "not estimable: all pairs belong to one patient"
    else:
        sums, sizes = np.bincount(codes, weights=w), np.bincount(codes)
        var_cl = n_groups / (n_groups - 1.0) * float(((sums - sizes * p) ** 2).sum()) / (float(n) * n)
        var_bin = p * (1.0 - p) / n
        if var_bin == 0.0:
            n_eff, note = float(n_groups), "all pairs agree: the number of patients stands in for the effective n"
        else:
            n_eff, note = (min(float(n), n * var_bin / var_cl) if var_cl > 0 else float(n)), ""
        q = 0.5 + level / 2.0
        n_eff *= (norm.ppf(q) / t_dist.ppf(q, n_groups - 1)) ** 2
        how = "wilson_design_effect"
    lo, hi = proportion_confint(p * n_eff, n_eff, alpha=1.0 - level, method="wilson")
    return float(lo), float(hi), how, note


def within_pair_table(df: pd.DataFrame, score_cols, pair_col: str, arm_col: str = "arm", by=None,
                      ci: float = 0.95, *, group_col: str | None = None) -> pd.DataFrame:
    """Within-pair AUC: the share of pairs whose arm-1 row outscores its arm-0 row (ties one half).

    For a paired design (each ``pair_col`` value has one row with ``arm_col`` 0 and one
    with 1) this is the AUC conditional on the pair: between-pair differences, which
    dominate a pooled AUC when the perturbation moves the score less than images differ,
    cancel. A pair with two rows in one arm raises, naming the pair. CI (``method``
    column): the Wilson interval of the proportion (Wilson 1927) when pairs are
    independent; with ``group_col`` (patient id per row) and a patient holding several
    pairs, whose wins are then correlated, the Wilson interval on the design-effect
    effective number of pairs with a t df correction (:func:`_proportion_ci`; with 30
    patients x 5 pairs its 95% interval covered 0.95 of the time in simulation, the plain
    Wilson interval 0.81). Tidy: one row per stratum of ``by`` and score column.
    """
    score_cols, by = _as_list(score_cols), _as_list(by)
    _check_columns(df, score_cols + [pair_col, arm_col] + by + _as_list(group_col), "columns")
    rows = []
    for key, part in _iter_strata(df, by):
        where = f"stratum {_stratum_label(key)}"
        if set(pd.unique(part[arm_col])) != {0, 1}:
            raise ValueError(f"{where}: {arm_col!r} must take the values 0 and 1; got {sorted(pd.unique(part[arm_col]))[:5]}")
        dup = part.duplicated([pair_col, arm_col], keep=False)
        if dup.any():
            pair, arm = part.loc[dup, [pair_col, arm_col]].iloc[0].tolist()
            count = int(((part[pair_col] == pair) & (part[arm_col] == arm)).sum())
            raise ValueError(f"{where}: pair {pair!r} has {count} rows with {arm_col} = {arm!r} "
                             f"({int(dup.sum())} duplicated rows in all); a pair needs exactly one row per arm. "
                             "Drop the duplicates, or give each copy its own pair id.")
        patient = None
        if group_col is not None:
            per_pair = part.groupby(pair_col, sort=True)[group_col].nunique(dropna=False)
            if (per_pair > 1).any():
                bad = per_pair.index[per_pair > 1].tolist()[0]
                raise ValueError(f"{where}: pair {bad!r} spans {int(per_pair.max())} "
                                 f"patients in {group_col!r}; both arms of a pair must come from one patient.")
            patient = part.groupby(pair_col, sort=True)[group_col].first()
        wide = part.pivot(index=pair_col, columns=arm_col, values=score_cols)
        for col in score_cols:
            d = (wide[(col, 1)] - wide[(col, 0)]).dropna()
            n = d.shape[0]
            missing = wide.shape[0] - n
            note = f"{missing} pairs lack an arm or a score and are left out" if missing else ""
            if n == 0:
                rows.append({**key, "pooling": col, "within_pair_auc": np.nan, "ci_low": np.nan, "ci_high": np.nan,
                             "n_pairs": 0, "n_groups": 0, "method": "", "note": "no complete pair"})
                continue
            w = (d.to_numpy() > 0) + 0.5 * (d.to_numpy() == 0)
            codes = None if patient is None else _group_codes(patient.reindex(d.index).to_numpy(), n, "pairs")
            lo, hi, how, extra = _proportion_ci(w, codes, ci)
            rows.append({**key, "pooling": col, "within_pair_auc": float(w.mean()), "ci_low": lo, "ci_high": hi,
                         "n_pairs": n, "n_groups": n if codes is None else int(codes.max()) + 1, "method": how,
                         "note": "; ".join(x for x in (note, extra) if x)})
    return pd.DataFrame(rows, columns=by + ["pooling", "within_pair_auc", "ci_low", "ci_high", "n_pairs", "n_groups",
                                            "method", "note"])
