"""The stages of one block, as plain functions: read → tiles → predict → blend → write.

:func:`process_block` is what a Dask worker runs. Everything it needs arrives in a
frozen :class:`BlockJob` (coordinates and references, never pixels); the model and the
input/output handles are opened once per worker process and cached.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .blend import BlendMode, BlockMerger, tile_weights
from .errors import PipelineError
from .geometry import Region, reflect_index
from .tiling import Lattice

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendRef:
    """How to load a model on a worker (hashable: the per-process cache key)."""

    model: str | None
    backend: str = "auto"
    device: str = "cpu"
    precision: str = "fp32"
    overrides: tuple[tuple[str, Any], ...] = ()
    threads: int | None = None


@dataclass(frozen=True)
class SourceRef:
    """How to open the input on a worker, already in model layout ``(C, *spatial)``."""

    path: str
    series: int | None
    level: int
    ndim: int
    in_channels: int

    def open(self):
        from .io.sources import open_image_cached, to_model_layout

        source = open_image_cached(self.path, self.series, self.level)
        return to_model_layout(source, self.ndim, self.in_channels)[0]


@dataclass(frozen=True)
class BlockJob:
    """One unit of work: the chunk-aligned region a block alone writes, and references."""

    index: int
    write: Region
    lattice: Lattice
    blend: BlendMode
    classes: int
    model_ndim: int
    source: Any  # SourceRef, or an array (C, *spatial) for in-process runs
    backend: BackendRef
    sink: Any = None  # path of the output zarr array, or None to return the pixels
    batch_size: int = 8
    normalize: str = "dtype"
    out_dtype: str = "uint8"


@dataclass
class BlockResult:
    index: int
    tiles: int
    pixels: int
    seconds: dict[str, float] = field(default_factory=dict)
    data: np.ndarray | None = None


_BACKENDS: dict[BackendRef, Any] = {}
_SINKS: dict[str, Any] = {}


def get_backend(ref: BackendRef):
    """The backend for ``ref``, loaded once per process."""
    backend = _BACKENDS.get(ref)
    if backend is None:
        from .backends import load_backend

        backend = load_backend(
            ref.model, backend=ref.backend, device=ref.device, precision=ref.precision,
            overrides=dict(ref.overrides), threads=ref.threads,
        )
        _BACKENDS[ref] = backend
    return backend


def _open_sink(path: str):
    arr = _SINKS.get(path)
    if arr is None:
        from .io.sink import open_level

        arr = _SINKS[path] = open_level(path)
    return arr


def forget_sink(path: str) -> None:
    """Drop a cached output handle (after its image is finished or discarded)."""
    _SINKS.pop(path, None)


def read_region(array, region: Region) -> np.ndarray:
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
    if all(len(i) == b - a and i[0] == a and np.all(np.diff(i) == 1) for i, a, b in zip(idx, lo, hi)):
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


def predict_tiles(job: BlockJob, x: np.ndarray, read: Region, merger: BlockMerger,
                  tiles: list[tuple[int, ...]]) -> None:
    """Run ``tiles`` through the model in batches and add them to ``merger``."""
    lat = job.lattice
    backend = get_backend(job.backend)
    crop = job.blend is BlendMode.CROP
    weights = None if crop else tile_weights(job.blend, lat.out_tile, lat.overlap)
    squeeze = lat.ndim - job.model_ndim  # 2D model on a volume: drop the z axis of the tile
    for start in range(0, len(tiles), job.batch_size):
        batch = tiles[start:start + job.batch_size]
        arr = np.stack([x[(slice(None), *lat.in_region(t).relative_to(read).to_slices())] for t in batch])
        if squeeze:
            arr = arr.reshape(arr.shape[:2] + arr.shape[2 + squeeze:])
        try:
            pred = np.asarray(backend.predict(np.ascontiguousarray(arr)), dtype=np.float32)
        except (PipelineError, MemoryError):
            raise
        except Exception as exc:  # the runtime's own message says what the model rejected
            raise PipelineError(
                f"model failed on a batch of shape {arr.shape}: {type(exc).__name__}: {exc}",
                where=job.backend.model, reason="model-error",
                hint="check that the model takes this many channels and this tile size "
                     "(pipeline inspect MODEL)",
            ) from None
        expected = (len(batch), job.classes, *lat.out_tile[squeeze:])
        if pred.shape != expected:
            raise PipelineError(
                f"model returned shape {pred.shape} for input {arr.shape}, expected {expected}",
                where=job.backend.model, reason="bad-model",
                hint="check the model's margin/classes (pipeline inspect MODEL) or pass them as options",
            )
        if not np.isfinite(pred).all():
            raise PipelineError(
                f"model output contains NaN or Inf in block {job.write}",
                where=job.backend.model, reason="model-output-nonfinite",
                hint="check the input for NaN/Inf and the model's normalisation",
            )
        if squeeze:
            pred = pred.reshape(pred.shape[:2] + (1,) * squeeze + pred.shape[2:])
        for t, p in zip(batch, pred):
            merger.add(p, lat.out_region(t), weights, lat.owned_region(t) if crop else None)


def process_block(job: BlockJob) -> BlockResult:
    """Read, predict, blend and write one block; idempotent (a rerun writes the same bytes)."""
    t0 = time.perf_counter()
    lat = job.lattice
    crop = job.blend is BlendMode.CROP
    tiles = lat.tiles_touching(job.write, owned=crop)
    regions = [lat.in_region(t) for t in tiles]
    read = Region.from_bounds(
        [min(r.offset[a] for r in regions) for a in range(lat.ndim)],
        [max(r.end[a] for r in regions) for a in range(lat.ndim)],
    )
    source = job.source.open() if isinstance(job.source, SourceRef) else job.source
    x = normalize(read_region(source, read), job.normalize)
    t1 = time.perf_counter()
    merger = BlockMerger(job.write, job.classes, job.blend)
    predict_tiles(job, x, read, merger, tiles)
    out = to_output_dtype(merger.result(), job.out_dtype)
    t2 = time.perf_counter()
    result = BlockResult(job.index, len(tiles), job.write.size)
    if job.sink is None:
        result.data = out
    else:
        _open_sink(job.sink)[(slice(None), *job.write.to_slices())] = out
    result.seconds = {"read": t1 - t0, "predict": t2 - t1, "write": time.perf_counter() - t2}
    return result
