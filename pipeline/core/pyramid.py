"""Pyramid levels of the output: their shapes, which of them blocks write from memory,
and the 2× downsampling itself, pixel for pixel as it has always been computed.

Level ``k`` is the mean over 2×2 (y, x) of level ``k - 1`` *as stored* (so uint8 levels
are computed from rounded uint8 pixels), in float32, rounded half to even for uint8, and
an odd last row or column is dropped (``trim_excess``). Every level is chunked like
level 0 (``min(chunk, shape)`` per axis).

A block writes level ``k`` from the pixels it holds when its region at that level is
made of whole chunks of level ``k`` (:func:`block_levels`): then every chunk of the
level has exactly one writer, as level 0 has, and level 0 is never read back. Levels
above that are small and built afterwards from the last block-written level, chunk by
chunk (:func:`pipeline.io.sink.write_pyramid`).

Float levels must match what ``dask.array.coarsen(np.mean, ...)`` gave chunk by chunk:
numpy sums the four values in an order that depends on the chunk's shape, so float
levels are computed with the same numpy call on the same chunks (:func:`downsample`).
uint8 levels are sums of four integers, exact in any order, and take a vectorised path.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.core.geometry import Region

__all__ = [
    "block_levels",
    "build_level",
    "downsample",
    "level_chunks",
    "level_region",
    "pyramid_shapes",
]


def pyramid_shapes(shape: Sequence[int], axes: str, min_size: int = 256) -> list[tuple[int, ...]]:
    """Shapes of level 0 and each 2× (y, x) downsampled level until y and x fit ``min_size``."""
    shapes = [tuple(int(s) for s in shape)]
    yx = [axes.index("y"), axes.index("x")]
    while max(shapes[-1][i] for i in yx) > min_size and min(shapes[-1][i] for i in yx) >= 2:
        shapes.append(tuple(s // 2 if i in yx else s for i, s in enumerate(shapes[-1])))
    return shapes


def level_chunks(chunks: Sequence[int], shape: Sequence[int]) -> tuple[int, ...]:
    """Chunks of a level: level 0's chunks, clipped to the level's shape."""
    return tuple(min(int(c), int(s)) for c, s in zip(chunks, shape))


def block_levels(
    shape: Sequence[int],
    axes: str,
    chunks: Sequence[int],
    block: Sequence[int],
    min_size: int = 256,
) -> int:
    """How many levels above 0 the blocks write from memory (0: none).

    ``shape``, ``chunks`` and ``block`` cover every axis of ``axes`` (``c`` included:
    one block holds every channel). Level ``k`` qualifies when, on ``y`` and ``x``,
    either one block spans the axis or ``block`` is a multiple of ``2**k`` times the
    level's chunk; and level ``k - 1``'s chunks are even or one chunk spans the axis
    (dask would otherwise move chunk boundaries before averaging, which the float path
    repeats chunk by chunk). Every level below ``k`` must qualify too.
    """
    shapes = pyramid_shapes(shape, axes, min_size)
    yx = [axes.index("y"), axes.index("x")]
    written = 0
    for k in range(1, len(shapes)):
        prev = level_chunks(chunks, shapes[k - 1])
        here = level_chunks(chunks, shapes[k])
        for a in yx:
            if prev[a] % 2 and prev[a] != shapes[k - 1][a]:
                return written  # odd chunks: dask moves chunk boundaries before averaging
            if block[a] >= shape[a]:
                continue  # one block along this axis holds the whole level
            if block[a] % 2**k or (block[a] >> k) % here[a]:
                return written
        written = k
    return written


def level_region(region: Region, axes: str, level: int) -> Region:
    """The part of level ``level`` computed from the level-0 ``region`` (spatial axes
    ``axes`` without ``c``): halved ``level`` times on y and x, odd excess dropped."""
    spatial = axes.replace("c", "")
    begin, end = list(region.offset), list(region.end)
    for a, name in enumerate(spatial):
        if name in "yx":
            begin[a] >>= level
            end[a] >>= level
    return Region.from_bounds(begin, end)


def downsample(data: np.ndarray, axes: str, chunks: Sequence[int]) -> np.ndarray:
    """One level up from ``data`` (a chunk-aligned piece of a level, every axis of
    ``axes``): the 2×2 (y, x) mean, ``data``'s dtype kept.

    ``chunks`` are that level's chunks (the piece starts on a chunk boundary); float
    data are averaged chunk by chunk with the numpy call ``dask.array.coarsen`` makes,
    so the result is bit-identical to it.
    """
    yx = [axes.index("y"), axes.index("x")]
    if data.dtype == np.uint8:
        return _mean_uint8_banded(data, yx)
    out_shape = tuple(n // 2 if a in yx else n for a, n in enumerate(data.shape))
    out = np.empty(out_shape, dtype=data.dtype)
    starts = [range(0, n, int(c)) for n, c in zip(data.shape, chunks)]
    for corner in itertools.product(*starts):
        piece = data[tuple(slice(o, o + int(c)) for o, c in zip(corner, chunks))]
        dst = tuple(
            slice(o // 2, (o + n) // 2) if a in yx else slice(o, o + n)
            for a, (o, n) in enumerate(zip(corner, piece.shape))
        )
        if all(d.stop > d.start for d in dst):
            out[dst] = _coarsen_mean(piece, yx).astype(data.dtype)
    return out


def build_level(src: Any, target: Any, axes: str, reduce: str = "mean") -> None:
    """Every chunk of ``target`` (a level) from the part of ``src`` (the level before it)
    under it, one chunk at a time, so each chunk has exactly one writer; any array-likes
    with ``shape``, ``chunks`` and slicing (Zarr arrays).

    ``mean``: 2×2 in y and x averaged as :func:`downsample` (whole chunks of ``src``; an
    odd row or column at the end left out). ``nearest``: every second pixel in y and x
    (labels, which are never averaged), so level ``k`` holds level 0's pixels
    ``j * 2**k``.
    """
    if reduce not in ("mean", "nearest"):
        raise ValueError(f"reduce must be 'mean' or 'nearest', got {reduce!r}")
    yx = {axes.index("y"), axes.index("x")}
    corners = itertools.product(*(range(0, n, c) for n, c in zip(target.shape, target.chunks)))
    for corner in corners:
        dst = tuple(slice(o, min(o + c, n)) for o, c, n in zip(corner, target.chunks, target.shape))
        if reduce == "nearest":
            pick = tuple(
                slice(2 * d.start, 2 * d.stop, 2) if a in yx else d for a, d in enumerate(dst)
            )
            target[dst] = src[pick]
        else:
            under = tuple(
                slice(2 * d.start, 2 * d.stop) if a in yx else d for a, d in enumerate(dst)
            )
            target[dst] = downsample(src[under], axes, src.chunks)


def _coarsen_mean(piece: np.ndarray, yx: list[int]) -> np.ndarray:
    """``dask.array.chunk.coarsen(np.mean, piece.astype(float32), {y: 2, x: 2}, True)``."""
    trim = tuple(slice(0, n - n % 2) if a in yx else slice(None) for a, n in enumerate(piece.shape))
    x = piece[trim].astype(np.float32)
    factors = [2 if a in yx else 1 for a in range(x.ndim)]
    shape = tuple(v for n, f in zip(x.shape, factors) for v in (n // f, f))
    return np.mean(x.reshape(shape), axis=tuple(range(1, 2 * x.ndim, 2)))


#: Input bytes per band of the uint8 2x2 mean: its temporaries stay in cache.
BAND_BYTES = 2**18


def _mean_uint8_banded(data: np.ndarray, yx: list[int]) -> np.ndarray:
    """:func:`_mean_uint8` over bands of an even number of rows (the same integers: each
    output row comes from its own two input rows), so that the 16-bit sums of a band
    stay in cache instead of making several passes over a block's worth of memory."""
    y = yx[0]
    rows = data.shape[y] - data.shape[y] % 2
    out_shape = tuple(n // 2 if a in yx else n for a, n in enumerate(data.shape))
    out = np.empty(out_shape, dtype=np.uint8)
    row_bytes = max(1, data.size // max(1, data.shape[y]))
    band = max(2, (BAND_BYTES // row_bytes) & ~1)
    for start in range(0, rows, band):
        src = [slice(None)] * data.ndim
        dst = [slice(None)] * data.ndim
        src[y] = slice(start, min(rows, start + band))
        dst[y] = slice(start // 2, min(rows, start + band) // 2)
        out[tuple(dst)] = _mean_uint8(data[tuple(src)], yx)
    return out


def _mean_uint8(data: np.ndarray, yx: list[int]) -> np.ndarray:
    """rint(mean of 2×2) of uint8, in integers: ``(s + 1 + ((s >> 2) & 1)) >> 2`` of the
    sum ``s`` rounds ``s / 4`` half to even, as ``np.rint`` of the float32 mean does.

    Row pairs are added first (whole rows: contiguous, vectorised), then column pairs of
    the half-height sum: about half the time of four strided quarter-reads."""
    y, x = yx
    ny, nx = data.shape[y] - data.shape[y] % 2, data.shape[x] - data.shape[x] % 2

    def pick(array: np.ndarray, axis: int, start: int, stop: int, step: int) -> np.ndarray:
        index = [slice(None)] * array.ndim
        index[axis] = slice(start, stop, step)
        return array[tuple(index)]

    even = pick(pick(data, y, 0, ny, 2), x, 0, nx, 1)
    odd = pick(pick(data, y, 1, ny, 2), x, 0, nx, 1)
    s = even.astype(np.uint16)
    s += odd
    s = pick(s, x, 0, nx, 2) + pick(s, x, 1, nx, 2)
    q = s >> 2
    q &= 1
    s += q
    s += 1
    s >>= 2
    return s.astype(np.uint8)
