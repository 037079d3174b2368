"""Seeded simulations behind the statistics the book reports (issue 12, items 7-10, and its second round).

Run: .venv/bin/python benchmarks/sim_stats.py [--sims 2000] [--boot-sims 300] [--only near1,swap,...]
Prints, side by side in one run, each procedure against the one it replaced:
  near1. non-coverage of one AUC's 95% interval near AUC 1 in three designs (rows, box
         level: a lesion and a control box per image, multi-image patients): the old
         default (Wald on DeLong / Obuchowski variance, uncapped df, exact pairs at 0),
         the logit interval and the score interval now the default; and the jump at AUC 1;
  swap.  the paired-swap p of a perfect against a constant score, raw scores (before)
         against ranks (after), as the constant and the scale change;
  gap.   non-coverage of a true stratum gap of 0, rows (before) against patients resampled;
  df.    the Satterthwaite df against patients - 1, and size and coverage before/after
         the cap, where patients hold both classes;
  7.     the clustered DeLong variance against iMRMC's doAUCcluster formula (ratio 1 is right);
  8.     the rejection rate of true nulls at alpha 0.05 with ~9 positive patients, and how often
         p and CI disagree; the coverage of a patient-cluster bootstrap interval and of the
         clustered score interval by number of positive patients (the basis of MIN_GROUPS,
         FEW_GROUPS and the FewClustersWarning in cxrcore.stats);
  9.     p and interval for a perfect against a constant score (3 + 3 rows);
 10.     the coverage of the within-pair AUC interval with 30 patients x 5 pairs.
The fast tests in tests/test_stats.py check the same properties with fewer samples.
"""

from __future__ import annotations

import argparse
import math
import warnings

import itertools

import numpy as np
import pandas as pd
from scipy.stats import beta as beta_dist
from scipy.stats import norm
from scipy.stats import t as t_dist

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


def old_welch_df(y, s, g):
    """The replaced df: Welch-Satterthwaite on I10 - 1 and I01 - 1, not capped at I - 1."""
    y = np.asarray(y).astype(bool)
    cl = stats._clusters(g, y)
    a, v10, v01 = stats._placements(y, np.asarray(s, float))
    s10, s01, s11 = stats._obuchowski(cl, int(y.sum()), int((~y).sum()), stats._cluster_sums(cl, y, a, v10, v01))
    den = s10**2 / (cl.n_pos - 1.0) + s01**2 / (cl.n_neg - 1.0)
    return ((s10 + s01) ** 2 / den if den > 0 else math.inf), max(s10 + s01 + s11, 0.0), cl


def old_default_ci(y, s, g=None, level=0.95):
    """The replaced default interval of delong(): Wald (uncapped df), exact Clopper-Pearson pairs at variance 0."""
    y = np.asarray(y).astype(bool)
    a, v10, v01 = stats._placements(y, np.asarray(s, float))
    m, n = int(y.sum()), int((~y).sum())
    if g is None:
        var, df, k = stats._variance(v10, v01), math.inf, min(m, n)
    else:
        df, var, cl = old_welch_df(y, s, g)
        both = int((cl.has_pos & cl.has_neg).sum())
        pos_only, neg_only = cl.n_pos - both, cl.n_neg - both
        k_mixed = min(abs(pos_only - neg_only), both)
        k = min(pos_only, neg_only) + k_mixed + (both - k_mixed) // 2
    if var <= 0:
        x, al = a * k, 1 - level
        lo = 0.0 if x <= 0 else float(beta_dist.ppf(al / 2, x, k - x + 1))
        hi = 1.0 if x >= k else float(beta_dist.ppf(1 - al / 2, x + 1, k - x))
        return lo, hi
    q = norm.ppf(0.5 + level / 2) if math.isinf(df) else t_dist.ppf(0.5 + level / 2, df)
    return max(0.0, a - q * math.sqrt(var)), min(1.0, a + q * math.sqrt(var))


def _miss(samples, target, fn):
    return float(np.mean([not (lambda c: c[0] <= target <= c[1])(fn(y, s, g)) for y, s, g in samples]))


def _coverage_row(label, samples, target):
    before = _miss(samples, target, old_default_ci)
    logit = _miss(samples, target, lambda y, s, g: stats.delong(y, s, groups=g, method="logit").ci)
    after = _miss(samples, target, lambda y, s, g: stats.delong(y, s, groups=g).ci)
    print(f"{label:<58} {before:8.3f} {logit:8.3f} {after:8.3f}")
    return before, after


