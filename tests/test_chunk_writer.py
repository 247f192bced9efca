"""Level writers: chunks stored exactly as Zarr's own empty-chunk rule stores them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.io.chunk_writer import (
    EMPTY_CHUNKS_CONFIG,
    LevelWriter,
    forget_writers,
    level_writer,
)


def _array(path: Path, shape, chunks, dtype) -> str:
    zarr.create_array(
        str(path), shape=shape, chunks=chunks, dtype=dtype, fill_value=0, config=EMPTY_CHUNKS_CONFIG
    )
    return str(path)


def _stored(path: str) -> set[str]:
    return {
        str(p.relative_to(path))
        for p in Path(path).rglob("*")
        if p.is_file() and p.name != "zarr.json"
    }


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32", "bool"])
@pytest.mark.parametrize("start", [(0, 0), (5, 11)])  # chunk-aligned, and not
def test_a_writer_stores_the_chunks_zarr_would(tmp_path, dtype, start):
    """Random chunks zeroed (and one float chunk of -0.0): the same values and the same
    stored chunk files as a plain Zarr write with ``write_empty_chunks=False``."""
    rng = np.random.default_rng(7)
    data = (rng.random((2, 50, 70)) > 0.3).astype(dtype)
    sy, sx = start
    data[:, :7, :9] = 0  # part of a chunk
    for y, x in [(16, 16), (32, 48)]:  # whole chunks (level coordinates) left all zero
        data[:, y - sy : y - sy + 16, x - sx : x - sx + 16] = 0
    if dtype == "float32":
        data[:, 16 - sy : 32 - sy, 48 - sx : 64 - sx] = -0.0
    ours = _array(tmp_path / "ours", (2, 80, 96), (2, 16, 16), dtype)
    plain = _array(tmp_path / "plain", (2, 80, 96), (2, 16, 16), dtype)
    zarr.open_array(ours, mode="r+")[:] = np.ones((2, 80, 96), dtype)  # stored before
    zarr.open_array(plain, mode="r+")[:] = np.ones((2, 80, 96), dtype)
    at = (slice(None), slice(sy, sy + 50), slice(sx, sx + 70))
    LevelWriter(ours)[at] = data
    zarr.open_array(plain, mode="r+")[at] = data
    np.testing.assert_array_equal(zarr.open_array(ours)[:], zarr.open_array(plain)[:])
    assert _stored(ours) == _stored(plain)
    assert len(_stored(ours)) < 5 * 6  # some chunks were removed: the rule was applied


def test_one_writer_per_level_until_its_image_is_forgotten(tmp_path):
    image = tmp_path / "img"
    paths = [
        _array(image / "0", (1, 8, 8), (1, 8, 8), "uint8"),
        _array(image / "labels" / "classes" / "0", (1, 8, 8), (1, 8, 8), "uint8"),
        _array(tmp_path / "other" / "0", (1, 8, 8), (1, 8, 8), "uint8"),
    ]
    first = [level_writer(p) for p in paths]
    assert [level_writer(p) for p in paths] == first
    forget_writers(image)
    again = [level_writer(p) for p in paths]
    assert again[0] is not first[0] and again[1] is not first[1]  # the image's, labels too
    assert again[2] is first[2]
    forget_writers(os.fspath(tmp_path / "other"))
