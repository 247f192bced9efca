"""The stages of one block, as plain functions: read → tiles → predict → blend → write.

:func:`process_block` is what a Dask worker runs. Everything it needs arrives in a
frozen :class:`BlockJob` (coordinates and references, never pixels); the model and the
input/output handles are opened once per worker process and cached.

A block runs in three steps: its input box is read on the host in its stored dtype;
then, holding the device's lock (:func:`pipeline.engine.device_section.device_lock`), it
goes to the model's device once, where tiles are cut, scaled, predicted, blended and
quantised (:mod:`pipeline.engine.device_section`), and comes back once in the output
dtype; then its chunks are written, level 0 and the pyramid levels it owns (:mod:`pipeline.core.pyramid`), and any
extra per-block outputs. With a few block threads per worker (:data:`BLOCK_THREADS`)
one block computes while another reads and a third writes; memory stays bounded by
that many blocks.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, Union

import numpy as np

from pipeline.core.collector import freeze_loaded
from pipeline.core.devices import host_threads, torch_device
from pipeline.core.geometry import Region
from pipeline.core.priority_lock import PriorityLock
from pipeline.core.pyramid import downsample, level_region
from pipeline.core.tissue_mask import TissueMask
from pipeline.engine.blend import BlendMode
from pipeline.engine.device_section import (
    URGENT,
    HostBox,
    box_to_device,
    device_lock,
    finish_block,
    merge_tiles,
    read_box,
    stream_predictions,
)
from pipeline.engine.tiling import Lattice
from pipeline.errors import ModelRunError, PipelineError
from pipeline.io.chunk_writer import level_writer

if TYPE_CHECKING:
    import dask.array
    import torch

    from pipeline.backends.base import Backend
    from pipeline.io.model_input import InputRef

log = logging.getLogger(__name__)

#: What a block reads: an input's reference (opened on the worker, ``.open()``), or an
#: array ``(C, *spatial)`` in memory (:func:`pipeline.predict.predict_array`).
Source = Union["InputRef", np.ndarray, "dask.array.Array"]

#: Block tasks in flight per worker process: one computing, one reading, one writing.
BLOCK_THREADS = 3

Tile = tuple[int, ...]


@dataclass(frozen=True)
class BackendRef:
    """How to load a model on a worker (hashable: the per-process cache key)."""

    model: str | None
    backend: str = "auto"
    device: str = "cpu"
    precision: str = "fp32"
    overrides: tuple[tuple[str, int | str], ...] = ()
    threads: int | None = None
    ort_provider: str = "auto"
    cuda_graphs: bool = False


class BlockOutput(Protocol):
    """Something else a block writes from its final pixels (class labels, polygons...):
    called once per block after its chunks are written, with the pixels it owns."""

    def write(self, job: BlockJob, data: np.ndarray) -> None: ...


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
    levels
        Paths of the pyramid levels 1, 2... this block writes from its own pixels (their
        chunks lie inside its region; see :func:`pipeline.core.pyramid.block_levels`).
    batch_size, normalize, out_dtype
        Tiles per forward pass (None: chosen per worker to fill the device), input
        scaling (``dtype``/``none``), output dtype.
    tta
        Test-time augmentation (``none``, ``flip``, ``d4``; see :mod:`pipeline.engine.tta`).
    outputs
        Further per-block writers (:class:`BlockOutput`), given the block's final pixels.
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
    levels: tuple[str, ...] = ()
    batch_size: int | None = None
    normalize: str = "dtype"
    out_dtype: str = "uint8"
    tiles: tuple[tuple[int, ...], ...] = ()
    own: tuple[tuple[int, ...], ...] = ()
    tissue: TissueMask | None = None
    tta: str = "none"
    outputs: tuple[BlockOutput, ...] = ()

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
_BATCHES: dict[tuple, int] = {}
_LOAD = threading.Lock()


def get_backend(ref: BackendRef) -> Backend:
    """The backend for ``ref``, loaded once per process (also with several block threads)."""
    backend = _BACKENDS.get(ref)
    if backend is None:
        with _LOAD:
            backend = _BACKENDS.get(ref)
            if backend is None:
                from pipeline.backends import load_backend

                backend = _BACKENDS[ref] = load_backend(
                    ref.model,
                    backend=ref.backend,
                    device=worker_device(ref.device),
                    precision=ref.precision,
                    overrides=dict(ref.overrides),
                    threads=ref.threads,
                    ort_provider=ref.ort_provider,
                    cuda_graphs=ref.cuda_graphs,
                )
                import torch  # noqa: F401  (every block's device section runs on it)

                freeze_loaded()  # the model, its runtime and torch: out of the GC's walks
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


def _bounds(regions: list[Region]) -> Region:
    ndim = regions[0].ndim
    return Region.from_bounds(
        [min(r.offset[a] for r in regions) for a in range(ndim)],
        [max(r.end[a] for r in regions) for a in range(ndim)],
    )


def _runner(job: BlockJob, backend: Backend) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model on a batch tensor; a runtime's own failure becomes a ModelRunError."""
    predict = getattr(backend, "predict_tensor", None)
    if predict is None:  # a backend with the numpy protocol only

        def predict(batch: torch.Tensor) -> torch.Tensor:
            import torch

            out = backend.predict(batch.detach().cpu().contiguous().numpy())
            return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(batch.device)

    def run(batch: torch.Tensor) -> torch.Tensor:
        try:
            return predict(batch)
        except (PipelineError, MemoryError):
            raise
        except Exception as exc:  # the runtime's own message says what the model rejected
            raise ModelRunError(
                f"model failed on a batch of shape {tuple(batch.shape)}: "
                f"{type(exc).__name__}: {exc}",
                where=job.backend.model,
                hint="check that the model takes this many channels and this tile size "
                "(pipeline inspect MODEL)",
            ) from None

    return run


