"""What a public research repository carries: a licence matching pyproject, a valid CITATION.cff
citing the paper, and the terms of every cohort reader and every registered encoder's weights."""

from __future__ import annotations

import tomllib

import yaml

from cxrcore.cohorts import COHORTS
from cxrcore.encoders import REGISTRY


def test_licence_file_matches_pyproject(repo_root):
    declared = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["license"]
    declared = declared["text"] if isinstance(declared, dict) else declared
    first_line = (repo_root / "LICENSE").read_text().splitlines()[0]
    assert first_line == f"{declared} License", f"LICENSE says {first_line!r}, pyproject.toml declares {declared!r}"


def test_citation_cff_cites_the_paper_and_the_software(repo_root):
    cff = yaml.safe_load((repo_root / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software"
    assert cff["license"] == tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["license"]["text"]
    assert cff["version"] == tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["version"]
    paper = cff["preferred-citation"]
    assert paper["title"].startswith("Frozen Foundation-Model Embeddings Discard Small-Lesion Signal in Chest Radiography")
    assert paper["authors"][0]["family-names"] == "Muthyala"


def test_every_cohort_reader_and_encoder_has_its_terms(repo_root):
    text = (repo_root / "DATA_LICENSES.md").read_text()
    missing = [f"cohort {c}" for c in COHORTS if f"(`{c}`" not in text]
    missing += [f"encoder {k}" for k in REGISTRY if f"| `{k}` |" not in text]
    assert not missing, f"DATA_LICENSES.md has no licence/citation row for: {missing}"
