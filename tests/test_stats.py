"""Tests for cxrcore.stats: every estimator against an independent O(n^2) reference.

The reference below works on pairs (Mann-Whitney kernel psi = 1, 1/2, 0) and shares no
code with cxrcore.stats: no ranks, no sorting, no placements by binary search.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import norm
from scipy.stats import t as t_dist
from sklearn.metrics import roc_auc_score

from cxrcore import stats
from cxrcore.probes import LinearProbe


# -- the O(n^2) reference ------------------------------------------------------------------
def ref_components(y, s):
    """AUC and DeLong structural components from the full pair matrix."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, dtype=float)
    x, z = s[y], s[~y]
    psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
    return psi.mean(), psi.mean(axis=1), psi.mean(axis=0)


def ref_paired(y, a, b):
    """AUCs, 2x2 covariance, z and two-sided p by DeLong 1988 eqs. (2)-(5), pairwise."""
    auc_a, v10a, v01a = ref_components(y, a)
    auc_b, v10b, v01b = ref_components(y, b)
    m, n = v10a.size, v01a.size
    s10 = np.cov(np.vstack([v10a, v10b]))
    s01 = np.cov(np.vstack([v01a, v01b]))
    cov = s10 / m + s01 / n
    var_d = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    if var_d > 0:
        z = (auc_a - auc_b) / math.sqrt(var_d)
    else:  # as R's division: 0/0 is declared z = 0, d/0 is +/-Inf (p = 0)
        z = 0.0 if auc_a == auc_b else math.copysign(math.inf, auc_a - auc_b)
    return auc_a, auc_b, cov, z, 2 * norm.sf(abs(z))


def make_data(kind: str, seed: int = 0):
    """Two correlated scores for one label vector, in several shapes that break code."""
    rng = np.random.default_rng(seed)
    n = 600
    if kind == "imbalanced":
        n = 3000
        y = np.zeros(n, dtype=int)
        y[rng.choice(n, 30, replace=False)] = 1  # 1% prevalence
    else:
        y = (rng.random(n) < 0.4).astype(int)
    a = y * 1.0 + rng.normal(size=n)
    b = 0.6 * a + y * 0.3 + rng.normal(size=n)
    if kind == "ties":
        a, b = np.round(a), np.round(b * 2) / 2  # a handful of distinct values
    elif kind == "perfect":
        a = y * 10.0 + rng.random(n)
    elif kind == "identical":
        b = a.copy()
    elif kind == "all_tied":
        a = np.full(n, 0.3)
    return y, a, b


KINDS = ["continuous", "ties", "imbalanced", "perfect", "identical", "all_tied"]


# -- pROC's aSAH data (Turck et al. 2010, Intensive Care Med 36:107), 113 patients --------
# outcome == "Poor" is the positive class (41 of 113); wfns is the ordinal WFNS grade (1-5).
ASAH_POOR = [
    0, 0, 0, 0, 1, 1, 0, 1, 0, 0, 1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 1, 0, 0, 1, 1, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 1, 0,
    0, 0, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1, 0, 0, 0, 1, 1, 0, 1, 0, 0, 0,
    0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0,
    0,
]  # fmt: skip
ASAH_S100B = [
    0.13, 0.14, 0.1, 0.04, 0.13, 0.1, 0.47, 0.16, 0.18, 0.1, 0.12, 0.1, 0.44, 0.71,
    0.04, 0.08, 0.49, 0.04, 0.07, 0.33, 0.09, 0.09, 0.07, 0.11, 0.07, 0.17, 0.07, 0.11,
    0.13, 0.19, 0.05, 0.16, 0.41, 0.14, 0.34, 0.35, 0.48, 0.09, 0.96, 0.25, 0.5, 0.46,
    0.16, 0.07, 0.43, 0.45, 0.11, 0.08, 0.09, 0.86, 0.52, 0.08, 0.06, 0.13, 2.07, 0.1,
    0.14, 0.15, 0.07, 0.06, 0.77, 0.05, 0.09, 0.3, 0.03, 0.09, 0.04, 0.23, 0.7, 0.09,
    0.27, 0.71, 0.08, 0.26, 0.08, 0.16, 0.09, 0.13, 0.1, 0.08, 0.11, 0.33, 0.11, 0.28,
    0.07, 0.1, 0.32, 0.22, 0.07, 0.05, 0.24, 0.38, 0.1, 0.15, 0.08, 0.14, 0.1, 0.07,
    0.04, 0.19, 0.56, 0.14, 0.58, 0.32, 0.82, 0.74, 0.15, 0.47, 0.17, 0.44, 0.15, 0.5,
    0.48,
]  # fmt: skip
ASAH_WFNS = [
    1, 1, 1, 1, 3, 2, 5, 4, 1, 2, 5, 2, 5, 5, 1, 2, 5, 2, 2, 5, 2, 1, 1, 1, 1, 2, 1, 2,
    1, 1, 3, 4, 2, 1, 4, 5, 4, 1, 4, 2, 5, 5, 1, 1, 2, 4, 1, 1, 2, 5, 5, 2, 1, 2, 5, 1,
    2, 2, 2, 1, 5, 1, 1, 2, 5, 2, 1, 4, 5, 2, 4, 4, 1, 4, 1, 2, 1, 4, 2, 1, 2, 3, 2, 4,
    2, 1, 4, 5, 1, 1, 5, 4, 2, 2, 1, 1, 1, 3, 1, 2, 5, 2, 2, 5, 5, 5, 2, 4, 4, 5, 1, 1,
    1,
]  # fmt: skip
ASAH_NDKA = [
    3.01, 8.54, 8.09, 10.42, 17.4, 12.75, 6.0, 13.2, 15.54, 6.01, 15.96, 17.86,
    5.18, 8.9, 13.41, 20.75, 11.6, 16.11, 32.37, 54.82, 32.41, 49.94, 40.34, 9.47,
    6.29, 12.53, 6.54, 6.3, 80.3, 12.8, 9.8, 9.81, 9.85, 18.21, 5.03, 14.04,
    21.93, 8.02, 7.42, 8.38, 6.59, 9.63, 13.12, 7.96, 14.34, 41.43, 7.63, 7.06,
    12.59, 13.56, 3.87, 9.44, 7.66, 12.98, 419.19, 27.19, 22.27, 9.95, 21.22, 11.73,
    10.4, 58.83, 6.39, 11.09, 12.22, 13.67, 17.21, 22.63, 12.9, 9.7, 21.57, 8.23,
    72.57, 15.54, 10.51, 10.6, 14.57, 5.19, 9.63, 4.61, 21.48, 17.3, 12.71, 9.44,
    11.07, 19.46, 10.83, 5.37, 11.97, 7.75, 9.83, 10.55, 28.49, 8.53, 12.57, 12.9,
    46.83, 11.68, 12.67, 9.01, 9.57, 34.06, 11.72, 14.26, 47.61, 11.67, 24.58, 10.33,
    13.87, 15.89, 22.43, 6.79, 13.45,
]  # fmt: skip
# R pROC 1.19.1, method = "delong" (auc(), var(), cov(), roc.test(paired = TRUE)), printed
# with 17 digits. pROC's documentation prints the s100b-vs-wfns test as Z = -2.209,
# p-value = 0.02718, AUCs 0.7314 and 0.8237, and ci.auc(s100b) as 0.6301-0.8326; the
# rounded values are checked too, so a transcription error in either would show.
PROC_AUC = {"s100b": 0.73136856368563685, "wfns": 0.82367886178861793, "ndka": 0.61195799457994582}
PROC_VAR = {"s100b": 0.0026686824571724378, "wfns": 0.0014699147088236264, "ndka": 0.0031908105493913021}
PROC_COV = {("s100b", "wfns"): 0.0011961556737675448, ("s100b", "ndka"): -0.00075616493805657884}
PROC_TEST = {("s100b", "wfns"): (-2.2089835914409077, 0.02717578222918815),
             ("s100b", "ndka"): (1.3907700257355771, 0.16429517522305448)}
ASAH = {"s100b": ASAH_S100B, "wfns": ASAH_WFNS, "ndka": ASAH_NDKA}


def test_asah_data_shape():
    assert len(ASAH_POOR) == 113 and sum(ASAH_POOR) == 41
    assert all(len(v) == 113 for v in ASAH.values())


@pytest.mark.parametrize("pair", list(PROC_TEST))
def test_delong_paired_matches_proc_roc_test_on_asah(pair):
    a, b = pair
    r = stats.delong_paired(ASAH_POOR, ASAH[a], ASAH[b])
    z_ref, p_ref = PROC_TEST[pair]
    assert r.auc_a == pytest.approx(PROC_AUC[a], rel=1e-12)
    assert r.auc_b == pytest.approx(PROC_AUC[b], rel=1e-12)
    assert r.cov[0, 0] == pytest.approx(PROC_VAR[a], rel=1e-9)
    assert r.cov[1, 1] == pytest.approx(PROC_VAR[b], rel=1e-9)
    assert r.cov[0, 1] == pytest.approx(PROC_COV[pair], rel=1e-9)
    assert r.cov[1, 0] == r.cov[0, 1]
    assert abs(r.z - z_ref) < 1e-9
    assert abs(r.p_value - p_ref) < 1e-9
    assert r.log10_p == pytest.approx(math.log10(p_ref), rel=1e-9)
    assert (r.n_pos, r.n_neg) == (41, 72)


def test_proc_documented_example_rounded():
    r = stats.delong_paired(ASAH_POOR, ASAH_S100B, ASAH_WFNS)
    assert round(r.z, 3) == -2.209 and round(r.p_value, 5) == 0.02718
    assert (round(r.auc_a, 4), round(r.auc_b, 4)) == (0.7314, 0.8237)
    ci = stats.delong(ASAH_POOR, ASAH_S100B, method="wald").ci  # pROC's ci.auc
    assert (round(ci[0], 4), round(ci[1], 4)) == (0.6301, 0.8326)


@pytest.mark.parametrize("name", list(ASAH))
def test_delong_single_matches_proc_var_on_asah(name):
    r = stats.delong(ASAH_POOR, ASAH[name])
    assert r.auc == pytest.approx(PROC_AUC[name], rel=1e-12)
    assert r.variance == pytest.approx(PROC_VAR[name], rel=1e-9)
    assert stats.auc(ASAH_POOR, ASAH[name]) == pytest.approx(PROC_AUC[name], rel=1e-12)


# -- AUC ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_auc_matches_pairwise_reference_and_sklearn(kind):
    y, a, b = make_data(kind)
    for s in (a, b):
        ref = ref_components(y, s)[0]
        assert stats.auc(y, s) == pytest.approx(ref, abs=1e-12)
        assert stats.auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auc_is_never_flipped():
    y, a, _ = make_data("continuous")
    assert stats.auc(y, -a) == pytest.approx(1 - stats.auc(y, a), abs=1e-12)
    assert stats.auc(y, -a) < 0.5
    assert stats.delong(y, -a).auc < 0.5
    assert stats.bootstrap_auc(y, -a, n_boot=50).auc < 0.5


def test_auc_accepts_bool_labels_and_pandas():
    y, a, _ = make_data("ties")
    ref = stats.auc(y, a)
    assert stats.auc(y.astype(bool), a) == ref
    assert stats.auc(pd.Series(y.astype(float)), pd.Series(a)) == ref


