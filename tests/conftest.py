"""Shared fixtures: the real data beside the project, tiny synthetic images."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PIPELINE_TEST_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """``../shared/data``: real slides and volumes (read-only; copy before changing)."""
    if not DATA.is_dir():
        pytest.skip(f"real test data not found at {DATA} (set PIPELINE_TEST_DATA)")
    return DATA
