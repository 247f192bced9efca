"""Reading a window of a one-page TIFF level straight from the file: each stored tile
(or strip) it touches is read with ``os.pread`` and decoded on a shared thread pool
straight into the window's array.

This is what tifffile's Zarr store does per chunk (the same bytes, the same decode
call with the same arguments, so the same pixels), without a Zarr array, its event loop
and its chunk buffers in between: reading a block of a JPEG slide costs about the
decode itself. The decoders release the GIL, so the pool's threads decode in parallel.

Only levels stored in one page (a slide's pyramid levels, a plain 2D image, RGB
interleaved or planar) take this path (:func:`supports`); stacks of pages keep using
tifffile's Zarr store. The page's decode function is whatever tifffile caches on the
keyframe, so the decompression-bomb guard (:mod:`pipeline.io.tiff_guard`, applied to
the opened file before this reader is made) checks every tile read here too.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from pipeline.core.buffers import reused
from pipeline.core.devices import usable_cores

__all__ = ["TiffTiles", "decode_pool", "supports"]

_POOL: ThreadPoolExecutor | None = None
_POOL_GUARD = threading.Lock()


def decode_pool() -> ThreadPoolExecutor:
    """The process's tile decode threads (one per core the process may use, at least 2)."""
    global _POOL
    with _POOL_GUARD:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max(2, usable_cores()), thread_name_prefix="tiff-decode")
        return _POOL


