"""A block's pixels on the compute device: tiles cut, scaled, run in batches, blended
and quantised where the network runs.

The block's input box arrives once, in its stored dtype (:func:`box_to_device`); tiles
are cut from it on the device into one reused batch buffer (a copy that also converts
to float32), scaled in place, run through the model (with test-time augmentation when
asked), and added one by one, in lattice order, into a :class:`~pipeline.merge.TensorMerger`.
The blended block is masked, checked, quantised and copied back once
(:func:`finish_block`). On CPU the same code runs on CPU tensors.

:func:`device_lock` serialises the device section per process and device, so that
with several block threads per worker one block computes while others read their
input or write their output.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from pipeline.blend import BlendMode
from pipeline.devices import normalize_, quantize, to_device, to_host
from pipeline.errors import PipelineError
from pipeline.geometry import Region, reflect_index
from pipeline.merge import TensorMerger, weights_on
from pipeline.tiling import Lattice
from pipeline.tta import predict_tta

if TYPE_CHECKING:
    import torch

__all__ = [
    "HostBox",
    "blend_block",
    "box_to_device",
    "device_lock",
    "finish_block",
    "read_box",
    "stream_predictions",
]

Tile = tuple[int, ...]
Runner = Callable[["torch.Tensor"], "torch.Tensor"]

_LOCKS: dict[str, threading.RLock] = {}
_LOCKS_GUARD = threading.Lock()


def device_lock(device: str) -> threading.RLock:
    """The lock held while a block uses ``device`` in this process (one per device;
    reentrant, so a holder may call code that takes it too)."""
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(str(device), threading.RLock())


class HostBox:
    """A region's pixels as read on the host: the in-image bounding box of its mirrored
    coordinates (``data``, stored dtype) and, per axis, the indices that mirror it out to
    ``region`` (None where the box is the region)."""

    def __init__(self, region: Region, data: np.ndarray, index: list[np.ndarray | None]) -> None:
        self.region, self.data, self.index = region, data, index

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


def read_box(array, region: Region) -> HostBox:
    """Read ``region`` of ``array`` ``(C, *spatial)`` (numpy, dask or any array-like),
    only its in-image bounding box; mirroring past the borders happens on the device."""
    shape = array.shape[1:]
    index: list[np.ndarray | None] = []
    lo, hi = [], []
    for o, e, n in zip(region.offset, region.end, shape):
        idx = reflect_index(np.arange(o, e), n)
        a, b = int(idx.min()), int(idx.max()) + 1
        lo.append(a)
        hi.append(b)
        inside = len(idx) == b - a and idx[0] == a and bool(np.all(np.diff(idx) == 1))
        index.append(None if inside else idx - a)
    box = array[(slice(None), *(slice(a, b) for a, b in zip(lo, hi)))]
    box = box.compute(scheduler="synchronous") if hasattr(box, "compute") else np.asarray(box)
    return HostBox(region, box, index)


def box_to_device(box: HostBox, device: torch.device) -> torch.Tensor:
    """The box's pixels on ``device`` in their stored dtype, mirrored out to its region."""
    import torch

    x = to_device(box.data, device)
    for axis, idx in enumerate(box.index):
        if idx is not None:
            x = x.index_select(axis + 1, torch.from_numpy(idx).to(device))
    return x


def _tile_view(x: torch.Tensor, box: Region, lat: Lattice, tile: Tile, squeeze: int):
    """Tile ``tile``'s input inside ``x`` (covering ``box``), as a view; a 2D model on a
    volume sees its single plane with the ``z`` axis dropped."""
    sl = lat.in_region(tile).relative_to(box).to_slices()
    return x[(slice(None), *(s.start for s in sl[:squeeze]), *sl[squeeze:])]


def stream_predictions(
    run: Runner,
    x: torch.Tensor,
    box: Region,
    tiles: Sequence[Tile],
    *,
    lattice: Lattice,
    model_ndim: int,
    batch_size: int,
    source_dtype: np.dtype,
    normalize: str,
    tta: str = "none",
) -> Iterator[tuple[Tile, torch.Tensor]]:
    """Yield ``(tile, prediction (K, *out_tile))`` for ``tiles``, in order, run in batches.

    ``x`` holds ``box`` on the device in the stored dtype. Tiles are copied into one
    float32 batch buffer that is reused, so a yielded prediction is valid until the next
    batch is cut (the caller merges it first, or copies it).
    """
    import torch

    if not tiles:
        return
    squeeze = lattice.ndim - model_ndim
    model_tile = lattice.tile[squeeze:]
    n = min(batch_size, len(tiles))
    buf = torch.empty((n, x.shape[0], *model_tile), dtype=torch.float32, device=x.device)
    for start in range(0, len(tiles), batch_size):
        batch = tiles[start : start + batch_size]
        view = buf[: len(batch)]
        for i, t in enumerate(batch):
            view[i].copy_(_tile_view(x, box, lattice, t, squeeze))
        normalize_(view, source_dtype, normalize)
        pred = predict_tta(run, view, tta)
        pred = pred.reshape(pred.shape[:2] + lattice.out_tile)
        yield from zip(batch, pred)


def blend_block(
    write: Region,
    lattice: Lattice,
    blend: BlendMode,
    classes: int,
    tiles: Iterable[Tile],
    predictions: Iterator[tuple[Tile, torch.Tensor]],
    *,
    ready: dict[Tile, torch.Tensor] | None = None,
    skipped: set[Tile] = frozenset(),
    device: torch.device,
) -> torch.Tensor:
    """Blend every tile touching ``write`` in lattice order: ``ready`` ones (predicted
    elsewhere), ``skipped`` ones (no tissue: zeros that still count their weight), the
    rest taken from ``predictions`` (which follows the same order)."""
    crop = BlendMode(blend) is BlendMode.CROP
    weights = weights_on(BlendMode(blend), lattice.out_tile, lattice.overlap, device)
    merger = TensorMerger(write, classes, blend, device, weights)
    ready = ready or {}
    for t in tiles:
        owned = lattice.owned_region(t) if crop else None
        if t in skipped:
            merger.skip(lattice.out_region(t), owned)
            continue
        pred = ready.get(t)
        if pred is None:
            got, pred = next(predictions)
            if got != t:  # a bug, never the user's: the stream follows the same order
                raise RuntimeError(f"tile {got} arrived where {t} was expected")
        merger.add(pred, lattice.out_region(t), owned)
    return merger.result()


def finish_block(
    prob: torch.Tensor,
    out_dtype: str,
    *,
    mask: np.ndarray | None = None,
    where: object = None,
    block: Region | None = None,
) -> np.ndarray:
    """Mask (glass is background), check, quantise on the device; copy back once (the
    result never shares memory with ``prob``).

    Raises
    ------
    PipelineError
        ``model-output-nonfinite`` when the blended output holds NaN or Inf (one check
        per block: NaN survives blending, masking and averaging).
    """
    import torch

    if mask is not None:
        prob.mul_(to_device(mask, prob.device))
    if not bool(torch.isfinite(torch.stack(torch.aminmax(prob))).all()):  # NaN propagates
        raise PipelineError(
            f"model output contains NaN or Inf in block {block}",
            where=where,
            reason="model-output-nonfinite",
            hint="check the input for NaN/Inf and the model's normalisation",
        )
    return to_host(quantize(prob, out_dtype))