@pytest.mark.parametrize(
    "y, s, match",
    [
        ([1, 1, 1], [0.1, 0.2, 0.3], "0 negatives"),
        ([0, 0], [0.1, 0.2], "0 positives"),
        ([0, 1, 1], [0.1, 0.2], "3 rows but score has 2"),
        ([0, 1, 1], [0.1, np.nan, 0.3], "NaN"),
        ([0, 1, 2], [0.1, 0.2, 0.3], "0/1"),
        ([0, np.nan, 1], [0.1, 0.2, 0.3], "NaN labels"),
        (["a", "b", "a"], [0.1, 0.2, 0.3], "0/1"),
    ],
)
def test_auc_refuses_bad_input_with_clear_message(y, s, match):
    with pytest.raises(ValueError, match=match):
        stats.auc(y, s)


# -- DeLong ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_delong_variance_matches_structural_components(kind):
    y, a, _ = make_data(kind)
    auc_ref, v10, v01 = ref_components(y, a)
    var_ref = v10.var(ddof=1) / v10.size + v01.var(ddof=1) / v01.size
    r = stats.delong(y, a)
    assert r.auc == pytest.approx(auc_ref, abs=1e-12)
    assert r.variance == pytest.approx(var_ref, rel=1e-10, abs=1e-18)
    assert (r.n_pos, r.n_neg) == (int(np.sum(y)), int(np.size(y) - np.sum(y)))


@pytest.mark.parametrize("kind", KINDS)
def test_delong_paired_matches_pairwise_reference(kind):
    y, a, b = make_data(kind)
    auc_a, auc_b, cov, z, p = ref_paired(y, a, b)
    r = stats.delong_paired(y, a, b)
    assert r.auc_a == pytest.approx(auc_a, abs=1e-12)
    assert r.auc_b == pytest.approx(auc_b, abs=1e-12)
    np.testing.assert_allclose(r.cov, cov, rtol=1e-9, atol=1e-17)
    if kind == "identical":  # variance of the difference 0: the paired-swap p, no z
        assert _is_trivial_swap(r) and p == 1.0
    else:
        assert r.z == pytest.approx(z, rel=1e-9, abs=1e-12)
    assert r.p_value == pytest.approx(p, rel=1e-9, abs=1e-300)


def _is_trivial_swap(r):
    """Variance of the difference 0 and difference 0: the paired-swap p, 1, named as such (no Wald z)."""
    return (r.method == "paired_swap" and math.isnan(r.z) and (r.p_value, r.log10_p) == (1.0, 0.0)
            and all(math.isnan(c) for c in r.ci) and "p is 1" in r.note)


def test_identical_predictors_give_p1_from_the_paired_swap():
    # before: labelled "delong" with z = 0, though no DeLong statistic exists with variance 0
    y, a, _ = make_data("continuous")
    assert _is_trivial_swap(stats.delong_paired(y, a, a.copy()))
    # a monotone transform ranks identically: still the same ROC curve
    assert _is_trivial_swap(stats.delong_paired(y, a, np.exp(a)))


def test_both_perfect_gives_p1_and_a_score_interval_that_does_not_collapse():
    y, a, _ = make_data("perfect")
    r = stats.delong_paired(y, a, a * 2 + 1)
    assert r.auc_a == r.auc_b == 1.0 and _is_trivial_swap(r)
    d = stats.delong(y, a)
    m, n = d.n_pos, d.n_neg
    assert d.variance == 0.0 and d.method == "score" and d.ci[1] == 1.0 and d.ci[0] < 1.0
    # the lower limit solves 1 - x = z sqrt(V(x)), V Newcombe's (2006) method-5 variance
    x, k = d.ci[0], (m + n) / 2 - 1
    v = x * (1 - x) * (2 + k + (1 + 2 * k) * x * (1 - x)) / ((2 - x) * (1 + x) * m * n)
    assert 1 - x == pytest.approx(norm.ppf(0.975) * math.sqrt(v), rel=1e-12)


def test_extreme_z_does_not_underflow():
    rng = np.random.default_rng(3)
    n = 40_000
    y = (rng.random(n) < 0.5).astype(int)
    a = y * 3.0 + rng.normal(size=n)  # AUC ~ 0.98
    b = rng.normal(size=n)  # AUC ~ 0.5
    r = stats.delong_paired(y, a, b)
    assert r.z > 40
    expected = (math.log(2) + norm.logsf(r.z)) / math.log(10)
    assert math.isfinite(r.log10_p) and r.log10_p == pytest.approx(expected, rel=1e-12)
    assert r.log10_p < -300
    assert r.p_value == pytest.approx(2 * norm.sf(r.z), abs=1e-300)
    # and for z = -40 by swapping the arguments
    s = stats.delong_paired(y, b, a)
    assert s.z == pytest.approx(-r.z) and s.log10_p == pytest.approx(r.log10_p)


def test_delong_ci_methods():
    y, a, _ = make_data("continuous")
    w = stats.delong(y, a, "wald")
    lg = stats.delong(y, a, method="logit")
    half = norm.ppf(0.975) * math.sqrt(w.variance)
    assert w.ci == pytest.approx((w.auc - half, w.auc + half), rel=1e-12)
    lo, hi = lg.ci
    assert 0 < lo < lg.auc < hi < 1
    logit = math.log(lg.auc / (1 - lg.auc))
    # symmetric on the logit scale
    assert math.log(hi / (1 - hi)) - logit == pytest.approx(logit - math.log(lo / (1 - lo)), rel=1e-9)
    # Wald is clipped at 1 for a near-perfect, small sample
    rng = np.random.default_rng(0)
    yy = np.array([0] * 6 + [1] * 6)
    ss = np.r_[rng.normal(size=6), rng.normal(size=6) + 2.5]
    hi_w = stats.delong(yy, ss).ci[1]
    assert hi_w <= 1.0
    with pytest.raises(ValueError, match="method"):
        stats.delong(y, a, method="exact")


def test_delong_needs_two_per_class():
    with pytest.raises(ValueError, match="at least 2"):
        stats.delong([0, 0, 1], [0.1, 0.2, 0.3])


# -- properties (hypothesis) -----------------------------------------------------------------
labels_and_scores = st.integers(min_value=4, max_value=40).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 1), min_size=n, max_size=n).filter(lambda v: 2 <= sum(v) <= len(v) - 2),
        st.lists(st.integers(-3, 3), min_size=n, max_size=n),  # few values: many ties
        st.lists(st.floats(-5, 5, allow_nan=False), min_size=n, max_size=n),
    )
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(labels_and_scores)
def test_property_matches_reference(data):
    y, a, b = (np.asarray(v) for v in data)
    a = a.astype(float)
    auc_a, auc_b, cov, z, _ = ref_paired(y, a, b)
    r = stats.delong_paired(y, a, b)
    assert r.auc_a == pytest.approx(auc_a, abs=1e-12) and r.auc_b == pytest.approx(auc_b, abs=1e-12)
    np.testing.assert_allclose(r.cov, cov, rtol=1e-9, atol=1e-14)
    if math.isinf(z):  # variance 0, difference not: no Wald z; an exact paired-swap p instead
        assert math.isnan(r.z) and r.method == "paired_swap" and 0.0 < r.p_value <= 1.0
    elif r.method == "paired_swap":  # variance 0 and difference 0 (R's 0/0 -> z = 0): p = 1, named as such
        assert z == 0.0 and r.delta == 0.0 and _is_trivial_swap(r)
    else:
        assert r.z == pytest.approx(z, rel=1e-7, abs=1e-7)
    assert 0.0 <= r.p_value <= 1.0
    # swapping the arguments flips the sign only
    s = stats.delong_paired(y, b, a)
    if math.isfinite(r.z):
        assert s.z == pytest.approx(-r.z, abs=1e-12)
    assert s.p_value == pytest.approx(r.p_value, abs=1e-12)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(labels_and_scores)
def test_property_auc_symmetry_and_invariance(data):
    y, a, _ = (np.asarray(v) for v in data)
    a = a.astype(float)
    v = stats.auc(y, a)
    assert 0.0 <= v <= 1.0
    assert stats.auc(y, -a) == pytest.approx(1.0 - v, abs=1e-12)
    assert stats.auc(1 - y, a) == pytest.approx(1.0 - v, abs=1e-12)
    assert stats.auc(y, 3.0 * a + 7.0) == v  # strictly increasing maps keep the ranks


def _brute_rank_swap_p(y, a, b):
    """Exact paired-swap p over all 2^n patterns of the two scores' normalised midranks (sklearn AUCs)."""
    import itertools

    from scipy.stats import rankdata

    ra, rb = rankdata(a) / len(a), rankdata(b) / len(b)
    d0 = abs(roc_auc_score(y, ra) - roc_auc_score(y, rb))
    hits = 0
    for swap in itertools.product([False, True], repeat=len(y)):
        sw = np.array(swap)
        hits += abs(roc_auc_score(y, np.where(sw, rb, ra)) - roc_auc_score(y, np.where(sw, ra, rb))) >= d0 - 1e-12
    return hits / 2 ** len(y)


def test_nonzero_difference_with_zero_variance_gets_the_exact_paired_swap_p():
    # a separates perfectly (AUC 1), b is constant (AUC 0.5): both variances are 0. The old
    # code returned z = inf, p = 0. Swapping the two scores' ranks within rows: only the
    # observed and the fully swapped pattern reach |difference| 0.5, so p = 2/64.
    y = np.array([0, 0, 0, 1, 1, 1])
    r = stats.delong_paired(y, [0, 1, 2, 3, 4, 5], np.zeros(6))
    assert r.method == "paired_swap" and r.p_value == pytest.approx(2 / 64, abs=1e-15)
    assert r.log10_p == pytest.approx(math.log10(2 / 64)) and math.isnan(r.z)
    assert all(math.isnan(c) for c in r.ci) and "64 swap patterns" in r.note
    assert _brute_rank_swap_p(y, np.arange(6.0), np.zeros(6)) == 2 / 64


def test_paired_swap_p_does_not_depend_on_the_scores_scales():
    # before: swapping raw scores gave 0.25 for b = 0, 0.031 for b = 2.5 and 0.34 for b = 100
    # (and the same spread for exp(a) or a - 2.5), though the AUCs are the same throughout
    y = np.array([0, 0, 0, 1, 1, 1])
    a = np.arange(6.0)
    ps = set()
    for aa in (a, 10 * a, a - 2.5, np.exp(a)):
        for c in (0.0, 2.5, 5.0, 100.0, -100.0):
            r = stats.delong_paired(y, aa, np.full(6, c))
            assert r.method == "paired_swap"
            ps.add(r.p_value)
    assert ps == {2 / 64}
    # a perfect score against a reversed one (AUC 1 vs 0, both variances 0) on 4 + 4 rows:
    # the p is brute force's over the 256 rank-swap patterns and survives monotone maps
    rng = np.random.default_rng(4)
    y = np.array([0, 1, 0, 1, 0, 1, 1, 0])
    a = np.where(y == 1, 10.0, 0.0) + rng.random(8)
    b = np.where(y == 1, 0.0, 10.0) + rng.random(8)
    r = stats.delong_paired(y, a, b)
    assert r.method == "paired_swap" and (r.auc_a, r.auc_b) == (1.0, 0.0)
    assert r.p_value == pytest.approx(_brute_rank_swap_p(y, a, b), abs=1e-12) and r.p_value < 0.1
    assert stats.delong_paired(y, np.exp(a), 3 * b - 7).p_value == r.p_value


