"""The worker side of one input: prepare, the two phases of each block, finalize.

These functions run on Dask workers (or in-process, see :mod:`pipeline.batch.driver`). They
take only picklable values and wrap the stages (:func:`~pipeline.engine.stages.predict_shared`,
:func:`~pipeline.engine.stages.process_block`, :func:`~pipeline.io.sink.write_pyramid`) with
what resuming and failing safely need:

* a block records that it is done (:meth:`~pipeline.io.staging.Stage.mark_block_done`)
  only after :func:`process_block` has written all its chunks;
* a task whose input's staging is discarded returns at once and writes nothing;
* before each block the input's stamp (size, mtime) is checked against the one the run
  key was made with, and at the end its whole fingerprint: a file changed during its run
  fails as ``input-changed`` instead of ending as a hybrid;
* transient ``OSError`` is retried with backoff (:mod:`pipeline.core.retry`); a full or
  read-only disk becomes an :class:`~pipeline.errors.OutputError` naming the folder and
  the free space.

Besides its image, each input gets its class labels and, with ``--geojson``, polygons,
written by each block (:class:`~pipeline.batch.products.BlockProducts`, the jobs' ``outputs``),
and at finalize the label pyramid, the GeoJSON and the preview
(:func:`~pipeline.batch.products.finish_products`). An input whose image is up to date but
lacks a product this run asks for (``InputJob.refresh``) gets just its products.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.backends.base import ModelSpec
from pipeline.batch.products import (
    BlockProducts,
    Products,
    finish_products,
    level0_scale,
    polygons_folder,
)
from pipeline.config import RunConfig
from pipeline.core import atomic, faults
from pipeline.core.atomic import output_error
from pipeline.core.classes import label_dtype, label_names
from pipeline.core.pyramid import pyramid_shapes
from pipeline.core.retry import retrying
from pipeline.engine.blocks import Task, find_tissue, make_tasks, provenance
from pipeline.engine.plan import Plan, make_plan
from pipeline.engine.stages import (
    BackendRef,
    BlockJob,
    BlockResult,
    predict_shared,
    process_block,
)
from pipeline.errors import InputChangedError, InternalError
from pipeline.io import sink
from pipeline.io.chunk_writer import forget_writers
from pipeline.io.class_labels import ClassLabels, create_class_labels, finish_class_labels
from pipeline.io.fingerprint import fingerprint, stamp
from pipeline.io.staging import (
    FULL_ERRNOS,
    Stage,
    StagingArea,
    block_id,
    published_key,
)

if TYPE_CHECKING:  # annotations only: the driver imports this module, workers read pixels
    from pipeline.core.tissue_mask import TissueMask
    from pipeline.io.model_input import ModelInput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Model:
    """What every input of a run shares: the model and the settings."""

    spec: ModelSpec
    ref: BackendRef
    cfg: RunConfig

    @property
    def products(self) -> Products:
        return Products.of(self.cfg, self.spec.class_names)


@dataclass(frozen=True)
class InputJob:
    """One input as the driver planned it: where it goes and what it must still be."""

    path: str
    name: str
    out: str
    key: str  # the run key
    sample: str  # its fingerprint's content digest when the key was made
    stamp: tuple[int, int]  # its (size, mtime) then
    run: str  # the run id, recorded in the staging's owner
    refresh: bool = False  # its image is up to date: make only its products (GeoJSON...)


@dataclass
class Prepared:
    """What preparing an input found: its blocks, and what finishing it needs."""

    job: InputJob
    stage: Stage
    tasks: list[Task] = field(default_factory=list)
    complete: bool = False  # staged, finished and verified by an earlier run: publish it
    shape: tuple[int, ...] = ()  # (classes, *spatial)
    axes: str = ""
    chunks: tuple[int, ...] = ()
    pixel_size: dict[str, float] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    tissue: TissueMask | None = None
    run_tiles: int = 0  # lattice tiles that run through the model (all blocks)
    all_tiles: int = 0
    pixels: int = 0  # spatial pixels of the image run on
    block_levels: int = 0  # pyramid levels 1.. the blocks write themselves
    block_ids: tuple[str, ...] = ()  # every block's record name (see io.staging.block_id)
    info: dict[str, Any] = field(default_factory=dict)  # a complete stage's record
    labels: ClassLabels | None = None  # the class label image the blocks write
    scale: tuple[float, float] = (1.0, 1.0)  # (y, x) level-0 pixels per run pixel


def prepare_input(job: InputJob, model: Model) -> Prepared:
    """Open and plan an input, detect tissue, open (or continue) its staging."""
    faults.point("prepare", job.name)
    area = StagingArea(job.out)
    if job.key is not None:
        _check_stamp(job)
        staged = area.stage(job.name, job.key)
        if staged.is_complete() and not staged.is_discarded():
            return Prepared(job, staged, complete=True, info=staged.info() or {})
    inp = retrying(_open, job, model, what=f"opening {job.path}")
    if job.key is None:  # its fingerprint could not be taken, yet it opens
        raise InputChangedError(
            "could not be read consistently", where=job.path, hint="check the file and rerun"
        )
    if job.refresh:  # its image stays; a stage of its own holds the new products
        owner = {"input": job.path, "run": job.run}
        stage, _ = area.open_stage(job.name, job.key, owner, fresh=True)
        shape = tuple(int(s) for s in inp.array.shape[1:])
        return Prepared(job, stage, scale=level0_scale(inp, shape))
    spec, cfg = model.spec, model.cfg
    channels = int(inp.array.shape[0])
    classes = spec.classes or channels
    label_names(classes, model.products.names)  # names that fit: before any block runs
    shape = tuple(int(s) for s in inp.array.shape[1:])
    plan = make_plan(spec, shape, channels, classes, cfg, inp.array.dtype.itemsize)
    tissue = retrying(find_tissue, inp, shape, cfg, what=f"tissue of {job.path}")
    axes, chunks = "c" + inp.spatial_axes, (classes, *plan.chunks)
    try:
        stage, writer, labels, done = _open_stage(
            area, job, (classes, *shape), axes, chunks, plan, cfg
        )
        polygons = str(polygons_folder(stage.dir)) if cfg.geojson else None
        outputs = (BlockProducts(labels, polygons, shape),)
        sinks = (writer.level_path(0), tissue, writer.block_paths(), outputs)
        tasks = make_tasks(plan, inp.ref, model.ref, spec, classes, cfg, *sinks)
    except OSError as exc:
        _raise_if_full(exc, job)
        raise
    tasks = [replace(t, done=block_id(t.job.write) in done) for t in tasks]
    resumed = sum(t.done for t in tasks)
    if resumed:
        log.info("%s: continuing, %d of %d blocks already written", job.path, resumed, len(tasks))
    runs = {t for task in tasks for t in task.job.tiles if task.job.runs(t)}
    return Prepared(
        job,
        stage,
        tasks,
        block_ids=tuple(block_id(t.job.write) for t in tasks),
        shape=(classes, *shape),
        axes=writer.axes,
        chunks=writer.chunks,
        block_levels=writer.block_levels,
        pixel_size=inp.pixel_size,
        provenance={**provenance(spec, plan, cfg, inp, tissue), "run_key": job.key},
        tissue=tissue,
        run_tiles=len(runs),
        all_tiles=plan.lattice.n_tiles,
        pixels=int(inp.array[0].size),
        labels=labels,
        scale=level0_scale(inp, shape),
    )


def _open(job: InputJob, model: Model) -> ModelInput:
    from pipeline.io.model_input import open_for_model

    faults.point("open", job.name)
    spec, cfg = model.spec, model.cfg
    return open_for_model(
        job.path,
        ndim=spec.ndim,
        in_channels=spec.in_channels,
        series=cfg.series,
        level=cfg.level,
        mpp=cfg.mpp,
        mpp_input=cfg.mpp_input,
        channels=cfg.channels,
        model_mpp=spec.mpp,
    )


def _open_stage(
    area: StagingArea,
    job: InputJob,
    shape: tuple[int, ...],
    axes: str,
    chunks: tuple[int, ...],
    plan: Plan,
    cfg: RunConfig,
) -> tuple[Stage, sink.ImageWriter, ClassLabels, set[str]]:
    """The input's staging, its image writer, its class labels and the blocks written in
    it: a staged image is continued when its levels and labels match this plan, else the
    stage starts over."""
    owner = {"input": job.path, "run": job.run}
    stage, reused = area.open_stage(job.name, job.key, owner)
    args = (job.out, job.name, shape, axes, chunks, cfg.dtype, cfg.ngff)
    block = (shape[0], *plan.block)
    shapes = pyramid_shapes(shape, axes, cfg.pyramid_min)
    if reused:
        writer = sink.reopen_image(*args, block, cfg.pyramid_min, staging=stage.image)
        if writer is not None and _labels_match(stage, writer, shapes, cfg):
            labels = ClassLabels(
                str(stage.image / "labels" / "classes"),
                axes,
                shape[0],
                cfg.threshold,
                cfg.ngff,
                writer.block_levels,
            )
            return stage, writer, labels, stage.done_blocks()
        # same key, other layout (another version's plan): nothing staged can be trusted
        stage, _ = area.open_stage(job.name, job.key, owner, fresh=True)
    writer = sink.create_image(*args, block, cfg.pyramid_min, staging=stage.image)
    labels = create_class_labels(
        stage.image,
        shape,
        axes,
        writer.chunks,
        shape[0],
        threshold=cfg.threshold,
        fmt=cfg.ngff,
        level_shapes=shapes[1 : writer.block_levels + 1],
    )
    area.sync(stage)  # on disk before any block records chunks in it
    return stage, writer, labels, set()


def _labels_match(stage: Stage, writer: sink.ImageWriter, shapes: list, cfg: RunConfig) -> bool:
    """The staged class labels have the levels this plan's blocks write (to continue)."""
    dtype, chunks = str(label_dtype(shapes[0][0])), (1, *writer.chunks[1:])
    return all(
        sink.level_matches(
            stage.image / "labels" / "classes" / str(k), (1, *shape[1:]), chunks, dtype
        )
        for k, shape in enumerate(shapes[: writer.block_levels + 1])
    )


