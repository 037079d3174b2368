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
    ci = stats.delong(ASAH_POOR, ASAH_S100B).ci
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
    assert r.z == pytest.approx(z, rel=1e-9, abs=1e-12)
    assert r.p_value == pytest.approx(p, rel=1e-9, abs=1e-300)


def test_identical_predictors_give_z0_p1():
    y, a, _ = make_data("continuous")
    r = stats.delong_paired(y, a, a.copy())
    assert (r.z, r.p_value, r.log10_p) == (0.0, 1.0, 0.0)
    # a monotone transform ranks identically: still the same ROC curve
    r = stats.delong_paired(y, a, np.exp(a))
    assert (r.z, r.p_value) == (0.0, 1.0)


def test_both_perfect_gives_z0_p1():
    y, a, _ = make_data("perfect")
    r = stats.delong_paired(y, a, a * 2 + 1)
    assert r.auc_a == r.auc_b == 1.0 and (r.z, r.p_value) == (0.0, 1.0)
    d = stats.delong(y, a)
    assert d.variance == 0.0 and d.ci == (1.0, 1.0)


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
    if math.isinf(z):
        assert r.z == z and r.p_value == 0.0
    else:
        assert r.z == pytest.approx(z, rel=1e-7, abs=1e-7)
    assert 0.0 <= r.p_value <= 1.0
    # swapping the arguments flips the sign only
    s = stats.delong_paired(y, b, a)
    assert s.z == pytest.approx(-r.z, abs=1e-12) if math.isfinite(r.z) else s.z == -r.z
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


def test_nonzero_difference_with_zero_variance_is_infinite_z():
    # a separates perfectly (AUC 1), b is constant (AUC 0.5): both variances are 0.
    y = np.array([0, 0, 0, 1, 1, 1])
    r = stats.delong_paired(y, [0, 1, 2, 3, 4, 5], np.zeros(6))
    assert r.z == math.inf and r.p_value == 0.0 and r.log10_p == -math.inf


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
    for method in ("percentile", "bca"):
        r = stats.bootstrap_auc(y, a, a + 1.0, n_boot=200, method=method)
        assert (r.ci_low, r.ci_high) == (1.0, 1.0)
        assert (r.diff_ci_low, r.diff_ci_high) == (0.0, 0.0)


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
    """Obuchowski 1997 eqs. written out with the O(M N) kernel matrix (independent of the library)."""
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
    S10 = I / ((I - 1) * M) * ((VX - mi * theta) ** 2).sum()
    S01 = I / ((I - 1) * N) * ((VY - ni * theta) ** 2).sum()
    S11 = I / (I - 1) * ((VX - mi * theta) * (VY - ni * theta)).sum()
    return theta, S10 / M + S01 / N + 2 * S11 / (M * N)


def test_clustered_delong_matches_obuchowski_formula():
    y, a, _, g = _clustered(1, n_pat=120)
    a = np.round(a, 1)  # ties
    r = stats.delong(y, a, groups=g)
    theta, var = _obuchowski_naive(y, a, g)
    assert r.auc == pytest.approx(theta, abs=1e-12) and r.variance == pytest.approx(var, rel=1e-10)
    # one image per patient: Obuchowski's I/(I-1) factor instead of DeLong's (m-1, n-1), nearly equal
    rng = np.random.default_rng(2)
    y1 = (rng.random(400) < 0.3).astype(int)
    s1 = y1 + rng.normal(size=400)
    ratio = stats.delong(y1, s1, groups=np.arange(400)).variance / stats.delong(y1, s1).variance
    assert ratio == pytest.approx(1.0, abs=0.01)


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


def test_compare_table_cluster_bootstrap_with_patient_groups():
    y, a, b, g = _clustered(5, n_pat=200)
    df = pd.DataFrame({"label": y, "patch_mean": a, "cls": b, "pid": g})
    tab = stats.compare_table(df, ["cls", "patch_mean"], "label", group_col="pid", n_boot=1000, seed=7)
    row = tab.iloc[0]
    assert row.method == "cluster_bootstrap" and row.n_boot == 1000 and row.n_groups == 200
    ref = stats.bootstrap_auc(y, a, score_b=b, groups=g, n_boot=1000, seed=stats._stratum_seed(7, {}, "patch_mean vs cls"))
    d = ref.replicates[:, 0] - ref.replicates[:, 1]
    assert (row.ci_low, row.ci_high) == pytest.approx(ref.diff_ci, abs=1e-12)
    assert row.delta == pytest.approx(ref.difference) and row.se == pytest.approx(d.std(ddof=1))
    assert row.z == pytest.approx(row.delta / row.se)
    assert row.p_value == pytest.approx(2 * norm.sf(abs(row.z))) and row.log10_p == pytest.approx(math.log10(row.p_value))
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
    assert row.method == "delong" and row.n_boot == 0
    assert (row.z, row.p_value, row.log10_p) == (ref.z, ref.p_value, ref.log10_p)
    assert row.p_value == 0.0 and np.isfinite(row.log10_p) and row.log10_p < -300
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