def item_near1(sims: int):
    print(f"\n# near1. non-coverage of one AUC's 95% interval near 1 ({sims} datasets each)")
    print(f"{'design, true AUC':<58} {'before':>8} {'logit':>8} {'after':>8}")
    rng = np.random.default_rng(7)
    befores, afters = [], []
    for true in (0.95, 0.98, 0.99, 0.995):
        d = math.sqrt(2) * norm.ppf(true)
        for m in (10, 20, 40):
            y = np.r_[np.ones(m, int), np.zeros(m, int)]
            b, a = _coverage_row(f"rows {m} + {m}, AUC {true}", [(y, rng.normal(size=2 * m) + d * y, None)
                                                                for _ in range(sims)], true)
            befores.append(b), afters.append(a)
    rng = np.random.default_rng(21)
    for true in (0.95, 0.98, 0.99):
        d = norm.ppf(true) * 2.0  # image effect sd 1, noise sd 1: between-image AUC `true`
        for i in (15, 30, 60):
            g, y = np.repeat(np.arange(i), 2), np.tile([1, 0], i)
            samples = [(y, d * y + rng.normal(size=i)[g] + rng.normal(size=2 * i), g) for _ in range(sims)]
            target = float(np.mean([stats.auc(y, s) for _, s, _ in samples]))  # E[AUC^], within-image pairs included
            b, a = _coverage_row(f"box level, {i} images (lesion + control), AUC {true}", samples, target)
            befores.append(b), afters.append(a)
    rng = np.random.default_rng(123)
    for true in (0.7, 0.95, 0.99):
        d = norm.ppf(true) * 2.0
        for n_per in (6, 10, 20, 50):
            samples = []
            for _ in range(sims):
                g = np.repeat(np.arange(2 * n_per), rng.integers(1, 5, 2 * n_per))
                y = (g < n_per).astype(int)
                samples.append((y, d * y + rng.normal(size=2 * n_per)[g] + rng.normal(size=g.size), g))
            b, a = _coverage_row(f"{n_per} + {n_per} patients with 1-4 images, AUC {true}", samples, true)
            befores.append(b), afters.append(a)
    print(f"range over these designs: before {min(befores):.3f}-{max(befores):.3f}, after {min(afters):.3f}-{max(afters):.3f}")
    print("\nthe jump at AUC 1, 20 + 20 rows (one positive moved below 0, 1, 2, 5 negatives):")
    y = np.r_[np.ones(20, int), np.zeros(20, int)]
    base = np.r_[np.arange(20) + 100.0, np.arange(20.0)]
    for k in (0, 1, 2, 5):
        s = base.copy()
        if k:
            s[0] = 19.5 - k
        after = stats.delong(y, s)
        lo, hi = old_default_ci(y, s)
        old = stats.delong(y, s, method="wald") if k else None
        p_old = "1.9e-06 (exact pairs)" if not k else f"{old.p_value:.2g}"
        print(f"  {k} discordant pair(s): AUC {after.auc:.4f}; before [{lo:.4f}, {hi:.4f}] p {p_old}; "
              f"after [{after.ci[0]:.4f}, {after.ci[1]:.4f}] p {after.p_value:.2g}")


def item_swap():
    print("\n# swap. paired-swap p, 3 + 3 rows, perfect score a against a constant b (AUCs 1 and 0.5 throughout)")
    y = np.array([0, 0, 0, 1, 1, 1])

    def raw_swap_p(a, b):
        d0 = abs(stats.auc(y, a) - stats.auc(y, b))
        hits = 0
        for sw in itertools.product([False, True], repeat=6):
            sw = np.array(sw)
            hits += abs(stats.auc(y, np.where(sw, b, a)) - stats.auc(y, np.where(sw, a, b))) >= d0 - 1e-12
        return hits / 64

    a = np.arange(6.0)
    for name, aa, c in (("a, b = 0", a, 0.0), ("a, b = 2.5", a, 2.5), ("a, b = 100", a, 100.0),
                        ("exp(a), b = 0", np.exp(a), 0.0), ("a - 2.5, b = 0", a - 2.5, 0.0)):
        b = np.full(6, c)
        print(f"  {name:<16} before (raw scores) {raw_swap_p(aa, b):.4f}   after (ranks) "
              f"{stats.delong_paired(y, aa, b).p_value:.4f}")


