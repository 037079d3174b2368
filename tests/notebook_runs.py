"""Shared by the store tests: run a notebook with papermill into a folder of its own, and compare two runs' tables."""

from __future__ import annotations

from pathlib import Path

import jupytext
import nbformat
import numpy as np
import pandas as pd
import papermill as pm

ROOT = Path(__file__).resolve().parent.parent


def run_notebook(name: str, tmp: Path, out: Path, **params) -> Path:
    """Execute ``notebooks/<name>.py`` with ``params``, writing its figures and tables to ``out/<name>``."""
    src = tmp / f"{name}.ipynb"
    if not src.exists():
        nbformat.write(jupytext.read(ROOT / "notebooks" / f"{name}.py"), src)
    out.mkdir(parents=True, exist_ok=True)
    pm.execute_notebook(str(src), str(out / f"{name}.ipynb"), parameters={**params, "output_dir": str(out / name)},
                        kernel_name="python3", cwd=str(ROOT), progress_bar=False)
    return out / name


def same_tables(a: Path, b: Path, *, skip=(), with_summary: bool = False) -> list[str]:
    """Assert that two runs wrote the same tables (numbers to rtol 1e-6, text exactly); returns the names compared."""
    def names(d: Path) -> list[str]:
        return sorted(p.name for p in [*d.glob("tab-*.csv"), *([d / "summary.csv"] if with_summary else [])])

    found = names(a)
    assert found and found == names(b), "the two runs wrote different tables"
    compared = []
    for name in found:
        if name in skip:
            continue
        x, y = pd.read_csv(a / name), pd.read_csv(b / name)
        assert list(x.columns) == list(y.columns) and len(x) == len(y), name
        for c in x.columns:
            if pd.api.types.is_numeric_dtype(x[c]) and pd.api.types.is_numeric_dtype(y[c]):
                np.testing.assert_allclose(x[c].to_numpy(float), y[c].to_numpy(float), rtol=1e-6, atol=1e-12,
                                           equal_nan=True, err_msg=f"{name}: column {c!r}")
            else:
                assert x[c].fillna("").astype(str).tolist() == y[c].fillna("").astype(str).tolist(), f"{name}: {c!r}"
        compared.append(name)
    return compared
