"""ManifestCohort: the documented institutional manifest, validated strictly."""

from __future__ import annotations

import numpy as np
import pytest

from cxrcore.cohorts.base import BOX_COLUMNS, METADATA_COLUMNS, CohortError
from cxrcore.cohorts.manifest import MANIFEST_SCHEMA, ManifestCohort
from fixtures_cohorts import ramp, write_dicom, write_jpeg, write_png

HEADER = "path,patient_id,image_id,study_id,view,width,height,label_Nodule,label_Mass"


def make_manifest(root, rows=None, boxes=None):
    root.mkdir(parents=True, exist_ok=True)
    write_png(root / "img" / "a.png", ramp(20, 30))
    write_jpeg(root / "img" / "b.jpg", ramp(20, 30))
    write_dicom(root / "img" / "c.dcm", np.full((20, 30), 100, np.uint16), photometric="MONOCHROME1")
    rows = rows or [
        "img/a.png,E001,a,S1,pa,30,20,1,0",
        "img/b.jpg,E001,b,S2,AP,30,20,0,",
        "img/c.dcm,E002,c,S3,PA,30,20,,1",
    ]
    (root / "manifest.csv").write_text("\n".join([HEADER, *rows]) + "\n")
    if boxes is not None:
        (root / "manifest_boxes.csv").write_text("\n".join(["image_id,class,x1,y1,x2,y2", *boxes]) + "\n")
    return root


def test_schema_documented():
    for col in ("path", "patient_id", "label_<name>", "x1, y1", "exclusive"):
        assert col in MANIFEST_SCHEMA
    assert "label_<name>" in ManifestCohort.__doc__ or "MANIFEST_SCHEMA" in ManifestCohort.__doc__


def test_reads_manifest_folder_and_boxes(tmp_path):
    root = make_manifest(tmp_path / "emory", boxes=["a,Nodule,1,2,5,6", "c,Mass,0,0,30,20"])
    c = ManifestCohort(root)
    md = c.metadata
    assert list(md.columns[:5]) == list(METADATA_COLUMNS) and c.label_columns == ["Nodule", "Mass"]
    assert list(md["view"]) == ["PA", "AP", "PA"]
    assert md.loc[0, "Mass"] == 0.0 and np.isnan(md.loc[1, "Mass"])
    assert np.isnan(md.loc[2, "Nodule"]) and md.loc[2, "Mass"] == 1.0
    assert list(c.boxes.columns) == list(BOX_COLUMNS) and len(c.boxes) == 2
    assert [c.read_image(i).shape for i in range(3)] == [(20, 30)] * 3
    np.testing.assert_allclose(c.read_image(2), 1.0 - 100 / 4095, atol=1e-6)  # MONOCHROME1 DICOM
    assert c.pixels_public is False


def test_minimal_manifest(tmp_path):
    write_png(tmp_path / "x.png", ramp(4, 4))
    (tmp_path / "m.csv").write_text("path,patient_id\nx.png,P9\n")
    c = ManifestCohort(tmp_path / "m.csv")
    assert c.metadata.loc[0, "image_id"] == "x.png" and c.label_columns == [] and c.boxes is None


@pytest.mark.parametrize(
    ("row", "reason", "field"),
    [
        ("img/c.dcm,E002,c,S3,PA,30,20,yes,1", "unknown label value", "label_Nodule"),
        ("img/c.dcm,E002,c,S3,PA,30,20,2,1", "unknown label value", "label_Nodule"),
        ("img/zz.png,E002,c,S3,PA,30,20,,1", "image file missing", "path"),
        ("img/c.dcm,,c,S3,PA,30,20,,1", "patient_id missing", "patient_id"),
        ("img/c.dcm,E002,a,S3,PA,30,20,,1", "duplicate image id", "image_id"),
        ("img/c.dcm,E002,c,S3,PA,-30,20,,1", "width not a positive number", "width"),
    ],
)
def test_bad_row(tmp_path, row, reason, field):
    rows = ["img/a.png,E001,a,S1,pa,30,20,1,0", "img/b.jpg,E001,b,S2,AP,30,20,0,", row]
    root = make_manifest(tmp_path / "e", rows=rows)
    with pytest.raises(CohortError, match=rf"manifest.csv, line 4, field '{field}': {reason}"):
        ManifestCohort(root)
    c = ManifestCohort(root, on_error="exclude")
    assert len(c) == 2 and c.exclusions.to_dict("records") == [{"reason": reason, "count": 1, "item": "image"}]