def _batch_size(job: BlockJob, backend: Backend, channels: int) -> int:
    """``job.batch_size``, else the size that fills this worker's device (once per tile)."""
    if job.batch_size:
        return job.batch_size
    lat = job.lattice
    sample = (channels, *lat.tile[lat.ndim - job.model_ndim :])
    key = (job.backend, sample)
    if key not in _BATCHES:
        from pipeline.backends.tuning import auto_batch_size

        device = _device_name(backend)
        with device_lock(str(torch_device(device))):  # measured alone on the device
            if key not in _BATCHES:
                _BATCHES[key] = auto_batch_size(_runner(job, backend), sample, device)
    return _BATCHES[key]


def _device_name(backend: Backend) -> str:
    return str(getattr(backend, "device", "cpu"))


class _Section:
    """The device section of a block: the device's lock, and on CPU one torch thread for
    the small per-tile ops (:func:`pipeline.core.devices.host_threads` says why)."""

    def __init__(self, backend: Backend, priority: int = PriorityLock.DEFAULT) -> None:
        self.device = torch_device(_device_name(backend))
        self.lock = device_lock(str(self.device))
        self.priority = priority
        self.threads = host_threads(1 if self.device.type == "cpu" else None)

    def __enter__(self) -> _Section:
        self.lock.acquire(self.priority)
        self.threads.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.threads.__exit__(*exc)
        finally:
            self.lock.release()


def _predictions(job: BlockJob, backend: Backend, box: HostBox, tiles: list[Tile], device):
    x = box_to_device(box, device)
    return stream_predictions(
        _runner(job, backend),
        x,
        box.region,
        tiles,
        lattice=job.lattice,
        model_ndim=job.model_ndim,
        batch_size=_batch_size(job, backend, int(x.shape[0])),
        source_dtype=box.data.dtype,
        normalize=job.normalize,
        tta=job.tta,
    )


def _source(job: BlockJob):
    """What the block reads: an input's plain array-like (numpy from one read, no dask
    graph), or the array it was given."""
    if hasattr(job.source, "open_view"):
        return job.source.open_view()
    return job.source.open() if hasattr(job.source, "open") else job.source