# -- bootstrap -------------------------------------------------------------------------------
def ref_weighted_auc(y, s, w):
    """AUC of a weighted sample (weight = times a row was drawn), over all pairs."""
    y = np.asarray(y).astype(bool)
    x, z = s[y], s[~y]
    wx, wz = w[y], w[~y]
    psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
    return float(wx @ psi @ wz / (wx.sum() * wz.sum()))


@pytest.mark.parametrize("kind", ["continuous", "ties", "imbalanced", "perfect"])
def test_weighted_ranker_matches_pairwise(kind):
    y, a, _ = make_data(kind, seed=5)
    rng = np.random.default_rng(1)
    w = rng.poisson(1.0, y.size).astype(float)
    yb = y.astype(bool)
    rk = stats._Ranker(a[yb], a[~yb])
    got = (w[~yb] * rk.above(w[yb])[rk.key]).sum() / (w[yb].sum() * w[~yb].sum())
    assert got == pytest.approx(ref_weighted_auc(y, a, w), abs=1e-12)


@pytest.mark.parametrize("prevalence", [0.3, 0.8])  # 0.8 exercises the class swap
def test_each_stratified_replicate_is_the_auc_of_a_stratified_resample(prevalence):
    rng = np.random.default_rng(2)
    n = 150
    y = (rng.random(n) < prevalence).astype(int)
    s = np.round(y + rng.normal(size=n), 1)
    res = stats.bootstrap_auc(y, s, n_boot=stats._CHUNK, seed=11, n_jobs=1)
    # Redraw with the generator the first chunk used, in the order the code draws:
    # the smaller class first (as counts), then the larger class.
    gen = np.random.default_rng(np.random.SeedSequence(11).spawn(1)[0])
    small, large = (1, 0) if y.sum() <= n - y.sum() else (0, 1)
    idx_small, idx_large = np.flatnonzero(y == small), np.flatnonzero(y == large)
    for r in range(stats._CHUNK):
        pick_small = idx_small[gen.integers(0, idx_small.size, idx_small.size, dtype=np.int32)]
        pick_large = idx_large[gen.integers(0, idx_large.size, idx_large.size, dtype=np.int32)]
        rows = np.r_[pick_small, pick_large]
        assert res.replicates[r] == pytest.approx(ref_components(y[rows], s[rows])[0], abs=1e-12)


def test_bootstrap_is_reproducible_and_independent_of_threads():
    y, a, b = make_data("ties", seed=3)
    r1 = stats.bootstrap_auc(y, a, b, n_boot=300, seed=7, n_jobs=1)
    r3 = stats.bootstrap_auc(y, a, b, n_boot=300, seed=7, n_jobs=3)
    np.testing.assert_array_equal(r1.replicates, r3.replicates)
    assert r1 == r3
    r_other = stats.bootstrap_auc(y, a, b, n_boot=300, seed=8, n_jobs=1)
    assert not np.array_equal(r1.replicates, r_other.replicates)
    # the paired run scores score_a on exactly the replicates of the single-score run
    single = stats.bootstrap_auc(y, a, n_boot=300, seed=7)
    np.testing.assert_array_equal(single.replicates, r1.replicates[:, 0])
    assert r1.difference == pytest.approx(r1.auc - r1.auc_b)
    assert r1.replicates.shape == (300, 2)


def test_bootstrap_spread_agrees_with_delong_se():
    y, a, _ = make_data("imbalanced", seed=4)
    res = stats.bootstrap_auc(y, a, n_boot=2000, seed=0)
    se = math.sqrt(stats.delong(y, a).variance)
    assert np.std(res.replicates, ddof=1) == pytest.approx(se, rel=0.12)
    assert res.ci_low < res.auc < res.ci_high
    assert res.replicates.mean() == pytest.approx(res.auc, abs=0.2 * se)


def test_bootstrap_perfect_separation_and_identical_scores():
    y, a, _ = make_data("perfect")
    score = stats.delong(y, a)
    for method in ("percentile", "bca"):
        r = stats.bootstrap_auc(y, a, a + 1.0, n_boot=200, method=method)
        # every replicate is 1, so the percentile interval would be [1, 1]: delong's score interval instead
        assert (r.method, r.method_b) == ("score", "score") and "score interval" in r.note
        assert (r.ci_low, r.ci_high) == score.ci and (r.ci_low_b, r.ci_high_b) == score.ci and r.ci_low < 1.0
        # identical rankings: every replicate difference is 0, and there is no interval (as in
        # delong_paired), not the zero-width (0, 0) it used to be
        assert r.diff_method == "none" and math.isnan(r.diff_ci_low) and math.isnan(r.diff_ci_high)
        assert _is_trivial_swap(stats.delong_paired(y, a, a + 1.0))


def test_bootstrap_names_each_scores_interval():
    # before: method "percentile" although score b's interval was the boundary one
    y, a, b = make_data("perfect")
    r = stats.bootstrap_auc(y, b, a, n_boot=200)
    assert (r.method, r.method_b, r.diff_method) == ("percentile", "score", "percentile")
    assert (r.ci_low_b, r.ci_high_b) == stats.delong(y, a).ci and r.diff_ci_low < r.diff_ci_high
    # every pair tied: every replicate is 0.5, so its interval is the score one too, never (0.5, 0.5)
    c = stats.bootstrap_auc(y, np.full(y.size, 0.3), n_boot=100)
    assert c.method == "score" and c.ci == stats.delong(y, np.full(y.size, 0.3)).ci and c.ci_low < 0.5 < c.ci_high


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_bootstrap_ci_coverage(method):
    """Coverage of the true AUC in repeated binormal samples (true AUC = Phi(d / sqrt 2))."""
    d, true_auc, hits, sims = 1.2, norm.cdf(1.2 / math.sqrt(2)), 0, 200
    rng = np.random.default_rng(123)
    for i in range(sims):
        y = np.r_[np.zeros(90, int), np.ones(40, int)]
        s = rng.normal(size=130) + d * y
        r = stats.bootstrap_auc(y, s, n_boot=400, method=method, seed=i, n_jobs=1)
        hits += r.ci_low <= true_auc <= r.ci_high
    assert 0.89 <= hits / sims <= 0.99


def test_jackknife_closed_form_matches_refitting():
    y, a, _ = make_data("ties", seed=6)
    y, a = y[:80], a[:80]
    theta, v10, v01 = ref_components(y, a)
    jack = stats._jackknife(v10, v01, theta)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    brute = [ref_components(np.delete(y, i), np.delete(a, i))[0] for i in np.r_[pos, neg]]
    np.testing.assert_allclose(jack, brute, atol=1e-12)


def test_cluster_jackknife_closed_form_matches_refitting():
    rng = np.random.default_rng(9)
    n = 90
    groups = rng.integers(0, 25, n)
    y = (rng.random(n) < 0.4).astype(int)
    a = np.round(y + rng.normal(size=n), 1)
    codes = np.unique(groups, return_inverse=True)[1]
    theta, v10, v01 = ref_components(y, a)
    yb = y.astype(bool)
    jack = stats._cluster_jackknife(a[yb], a[~yb], codes[yb], codes[~yb], codes.max() + 1, v10, v01, theta)
    brute = []
    for c in range(codes.max() + 1):
        keep = codes != c
        if 0 < y[keep].sum() < keep.sum():
            brute.append(ref_components(y[keep], a[keep])[0])
    np.testing.assert_allclose(jack, brute, atol=1e-12)


def test_bca_reduces_to_percentile_without_bias_or_skew():
    theta = 0.7
    d = np.linspace(0.001, 0.1, 500)
    reps = theta + np.r_[d, -d]
    jack = theta + np.r_[d[:50], -d[:50]]
    assert stats._bca_interval(theta, reps, jack, 0.05) == pytest.approx(
        stats._percentile_interval(reps, 0.05), abs=1e-12
    )


def test_bca_bias_correction_moves_the_interval_towards_theta():
    # 70% of replicates above theta: the bootstrap overshoots, so BCa moves both limits down.
    theta = 0.8
    reps = theta + np.random.default_rng(0).normal(0.01, 0.02, 4000)
    jack = np.full(10, theta)  # no acceleration
    lo, hi = stats._bca_interval(theta, reps, jack, 0.05)
    p_lo, p_hi = stats._percentile_interval(reps, 0.05)
    assert lo < p_lo and hi < p_hi
    z0 = norm.ppf(np.mean(reps < theta))
    assert lo == pytest.approx(np.quantile(reps, norm.cdf(2 * z0 + norm.ppf(0.025))), abs=1e-12)


def test_cluster_bootstrap_does_not_count_repeat_images_as_new_patients():
    rng = np.random.default_rng(10)
    n = 300
    y = (rng.random(n) < 0.4).astype(int)
    s = y * 0.8 + rng.normal(size=n)
    y3, s3, pid = np.repeat(y, 3), np.repeat(s, 3), np.repeat(np.arange(n), 3)
    width = lambda r: r.ci_high - r.ci_low  # noqa: E731
    once = stats.bootstrap_auc(y, s, n_boot=1500, seed=1)
    naive = stats.bootstrap_auc(y3, s3, n_boot=1500, seed=1)
    grouped = stats.bootstrap_auc(y3, s3, n_boot=1500, seed=1, groups=pid)
    assert grouped.n_groups == n
    assert width(grouped) == pytest.approx(width(once), rel=0.15)
    assert width(naive) < 0.75 * width(once)  # triplicates fake a sqrt(3)-times larger sample
    bca = stats.bootstrap_auc(y3, s3, n_boot=1500, seed=1, groups=pid, method="bca")
    assert bca.ci_low < bca.auc < bca.ci_high


def test_cluster_bootstrap_with_mixed_patients():
    rng = np.random.default_rng(12)
    pid = rng.integers(0, 60, 400)
    y = (rng.random(400) < 0.3).astype(int)
    a = y + rng.normal(size=400)
    b = 0.5 * a + rng.normal(size=400)
    for method in ("percentile", "bca"):
        r = stats.bootstrap_auc(y, a, b, groups=pid, n_boot=500, method=method)
        assert r.ci_low < r.auc < r.ci_high and r.ci_low_b < r.auc_b < r.ci_high_b
        assert r.diff_ci_low < r.difference < r.diff_ci_high


def test_bootstrap_refuses_bad_arguments():
    y, a, _ = make_data("continuous")
    with pytest.raises(ValueError, match="method"):
        stats.bootstrap_auc(y, a, method="basic")
    with pytest.raises(ValueError, match="n_boot"):
        stats.bootstrap_auc(y, a, n_boot=0)
    with pytest.raises(ValueError, match="groups has 3 rows"):
        stats.bootstrap_auc(y, a, groups=[1, 2, 3])
    with pytest.raises(ValueError, match="score_b"):
        stats.bootstrap_auc(y, a, a[:-1])


# -- multiplicity ----------------------------------------------------------------------------
def test_fdr_bh_known_values_and_nan():
    p = [0.01, 0.04, 0.03, 0.2]
    np.testing.assert_allclose(stats.fdr_bh(p), [0.04, 0.16 / 3, 0.16 / 3, 0.2])
    out = stats.fdr_bh([0.01, np.nan, 0.04])
    assert np.isnan(out[1]) and out[0] == pytest.approx(0.02) and out[2] == pytest.approx(0.04)
    assert stats.fdr_bh([]).shape == (0,)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        stats.fdr_bh([0.5, 1.5])


