"""Seeded simulations behind the statistics the book reports (issue 12, items 7-10).

Run: .venv/bin/python benchmarks/sim_stats.py [--sims 2000] [--boot-sims 300]
Prints, side by side in one run, each procedure against the one it replaced:
  7. the clustered DeLong variance against iMRMC's doAUCcluster formula (ratio 1 is right);
  8. the rejection rate of true nulls at alpha 0.05 with ~9 positive patients, and how often
     p and CI disagree; the coverage of a patient-cluster bootstrap interval by number of
     positive patients (the basis of MIN_GROUPS and FEW_GROUPS in cxrcore.stats);
  9. p and interval for a perfect against a constant score (3 + 3 rows), and the coverage
     of the exact interval where AUCs of 1 are common;
 10. the coverage of the within-pair AUC interval with 30 patients x 5 pairs.
The fast tests in tests/test_stats.py check the same properties with fewer samples.
"""

from __future__ import annotations

import argparse
import math
import warnings

import numpy as np
import pandas as pd
from scipy.stats import norm

from cxrcore import stats


def old_clustered_variance(y, s, g):
    """The replaced formula: one factor I / (I - 1), I all patients, on every term."""
    y = np.asarray(y).astype(bool)
    codes = np.unique(g, return_inverse=True)[1]
    theta, v10, v01 = stats._placements(y, np.asarray(s, float))
    n_cl = codes.max() + 1
    a = np.bincount(codes[y], weights=v10 - theta, minlength=n_cl)
    b = np.bincount(codes[~y], weights=v01 - theta, minlength=n_cl)
    t = a / y.sum() + b / (~y).sum()
    return n_cl / (n_cl - 1.0) * float(t @ t)


def imrmc_variance(y, s, g):
    """doAUCcluster's single-predictor variance (Obuchowski 1997), written from its formulas."""
    y = np.asarray(y).astype(bool)
    X, Y = s[y], s[~y]
    psi = (X[:, None] > Y[None, :]) + 0.5 * (X[:, None] == Y[None, :])
    theta, vx, vy = psi.mean(), psi.mean(1), psi.mean(0)
    ids = np.unique(g)
    VX = np.array([vx[g[y] == c].sum() for c in ids])
    VY = np.array([vy[g[~y] == c].sum() for c in ids])
    m = np.array([(g[y] == c).sum() for c in ids])
    n = np.array([(g[~y] == c).sum() for c in ids])
    I, I10, I01, M, N = len(ids), (m > 0).sum(), (n > 0).sum(), y.sum(), (~y).sum()
    s10 = I10 / ((I10 - 1) * M) * ((VX - m * theta) ** 2).sum()
    s01 = I01 / ((I01 - 1) * N) * ((VY - n * theta) ** 2).sum()
    s11 = I / (I - 1) * ((VX - m * theta) * (VY - n * theta)).sum()
    return s10 / M + s01 / N + 2 * s11 / (M * N)


def item7():
    print("\n# 7. clustered DeLong variance / iMRMC doAUCcluster reference")
    rng = np.random.default_rng(0)
    cases = {}
    y = np.zeros(500, int)
    y[:5] = 1
    cases["5 positives among 500 one-image patients"] = (y, y + rng.normal(size=500), np.arange(500))
    g = np.r_[np.zeros(4), np.ones(3), np.arange(2, 60).repeat(2)].astype(int)
    y2 = (g < 2).astype(int)
    cases["2 positive patients (7 images), 58 negative"] = (y2, y2 + rng.normal(size=g.size) + rng.normal(size=60)[g], g)
    k = rng.integers(1, 5, 300)
    g3 = np.repeat(np.arange(300), k)
    y3 = (rng.random(300) < 0.3)[g3].astype(int)
    cases["300 patients, 1-4 images, 30% positive"] = (y3, y3 + rng.normal(size=g3.size) + rng.normal(size=300)[g3], g3)
    print(f"{'case':<48} {'before':>8} {'after':>8}")
    for name, (yy, ss, gg) in cases.items():
        ref = imrmc_variance(yy, ss, gg)
        print(f"{name:<48} {old_clustered_variance(yy, ss, gg) / ref:8.3f} {stats.delong(yy, ss, groups=gg).variance / ref:8.3f}")
    g1 = np.r_[np.zeros(6, int), np.arange(1, 41)]
    y1 = (g1 == 0).astype(int)
    s1 = y1 + rng.normal(size=g1.size)
    try:
        stats.delong(y1, s1, groups=g1)
        print("every positive in one patient: a finite CI (wrong)")
    except stats.NotEstimable as err:
        print(f"every positive in one patient: before a finite CI ({old_clustered_variance(y1, s1, g1):.2e} variance); "
              f"after NotEstimable ({str(err)[:60]}...)")


