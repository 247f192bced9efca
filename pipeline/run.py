"""Orchestration: per-input planning, the Dask client, progress and the run report.

This layer never touches pixels: it builds :class:`~pipeline.stages.BlockJob` values and
hands them to a Dask cluster (or runs them in-process with ``scheduler="sync"``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import __version__
from pipeline.backends.base import ModelSpec
from pipeline.config import RunConfig
from pipeline.errors import INTERNAL_ERROR, ConfigError, PipelineError
from pipeline.inprocess import run_in_threads
from pipeline.io import ngff, sink
from pipeline.io.collection import write_collection
from pipeline.plan import Plan, check_options, make_plan
from pipeline.report import InputResult, RunReport
from pipeline.stages import (
    BLOCK_THREADS,
    BackendRef,
    BlockJob,
    BlockResult,
    Source,
    forget_sink,
    predict_shared,
    process_block,
)
from pipeline.tissue_mask import TissueMask

if TYPE_CHECKING:
    from distributed import Client

    from pipeline.io.model_input import ModelInput

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


def resolve_model(model: str | None, cfg: RunConfig) -> ModelSpec:
    """Read the model's geometry once in the driver (probing foreign files)."""
    from pipeline.backends import read_model_spec, resolve_device

    resolve_device(cfg.device)  # a missing GPU is an error before any work starts
    overrides = _overrides(cfg)
    if cfg.backend == "identity":
        from pipeline.backends import load_backend

        if cfg.tile is not None and len(cfg.tile) == 3:
            overrides["ndim"] = 3  # identity is dimension-agnostic: a 3-D tile asks for 3-D
        return load_backend(None, backend="identity", overrides=overrides).spec
    if model is None:
        raise ConfigError(
            "no model given",
            where="option --model",
            hint="pass --model FILE (make one with `pipeline export`)",
        )
    return read_model_spec(model, backend=cfg.backend, overrides=overrides)


def _overrides(cfg: RunConfig) -> dict:
    out = {k: getattr(cfg, k) for k in ("in_channels", "classes") if getattr(cfg, k) is not None}
    if cfg.normalize != "auto":
        out["normalize"] = cfg.normalize
    return out


@contextlib.contextmanager
def dask_client(cfg: RunConfig) -> Iterator[object | None]:
    """A client on ``cfg.scheduler``, or a loopback-only LocalCluster; None for ``sync``."""
    if cfg.scheduler == "sync":
        yield None
        return
    from distributed import Client, LocalCluster

    # distributed logs every cluster event at INFO in this process; keep the terminal
    # for the progress bar unless the user asked for debug output
    if not log.isEnabledFor(logging.DEBUG):
        logging.getLogger("distributed").setLevel(logging.ERROR)
    if cfg.scheduler:
        with Client(cfg.scheduler) as client:
            yield client
        return
    workers, threads = worker_layout(cfg)
    # the scheduler's HTTP endpoint tries port 8787 first and warns when it is taken
    warnings.filterwarnings("ignore", message="Port .* is already in use", category=UserWarning)
    # loopback only: a Dask scheduler runs whatever code a client sends it
    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=BLOCK_THREADS,  # one block computes, others read and write
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            silence_logs=logging.ERROR,
            memory_limit=0,
            env={"OMP_NUM_THREADS": str(threads)},
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


