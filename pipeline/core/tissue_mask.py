"""A coarse mask of where an image has tissue, and what blocks ask of it.

:class:`TissueMask` answers, conservatively, whether a region may hold tissue (so a
tile without any is not run) and which output pixels are tissue (glass is background).
Pure: numpy and :mod:`pipeline.core.geometry` only; :mod:`pipeline.engine.tissue` makes masks.

Geometry
--------
Regions are in run-grid pixels: the pyramid level the model runs on. Along an axis with
scale ``s``, mask cell ``i`` covers the run pixels ``[i*s, (i+1)*s)``; the last cells may
reach past the image edge. A mask of ``k`` dimensions applies to the last ``k`` axes of
a region (a 2D mask on a volume holds for every plane).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.core.geometry import Region

__all__ = ["TissueMask", "area_fraction"]


@dataclass(frozen=True, eq=False)
class TissueMask:
    """Where an image has tissue, on a coarse grid over the run grid.

    Attributes
    ----------
    mask
        Boolean cells; ``True`` is tissue.
    scale
        Run-grid pixels per mask cell along each mask axis, e.g. ``(16.0, 16.0)``.
    fraction
        Tissue fraction of the whole image (a crop keeps its image's fraction).
    method
        How the mask was made: ``"otsu-od"``, ``"fluorescence-threshold"``,
        ``"user-mask"``, or a detection method with ``":no-background"`` when a guard
        made it all tissue.
    offset
        Grid index of ``mask[0, ...]``: zeros for a whole mask, the crop's corner for
        one made by :meth:`crop`.
    """

    mask: np.ndarray
    scale: tuple[float, ...]
    fraction: float
    method: str
    offset: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        mask = np.asarray(self.mask, dtype=bool)
        scale = tuple(float(s) for s in self.scale)
        offset = tuple(int(o) for o in self.offset) or (0,) * mask.ndim
        if len(scale) != mask.ndim or len(offset) != mask.ndim:
            raise ValueError(
                f"scale {scale} and offset {offset} must have one value per "
                f"mask axis (mask shape {mask.shape})"
            )
        if not all(s > 0 and math.isfinite(s) for s in scale):
            raise ValueError(f"scale must be positive, got {scale}")
        object.__setattr__(self, "mask", mask)
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "offset", offset)
        object.__setattr__(self, "fraction", float(self.fraction))

    def crop(self, region: Region) -> TissueMask:
        """The cells :meth:`any_in` and :meth:`upsample` need for any part of ``region``.

        Small enough to travel with a block job; answers exactly as the whole mask does
        for every region inside ``region``.
        """
        lo, hi = self._cells(region)
        lo = [max(a - 1, o) for a, o in zip(lo, self.offset)]
        hi = [max(min(b + 1, o + n), a) for a, b, o, n in zip(lo, hi, self.offset, self.mask.shape)]
        local = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, self.offset))
        return TissueMask(
            self.mask[local].copy(), self.scale, self.fraction, self.method, tuple(lo)
        )

    def any_in(self, region: Region) -> bool:
        """Whether ``region`` (run grid; may reach past the image) may hold tissue.

        Conservative: the mask is grown by one cell, so rounding and the coarse grid
        never make a tile with tissue look empty.
        """
        if region.empty:
            return False
        lo, hi = self._cells(region)
        return bool(self._window([a - 1 for a in lo], [b + 1 for b in hi]).any())

    def upsample(self, region: Region) -> np.ndarray:
        """Tissue at run-grid resolution over ``region`` (nearest cell), ``region.shape``.

        Pixels outside the mask's grid are not tissue. For a region with more axes than
        the mask the result is broadcast (read-only) over the leading axes.
        """
        lead = self._lead(region)
        idx = [
            np.floor(np.arange(o, e) / s).astype(np.int64)
            for o, e, s in zip(region.offset[lead:], region.end[lead:], self.scale)
        ]
        if any(len(i) == 0 for i in idx):
            return np.zeros(region.shape, bool)
        lo = [int(i[0]) for i in idx]
        window = self._window(lo, [int(i[-1]) + 1 for i in idx])
        out = window[np.ix_(*(i - a for i, a in zip(idx, lo)))]
        return np.broadcast_to(out, region.shape) if lead else out

    def _lead(self, region: Region) -> int:
        lead = region.ndim - self.mask.ndim
        if lead < 0:
            raise ValueError(f"region {region} has fewer axes than the mask ({self.mask.ndim})")
        return lead

    def _cells(self, region: Region) -> tuple[list[int], list[int]]:
        """Grid cells ``[lo, hi)`` that the region's last axes touch."""
        lead = self._lead(region)
        lo = [math.floor(o / s) for o, s in zip(region.offset[lead:], self.scale)]
        hi = [max(math.ceil(e / s), a) for e, s, a in zip(region.end[lead:], self.scale, lo)]
        return lo, hi

    def _window(self, lo: Sequence[int], hi: Sequence[int]) -> np.ndarray:
        """Cells ``[lo, hi)`` of the grid; ``False`` where this mask has none."""
        out = np.zeros([max(0, b - a) for a, b in zip(lo, hi)], bool)
        src, dst = [], []
        for a, b, o, n in zip(lo, hi, self.offset, self.mask.shape):
            start, stop = max(a, o), min(b, o + n)
            if start >= stop:
                return out
            src.append(slice(start - o, stop - o))
            dst.append(slice(start - a, stop - a))
        out[tuple(dst)] = self.mask[tuple(src)]
        return out


def area_fraction(mask: np.ndarray, scale: Sequence[float], run_shape: Sequence[int]) -> float:
    """Fraction of the run grid the mask's tissue covers (cells past the edge count less)."""
    weights = []
    for n, s, size in zip(mask.shape, scale, run_shape):
        edges = np.minimum(np.arange(n + 1) * float(s), float(size))
        weights.append(np.diff(edges) / max(float(size), 1.0))
    covered = mask.astype(np.float64)
    for axis, w in enumerate(weights):
        shape = [1] * mask.ndim
        shape[axis] = len(w)
        covered = covered * w.reshape(shape)
    return float(min(1.0, covered.sum()))
