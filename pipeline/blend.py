"""Blending weights and the per-block merger.

A :class:`BlockMerger` holds accumulators the size of one block's write region (never
the image): every tile that touches the block adds ``weight * prediction`` where it
overlaps the block, and :meth:`BlockMerger.result` divides by the summed weight.
"""

from __future__ import annotations

import enum
from functools import lru_cache

import numpy as np

from pipeline.geometry import Region


class BlendMode(str, enum.Enum):
    GAUSSIAN = "gaussian"
    COSINE = "cosine"
    CONSTANT = "constant"
    CROP = "crop"


def _gaussian_1d(size: int) -> np.ndarray:
    sigma = size / 8.0
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    return np.exp(-0.5 * (x / sigma) ** 2)


def _cosine_1d(size: int, ramp: int) -> np.ndarray:
    w = np.ones(size, dtype=np.float64)
    ramp = min(ramp, size // 2)
    if ramp > 0:
        # raised cosine over the overlap, sampled at pixel centres so no weight is zero
        r = 0.5 - 0.5 * np.cos(np.pi * (np.arange(ramp) + 0.5) / ramp)
        w[:ramp] = r
        w[size - ramp :] = r[::-1]
    return w


@lru_cache(maxsize=16)
def tile_weights(
    mode: BlendMode, out_tile: tuple[int, ...], overlap: tuple[int, ...]
) -> np.ndarray:
    """Weight window over one output tile, float32, strictly positive.

    ``gaussian``: σ = tile/8 per axis (as nnU-Net), values below the smallest kept weight
    clamped so no pixel has zero weight; ``cosine``: flat centre with a raised-cosine ramp
    over the overlap; ``constant``/``crop``: ones.
    """
    mode = BlendMode(mode)
    w = np.ones((), dtype=np.float64)
    for size, ov in zip(out_tile, overlap):
        if mode is BlendMode.GAUSSIAN and size > 1:
            axis_w = _gaussian_1d(size)
        elif mode is BlendMode.COSINE:
            axis_w = _cosine_1d(size, ov)
        else:
            axis_w = np.ones(size)
        w = np.multiply.outer(w, axis_w)
    w = w / w.max()
    w = np.maximum(w, max(float(w[w > 0].min()), 1e-6))
    out = w.astype(np.float32)
    out.setflags(write=False)
    return out


class BlockMerger:
    """Weighted average of tile predictions over one block's write region."""

    def __init__(self, region: Region, classes: int, mode: BlendMode) -> None:
        self.region = region
        self.mode = BlendMode(mode)
        self.acc = np.zeros((classes, *region.shape), dtype=np.float32)
        self.wsum = None if self.mode is BlendMode.CROP else np.zeros(region.shape, np.float32)
        self._filled = 0

    def add(
        self,
        pred: np.ndarray,
        tile_out: Region,
        weights: np.ndarray | None,
        owned: Region | None = None,
    ) -> None:
        """Add one tile's prediction ``(K, *tile_out.shape)``.

        In crop mode ``owned`` is the part of the tile that alone provides the output.
        """
        target = (owned if self.mode is BlendMode.CROP else tile_out).intersect(self.region)
        if target.empty:
            return
        dst = (slice(None), *target.relative_to(self.region).to_slices())
        src_sl = target.relative_to(tile_out).to_slices()
        if self.mode is BlendMode.CROP:
            self.acc[dst] = pred[(slice(None), *src_sl)]
            self._filled += target.size
            return
        w = weights[src_sl]
        self.acc[dst] += pred[(slice(None), *src_sl)] * w
        self.wsum[dst[1:]] += w

    def skip(
        self, tile_out: Region, weights: np.ndarray | None, owned: Region | None = None
    ) -> None:
        """Count a tile that was not run (no tissue) as predicting zeros."""
        target = (owned if self.mode is BlendMode.CROP else tile_out).intersect(self.region)
        if target.empty:
            return
        if self.mode is BlendMode.CROP:
            self._filled += target.size
            return
        self.wsum[target.relative_to(self.region).to_slices()] += weights[
            target.relative_to(tile_out).to_slices()
        ]

    def result(self) -> np.ndarray:
        """Blended probabilities ``(K, *region.shape)`` float32."""
        if self.mode is BlendMode.CROP:
            if self._filled != self.region.size:
                raise RuntimeError(
                    f"crop blending covered {self._filled} of {self.region.size} pixels of {self.region}"
                )
            return self.acc
        if not np.all(self.wsum > 0):
            raise RuntimeError(f"tiles do not cover block {self.region}")
        self.acc /= self.wsum
        return self.acc
