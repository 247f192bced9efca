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

__all__ = ["TensorMerger", "weights_on"]


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
    """

    def __init__(
        self,
        region: Region,
        classes: int,
        mode: BlendMode,
        device: torch.device,
        weights: torch.Tensor | None,
    ) -> None:
        import torch

        self.region = region
        self.mode = BlendMode(mode)
        self.crop = self.mode is BlendMode.CROP
        self.weights = weights
        self.acc = torch.zeros((classes, *region.shape), dtype=torch.float32, device=device)
        self.wsum = (
            None if self.crop else torch.zeros(region.shape, dtype=torch.float32, device=device)
        )
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
        if not bool((self.wsum > 0).all()):
            raise RuntimeError(f"tiles do not cover block {self.region}")
        return self.acc.div_(self.wsum)
