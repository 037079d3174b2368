"""Shared test set-up: never touch the network, headless plotting."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT



def pytest_configure(config):
    """Stop, rather than run ungrouped, when ``--dist loadgroup`` cannot group.

    Tests marked ``xdist_group`` share one expensive thing per session (the smoke book, a
    local Ray cluster). pytest-xdist 3.8 marks their ids with ``@group``; pytest 9.2 no
    longer lets it (pytest-dev/pytest-xdist#1386), and the group's tests are silently spread
    over the workers, each starting its own copy.
    """
    if os.environ.get("PYTEST_XDIST_WORKER") or config.getoption("dist", "no") != "loadgroup":
        return
    from importlib.metadata import version

    from packaging.version import Version

    if Version(pytest.__version__) >= Version("9.2.0.dev0") and Version(version("pytest-xdist")) <= Version("3.8.0"):
        raise pytest.UsageError(
            f"pytest {pytest.__version__} with pytest-xdist {version('pytest-xdist')}: --dist loadgroup does not group "
            "tests (pytest-dev/pytest-xdist#1386), so tests that share a smoke book or a Ray cluster would each "
            "start their own. Install the versions pyproject.toml pins: pip install -e '.[dev]'.")
