"""Wall time of `make book` on the default parameters, per notebook and in total.

    .venv/bin/python benchmarks/bench_book.py           # default parameters (target: < 600 s on 2 cores)
    .venv/bin/python benchmarks/bench_book.py --quick   # smoke parameters

Runs book/build.py in a subprocess (warm environment: the venv exists) and prints the
papermill time of each notebook, the HTML build time, and the total against the target.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 600.0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smoke parameters instead of the default book")
    args = ap.parse_args()
    cmd = [sys.executable, str(ROOT / "book" / "build.py")] + (["--smoke"] if args.quick else [])
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    total = time.perf_counter() - t0
    rows = json.loads((ROOT / "book" / "_generated" / "timings.json").read_text())
    print(f"{'notebook':32s} {'seconds':>9s}")
    for r in rows:
        print(f"{r['name']:32s} {r['seconds']:9.1f}")
    nb = sum(r["seconds"] for r in rows)
    print(f"{'html build + overhead':32s} {total - nb:9.1f}")
    print(f"{'total':32s} {total:9.1f}   ({os.cpu_count()} cores; target {TARGET_S:.0f} s"
          f"{'' if args.quick else f', ratio {total / TARGET_S:.2f} of target'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
