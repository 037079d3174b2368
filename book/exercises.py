"""Write the students' version of a notebook: every cell tagged ``solution`` replaced by an empty exercise cell.

    python book/exercises.py                      # all notebooks with solution cells
    python book/exercises.py notebooks/teaching.py --out exercises/

Output: ``<out>/<name>_exercises.ipynb`` (default ``book/_generated/exercises``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="*", type=Path, help="jupytext .py notebooks (default: all in notebooks/)")
    ap.add_argument("--out", type=Path, default=ROOT / "book" / "_generated" / "exercises")
    args = ap.parse_args(argv)
    sources = args.notebooks or sorted((ROOT / "notebooks").glob("*.py"))
    args.out.mkdir(parents=True, exist_ok=True)
    for src in sources:
        if not src.is_file():
            raise SystemExit(f"{src}: no such notebook")
        nb, n = strip_solutions(jupytext.read(src))
        if n == 0:
            continue
        dest = args.out / f"{src.stem}_exercises.ipynb"
        nbformat.write(nb, dest)
        print(f"{dest}: {n} solution cell(s) removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
