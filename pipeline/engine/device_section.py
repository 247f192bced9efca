"""A block's pixels on the compute device: tiles cut, scaled, run in batches, blended
and quantised where the network runs.

The block's input box arrives once, in its stored dtype (:func:`box_to_device`); tiles
are cut from it on the device into one reused batch buffer (a copy that also converts
to float32), scaled in place, run through the model (with test-time augmentation when
asked), and added one by one, in lattice order, into a :class:`~pipeline.engine.merge.TensorMerger`.
The blended block is masked, checked, quantised and copied back once
(:func:`finish_block`). On CPU the same code runs on CPU tensors.

:func:`device_lock` serialises the device section per process and device, so that
with several block threads per worker one block computes while others read their
input or write their output.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from pipeline.core.devices import empty, quantize, scale_into, scale_of, to_device, to_host
from pipeline.core.geometry import Region, reflect_index
from pipeline.core.priority_lock import PriorityLock
from pipeline.engine.blend import BlendMode
from pipeline.engine.merge import TensorMerger, weights_on
from pipeline.engine.tiling import Lattice
from pipeline.engine.tta import predict_tta
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    import torch

__all__ = [
    "URGENT",
    "HostBox",
    "box_to_device",
    "device_lock",
    "finish_block",
    "merge_tiles",
    "read_box",
    "stream_predictions",
]

Tile = tuple[int, ...]
Runner = Callable[["torch.Tensor"], "torch.Tensor"]

_LOCKS: dict[str, PriorityLock] = {}
_LOCKS_GUARD = threading.Lock()

#: Device-lock priority of a task whose predictions other blocks wait for (shared tiles),
#: ahead of a block's own (:attr:`PriorityLock.DEFAULT`).
URGENT = 0


def device_lock(device: str) -> PriorityLock:
    """The lock held while a block uses ``device`` in this process (one per device;
    reentrant, so a holder may call code that takes it too; :data:`URGENT` waiters
    first, then first come, first served)."""
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(str(device), PriorityLock())


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


def _in_slices(lattice: Lattice, tile: Tile, box: Region, squeeze: int) -> tuple:
    """Index of tile ``tile``'s input inside a tensor covering ``box`` (channels first);
    a 2D model on a volume sees its single plane with the ``z`` axis dropped. Plain
    integer arithmetic: this runs once per tile."""
    index: list = [slice(None)]
    for a, (k, m, t, o) in enumerate(zip(tile, lattice.margin, lattice.tile, box.offset)):
        start = lattice.origin(a, k) - m - o
        index.append(start if a < squeeze else slice(start, start + t))
    return tuple(index)


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

    ``x`` holds ``box`` on the device in the stored dtype. Tiles are cut into one
    float32 batch buffer that is reused, converted and scaled in the same pass
    (:func:`~pipeline.core.devices.scale_into`), so a yielded prediction is valid until the
    next batch is cut (the caller merges it first, or copies it).
    """
    import torch

    if not tiles:
        return
    squeeze = lattice.ndim - model_ndim
    model_tile = lattice.tile[squeeze:]
    n = min(batch_size, len(tiles))
    buf = torch.empty((n, x.shape[0], *model_tile), dtype=torch.float32, device=x.device)
    scale = scale_of(source_dtype, normalize)
    for start in range(0, len(tiles), batch_size):
        batch = tiles[start : start + batch_size]
        view = buf[: len(batch)]
        for i, t in enumerate(batch):
            scale_into(view[i], x[_in_slices(lattice, t, box, squeeze)], scale)
        pred = predict_tta(run, view, tta)
        pred = pred.reshape(pred.shape[:2] + lattice.out_tile)
        yield from zip(batch, pred)