def test_unknown_and_missing_columns(tmp_path):
    root = make_manifest(tmp_path / "e")
    p = root / "manifest.csv"
    p.write_text(p.read_text().replace("label_Mass", "Mass"))
    with pytest.raises(CohortError, match=r"line 1, field 'Mass': unknown column"):
        ManifestCohort(root)
    p.write_text("path,label_Mass\nimg/a.png,1\n")
    with pytest.raises(CohortError, match=r"field 'patient_id'.*missing column"):
        ManifestCohort(root)


@pytest.mark.parametrize(
    ("box", "reason"),
    [
        ("a,Nodule,5,2,5,6", "empty box"),
        ("a,Nodule,6,2,5,6", "inverted box"),
        ("a,Nodule,1,2,31,6", "box outside the image"),
        ("zz,Nodule,1,2,5,6", "box for an image not in the metadata"),
        ("a,Nodule,1,x,5,6", "box coordinate not a number"),
    ],
)
def test_bad_box(tmp_path, box, reason):
    root = make_manifest(tmp_path / "e", boxes=["c,Mass,0,0,30,20", box])
    with pytest.raises(CohortError, match=rf"manifest_boxes.csv, line 3, field '\w+': {reason}"):
        ManifestCohort(root)
    c = ManifestCohort(root, on_error="exclude")
    assert len(c.boxes) == 1 and c.exclusions["count"].sum() == 1


def test_boxes_of_excluded_image_counted(tmp_path):
    rows = ["img/a.png,E001,a,S1,pa,30,20,1,0", "img/gone.png,E001,g,S2,AP,30,20,0,"]
    root = make_manifest(tmp_path / "e", rows=rows, boxes=["g,Nodule,1,1,4,4", "a,Nodule,1,1,4,4"])
    c = ManifestCohort(root, on_error="exclude")
    assert c.exclusions.set_index("reason")["count"].to_dict() == {"image file missing": 1, "box of an excluded image": 1}


def test_boxes_screened_against_header_sizes_when_manifest_has_none(tmp_path):
    # /tmp/rev/man.py: without width/height, a box past the image used to pass the build
    # and only surface (and be dropped in a worker's lost state) on read.
    rows = ["img/a.png,E001,a,S1,pa,,,1,0", "img/b.jpg,E001,b,S2,AP,,,0,", "img/c.dcm,E002,c,S3,PA,,,,1"]
    root = make_manifest(tmp_path / "e", rows=rows, boxes=["a,Nodule,1,2,31,6", "c,Mass,0,0,30,20"])
    with pytest.raises(CohortError, match=r"manifest_boxes.csv, line 2, field 'x2': box outside the image "
                                          r"\(value 31.0\); expected x2 <= the image width \(the manifest's, or read from the image header"):
        ManifestCohort(root)
    c = ManifestCohort(root, on_error="exclude")
    assert c.exclusions.to_dict("records") == [{"reason": "box outside the image", "count": 1, "item": "box"}]
    assert list(c.boxes["image_id"]) == ["c"]
    # sizes read for the images with boxes (a PNG and a DICOM), not for the others
    assert c.metadata[["width", "height"]].to_numpy().tolist()[0] == [30, 20]
    assert c.metadata.loc[2, ["width", "height"]].tolist() == [30, 20] and np.isnan(c.metadata.loc[1, "width"])


def test_unreadable_header_of_an_image_with_boxes_counted_when_built(tmp_path):
    rows = ["img/a.png,E001,a,S1,pa,,,1,0", "img/b.jpg,E001,b,S2,AP,30,20,0,"]
    root = make_manifest(tmp_path / "e", rows=rows, boxes=["a,Nodule,1,2,5,6", "b,Nodule,1,2,5,6"])
    (root / "img" / "a.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(CohortError, match=r"manifest.csv, line 2, field 'path': image file unreadable"):
        ManifestCohort(root)
    c = ManifestCohort(root, on_error="exclude")
    assert list(c.metadata["image_id"]) == ["b"] and list(c.boxes["image_id"]) == ["b"]
    assert c.exclusions.set_index("reason")["count"].to_dict() == {
        "image file unreadable (corrupt, truncated or unsupported)": 1, "box of an excluded image": 1}
