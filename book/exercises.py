"""Write the students' version of a notebook: every cell tagged ``solution`` replaced by an empty exercise cell.

    python book/exercises.py                      # all notebooks with solution cells
    python book/exercises.py notebooks/teaching.py --out exercises/

Output: ``<out>/<name>_exercises.ipynb`` (default ``book/_generated/exercises``; the book's
build writes them beside its pages, and the teaching page links its copy).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterable

import jupytext
import nbformat

ROOT = Path(__file__).resolve().parent.parent
PLACEHOLDER = "# Your answer here.\n"


def strip_solutions(nb: nbformat.NotebookNode) -> tuple[nbformat.NotebookNode, int]:
    """Return a copy of ``nb`` whose ``solution`` cells are blanked, and how many were."""
    out = nbformat.from_dict(nb)
    n = 0
    for cell in out.cells:
        tags = cell.get("metadata", {}).get("tags", [])
        if "solution" in tags:
            cell.source = PLACEHOLDER
            cell.metadata["tags"] = [t for t in tags if t != "solution"] + ["exercise"]
            if cell.cell_type == "code":
                cell.outputs = []
                cell.execution_count = None
            n += 1
    return out, n


def write_exercises(sources: Iterable[Path], out: Path, read=jupytext.read) -> list[Path]:
    """The students' copy of every notebook in ``sources`` that has solution cells; return the files written.

    ``read`` turns a source path into a notebook (the book's build passes the committed
    notebook's maker, so the students' copy also starts with the install cell).
    """
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for src in sources:
        if not Path(src).is_file():
            raise SystemExit(f"{src}: no such notebook")
        nb, n = strip_solutions(read(Path(src)))
        if n == 0:
            continue
        nb.metadata.pop("jupytext", None)
        dest = out / f"{Path(src).stem}_exercises.ipynb"
        nbformat.write(nb, dest)
        print(f"{dest}: {n} solution cell(s) removed")
        written.append(dest)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="*", type=Path, help="jupytext .py notebooks (default: all in notebooks/)")
    ap.add_argument("--out", type=Path, default=ROOT / "book" / "_generated" / "exercises")
    args = ap.parse_args(argv)
    write_exercises(args.notebooks or sorted((ROOT / "notebooks").glob("*.py")), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
