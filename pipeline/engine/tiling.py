"""The global tile lattice of an image, and the blocks over it.

Pure geometry: no dask, zarr or torch. Coordinates are pixels of the image the model
runs on (the chosen pyramid level).

Per spatial axis a lattice has an input tile ``T``, a valid margin ``m`` and an output
tile ``O = T - 2m``; tile ``k`` writes ``[k*S, k*S + O)`` and reads ``[k*S - m, k*S - m + T)``.
The stride ``S`` is a multiple of the network's size step, so every tile sits at the same
phase of the network's pooling grid as a single whole-image pass would: that is what makes
tiled ``valid`` inference exact. The lattice starts at 0 and depends only on the image
shape and the model geometry, never on blocks or workers.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.core.geometry import Region


@dataclass(frozen=True)
class Lattice:
    """Tile positions for one image.

    Attributes
    ----------
    shape
        Spatial shape of the image.
    tile
        Input tile size per axis (``T``).
    margin
        Valid margin per axis (``m``); the output tile is ``T - 2m``.
    stride
        Distance between tile origins per axis (``S``), ``1 <= S <= O``.
    """

    shape: tuple[int, ...]
    tile: tuple[int, ...]
    margin: tuple[int, ...]
    stride: tuple[int, ...]
    flush: bool = False

    def __post_init__(self) -> None:
        for name in ("shape", "tile", "margin", "stride"):
            value = tuple(int(v) for v in getattr(self, name))
            if len(value) != len(self.shape):
                raise ValueError(f"{name} {value} does not match rank {len(self.shape)}")
            object.__setattr__(self, name, value)
        for o, s in zip(self.out_tile, self.stride):
            if not 1 <= s <= o:
                raise ValueError(f"stride {self.stride} must be within 1..{self.out_tile}")

    @property
    def ndim(self) -> int:
        return len(self.shape)

    # cached: a block's merge asks for these once per tile (thousands of times)
    @functools.cached_property
    def out_tile(self) -> tuple[int, ...]:
        return tuple(t - 2 * m for t, m in zip(self.tile, self.margin))

    @functools.cached_property
    def overlap(self) -> tuple[int, ...]:
        return tuple(o - s for o, s in zip(self.out_tile, self.stride))

    @functools.cached_property
    def counts(self) -> tuple[int, ...]:
        """Number of tiles per axis: enough to cover the image, at least one."""
        return tuple(
            1 + max(0, math.ceil((n - o) / s))
            for n, o, s in zip(self.shape, self.out_tile, self.stride)
        )

    @property
    def n_tiles(self) -> int:
        return math.prod(self.counts)

    def origin(self, axis: int, k: int) -> int:
        """Start of tile ``k``'s output on ``axis``: ``k * stride``; with ``flush`` the last
        tile ends at the image border instead of overhanging it (when the image is larger
        than a tile)."""
        start = k * self.stride[axis]
        if self.flush and k == self.counts[axis] - 1:
            return min(start, max(0, self.shape[axis] - self.out_tile[axis]))
        return start

    def out_region(self, index: Sequence[int]) -> Region:
        """Output pixels tile ``index`` predicts (may extend past the image)."""
        return Region([self.origin(a, k) for a, k in enumerate(index)], self.out_tile)

    def in_region(self, index: Sequence[int]) -> Region:
        """Input pixels tile ``index`` reads (may extend past the image: mirrored)."""
        return self.out_region(index).grow(self.margin)

    def owned_region(self, index: Sequence[int]) -> Region:
        """Pixels this tile alone provides in ``crop`` blending.

        Cuts sit in the middle of each overlap; the first and last tiles own up to the
        image border. The owned regions of all tiles partition the image.
        """
        begin, end = [], []
        for axis, (k, o, n, c) in enumerate(zip(index, self.out_tile, self.shape, self.counts)):
            begin.append(
                0 if k == 0 else (self.origin(axis, k - 1) + o + self.origin(axis, k)) // 2
            )
            end.append(
                n if k == c - 1 else (self.origin(axis, k) + o + self.origin(axis, k + 1)) // 2
            )
        return Region.from_bounds(begin, end)

    def tiles_touching(self, region: Region, *, owned: bool = False) -> list[tuple[int, ...]]:
        """Indices of every tile that contributes to ``region``.

        With ``owned`` (crop blending) a tile contributes only where it owns pixels,
        otherwise wherever its output tile reaches.
        """
        ranges = []
        for axis in range(self.ndim):
            lo, hi = region.offset[axis], region.end[axis]
            s, o, c = self.stride[axis], self.out_tile[axis], self.counts[axis]
            ks = [
                k
                for k in range(max(0, (lo - o) // s), min(c, hi // s + 2))
                if _touches(self, axis, k, lo, hi, owned)
            ]
            ranges.append(ks)
        return list(itertools.product(*ranges))


def _touches(lat: Lattice, axis: int, k: int, lo: int, hi: int, owned: bool) -> bool:
    index = [0] * lat.ndim
    index[axis] = k
    r = lat.owned_region(index) if owned else lat.out_region(index)
    return r.offset[axis] < hi and lo < r.end[axis]


def choose_stride(out_tile: int, overlap: int, step: int) -> int:
    """Largest multiple of ``step`` that leaves at least ``overlap`` pixels of overlap.

    Raises
    ------
    ValueError
        When no positive stride exists (overlap too large for the tile).
    """
    stride = ((out_tile - overlap) // step) * step
    if stride < 1:
        raise ValueError(
            f"overlap {overlap} leaves no room in an output tile of {out_tile} "
            f"(tile positions must be multiples of {step})"
        )
    return stride


@dataclass(frozen=True)
class BlockGrid:
    """Blocks of ``block`` pixels over ``lattice.shape``, and which tiles they share.

    A tile that contributes to more than one block is *shared*: it is computed once, by
    the task of its *owner* block (the first block it touches on every axis), and its
    prediction travels to the other blocks. Every other tile is computed by the one
    block it touches. So every lattice tile runs through the network exactly once,
    whatever the block size.
    """

    lattice: Lattice
    block: tuple[int, ...]
    owned: bool = False  # crop blending: a tile contributes only where it owns pixels

    @property
    def counts(self) -> tuple[int, ...]:
        return tuple(math.ceil(n / b) for n, b in zip(self.lattice.shape, self.block))

    def indices(self) -> list[tuple[int, ...]]:
        return list(itertools.product(*(range(c) for c in self.counts)))

    def region(self, index: Sequence[int]) -> Region:
        return Region([i * b for i, b in zip(index, self.block)], self.block).intersect(
            Region.of_shape(self.lattice.shape)
        )

    def _spans(self, axis: int) -> list[tuple[int, int]]:
        """Per tile along ``axis``: first and last block index it contributes to."""
        lat, b = self.lattice, self.block[axis]
        n = lat.shape[axis]
        spans = []
        for k in range(lat.counts[axis]):
            index = [0] * lat.ndim
            index[axis] = k
            r = lat.owned_region(index) if self.owned else lat.out_region(index)
            lo, hi = max(r.offset[axis], 0), min(r.end[axis], n) - 1
            spans.append((lo // b, hi // b) if hi >= lo else (-1, -2))
        return spans

    def layout(self) -> dict[tuple[int, ...], tuple[list, list, set]]:
        """For every block: (tiles touching it, shared tiles it owns, owners it needs)."""
        spans = [self._spans(a) for a in range(self.lattice.ndim)]
        out = {}
        for index in self.indices():
            per_axis = [
                [k for k, (lo, hi) in enumerate(sp) if lo <= i <= hi] for sp, i in zip(spans, index)
            ]
            touching, own, owners = [], [], set()
            for tile in itertools.product(*per_axis):
                span = [spans[a][k] for a, k in enumerate(tile)]
                if all(lo == hi for lo, hi in span):
                    touching.append(tile)
                    continue
                owner = tuple(lo for lo, _ in span)
                touching.append(tile)
                owners.add(owner)
                if owner == index:
                    own.append(tile)
            out[index] = (touching, own, owners)
        return out