def item_gap(sims: int, n_boot: int = 400):
    print(f"\n# gap. 95% CI of a true stratum gap of 0, 60 patients x 3 images, patient effect sd 1.5 ({sims} datasets)")
    rng = np.random.default_rng(11)
    miss_rows = miss_pat = skipped = 0
    wr, wp = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.FewClustersWarning)
        for t in range(sims):
            g = np.repeat(np.arange(60), 3)
            pos = rng.random(60) < 0.4
            st_p = np.where(rng.random(60) < 0.5, "small", "large")
            y = pos[g].astype(int)
            st = np.where(y == 1, st_p[g], "none")
            s = 1.0 * y + 1.5 * rng.normal(size=60)[g] + rng.normal(size=g.size)
            try:
                p = stats.bootstrap_auc_gap(y, s, st, n_boot=n_boot, seed=t, groups=g)
            except stats.NotEstimable:  # fewer than 5 patients in a stratum
                skipped += 1
                continue
            r = stats.bootstrap_auc_gap(y, s, st, n_boot=n_boot, seed=t)
            miss_rows += not r.ci_low <= 0 <= r.ci_high
            miss_pat += not p.ci_low <= 0 <= p.ci_high
            wr.append(r.ci_high - r.ci_low), wp.append(p.ci_high - p.ci_low)
    done = sims - skipped
    print(f"  non-coverage: rows resampled [before] {miss_rows / done:.3f}; patients resampled [after] "
          f"{miss_pat / done:.3f}; median width {np.median(wr):.3f} vs {np.median(wp):.3f} ({skipped} datasets "
          "with fewer than 5 patients in a stratum left out)")


def item_df(sims: int):
    print(f"\n# df. patients holding both classes ({sims} datasets each): median df and 5% size / 95% non-coverage")
    print(f"{'design':<52} {'df before':>9} {'df after':>8} {'before':>8} {'after':>8} {'score':>8}")
    rng = np.random.default_rng(55)

    def row(label, gen, i, target=None, paired=False):
        dfb, dfa, rb, ra, rs = [], [], 0, 0, 0
        for _ in range(sims):
            y, a, b, g = gen()
            if paired:
                r = stats.delong_paired(y, a, b, groups=g)
                if r.method != "delong_clustered":
                    continue
                # the old df: Welch-Satterthwaite of the differenced placements, uncapped
                cl = stats._clusters(g, np.asarray(y).astype(bool))
                yy = np.asarray(y).astype(bool)
                aa, v10a, v01a = stats._placements(yy, a)
                bb, v10b, v01b = stats._placements(yy, b)
                sa, sb = stats._cluster_sums(cl, yy, aa, v10a, v01a), stats._cluster_sums(cl, yy, bb, v10b, v01b)
                s10, s01, _ = stats._obuchowski(cl, int(yy.sum()), int((~yy).sum()), (sa[0] - sb[0], sa[1] - sb[1]))
                d_old = (s10 + s01) ** 2 / (s10**2 / (cl.n_pos - 1) + s01**2 / (cl.n_neg - 1))
                dfb.append(d_old), dfa.append(r.df)
                rb += 2 * t_dist.sf(abs(r.z), d_old) < 0.05
                ra += r.p_value < 0.05
            else:
                w = stats.delong(y, a, groups=g, method="wald")
                if not np.isfinite(w.ci[0]) or w.variance <= 0:
                    continue
                d_old = old_welch_df(y, a, g)[0]
                dfb.append(d_old), dfa.append(w.df)
                q_old = t_dist.ppf(0.975, d_old)
                rb += not (w.auc - q_old * w.se <= target <= w.auc + q_old * w.se)
                ra += not (w.ci[0] <= target <= w.ci[1])
                c = stats.delong(y, a, groups=g).ci
                rs += not (c[0] <= target <= c[1])
        k = len(dfb)
        score = "-" if paired else f"{rs / k:.3f}"
        print(f"{label:<52} {np.median(dfb):9.1f} {np.median(dfa):8.1f} {rb / k:8.3f} {ra / k:8.3f} {score:>8}")

    for i in (6, 10, 20):
        def gen(i=i):
            g, y = np.repeat(np.arange(i), 4), np.tile([1, 1, 0, 0], i)
            base = 0.5 * (1 + 1.5 * rng.normal(size=i))[g] * (2 * y - 1)
            return y, base + rng.normal(size=g.size), base + rng.normal(size=g.size), g
        row(f"paired test, I = {i} patients (2+, 2-), size", gen, i, paired=True)
    for i in (6, 10, 20):
        def gen(i=i):
            g, y = np.repeat(np.arange(i), 4), np.tile([1, 1, 0, 0], i)
            base = 0.5 * (1 + 1.5 * rng.normal(size=i))[g] * (2 * y - 1)
            return y, base + rng.normal(size=g.size), None, g
        target = float(np.mean([stats.auc(*gen()[:2]) for _ in range(20000)]))
        row(f"one AUC (Wald), I = {i} patients (2+, 2-), non-coverage", gen, i, target=target)
    print("(score: the default clustered score interval, with the capped df)")


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

    print(f"\n# 8. coverage of one AUC's 95% interval by positive patients (1-4 images each, 60 negative "
          f"patients; {boot_sims} datasets each): patient-cluster bootstrap percentile, the Wald interval on "
          "Obuchowski's variance (the old default) and the clustered score interval (the default now)")
    true = norm.cdf(0.5)  # positive vs negative image from different patients: shift 1, sd 2
    for shift, label in ((1.0, "AUC 0.69"), (4.1, "AUC 0.98")):
        true = norm.cdf(shift / 2.0)
        for i10 in (5, 10, 20, 40):
            hits = {"bootstrap": 0, "wald": 0, "score": 0}
            for t in range(boot_sims):
                k = rng.integers(1, 5, i10 + 60)
                g = np.repeat(np.arange(i10 + 60), k)
                y = (np.arange(i10 + 60) < i10)[g]
                s = shift * y + rng.normal(size=i10 + 60)[g] + rng.normal(size=g.size)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", stats.FewClustersWarning)
                    r = stats.bootstrap_auc(y, s, groups=g, n_boot=400, seed=t, n_jobs=1, min_groups=2)
                hits["bootstrap"] += r.ci_low <= true <= r.ci_high
                lo, hi = old_default_ci(y, s, g)
                hits["wald"] += lo <= true <= hi
                c = stats.delong(y, s, groups=g).ci
                hits["score"] += c[0] <= true <= c[1]
            print(f"{label}, {i10:>3} positive patients: coverage " +
                  ", ".join(f"{k} {v / boot_sims:.3f}" for k, v in hits.items()))


