"""Pure N-D geometry: boxes in pixel coordinates.

Imports nothing but the standard library and numpy; coordinates are integers in the
image's own pixel grid (level 0 of what the model runs on).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


def _tuple(values: Iterable[int]) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def _per_axis(value: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    if isinstance(value, (int, np.integer)):
        return (int(value),) * ndim
    out = _tuple(value)
    if len(out) != ndim:
        raise ValueError(f"expected {ndim} values, got {len(out)}: {out}")
    return out


@dataclass(frozen=True)
class Region:
    """An axis-aligned box: ``offset`` (inclusive start) and ``shape`` per axis."""

    offset: tuple[int, ...]
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "offset", _tuple(self.offset))
        object.__setattr__(self, "shape", _tuple(self.shape))
        if len(self.offset) != len(self.shape):
            raise ValueError(f"offset {self.offset} and shape {self.shape} differ in rank")
        if any(s < 0 for s in self.shape):
            raise ValueError(f"negative shape {self.shape}")

    @classmethod
    def from_bounds(cls, begin: Sequence[int], end: Sequence[int]) -> Region:
        return cls(begin, [max(0, e - b) for b, e in zip(begin, end)])

    @classmethod
    def of_shape(cls, shape: Sequence[int]) -> Region:
        return cls((0,) * len(shape), shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def end(self) -> tuple[int, ...]:
        return tuple(o + s for o, s in zip(self.offset, self.shape))

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def empty(self) -> bool:
        return any(s == 0 for s in self.shape)

    def grow(self, before: int | Sequence[int], after: int | Sequence[int] | None = None) -> Region:
        """Grow by ``before`` at the start and ``after`` (default: ``before``) at the end."""
        lo = _per_axis(before, self.ndim)
        hi = lo if after is None else _per_axis(after, self.ndim)
        return Region.from_bounds(
            [o - a for o, a in zip(self.offset, lo)], [e + b for e, b in zip(self.end, hi)]
        )

    def shift(self, by: Sequence[int]) -> Region:
        return Region([o + b for o, b in zip(self.offset, _per_axis(by, self.ndim))], self.shape)

    def intersect(self, other: Region) -> Region:
        begin = [max(a, b) for a, b in zip(self.offset, other.offset)]
        end = [min(a, b) for a, b in zip(self.end, other.end)]
        return Region.from_bounds(begin, [max(b, e) for b, e in zip(begin, end)])

    def intersects(self, other: Region) -> bool:
        return all(
            a < d and c < b for a, b, c, d in zip(self.offset, self.end, other.offset, other.end)
        )

    def contains(self, other: Region) -> bool:
        return all(
            a <= c and d <= b for a, b, c, d in zip(self.offset, self.end, other.offset, other.end)
        )

    def snap_to_grid(self, grid: int | Sequence[int]) -> Region:
        """Smallest region on multiples of ``grid`` that contains this one."""
        g = _per_axis(grid, self.ndim)
        begin = [(o // s) * s for o, s in zip(self.offset, g)]
        end = [-((-e) // s) * s for e, s in zip(self.end, g)]
        return Region.from_bounds(begin, end)

    def relative_to(self, origin: Region | Sequence[int]) -> Region:
        """This region in the coordinates of ``origin`` (its offset becomes zero)."""
        base = origin.offset if isinstance(origin, Region) else _tuple(origin)
        return Region([o - b for o, b in zip(self.offset, base)], self.shape)

    def to_slices(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + s) for o, s in zip(self.offset, self.shape))


def reflect_index(index: np.ndarray, size: int) -> np.ndarray:
    """Map integer coordinates into ``[0, size)`` by mirroring without repeating the edge.

    Matches ``numpy.pad(mode="reflect")`` for any pad width (repeated reflection); a
    size-1 axis maps everything to 0.
    """
    index = np.asarray(index, dtype=np.int64)
    if size <= 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    folded = np.mod(index, period)
    return np.where(folded < size, folded, period - folded)
