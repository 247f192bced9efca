"""The stages of one block, as plain functions: read → tiles → predict → blend → write.

:func:`process_block` is what a Dask worker runs. Everything it needs arrives in a
frozen :class:`BlockJob` (coordinates and references, never pixels); the model and the
input/output handles are opened once per worker process and cached.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

import numpy as np

from pipeline.blend import BlendMode, BlockMerger, tile_weights
from pipeline.errors import ModelOutputError, ModelRunError, PipelineError
from pipeline.geometry import Region, reflect_index
from pipeline.tiling import Lattice
from pipeline.tissue_mask import TissueMask

if TYPE_CHECKING:
    import dask.array
    import zarr

    from pipeline.backends.base import Backend
    from pipeline.io.model_input import InputRef

log = logging.getLogger(__name__)

#: What a block reads: an input's reference (opened on the worker, ``.open()``), or an
#: array ``(C, *spatial)`` in memory (:func:`pipeline.run.predict_array`).
Source = Union["InputRef", np.ndarray, "dask.array.Array"]


@dataclass(frozen=True)
class BackendRef:
    """How to load a model on a worker (hashable: the per-process cache key)."""

    model: str | None
    backend: str = "auto"
    device: str = "cpu"
    precision: str = "fp32"
    overrides: tuple[tuple[str, int | str], ...] = ()
    threads: int | None = None


@dataclass(frozen=True, kw_only=True)
class BlockJob:
    """One unit of work: the chunk-aligned region a block alone writes, and references.

    Attributes
    ----------
    index
        The block's number in the image's raster order.
    write
        The output region this block alone writes (whole output chunks).
    lattice, blend
        The image's tile lattice and how tiles are blended.
    classes
        Output channels.
    model_ndim
        The model's spatial axes (a 2D model on a volume runs plane by plane).
    source
        What the block reads (see :data:`Source`).
    backend
        How to load the model on the worker.
    sink
        Path of the output level-0 Zarr array, or None to return the pixels.
    batch_size, normalize, out_dtype
        Tiles per forward pass, input scaling (``dtype``/``none``), output dtype.
    tiles
        Every tile touching ``write``, in lattice order (empty: computed here).
    own
        Shared tiles this block's first phase (:func:`predict_shared`) computes.
    tissue
        The tissue mask cropped to this block and its reach, or None: run every tile.
    """

    index: int
    write: Region
    lattice: Lattice
    blend: BlendMode
    classes: int
    model_ndim: int
    source: Source
    backend: BackendRef
    sink: str | None = None
    batch_size: int = 8
    normalize: str = "dtype"
    out_dtype: str = "uint8"
    tiles: tuple[tuple[int, ...], ...] = ()
    own: tuple[tuple[int, ...], ...] = ()
    tissue: TissueMask | None = None

    def runs(self, tile: tuple[int, ...]) -> bool:
        """A tile runs unless it has no tissue anywhere in its output, so every pixel
        inside tissue keeps all its contributing tiles (identical to a run without skipping)."""
        return self.tissue is None or self.tissue.any_in(self.lattice.out_region(tile))


@dataclass
class BlockResult:
    index: int
    region: Region
    tiles: int
    pixels: int
    seconds: dict[str, float] = field(default_factory=dict)
    data: np.ndarray | None = None


_BACKENDS: dict[BackendRef, Backend] = {}
_SINKS: dict[str, zarr.Array] = {}


def get_backend(ref: BackendRef) -> Backend:
    """The backend for ``ref``, loaded once per process."""
    backend = _BACKENDS.get(ref)
    if backend is None:
        from pipeline.backends import load_backend

        backend = load_backend(
            ref.model,
            backend=ref.backend,
            device=worker_device(ref.device),
            precision=ref.precision,
            overrides=dict(ref.overrides),
            threads=ref.threads,
        )
        _BACKENDS[ref] = backend
    return backend


def worker_device(device: str) -> str:
    """``cuda`` without an index spreads local-cluster workers over the GPUs (worker
    ``i`` takes GPU ``i mod count``); anything else is used as given."""
    if device != "cuda":
        return device
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):  # not on a Dask worker
        return device
    import torch

    count = torch.cuda.device_count()
    return f"cuda:{int(name) % count}" if isinstance(name, int) and count > 1 else device


def _open_sink(path: str) -> zarr.Array:
    arr = _SINKS.get(path)
    if arr is None:
        from pipeline.io.sink import open_level

        arr = _SINKS[path] = open_level(path)
    return arr


def forget_sink(path: str) -> None:
    """Drop a cached output handle (after its image is finished or discarded)."""
    _SINKS.pop(path, None)


def read_region(array: np.ndarray | dask.array.Array, region: Region) -> np.ndarray:
    """Pixels of ``region`` from ``array`` ``(C, *spatial)``, mirrored past the borders.

    Only the in-image bounding box of the mirrored coordinates is read, so a lazy array
    decodes just the tiles it touches.
    """
    shape = array.shape[1:]
    idx = [reflect_index(np.arange(o, e), n) for o, e, n in zip(region.offset, region.end, shape)]
    lo = [int(i.min()) for i in idx]
    hi = [int(i.max()) + 1 for i in idx]
    box = array[(slice(None), *(slice(a, b) for a, b in zip(lo, hi)))]
    box = box.compute(scheduler="synchronous") if hasattr(box, "compute") else np.asarray(box)
    if all(
        len(i) == b - a and i[0] == a and np.all(np.diff(i) == 1) for i, a, b in zip(idx, lo, hi)
    ):
        return box
    return box[np.ix_(np.arange(box.shape[0]), *(i - a for i, a in zip(idx, lo)))]


def normalize(data: np.ndarray, mode: str) -> np.ndarray:
    """Scale to float32: ``dtype`` divides integers by their dtype's maximum."""
    if mode == "dtype" and data.dtype == np.bool_:
        return data.astype(np.float32)
    if mode == "dtype" and np.issubdtype(data.dtype, np.integer):
        return np.divide(data, np.float32(np.iinfo(data.dtype).max), dtype=np.float32)
    return data.astype(np.float32, copy=False)