class Executor:
    """Where blocks run. The local cluster starts on first need: one input that is a
    single block or whose default layout is one worker runs in-process (on the block
    threads a worker has): the cluster's start and imports would cost more than they save."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.client = None
        self._stack = contextlib.ExitStack()

    def client_for(self, blocks: int, more_inputs: bool):
        cfg = self.cfg
        if self.client is None and cfg.scheduler != "sync":
            one_worker = blocks <= 1 or worker_layout(cfg)[0] == 1
            small = one_worker and not more_inputs and not cfg.workers and not cfg.scheduler
            if small:
                return None
            self.client = self._stack.enter_context(dask_client(cfg))
        return self.client

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


def worker_layout(cfg: RunConfig) -> tuple[int, int]:
    """(worker processes, model threads per worker) for the local cluster."""
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    workers = cfg.workers or _gpu_count(cfg) or 1
    threads = cfg.threads_per_worker or max(1, cores // workers)
    return workers, threads


def _gpu_count(cfg: RunConfig) -> int:
    """One worker per GPU when the device is ``cuda`` (or ``auto`` finds CUDA)."""
    from pipeline.backends import resolve_device

    if not cfg.device.startswith(("cuda", "auto")) or ":" in cfg.device:
        return 0
    if resolve_device(cfg.device) == "cpu":
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run(
    inputs: Sequence[str],
    out: str | os.PathLike,
    model: str | None,
    cfg: RunConfig,
    *,
    progress: Progress | None = None,
    decided: Sequence[InputResult] = (),
) -> RunReport:
    """Segment every input into ``out``; one input's failure never stops the others.

    ``decided``: inputs settled before the run (skipped or failed while finding inputs,
    see :func:`pipeline.io.discover.find_inputs`); they are added to the report as they are.
    """
    t0 = time.perf_counter()
    fmt = ngff.get_format(cfg.ngff)
    sink.check_root(out, fmt)  # a file, or an output of the other NGFF version
    spec = resolve_model(model, cfg)
    check_options(spec, cfg)
    # usage errors (exit 2) are all raised above: OUT is created only now
    sink.open_root(out, fmt)
    report = RunReport(model=spec.to_dict(), config=cfg.to_dict())
    names = sink.unique_names(inputs)
    ref = backend_ref(spec, cfg)
    with Executor(cfg) as executor:
        for i, (path, name) in enumerate(zip(inputs, names)):
            result = InputResult(str(path), name)
            report.inputs.append(result)
            t1 = time.perf_counter()
            try:
                run_one(
                    path,
                    Path(out),
                    spec,
                    ref,
                    cfg,
                    result,
                    functools.partial(executor.client_for, more_inputs=i < len(inputs) - 1),
                    progress,
                )
                result.state = "done"
            except PipelineError as exc:
                _fail(result, exc.reason, exc.message)
            except Exception as exc:  # an unexpected bug must not stop the batch
                log.debug("unexpected error on %s", path, exc_info=True)
                _fail(
                    result,
                    INTERNAL_ERROR,
                    f"{path}: {type(exc).__name__}: {exc} "
                    f"({traceback.extract_tb(exc.__traceback__)[-1].name})",
                )
            result.seconds = round(time.perf_counter() - t1, 3)
    report.inputs.extend(decided)
    report.seconds = time.perf_counter() - t0
    write_collection(out, fmt)  # the root lists its images; listing it raises no warnings
    report.write(Path(out) / "report.json")
    return report


def backend_ref(spec: ModelSpec, cfg: RunConfig) -> BackendRef:
    """How workers load the model resolved in the driver."""
    overrides = _overrides(cfg)
    if spec.format == "identity":
        overrides["ndim"] = spec.ndim
    elif spec.extra.get("metadata") is False:
        # a model without metadata was probed once here; workers reuse the geometry
        overrides.update(
            {
                k: getattr(spec, k)
                for k in ("ndim", "in_channels", "classes", "margin", "step", "min_tile")
            }
        )
    return BackendRef(
        spec.path,
        spec.format if cfg.backend == "auto" else cfg.backend,
        _device(cfg),
        cfg.precision,
        tuple(sorted(overrides.items())),
        worker_layout(cfg)[1],
        cfg.ort_provider,
        cfg.cuda_graphs,
    )


def _device(cfg: RunConfig) -> str:
    from pipeline.backends import resolve_device

    return resolve_device(cfg.device)


def _fail(result: InputResult, reason: str, message: str) -> None:
    result.state, result.reason, result.message = "failed", reason, message
    log.info("failed: %s", message)  # the report and the CLI's summary carry it


def run_one(
    path: str,
    out: Path,
    spec: ModelSpec,
    ref: BackendRef,
    cfg: RunConfig,
    result: InputResult,
    client_for: Callable[[int], object | None],
    progress: Progress | None,
) -> None:
    """Plan, run the blocks, build the pyramid and publish one input."""
    from pipeline.io.model_input import open_for_model

    inp = open_for_model(
        path,
        ndim=spec.ndim,
        in_channels=spec.in_channels,
        series=cfg.series,
        level=cfg.level,
        mpp=cfg.mpp,
        mpp_input=cfg.mpp_input,
        channels=cfg.channels,
        model_mpp=spec.mpp,
    )
    array, spatial_axes, pixel_size = inp.array, inp.spatial_axes, inp.pixel_size
    channels = int(array.shape[0])
    classes = spec.classes or channels
    shape = tuple(int(s) for s in array.shape[1:])
    plan = make_plan(spec, shape, channels, classes, cfg, array.dtype.itemsize)
    tissue = find_tissue(inp, shape, cfg)
    axes = "c" + spatial_axes
    full, chunks, block = (classes, *shape), (classes, *plan.chunks), (classes, *plan.block)
    writer = sink.create_image(
        out, result.name, full, axes, chunks, cfg.dtype, cfg.ngff, block, cfg.pyramid_min
    )
    try:
        sinks = (writer.level_path(0), tissue, writer.block_paths())
        tasks = make_tasks(plan, inp.ref, ref, spec, classes, cfg, *sinks)
        result.shape, result.blocks = [classes, *shape], len(tasks)
        result.tiles = run_blocks(
            tasks, client_for(len(tasks)), lambda d, n: progress and progress(result.name, d, n)
        )
        if tissue is not None:
            result.tissue_fraction = round(tissue.fraction, 4)
            result.skipped_tiles = plan.lattice.n_tiles - result.tiles
        levels = sink.write_pyramid(writer, cfg.pyramid_min)
        sink.write_metadata(
            writer,
            levels,
            pixel_size,
            provenance(spec, plan, cfg, inp, tissue),
            class_names=cfg.class_names or spec.class_names,
        )
        if tissue is not None:
            from pipeline.io.labels import write_tissue_labels

            write_tissue_labels(writer.staging, tissue, shape, axes, pixel_size, fmt=cfg.ngff)
        result.output = str(sink.publish(writer))
        result.pixels = int(array[0].size)
    except BaseException:
        sink.discard(writer)
        raise
    finally:
        forget_sink(writer.level_path(0))


def find_tissue(inp: ModelInput, shape: tuple[int, ...], cfg: RunConfig) -> TissueMask | None:
    """The tissue mask for one input: the user's (``--mask``, applied to every input),
    detected on a low-resolution level read as the model reads the input (2D images), or
    None (volumes; ``--no-skip-background``)."""
    from pipeline.tissue import detect_tissue, load_user_mask

    if cfg.mask:
        return load_user_mask(cfg.mask, shape)
    if not cfg.skip_background:
        return None
    if inp.spatial_axes != "yx":
        log.info("%s: tissue detection is for 2D images; running the whole volume", inp.ref.path)
        return None
    return detect_tissue(inp, shape, pixel_size=inp.pixel_size or None)


@dataclass(frozen=True)
class Task:
    """A block's job and the blocks whose shared tiles it needs (block order numbers)."""

    job: BlockJob
    needs: tuple[int, ...]


