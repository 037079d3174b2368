"""Patient-level splits: a test fails if any helper leaks a patient into two folds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cxrcore.cohorts.nih import NIHChestXray14
from cxrcore.cohorts.splits import PatientLeakError, check_no_leak, patient_kfold, train_test_split
from fixtures_cohorts import txv_data_dir

patients_strategy = st.lists(st.integers(0, 40), min_size=2, max_size=300).map(
    lambda ps: pd.DataFrame({"patient_id": [f"p{p}" for p in ps]}))


@settings(max_examples=60, deadline=None)
@given(md=patients_strategy, k=st.integers(2, 6), seed=st.integers(0, 10))
def test_kfold_never_leaks(md, k, seed):
    folds = patient_kfold(md, k, seed=seed)
    assert (folds.groupby(md["patient_id"]).nunique() == 1).all()
    assert folds.between(0, k - 1).all()


@settings(max_examples=60, deadline=None)
@given(md=patients_strategy, frac=st.floats(0.05, 0.95), seed=st.integers(0, 10),
       official=st.lists(st.sampled_from([None, "train_val", "test"]), min_size=300, max_size=300))
def test_train_test_never_leaks(md, frac, seed, official):
    # An official split given per patient on some rows only, as NIH lists are.
    per_patient = {p: official[i % len(official)] for i, p in enumerate(sorted(md["patient_id"].unique()))}
    md = md.assign(split=md["patient_id"].map(per_patient))
    out = train_test_split(md, frac, seed=seed)
    assert set(out) <= {"train", "test"} and out.notna().all()
    assert (out.groupby(md["patient_id"]).nunique() == 1).all()


def test_leak_detector_fails_on_a_leak():
    with pytest.raises(PatientLeakError, match="patient 'b'"):
        check_no_leak(["train", "train", "test"], ["a", "b", "b"])
    check_no_leak(["train", None, "test"], ["a", "a", "b"])  # NA rows are not a fold


def test_kfold_balanced(tmp_path):
    md = pd.DataFrame({"patient_id": np.repeat(np.arange(100), 3).astype(str)})
    sizes = patient_kfold(md, 5).value_counts()
    assert sizes.max() - sizes.min() <= 3


def test_nih_official_split_honoured_and_patient_safe():
    md = NIHChestXray14(txv_data_dir(), check_files=False).metadata
    # The wheel has no official lists: every row is split by patient here.
    out = train_test_split(md, 0.2, seed=0)
    check_no_leak(out, md["patient_id"])
    assert 0.15 < (out == "test").mean() < 0.25
    folds = patient_kfold(md, 5)
    check_no_leak(folds, md["patient_id"])
    fake = md.assign(split=np.where(md["patient_id"].astype(int) % 5 == 0, "test", "train_val"))
    out = train_test_split(fake, 0.5)
    assert (out == np.where(fake["split"] == "test", "test", "train")).all()
