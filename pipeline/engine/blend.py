"""Blending modes and the weight window of one tile.

The per-block merger that uses them (accumulators the size of one block's write
region, on the model's device) is :class:`pipeline.engine.merge.TensorMerger`.
"""

from __future__ import annotations

import enum
from functools import lru_cache

import numpy as np


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
