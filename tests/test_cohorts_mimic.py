"""MIMIC-CXR-JPG 2.x: fixtures in PhysioNet's exact layout and headers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxrcore.cohorts.base import METADATA_COLUMNS, CohortError
from cxrcore.cohorts.mimic import MIMICCXRJPG
from fixtures_cohorts import MIMIC_IMAGES, MIMIC_LABELS, make_mimic


def test_layout_frontal_default(tmp_path):
    c = MIMICCXRJPG(make_mimic(tmp_path / "mimic"))
    md = c.metadata
    assert list(md.columns[:5]) == list(METADATA_COLUMNS)
    assert c.label_columns == MIMIC_LABELS
    assert set(md["view"]) == {"PA", "AP"} and len(md) == 4
    assert c.exclusions.to_dict("records") == [{"reason": "view not in ('PA', 'AP')", "count": 1, "item": "image"}]
    first = md.iloc[0]
    assert first["path"].endswith("files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg")
    assert first["patient_id"] == "10000032" and first["study_id"] == "50414267"
    assert first["width"] == 10 and first["height"] == 12
    assert list(md["split"]) == ["train", "train", "train", "test"]
    img = c.read_image(0)
    assert img.shape == (12, 10) and img.dtype == np.float32
    assert c.pixels_public is False and c.boxes is None


@pytest.mark.parametrize(("uncertain", "value"), [("ignore", np.nan), ("positive", 1.0), ("negative", 0.0)])
def test_uncertain_policy(tmp_path, uncertain, value):
    md = MIMICCXRJPG(make_mimic(tmp_path / "m"), uncertain=uncertain).metadata.set_index("image_id")
    got = md.loc[MIMIC_IMAGES[0][0], "Cardiomegaly"]
    assert (np.isnan(got) and np.isnan(value)) or got == value
    assert md.loc[MIMIC_IMAGES[0][0], "Atelectasis"] == 1.0 and md.loc[MIMIC_IMAGES[0][0], "Edema"] == 0.0
    assert np.isnan(md.loc[MIMIC_IMAGES[0][0], "Fracture"])  # blank = not mentioned = unknown


def _study(md, study_id):
    return md.loc[md["study_id"] == str(study_id)].iloc[0]


def test_no_finding_makes_blank_findings_negative(tmp_path):
    # Study 53189527 has No Finding = 1 and every other cell blank: a negative for every
    # finding (CheXpert rule, torchxrayvision's MIMIC_Dataset), not unknown.
    md = MIMICCXRJPG(make_mimic(tmp_path / "m")).metadata
    healthy = _study(md, 53189527)
    others = [c for c in MIMIC_LABELS if c != "No Finding"]
    assert healthy["No Finding"] == 1.0 and (healthy[others] == 0.0).all()
    # a study without No Finding keeps its blanks unknown, and its No Finding blank too
    sick = _study(md, 50414267)
    assert np.isnan(sick["Fracture"]) and np.isnan(sick["No Finding"]) and sick["Atelectasis"] == 1.0


def test_no_finding_rule_keeps_explicit_cells(tmp_path):
    # Support Devices = 1 beside No Finding = 1 is what the CheXpert labeler writes for a
    # film with a line and no disease: explicit cells win over the rule (torchxrayvision
    # would overwrite them with 0). An uncertain cell follows `uncertain`, not the rule.
    labels = {53189527: {"No Finding": 1.0, "Support Devices": 1.0, "Edema": -1.0}}
    for uncertain, edema in (("ignore", np.nan), ("positive", 1.0)):
        row = _study(MIMICCXRJPG(make_mimic(tmp_path / uncertain, labels=labels), uncertain=uncertain).metadata,
                     53189527)
        assert row["Support Devices"] == 1.0 and row["Cardiomegaly"] == 0.0
        assert (np.isnan(row["Edema"]) and np.isnan(edema)) or row["Edema"] == edema


def test_blank_negative(tmp_path):
    md = MIMICCXRJPG(make_mimic(tmp_path / "m"), blank="negative").metadata
    sick = _study(md, 50414267)
    assert sick["Fracture"] == 0.0 and sick["No Finding"] == 0.0 and sick["Atelectasis"] == 1.0
    assert np.isnan(sick["Cardiomegaly"])  # -1 is uncertain, not blank: uncertain="ignore" keeps it NaN
    with pytest.raises(ValueError, match="blank"):
        MIMICCXRJPG(tmp_path / "m", blank="zero")


def test_all_views_and_negbio_and_gz(tmp_path):
    root = make_mimic(tmp_path / "m", labeler="negbio", gz=True)
    c = MIMICCXRJPG(root, views=None, labeler="negbio")
    assert len(c) == 5 and "LATERAL" in set(c.metadata["view"])
    with pytest.raises(CohortError, match="chexpert.csv"):
        MIMICCXRJPG(root)


def test_missing_image(tmp_path):
    root = make_mimic(tmp_path / "m")
    next((root / "files").rglob(f"{MIMIC_IMAGES[3][0]}.jpg")).unlink()
    with pytest.raises(CohortError, match=r"metadata.csv, line 5, field 'dicom_id': image file missing"):
        MIMICCXRJPG(root)
    c = MIMICCXRJPG(root, on_error="exclude")
    assert len(c) == 3 and c.exclusions.set_index("reason")["count"]["image file missing"] == 1


def test_unknown_label_value(tmp_path):
    root = make_mimic(tmp_path / "m", labels={57375967: {"Edema": 2.0}})
    with pytest.raises(CohortError, match=r"chexpert.csv, line 4, field 'Edema': unknown label value \(value 2.0\)"):
        MIMICCXRJPG(root)
    c = MIMICCXRJPG(root, on_error="exclude")
    assert MIMIC_IMAGES[3][0] not in set(c.metadata["image_id"])
    assert c.exclusions.set_index("reason")["count"]["unknown label value"] == 1


def test_missing_column(tmp_path):
    root = make_mimic(tmp_path / "m", write_images=False)
    p = root / "mimic-cxr-2.0.0-metadata.csv"
    pd.read_csv(p).drop(columns="ViewPosition").to_csv(p, index=False)
    with pytest.raises(CohortError, match="field 'ViewPosition'.*missing column"):
        MIMICCXRJPG(root, check_files=False)


def test_missing_label_file(tmp_path):
    root = make_mimic(tmp_path / "m", write_images=False)
    (root / "mimic-cxr-2.0.0-chexpert.csv").unlink()
    with pytest.raises(CohortError, match="physionet.org"):
        MIMICCXRJPG(root, check_files=False)


def test_bad_option():
    with pytest.raises(ValueError, match="uncertain"):
        MIMICCXRJPG("/nonexistent", uncertain="maybe")
