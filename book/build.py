"""Build the book: execute every notebook with papermill, then render the HTML with Jupyter Book.

    python book/build.py                         # the default book: book/_generated -> _build/html
    python book/build.py --smoke                 # small parameters, for tests: into _smoke/ (never the book)
    python book/build.py --smoke --out /tmp/sb   # ... into /tmp/sb/{_generated,src,_build/html}
    python book/build.py --only perturbation_panel --no-html
    python book/build.py --sync-notebooks        # regenerate notebooks/*.ipynb from notebooks/*.py
    python book/build.py --check-notebooks       # fail if a committed .ipynb disagrees with its .py

The book never executes a notebook itself (`execute_notebooks: off`): it renders what
papermill produced here, so one executor, and a failing cell fails this script.
Executed notebooks land in the build's generated folder atomically (temp file + rename).

A build with ``--out DIR`` (every smoke build) writes nothing outside DIR: notebooks
execute into ``DIR/_generated`` (every notebook parameter that names a path under
``book/_generated/`` is moved there), the book's sources are staged in ``DIR/src`` (a
copy of ``book/`` and ``_toc.yml`` whose ``book/_generated`` links to ``DIR/_generated``),
and the HTML lands in ``DIR/_build/html``. The smoke build refuses to write where the
default book lives and says "smoke build" on every page.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "book" / "_generated"  # the default book's executed notebooks and figures
GENERATED_PREFIX = "book/_generated"  # how notebook parameters name paths in it
NOTEBOOKS = ROOT / "notebooks"
SMOKE_OUT = ROOT / "_smoke"
BANNER = ("Numbers on these pages come from a synthetic phantom cohort and/or random-weight stand-in "
          "encoders, computed by the build that rendered them; they are not the paper's results. "
          "Each figure and table says how it was produced.")
SMOKE_BANNER = ("SMOKE BUILD (tests only): tiny cohorts, two encoders per chapter, reduced panels and few "
                "bootstrap replicates. This is not the book; build the book with: make book. ")
REPOSITORY = "https://github.com/cxrcore/cxrcore"

# The first cell of every notebook a reader launches: Colab has no cxrcore; Binder and the
# book's build have it, so there it does nothing. Tagged so the book does not show it.
INSTALL_CELL = f'''# Install cxrcore where it is missing (Colab); a no-op where it is installed (Binder, the book's build).
try:
    import cxrcore  # noqa: F401
except ImportError:
    import importlib
    import subprocess
    import sys

    subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", "git+{REPOSITORY}"])
    importlib.invalidate_caches()
'''


@dataclass(frozen=True)
class Layout:
    """Where one build reads and writes."""

    generated: Path  # executed notebooks, figures, timings
    srcdir: Path  # the source folder Jupyter Book reads
    output: Path  # Jupyter Book's --path-output: the HTML lands in output/_build/html
    smoke: bool

    @property
    def html(self) -> Path:
        return self.output / "_build" / "html"


def layout_for(out: Path | None, smoke: bool) -> Layout:
    """The default book's folders, or DIR's; a smoke build is never allowed into the default book's."""
    if out is None and not smoke:
        return Layout(GENERATED, ROOT, ROOT, smoke=False)
    out = (out or SMOKE_OUT).resolve()
    protected = [ROOT / "_build", GENERATED, ROOT / "book", NOTEBOOKS]
    for p in protected:
        if out == p or p in out.parents or out in p.parents:
            raise SystemExit(f"--out {out} would write into or over {p}, which holds the default book or its "
                             f"sources; choose a folder of its own (default for --smoke: {SMOKE_OUT})")
    return Layout(out / "_generated", out / "src", out, smoke=smoke)


def load_plan(path: Path = ROOT / "book" / "notebooks.yml") -> list[dict]:
    plan = yaml.safe_load(path.read_text())["notebooks"]
    for i, nb in enumerate(plan):
        if not (NOTEBOOKS / f"{nb['name']}.py").is_file():
            raise FileNotFoundError(f"{path}: entry {i} names notebooks/{nb['name']}.py, which does not exist")
    return plan