# -- tidy tables -----------------------------------------------------------------------------
def _panel(seed=0):
    """A small long frame: two encoders x two perturbation cells, three pooling modes."""
    rng = np.random.default_rng(seed)
    frames = []
    for enc in ("enc_a", "enc_b"):
        for cell in ("blur_small", "blur_large"):
            n = 160
            y = (rng.random(n) < 0.35).astype(int)
            base = rng.normal(size=n)
            frames.append(pd.DataFrame({
                "encoder": enc, "cell": cell, "label": y, "patient_id": rng.integers(0, 60, n),
                "cls": base + 0.1 * y,
                "patch_mean": base + 0.4 * y + 0.3 * rng.normal(size=n),
                "roi_local": base + 1.5 * y + 0.3 * rng.normal(size=n),
            }))
    return pd.concat(frames, ignore_index=True)


def test_auc_table_rows_values_and_stable_seeds():
    df = _panel()
    pools = ["cls", "patch_mean", "roi_local"]
    tab = stats.auc_table(df, pools, "label", by=["encoder", "cell"], n_boot=200, score_name="pooling")
    assert list(tab.columns[:3]) == ["encoder", "cell", "pooling"]
    assert {"auc", "ci_low", "ci_high", "n_pos", "n_neg"} <= set(tab.columns)
    assert len(tab) == 12
    for row in tab.itertuples():
        part = df[(df.encoder == row.encoder) & (df.cell == row.cell)]
        assert row.auc == stats.auc(part.label, part[row.pooling])
        assert row.ci_low <= row.auc <= row.ci_high
        assert row.n_pos == part.label.sum() and row.n_neg == (part.label == 0).sum()
    # a stratum's interval does not depend on which other strata are in the frame
    alone = stats.auc_table(df[df.encoder == "enc_b"], pools, "label", by=["encoder", "cell"], n_boot=200,
                            score_name="pooling")
    merged = tab[tab.encoder == "enc_b"].reset_index(drop=True)
    pd.testing.assert_frame_equal(alone, merged)
    grouped = stats.auc_table(df, "roi_local", "label", by="encoder", n_boot=100, group_col="patient_id")
    assert len(grouped) == 2 and grouped["score"].eq("roi_local").all()
    dl = stats.auc_table(df, pools, "label", method="delong")
    assert (dl.n_boot == 0).all() and len(dl) == 3


def test_auc_table_names_the_failing_stratum():
    df = _panel()
    df.loc[(df.encoder == "enc_a") & (df.cell == "blur_large"), "label"] = 0
    with pytest.raises(ValueError, match="encoder=enc_a, cell=blur_large"):
        stats.auc_table(df, ["cls"], "label", by=["encoder", "cell"], n_boot=50)
    with pytest.raises(KeyError, match="missing_col"):
        stats.auc_table(df, ["missing_col"], "label")
    df2 = _panel()
    df2.loc[::7, "roi_local"] = np.nan  # e.g. images without a box
    with pytest.raises(ValueError, match="NaN"):
        stats.auc_table(df2, ["roi_local"], "label", n_boot=50)
    tab = stats.auc_table(df2, ["roi_local"], "label", n_boot=50, dropna=True)
    assert tab.n_pos.iloc[0] + tab.n_neg.iloc[0] == df2.roi_local.notna().sum()


def test_compare_table_paired_delong_and_bh_families():
    df = _panel()
    tab = stats.compare_table(df, ["cls", "patch_mean", "roi_local"], "label", by=["encoder", "cell"])
    assert len(tab) == 8
    assert set(zip(tab.a, tab.b)) == {("patch_mean", "cls"), ("roi_local", "cls")}
    for c in ("a", "b", "auc_a", "auc_b", "delta", "z", "p_value", "p_adj"):
        assert c in tab.columns
    for row in tab.itertuples():
        part = df[(df.encoder == row.encoder) & (df.cell == row.cell)]
        r = stats.delong_paired(part.label, part[row.a], part[row.b])
        assert (row.z, row.p_value, row.delta) == (r.z, r.p_value, r.auc_a - r.auc_b)
    np.testing.assert_allclose(tab.p_adj, stats.fdr_bh(tab.p_value))
    assert (tab.family == "all").all()
    fam = stats.compare_table(df, ["cls", "patch_mean", "roi_local"], "label", by=["encoder", "cell"],
                              family=["encoder"])
    for enc, part in fam.groupby("encoder"):
        np.testing.assert_allclose(part.p_adj, stats.fdr_bh(part.p_value))
    assert not np.allclose(fam.p_adj, tab.p_adj)
    explicit = stats.compare_table(df, ["cls", "roi_local"], "label", pairs=[("roi_local", "patch_mean")])
    assert list(explicit[["a", "b"]].iloc[0]) == ["roi_local", "patch_mean"]
    with pytest.raises(ValueError, match="family"):
        stats.compare_table(df, ["cls", "roi_local"], "label", by=["encoder"], family=["cell"])


# -- permutation floor -----------------------------------------------------------------------
def test_permutation_floor_between_patients():
    rng = np.random.default_rng(0)
    n_pat = 80
    pid = np.repeat(np.arange(n_pat), 2)
    y_pat = (rng.random(n_pat) < 0.4).astype(int)
    y = y_pat[pid]
    X = rng.normal(size=(pid.size, 8)).astype(np.float32)
    X[:, 0] += 1.5 * y
    res = stats.permutation_floor(X, y, pid, probe=LinearProbe(Cs=(1.0,)), n_permutations=25, permute="between")
    assert res.observed_auc > 0.65  # the oracle feature alone reaches 0.81 here
    assert abs(res.null_mean - 0.5) < 0.1 and res.floor < res.observed_auc
    assert res.p_value == pytest.approx(1 / 26)
    assert res.null.shape == (25,)
    row = res.to_frame()
    assert list(row.columns[:3]) == ["observed_auc", "null_mean", "null_sd"] and len(row) == 1
    with pytest.raises(ValueError, match="permute='between'"):
        stats.permutation_floor(X, y, pid, n_permutations=2)  # 'within' is a no-op here


def test_permutation_floor_within_source_images():
    # clean (0) and perturbed (1) copy of each source image; a chance-level feature
    rng = np.random.default_rng(1)
    n_src = 60
    src = np.repeat(np.arange(n_src), 2)
    y = np.tile([0, 1], n_src)
    X = rng.normal(size=(src.size, 6)).astype(np.float32)
    res = stats.permutation_floor(X, y, src, probe=LinearProbe(Cs=(1.0,)), n_permutations=15, seed=3)
    assert res.permute == "within"
    assert 0.3 < res.null_mean < 0.7 and res.p_value > 0.05
    with pytest.raises(ValueError, match="permute='within'"):
        stats.permutation_floor(X, y, src, n_permutations=2, permute="between")


# -- patient clusters: clustered DeLong and clustered paired comparisons ---------------------
def _clustered(seed=0, n_pat=300):
    """Patients with 1-4 images each, a patient-level label and a shared patient effect."""
    rng = np.random.default_rng(seed)
    k = rng.integers(1, 5, n_pat)
    g = np.repeat(np.arange(n_pat), k)
    y = (rng.random(n_pat) < 0.3)[g].astype(int)
    # a few mixed patients: one image of a positive patient is negative
    first = np.r_[0, np.cumsum(k)[:-1]]
    flip = first[(k > 1) & (rng.random(n_pat) < 0.2)]
    y[flip] = 1 - y[flip]
    patient = rng.normal(size=n_pat)[g]
    a = 0.8 * y + patient + 0.5 * rng.normal(size=g.shape[0])
    # b has its own patient effect, so the paired difference is correlated within patients too
    b = 0.5 * y + rng.normal(size=n_pat)[g] + 0.5 * rng.normal(size=g.shape[0])
    return y, a, b, g


def _obuchowski_naive(y, s, g):
    """Obuchowski 1997 eqs. written out with the O(M N) kernel matrix (independent of the library).

    S10 is scaled by I10 / (I10 - 1) and S01 by I01 / (I01 - 1), I10 and I01 the clusters with a
    positive and with a negative unit; only S11 takes I / (I - 1). (This reference used I / (I - 1)
    for all three, which understated the variance when positive patients are few.)
    """
    y = np.asarray(y).astype(bool)
    X, Y = s[y], s[~y]
    psi = (X[:, None] > Y[None, :]) + 0.5 * (X[:, None] == Y[None, :])
    M, N = X.shape[0], Y.shape[0]
    theta = psi.mean()
    vx, vy = psi.mean(1), psi.mean(0)  # V10 per positive, V01 per negative
    clusters = np.unique(g)
    I = clusters.shape[0]
    VX = np.array([vx[g[y] == c].sum() for c in clusters])
    VY = np.array([vy[g[~y] == c].sum() for c in clusters])
    mi = np.array([(g[y] == c).sum() for c in clusters])
    ni = np.array([(g[~y] == c).sum() for c in clusters])
    I10, I01 = (mi > 0).sum(), (ni > 0).sum()
    S10 = I10 / ((I10 - 1) * M) * ((VX - mi * theta) ** 2).sum()
    S01 = I01 / ((I01 - 1) * N) * ((VY - ni * theta) ** 2).sum()
    S11 = I / (I - 1) * ((VX - mi * theta) * (VY - ni * theta)).sum()
    return theta, S10 / M + S01 / N + 2 * S11 / (M * N)


def test_clustered_delong_matches_obuchowski_formula():
    y, a, _, g = _clustered(1, n_pat=120)
    a = np.round(a, 1)  # ties
    r = stats.delong(y, a, groups=g)
    theta, var = _obuchowski_naive(y, a, g)
    assert r.auc == pytest.approx(theta, abs=1e-12) and r.variance == pytest.approx(var, rel=1e-10)
    # one image per patient: I10 = m and I01 = n, so the variance is DeLong's exactly
    rng = np.random.default_rng(2)
    y1 = (rng.random(400) < 0.3).astype(int)
    s1 = y1 + rng.normal(size=400)
    ratio = stats.delong(y1, s1, groups=np.arange(400)).variance / stats.delong(y1, s1).variance
    assert ratio == pytest.approx(1.0, rel=1e-12)


def test_clustered_delong_agrees_with_the_cluster_bootstrap():
    y, a, _, g = _clustered(3, n_pat=400)
    se_cluster = math.sqrt(stats.delong(y, a, groups=g).variance)
    se_iid = math.sqrt(stats.delong(y, a).variance)
    boot = stats.bootstrap_auc(y, a, groups=g, n_boot=4000, seed=5).replicates.std(ddof=1)
    assert se_cluster == pytest.approx(boot, rel=0.08)
    assert se_cluster > 1.15 * se_iid  # the patient effect is real: ignoring it understates the SE


def test_auc_table_delong_uses_the_patient_groups():
    # /tmp/rev/tab.py: method="delong" silently ignored group_col
    y, a, b, g = _clustered(4, n_pat=150)
    df = pd.DataFrame({"label": y, "cls": a, "pid": g})
    tab = stats.auc_table(df, ["cls"], "label", method="delong", group_col="pid")
    ref = stats.delong(y, a, groups=g)
    assert (tab.ci_low.iloc[0], tab.ci_high.iloc[0]) == pytest.approx(ref.ci, abs=1e-12)
    plain = stats.auc_table(df, ["cls"], "label", method="delong")
    assert tab.ci_high.iloc[0] - tab.ci_low.iloc[0] > plain.ci_high.iloc[0] - plain.ci_low.iloc[0]


