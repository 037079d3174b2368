"""Out-of-fold probes at the paper's scale: wall time and peak memory, old path vs new, side by side.

    .venv/bin/python benchmarks/bench_probe_scale.py [--quick] [--n N] [--d D] [--folds K]

Embeddings of ViT-7B width: 500,000 rows x 4,096 float32 features (8.2 GB), four images per
patient, a 10% label carried by a low-rank latent and by a quarter of the features, features
with offsets and scales unlike a standardised matrix (a few "massive" dimensions, as ViTs
have). Patient-grouped 5-fold plan; each outer fold chooses C over the default grid by the
grouped inner CV and refits. Wall time on a shared machine moves with its load; CPU time
(user + system of the path's process) is printed beside it as the steadier figure.

Every path runs in its own fresh subprocess on the same data (generated there from one seed),
so ru_maxrss is that path's peak; "above data" is the peak minus the resident size once X is
built. Each runs under an address-space limit of the memory free at its start (less 1 GB),
so a path that does not fit stops with MemoryError rather than push other processes out of
memory. Paths:

- old: ``cxrcore/probes.py`` as of commit 33c25df (before this benchmark), read from git:
  each fold copies ``X[~test]``; StandardScaler.fit makes a float64 ``X - mean``; the
  standardised copy is fitted by scikit-learn's lbfgs.
- sklearn: ``LinearProbe(solver="sklearn")`` now: rows passed by index, scaler fitted in
  chunks, one standardised float32 copy of the training rows for scikit-learn.
- torch: ``LinearProbe(solver="torch")`` on the CPU (what solver="auto" picks at these
  sizes): the same objective and L-BFGS-B call, computed in torch from X itself.
- torch-cuda: the same on the GPU, printed only where CUDA is available.

Each path runs the body of its version's ``out_of_fold_scores`` fold by fold (fit on the
other folds, score the held-out one), keeping the fitted probes to report C, iterations and
the final gradient norm. --folds K fits the first K outer folds only (time is also reported
per fold). --quick: 50,000 x 1,024, all 5 folds, for ``make bench``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

OLD_COMMIT = "33c25df34ae158d969afc6cc364b6a9cf8363671"  # last change to cxrcore/probes.py before the rewrite
ROOT = Path(__file__).resolve().parents[1]
GB = 1e9


def make_data(n: int, d: int, seed: int = 0):
    """Embedding-like float32 X built in chunks (no float64 temporary), labels, patient ids.

    The label is carried both by a 16-d latent that every feature mixes and by the own
    variation of a quarter of the features, so that the inner CV picks a C inside the grid.
    """
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, 16), dtype=np.float32)
    mix = (rng.standard_normal((16, d), dtype=np.float32) / 4.0).astype(np.float32)
    scale = np.exp(rng.normal(0.0, 0.5, d)).astype(np.float32)
    offset = rng.normal(0.0, 1.0, d).astype(np.float32)
    massive = rng.choice(d, size=max(1, d // 512), replace=False)
    scale[massive] *= 30.0
    offset[massive] += 100.0
    k = max(1, d // 4)
    direct = np.empty(n, dtype=np.float32)
    X = np.empty((n, d), dtype=np.float32)
    step = max(1, (64 << 20) // (4 * d))
    for s in range(0, n, step):
        e = min(n, s + step)
        rng.standard_normal(out=X[s:e], dtype=np.float32)
        direct[s:e] = X[s:e, :k].sum(axis=1) / np.sqrt(k)
        X[s:e] += latent[s:e] @ mix
        X[s:e] *= scale
        X[s:e] += offset
    signal = latent[:, 0] + 0.5 * latent[:, 1] + 1.5 * direct + rng.standard_normal(n, dtype=np.float32)
    y = (signal > np.quantile(signal, 0.9)).astype(np.int64)
    pid = np.arange(n) // 4
    return X, y, pid


def rss_now() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def vm_size() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def mem_available() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return float("inf")


def load_old_probes():
    """The probes module as of OLD_COMMIT, imported standalone from git (it needs only numpy/sklearn)."""
    import importlib.util

    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:cxrcore/probes.py"],
                         capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "probes_old.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("probes_old", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def child(args) -> None:
    """Run one path; print one JSON line."""
    out = {"path": args.child}
    import torch  # noqa: F401  (loaded in every path, as `import cxrcore` does, so RSS compares like with like)

    if args.child == "old":
        probes = load_old_probes()
    else:
        from cxrcore import probes
    from sklearn.base import clone
    from sklearn.metrics import roc_auc_score

    # every path may use the address space mapped now (libraries) plus the memory free at
    # launch less 1 GB: a path that does not fit stops with MemoryError instead of waking
    # the kernel's OOM killer on a shared machine
    limit = vm_size() + int(args.mem_limit)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    X, y, pid = make_data(args.n, args.d)
    folds = probes.grouped_folds(y, pid, n_splits=5, seed=0)
    base = rss_now()
    out.update(x_bytes=X.nbytes, base_rss=base)
    if args.child == "old":
        probe = probes.LinearProbe()
    else:
        probe = probes.LinearProbe(solver="sklearn" if args.child == "sklearn" else "torch",
                                   device="cuda" if args.child == "torch-cuda" else "cpu")
    fitted = []
    ru = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = ru.ru_utime + ru.ru_stime
    t0 = time.perf_counter()
    try:
        # the body of each version's out_of_fold_scores, fold by fold, keeping the fitted
        # probes so that their C, iterations and gradient norms can be reported
        scores = np.full(args.n, np.nan)
        for k in range(min(args.folds, 5)):
            test = folds == k
            est = clone(probe)
            if args.child == "old":
                est.fit(X[~test], y[~test], groups=pid[~test])
                scores[test] = est.decision_function(X[test])
            else:
                est.fit(X, y[~test], groups=pid[~test], rows=np.flatnonzero(~test))
                scores[test] = est.decision_function(X, rows=np.flatnonzero(test))
            fitted.append(est)
        rows = np.flatnonzero(folds < args.folds)
        out["auc"] = float(roc_auc_score(y[rows], scores[rows]))
        out["ok"] = True
    except MemoryError as err:
        out.update(ok=False, error=f"MemoryError: {err}"[:200])
    out["wall"] = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu"] = ru.ru_utime + ru.ru_stime - cpu0
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if fitted:
        out["C"] = [e.C_ for e in fitted]
        if hasattr(fitted[0], "grad_max_"):
            out["grad_max"] = max(e.grad_max_ for e in fitted)
            out["converged"] = all(e.converged_ for e in fitted)
            out["n_iter"] = [e.n_iter_ for e in fitted]
    if args.child == "torch-cuda":
        import torch

        out["gpu_peak"] = torch.cuda.max_memory_allocated()
    print(json.dumps(out), flush=True)


def run_child(path: str, args, mem_limit: float) -> dict:
    cmd = [sys.executable, __file__, "--child", path, "--n", str(args.n), "--d", str(args.d),
           "--folds", str(args.folds), "--mem-limit", str(int(mem_limit))]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"path": path, "ok": False, "error": f"exit {proc.returncode}: " + " | ".join(tail),
                "wall": time.perf_counter() - t0}
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="50,000 x 1,024 instead of 500,000 x 4,096")
    ap.add_argument("--n", type=int, default=None, help="rows (default 500,000; --quick 50,000)")
    ap.add_argument("--d", type=int, default=None, help="features (default 4,096; --quick 1,024)")
    ap.add_argument("--folds", type=int, default=5, help="outer folds to fit (of 5)")
    ap.add_argument("--paths", default="old,sklearn,torch,torch-cuda", help="comma-separated subset of the paths")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--mem-limit", type=float, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.n = args.n or (50_000 if args.quick else 500_000)
    args.d = args.d or (1_024 if args.quick else 4_096)
    if args.child:
        return child(args)

    import torch

    paths = [p for p in args.paths.split(",") if p != "torch-cuda" or torch.cuda.is_available()]
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    print(f"# {args.n:,} x {args.d:,} float32 = {args.n * args.d * 4 / GB:.1f} GB; {args.folds} of 5 outer folds; "
          f"{cores} cores, load average {os.getloadavg()[0]:.1f}, {mem_available() / GB:.1f} GB available; "
          f"CUDA {'yes' if torch.cuda.is_available() else 'no (no GPU column)'}", flush=True)
    res = {}
    for p in paths:
        res[p] = run_child(p, args, mem_limit=max(1e9, mem_available() - 1e9))
        r = res[p]
        print(f"  {p:<10} {'ok' if r.get('ok') else r.get('error', 'failed')}  {r.get('wall', float('nan')):.1f} s",
              flush=True)

    def cell(p, key):
        r = res.get(p, {})
        if key == "wall":
            return f"{r['wall']:.1f} s" if r.get("ok") else f"({r['wall']:.0f} s) --"
        if key == "cpu":
            return f"{r['cpu']:.1f} s" if r.get("ok") else "--"
        if key == "per_fold":
            return f"{r['wall'] / args.folds:.1f} s" if r.get("ok") else "--"
        if key == "peak":
            return f"{r['peak_rss'] / GB:.2f} GB" if "peak_rss" in r else "--"
        if key == "above":
            return f"{(r['peak_rss'] - r['base_rss']) / r['x_bytes']:.2f} x X" if "peak_rss" in r else "--"
        if key == "gpu":
            return f"{r['gpu_peak'] / GB:.2f} GB" if "gpu_peak" in r else ""
        if key == "auc":
            return f"{r['auc']:.4f}" if "auc" in r else "--"
        if key == "grad":
            return f"{r['grad_max']:.1e}" if "grad_max" in r else ""
        return ""

    cols = paths
    print(f"\n{'':<34}" + "".join(f"{p:>18}" for p in cols))
    for label, key in [("wall time (all fitted folds)", "wall"), ("  per outer fold", "per_fold"),
                       ("CPU time (user + system)", "cpu"),
                       ("peak RSS", "peak"), ("  peak above data (multiple of X)", "above"),
                       ("GPU peak allocated", "gpu"), ("out-of-fold AUC", "auc"),
                       ("max |gradient| of final fits", "grad")]:
        row = [cell(p, key) for p in cols]
        if any(row):
            print(f"{label:<34}" + "".join(f"{c:>18}" for c in row))
    old = res.get("old", {})
    print()
    for p in cols:
        r = res[p]
        if p == "old" or not r.get("ok"):
            continue
        if old.get("ok"):
            t = f"time {r['wall'] / old['wall']:.2f}x old (CPU {r['cpu'] / old['cpu']:.2f}x)"
            m = f"peak RSS {r['peak_rss'] / old['peak_rss']:.2f}x old, above-data {((r['peak_rss'] - r['base_rss']) / max(1, old['peak_rss'] - old['base_rss'])):.2f}x old"
            a = f"|AUC - old| = {abs(r['auc'] - old['auc']):.1e}"
        else:
            t = "time: old did not finish"
            m = f"old stopped at {old.get('peak_rss', float('nan')) / GB:.1f} GB ({old.get('error', '')[:40]})"
            a = ""
        print(f"{p:<10} {t}; {m}; {a}")
    if "sklearn" in res and "torch" in res and res["sklearn"].get("ok") and res["torch"].get("ok"):
        print(f"torch vs sklearn: time {res['torch']['wall'] / res['sklearn']['wall']:.2f}x, "
              f"|AUC difference| {abs(res['torch']['auc'] - res['sklearn']['auc']):.1e}, "
              f"C per fold {res['torch'].get('C')} vs {res['sklearn'].get('C')}")


if __name__ == "__main__":
    main()