# -- notebooks: the .py source, the committed .ipynb, the book's copy ----------------------------
def notebook_for_repo(name: str):
    """``notebooks/<name>.py`` as the committed ``notebooks/<name>.ipynb``: jupytext, no outputs, the install cell first.

    Cell ids are derived from position and source, so regenerating an unchanged notebook
    gives the same file byte for byte.
    """
    import jupytext
    import nbformat

    nb = jupytext.read(NOTEBOOKS / f"{name}.py")
    nb.cells.insert(0, nbformat.v4.new_code_cell(INSTALL_CELL.rstrip("\n"), metadata={"tags": ["remove-cell"]}))
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"c{i:02d}-" + hashlib.sha1(cell.source.encode()).hexdigest()[:8]
    nb.metadata.pop("jupytext", None)  # the pairing lives in the .py; the .ipynb is generated from it
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def notebook_text(name: str) -> str:
    import nbformat

    return nbformat.writes(notebook_for_repo(name)) + "\n"


def sync_notebooks(check: bool = False) -> list[str]:
    """Write (or with ``check``, compare) ``notebooks/<name>.ipynb`` for every ``notebooks/<name>.py``.

    Returns the notebooks that were out of date. No other .ipynb may sit in notebooks/
    (the .py files are the only source), so an orphan is reported too.
    """
    stale = []
    sources = sorted(NOTEBOOKS.glob("*.py"))
    for src in sources:
        dest = src.with_suffix(".ipynb")
        text = notebook_text(src.stem)
        if dest.is_file() and dest.read_text() == text:
            continue
        stale.append(dest.name)
        if not check:
            _atomic_text(dest, text)
    orphans = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb") if not p.with_suffix(".py").is_file())
    if orphans:
        raise SystemExit(f"notebooks/ holds {orphans} with no .py source; notebooks/*.py are the only source: "
                         "delete them or add the .py")
    return stale


def _atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    Path(tmp).write_text(text)
    os.replace(tmp, path)


def notebook_for_book(name: str):
    """The copy papermill executes for the book: solutions collapsed behind a "Show the solution" button."""
    nb = notebook_for_repo(name)
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if "solution" in tags and cell.cell_type == "code":
            cell.metadata["tags"] = [t for t in tags if t not in ("hide-input", "hide-output")] + ["hide-cell"]
            cell.metadata.setdefault("mystnb", {}).update(code_prompt_show="Show the solution",
                                                          code_prompt_hide="Hide the solution")
        elif "solution" in tags:
            raise SystemExit(f"notebooks/{name}.py: a markdown cell is tagged 'solution'; put the answer in the "
                             "solution code cell (display(Markdown(...)) for words) so the book can collapse it")
    return nb


def _book_parameters(src: Path, params: dict, layout: Layout) -> dict:
    """``params`` plus every notebook parameter naming a path under book/_generated/, moved to the build's folder."""
    import papermill as pm

    if layout.generated == GENERATED:
        return dict(params)
    out = dict(params)
    for name, info in pm.inspect_notebook(str(src)).items():
        value = out.get(name)
        if value is None:
            try:
                value = ast.literal_eval(info["default"])
            except (ValueError, SyntaxError):
                continue
        if isinstance(value, str) and (value == GENERATED_PREFIX or value.startswith(GENERATED_PREFIX + "/")):
            out[name] = str(layout.generated) + value[len(GENERATED_PREFIX):]
    return out


