"""Build the book: execute every notebook with papermill, then render the HTML with Jupyter Book.

    python book/build.py            # the default book (embedded synthetic cohort, stand-in encoders)
    python book/build.py --smoke    # small parameters, for tests
    python book/build.py --only perturbation_panel --no-html

The book never executes a notebook itself (`execute_notebooks: off`): it renders what
papermill produced here, so one executor, and a failing cell fails this script.
Executed notebooks land in ``book/_generated/`` atomically (temp file + rename).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "book" / "_generated"
BANNER = ("Numbers on these pages come from a synthetic phantom cohort and/or random-weight stand-in "
          "encoders, computed by the build that rendered them; they are not the paper's results. "
          "Each figure and table says how it was produced.")


def load_plan(path: Path = ROOT / "book" / "notebooks.yml") -> list[dict]:
    plan = yaml.safe_load(path.read_text())["notebooks"]
    for i, nb in enumerate(plan):
        if not (ROOT / "notebooks" / f"{nb['name']}.py").is_file():
            raise FileNotFoundError(f"{path}: entry {i} names notebooks/{nb['name']}.py, which does not exist")
    return plan


def execute(name: str, parameters: dict, mode: str) -> float:
    """Convert ``notebooks/<name>.py`` with jupytext and execute it with papermill; return seconds.

    The notebook's output folder (``book/_generated/figures/<name>``) is emptied first, so no
    figure or table of an earlier build survives beside this one; ``mode`` (default or
    smoke) reaches the notebook as CXRCORE_BUILD_MODE and is recorded in its provenance.
    """
    import shutil

    import jupytext
    import nbformat
    import papermill as pm

    GENERATED.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(GENERATED / "figures" / name, ignore_errors=True)
    os.environ["CXRCORE_BUILD_MODE"] = mode  # inherited by the kernel papermill starts
    nb = jupytext.read(ROOT / "notebooks" / f"{name}.py")
    out = GENERATED / f"{name}.ipynb"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / f"{name}.ipynb"
        nbformat.write(nb, src)
        partial = GENERATED / f".{name}.partial.ipynb"
        t0 = time.perf_counter()
        try:
            pm.execute_notebook(str(src), str(partial), parameters=parameters, kernel_name="python3",
                                cwd=str(ROOT), progress_bar=False)
        except pm.PapermillExecutionError as err:
            raise SystemExit(f"notebook notebooks/{name}.py failed in cell {err.cell_index} "
                             f"({err.ename}: {err.evalue}); the partial output is {partial}") from None
        seconds = time.perf_counter() - t0
        os.replace(partial, out)
    return seconds


def write_timings(rows: list[dict]) -> None:
    lines = ["# Execution times", "",
             "Wall time of each notebook in the build that rendered this book (papermill, "
             f"{os.cpu_count()} CPU cores, `{'smoke' if rows and rows[0]['smoke'] else 'default'}` parameters).", "",
             "| notebook | parameters | seconds |", "|---|---|---:|"]
    for r in rows:
        lines.append(f"| {r['title']} | `{json.dumps(r['parameters'])}` | {r['seconds']:.1f} |")
    lines.append(f"| **total** | | **{sum(r['seconds'] for r in rows):.1f}** |")
    (GENERATED / "timings.md").write_text("\n".join(lines) + "\n")
    (GENERATED / "timings.json").write_text(json.dumps(rows, indent=2))


def used_stand_ins() -> bool:
    """True when any executed notebook recorded a synthetic cohort or stand-in encoders."""
    records = [json.loads(p.read_text()) for p in (GENERATED / "figures").glob("*/provenance.json")]
    if not records:
        raise SystemExit("no notebook recorded its provenance (cxrcore.report.record_run); cannot label the book")
    return any(r["synthetic"] or r["stand_in"] for r in records)


def write_config(stand_in: bool) -> Path:
    """The book's config for this build: `_config.yml` plus the provenance banner when stand-ins or synthetic data ran."""
    cfg = yaml.safe_load((ROOT / "_config.yml").read_text())
    if stand_in:
        cfg.setdefault("html", {})["announcement"] = BANNER
    path = GENERATED / "_config.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def build_html(config: Path) -> Path:
    jb = Path(sys.executable).parent / "jupyter-book"
    cmd = [str(jb), "build", str(ROOT), "--config", str(config), "--toc", str(ROOT / "_toc.yml"),
           "-W", "-n", "--keep-going", "--builder", "html"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    index = ROOT / "_build" / "html" / "index.html"
    if not index.is_file():
        raise SystemExit(f"jupyter-book finished but {index} is missing")
    return index


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="small parameters (tests)")
    ap.add_argument("--only", nargs="*", help="execute only these notebooks (others keep their last output)")
    ap.add_argument("--no-html", action="store_true", help="execute notebooks only")
    ap.add_argument("--no-execute", action="store_true", help="render the notebooks already in book/_generated")
    args = ap.parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the default book never downloads
    plan = load_plan()
    rows = []
    if not args.no_execute:
        for nb in plan:
            if args.only and nb["name"] not in args.only:
                continue
            params = {**nb.get("parameters", {}), **(nb.get("smoke", {}) if args.smoke else {})}
            print(f"executing notebooks/{nb['name']}.py {json.dumps(params)}", flush=True)
            secs = execute(nb["name"], params, "smoke" if args.smoke else "default")
            print(f"  {secs:.1f} s", flush=True)
            rows.append({"name": nb["name"], "title": nb.get("title", nb["name"]), "parameters": params,
                         "seconds": secs, "smoke": args.smoke})
        if rows:
            write_timings(rows)
    if not args.no_html:
        missing = [nb["name"] for nb in plan if not (GENERATED / f"{nb['name']}.ipynb").is_file()]
        if missing:
            raise SystemExit(f"not executed yet: {missing}; run without --no-execute first")
        index = build_html(write_config(stand_in=used_stand_ins()))
        print(f"\nThe book is at {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
