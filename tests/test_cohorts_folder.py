"""FolderCohort: any directory of PNG / JPEG / DICOM."""

from __future__ import annotations

import numpy as np
import pytest

from cxrcore.cohorts.base import METADATA_COLUMNS, CohortError
from cxrcore.cohorts.folder import FolderCohort
from fixtures_cohorts import ramp, write_dicom, write_jpeg, write_png


def make_folder(root):
    write_png(root / "00000001_000.png", ramp(8, 8))
    write_png(root / "sub" / "00000001_001.png", ramp(8, 8, 65535, np.uint16))
    write_jpeg(root / "sub" / "00000002_000.jpg", ramp(8, 8))
    write_dicom(root / "deep" / "x" / "00000003_000.dcm", np.zeros((8, 8), np.uint16))
    (root / "README.txt").write_text("not an image")
    return root


def test_lists_images_without_opening(tmp_path):
    c = FolderCohort(make_folder(tmp_path / "f"))
    md = c.metadata
    assert list(md.columns) == list(METADATA_COLUMNS) and len(md) == 4
    assert list(md["patient_id"]) == list(md["study_id"])  # stem by default
    assert c.exclusions.to_dict("records") == [{"reason": "not an image file (suffix)", "count": 1, "item": "image"}]
    assert all(c.read_image(i).shape == (8, 8) for i in range(len(c)))


def test_patient_rule_regex_and_callable(tmp_path):
    root = make_folder(tmp_path / "f")
    c = FolderCohort(root, patient_id=r"^(\d{8})_")
    assert sorted(c.metadata["patient_id"]) == ["00000001", "00000001", "00000002", "00000003"]
    c = FolderCohort(root, patient_id=lambda rel: rel.split("/")[0])
    assert set(c.metadata["patient_id"]) == {"00000001_000.png", "sub", "deep"}


def test_rule_not_matching(tmp_path):
    root = make_folder(tmp_path / "f")
    write_png(root / "odd.png", ramp(4, 4))
    with pytest.raises(CohortError, match="odd.png.*patient id rule does not match|patient id rule does not match.*odd.png"):
        FolderCohort(root, patient_id=r"^(\d{8})_")
    c = FolderCohort(root, patient_id=r"^(\d{8})_", on_error="exclude")
    assert len(c) == 4


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(CohortError, match="not a folder"):
        FolderCohort(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CohortError, match="no image files"):
        FolderCohort(tmp_path / "empty")