def predict_shared(job: BlockJob) -> dict[Tile, np.ndarray]:
    """First phase: the shared tiles this block owns, for the blocks that need them.

    Their input is read per batch (they lie along the block's edges, where one bounding
    box would be wasteful), all of it before the device section.
    """
    tiles = [t for t in job.own if job.runs(t)]
    if not tiles:
        return {}
    backend = get_backend(job.backend)
    source = _source(job)
    lat = job.lattice
    size = _batch_size(job, backend, int(source.shape[0]))
    batches = [tiles[i : i + size] for i in range(0, len(tiles), size)]
    boxes = [read_box(source, _bounds([lat.in_region(t) for t in b])) for b in batches]
    out: dict[Tile, np.ndarray] = {}
    with _Section(backend, URGENT) as section:  # other blocks wait for these
        for batch, box in zip(batches, boxes):
            for t, pred in _predictions(job, backend, box, batch, section.device):
                out[t] = pred.detach().to("cpu", copy=True).numpy()
    return out


def process_block(job: BlockJob, *shared: dict) -> BlockResult:
    """Second phase: predict the block's own tiles, blend them with the shared ones
    (``shared``: results of :func:`predict_shared`), write the block's chunks.

    Tiles are added in lattice order whatever their origin, so a pixel's value does not
    depend on the block layout. Idempotent: a rerun writes the same bytes.
    """

    t0 = time.perf_counter()
    lat = job.lattice
    tiles = list(job.tiles) or lat.tiles_touching(job.write, owned=job.blend is BlendMode.CROP)
    ready: dict[Tile, np.ndarray] = {}
    for part in shared:
        ready.update(part)
    skipped = {t for t in tiles if not job.runs(t)}
    local = [t for t in tiles if t not in ready and t not in skipped]
    box = read_box(_source(job), _bounds([lat.in_region(t) for t in local])) if local else None
    backend = get_backend(job.backend)
    t1 = time.perf_counter()
    with _Section(backend) as section:
        t2 = time.perf_counter()
        stream = iter(()) if box is None else _predictions(job, backend, box, local, section.device)
        on_device = {t: _tensor(p, section.device) for t, p in ready.items()}
        merged = merge_tiles(
            job.write,
            lat,
            job.blend,
            job.classes,
            tiles,
            stream,
            ready=on_device,
            skipped=skipped,
            device=section.device,
        )
        mask = None if job.tissue is None else job.tissue.upsample(job.write)  # glass: 0
        out = finish_block(
            merged, job.out_dtype, mask=mask, where=job.backend.model, block=job.write
        )
    t3 = time.perf_counter()
    own_run = sum(job.runs(t) for t in job.own)
    result = BlockResult(job.index, job.write, len(local) + own_run, job.write.size)
    if job.sink is None:
        result.data = out
    else:
        write_block(job, out)
    for output in job.outputs:
        output.write(job, out)
    result.seconds = {
        "read": t1 - t0,
        "wait": t2 - t1,
        "compute": t3 - t2,
        "write": time.perf_counter() - t3,
    }
    return result


def _tensor(pred: np.ndarray, device: torch.device) -> torch.Tensor:
    """A shared tile's prediction on the device; it is only read, so a read-only array
    (as Dask hands results between workers) is used as it is."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning)
        return torch.from_numpy(pred).to(device)


def write_block(job: BlockJob, out: np.ndarray) -> None:
    """Level 0 of the block, then each pyramid level it owns, each computed from the
    previous one as stored (:func:`pipeline.core.pyramid.downsample`); level 0 is never read."""
    axes = "c" + "zyx"[-job.write.ndim :]
    chunks = _store(job.sink, job.write, out)
    data = out
    for k, path in enumerate(job.levels, 1):
        data = downsample(data, axes, chunks)
        chunks = _store(path, level_region(job.write, axes, k), data)


def _store(path: str, region: Region, data: np.ndarray) -> tuple[int, ...]:
    """``data`` (every channel of ``region``, whole chunks of the level at ``path``)
    written through the process's writer of that level (all-zero chunks not stored);
    returns the level's chunks."""
    writer = level_writer(path)
    writer[(slice(None), *region.to_slices())] = data
    return writer.chunks
