"""Test-time augmentation: every batch of tiles also runs flipped (and rotated), each
prediction is turned back, and their mean is what gets blended.

``flip`` averages over every combination of axis flips (4 in 2D, 8 in 3D); ``d4`` over
the 8 rotations and reflections of the (y, x) plane (the symmetries of a square, so the
tiles must be square in y and x). The augmentation is per tile, before blending, so a
``valid`` network stays exact: a flipped tile sits on the pooling grid of the flipped
image as long as the padded image size is one the network accepts.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.config import TTA
from pipeline.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["Transform", "check_tta", "predict_tta", "transforms"]


@dataclass(frozen=True)
class Transform:
    """Flip the spatial axes ``flips`` (0 = first spatial axis), then turn the (y, x)
    plane ``turns`` quarter turns (``torch.rot90`` on the last two axes)."""

    flips: tuple[int, ...] = ()
    turns: int = 0

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial)`` → the augmented batch."""
        import torch

        if self.flips:
            x = torch.flip(x, [2 + a for a in self.flips])
        if self.turns:
            x = torch.rot90(x, self.turns, dims=(-2, -1))
        return x

    def invert(self, y: torch.Tensor) -> torch.Tensor:
        """A prediction of the augmented batch, turned back to the original orientation."""
        import torch

        if self.turns:
            y = torch.rot90(y, -self.turns, dims=(-2, -1))
        if self.flips:
            y = torch.flip(y, [2 + a for a in self.flips])
        return y


def check_tta(mode: str, tile: Sequence[int]) -> None:
    """Refuse what a mode cannot do with these (model) tile sizes.

    Raises
    ------
    ConfigError
        An unknown mode, or ``d4`` with tiles that are not square in (y, x).
    """
    if mode not in TTA:
        raise ConfigError(
            f"tta must be one of {', '.join(TTA)}, got {mode!r}", where="option --tta"
        )
    if mode == "d4" and (len(tile) < 2 or tile[-1] != tile[-2]):
        raise ConfigError(
            f"--tta d4 rotates tiles, so they must be square in y and x (tile {tuple(tile)})",
            where="option --tta",
            hint="give one tile size (--tile N), or use --tta flip",
        )


def transforms(mode: str, ndim: int) -> list[Transform]:
    """The transforms of ``mode`` for ``ndim`` spatial axes, the identity first."""
    if mode == "none":
        return [Transform()]
    if mode == "flip":
        return [
            Transform(tuple(a for a in range(ndim) if bits[a]))
            for bits in itertools.product((0, 1), repeat=ndim)
        ]
    if mode == "d4":
        if ndim < 2:
            raise ConfigError("--tta d4 needs at least two spatial axes", where="option --tta")
        return [Transform(flips, turns) for flips in ((), (ndim - 1,)) for turns in range(4)]
    raise ConfigError(f"unknown tta mode {mode!r}", where="option --tta")


def predict_tta(
    run: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, mode: str
) -> torch.Tensor:
    """The mean over ``mode``'s transforms of ``invert(run(apply(batch)))``, float32.

    Each transform is one call of ``run`` on the whole batch (the batch size the model
    was sized for). The predictions are summed pairwise (a binary tree over the 4 or 8
    transforms), so equal predictions average to exactly themselves. ``none`` returns
    ``run(batch)`` as it is.
    """
    import torch

    steps = transforms(mode, batch.dim() - 2)
    if len(steps) == 1:
        return run(batch)
    partial: list[tuple[int, torch.Tensor]] = []  # (tree level, sum of 2**level predictions)
    for t in steps:
        level, total = 0, t.invert(run(t.apply(batch).contiguous())).to(torch.float32, copy=True)
        while partial and partial[-1][0] == level:
            total = partial.pop()[1].add_(total)
            level += 1
        partial.append((level, total))
    total = partial.pop()[1]
    while partial:
        total = partial.pop()[1].add_(total)
    return total.div_(float(len(steps)))
