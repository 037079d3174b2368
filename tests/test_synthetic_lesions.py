"""The synthetic lesion cohort: ChestX-Det10's exact layout, read back through the real loader."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from cxrcore.cohorts import get_cohort
from cxrcore.cohorts.chestxdet10 import SMALL_LESION_CLASSES, ChestXDet10
from cxrcore.cohorts.synthetic_lesions import FIELD_OF_VIEW_MM, LESION_CLASSES, MANIFEST, write_synthetic_chestxdet10

N, SIZE = 24, 256


@pytest.fixture(scope="module")
def cohort_root(tmp_path_factory):
    return write_synthetic_chestxdet10(tmp_path_factory.mktemp("cxd") / "synthetic", n_images=N, seed=3, size=SIZE,
                                       n_jobs=1)


def test_layout_is_chestxdet10s(cohort_root):
    files = sorted(p.name for p in cohort_root.iterdir())
    assert {"train.json", "test.json", "train", "test"} <= set(files)
    entries = {s: json.loads((cohort_root / f"{s}.json").read_text()) for s in ("train", "test")}
    assert len(entries["train"]) + len(entries["test"]) == N and entries["test"]
    for split, es in entries.items():
        assert isinstance(es, list)
        for e in es:
            assert list(e) == ["file_name", "syms", "boxes"]  # the release's keys, in its order
            assert isinstance(e["file_name"], str) and e["file_name"].endswith(".png")
            assert len(e["syms"]) == len(e["boxes"])
            assert set(e["syms"]) <= set(LESION_CLASSES)
            for b in e["boxes"]:
                assert len(b) == 4 and all(type(v) is int for v in b)  # integer pixels, like the release
                assert 0 <= b[0] < b[2] <= SIZE and 0 <= b[1] < b[3] <= SIZE
            img = Image.open(cohort_root / split / e["file_name"])
            assert img.mode == "L" and img.size == (SIZE, SIZE)  # 8-bit grey, like the release
    assert sum(not e["syms"] for es in entries.values() for e in es) > 0, "no lesion-free image"
    # the release writes one JSON line with json.dumps' default separators
    text = (cohort_root / "train.json").read_text()
    assert text.startswith('[{"file_name": "') and "\n" not in text


def test_read_back_through_the_real_loader(cohort_root):
    c = get_cohort("chestxdet10", str(cohort_root))
    assert isinstance(c, ChestXDet10) and len(c) == N and len(c.exclusions) == 0
    assert c.label_columns == list(SMALL_LESION_CLASSES)
    for cls in SMALL_LESION_CLASSES:
        assert 0 < c.metadata[cls].sum() < N  # every class has positives and negatives
    img = c.read_image(0)  # checks the boxes against the real image size
    assert img.dtype == np.float32 and img.shape == (SIZE, SIZE) and 0 <= img.min() < img.max() <= 1
    assert set(c.boxes["class"]) == set(SMALL_LESION_CLASSES)


def test_boxes_lie_in_the_lung_fields_and_do_not_overlap(cohort_root):
    c = ChestXDet10(cohort_root)
    split = c.metadata.set_index("image_id")["split"]
    for image_id, g in c.boxes.groupby("image_id"):
        lung = np.asarray(Image.open(cohort_root / "lung_masks" / split[image_id] / image_id)) > 0
        for x1, y1, x2, y2 in g[["x1", "y1", "x2", "y2"]].to_numpy(int):
            cy, cx = (y1 + y2) // 2, (x1 + x2) // 2
            assert lung[cy, cx], f"{image_id}: box centre outside the lung"
            assert lung[y1:y2, x1:x2].mean() > 0.6, f"{image_id}: box mostly outside the lung"
        b = g[["x1", "y1", "x2", "y2"]].to_numpy(float)
        for i in range(len(b)):
            for j in range(i + 1, len(b)):
                assert min(b[i, 2], b[j, 2]) <= max(b[i, 0], b[j, 0]) or min(b[i, 3], b[j, 3]) <= max(b[i, 1], b[j, 1])


def test_size_distribution_by_class(tmp_path):
    # sizes are drawn in mm and scale with the image: check them at the release's scale of 0.42 mm/px
    root = write_synthetic_chestxdet10(tmp_path / "sizes", n_images=30, seed=11, size=384, n_jobs=2)
    lesions = json.loads((root / MANIFEST).read_text())["lesions"]
    mm = {c: np.array([les["diameter_mm"] for les in lesions if les["class"] == c]) for c in LESION_CLASSES}
    assert all(len(v) >= 5 for v in mm.values())
    assert mm["Nodule"].max() < 30 and mm["Mass"].min() > 30  # the radiological 3 cm line
    assert np.median(mm["Calcification"]) < np.median(mm["Nodule"]) < np.median(mm["Mass"])
    assert mm["Calcification"].max() <= 15
    contrast = {c: np.median([les["contrast"] for les in lesions if les["class"] == c]) for c in LESION_CLASSES}
    assert contrast["Calcification"] > 2 * contrast["Nodule"]  # calcification: small and dense
    c = ChestXDet10(root)
    side = np.sqrt(c.boxes["area"]) * (FIELD_OF_VIEW_MM / 384) / (FIELD_OF_VIEW_MM / 1024)  # in 1024-px pixels
    med = side.groupby(c.boxes["class"]).median()
    assert 8 < med["Calcification"] < 40 and 25 < med["Nodule"] < 60 and 80 < med["Mass"] < 200
    # a 518-px encoder input with 14-px patches: nodules about one to three patches across
    patches = side / 1024 * 518 / 14
    assert 0.7 < patches[c.boxes["class"] == "Nodule"].median() < 3 < patches[c.boxes["class"] == "Mass"].median()


def test_strata_small_and_large_within_class(cohort_root):
    b = ChestXDet10(cohort_root).boxes
    for cls, g in b.groupby("class"):
        if len(g) > 1:
            assert set(g["stratum"]) == {"small", "large"}, cls
            assert g.loc[g["stratum"] == "small", "area"].max() <= g.loc[g["stratum"] == "large", "area"].min()


def test_idempotent_and_atomic(tmp_path):
    root = tmp_path / "c"
    write_synthetic_chestxdet10(root, n_images=4, seed=0, size=256, n_jobs=1)
    stamp = (root / "train.json").stat().st_mtime_ns
    first = (root / MANIFEST).read_text()
    write_synthetic_chestxdet10(root, n_images=4, seed=0, size=256, n_jobs=1)
    assert (root / "train.json").stat().st_mtime_ns == stamp  # same parameters: nothing redrawn
    write_synthetic_chestxdet10(root, n_images=5, seed=0, size=256, n_jobs=1)  # new parameters: replaced
    assert len(ChestXDet10(root)) == 5 and (root / MANIFEST).read_text() != first
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], "temporary folders left behind"


def test_deterministic_and_parallel_equals_serial(tmp_path):
    a = write_synthetic_chestxdet10(tmp_path / "a", n_images=6, seed=5, size=256, n_jobs=1)
    b = write_synthetic_chestxdet10(tmp_path / "b", n_images=6, seed=5, size=256, n_jobs=2)
    for split in ("train", "test"):
        assert (a / f"{split}.json").read_text() == (b / f"{split}.json").read_text()
        for p in (a / split).iterdir():
            assert np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(b / split / p.name)))


def test_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not written by"):
        write_synthetic_chestxdet10(tmp_path / "mine", n_images=2, size=256)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="size"):
        write_synthetic_chestxdet10(tmp_path / "x", n_images=2, size=100)