def make_tasks(
    plan: Plan,
    source: Source,
    ref: BackendRef,
    spec: ModelSpec,
    classes: int,
    cfg: RunConfig,
    sink_path: str | None,
    tissue: TissueMask | None = None,
    levels: tuple[str, ...] = (),
) -> list[Task]:
    """One task per block, in raster order; a block only needs blocks before it.

    With a tissue mask, each job carries the mask around its block, and blocks where no
    tile has tissue are left out: their chunks stay unwritten (background, not stored).
    ``levels``: the pyramid levels (1, 2...) blocks write from memory.
    """
    normalize = spec.normalize if cfg.normalize == "auto" else cfg.normalize
    grid = plan.grid()
    layout = grid.layout()
    number = {index: i for i, index in enumerate(layout)}
    tasks = []
    for index, (touching, own, owners) in layout.items():
        region = grid.region(index)
        crop = None if tissue is None else tissue.crop(region.grow(plan.lattice.out_tile))
        job = BlockJob(
            index=number[index],
            write=region,
            lattice=plan.lattice,
            blend=plan.blend,
            classes=classes,
            model_ndim=plan.model_ndim,
            source=source,
            backend=ref,
            sink=sink_path,
            levels=levels,
            batch_size=cfg.batch_size,
            normalize=normalize,
            out_dtype=cfg.dtype,
            tiles=tuple(touching),
            own=tuple(own),
            tissue=crop,
            tta=cfg.tta,
        )
        if crop is not None and not any(job.runs(t) for t in touching):
            continue
        tasks.append(Task(job, tuple(sorted(number[o] for o in owners))))
    kept = {t.job.index for t in tasks}
    return [Task(t.job, tuple(i for i in t.needs if i in kept)) for t in tasks]


