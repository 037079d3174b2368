"""The package keeps data flowing one way: a module imports only from modules at or above its
own row of CONTRIBUTING.md's module map (lazy imports inside functions included)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "cxrcore"


def _rows() -> dict[str, int]:
    """Module or subpackage (``extract``, ``encoders``) -> its row in CONTRIBUTING.md's module map."""
    rows, table = {}, False
    for line in (ROOT / "CONTRIBUTING.md").read_text().splitlines():
        if line.startswith("| stage | module |"):
            table, n = True, 0
            continue
        if table and not line.startswith("|"):
            break
        if table and not line.startswith("|---"):
            n += 1
            for path in re.findall(r"`cxrcore/([a-z_]+)(?:\.py|/)`", line.split("|")[2]):
                rows[path] = n
    return rows


def _imports(path: Path, source: str | None = None) -> set[str]:
    """The cxrcore modules a file imports, at the top or inside functions (first component under cxrcore)."""
    tree = ast.parse(path.read_text() if source is None else source, str(path))
    here = path.relative_to(PKG).parts
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing file's package
                base = list(here[:-1])[: len(here) - node.level] if node.level > 1 else list(here[:-1])
                parts = base + (node.module.split(".") if node.module else [])
                names = [parts] if node.module else [parts + [a.name] for a in node.names]
            elif node.module and node.module.split(".")[0] == "cxrcore":
                names = [node.module.split(".")[1:]] if "." in node.module else [[a.name] for a in node.names]
            else:
                continue
            found |= {n[0] for n in names if n}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("cxrcore.")}
    return found


def _owner(path: Path) -> str:
    rel = path.relative_to(PKG).parts
    return rel[0] if len(rel) > 1 else path.stem


def test_module_map_names_every_module():
    rows = _rows()
    modules = {_owner(p) for p in PKG.rglob("*.py")} - {"__init__"}
    assert modules <= set(rows), f"CONTRIBUTING.md's module map does not place {sorted(modules - set(rows))}"


def test_every_import_points_up_the_module_map():
    rows = _rows()
    wrong = []
    for path in sorted(PKG.rglob("*.py")):
        me = _owner(path)
        if me == "__init__":
            continue
        for target in _imports(path):
            if target in rows and target != me and rows[target] > rows[me]:
                wrong.append(f"{path.relative_to(ROOT)} imports cxrcore.{target} (row {rows[target]}) from row {rows[me]}")
    assert not wrong, "imports that run against the data flow of CONTRIBUTING.md:\n" + "\n".join(wrong)


def _against_the_flow(path: Path, source: str) -> list[str]:
    rows, me = _rows(), _owner(path)
    return [t for t in _imports(path, source) if t in rows and t != me and rows[t] > rows[me]]


def test_the_check_sees_a_lazy_import_against_the_flow():
    stats, report = PKG / "stats.py", PKG / "report.py"
    assert _against_the_flow(stats, stats.read_text()) == []
    late = stats.read_text() + "\n\ndef _late():\n    from .report import set_style\n"
    assert _against_the_flow(stats, late) == ["report"]
    # the circle this test was written after: report drew the audit's figure (from .audit import ...)
    assert _against_the_flow(report, report.read_text() + "\n\ndef _f():\n    from .audit import dilution_figure\n") \
        == ["audit"]
    enc = PKG / "encoders" / "base.py"
    assert _against_the_flow(enc, enc.read_text() + "\n\ndef _g():\n    from ..extract import extract\n") == ["extract"]
