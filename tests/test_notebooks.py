"""Notebooks: the parameters cell documents itself, and a wrong parameter stops at once with what is accepted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import papermill as pm
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))


def _to_ipynb(src: Path, tmp_path: Path) -> Path:
    out = tmp_path / f"{src.stem}.ipynb"
    nbformat.write(jupytext.read(src), out)
    return out


@pytest.mark.parametrize("src", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_code_cell_compiles(src):
    """A syntax error fails here in a second, not after minutes of papermill (cells are compiled, not run)."""
    for k, cell in enumerate(jupytext.read(src).cells):
        if cell.cell_type == "code":
            code = "\n".join(l for l in cell.source.splitlines() if not l.lstrip().startswith(("%", "!")))
            try:
                compile(code, f"{src.name} cell {k}", "exec")
            except SyntaxError as e:
                pytest.fail(f"{src.name}, code cell {k}, line {e.lineno}: {e.msg}")


@pytest.mark.parametrize("src", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_cell_is_documented(src, tmp_path):
    nb = jupytext.read(src)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{src.name}: expected exactly one cell tagged 'parameters'"
    lines = [l for l in tagged[0].source.splitlines() if l.strip() and not l.startswith("#")]
    for line in lines:
        assert ":" in line.split("=")[0] and "#" in line, f"{src.name}: parameter line lacks a type or a help comment: {line!r}"
    proc = subprocess.run([sys.executable, "-m", "papermill", "--help-notebook", str(_to_ipynb(src, tmp_path))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for line in lines:
        name = line.split(":")[0].strip()
        assert name in proc.stdout, f"papermill --help-notebook does not list {name}"


def _parameters(src: Path) -> set[str]:
    cell = next(c for c in jupytext.read(src).cells if "parameters" in c.metadata.get("tags", []))
    return {l.split(":")[0].strip() for l in cell.source.splitlines() if l.strip() and not l.startswith("#")}


@pytest.mark.parametrize("src", [p for p in NOTEBOOKS if "encoders" in _parameters(p)], ids=lambda p: p.stem)
def test_every_notebook_refuses_an_unknown_encoder_in_its_first_cells(src, tmp_path):
    with pytest.raises(pm.PapermillExecutionError) as err:
        pm.execute_notebook(str(_to_ipynb(src, tmp_path)), str(tmp_path / "out.ipynb"),
                            parameters={"encoders": ["no-such-encoder"]}, kernel_name="python3",
                            cwd=str(ROOT), progress_bar=False)
    assert "unknown encoder" in str(err.value) and "accepted" in str(err.value)
    assert err.value.cell_index <= 4, "a wrong parameter must stop before any work is done"


@pytest.mark.parametrize("bad, message", [
    ({"encoders": ["no-such-encoder"]}, "unknown encoder"),
    ({"cohort": "no-such-cohort"}, "unknown cohort"),
    ({"cohort": "nih", "data_root": ""}, "needs data_root"),
])
def test_bad_parameter_stops_with_a_clear_message(bad, message, tmp_path):
    src = _to_ipynb(ROOT / "notebooks" / "perturbation_panel.py", tmp_path)
    with pytest.raises(pm.PapermillExecutionError) as err:
        pm.execute_notebook(str(src), str(tmp_path / "out.ipynb"), parameters=bad, kernel_name="python3",
                            cwd=str(ROOT), progress_bar=False)
    assert message in str(err.value)
    assert "accepted" in str(err.value) or "data_root" in str(err.value)


def test_exercise_version_drops_every_solution(tmp_path):
    sys.path.insert(0, str(ROOT / "book"))
    from exercises import PLACEHOLDER, strip_solutions

    nb = jupytext.read(ROOT / "notebooks" / "teaching.py")
    n_solutions = sum("solution" in c.metadata.get("tags", []) for c in nb.cells)
    assert n_solutions >= 3, "the teaching notebook should carry at least three exercises"
    ex, n = strip_solutions(nb)
    assert n == n_solutions
    assert not any("solution" in c.metadata.get("tags", []) for c in ex.cells)
    assert sum(c.source == PLACEHOLDER for c in ex.cells) == n_solutions
    # the original is untouched and the rest of the notebook is kept
    assert sum("solution" in c.metadata.get("tags", []) for c in nb.cells) == n_solutions
    assert len(ex.cells) == len(nb.cells)


@pytest.mark.parametrize("name, bad, message", [
    ("chestxdet10", {"readouts": ["max_pool"]}, "readouts ['max_pool']: accepted are"),
    ("chestxdet10", {"encoders": ["rad-dino"], "readout_encoders": ["biomedclip"]}, "share no encoder"),
    ("chestxdet10", {"cohort": "nih"}, "unknown cohort 'nih'"),
    ("box_jitter", {"sigmas_px": [5, 10]}, "that include 0"),
    ("audit", {"sweep": "fast"}, "sweep='fast': accepted are"),
    ("encoders", {"achieved_tflops": -1.0}, "achieved_tflops=-1.0: accepted are"),
])
def test_box_pages_refuse_a_bad_parameter_before_any_work(name, bad, message, tmp_path):
    with pytest.raises(pm.PapermillExecutionError) as err:
        pm.execute_notebook(str(_to_ipynb(ROOT / "notebooks" / f"{name}.py", tmp_path)), str(tmp_path / "out.ipynb"),
                            parameters=bad, kernel_name="python3", cwd=str(ROOT), progress_bar=False)
    assert message in str(err.value)


@pytest.mark.parametrize("name, bad, message", [
    ("perturbation_panel", {"panel": "smoke"}, "no footprint sweep"),
    ("perturbation_panel", {"readouts": ["no-such-readout"]}, "unknown readout"),
    ("perturbation_panel", {"readout_encoders": ["dinov2-b14"], "encoders": ["rad-dino"]}, "share no encoder"),
    ("disease_probes", {"labels": ["no-such-label"]}, "unknown label"),
])
def test_panel_and_disease_pages_refuse_a_wrong_parameter_before_any_work(name, bad, message, tmp_path):
    src = _to_ipynb(ROOT / "notebooks" / f"{name}.py", tmp_path)
    with pytest.raises(pm.PapermillExecutionError) as err:
        pm.execute_notebook(str(src), str(tmp_path / "out.ipynb"), parameters={**bad, "output_dir": str(tmp_path / "o")},
                            kernel_name="python3", cwd=str(ROOT), progress_bar=False)
    assert message in str(err.value) and "accepted" in str(err.value)
    assert err.value.cell_index <= 4, "a wrong parameter must stop before any work is done"


def test_teaching_counts_tokens_under_each_box_in_its_own_image(tmp_path):
    """The synthetic cohort's images differ in size (512-768 px): exercise 2 counts the tokens under each box
    through that box's own image geometry, not the first image's (which once stopped the default book; with
    seed 7 the first image is the smallest, 515 px, and the others reach 762 px)."""
    out = tmp_path / "out.ipynb"
    pm.execute_notebook(str(_to_ipynb(ROOT / "notebooks" / "teaching.py", tmp_path)), str(out),
                        parameters={"encoder_key": "dino-resnet50", "n_images": 20, "seed": 7, "n_boot": 20,
                                    "copies": 2, "footprints_px": [10, 20], "output_dir": str(tmp_path / "o")},
                        kernel_name="python3", cwd=str(ROOT), progress_bar=False)
    wide = [o for c in json.loads(out.read_text())["cells"] for o in c.get("outputs", [])
            if "AUC 0.75 is first reached" in json.dumps(o)]
    assert wide, "exercise 2's summary did not print"