def run_local(tasks: list[Task], threads: int = BLOCK_THREADS) -> Iterator[BlockResult]:
    """The in-process path: blocks on ``threads`` threads, results in order."""
    return run_in_threads(tasks, predict_shared, process_block, threads)


def run_blocks(
    tasks: list[Task], client: Client | None, progress: Callable[[int, int], None]
) -> int:
    """Run every block: shared tiles first (one task per owner block), then each block
    with the shared predictions it needs. In-process when ``client`` is None."""
    tiles = 0
    progress(0, len(tasks))
    if client is None:
        for done, res in enumerate(run_local(tasks), 1):
            tiles += res.tiles
            progress(done, len(tasks))
        return tiles
    from distributed import as_completed

    n = len(tasks)
    firsts, futures = {}, []
    for task in tasks:  # earlier blocks first, so shared results are short-lived
        i = task.job.index
        if task.job.own:
            firsts[i] = client.submit(
                predict_shared, task.job, pure=False, retries=1, priority=n - i
            )
        deps = [firsts[j] for j in task.needs if j in firsts]
        futures.append(
            client.submit(process_block, task.job, *deps, pure=False, retries=1, priority=n - i)
        )
    firsts.clear()  # the scheduler keeps each shared result until its last user is done
    try:
        for done, (_, res) in enumerate(as_completed(futures, with_results=True), 1):
            tiles += res.tiles
            progress(done, n)
    except BaseException:
        client.cancel(futures)
        raise
    return tiles


def provenance(
    spec: ModelSpec, plan: Plan, cfg: RunConfig, inp: ModelInput, tissue: TissueMask | None = None
) -> dict:
    lat = plan.lattice
    source = inp.source
    return {
        "resolution": {
            "level": inp.level,
            "pixel_size": inp.pixel_size,
            "resampled_from_level": inp.factor if inp.factor != 1.0 else None,
        },
        "tissue": None
        if tissue is None
        else {
            "method": tissue.method,
            "fraction": round(tissue.fraction, 4),
            "cell": list(tissue.scale),
        },
        "version": __version__,
        "model": {"path": spec.path, "sha256": spec.sha256, "format": spec.format},
        "backend": cfg.backend if cfg.backend != "auto" else spec.format,
        "tile": list(lat.tile),
        "overlap": list(lat.overlap),
        "stride": list(lat.stride),
        "blend": plan.blend.value,
        "chunks": list(plan.chunks),
        "block": list(plan.block),
        "input": {
            "path": str(source.path),
            "series": source.series,
            "level": source.level,
            "format": source.format,
        },
        "config": cfg.to_dict(),
    }


def predict_array(
    array, model: str | None = None, cfg: RunConfig | None = None, *, spec: ModelSpec | None = None
):
    """In-process prediction of an array ``(C, *spatial)`` (numpy or dask).

    Same lattice, blocks and blending as :func:`run`, without Dask or Zarr: for
    debugging, tests and notebooks. Returns ``(K, *spatial)`` in ``cfg.dtype``.
    """
    import numpy as np

    cfg = cfg or RunConfig()
    spec = spec or resolve_model(model, cfg)
    channels = int(array.shape[0])
    classes = spec.classes or channels
    plan = make_plan(spec, tuple(int(s) for s in array.shape[1:]), channels, classes, cfg)
    ref = backend_ref(spec, cfg)
    out = np.zeros((classes, *array.shape[1:]), dtype=cfg.dtype)
    for res in run_local(make_tasks(plan, array, ref, spec, classes, cfg, None)):
        out[(slice(None), *res.region.to_slices())] = res.data
    return out
