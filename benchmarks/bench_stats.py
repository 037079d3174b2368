"""Benchmark cxrcore.stats and cxrcore.probes against the issue-6 targets, side by side.

Run: .venv/bin/python benchmarks/bench_stats.py [--quick]
Prints each timing, the ratio to its baseline measured in the same run, and the target.
Every timing is the best of several repeats (the minimum is the least noisy estimate on a
shared machine). --quick shrinks the probe to 20,000 rows for a fast smoke run.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
from sklearn.metrics import roc_auc_score

from cxrcore import stats
from cxrcore.probes import LinearProbe, grouped_folds, out_of_fold_scores


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def naive_delong_paired(y, a, b):
    """The textbook O(m*n) DeLong test: full pair matrices, no ranks."""
    y = y.astype(bool)
    comps = []
    for s in (a, b):
        x, z = s[y], s[~y]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        comps.append((psi.mean(), psi.mean(axis=1), psi.mean(axis=0)))
    (auc_a, v10a, v01a), (auc_b, v10b, v01b) = comps
    cov = np.cov(np.vstack([v10a, v10b])) / v10a.size + np.cov(np.vstack([v01a, v01b])) / v01a.size
    return (auc_a - auc_b) / np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])


def paired_scores(n: int, prevalence: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    a = y * 1.0 + rng.normal(size=n)
    b = 0.7 * a + 0.3 * y + rng.normal(size=n)
    return y, a, b


def report(name: str, value: str, ratio: str, target: str, ok: bool) -> None:
    print(f"{name:<52} {value:>12} {ratio:>14}   target {target:<12} {'PASS' if ok else 'MISS'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="probe on 20,000 rows instead of 100,000")
    ap.add_argument("--probe-folds", type=int, default=5, help="outer folds to fit (of 5)")
    args = ap.parse_args()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"# {platform.machine()}, {cores} cores, numpy {np.__version__}{load}")

    # 1. paired DeLong vs two sklearn AUCs at n = 100,000
    y, a, b = paired_scores(100_000, 0.3)
    t_fast = best_of(lambda: stats.delong_paired(y, a, b), 7)
    t_sk = best_of(lambda: (roc_auc_score(y, a), roc_auc_score(y, b)), 7)
    report("paired DeLong n=100,000 / two roc_auc_score", f"{t_fast * 1e3:.1f} ms",
           f"{t_fast / t_sk:.2f}x", "<= 2x", t_fast / t_sk <= 2)

    # 2. fast vs naive O(n^2) at n = 10,000 (balanced: the largest pair matrix)
    y, a, b = paired_scores(10_000, 0.5, seed=1)
    z_fast = stats.delong_paired(y, a, b).z
    z_naive = naive_delong_paired(y, a, b)
    assert abs(z_fast - z_naive) < 1e-9 * max(1.0, abs(z_naive)), (z_fast, z_naive)
    t_fast = best_of(lambda: stats.delong_paired(y, a, b), 20)
    t_naive = best_of(lambda: naive_delong_paired(y, a, b), 3)
    report("paired DeLong n=10,000: naive O(n^2) / fast", f"{t_fast * 1e3:.2f} ms",
           f"{t_naive / t_fast:.0f}x faster", ">= 200x", t_naive / t_fast >= 200)

    # 3. 2,000 stratified bootstrap replicates at n = 100,000
    for prev in (0.3, 0.01):
        y, a, b = paired_scores(100_000, prev, seed=2)
        for jobs in (2, 1):
            t = best_of(lambda: stats.bootstrap_auc(y, a, n_boot=2000, n_jobs=jobs), 2)
            report(f"bootstrap 2,000 reps n=100,000 prev={prev} n_jobs={jobs}", f"{t:.2f} s", "",
                   "<= 10 s", t <= 10)
        t = best_of(lambda: stats.bootstrap_auc(y, a, b, n_boot=2000, method="bca", n_jobs=2), 1)
        report(f"  paired + BCa, prev={prev} n_jobs=2", f"{t:.2f} s", "", "(info)", True)

    # 4. patient-clustered statistics at n = 100,000 rows: 50,000 patients with one negative and
    # one positive image each (the perturbation panel's design, where every patient is mixed)
    rng = np.random.default_rng(4)
    pid = np.repeat(np.arange(50_000), 2)
    y = np.tile([0, 1], 50_000)
    u = rng.normal(size=50_000)[pid]
    a = 0.3 * y + u + rng.normal(size=pid.size)
    b = 0.2 * y + u + rng.normal(size=pid.size)
    t_cl = best_of(lambda: stats.delong_paired(y, a, b, groups=pid), 5)
    t_plain = best_of(lambda: stats.delong_paired(y, a, b), 5)
    report("clustered / plain paired DeLong, n=100,000", f"{t_cl * 1e3:.1f} ms", f"{t_cl / t_plain:.2f}x",
           "(info)", True)
    t = best_of(lambda: stats.bootstrap_auc(y, a, b, groups=pid, n_boot=2000, n_jobs=2), 1)
    report("patient-cluster bootstrap, paired, 2,000 reps, n=100,000", f"{t:.2f} s", "", "(info)", True)

    # 5. one AUC with its interval at n = 100,000: the default (score interval since issue 12's
    # second round) and the Wald one, plain and clustered (the book's box-level call)
    t_def = best_of(lambda: stats.delong(y, a), 7)
    t_wald = best_of(lambda: stats.delong(y, a, method="wald"), 7)
    report("delong default / wald, n=100,000", f"{t_def * 1e3:.1f} ms", f"{t_def / t_wald:.2f}x", "(info)", True)
    t_def = best_of(lambda: stats.delong(y, a, groups=pid), 7)
    t_wald = best_of(lambda: stats.delong(y, a, groups=pid, method="wald"), 7)
    report("  clustered, default / wald", f"{t_def * 1e3:.1f} ms", f"{t_def / t_wald:.2f}x", "(info)", True)

    # 6. the stratum gap: 2,000 joint replicates, 20,000 images (3 per patient, 30% positive)
    rng = np.random.default_rng(6)
    pid3 = np.arange(20_000) // 3
    yg = (rng.random(pid3.max() + 1) < 0.3)[pid3].astype(int)
    st = np.where(yg == 1, np.where(rng.random(20_000) < 0.5, "small", "large"), "none")
    sg = yg + rng.normal(size=pid3.max() + 1)[pid3] + rng.normal(size=20_000)
    t = best_of(lambda: stats.bootstrap_auc_gap(yg, sg, st, n_boot=2000), 1)
    report("stratum gap bootstrap 2,000 reps n=20,000, rows", f"{t:.2f} s", "", "(info)", True)
    try:
        t = best_of(lambda: stats.bootstrap_auc_gap(yg, sg, st, n_boot=2000, groups=pid3), 1)
        report("  patients resampled", f"{t:.2f} s", "", "(info)", True)
    except TypeError:  # before issue 12's second round the gap could not resample patients
        report("  patients resampled", "n/a", "", "(info)", True)

    # 7. the probe on 100,000 x 768 float32 (one row per image, 3 images per patient)
    n = 20_000 if args.quick else 100_000
    d = 768
    rng = np.random.default_rng(3)
    # Low-rank structure plus noise, like real embeddings (correlated features).
    latent = rng.normal(size=(n, 32)).astype(np.float32)
    X = latent @ rng.normal(size=(32, d)).astype(np.float32) + rng.normal(size=(n, d)).astype(np.float32)
    y = ((latent[:, 0] + latent[:, 1] + rng.normal(size=n)) > 1.2).astype(int)
    pid = np.arange(n) // 3
    t0 = time.perf_counter()
    folds = grouped_folds(y, pid, n_splits=5, seed=0)
    t_folds = time.perf_counter() - t0
    t0 = time.perf_counter()
    if args.probe_folds < 5:
        for k in range(args.probe_folds):
            LinearProbe().fit(X[folds != k], y[folds != k], groups=pid[folds != k])
        s = None
    else:
        s = out_of_fold_scores(X, y, pid, folds=folds)
    t_probe = time.perf_counter() - t0
    extra = f", OOF AUC {stats.auc(y, s):.3f}" if s is not None else ""
    print(f"probe {n:,} x {d} float32: grouped_folds {t_folds:.1f} s; {args.probe_folds} outer fold(s) "
          f"(inner 3-fold CV over 5 Cs on <= 20,000 rows, refit on the rest) {t_probe:.1f} s "
          f"= {t_probe / args.probe_folds:.1f} s per fold{extra}")


if __name__ == "__main__":
    main()
