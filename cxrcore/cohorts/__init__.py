"""Cohorts: one contract (``Cohort``), one class per data source, one name per cohort."""

from __future__ import annotations

import importlib
from pathlib import Path

from .base import BOX_COLUMNS, METADATA_COLUMNS, OPTIONAL_COLUMNS, STRATA, Cohort, CohortError, assign_strata
from .chestxdet10 import ChestXDet10
from .folder import FolderCohort
from .manifest import MANIFEST_SCHEMA, ManifestCohort
from .mimic import MIMICCXRJPG
from .nih import NIHChestXray14
from .splits import PatientLeakError, check_no_leak, patient_kfold, train_test_split
from .synthetic import SyntheticCohort

#: cohort name -> "module:Class"
COHORTS: dict[str, str] = {
    "synthetic": "cxrcore.cohorts.synthetic:SyntheticCohort",
    "nih": "cxrcore.cohorts.nih:NIHChestXray14",
    "mimic": "cxrcore.cohorts.mimic:MIMICCXRJPG",
    "manifest": "cxrcore.cohorts.manifest:ManifestCohort",
    "chestxdet10": "cxrcore.cohorts.chestxdet10:ChestXDet10",
    "folder": "cxrcore.cohorts.folder:FolderCohort",
}
#: cohorts generated on the fly, needing no data_root
GENERATED: frozenset[str] = frozenset({"synthetic"})


def list_cohorts() -> list[str]:
    """Known cohort names."""
    return list(COHORTS)


def check_cohort(name: str, accepted=None) -> str:
    """Return ``name``, or raise saying which cohorts are accepted (``accepted`` narrows the registry)."""
    ok = list(COHORTS) if accepted is None else [c for c in accepted if c in COHORTS]
    if name not in ok:
        raise ValueError(f"unknown cohort {name!r}; accepted: {ok}" + ("" if accepted is None else " (the cohorts this analysis can use)"))
    return name


def cohort_class(name: str) -> type[Cohort]:
    try:
        target = COHORTS[name]
    except KeyError:
        raise KeyError(f"unknown cohort {name!r}; known cohorts: {', '.join(COHORTS)}") from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)


def get_cohort(name: str, data_root: str | None = None, **kwargs) -> Cohort:
    """Open cohort ``name`` at ``data_root`` (the generated ``synthetic`` cohort needs none)."""
    cls = cohort_class(name)
    if name in GENERATED:
        return cls(**kwargs)
    if not data_root:
        raise ValueError(f"cohort {name!r} needs data_root: the folder holding the files as the provider ships them")
    if not Path(data_root).exists():
        raise FileNotFoundError(f"data_root {data_root!r} for cohort {name!r} does not exist")
    return cls(data_root, **kwargs)


__all__ = [
    "BOX_COLUMNS", "COHORTS", "GENERATED", "MANIFEST_SCHEMA", "METADATA_COLUMNS", "OPTIONAL_COLUMNS", "STRATA",
    "ChestXDet10", "Cohort", "CohortError", "check_cohort", "FolderCohort", "MIMICCXRJPG", "ManifestCohort", "NIHChestXray14",
    "PatientLeakError", "SyntheticCohort", "assign_strata", "check_no_leak", "cohort_class", "get_cohort",
    "list_cohorts", "patient_kfold", "train_test_split",
]