def test_compare_table_clustered_delong_with_patient_groups():
    y, a, b, g = _clustered(5, n_pat=200)
    df = pd.DataFrame({"label": y, "patch_mean": a, "cls": b, "pid": g})
    tab = stats.compare_table(df, ["cls", "patch_mean"], "label", group_col="pid")
    row = tab.iloc[0]
    assert row.method == "delong_clustered" and row.n_groups == 200
    ref = stats.delong_paired(y, a, b, groups=g)
    assert (row.ci_low, row.ci_high) == pytest.approx(ref.ci, abs=1e-15)
    assert (row.delta, row.se, row.z, row.p_value, row.df) == pytest.approx((ref.delta, ref.se_delta, ref.z, ref.p_value, ref.df))
    # one procedure: the CI is delta +/- t_{df} * se, the p the same t's tail
    q = t_dist.ppf(0.975, row.df)
    assert (row.ci_low, row.ci_high) == pytest.approx((row.delta - q * row.se, row.delta + q * row.se), rel=1e-12)
    assert row.p_value == pytest.approx(2 * t_dist.sf(abs(row.z), row.df), rel=1e-12)
    assert row.log10_p == pytest.approx(math.log10(row.p_value))
    # the clustered SE is larger than DeLong's, which treats every image as its own patient
    plain = stats.compare_table(df, ["cls", "patch_mean"], "label").iloc[0]
    assert plain.method == "delong" and row.se > 1.1 * plain.se and row.delta == pytest.approx(plain.delta)


def test_compare_table_one_image_per_patient_stays_delong_and_tiny_p_is_printable():
    rng = np.random.default_rng(6)
    y = np.r_[np.ones(3000), np.zeros(3000)].astype(int)
    df = pd.DataFrame({"label": y, "roi_local": y + 0.2 * rng.normal(size=6000), "cls": rng.normal(size=6000),
                       "pid": np.arange(6000)})
    tab = stats.compare_table(df, ["cls", "roi_local"], "label", group_col="pid")
    ref = stats.delong_paired(y, df.roi_local, df.cls)
    row = tab.iloc[0]
    assert row.method == "delong" and math.isinf(row.df)
    assert (row.z, row.p_value, row.log10_p) == (ref.z, ref.p_value, ref.log10_p)
    assert row.p_value == 0.0 and np.isfinite(row.log10_p) and row.log10_p < -300
    assert stats.format_p(row.p_value) == "< 1e-16"  # what the book prints, not 1e-300
    assert row.ci_low == pytest.approx(ref.delta - 1.959963984540054 * ref.se_delta)


def test_cluster_bootstrap_does_not_overweight_within_patient_pairs():
    # Paired design: each patient one negative and one positive that scores a hair higher.
    # Between-patient pairs are a coin toss, within-patient pairs always won. Counting the
    # pairs between two copies of a patient drawn twice would double the within-patient share
    # and shift every replicate up by about (1/n) * 0.5, pushing the percentile CI off the estimate.
    rng = np.random.default_rng(1)
    outside = 0
    for t in range(40):
        n = 48
        g = np.repeat(np.arange(n), 2)
        y = np.tile([0, 1], n)
        s = np.repeat(rng.normal(size=n), 2) + np.tile([0.0, 0.01], n)
        b = stats.bootstrap_auc(y, s, n_boot=400, groups=g, seed=t)
        outside += not (b.ci_low <= b.auc <= b.ci_high)
        centre = 0.5 * (b.ci_low + b.ci_high)
        assert abs(centre - b.auc) < 0.5 * (b.ci_high - b.ci_low) + 1e-3
    assert outside == 0


def test_stratum_gap_matches_the_two_aucs_and_its_joint_bootstrap_covers_the_null():
    rng = np.random.default_rng(5)
    y = np.r_[np.zeros(80, int), np.ones(20, int)]
    s = rng.normal(size=100)
    st = np.r_[["none"] * 80, ["small"] * 10, ["large"] * 10]
    g = stats.bootstrap_auc_gap(y, s, st, n_boot=300, seed=1)
    keep_l, keep_s = (y == 0) | (st == "large"), (y == 0) | (st == "small")
    # the gap is auc_a - auc_b with no flipping: compare with sklearn directly
    from sklearn.metrics import roc_auc_score

    assert g.auc_a == pytest.approx(roc_auc_score(y[keep_l], s[keep_l]))
    assert g.auc_b == pytest.approx(roc_auc_score(y[keep_s], s[keep_s]))
    assert g.gap == pytest.approx(g.auc_a - g.auc_b)
    # null coverage of the 95% interval, equal strata (the case two same-seeded bootstraps got wrong)
    hits = 0
    for t in range(120):
        s = rng.normal(size=100)
        r = stats.bootstrap_auc_gap(y, s, st, n_boot=300, seed=t)
        hits += r.ci_low <= 0 <= r.ci_high
    assert hits / 120 >= 0.88
    with pytest.raises(ValueError, match="stratum 'large'"):
        stats.bootstrap_auc_gap(y, s, np.r_[["none"] * 80, ["small"] * 20])


def _gap_patients(rng, n_pat=60, k=3, u_sd=1.5):
    """60 patients x 3 images, 40% positive patients, each a 'small' or 'large' one; equal strata (gap 0)."""
    g = np.repeat(np.arange(n_pat), k)
    pos = rng.random(n_pat) < 0.4
    st_p = np.where(rng.random(n_pat) < 0.5, "small", "large")
    y = pos[g].astype(int)
    st = np.where(y == 1, st_p[g], "none")
    return y, 1.0 * y + u_sd * rng.normal(size=n_pat)[g] + rng.normal(size=g.size), st, g


@pytest.mark.filterwarnings("ignore::cxrcore.stats.FewClustersWarning")
def test_stratum_gap_replicates_are_joint_patient_resamples():
    # replicate 0 by hand: the same stratified draw of patients (with a large positive, with
    # small positives only, negative only), both AUCs on it, pairs between copies of one
    # patient dropped; this is bootstrap_auc's cluster machinery, given masks per stratum
    rng = np.random.default_rng(8)
    y, s, st, g = _gap_patients(rng)
    r = stats.bootstrap_auc_gap(y, s, st, n_boot=1, seed=4, groups=g)
    assert r.method == "cluster_percentile" and r.n_groups == 60
    draw = np.random.default_rng(np.random.SeedSequence(4).spawn(1)[0])
    pats = np.arange(60)
    has_l = np.array([((g == p) & (st == "large")).any() for p in pats])
    has_s = np.array([((g == p) & (st == "small")).any() for p in pats])
    neg = np.array([((g == p) & (y == 0)).any() for p in pats])
    counts = np.zeros(60)
    for members in (pats[has_l], pats[has_s & ~has_l], pats[~(has_l | has_s)]):
        counts += np.bincount(members[draw.integers(0, members.size, members.size)], minlength=60)

    def auc_rep(stratum):
        wins = total = 0.0
        for i in np.flatnonzero(st == stratum):
            for j in np.flatnonzero(y == 0):
                c = counts[g[i]] * counts[g[j]] - (counts[g[i]] * counts[g[i]] - counts[g[i]]) * (g[i] == g[j])
                wins += c * ((s[i] > s[j]) + 0.5 * (s[i] == s[j]))
                total += c
        return wins / total

    assert neg.sum() > 0
    assert r.ci_low == pytest.approx(auc_rep("large") - auc_rep("small"), rel=1e-12)


@pytest.mark.filterwarnings("ignore::cxrcore.stats.FewClustersWarning")
def test_stratum_gap_interval_resamples_patients_and_covers_the_null():
    # 60 patients x 3 images with a patient effect: resampling rows as if independent, the 95%
    # interval missed a true gap of 0 in 22% of samples (reviewer's c5_gap.py, 400 samples)
    rng = np.random.default_rng(11)
    miss_rows = miss_pat = 0
    sims = 80
    for t in range(sims):
        y, s, st, g = _gap_patients(rng)
        rows = stats.bootstrap_auc_gap(y, s, st, n_boot=200, seed=t)
        pat = stats.bootstrap_auc_gap(y, s, st, n_boot=200, seed=t, groups=g)
        assert (rows.gap, rows.method, pat.method) == (pat.gap, "percentile", "cluster_percentile")
        miss_rows += not rows.ci_low <= 0 <= rows.ci_high
        miss_pat += not pat.ci_low <= 0 <= pat.ci_high
    assert miss_rows / sims > 0.12 and miss_pat / sims <= 0.10
    # too few patients in a stratum: not estimable, saying how many
    y, s, st, g = _gap_patients(np.random.default_rng(0), n_pat=12)
    with pytest.raises(stats.NotEstimable, match="patients with a stratum-'large' positive"):
        stats.bootstrap_auc_gap(y, s, st, groups=g, n_boot=20)


def test_within_pair_auc_counts_pairs_not_images():
    import pandas as pd

    rng = np.random.default_rng(0)
    n = 40
    base = rng.normal(scale=10, size=n)  # images differ far more than the perturbation moves them
    df = pd.DataFrame({"pid": np.repeat(np.arange(n), 2), "arm": np.tile([0, 1], n),
                       "s": np.repeat(base, 2) + np.tile([0.0, 0.01], n)})
    t = stats.within_pair_table(df, ["s"], "pid")
    assert t.loc[0, "within_pair_auc"] == 1.0 and t.loc[0, "n_pairs"] == n  # every pair detected
    assert stats.auc(df["arm"], df["s"]) < 0.6  # while the pooled AUC sits near chance
    assert 0.9 < t.loc[0, "ci_low"] < 1.0
    with pytest.raises(ValueError, match="0 and 1"):
        stats.within_pair_table(df.assign(arm=df["arm"] + 1), ["s"], "pid")


