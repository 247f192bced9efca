"""The per-block merger on the compute device: weighted tile predictions summed into
accumulators the size of one block's write region (never the image).

Tiles are added one by one in lattice order whatever the block layout, so a pixel's
value depends only on the lattice (output independent of block size and worker count).
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

from pipeline.core.devices import empty
from pipeline.core.geometry import Region
from pipeline.engine.blend import BlendMode, tile_weights

if TYPE_CHECKING:
    import torch

__all__ = ["TensorMerger", "scratch", "weights_on", "zeros_scratch"]

#: Per (device, role): one flat float32 buffer, grown to the largest block seen.
_SCRATCH: dict[tuple[str, str], torch.Tensor] = {}


def scratch(role: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """An uninitialised float32 tensor of ``shape`` on ``device``, in memory reused from
    block to block (a block's accumulators are hundreds of MB: faulting in fresh pages
    for every block costs more than using them). Valid until the next call with the
    same ``role`` and device, so only the holder of the device's lock may use it.
    """
    import math

    import torch

    key = (str(device), role)
    size = math.prod(shape)
    flat = _SCRATCH.get(key)
    if flat is None or flat.numel() < size:
        flat = _SCRATCH[key] = empty((size,), torch.float32, device)
    return flat[:size].view(shape)


def zeros_scratch(role: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """:func:`scratch`, zeroed."""
    return scratch(role, shape, device).zero_()


@lru_cache(maxsize=16)
def weights_on(
    mode: BlendMode, out_tile: tuple[int, ...], overlap: tuple[int, ...], device: torch.device
) -> torch.Tensor | None:
    """:func:`~pipeline.engine.blend.tile_weights` as a tensor on ``device`` (None for crop)."""
    import torch

    if BlendMode(mode) is BlendMode.CROP:
        return None
    return torch.from_numpy(tile_weights(BlendMode(mode), out_tile, overlap).copy()).to(device)


class TensorMerger:
    """Weighted average of tile predictions over one block's write region, on ``device``.

    Parameters
    ----------
    region
        The block's write region.
    classes
        Output channels.
    mode
        How tiles are blended: weighted modes take tiles through :meth:`add_at` and
        :meth:`skip_at`; ``crop`` through :meth:`add` and :meth:`skip`, and copies the
        part each tile owns.
    weights
        The tile weight window on ``device`` (:func:`weights_on`); None for ``crop``.
    ordered
        The tiles come in lattice order, every tile of a box of the lattice, through
        :meth:`add_at` / :meth:`skip_at` with the start of the part that no earlier tile
        reached (``fresh``). That part is written, not added to: ``0 + w p`` is
        computed there (so even a ``-0.0`` prediction sums as before), and the
        accumulators need no zeroing beforehand: a block's worth of memory traffic less.

    The accumulators are scratch memory (:func:`scratch`): the result is valid until
    the next block on the device starts.
    """

    def __init__(
        self,
        region: Region,
        classes: int,
        mode: BlendMode,
        device: torch.device,
        weights: torch.Tensor | None,
        *,
        ordered: bool = False,
    ) -> None:
        import torch

        self.region = region
        self.mode = BlendMode(mode)
        self.crop = self.mode is BlendMode.CROP
        self.weights = weights
        self.ordered = ordered
        self._tile = None if weights is None else tuple(weights.shape)
        # crop copies what each tile owns and zeroes what skipped tiles own: no zeroing
        fresh = ordered or self.crop
        make = scratch if fresh else zeros_scratch
        self.acc = make("acc", (classes, *region.shape), device)
        self.wsum = None if self.crop else make("wsum", region.shape, device)
        self._zero = torch.zeros((), dtype=torch.float32, device=device)
        self._filled = 0  # pixels written for the first time (crop: owned pixels)

    def _owned(self, owned: Region, call: str) -> Region:
        """The part of this merger's region a tile owns (crop); ``call``: the method a
        weighted merger takes tiles through instead."""
        if not self.crop:
            raise RuntimeError(f"a weighted merger takes tiles through {call}")
        return owned.intersect(self.region)

    def add(self, pred: torch.Tensor, tile_out: Region, owned: Region) -> None:
        """Crop: copy the part ``owned`` of one tile's prediction ``(K, *tile_out.shape)``
        (the part of the tile that alone provides the output)."""
        target = self._owned(owned, "add_at")
        if target.empty:
            return
        dst = target.relative_to(self.region).to_slices()
        src = target.relative_to(tile_out).to_slices()
        self.acc[(slice(None), *dst)] = pred[(slice(None), *src)]
        self._filled += target.size

    def _pieces(self, origin: tuple[int, ...], fresh: tuple[int, ...] | None):
        """(destination, source, first) slices of the tile whose output starts at
        ``origin``, clipped to the region: its fresh box (``first``: no earlier tile
        reached it; everything when ``fresh`` is None) and the boxes earlier tiles
        reached (disjoint; plain integers)."""
        lo, hi = [], []
        for o, t, r, n in zip(origin, self._tile, self.region.offset, self.region.shape):
            a, b = max(o, r), min(o + t, r + n)
            if b <= a:
                return []
            lo.append(a)
            hi.append(b)
        if fresh is None:
            pieces = [(lo, hi, False)]
        else:
            cut = [min(max(f, a), b) for f, a, b in zip(fresh, lo, hi)]
            pieces = [(cut, hi, True)]
            for axis in range(len(lo)):  # axes before `axis` fresh, `axis` reached, rest whole
                if cut[axis] > lo[axis]:
                    pieces.append(
                        (
                            cut[:axis] + [lo[axis]] + lo[axis + 1 :],
                            hi[:axis] + [cut[axis]] + hi[axis + 1 :],
                            False,
                        )
                    )
        out = []
        for a, b, first in pieces:
            if all(y > x for x, y in zip(a, b)):
                dst = tuple(slice(x - r, y - r) for x, y, r in zip(a, b, self.region.offset))
                src = tuple(slice(x - o, y - o) for x, y, o in zip(a, b, origin))
                out.append((dst, src, first))
        return out

    def add_at(
        self, pred: torch.Tensor, origin: tuple[int, ...], fresh: tuple[int, ...] | None = None
    ) -> None:
        """Weighted modes: add one tile's prediction ``(K, *out_tile)`` float32, times the
        weight window, the tile given by its output origin (and, in an ordered merger,
        the start of its fresh part)."""
        import torch

        for dst, src, first in self._pieces(origin, fresh if self.ordered else None):
            w = self.weights[src]
            into = self.acc[(slice(None), *dst)]
            if first:
                torch.addcmul(self._zero, pred[(slice(None), *src)], w, out=into)
                self.wsum[dst].copy_(w)
                self._filled += w.numel()
            else:
                into.addcmul_(pred[(slice(None), *src)], w)
                self.wsum[dst].add_(w)

    def skip_at(self, origin: tuple[int, ...], fresh: tuple[int, ...] | None = None) -> None:
        """Weighted modes: a tile that was not run (no tissue) predicts zeros; its weight
        still counts. The tile is given as for :meth:`add_at`."""
        for dst, src, first in self._pieces(origin, fresh if self.ordered else None):
            if first:
                self.acc[(slice(None), *dst)].zero_()
                self.wsum[dst].copy_(self.weights[src])
                self._filled += self.wsum[dst].numel()
            else:
                self.wsum[dst].add_(self.weights[src])

    def skip(self, owned: Region) -> None:
        """Crop: a tile that was not run (no tissue) predicts zeros over the part it owns."""
        target = self._owned(owned, "skip_at")
        if target.empty:
            return
        self.acc[(slice(None), *target.relative_to(self.region).to_slices())].zero_()
        self._filled += target.size

    def check(self) -> None:
        """Raise (a bug, never the user's) unless every pixel of the region got a tile."""
        if self.crop or self.ordered:
            if self._filled != self.region.size:
                raise RuntimeError(
                    f"tiles covered {self._filled} of {self.region.size} pixels of {self.region}"
                )
        elif not bool(self.wsum.min() > 0):
            raise RuntimeError(f"tiles do not cover block {self.region}")

    def result(self) -> torch.Tensor:
        """Blended probabilities ``(K, *region.shape)`` float32 (the accumulator, divided
        in place)."""
        self.check()
        return self.acc if self.crop else self.acc.div_(self.wsum)