def supports(level: Any) -> bool:
    """Whether ``level`` (a tifffile series level) is one page whose tiles or strips
    make up the level's array as they are (no stacking of pages, no reshaping)."""
    if len(level) != 1:
        return False
    page = level.keyframe
    chunks = tuple(int(c) for c in page.chunks)
    return (
        page.compression != 1  # uncompressed: the memory map reads rows more cheaply
        and tuple(level.shape) == tuple(page.shape)
        and len(chunks) == len(page.shape)
        and len(page.dataoffsets) == math.prod(page.chunked)
        and tuple(page.chunked) == tuple(-(-n // c) for n, c in zip(page.shape, chunks))
    )


class TiffTiles:
    """Array-like of one single-page level (see :func:`supports`): ``shape``, ``dtype``,
    ``chunks`` (the stored tile or strip) and ``__getitem__`` with integers and
    slices, which decodes only the stored tiles the selection touches.

    ``tif`` must stay open while the reader is used to open it; the reader keeps its
    own file descriptor for the pixel data.
    """

    def __init__(self, tif: Any, path: str, series: int, level: int) -> None:
        lv = tif.series[series].levels[level]
        page = lv.keyframe
        self.path = path
        self.shape = tuple(int(n) for n in lv.shape)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(page.dtype)
        self.chunks = tuple(int(c) for c in page.chunks)
        self._grid = tuple(int(c) for c in page.chunked)
        self._offsets = tuple(int(o) for o in page.dataoffsets)
        self._counts = tuple(int(c) for c in page.databytecounts)
        args: dict[str, Any] = {"_fullsize": True}
        if page.jpegtables is not None:
            args["jpegtables"] = page.jpegtables
        if page.jpegheader is not None:  # NDPI: the JPEG header all tiles share
            args["jpegheader"] = page.jpegheader
        self._decode = page.decode  # tifffile's cached decode (guarded by tiff_guard)
        self._interleaved = page.axes.endswith("S") and self.ndim > 1
        self._args = args
        self._tif = tif  # keeps the keyframe's file open as long as the reader lives
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))

    def __del__(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)

    def __getstate__(self) -> None:
        raise TypeError("TiffTiles holds an open file: pickle the LazyLevel instead")

    def read_segment(self, index: int) -> np.ndarray:
        """Stored tile or strip ``index`` (raster order), decoded, shaped as ``chunks``
        (zeros where the file stores no data for it, as tifffile reads it)."""
        offset, count = self._offsets[index], self._counts[index]
        if not (offset and count):
            return np.zeros(self.chunks, self.dtype)
        data = os.pread(self._fd, count, offset)
        decoded = self._decode(data, index, **self._args)[0]
        if decoded.size != math.prod(self.chunks):
            raise RuntimeError(
                f"tile {index} decodes to {decoded.size} values, not {math.prod(self.chunks)}"
            )
        return decoded.reshape(self.chunks)

    def __getitem__(self, selection: Any) -> np.ndarray:
        sel = selection if isinstance(selection, tuple) else (selection,)
        sel += (slice(None),) * (self.ndim - len(sel))
        if len(sel) != self.ndim or not all(isinstance(s, (slice, int, np.integer)) for s in sel):
            raise IndexError(f"{self!r} takes one integer or slice per axis, got {selection!r}")
        ranges, drop = [], []
        for s, n in zip(sel, self.shape):
            if isinstance(s, slice):
                r = range(*s.indices(n))
                if r.step < 0:
                    raise IndexError(f"negative steps are not supported: {selection!r}")
                ranges.append(r)
                drop.append(False)
            else:
                i = int(s) + (n if s < 0 else 0)
                if not 0 <= i < n:
                    raise IndexError(f"index {s} out of range for size {n}")
                ranges.append(range(i, i + 1))
                drop.append(True)
        out = self._read(ranges)
        return out.reshape([n for n, d in zip(out.shape, drop) if not d])

    def _read(self, ranges: list[range]) -> np.ndarray:
        """The elements ``ranges`` select (one range per axis); every stored tile holding
        at least one of them is decoded once.

        Interleaved samples (RGB) come back as a view of planar memory: the model reads
        channels first, and copying each decoded tile into its planes here, on the
        decode threads, costs less than transposing the whole window afterwards.
        """
        shape = [len(r) for r in ranges]
        # this thread's previous window's memory, when nobody holds it any more
        if self._interleaved and shape[-1] > 1:
            planar = reused("tiff-window", (shape[-1], *shape[:-1]), self.dtype)
            out = np.moveaxis(planar, 0, -1)
        else:
            out = reused("tiff-window", tuple(shape), self.dtype)
        if out.size == 0:
            return out
        # per axis: (tile index, slice in the tile, slice in out) of each tile it touches
        parts = [_axis_parts(r, c) for r, c in zip(ranges, self.chunks)]
        rows = [list(itertools.product([p], *parts[1:])) for p in parts[0]]
        if sum(map(len, rows)) == 1:
            self._copy_row(out, rows[0])
            return out
        # whole rows of tiles per task: the pool's overhead stays per row, not per tile
        tasks = [decode_pool().submit(self._copy_row, out, row) for row in rows]
        for task in tasks:
            task.result()
        return out

    def _copy_row(self, out: np.ndarray, row: list) -> None:
        for pieces in row:
            index = int(np.ravel_multi_index([k for k, _, _ in pieces], self._grid))
            tile = self.read_segment(index)
            out[tuple(d for _, _, d in pieces)] = tile[tuple(s for _, s, _ in pieces)]

    def __repr__(self) -> str:
        return f"TiffTiles({self.path!r}, shape={self.shape}, chunks={self.chunks})"


def _axis_parts(r: range, chunk: int) -> list[tuple[int, slice, slice]]:
    """For the tiles of size ``chunk`` that hold elements of ``r`` (step >= 1): the tile
    index, the slice of the tile and the slice of the output they fill."""
    parts = []
    for k in range(r.start // chunk, (r[-1] // chunk) + 1):
        lo, hi = max(r.start, k * chunk), min(r.stop, (k + 1) * chunk)
        first = r.start + -(-(lo - r.start) // r.step) * r.step  # first element >= lo
        if first >= hi:
            continue  # a step longer than the tile skips it
        count = len(range(first, hi, r.step))
        at = (first - r.start) // r.step
        begin = first - k * chunk
        parts.append(
            (k, slice(begin, begin + (count - 1) * r.step + 1, r.step), slice(at, at + count))
        )
    return parts