def few_positive_patients(rng, n_pat=60, prev=0.15):
    k = rng.integers(1, 5, n_pat)
    g = np.repeat(np.arange(n_pat), k)
    y = (rng.random(n_pat) < prev)[g].astype(int)
    u = rng.normal(size=n_pat)[g]
    a = 0.8 * y + u + 0.5 * rng.normal(size=g.size) + 0.5 * rng.normal(size=n_pat)[g]
    b = 0.8 * y + u + 0.5 * rng.normal(size=g.size) + 0.5 * rng.normal(size=n_pat)[g]
    return y, a, b, g


def item8(sims: int, boot_sims: int):
    print(f"\n# 8. size at alpha 0.05, equal AUCs, ~9 positive of 60 patients with 1-4 images ({sims} datasets;"
          f" the bootstrap ones {boot_sims} datasets x 500 replicates)")
    rng = np.random.default_rng(1)
    rej = {"clustered DeLong, t (Satterthwaite df) [after]": 0, "clustered DeLong, normal reference": 0}
    disagree, done, n_pos = 0, 0, []
    data = []
    while done < sims:
        y, a, b, g = few_positive_patients(rng)
        if len(np.unique(g[y == 1])) < 3:
            continue
        data.append((y, a, b, g))
        r = stats.delong_paired(y, a, b, groups=g)
        n_pos.append(len(np.unique(g[y == 1])))
        rej["clustered DeLong, t (Satterthwaite df) [after]"] += r.p_value < 0.05
        rej["clustered DeLong, normal reference"] += 2 * norm.sf(abs(r.z)) < 0.05
        disagree += (r.p_value < 0.05) != (not r.ci[0] <= 0 <= r.ci[1])
        done += 1
    boot_rej, pct_rej, boot_disagree = 0, 0, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.FewClustersWarning)
        for i, (y, a, b, g) in enumerate(data[:boot_sims]):
            r = stats.bootstrap_auc(y, a, score_b=b, groups=g, n_boot=500, seed=i, n_jobs=1, min_groups=2)
            d = r.replicates[:, 0] - r.replicates[:, 1]
            d = d[np.isfinite(d)]
            p = 2 * norm.sf(abs(r.difference / d.std(ddof=1)))
            excludes = not r.diff_ci_low <= 0 <= r.diff_ci_high
            boot_rej += p < 0.05
            pct_rej += excludes
            boot_disagree += (p < 0.05) != excludes
    nb = min(boot_sims, len(data))
    print(f"mean positive patients {np.mean(n_pos):.1f}")
    for k, v in rej.items():
        print(f"{k:<58} rejects {v / done:.3f}")
    print(f"{'cluster-bootstrap z-test [before]':<58} rejects {boot_rej / nb:.3f}")
    print(f"{'cluster-bootstrap percentile CI excludes 0 [before]':<58} rejects {pct_rej / nb:.3f}")
    print(f"p and CI disagree: before {boot_disagree / nb:.3f} of rows; after {disagree / done:.3f}")

    print(f"\n# 8. coverage of one AUC's 95% patient-cluster bootstrap percentile interval ({boot_sims} datasets each)")
    true = norm.cdf(0.5)  # positive vs negative image from different patients: shift 1, sd 2
    for i10 in (5, 10, 20, 40):
        hits = 0
        for t in range(boot_sims):
            k = rng.integers(1, 5, i10 + 60)
            g = np.repeat(np.arange(i10 + 60), k)
            y = (np.arange(i10 + 60) < i10)[g]
            s = 1.0 * y + rng.normal(size=i10 + 60)[g] + rng.normal(size=g.size)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", stats.FewClustersWarning)
                r = stats.bootstrap_auc(y, s, groups=g, n_boot=400, seed=t, n_jobs=1, min_groups=2)
            hits += r.ci_low <= true <= r.ci_high
        print(f"{i10:>3} positive patients: coverage {hits / boot_sims:.3f}")


