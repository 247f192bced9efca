"""The per-block merger on the compute device: weighted tile predictions summed into
accumulators the size of one block's write region (never the image).

Tiles are added one by one in lattice order whatever the block layout, so a pixel's
value depends only on the lattice (output independent of block size and worker count).
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

from pipeline.blend import BlendMode, tile_weights
from pipeline.geometry import Region

if TYPE_CHECKING:
    import torch

__all__ = ["TensorMerger", "weights_on", "zeros_scratch"]

#: Per (device, role): one flat float32 buffer, grown to the largest block seen.
_SCRATCH: dict[tuple[str, str], torch.Tensor] = {}


def zeros_scratch(role: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A zeroed float32 tensor of ``shape`` on ``device``, in memory reused from block to
    block: zeroing reused pages costs a fraction of faulting in fresh ones (a block's
    accumulators are hundreds of MB). Valid until the next call with the same ``role``
    and device, so only the holder of the device's lock may use it.
    """
    import math

    import torch

    key = (str(device), role)
    size = math.prod(shape)
    flat = _SCRATCH.get(key)
    if flat is None or flat.numel() < size:
        flat = _SCRATCH[key] = torch.empty(size, dtype=torch.float32, device=device)
    return flat[:size].view(shape).zero_()


@lru_cache(maxsize=16)
def weights_on(
    mode: BlendMode, out_tile: tuple[int, ...], overlap: tuple[int, ...], device: torch.device
) -> torch.Tensor | None:
    """:func:`~pipeline.blend.tile_weights` as a tensor on ``device`` (None for crop)."""
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
        How tiles are blended; ``crop`` copies the part each tile owns.
    weights
        The tile weight window on ``device`` (:func:`weights_on`); None for ``crop``.

    The accumulators are scratch memory (:func:`zeros_scratch`): the result is valid
    until the next block on the device starts.
    """

    def __init__(
        self,
        region: Region,
        classes: int,
        mode: BlendMode,
        device: torch.device,
        weights: torch.Tensor | None,
    ) -> None:

        self.region = region
        self.mode = BlendMode(mode)
        self.crop = self.mode is BlendMode.CROP
        self.weights = weights
        self.acc = zeros_scratch("acc", (classes, *region.shape), device)
        self.wsum = None if self.crop else zeros_scratch("wsum", region.shape, device)
        self._filled = 0

    def _target(self, tile_out: Region, owned: Region | None) -> Region:
        return (owned if self.crop else tile_out).intersect(self.region)

    def add(self, pred: torch.Tensor, tile_out: Region, owned: Region | None = None) -> None:
        """Add one tile's prediction ``(K, *tile_out.shape)`` float32.

        In crop mode ``owned`` is the part of the tile that alone provides the output.
        """
        target = self._target(tile_out, owned)
        if target.empty:
            return
        dst = target.relative_to(self.region).to_slices()
        src = target.relative_to(tile_out).to_slices()
        if self.crop:
            self.acc[(slice(None), *dst)] = pred[(slice(None), *src)]
            self._filled += target.size
            return
        w = self.weights[src]
        self.acc[(slice(None), *dst)].addcmul_(pred[(slice(None), *src)], w)
        self.wsum[dst].add_(w)

    def skip(self, tile_out: Region, owned: Region | None = None) -> None:
        """Count a tile that was not run (no tissue) as predicting zeros."""
        target = self._target(tile_out, owned)
        if target.empty:
            return
        if self.crop:
            self._filled += target.size
            return
        self.wsum[target.relative_to(self.region).to_slices()].add_(
            self.weights[target.relative_to(tile_out).to_slices()]
        )

    def result(self) -> torch.Tensor:
        """Blended probabilities ``(K, *region.shape)`` float32 (the accumulator, divided
        in place)."""
        if self.crop:
            if self._filled != self.region.size:
                raise RuntimeError(
                    f"crop blending covered {self._filled} of {self.region.size} pixels of "
                    f"{self.region}"
                )
            return self.acc
        if not bool(self.wsum.min() > 0):
            raise RuntimeError(f"tiles do not cover block {self.region}")
        return self.acc.div_(self.wsum)