def to_output_dtype(prob: np.ndarray, dtype: str) -> np.ndarray:
    """uint8: probability × 255, rounded and clipped; float dtypes keep the value."""
    if dtype == "uint8":
        return np.rint(np.clip(prob, 0.0, 1.0) * 255.0).astype(np.uint8)
    return prob.astype(dtype)


def _check_finite(job: BlockJob, pred: np.ndarray) -> None:
    # the shape is the backend's check (CheckedBackend); a NaN is only visible here
    if not np.isfinite(pred).all():
        raise ModelOutputError(
            f"model output contains NaN or Inf in block {job.write}",
            where=job.backend.model,
            hint="check the input for NaN/Inf and the model's normalisation",
        )


def _predict(job: BlockJob, arr: np.ndarray) -> np.ndarray:
    """One batch ``(B, C, *tile)`` through the model; a 2D model on a volume sees ``z`` dropped."""
    lat = job.lattice
    squeeze = lat.ndim - job.model_ndim
    if squeeze:
        arr = arr.reshape(arr.shape[:2] + arr.shape[2 + squeeze :])
    try:
        pred = np.asarray(
            get_backend(job.backend).predict(np.ascontiguousarray(arr)), dtype=np.float32
        )
    except (PipelineError, MemoryError):
        raise
    except Exception as exc:  # the runtime's own message says what the model rejected
        raise ModelRunError(
            f"model failed on a batch of shape {arr.shape}: {type(exc).__name__}: {exc}",
            where=job.backend.model,
            hint="check that the model takes this many channels and this tile size "
            "(pipeline inspect MODEL)",
        ) from None
    _check_finite(job, pred)
    return pred.reshape(pred.shape[:2] + lat.out_tile)


