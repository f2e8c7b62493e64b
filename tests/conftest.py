"""Shared fixtures: the offline data directory and built tiny tasks (one build per session)."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = os.environ.setdefault("LOPT_DATA_DIR", str(ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> str:
    return DATA_DIR


@pytest.fixture(scope="session")
def tiny_task():
    """``mlp_fmnist_tiny`` (built once): a task every optimizer's contract is checked on."""
    import tasks

    return tasks.get_task("mlp_fmnist_tiny", data_dir=DATA_DIR)