def execute(name: str, parameters: dict, mode: str, layout: Layout | None = None) -> float:
    """Execute ``notebooks/<name>.py`` with papermill into the build's generated folder; return seconds.

    The notebook's output folder (``<generated>/figures/<name>``) is emptied first, so no
    figure or table of an earlier build survives beside this one; ``mode`` (default or
    smoke) reaches the notebook as CXRCORE_BUILD_MODE and is recorded in its provenance.
    """
    import nbformat
    import papermill as pm

    layout = layout or layout_for(None, smoke=False)
    generated = layout.generated
    generated.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(generated / "figures" / name, ignore_errors=True)
    os.environ["CXRCORE_BUILD_MODE"] = mode  # inherited by the kernel papermill starts
    os.environ["CXRCORE_PAGE_DIR"] = str(generated)  # where pages land: tables link their CSVs from there
    out = generated / f"{name}.ipynb"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / f"{name}.ipynb"
        nbformat.write(notebook_for_book(name), src)
        params = _book_parameters(src, parameters, layout)
        partial = generated / f".{name}.partial.ipynb"
        t0 = time.perf_counter()
        try:
            pm.execute_notebook(str(src), str(partial), parameters=params, kernel_name="python3",
                                cwd=str(ROOT), progress_bar=False)
        except pm.PapermillExecutionError as err:
            raise SystemExit(f"notebook notebooks/{name}.py failed in cell {err.cell_index} "
                             f"({err.ename}: {err.evalue}); the partial output is {partial}") from None
        seconds = time.perf_counter() - t0
        _collapse_injected_parameters(partial)
        os.replace(partial, out)
    return seconds


def _collapse_injected_parameters(path: Path) -> None:
    """The parameters papermill injected stay on the page, collapsed: they say what this build ran with."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if "injected-parameters" in cell.metadata.get("tags", []):
            cell.metadata["tags"] = cell.metadata["tags"] + ["hide-input"]
            cell.metadata.setdefault("mystnb", {}).update(code_prompt_show="Show the parameters this build ran with",
                                                          code_prompt_hide="Hide the parameters")
    nbformat.write(nb, path)


def write_students_copies(layout: Layout) -> None:
    """The students' copy of every notebook with solutions (book/exercises.py), beside the pages."""
    sys.path.insert(0, str(ROOT / "book"))
    from exercises import write_exercises

    write_exercises(sorted(NOTEBOOKS.glob("*.py")), layout.generated / "exercises", read=lambda p: notebook_for_repo(p.stem))


def write_timings(rows: list[dict], layout: Layout) -> None:
    """The execution-time page; with --only, this run's rows replace theirs among the last build's."""
    previous = layout.generated / "timings.json"
    if previous.is_file():
        ran = {r["name"] for r in rows}
        kept = {r["name"]: r for r in json.loads(previous.read_text()) if r["name"] not in ran}
        order = [nb["name"] for nb in load_plan()]
        rows = sorted([*kept.values(), *rows], key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))
    lines = ["# Execution times", "",
             "Wall time of each notebook in the build that rendered this book (papermill, "
             f"{os.cpu_count()} CPU cores, `{'smoke' if layout.smoke else 'default'}` parameters).", "",
             "| notebook | parameters | seconds |", "|---|---|---:|"]
    for r in rows:
        lines.append(f"| {r['title']} | `{json.dumps(r['parameters'])}` | {r['seconds']:.1f} |")
    lines.append(f"| **total** | | **{sum(r['seconds'] for r in rows):.1f}** |")
    (layout.generated / "timings.md").write_text("\n".join(lines) + "\n")
    (layout.generated / "timings.json").write_text(json.dumps(rows, indent=2))


def used_stand_ins(layout: Layout) -> bool:
    """True when any executed notebook recorded a synthetic cohort or stand-in encoders."""
    records = [json.loads(p.read_text()) for p in (layout.generated / "figures").glob("*/provenance.json")]
    if not records:
        raise SystemExit("no notebook recorded its provenance (cxrcore.report.record_run); cannot label the book")
    return any(r["synthetic"] or r["stand_in"] for r in records)