# -- issue 12, item 7: Obuchowski's clustered variance against iMRMC's doAUCcluster ---------
def imrmc_do_auc_cluster(predictor1, response, cluster_id, predictor2=None):
    """iMRMC's doAUCcluster (R; github.com/DIDSR/iMRMC, Obuchowski 1997), transcribed statement
    by statement: kernels by loops, clusters in order of appearance, no placements or sorting."""
    from statistics import NormalDist

    def kern(x1, x0):
        return 1.0 if x1 > x0 else (0.5 if x1 == x0 else 0.0)

    def V10(Xi, Ys):
        return sum(kern(Xi, y) for y in Ys) / len(Ys)

    def V01(Xs, Yi):
        return sum(kern(x, Yi) for x in Xs) / len(Xs)

    def getAUC(Xs, Ys):
        return sum(kern(x, y) for x in Xs for y in Ys) / (len(Xs) * len(Ys))

    present, absent = 1, 0
    ids = list(dict.fromkeys(cluster_id))
    I = len(ids)
    I01 = len({c for c, r in zip(cluster_id, response) if r == absent})
    I10 = len({c for c, r in zip(cluster_id, response) if r == present})
    m = [sum(1 for c, r in zip(cluster_id, response) if c == ids[i] and r == present) for i in range(I)]
    n = [sum(1 for c, r in zip(cluster_id, response) if c == ids[i] and r == absent) for i in range(I)]
    M, N = sum(m), sum(n)

    def comps(pred):
        X = [p for p, r in zip(pred, response) if r == present]
        Y = [p for p, r in zip(pred, response) if r == absent]
        Xc, Yc = [], []
        for i in range(I):
            xi = [p for p, c, r in zip(pred, cluster_id, response) if c == ids[i] and r == present]
            yi = [p for p, c, r in zip(pred, cluster_id, response) if c == ids[i] and r == absent]
            Xc.append(0.0 if m[i] == 0 else sum(V10(x, Y) for x in xi))
            Yc.append(0.0 if n[i] == 0 else sum(V01(X, y) for y in yi))
        return getAUC(X, Y), Xc, Yc

    def S(u, v, w, z, factor, denom):
        return factor / denom * sum((a - b) * (c - d) for a, b, c, d in zip(u, v, w, z))

    auc1, X1, Y1 = comps(predictor1)
    mA1, nA1 = [mi * auc1 for mi in m], [ni * auc1 for ni in n]
    var_1 = (S(X1, mA1, X1, mA1, I10 / (I10 - 1), M) / M + S(Y1, nA1, Y1, nA1, I01 / (I01 - 1), N) / N
             + 2 * S(X1, mA1, Y1, nA1, I / (I - 1), 1.0) / (M * N))
    out = {"auc_1": auc1, "var_1": var_1, "I": I, "I10": I10, "I01": I01}
    if predictor2 is None:
        return out
    auc2, X2, Y2 = comps(predictor2)
    mA2, nA2 = [mi * auc2 for mi in m], [ni * auc2 for ni in n]
    var_2 = (S(X2, mA2, X2, mA2, I10 / (I10 - 1), M) / M + S(Y2, nA2, Y2, nA2, I01 / (I01 - 1), N) / N
             + 2 * S(X2, mA2, Y2, nA2, I / (I - 1), 1.0) / (M * N))
    cov_12 = (S(X1, mA1, X2, mA2, I10 / (I10 - 1), M) / M + S(Y1, nA1, Y2, nA2, I01 / (I01 - 1), N) / N
              + S(X1, mA1, Y2, nA2, I / (I - 1), 1.0) / (M * N) + S(X2, mA2, Y1, nA1, I / (I - 1), 1.0) / (M * N))
    var_d = var_1 + var_2 - 2 * cov_12
    p = 2 * (1 - NormalDist().cdf(abs(auc1 - auc2) / var_d**0.5))
    out.update(auc_2=auc2, var_2=var_2, cov_12=cov_12, var_AminusB=var_d, p_normal=p)
    return out


# A worked example: 7 patients, mixed ones (A, B, F, G), one-class ones (C, D, E) and ties.
# The numbers were printed by the transcription above and are pinned here, so a change to
# either side shows.
WORKED = dict(
    cluster=["A", "A", "A", "B", "B", "B", "C", "D", "E", "E", "F", "F", "G", "G"],
    y=[1, 1, 0, 1, 0, 0, 0, 1, 0, 0, 1, 0, 1, 0],
    p1=[0.9, 0.6, 0.3, 0.4, 0.5, 0.2, 0.6, 0.8, 0.1, 0.4, 0.3, 0.3, 0.7, 0.5],
    p2=[0.7, 0.2, 0.4, 0.6, 0.5, 0.1, 0.3, 0.9, 0.2, 0.6, 0.5, 0.4, 0.3, 0.3],
)
WORKED_IMRMC = {"auc_1": 0.8125, "var_1": 0.014295789930555554, "I": 7, "I10": 5, "I01": 6, "auc_2": 0.71875,
                "var_2": 0.01315104166666667, "cov_12": -0.006537091290509261, "var_AminusB": 0.04052101417824075,
                "p_normal": 0.6414111486165115}


def test_clustered_delong_matches_imrmc_doAUCcluster_on_a_worked_example():
    w = WORKED
    ref = imrmc_do_auc_cluster(w["p1"], w["y"], w["cluster"], w["p2"])
    assert ref == pytest.approx(WORKED_IMRMC, rel=1e-12)
    one = stats.delong(w["y"], w["p1"], groups=w["cluster"])
    assert one.auc == pytest.approx(ref["auc_1"], rel=1e-15)
    assert one.variance == pytest.approx(ref["var_1"], rel=1e-12)  # the old I/(I-1) factors gave 0.0139
    two = stats.delong_paired(w["y"], w["p1"], w["p2"], groups=w["cluster"])
    assert two.cov[0, 0] == pytest.approx(ref["var_1"], rel=1e-12)
    assert two.cov[1, 1] == pytest.approx(ref["var_2"], rel=1e-12)
    assert two.cov[0, 1] == pytest.approx(ref["cov_12"], rel=1e-12)
    assert two.se_delta**2 == pytest.approx(ref["var_AminusB"], rel=1e-12)
    # doAUCcluster refers z to the normal; we refer it to t with Satterthwaite df (its size with
    # few patients, below), so only the z agrees, and the p follows from z and df
    assert two.z == pytest.approx((ref["auc_1"] - ref["auc_2"]) / ref["var_AminusB"] ** 0.5, rel=1e-12)
    assert 2 * norm.sf(abs(two.z)) == pytest.approx(ref["p_normal"], rel=1e-9)
    assert two.p_value == pytest.approx(2 * t_dist.sf(abs(two.z), two.df), rel=1e-12)
    assert 4 <= two.df <= ref["I"] - 1  # Satterthwaite, capped at I - 1
    # with the normal reference, every number of doAUCcluster
    same = stats.delong_paired(w["y"], w["p1"], w["p2"], groups=w["cluster"], reference="normal")
    assert same.p_value == pytest.approx(ref["p_normal"], rel=1e-9) and math.isinf(same.df)
    one_n = stats.delong(w["y"], w["p1"], groups=w["cluster"], reference="normal", method="wald")
    half = norm.ppf(0.975) * ref["var_1"] ** 0.5
    # (doAUCcluster does not clip at 1; we clip as pROC does)
    assert one_n.ci == pytest.approx((ref["auc_1"] - half, min(1.0, ref["auc_1"] + half)), rel=1e-12)
    one_t = stats.delong(w["y"], w["p1"], groups=w["cluster"], method="wald")
    assert one_t.ci[1] - one_t.ci[0] > one_n.ci[1] - one_n.ci[0]  # the t reference is wider


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clustered_delong_matches_imrmc_on_random_clusters(seed):
    rng = np.random.default_rng(seed)
    n_pat = 25
    k = rng.integers(1, 4, n_pat)
    g = np.repeat(np.arange(n_pat), k)
    y = (rng.random(g.size) < 0.35).astype(int)
    a = np.round(y + rng.normal(size=g.size) + rng.normal(size=n_pat)[g], 1)
    b = np.round(0.5 * y + rng.normal(size=g.size), 1)
    ref = imrmc_do_auc_cluster(a.tolist(), y.tolist(), g.tolist(), b.tolist())
    r = stats.delong_paired(y, a, b, groups=g)
    assert r.cov[0, 0] == pytest.approx(ref["var_1"], rel=1e-10)
    assert r.cov[0, 1] == pytest.approx(ref["cov_12"], rel=1e-10, abs=1e-15)
    assert r.se_delta**2 == pytest.approx(ref["var_AminusB"], rel=1e-10)
    assert stats.delong(y, b, groups=g).variance == pytest.approx(ref["var_2"], rel=1e-10)


def test_clustered_variance_is_delong_with_one_image_per_patient_and_few_positives():
    # 5 positives among 500 one-image patients: the old factor I/(I-1) = 500/499 on the
    # positive side instead of 5/4 understated the variance (ratio 0.82).
    rng = np.random.default_rng(0)
    y = np.zeros(500, int)
    y[:5] = 1
    s = y + rng.normal(size=500)
    plain, clustered = stats.delong(y, s), stats.delong(y, s, groups=np.arange(500))
    assert clustered.variance == pytest.approx(plain.variance, rel=1e-12)
    assert clustered.df < 10  # few positives: the t reference widens the interval
    ref = imrmc_do_auc_cluster(s.tolist(), y.tolist(), list(range(500)))
    assert clustered.variance == pytest.approx(ref["var_1"], rel=1e-10)


def test_clustered_variance_with_two_positive_patients():
    # two patients hold all positives (several images each): the old code's variance was 0.59x the reference
    rng = np.random.default_rng(3)
    g = np.r_[np.zeros(4), np.ones(3), np.arange(2, 60).repeat(2)].astype(int)
    y = (g < 2).astype(int)
    s = y + rng.normal(size=g.size) + rng.normal(size=60)[g]
    ref = imrmc_do_auc_cluster(s.tolist(), y.tolist(), g.tolist())
    r = stats.delong(y, s, groups=g)
    assert ref["I10"] == 2 and r.variance == pytest.approx(ref["var_1"], rel=1e-10)
    assert r.df == pytest.approx(1.0, abs=0.5)  # the positive side dominates: about I10 - 1 df


def test_clustered_delong_is_not_estimable_with_every_positive_in_one_patient():
    rng = np.random.default_rng(1)
    g = np.r_[np.zeros(6, int), np.arange(1, 41)]
    y = (g == 0).astype(int)
    s = y + rng.normal(size=g.size)
    with pytest.raises(stats.NotEstimable, match=r"all 6 positive rows are in 1 patient.*I10 = 1"):
        stats.delong(y, s, groups=g)
    with pytest.raises(stats.NotEstimable, match="I10 = 1"):
        stats.delong_paired(y, s, rng.normal(size=g.size), groups=g)
    df = pd.DataFrame({"label": y, "roi_local": s, "cls": rng.normal(size=g.size), "pid": g})
    tab = stats.auc_table(df, ["roi_local"], "label", method="delong", group_col="pid")
    row = tab.iloc[0]
    assert row.auc == stats.auc(y, s) and np.isnan(row.ci_low) and np.isnan(row.ci_high)
    assert row.note.startswith("not estimable") and "I10 = 1" in row.note
    cmp = stats.compare_table(df, ["cls", "roi_local"], "label", group_col="pid").iloc[0]
    assert np.isnan(cmp.p_value) and np.isnan(cmp.ci_low) and cmp.note.startswith("not estimable")
    assert cmp.delta == pytest.approx(stats.auc(y, s) - stats.auc(y, df.cls))
    assert stats.format_p(cmp.p_value) == "not estimable"


# -- item 8: few patients, and p and CI from one procedure -------------------------------------
def _few_positive_patients(rng, n_pat=60, prev=0.15):
    """Patients with 1-4 images, ~9 of 60 positive, a shared patient effect; a and b equal AUC."""
    k = rng.integers(1, 5, n_pat)
    g = np.repeat(np.arange(n_pat), k)
    y = (rng.random(n_pat) < prev)[g].astype(int)
    u = rng.normal(size=n_pat)[g]
    a = 0.8 * y + u + 0.5 * rng.normal(size=g.size) + 0.5 * rng.normal(size=n_pat)[g]
    b = 0.8 * y + u + 0.5 * rng.normal(size=g.size) + 0.5 * rng.normal(size=n_pat)[g]
    return y, a, b, g