def _bounds(regions: list[Region]) -> Region:
    ndim = regions[0].ndim
    return Region.from_bounds(
        [min(r.offset[a] for r in regions) for a in range(ndim)],
        [max(r.end[a] for r in regions) for a in range(ndim)],
    )


def predict_stream(
    job: BlockJob,
    tiles: list[tuple[int, ...]],
    *,
    per_batch: bool = False,
    timer: dict[str, float] | None = None,
) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
    """Yield ``(tile, prediction)`` for ``tiles`` in order, run in batches.

    The input is read once for all tiles, or per batch with ``per_batch`` (the first
    phase's shared tiles lie along block edges, where one bounding box would be wasteful).
    """
    if not tiles:
        return
    timer = {} if timer is None else timer
    lat = job.lattice
    source = job.source.open() if hasattr(job.source, "open") else job.source
    read = x = None
    for start in range(0, len(tiles), job.batch_size):
        batch = tiles[start : start + job.batch_size]
        t0 = time.perf_counter()
        if per_batch or x is None:
            read = _bounds([lat.in_region(t) for t in (batch if per_batch else tiles)])
            x = normalize(read_region(source, read), job.normalize)
        arr = np.stack(
            [x[(slice(None), *lat.in_region(t).relative_to(read).to_slices())] for t in batch]
        )
        t1 = time.perf_counter()
        pred = _predict(job, arr)
        timer["read"] = timer.get("read", 0.0) + t1 - t0
        timer["predict"] = timer.get("predict", 0.0) + time.perf_counter() - t1
        yield from zip(batch, pred)


def predict_shared(job: BlockJob) -> dict[tuple[int, ...], np.ndarray]:
    """First phase: the shared tiles this block owns, for the blocks that need them."""
    return dict(predict_stream(job, [t for t in job.own if job.runs(t)], per_batch=True))


def process_block(job: BlockJob, *shared: dict) -> BlockResult:
    """Second phase: predict the block's own tiles, blend them with the shared ones
    (``shared``: results of :func:`predict_shared`), write the block's chunks.

    Tiles are added in lattice order whatever their origin, so a pixel's value does not
    depend on the block layout. Idempotent: a rerun writes the same bytes.
    """
    t0 = time.perf_counter()
    lat = job.lattice
    crop = job.blend is BlendMode.CROP
    tiles = list(job.tiles) or lat.tiles_touching(job.write, owned=crop)
    ready: dict[tuple[int, ...], np.ndarray] = {}
    for part in shared:
        ready.update(part)
    skipped = {t for t in tiles if not job.runs(t)}
    local = [t for t in tiles if t not in ready and t not in skipped]
    timer: dict[str, float] = {}
    stream = predict_stream(job, local, timer=timer)
    merger = BlockMerger(job.write, job.classes, job.blend)
    weights = None if crop else tile_weights(job.blend, lat.out_tile, lat.overlap)
    for t in tiles:
        owned = lat.owned_region(t) if crop else None
        if t in skipped:
            merger.skip(lat.out_region(t), weights, owned)
            continue
        pred = ready.get(t)
        if pred is None:
            got, pred = next(stream)
            assert got == t  # the stream follows the same order
        merger.add(pred, lat.out_region(t), weights, owned)
    prob = merger.result()
    if job.tissue is not None:
        prob *= job.tissue.upsample(job.write)  # glass is background
    out = to_output_dtype(prob, job.out_dtype)
    t1 = time.perf_counter()
    own_run = sum(job.runs(t) for t in job.own)
    result = BlockResult(job.index, job.write, len(local) + own_run, job.write.size)
    if job.sink is None:
        result.data = out
    else:
        _open_sink(job.sink)[(slice(None), *job.write.to_slices())] = out
    blend = t1 - t0 - timer.get("read", 0.0) - timer.get("predict", 0.0)
    result.seconds = {**timer, "blend": blend, "write": time.perf_counter() - t1}
    return result
