"""The ChestX-Det10 and box-jitter chapters read a store written by ``cxrcore extract`` and give the tables an
in-process run gives on the same images (issue 10, stage 2).

Each notebook runs twice through papermill at a tiny size, once encoding in-process and once with
``store=`` a store per encoder, and every table it writes (``tab-*.csv``) is compared: numbers within
1e-6 relative, text exactly. Only the forward-pass count differs, by design (none from a store).
"""

from __future__ import annotations

from pathlib import Path

import jupytext
import nbformat
import pandas as pd
import papermill as pm
import pytest

from cxrcore.cli import main
from notebook_runs import run_notebook, same_tables

ROOT = Path(__file__).resolve().parent.parent
ENCODERS = ["biomedclip", "dino-resnet50"]
SMALL = {"n_images": 32, "image_size": 256, "n_boot": 50, "n_splits": 3, "seed": 0}
RUN = ["--num-workers", "0", "--no-progress"]

pytestmark = pytest.mark.slow  # four papermill runs and two extractions: about a minute on 2 cores


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("boxes-store")
    common = {**SMALL, "generated_root": str(tmp / "cxd"), "encoders": ENCODERS}
    cxd = {**common, "readout_encoders": ["biomedclip"]}
    jit = {**common, "sigmas_px": [0, 10], "scale_sigmas": [0.0]}
    fresh, stored = tmp / "fresh", tmp / "stored"
    out = {"fresh": {"chestxdet10": run_notebook("chestxdet10", tmp, fresh, **cxd)}}
    # a store per encoder from the cohort the page generated: every box the page pools (--boxes, the table the page
    # writes) and the patch grids (--store-grid) the readouts and the jitter re-pool
    boxes = out["fresh"]["chestxdet10"] / "tab-chestxdet10-roi-boxes.csv"
    stores = {}
    for key in ENCODERS:
        stores[key] = str(tmp / "store" / key)
        assert main(["extract", "--encoder", key, "--stand-in", "--cohort", "chestxdet10", "--data-root",
                     str(tmp / "cxd"), "--boxes", str(boxes), "--store-grid", *RUN, "--out", stores[key]]) == 0
    out["stored"] = {"chestxdet10": run_notebook("chestxdet10", tmp, stored, **cxd, store=stores)}
    out["fresh"]["box_jitter"] = run_notebook("box_jitter", tmp, fresh, **jit)
    out["stored"]["box_jitter"] = run_notebook("box_jitter", tmp, stored, **jit, store=stores)
    return out


def test_chestxdet10_from_the_store_gives_the_in_process_tables(runs):
    compared = same_tables(runs["fresh"]["chestxdet10"], runs["stored"]["chestxdet10"])
    # the image level, the box level and the box-free readouts were all compared, not skipped
    for key in ("tab-chestxdet10-strata.csv", "tab-chestxdet10-box.csv", "tab-chestxdet10-closure.csv",
                "tab-chestxdet10-exclusions.csv"):
        assert key in compared
    closure = pd.read_csv(runs["stored"]["chestxdet10"] / "tab-chestxdet10-closure.csv")
    assert {"gem", "patch_max", "topk_mean", "mil", "roi_local"} <= set(closure["score"])


def test_box_jitter_from_a_grid_store_gives_the_in_process_tables(runs):
    fresh, stored = runs["fresh"]["box_jitter"], runs["stored"]["box_jitter"]
    compared = same_tables(fresh, stored, skip=("tab-boxjitter-passes.csv",))
    assert "tab-boxjitter-auc.csv" in compared and "tab-boxjitter-clustered-delong.csv" in compared
    # one forward pass per image in-process, none from the store; the same grids either way
    a, b = pd.read_csv(fresh / "tab-boxjitter-passes.csv"), pd.read_csv(stored / "tab-boxjitter-passes.csv")
    assert (a["images through the network"] == a["images"]).all() and (b["images through the network"] == 0).all()
    assert a.drop(columns="images through the network").equals(b.drop(columns="images through the network"))


def test_a_store_of_another_cohort_size_is_refused(runs, tmp_path):
    """The page checks the store against its parameters before reading it: other pixels stop it, naming the field."""
    src = tmp_path / "box_jitter.ipynb"
    nbformat.write(jupytext.read(ROOT / "notebooks" / "box_jitter.py"), src)
    store = runs["stored"]["box_jitter"].parent.parent / "store" / "biomedclip"
    with pytest.raises(pm.PapermillExecutionError) as err:
        pm.execute_notebook(str(src), str(tmp_path / "out.ipynb"), kernel_name="python3", cwd=str(ROOT),
                            progress_bar=False,
                            parameters={**SMALL, "image_size": 288, "generated_root": str(tmp_path / "other"),
                                        "encoders": ["biomedclip"], "store": {"biomedclip": str(store)},
                                        "sigmas_px": [0, 10], "scale_sigmas": [0.0], "output_dir": str(tmp_path / "o")})
    assert "image_hash" in str(err.value) and "in the store but" in str(err.value)