def test_clustered_paired_test_holds_its_size_with_few_positive_patients():
    # The patient-cluster bootstrap z-test rejected ~9-10% of these true nulls at 0.05 and
    # a normal reference for the Obuchowski z ~7.5%; the t reference with Satterthwaite df
    # rejects ~5% (benchmarks/sim_stats.py prints these rates with more samples).
    rng = np.random.default_rng(2024)
    rejected, disagree, done = 0, 0, 0
    while done < 800:
        y, a, b, g = _few_positive_patients(rng)
        if len(np.unique(g[y == 1])) < 3:
            continue
        r = stats.delong_paired(y, a, b, groups=g)
        rejected += r.p_value < 0.05
        disagree += (r.p_value < 0.05) != (not r.ci[0] <= 0.0 <= r.ci[1])
        done += 1
    assert disagree == 0
    assert 0.03 <= rejected / done <= 0.07


def test_compare_table_p_and_ci_never_disagree():
    rng = np.random.default_rng(7)
    frames = []
    for s in range(60):
        y, a, b, g = _few_positive_patients(rng, n_pat=40, prev=0.3)
        frames.append(pd.DataFrame({"sim": s, "label": y, "a": a + 0.4 * y * (s % 3 == 0), "b": b, "pid": g}))
    df = pd.concat(frames, ignore_index=True)
    for level in (0.95, 0.9):
        tab = stats.compare_table(df, ["b", "a"], "label", by=["sim"], group_col="pid", ci=level)
        ok = tab.p_value.notna()
        excludes = ~((tab.ci_low <= 0) & (0 <= tab.ci_high))
        assert ((tab.p_value < 1 - level) == excludes)[ok].all()
        assert (tab.method == "delong_clustered").all() and (tab.df > 1).all()


def test_cluster_bootstrap_requires_patients_per_class_and_warns_below_twenty():
    rng = np.random.default_rng(4)
    # 3 positive patients with 10 images each: 30 positive rows, but only 3 patients
    g = np.r_[np.repeat(np.arange(3), 10), np.arange(3, 80)]
    y = (g < 3).astype(int)
    s = y + rng.normal(size=g.size)
    with pytest.raises(stats.NotEstimable, match=r"3 clusters \(groups\) with a positive row.*at least 5 of each.*delong"):
        stats.bootstrap_auc(y, s, groups=g, n_boot=50)
    g8 = np.r_[np.repeat(np.arange(8), 3), np.arange(8, 80)]
    y8 = (g8 < 8).astype(int)
    with pytest.warns(stats.FewClustersWarning, match=r"8 clusters \(groups\) with a positive row.*fewer than 20"):
        stats.bootstrap_auc(y8, y8 + rng.normal(size=g8.size), groups=g8, n_boot=50)
    # without groups the rows are the units, as before
    stats.bootstrap_auc(y, s, n_boot=50)
    # the table keeps the AUC, says why there is no interval, and warns once
    df = pd.DataFrame({"label": y, "s": s, "pid": g})
    tab = stats.auc_table(df, ["s"], "label", group_col="pid", n_boot=50)
    assert np.isnan(tab.ci_low.iloc[0]) and "not estimable" in tab.note.iloc[0] and tab.auc.iloc[0] == stats.auc(y, s)


# -- item 9: zero variance -----------------------------------------------------------------------
def test_score_interval_matches_newcombe_method_5_references():
    # SingleCaseES (R) NAP with its Newcombe (2006) method-5 interval, baseline A = negatives,
    # treatment B = positives, as quoted in the tests of an independent port (JS, 1e-9)
    a = [20, 20, 26, 25, 22, 23]
    b = [28, 25, 24, 27, 30, 30, 29]
    y, s = np.r_[np.zeros(6, int), np.ones(7, int)], np.r_[a, b].astype(float)
    r95, r90 = stats.delong(y, s), stats.delong(y, s, level=0.90)
    assert r95.auc == pytest.approx(0.9166666666666666, rel=1e-15) and r95.method == "score"
    assert r95.ci == pytest.approx((0.5973193600384168, 0.9859976893703788), abs=1e-9)
    assert r90.ci == pytest.approx((0.6591091902344411, 0.9822247870934007), abs=1e-9)
    # at AUC 0.5 the score test is the Wilcoxon-Mann-Whitney normal test: variance (m+n+1)/(12 m n)
    rng = np.random.default_rng(0)
    yy, ss = np.r_[np.zeros(9, int), np.ones(14, int)], rng.normal(size=23)
    w = stats.delong(yy, ss)
    z = (w.auc - 0.5) / math.sqrt((9 + 14 + 1) / (12 * 9 * 14))
    assert w.z == pytest.approx(z, rel=1e-12) and w.p_value == pytest.approx(2 * norm.sf(abs(z)), rel=1e-12)
    from scipy.stats import mannwhitneyu

    assert w.p_value == pytest.approx(mannwhitneyu(ss[yy == 1], ss[yy == 0], use_continuity=False,
                                                   method="asymptotic").pvalue, rel=1e-10)
    # p < 1 - level exactly when the interval excludes the null, for any null
    for null in (0.3, 0.5, 0.7, 0.9):
        r = stats.delong(y, s, null=null)
        assert (r.p_value < 0.05) == (not r.ci[0] <= null <= r.ci[1])


@pytest.mark.parametrize("method", ["score", "wald", "logit"])
def test_perfect_separation_interval_does_not_collapse(method):
    y = np.array([0, 0, 0, 1, 1, 1])
    r = stats.delong(y, [0, 1, 2, 3, 4, 5], method=method)
    # variance 0: Wald and logit have no interval there and say so; the score interval is
    # defined at AUC 1 (lower limit where 1 - x = 1.96 sqrt(V(x)))
    assert r.method == "score" and r.ci[1] == 1.0 and 0.4 < r.ci[0] < 0.6 and 0.0 < r.p_value < 0.1
    assert ("no " + method + " interval") in r.note if method != "score" else r.note == ""
    lo, hi = stats.delong([1, 1, 1, 0, 0, 0], [0, 1, 2, 3, 4, 5], method=method).ci  # AUC 0 mirrors it
    assert (lo, hi) == pytest.approx((0.0, 1 - r.ci[0]), rel=1e-12)


def _moved_down(m, n, steps):
    """m + n rows separated perfectly, then the top negative moved above 0, 1, ... positives, one at a time."""
    y = np.r_[np.ones(m, int), np.zeros(n, int)]
    s = np.r_[np.arange(m) + 1000.0, np.arange(n, dtype=float)]
    out = []
    for k in range(steps):
        t = s.copy()
        t[m + n - 1] = 1000.0 + k - 0.5 if k else t[m + n - 1]
        out.append(t)
    return y, out


@pytest.mark.parametrize("m, n", [(3, 3), (6, 4), (20, 20), (40, 15), (100, 100)])
def test_less_perfect_data_never_get_a_tighter_interval_or_a_smaller_p(m, n):
    # before: perfect separation of 20 + 20 gave [0.8316, 1], p 1.9e-6, and one discordant
    # pair more gave the Wald [0.9906, 1] with p = 0.0 exactly
    y, series = _moved_down(m, n, min(m, 12))
    rs = [stats.delong(y, s) for s in series]
    aucs = [r.auc for r in rs]
    assert aucs[0] == 1.0 and all(np.diff(aucs) < 0)
    widths = [r.ci[1] - r.ci[0] for r in rs]
    assert all(np.diff(widths) > 0) and all(np.diff([r.ci[0] for r in rs]) < 0)
    assert all(np.diff([r.p_value for r in rs]) > 0)
    # and on through the whole range to AUC 0.5: wider and less significant at every step
    grid = [stats.delong(np.r_[np.ones(20, int), np.zeros(20, int)], np.r_[np.arange(20) + k, np.arange(20.0)])
            for k in np.arange(19.5, -0.5, -1.0)]
    assert all(np.diff([g.ci[1] - g.ci[0] for g in grid]) > 0) and all(np.diff([g.p_value for g in grid]) > 0)


@pytest.mark.parametrize("design", ["box", "mixed", "multi"])
def test_clustered_less_perfect_data_never_get_a_tighter_interval_or_a_smaller_p(design):
    # every configuration of one, two or three discordant pairs: a design effect below 1
    # estimated from them must not beat perfect separation on the same patients
    rng = np.random.default_rng(0)
    if design == "box":  # a lesion and its control in each of 20 images
        y, g = np.tile([1, 0], 20), np.repeat(np.arange(20), 2)
    elif design == "mixed":  # 10 patients with 2 positive and 3 negative images
        y, g = np.tile([1, 1, 0, 0, 0], 10), np.repeat(np.arange(10), 5)
    else:  # 20 patients of one class each, 1-4 images
        g = np.repeat(np.arange(20), rng.integers(1, 5, 20))
        y = (g < 10).astype(int)
    base = np.where(y == 1, 100.0, 0.0) + rng.permutation(y.size)
    perfect = stats.delong(y, base, groups=g)
    assert perfect.auc == 1.0 and perfect.design_effect == 1.0 and perfect.df == len(np.unique(g)) - 1
    negs = np.flatnonzero(y == 0)[np.argsort(base[y == 0])[::-1]]
    for p in np.flatnonzero(y == 1):
        for k in (1, 2, 3):
            s = base.copy()
            s[p] = (base[negs[k - 1]] + base[negs[k]]) / 2  # below the top k negatives
            r = stats.delong(y, s, groups=g)
            assert r.auc < 1.0
            assert r.ci[1] - r.ci[0] >= perfect.ci[1] - perfect.ci[0] - 1e-12 and r.ci[0] <= perfect.ci[0]
            assert r.p_value >= perfect.p_value * (1 - 1e-9)