def merge_tiles(
    write: Region,
    lattice: Lattice,
    blend: BlendMode,
    classes: int,
    tiles: Sequence[Tile],
    predictions: Iterator[tuple[Tile, torch.Tensor]],
    *,
    ready: dict[Tile, torch.Tensor] | None = None,
    skipped: set[Tile] = frozenset(),
    device: torch.device,
) -> TensorMerger:
    """Merge every tile touching ``write`` in lattice order: ``ready`` ones (predicted
    elsewhere), ``skipped`` ones (no tissue: zeros that still count their weight), the
    rest taken from ``predictions`` (which follows the same order). Returns the merger
    (see :func:`finish_block`)."""
    crop = BlendMode(blend) is BlendMode.CROP
    weights = weights_on(BlendMode(blend), lattice.out_tile, lattice.overlap, device)
    first = _first_indices(tiles)
    merger = TensorMerger(write, classes, blend, device, weights, ordered=first is not None)
    ready = ready or {}
    for t in tiles:
        if crop:
            tile_out, owned = lattice.out_region(t), lattice.owned_region(t)
        else:  # plain integers: the tile's output origin, and where no earlier tile reached
            origin = tuple(lattice.origin(a, k) for a, k in enumerate(t))
            fresh = None if first is None else _fresh(lattice, t, first, origin)
        if t in skipped:
            if crop:
                merger.skip(owned)
            else:
                merger.skip_at(origin, fresh)
            continue
        pred = ready.get(t)
        if pred is None:
            got, pred = next(predictions)
            if got != t:  # a bug, never the user's: the stream follows the same order
                raise RuntimeError(f"tile {got} arrived where {t} was expected")
        if crop:
            merger.add(pred, tile_out, owned)
        else:
            merger.add_at(pred, origin, fresh)
    return merger


def _first_indices(tiles: Sequence[Tile]) -> Tile | None:
    """Per axis the first tile index, when ``tiles`` are every tile of a box of the
    lattice in lattice (raster) order; None otherwise."""
    if not tiles:
        return None
    ranges = [sorted({t[a] for t in tiles}) for a in range(len(tiles[0]))]
    if any(r[-1] - r[0] + 1 != len(r) for r in ranges):
        return None
    if list(tiles) != list(itertools.product(*(range(r[0], r[-1] + 1) for r in ranges))):
        return None
    return tuple(r[0] for r in ranges)


def _fresh(lattice: Lattice, tile: Tile, first: Tile, origin: tuple[int, ...]) -> tuple:
    """Per axis, where the part of ``tile`` that no earlier tile of the box reached
    starts: the end of the previous tile along that axis (every tile before it in
    raster order lies before it on some axis, and reaches at most that far)."""
    return tuple(
        o if k == f else lattice.origin(a, k - 1) + n
        for a, (k, f, o, n) in enumerate(zip(tile, first, origin, lattice.out_tile))
    )


#: Values per band of the CPU finishing pass: a band of every channel stays in L2 cache
#: through its division, check and quantisation (each a pass over memory otherwise).
FINISH_BAND_BYTES = 2**19


def finish_block(
    prob: torch.Tensor | TensorMerger,
    out_dtype: str,
    *,
    mask: np.ndarray | None = None,
    where: object = None,
    block: Region | None = None,
) -> np.ndarray:
    """Divide (a merger's sums), mask (glass is background), check, quantise on the
    device; copy back once (the result never shares memory with ``prob``).

    On CPU the block goes through these steps band by band, each band in cache: the
    same operations on the same values as whole-block passes, so the same bits.

    Raises
    ------
    PipelineError
        ``model-output-nonfinite`` when the blended output holds NaN or Inf (one check
        per block: NaN survives blending, masking and averaging).
    """
    import torch

    weights = None
    if isinstance(prob, TensorMerger):
        prob.check()
        prob, weights = prob.acc, prob.wsum
    classes = prob.shape[0]
    flat = prob.reshape(classes, -1)  # a view: prob is contiguous
    wflat = None if weights is None else weights.reshape(1, -1)
    mflat = None
    if mask is not None:
        mflat = to_device(np.ascontiguousarray(mask).reshape(1, -1), prob.device)
    # the output of this thread's previous block, when nothing holds it any more
    out = empty(tuple(prob.shape), getattr(torch, out_dtype), prob.device, role="block-out")
    oflat = out.view(classes, -1)
    n = flat.shape[1]
    band = n if prob.device.type != "cpu" else max(1, FINISH_BAND_BYTES // (4 * classes))
    lows, highs = [], []
    for start in range(0, n, band):
        part = slice(start, min(n, start + band))
        p = flat[:, part]
        if wflat is not None:
            p.div_(wflat[:, part])
        if mflat is not None:
            p.mul_(mflat[:, part])
        low, high = torch.aminmax(p)
        lows.append(low)
        highs.append(high)
        quantize(p, out_dtype, out=oflat[:, part])
    if not bool(torch.isfinite(torch.stack(lows + highs)).all()):  # NaN propagates
        raise PipelineError(
            f"model output contains NaN or Inf in block {block}",
            where=where,
            reason="model-output-nonfinite",
            hint="check the input for NaN/Inf and the model's normalisation",
        )
    return to_host(out)
