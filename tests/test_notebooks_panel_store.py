"""The perturbation-panel and disease-probe chapters read a store written by ``cxrcore extract`` and give the tables
an in-process run gives on the same images (issue 10, stage 2).

Each notebook runs twice through papermill at a tiny size, once encoding in-process and once with ``store=`` a
store per encoder, and every table it writes (``tab-*.csv``, ``summary.csv``) is compared: numbers within 1e-6
relative, text exactly.
"""

from __future__ import annotations

import pandas as pd
import pytest

from cxrcore.cli import main
from notebook_runs import run_notebook, same_tables

ENCODERS = ["rad-dino", "biomedclip"]
RUN = ["--num-workers", "0", "--no-progress"]
# two footprints of one contrast: the smallest panel with a footprint sweep (the page draws its dilution curve)
PANEL = """name: store-test
description: two nodule footprints, for the store test
cells:
  - kind: nodule
    footprint_px: [16, 48]
    strength: 0.4
"""

pytestmark = pytest.mark.slow  # four papermill runs and three extractions: about a minute on 2 cores


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("panel-store")
    panel = tmp / "store-test.yml"
    panel.write_text(PANEL)
    syn = ["--cohort", "synthetic", "--seed", "0"]
    stores = {"panel": {}, "disease": {}}
    for key in ENCODERS:
        stores["panel"][key] = str(tmp / "panel" / key)
        assert main(["extract", "--encoder", key, "--stand-in", *syn, "--n-images", "6", "--cohort-option", "size=256",
                     "--panel", str(panel), *(["--store-grid"] if key == "biomedclip" else []), *RUN,
                     "--out", stores["panel"][key]]) == 0
    stores["disease"]["biomedclip"] = str(tmp / "disease" / "biomedclip")
    assert main(["extract", "--encoder", "biomedclip", "--stand-in", *syn, "--n-images", "24", *RUN,
                 "--out", stores["disease"]["biomedclip"]]) == 0
    pp = {"encoders": ENCODERS, "panel": str(panel), "n_images": 6, "image_size": 256, "n_splits": 2, "n_boot": 20,
          "seed": 0, "readout_encoders": ["biomedclip"]}
    dp = {"encoders": ["biomedclip"], "n_images": 24, "n_splits": 2, "n_boot": 20, "seed": 0}
    fresh, stored = tmp / "fresh", tmp / "stored"
    # from a store nothing is encoded: a device this machine lacks would stop any in-process forward pass
    absent = {"device": "cuda:99"}
    return {"panel": (run_notebook("perturbation_panel", tmp, fresh, **pp),
                      run_notebook("perturbation_panel", tmp, stored, **pp, **absent, store=stores["panel"])),
            "disease": (run_notebook("disease_probes", tmp, fresh, **dp),
                        run_notebook("disease_probes", tmp, stored, **dp, **absent, store=stores["disease"]["biomedclip"]))}


def test_the_panel_from_stores_gives_the_in_process_tables(runs):
    fresh, stored = runs["panel"]
    names = same_tables(fresh, stored, with_summary=True)
    # the page's main tables, the box-free readouts (from the stored float16 grids) and the summary's rows among them
    assert {"tab-perturbation-auc.csv", "tab-perturbation-dilution.csv", "tab-perturbation-readouts.csv",
            "tab-perturbation-within-pair.csv", "tab-perturbation-paired-tests.csv", "summary.csv"} <= set(names)
    gap = pd.read_csv(stored / "tab-perturbation-readouts.csv")
    assert set(gap["encoder"]) == {"biomedclip"} and gap["auc"].notna().all()
    assert set(pd.read_csv(stored / "tab-perturbation-dilution.csv")["encoder"]) == set(ENCODERS)


def test_the_disease_probes_from_a_store_give_the_in_process_tables(runs):
    fresh, stored = runs["disease"]
    assert {"tab-disease-auc.csv", "tab-disease-paired-tests.csv", "summary.csv"} <= set(same_tables(fresh, stored, with_summary=True))

