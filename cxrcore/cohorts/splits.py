"""Patient-level splits: no patient ever in two folds.

Every helper assigns whole patients (``patient_id``) to folds, and honours a provider's
official split (the ``split`` column, e.g. NIH ``train_val_list.txt`` / ``test_list.txt``,
MIMIC ``-split.csv``) where one is present. :func:`check_no_leak` is the guard every
helper runs on its own output.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["PatientLeakError", "check_no_leak", "patient_kfold", "train_test_split"]


class PatientLeakError(ValueError):
    """A patient's images fall in more than one fold."""


def check_no_leak(folds, patients, what: str = "split") -> None:
    """Raise :class:`PatientLeakError` if any patient appears in two folds (NA folds ignored)."""
    f = pd.DataFrame({"fold": pd.Series(folds).to_numpy(), "patient": pd.Series(patients).to_numpy()}).dropna()
    n = f.groupby("patient", sort=False)["fold"].nunique()
    leaked = n[n > 1]
    if len(leaked):
        ex = leaked.index[0]
        raise PatientLeakError(
            f"{what}: {len(leaked)} patient(s) in more than one fold, e.g. patient {ex!r} in folds "
            f"{sorted(map(str, f.loc[f['patient'] == ex, 'fold'].unique()))}. Assign folds per patient_id."
        )


def _patient_order(patients: pd.Series, seed: int) -> pd.Index:
    uniq = pd.Index(pd.unique(patients.dropna()))
    return uniq[np.random.default_rng(seed).permutation(len(uniq))]


def patient_kfold(metadata: pd.DataFrame, n_splits: int = 5, *, seed: int = 0, group: str = "patient_id") -> pd.Series:
    """Fold number 0..n_splits-1 per row, whole patients per fold, folds balanced in images.

    Patients are shuffled with ``seed`` and each goes to the fold with the fewest images so
    far (largest patients first), so folds differ by at most one patient's images.
    """
    if n_splits < 2:
        raise ValueError(f"n_splits={n_splits}: need at least 2 folds.")
    patients = metadata[group]
    if patients.isna().any():
        raise ValueError(f"metadata[{group!r}] has missing values; every image needs a patient to be split safely.")
    sizes = patients.value_counts(sort=False).reindex(_patient_order(patients, seed))
    sizes = sizes.sort_values(ascending=False, kind="stable")  # big patients first: greedy balance
    load = np.zeros(n_splits, dtype=np.int64)
    fold_of = {}
    for pid, k in sizes.items():  # one step per patient (30k for NIH), not per image
        j = int(np.argmin(load))
        fold_of[pid] = j
        load[j] += k
    folds = patients.map(fold_of).astype("int64").rename("fold")
    check_no_leak(folds, patients, "patient_kfold")
    return folds


def train_test_split(metadata: pd.DataFrame, test_size: float = 0.2, *, seed: int = 0, group: str = "patient_id",
                     official: bool = True) -> pd.Series:
    """``"train"`` / ``"test"`` per row at patient level.

    With ``official`` and a ``split`` column present, the provider's split is used where
    given (NIH ``train_val`` counts as train, MIMIC ``validate`` as train); rows without
    one are split by patient. Raises :class:`PatientLeakError` if the result leaks.
    """
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size={test_size}: expected a fraction in (0, 1).")
    patients = metadata[group]
    out = pd.Series(pd.NA, index=metadata.index, dtype="string", name="split")
    if official and "split" in metadata.columns:
        src = metadata["split"].astype("string")
        out = src.map({"test": "test", "train": "train", "train_val": "train", "validate": "train",
                       "val": "train", "valid": "train"}).astype("string").rename("split")
    todo = out.isna()
    if todo.any() and out.notna().any():
        # A patient with some officially split images keeps that side for the rest.
        known = pd.DataFrame({"p": patients[~todo], "s": out[~todo]}).drop_duplicates("p").set_index("p")["s"]
        out[todo] = patients[todo].map(known).astype("string")
        todo = out.isna()
    if todo.any():
        order = _patient_order(patients[todo], seed)
        n_test = int(round(test_size * len(order)))
        test_patients = set(order[:n_test])
        out[todo] = np.where(patients[todo].isin(test_patients), "test", "train")
    check_no_leak(out, patients, "train_test_split")
    return out
