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
