"""Making images smaller: area resampling by a real factor, and whole-factor block reduction.

:class:`AreaAxis` is what the model reads at a requested µm per pixel (see
:mod:`pipeline.io.model_input`): exact, window-independent area weights.
:func:`reduce_blocks` makes the coarse views that tissue detection and mask reading work
on, chunk by chunk, never holding a full-resolution level.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import dask.array


@dataclass(frozen=True)
class AreaAxis:
    """Area (box) downsampling of one axis by a real factor.

    Output pixel ``i`` covers source ``[i * factor, (i + 1) * factor)`` clipped to the
    source; each source pixel is weighted by how much of it lies inside. The weights of
    an output pixel depend on ``i`` alone, so any window computes the same values.
    """

    n: int
    factor: float
    size: int

    @classmethod
    def between(cls, n: int, pixel: float, target: float) -> AreaAxis:
        factor = target / pixel
        return cls(n, factor, max(1, round(n / factor)))

    @property
    def taps(self) -> int:
        return math.ceil(self.factor) + 1

    def source_range(self, lo: int, hi: int) -> tuple[int, int]:
        """Source pixels that output ``[lo, hi)`` reads."""
        return math.floor(lo * self.factor), min(self.n, math.ceil(hi * self.factor))

    def weights(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """First source pixel and ``taps`` weights of each output pixel in ``[lo, hi)``."""
        i = np.arange(lo, hi, dtype=np.float64)
        start = i * self.factor
        end = np.minimum((i + 1) * self.factor, self.n)
        first = np.floor(start)
        j = first[:, None] + np.arange(self.taps)[None, :]
        overlap = np.clip(np.minimum(end[:, None], j + 1) - np.maximum(start[:, None], j), 0, None)
        return first.astype(np.int64), overlap / (end - start)[:, None]

    def apply(self, data: np.ndarray, axis: int, lo: int, hi: int, src_lo: int) -> np.ndarray:
        """Reduce ``data`` (source pixels from ``src_lo`` on ``axis``) to output ``[lo, hi)``."""
        first, w = self.weights(lo, hi)
        last = src_lo + data.shape[axis] - 1
        shape = [1] * data.ndim
        shape[axis] = hi - lo
        out = np.zeros(data.shape[:axis] + (hi - lo,) + data.shape[axis + 1 :], np.float64)
        for k in range(self.taps):  # a fixed order: the same sums whatever the window
            index = np.minimum(first + k, last) - src_lo
            out += np.take(data, index, axis=axis) * w[:, k].reshape(shape)
        return out


def reduce_blocks(array: dask.array.Array | np.ndarray, factor: int, how: Callable) -> np.ndarray:
    """``how`` (``np.mean``, ``np.any``) over ``factor``² blocks of a ``(C, y, x)`` array.

    Edges are padded by repeating the last row and column, which only the last cells
    see. A lazy array is read chunk by chunk in this process's threads: it never sits
    whole in memory at full resolution, and no cluster is needed.
    """
    import dask.array as da

    array = da.asarray(array)
    if factor > 1:
        pad = [(0, 0)] + [(0, -n % factor) for n in array.shape[1:]]
        if any(p for _, p in pad):
            array = da.pad(array, pad, mode="edge")
        if how is np.mean:
            array = array.astype(np.float32)
        array = da.coarsen(how, array, {1: factor, 2: factor})
    return np.asarray(array.compute(scheduler="threads"))