def item9(sims: int):
    print("\n# 9. zero variance")
    y = np.array([0, 0, 0, 1, 1, 1])
    a, b = np.arange(6.0), np.zeros(6)
    r = stats.delong_paired(y, a, b)
    d = stats.delong(y, a)
    lg = stats.delong(y, a, method="logit")
    print("3 + 3 rows, perfect vs constant: before z = inf, p = 0, CI [1, 1] (wald and logit)")
    print(f"  after: paired p = {r.p_value:.3f} ({r.method}); AUC 1 CI wald [{d.ci[0]:.3f}, {d.ci[1]:.3f}], "
          f"logit [{lg.ci[0]:.3f}, {lg.ci[1]:.3f}] ({d.method}); p vs 0.5 = {d.p_value:.3f}")
    rng = np.random.default_rng(2)
    dd = 3.65
    true = norm.cdf(dd / math.sqrt(2))
    hits = exact = 0
    for _ in range(sims):
        yy = np.r_[np.zeros(12, int), np.ones(12, int)]
        rr = stats.delong(yy, rng.normal(size=24) + dd * yy)
        hits += rr.ci[0] <= true <= rr.ci[1]
        exact += rr.method == "exact_pairs"
    print(f"true AUC {true:.3f}, 12 + 12 rows: {exact / sims:.2f} of samples at AUC 1; 95% coverage {hits / sims:.3f}"
          " (before: every AUC-1 sample had CI [1, 1], which misses)")


def item10(sims: int):
    print(f"\n# 10. within-pair AUC, 30 patients x 5 pairs, patient effect ({sims} datasets)")
    rng = np.random.default_rng(3)
    true = norm.cdf(0.5 / math.sqrt(2))
    hits = naive = 0
    for _ in range(sims):
        u = rng.normal(size=30)
        d = 0.5 + np.repeat(u, 5) + rng.normal(size=150)
        df = pd.DataFrame({"pair": np.repeat(np.arange(150), 2), "patient": np.repeat(np.repeat(np.arange(30), 5), 2),
                           "arm": np.tile([0, 1], 150), "s": np.c_[np.zeros(150), d].reshape(-1)})
        r = stats.within_pair_table(df, ["s"], "pair", group_col="patient").iloc[0]
        w = stats.within_pair_table(df, ["s"], "pair").iloc[0]
        hits += r.ci_low <= true <= r.ci_high
        naive += w.ci_low <= true <= w.ci_high
    print(f"95% coverage: Wilson over pairs [before] {naive / sims:.3f}; design-effect Wilson [after] {hits / sims:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sims", type=int, default=2000, help="datasets for the fast procedures")
    ap.add_argument("--boot-sims", type=int, default=300, help="datasets for the bootstrap procedures")
    args = ap.parse_args()
    item7()
    item8(args.sims, args.boot_sims)
    item9(min(args.sims, 1000))
    item10(min(args.sims, 500))


if __name__ == "__main__":
    main()