def run_shared(prepared_job: InputJob, stage: Stage, job: BlockJob) -> dict:
    """First phase of a block (its shared tiles), unless its input is discarded."""
    if stage.is_discarded():
        return {}

    def attempt() -> dict:
        faults.point("shared", f"{prepared_job.name}/{job.index}")
        return predict_shared(job)

    with stage.attempt("shared", job.write):
        return retrying(attempt, what=f"{prepared_job.path} block {job.index}")


def run_block(
    prepared_job: InputJob, stage: Stage, job: BlockJob, *shared: dict
) -> BlockResult | None:
    """Second phase of a block: write its chunks, then record it done. None when the
    input is discarded (nothing written)."""
    if stage.is_discarded():
        return None
    _check_stamp(prepared_job)

    def attempt() -> BlockResult:
        faults.point("block", f"{prepared_job.name}/{job.index}")
        return process_block(job, *shared)

    try:
        with stage.attempt("block", job.write):
            result = retrying(attempt, what=f"{prepared_job.path} block {job.index}")
            faults.point("block-written", f"{prepared_job.name}/{job.index}")
            stage.mark_block_done(job.write)
    except OSError as exc:
        _raise_if_full(exc, prepared_job)
        raise
    return result


def finalize_input(prepared: Prepared, model: Model) -> dict[str, Any]:
    """Pyramid, metadata and labels of a staged image whose blocks are all written; the
    input checked unchanged; its GeoJSON and preview; the stage marked complete. Returns
    the stage's record (``products``: what :func:`~pipeline.batch.products.finish_products`
    made). For a refresh, only the products of the published image."""
    job, stage = prepared.job, prepared.stage
    faults.point("finalize", job.name)
    if job.refresh:
        made = _products(prepared, model, Path(job.out) / job.name, None)
        return {"key": job.key, "products": made, "refresh": True}
    if prepared.complete:
        _check_complete(prepared)
        info = prepared.info
        wanted = model.products.geojson_settings()
        if "products" not in info or (wanted and info["products"].get("geojson") != wanted):
            info = {**info, "products": _products(prepared, model, stage.image, None)}
            stage.mark_complete(info)
        return info
    missing = sorted(set(prepared.block_ids) - stage.done_blocks())
    if missing:
        raise InternalError(
            f"{len(missing)} blocks are not recorded as written (first: {missing[0]})",
            where=job.path,
            hint="rerun the same command; this is a bug if it happens again",
        )
    cfg = model.cfg
    writer = sink.ImageWriter(
        Path(job.out),
        job.name,
        stage.image,
        prepared.axes,
        prepared.chunks,
        cfg.dtype,
        cfg.ngff,
        prepared.block_levels,
    )
    try:
        with _synchronous():
            levels = sink.write_pyramid(writer, cfg.pyramid_min)
            names = cfg.class_names or model.spec.class_names
            sink.write_metadata(
                writer, levels, prepared.pixel_size, prepared.provenance, class_names=names
            )
            if prepared.tissue is not None:
                from pipeline.io.labels import write_tissue_labels

                write_tissue_labels(
                    stage.image,
                    prepared.tissue,
                    prepared.shape[1:],
                    prepared.axes,
                    prepared.pixel_size,
                    fmt=cfg.ngff,
                )
            if prepared.labels is not None:
                shapes = pyramid_shapes(prepared.shape, prepared.axes, cfg.pyramid_min)
                finish_class_labels(prepared.labels, shapes, prepared.pixel_size, names=names)
    except OSError as exc:
        _raise_if_full(exc, job)
        raise
    finally:
        forget_writers(stage.image)
    stage.remove_orphans()  # every block has ended: what a killed writer left is garbage
    try:  # the pixels read are the pixels the key was made from (not a mix)
        now = retrying(fingerprint, job.path, what=f"reading {job.path}")
    except OSError:
        raise _changed(job) from None  # gone, or unreadable, since the run began
    if (now.sample, now.stamp) != (job.sample, tuple(job.stamp)):
        raise _changed(job)
    info = {
        "key": job.key,
        "levels": levels,
        "shape": list(prepared.shape),
        "blocks": len(prepared.block_ids),
        "pixels": prepared.pixels,
        "tiles_run": prepared.run_tiles,
        "tiles_all": prepared.all_tiles,
        "tissue_fraction": None if prepared.tissue is None else round(prepared.tissue.fraction, 4),
        "products": _products(prepared, model, stage.image, prepared.block_ids),
    }
    try:  # complete means on disk: a power loss after publishing must not empty a file
        atomic.sync_tree(stage.image)
    except OSError as exc:
        _raise_if_full(exc, job)
        raise
    stage.mark_complete(info)
    return info