def item9(sims: int):
    print("\n# 9. zero variance")
    y = np.array([0, 0, 0, 1, 1, 1])
    a, b = np.arange(6.0), np.zeros(6)
    r = stats.delong_paired(y, a, b)
    d = stats.delong(y, a)
    print("3 + 3 rows, perfect vs constant: first round before: z = inf, p = 0, CI [1, 1]; first round after: "
          "paired-swap p 0.25 (raw scores), exact-pairs CI [0.292, 1], p 0.25")
    print(f"  now: paired p = {r.p_value:.4f} ({r.method}, ranks); AUC 1 CI [{d.ci[0]:.3f}, {d.ci[1]:.3f}] "
          f"({d.method}); p vs 0.5 = {d.p_value:.3f} (score test)")
    rng = np.random.default_rng(2)
    dd = 3.65
    true = norm.cdf(dd / math.sqrt(2))
    hits = perfect = 0
    for _ in range(sims):
        yy = np.r_[np.zeros(12, int), np.ones(12, int)]
        rr = stats.delong(yy, rng.normal(size=24) + dd * yy)
        hits += rr.ci[0] <= true <= rr.ci[1]
        perfect += rr.auc == 1.0
    print(f"true AUC {true:.3f}, 12 + 12 rows: {perfect / sims:.2f} of samples at AUC 1; 95% coverage {hits / sims:.3f}")


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
    ap.add_argument("--only", default="near1,swap,gap,df,7,8,9,10", help="comma-separated sections to run")
    args = ap.parse_args()
    only = set(args.only.split(","))
    sections = {"near1": lambda: item_near1(min(args.sims, 1000)), "swap": item_swap,
                "gap": lambda: item_gap(args.boot_sims), "df": lambda: item_df(args.sims), "7": item7,
                "8": lambda: item8(args.sims, args.boot_sims), "9": lambda: item9(min(args.sims, 1000)),
                "10": lambda: item10(min(args.sims, 500))}
    for name, run in sections.items():
        if name in only:
            run()


if __name__ == "__main__":
    main()