@pytest.mark.parametrize("design", ["lesion_and_control", "two_and_two"])
def test_satterthwaite_df_never_exceeds_patients_minus_one(design):
    # patients holding both classes: Welch-Satterthwaite on I10 - 1 and I01 - 1 df alone gave a
    # median 8.9 df with I = 6 patients (reviewer's c2/c15/c20); the variance is a sum over
    # the same I patients' totals, so it has at most I - 1
    rng = np.random.default_rng(1)
    for i in (3, 6, 10):
        if design == "lesion_and_control":
            g, y = np.repeat(np.arange(i), 2), np.tile([1, 0], i)
        else:
            g, y = np.repeat(np.arange(i), 4), np.tile([1, 1, 0, 0], i)
        dfs = []
        for _ in range(30):
            a = y + rng.normal(size=i)[g] + rng.normal(size=g.size)
            b = y + rng.normal(size=i)[g] + rng.normal(size=g.size)
            for r in (stats.delong(y, a, groups=g), stats.delong(y, a, groups=g, method="wald"),
                      stats.delong_paired(y, a, b, groups=g)):
                if r.method != "paired_swap":  # (variance 0: a permutation p, no t reference)
                    assert 0 < r.df <= i - 1
                    dfs.append(r.df)
        assert np.median(dfs) == i - 1  # the cap binds in most samples: Welch alone exceeds it


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(labels_and_scores, st.integers(1, 4), st.sampled_from([0.5, 0.3, 0.8]))
def test_property_score_interval_brackets_the_estimate_and_agrees_with_its_p(data, per_patient, null):
    y, a, b = (np.asarray(v) for v in data)
    for s in (a.astype(float), b):
        for g in (None, np.arange(y.size) // per_patient):
            try:
                r = stats.delong(y, s, groups=g, null=null)
            except stats.NotEstimable:
                continue
            if math.isnan(r.ci[0]):  # clustered variance 0 inside (0, 1): no interval, said so
                assert r.note.startswith("not estimable") and 0 < r.auc < 1
                continue
            assert 0.0 <= r.ci[0] <= r.auc <= r.ci[1] <= 1.0 and r.ci[0] < r.ci[1]
            assert (r.p_value < 0.05) == (not r.ci[0] <= null <= r.ci[1]) or abs(r.p_value - 0.05) < 1e-9
            assert r.design_effect > 0 and (g is None or r.df <= len(np.unique(g)) - 1)


def test_score_interval_covers_a_true_auc_near_one():
    # true AUC 0.995 (binormal, d = 3.65): most samples of 12 + 12 separate perfectly
    rng = np.random.default_rng(11)
    d = 3.65
    true = norm.cdf(d / math.sqrt(2))
    hits, perfect = 0, 0
    for _ in range(400):
        y = np.r_[np.zeros(12, int), np.ones(12, int)]
        r = stats.delong(y, rng.normal(size=24) + d * y)
        hits += r.ci[0] <= true <= r.ci[1]
        perfect += r.auc == 1.0
    assert perfect > 200 and hits / 400 >= 0.95


def test_score_interval_holds_its_coverage_near_one_in_clustered_designs():
    # the box-level design: 30 images with a lesion and a control box, image effect sd 1,
    # between-image AUC 0.98. Wald on Obuchowski's variance missed E[AUC] 14.7% of the time
    rng = np.random.default_rng(21)
    d = norm.ppf(0.98) * 2.0
    g, y = np.repeat(np.arange(30), 2), np.tile([1, 0], 30)
    samples = [d * y + rng.normal(size=30)[g] + rng.normal(size=60) for _ in range(500)]
    target = np.mean([stats.auc(y, s) for s in samples])
    miss = {m: np.mean([not (lambda c: c[0] <= target <= c[1])(stats.delong(y, s, groups=g, method=m).ci)
                        for s in samples]) for m in ("score", "wald")}
    assert miss["score"] <= 0.05 and miss["wald"] > 0.10


def test_clustered_boundary_takes_design_effect_one_and_the_bootstrap_the_same_interval():
    # 4 patients, each one negative and one positive image, perfectly separated: the clustering
    # cannot be estimated from placements that are all 1, so c = 1 and df = I - 1 = 3
    g = np.repeat(np.arange(4), 2)
    y = np.tile([0, 1], 4)
    s = y * 10.0 + np.arange(8)
    r = stats.delong(y, s, groups=g)
    q = t_dist.ppf(0.975, 3)
    assert r.method == "score" and (r.design_effect, r.df) == (1.0, 3.0)
    assert r.ci == pytest.approx(stats._score_interval(1.0, 4, 4, 1.0, q), rel=1e-14)
    with pytest.warns(stats.FewClustersWarning):  # 12 patients
        b = stats.bootstrap_auc(np.tile(y, 3), np.tile(s, 3), groups=np.r_[g, g + 4, g + 8], n_boot=50)
    assert b.method == "score" and b.ci == stats.delong(np.tile(y, 3), np.tile(s, 3), groups=np.r_[g, g + 4, g + 8]).ci


def test_zero_clustered_variance_inside_the_range_gives_no_interval():
    # each patient's negative just below its positive: AUC about 0.5, Obuchowski's variance
    # exactly 0 (every patient total cancels) though DeLong's row-wise one is not. Before: the
    # exact Clopper-Pearson branch, built for AUC 0 or 1, gave e.g. [0.28, 0.74] at I = 40
    for i in (2, 10, 40):
        g, y, s = np.repeat(np.arange(i), 2), np.tile([0, 1], i), np.arange(2.0 * i)
        r = stats.delong(y, s, groups=g)
        assert 0 < r.auc < 1 and r.variance == 0.0 and stats.delong(y, s).variance > 0
        assert all(math.isnan(v) for v in (*r.ci, r.p_value, r.z)) and r.note.startswith("not estimable")
        for method in ("wald", "logit"):
            assert math.isnan(stats.delong(y, s, groups=g, method=method).ci[0])


def test_paired_swap_p_by_monte_carlo_beyond_twelve_units():
    # 13 rows: the Monte Carlo p lands within its sampling error of the exact one (8,192 patterns)
    import itertools

    y = np.r_[np.zeros(6, int), np.ones(7, int)]
    a, b = np.arange(13.0), np.zeros(13)
    from scipy.stats import rankdata

    sw = np.array(list(itertools.product([False, True], repeat=13)))
    ra, rb = rankdata(a) / 13, rankdata(b) / 13  # the swap exchanges the scores' normalised ranks
    a2, b2 = np.where(sw, rb, ra), np.where(sw, ra, rb)

    def pair_auc(s):  # the Mann-Whitney kernel over all pairs, every pattern at once
        x, z = s[:, y == 1][:, :, None], s[:, y == 0][:, None, :]
        return ((x > z) + 0.5 * (x == z)).mean(axis=(1, 2))

    exact = np.mean(np.abs(pair_auc(a2) - pair_auc(b2)) >= 0.5 - 1e-12)
    r1 = stats.delong_paired(y, a, b, n_permutations=4000, seed=3)
    r2 = stats.delong_paired(y, a, b, n_permutations=4000, seed=3)
    assert r1.method == "paired_swap" and r1.p_value == r2.p_value and "Monte Carlo over 4000" in r1.note
    assert abs(r1.p_value - exact) < 4 * math.sqrt(exact * (1 - exact) / 4000)
    tab = stats.compare_table(pd.DataFrame({"y": y, "a": a, "b": b}), ["b", "a"], "y", n_permutations=4000)
    assert tab.method.iloc[0] == "paired_swap" and tab.ci_low.isna().all()
    assert abs(tab.p_value.iloc[0] - exact) < 4 * math.sqrt(exact * (1 - exact) / 4000)


# -- item 10: within-pair AUC --------------------------------------------------------------------
def test_within_pair_table_refuses_duplicate_pair_rows_naming_the_pair():
    df = pd.DataFrame({"pid": [1, 1, 2, 2, 2], "arm": [0, 1, 0, 1, 1], "s": [0.1, 0.5, 0.2, 0.9, 0.1]})
    with pytest.raises(ValueError, match=r"pair 2 has 2 rows with arm = 1"):
        stats.within_pair_table(df, ["s"], "pid")
    df = pd.DataFrame({"pair": [1, 1, 2, 2], "patient": ["p", "q", "r", "r"], "arm": [0, 1, 0, 1], "s": [0, 1, 0, 1]})
    with pytest.raises(ValueError, match="pair 1 spans 2 patients"):
        stats.within_pair_table(df, ["s"], "pair", group_col="patient")


def _pairs_in_patients(rng, n_pat=30, k=5, mu=0.5):
    u = rng.normal(size=n_pat)
    d = mu + np.repeat(u, k) + rng.normal(size=n_pat * k)
    pair = np.arange(n_pat * k)
    return pd.DataFrame({"pair": np.repeat(pair, 2), "patient": np.repeat(np.repeat(np.arange(n_pat), k), 2),
                         "arm": np.tile([0, 1], n_pat * k), "s": np.c_[np.zeros(n_pat * k), d].reshape(-1)})


def test_within_pair_interval_covers_when_pairs_share_patients():
    # 30 patients x 5 pairs with a patient effect: the Wilson interval over 150 "independent"
    # pairs covered ~0.81-0.87; the design-effect interval covers ~0.95
    rng = np.random.default_rng(12)
    true = norm.cdf(0.5 / math.sqrt(2))
    hits, hits_naive = 0, 0
    for _ in range(150):
        df = _pairs_in_patients(rng)
        r = stats.within_pair_table(df, ["s"], "pair", group_col="patient").iloc[0]
        naive = stats.within_pair_table(df, ["s"], "pair").iloc[0]
        hits += r.ci_low <= true <= r.ci_high
        hits_naive += naive.ci_low <= true <= naive.ci_high
        assert r.method == "wilson_design_effect" and r.n_groups == 30 and naive.method == "wilson"
    assert hits / 150 >= 0.91 and hits_naive / 150 < 0.9


def test_within_pair_interval_with_one_pair_per_patient_is_wilson():
    from statsmodels.stats.proportion import proportion_confint

    df = _pairs_in_patients(np.random.default_rng(0), n_pat=40, k=1)
    r = stats.within_pair_table(df, ["s"], "pair", group_col="patient").iloc[0]
    wins = r.within_pair_auc * 40
    assert r.method == "wilson" and (r.ci_low, r.ci_high) == pytest.approx(proportion_confint(wins, 40, method="wilson"))
    # every pair won inside clustered patients: no collapse, the patient count stands in for n
    df = _pairs_in_patients(np.random.default_rng(0), mu=50.0)
    r = stats.within_pair_table(df, ["s"], "pair", group_col="patient").iloc[0]
    assert r.within_pair_auc == 1.0 and r.ci_high == 1.0 and 0.8 < r.ci_low < 0.95


# -- items 11 and 12: printing p, one implementation, the public names -------------------------
@pytest.mark.parametrize("p, text", [(0.0, "< 1e-16"), (1e-300, "< 1e-16"), (3.2e-9, "3.2e-09"), (0.0234, "0.023"),
                                     (1.0, "1"), (float("nan"), "not estimable")])
def test_format_p(p, text):
    assert stats.format_p(p) == text


def test_format_p_refuses_a_non_probability():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        stats.format_p(1.5)


def test_notebook_names_are_exported():
    for name in ("bootstrap_auc_gap", "within_pair_table", "GapResult", "format_p", "NotEstimable"):
        assert name in stats.__all__ and hasattr(stats, name)


def test_notebooks_compute_no_p_values_by_hand():
    from pathlib import Path

    for nb in (Path(__file__).resolve().parent.parent / "notebooks").glob("*.py"):
        text = nb.read_text()
        for hand in ("norm.sf(", "norm.logsf(", "t.sf("):
            assert hand not in text, f"{nb.name} computes a p-value by hand ({hand}); call cxrcore.stats"


def test_one_label_check_and_one_group_coder_for_probes_and_stats():
    from cxrcore import probes

    for fn in (lambda y: stats.auc(y, np.arange(4.0)), lambda y: probes.grouped_folds(y, n_splits=2)):
        with pytest.raises(ValueError, match=r"found \[2\] \(first at row 2\)"):
            fn(np.array([0, 1, 2, 1]))
    with pytest.raises(ValueError, match="missing patient ids"):
        probes.grouped_folds(np.array([0, 1] * 4), groups=np.array(["a", None, "b", "c", "d", "e", "f", "g"], object),
                             n_splits=2)
    with pytest.raises(ValueError, match="missing patient ids"):
        stats.bootstrap_auc([0, 1] * 4, np.arange(8.0), groups=[1, 2, 3, np.nan, 5, 6, 7, 8])


def test_within_cluster_wins_match_brute_force():
    rng = np.random.default_rng(5)
    g = rng.integers(0, 12, 70)
    y = rng.random(70) < 0.4
    s = np.round(rng.normal(size=70), 1)
    got = stats._within_cluster_wins(s[y], s[~y], g[y], g[~y], 12)
    want = [sum((p > q) + 0.5 * (p == q) for p in s[y & (g == c)] for q in s[~y & (g == c)]) for c in range(12)]
    np.testing.assert_allclose(got, want, atol=1e-12)