def stage_sources(layout: Layout) -> None:
    """The book's sources for a build outside the repository: book/ and _toc.yml copied, generated pages linked."""
    if layout.srcdir == ROOT:
        return
    book = layout.srcdir / "book"
    shutil.rmtree(layout.srcdir, ignore_errors=True)
    shutil.copytree(ROOT / "book", book, ignore=shutil.ignore_patterns("_generated", "__pycache__", "*.pyc"))
    shutil.copy2(ROOT / "_toc.yml", layout.srcdir / "_toc.yml")
    (book / "_generated").symlink_to(layout.generated, target_is_directory=True)


def write_config(stand_in: bool, layout: Layout) -> Path:
    """The book's config for this build: `_config.yml` plus the banner (stand-ins, smoke) and the extension's paths."""
    cfg = yaml.safe_load((ROOT / "_config.yml").read_text())
    banner = (SMOKE_BANNER if layout.smoke else "") + (BANNER if stand_in else "")
    if banner:
        cfg.setdefault("html", {})["announcement"] = banner.strip()
    sphinx = cfg.setdefault("sphinx", {})
    # jupyter-book resolves local extensions against the config's folder; this file is written elsewhere
    sphinx["local_extensions"] = {name: str((ROOT / path).resolve())
                                  for name, path in (sphinx.get("local_extensions") or {}).items()}
    sphinx.setdefault("config", {})["cxrcore_repo_root"] = str(ROOT)
    path = layout.generated / "_config.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def build_html(config: Path, layout: Layout) -> Path:
    jb = Path(sys.executable).parent / "jupyter-book"
    cmd = [str(jb), "build", str(layout.srcdir), "--config", str(config), "--toc", str(layout.srcdir / "_toc.yml"),
           "--path-output", str(layout.output), "-W", "-n", "--keep-going", "--builder", "html"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=layout.srcdir)
    index = layout.html / "index.html"
    if not index.is_file():
        raise SystemExit(f"jupyter-book finished but {index} is missing")
    return index


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help=f"small parameters (tests), built into --out (default {SMOKE_OUT.name}/)")
    ap.add_argument("--out", type=Path, help="build into this folder (generated pages, staged sources, HTML) instead of the default book's")
    ap.add_argument("--only", nargs="*", help="execute only these notebooks (others keep their last output)")
    ap.add_argument("--no-html", action="store_true", help="execute notebooks only")
    ap.add_argument("--no-execute", action="store_true", help="render the notebooks already executed")
    ap.add_argument("--sync-notebooks", action="store_true", help="regenerate notebooks/*.ipynb from notebooks/*.py and stop")
    ap.add_argument("--check-notebooks", action="store_true", help="fail if a notebooks/*.ipynb disagrees with its .py")
    args = ap.parse_args(argv)
    if args.sync_notebooks or args.check_notebooks:
        stale = sync_notebooks(check=args.check_notebooks)
        if args.check_notebooks and stale:
            raise SystemExit(f"out of date with their .py source: {stale}; run `make notebooks` and commit them")
        print(("out of date: " if args.check_notebooks else "regenerated: ") + (", ".join(stale) or "none"))
        return 0
    layout = layout_for(args.out, args.smoke)
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
            secs = execute(nb["name"], params, "smoke" if args.smoke else "default", layout)
            print(f"  {secs:.1f} s", flush=True)
            rows.append({"name": nb["name"], "title": nb.get("title", nb["name"]), "parameters": params,
                         "seconds": secs, "smoke": args.smoke})
        if rows:
            write_timings(rows, layout)
        write_students_copies(layout)
    if not args.no_html:
        missing = [nb["name"] for nb in plan if not (layout.generated / f"{nb['name']}.ipynb").is_file()]
        if missing:
            raise SystemExit(f"not executed yet in {layout.generated}: {missing}; run without --no-execute first")
        stage_sources(layout)
        index = build_html(write_config(used_stand_ins(layout), layout), layout)
        print(f"\nThe {'smoke build (not the book)' if layout.smoke else 'book'} is at {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
