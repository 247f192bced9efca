"""Pyramid levels from the blocks' memory are the pixels the whole-level dask pass made."""

from __future__ import annotations

import itertools

import dask.array as da
import numpy as np
import pytest
import zarr

from pipeline.core.geometry import Region
from pipeline.core.pyramid import (
    block_levels,
    downsample,
    level_chunks,
    level_region,
    pyramid_shapes,
)


def block_regions(shape, block):
    """Blocks of ``block`` over ``shape``, raster order, the last ones clipped."""
    image = Region.of_shape(shape)
    counts = [-(-n // b) for n, b in zip(shape, block)]
    for index in itertools.product(*(range(c) for c in counts)):
        yield Region([i * b for i, b in zip(index, block)], block).intersect(image)


def dask_pyramid(level0: np.ndarray, axes: str, chunks, min_size: int, start=None):
    """The oracle: each level from the previous one as stored, with dask.array.coarsen
    over the level's zarr chunks (how the pyramid was built before blocks wrote it)."""
    shapes = pyramid_shapes(level0.shape, axes, min_size)
    levels = [level0] if start is None else list(start)
    factors = {axes.index("y"): 2, axes.index("x"): 2}
    for k in range(len(levels), len(shapes)):
        src = da.from_array(levels[k - 1], chunks=level_chunks(chunks, shapes[k - 1]))
        down = da.coarsen(np.mean, src.astype(np.float32), factors, trim_excess=True)
        if level0.dtype == np.uint8:
            down = da.rint(down).astype(np.uint8)
        else:
            down = down.astype(level0.dtype)
        levels.append(down.compute(scheduler="synchronous"))
    return levels


def from_blocks(level0: np.ndarray, axes: str, chunks, block, min_size: int):
    """Levels 1..L written block by block from each block's own pixels, the rest after."""
    shapes = pyramid_shapes(level0.shape, axes, min_size)
    written = block_levels(level0.shape, axes, chunks, block, min_size)
    levels = [level0] + [np.full(s, 77, level0.dtype) for s in shapes[1 : written + 1]]
    for region in block_regions(level0.shape[1:], block[1:]):
        data = level0[(slice(None), *region.to_slices())]
        for k in range(1, written + 1):
            data = downsample(data, axes, level_chunks(chunks, shapes[k - 1]))
            target = level_region(region, axes, k)
            assert data.shape[1:] == target.shape
            levels[k][(slice(None), *target.to_slices())] = data
    return dask_pyramid(level0, axes, chunks, min_size, start=levels), written


@pytest.mark.parametrize("dtype", ["uint8", "float32", "float16"])
@pytest.mark.parametrize(
    "shape,chunk,block,expect",
    [
        ((2, 517, 389), 32, 64, 1),  # odd sizes, several blocks per axis
        ((2, 517, 389), 32, 128, 2),
        ((1, 1031, 771), 64, 256, 2),
        ((3, 301, 257), 16, 1024, 5),  # one block holds the image: every level
        # block = chunk: no level from memory (only ``written`` is checked: every level
        # then comes from the reference recipe itself)
        ((2, 130, 66), 32, 32, 0),
    ],
)
def test_block_levels_equal_the_dask_pyramid(dtype, shape, chunk, block, expect):
    rng = np.random.default_rng(1)
    if dtype == "uint8":
        level0 = rng.integers(0, 256, shape, dtype=np.uint8)
    else:  # wide range of magnitudes: the summation order shows in float
        level0 = (rng.random(shape, dtype=np.float32) ** 6).astype(dtype)
    axes, chunks, blocks = "cyx", (shape[0], chunk, chunk), (shape[0], block, block)
    want = dask_pyramid(level0, axes, chunks, 16)
    got, written = from_blocks(level0, axes, chunks, blocks, 16)
    assert written == min(expect, len(want) - 1)
    assert len(got) == len(want) > 3
    for k, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, k
        np.testing.assert_array_equal(g, w, err_msg=f"level {k}")


def test_block_levels_3d_and_volume_of_planes():
    rng = np.random.default_rng(2)
    level0 = rng.random((1, 5, 203, 150), dtype=np.float32)
    axes, chunks = "czyx", (1, 2, 32, 32)
    want = dask_pyramid(level0, axes, chunks, 8)
    got, written = from_blocks(level0, axes, chunks, (1, 2, 128, 64), 8)
    assert written == 1  # x: 64 = 2 * 32 at level 1, but 16 px at level 2 is half a chunk
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_uint8_rounding_is_half_to_even():
    # sums 2, 6, 10: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, as np.rint of the float32 mean
    data = np.array([[[0, 1, 1, 2, 2, 3], [0, 1, 2, 1, 2, 3]]], np.uint8)
    assert downsample(data, "cyx", (1, 2, 6)).tolist() == [[[0, 2, 2]]]
    values = np.arange(256, dtype=np.uint8)
    quads = np.stack(np.meshgrid(values, values[::7], indexing="ij"), -1).reshape(1, -1, 2)
    pairs = np.concatenate([quads, quads[:, ::-1]], axis=2).reshape(1, -1, 2, 2)
    image = pairs.transpose(0, 2, 1, 3).reshape(1, 2, -1)
    want = np.rint(image.reshape(1, 1, 2, -1, 2).astype(np.float32).mean(axis=(2, 4)))
    np.testing.assert_array_equal(downsample(image, "cyx", image.shape), want.astype(np.uint8))


def test_level_region_halves_y_and_x_only():
    r = Region((3, 1024, 2048), (2, 1024, 1023))
    assert level_region(r, "czyx", 2) == Region((3, 256, 512), (2, 256, 255))
    assert level_region(Region((0, 0), (517, 389)), "cyx", 1) == Region((0, 0), (258, 194))


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
@pytest.mark.parametrize("block,written", [(32, 0), (64, 1), (128, 2), (1024, 5)])
def test_a_run_writes_the_pyramid_of_the_dask_pass(tmp_path, dtype, block, written):
    """Through ``pipeline.run.run``: blocks write levels 1..L from memory, the rest is
    built after; every level equals the dask pass over the stored level 0."""
    import zarr
    from conftest import write_tiff

    from pipeline.config import RunConfig
    from pipeline.run import run

    image = np.random.default_rng(3).integers(0, 256, (389, 517, 3), dtype=np.uint8)
    path = write_tiff(tmp_path / "odd.tif", image, tile=(64, 64), photometric="rgb")
    cfg = RunConfig(
        backend="identity",
        tile=(64,),
        overlap=16,
        dtype=dtype,
        chunk=32,
        block=block,
        pyramid_min=16,
        skip_background=False,
        scheduler="sync",
    )
    report = run([str(path)], tmp_path / "out.zarr", None, cfg)
    assert report.ok, report.inputs[0].message
    group = zarr.open_group(str(tmp_path / "out.zarr" / "odd"), mode="r")
    levels = [group[str(k)][:] for k in range(sum(name.isdigit() for name in group.array_keys()))]
    shape, chunks = levels[0].shape, (3, 32, 32)
    assert block_levels(shape, "cyx", chunks, (3, block, block), 16) == written
    want = dask_pyramid(levels[0], "cyx", chunks, 16)
    assert len(levels) == len(want) == 6
    for k, (g, w) in enumerate(zip(levels, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, k
        np.testing.assert_array_equal(g, w, err_msg=f"level {k}")
    if dtype == "uint8":
        np.testing.assert_array_equal(levels[0], image.transpose(2, 0, 1))  # identity


@pytest.mark.parametrize("shape", [(2, 64, 48), (1, 37, 50)])
def test_a_level_built_chunk_by_chunk_equals_the_whole_level(shape):
    """``build_level``: the mean as ``downsample`` of the whole level computes it, the
    nearest as every second pixel, whatever the chunking of the level it writes."""
    from pipeline.core.pyramid import build_level, downsample

    src_data = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
    src = zarr.create_array(zarr.storage.MemoryStore(), shape=shape, chunks=(1, 16, 16), dtype="u1")
    src[:] = src_data
    half = (shape[0], shape[1] // 2, shape[2] // 2)
    for reduce, want in (
        ("mean", downsample(src_data, "cyx", src.chunks)),
        ("nearest", src_data[:, : 2 * half[1] : 2, : 2 * half[2] : 2]),
    ):
        target = zarr.create_array(
            zarr.storage.MemoryStore(), shape=half, chunks=(1, 8, 8), dtype="u1"
        )
        build_level(src, target, "cyx", reduce)
        np.testing.assert_array_equal(target[:], want)
    with pytest.raises(ValueError, match="reduce"):
        build_level(src, target, "cyx", "max")
