"""The host path's fast pieces against the plain versions they replace: direct TIFF tile
reads against tifffile, reused buffers, the ordered merger, the banded finish and
pyramid mean against whole-block passes (bit for bit), the per-chunk empty check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr

from pipeline.core.buffers import reused
from pipeline.core.devices import scale_into, scale_of
from pipeline.core.geometry import Region
from pipeline.core.pyramid import _mean_uint8, _mean_uint8_banded
from pipeline.engine.blend import BlendMode
from pipeline.engine.device_section import finish_block, merge_tiles
from pipeline.engine.tiling import BlockGrid, Lattice
from pipeline.io.tiff import open_tiff_level
from pipeline.io.tiff_tiles import TiffTiles

CPU = torch.device("cpu")
SVS = "wsi/CMU-1-Small-Region.svs"


def _random_windows(rng, shape, count):
    for _ in range(count):
        sel = []
        for n in shape[:2]:
            lo = int(rng.integers(0, n))
            hi = int(rng.integers(lo, n + 50))
            sel.append(slice(lo, hi, int(rng.choice([1, 1, 2, 3, 7, 250, 500]))))
        c = int(rng.integers(-2, 3))
        yield (*sel, slice(None) if c == -1 else slice(1, 3) if c == -2 else c)


@pytest.mark.parametrize("series", [0, 1])  # tiles (240 x 240) and strips (16 rows)
def test_direct_tile_reads_equal_tifffile(data_dir: Path, series: int) -> None:
    path = str(data_dir / SVS)
    level = open_tiff_level(path, series, 0)
    assert isinstance(level, TiffTiles)
    whole = tifffile.imread(path, series=series)
    rng = np.random.default_rng(series)
    for sel in _random_windows(rng, whole.shape, 150):
        got = level[sel]
        assert got.shape == whole[sel].shape and np.array_equal(got, whole[sel]), sel
    assert level[5, 7].shape == (3,) and level[5].shape == whole[5].shape


def test_rgb_windows_are_planar_in_memory(data_dir: Path) -> None:
    """An interleaved RGB window comes back channels-first in memory, so the model's
    (c, y, x) view of it is contiguous (no transposing copy before the device)."""
    level = open_tiff_level(str(data_dir / SVS), 0, 0)
    window = level[100:612, 50:562]
    assert window.shape == (512, 512, 3)
    assert window.transpose(2, 0, 1).flags.c_contiguous


def test_tiled_tiff_of_one_sample_and_odd_tiles(tmp_path: Path) -> None:
    image = np.random.default_rng(3).integers(0, 65535, (301, 517), dtype=np.uint16)
    path = tmp_path / "gray.tif"
    tifffile.imwrite(path, image, tile=(64, 128), compression="zlib")
    level = open_tiff_level(str(path), 0, 0)
    assert isinstance(level, TiffTiles)
    assert np.array_equal(level[:, :], image)
    assert np.array_equal(level[37:300:3, 500:], image[37:300:3, 500:])


def test_reused_buffers_are_never_shared_while_held() -> None:
    a = reused("test-role", (4, 5), np.float32)
    a[:] = 1
    b = reused("test-role", (4, 5), np.float32)  # a is held: new memory
    assert not np.shares_memory(a, b)
    held = torch.from_numpy(reused("test-role", (2, 3), np.uint8))
    c = reused("test-role", (2, 3), np.uint8)
    assert not np.shares_memory(held.numpy(), c)
    del a, b, held
    d = reused("test-role", (3, 3), np.float32)
    e = reused("test-role", (3, 3), np.float32)
    assert not np.shares_memory(d, e)
    latest = id(e.base)  # the role's buffer now (an id: a reference would hold it)
    del d, e
    f = reused("test-role", (2, 2), np.float32)  # nothing holds the buffer: reused
    assert id(f.base) == latest


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.float32, np.bool_])
def test_scale_into_equals_copy_then_divide(dtype) -> None:
    """One pass (convert and divide) gives the bits of two (a float32 copy, divided)."""
    values = (np.random.default_rng(5).random((2, 3, 17, 9)) * 300).astype(dtype)
    x = torch.from_numpy(values)
    for mode in ("dtype", "none"):
        want = torch.empty(x.shape, dtype=torch.float32).copy_(x)
        if scale_of(values.dtype, mode) is not None:
            want.div_(scale_of(values.dtype, mode))
        got = torch.empty(x.shape, dtype=torch.float32)
        scale_into(got, x, scale_of(values.dtype, mode))
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("blend", [BlendMode.GAUSSIAN, BlendMode.COSINE, BlendMode.CONSTANT])
@pytest.mark.parametrize("flush", [False, True])
def test_ordered_merger_equals_zeroed_sums_bit_for_bit(blend, flush) -> None:
    """Writing where no earlier tile reached (no zeroing) sums the same floats in the
    same order as adding everything to zeros, -0.0 predictions and skipped tiles too."""
    lattice = Lattice((97, 61), (32, 32), (0, 0), (24, 24), flush=flush)
    rng = np.random.default_rng(6)
    for block in ((32, 32), (64, 32), (128, 128)):
        grid = BlockGrid(lattice, block)
        for index, (tiles, _, _) in grid.layout().items():
            write = grid.region(index)
            preds = {
                t: torch.from_numpy(rng.standard_normal((2, 32, 32)).astype(np.float32))
                for t in tiles
            }
            preds[tiles[0]][0, :4, :4] = -0.0
            skipped = {tiles[-1]} if len(tiles) > 2 else set()
            stream = ((t, preds[t]) for t in tiles if t not in skipped)
            merged = merge_tiles(
                write, lattice, blend, 2, tiles, stream, skipped=skipped, device=CPU
            )
            assert merged.ordered
            got = merged.result()
            want = _plain_sums(lattice, write, tiles, preds, blend, skipped)
            assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def _plain_sums(lattice, write, tiles, preds, blend, skipped):
    """The reference, without the merger: zeroed accumulators, every tile touching the
    block (from the lattice, not the block layout) weighted and added in order (a skipped
    tile adds its weight only), then divided. Its own copy of the weights: a merger that
    changed the shared ones in place would not change these."""
    from pipeline.engine.blend import tile_weights

    w = torch.from_numpy(tile_weights(blend, lattice.out_tile, lattice.overlap).copy())
    acc, wsum = torch.zeros((2, *write.shape)), torch.zeros(write.shape)
    assert lattice.tiles_touching(write) == list(tiles)
    for t in tiles:
        part = lattice.out_region(t).intersect(write)
        if part.empty:
            continue
        dst = part.relative_to(write).to_slices()
        src = part.relative_to(lattice.out_region(t)).to_slices()
        if t not in skipped:
            acc[(slice(None), *dst)].addcmul_(preds[t][(slice(None), *src)], w[src])
        wsum[dst].add_(w[src])
    return acc.div_(wsum)


def test_finish_in_bands_equals_whole_block_passes(monkeypatch) -> None:
    import pipeline.engine.device_section as engine
    from pipeline.core.devices import quantize, to_device, to_host

    rng = np.random.default_rng(7)
    acc = torch.from_numpy(rng.random((3, 67, 45), np.float32) * 3)
    wsum = torch.from_numpy(rng.random((67, 45), np.float32) + 0.5)
    mask = rng.random((67, 45)) > 0.3
    want = acc.clone().div_(wsum)
    want.mul_(to_device(mask, CPU))
    want = to_host(quantize(want, "uint8"))

    class Sums:  # what finish_block takes from a merger
        def __init__(self) -> None:
            self.acc, self.wsum = acc.clone(), wsum.clone()

        def check(self) -> None:
            pass

    monkeypatch.setattr(engine, "TensorMerger", Sums)
    monkeypatch.setattr(engine, "FINISH_BAND_BYTES", 4 * 3 * 100)  # many small bands
    got = finish_block(Sums(), "uint8", mask=mask)
    np.testing.assert_array_equal(got, want)
    bad = Sums()
    bad.acc[2, 60, 40] = float("nan")  # in a late band
    with pytest.raises(Exception, match="NaN or Inf"):
        finish_block(bad, "uint8")


@pytest.mark.parametrize(
    "shape,yx",
    [((3, 101, 77), [1, 2]), ((1, 5, 64, 33), [2, 3]), ((2, 1, 7), [1, 2]), ((1, 3001, 5), [1, 2])],
)
def test_banded_uint8_mean_equals_whole(shape, yx) -> None:
    data = np.random.default_rng(8).integers(0, 256, shape, dtype=np.uint8)
    np.testing.assert_array_equal(_mean_uint8_banded(data, yx), _mean_uint8(data, yx))


def test_block_chunks_all_zero_are_not_stored(tmp_path: Path) -> None:
    """A block's all-zero chunks stay unstored (and a stored one is removed), its other
    chunks are written without Zarr's per-value check."""
    from pipeline.engine.stages import _store
    from pipeline.io import sink

    sink.open_root(tmp_path / "out")
    writer = sink.create_image(tmp_path / "out", "img", (2, 64, 64), "cyx", (2, 16, 16), "uint8")
    level = writer.level_path(0)
    data = np.zeros((2, 32, 48), np.uint8)
    data[:, 20, 40] = 7  # one chunk of the six has a value
    zarr.open_array(level, mode="r+")[:, 16:32, 0:16] = 9  # stored before, zero now
    _store(level, Region((16, 0), (32, 48)), data)
    stored = zarr.open_array(level, mode="r")
    assert stored.nchunks_initialized == 1
    np.testing.assert_array_equal(stored[:, 16:48, 0:48], data)
