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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks run far faster on one torch thread than on two contended ones."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tile_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts compressed tiles/strips that tifffile's Zarr store reads from disk."""
    import tifffile.zarr

    reads: list[int] = []
    original = tifffile.zarr.FileCache.read

    def counting(self, *args, **kwargs):
        reads.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tifffile.zarr.FileCache, "read", counting)
    return reads
