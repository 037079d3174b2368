"""The book's figure and table helpers: keys, files, labels, one build at a time."""

import json

import numpy as np
import pandas as pd
import pytest

from cxrcore import report
from cxrcore.cohorts import SyntheticCohort


def test_keys_must_be_namespaced():
    assert report.check_key("fig-panel-auc") == "fig-panel-auc"
    for bad in ("panel-auc", "fig_panel", "Fig-x", "fig-"):
        with pytest.raises(ValueError, match="glue key"):
            report.check_key(bad)


def test_publish_writes_files_and_leaves_no_temp(tmp_path):
    df = pd.DataFrame({"pooling": ["cls", "patch_mean", "roi_local"], "auc": [0.5, 0.55, 0.9],
                       "ci_low": [0.4, 0.45, 0.8], "ci_high": [0.6, 0.65, 0.97], "encoder": "rad-dino"})
    report.publish_table(df, "tab-x-auc", tmp_path)
    report.publish_figure(report.auc_by_pooling_figure(df, x="encoder"), "fig-x-auc", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig-x-auc.png", "tab-x-auc.csv"]
    assert pd.read_csv(tmp_path / "tab-x-auc.csv").equals(df)


def test_with_ci_formats_missing_values_honestly():
    df = pd.DataFrame({"auc": [0.7123, 0.6, np.nan], "ci_low": [0.65, np.nan, np.nan], "ci_high": [0.77, np.nan, np.nan]})
    assert report.with_ci(df).tolist() == ["0.712 [0.650, 0.770]", "0.600", "not estimable"]


def test_provenance_label_and_record(tmp_path, monkeypatch):
    c = SyntheticCohort(n_images=2)
    monkeypatch.setenv("CXRCORE_BUILD_MODE", "smoke")
    label = report.record_run(tmp_path, cohort=c, stand_in=True, encoders=["rad-dino"])
    assert label == report.STAND_IN_LABEL
    rec = json.loads((tmp_path / report.PROVENANCE_FILE).read_text())
    assert rec["build_mode"] == "smoke" and rec["synthetic"] and rec["stand_in"]
    assert report.provenance_label("nih", False, False) == "nih cohort, published encoder weights"


def test_summaries_from_two_builds_are_refused(tmp_path, monkeypatch):
    row = pd.DataFrame([{c: 0.5 if c in ("auc", "ci_low", "ci_high") else "x" for c in report.SUMMARY_COLUMNS}])
    c = SyntheticCohort(n_images=2)
    for name, mode in (("a", "default"), ("b", "default")):
        monkeypatch.setenv("CXRCORE_BUILD_MODE", mode)
        report.record_run(tmp_path / name, cohort=c, stand_in=True, encoders=[])
        report.write_summary(row, tmp_path / name)
    assert len(report.collect_summaries(tmp_path)) == 2
    monkeypatch.setenv("CXRCORE_BUILD_MODE", "smoke")
    report.record_run(tmp_path / "b", cohort=c, stand_in=True, encoders=[])
    with pytest.raises(ValueError, match="different builds"):
        report.collect_summaries(tmp_path)
    with pytest.raises(ValueError, match="lack column"):
        report.write_summary(row.drop(columns=["what"]), tmp_path / "a")