def _products(
    prepared: Prepared, model: Model, image: Path, blocks: tuple[str, ...] | None
) -> dict[str, Any]:
    """The GeoJSON and preview of ``image`` into the stage (see :mod:`pipeline.batch.products`)."""
    job = prepared.job
    classes = prepared.shape[0] if prepared.shape else _classes(image)
    try:
        with _synchronous():
            return finish_products(
                image,
                prepared.stage.dir,
                job.name,
                model.products,
                classes=classes,
                scale=prepared.scale,
                input_path=job.path,
                series=model.cfg.series,
                blocks=blocks,
            )
    except OSError as exc:
        _raise_if_full(exc, job)
        raise


def _classes(image: Path) -> int:
    import zarr

    return int(zarr.open_array(str(image / "0"), mode="r").shape[0])


def _check_complete(prepared: Prepared) -> None:
    """A stage an earlier run finished: still the same key, still an image of ours."""
    if (
        prepared.info.get("key") != prepared.job.key
        or published_key(prepared.stage.image) != prepared.job.key
    ):
        raise InternalError(
            "the staged image does not match its record",
            where=prepared.stage.dir,
            hint="rerun the same command: the stage is rebuilt",
        )


@contextlib.contextmanager
def _synchronous():
    """Dask work inside a task runs in this thread: a worker's single thread must not
    wait on tasks of its own cluster."""
    import dask

    with dask.config.set(scheduler="synchronous"):
        yield


def _check_stamp(job: InputJob) -> None:
    try:
        now = stamp(job.path)
    except OSError:
        return  # opening the input says what is wrong with the path
    if now != tuple(job.stamp):
        raise _changed(job)


def _changed(job: InputJob) -> InputChangedError:
    return InputChangedError(
        "changed on disk during the run",
        where=job.path,
        hint="do not modify inputs while a run reads them; the next run recomputes it",
    )


def _raise_if_full(exc: OSError, job: InputJob) -> None:
    """A full or read-only output is said as such (naming the folder and free space)."""
    if exc.errno in FULL_ERRNOS:
        raise output_error(exc, job.out) from exc
