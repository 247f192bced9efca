"""The block tasks of one input: its tissue mask, one task per block, its provenance.

:func:`make_tasks` turns a per-image :class:`~pipeline.engine.plan.Plan` into
:class:`~pipeline.engine.stages.BlockJob` s (coordinates and references, never pixels), each with
the blocks whose shared tiles it needs; :mod:`pipeline.batch.tasks` runs them on workers with
staging and resume, :func:`pipeline.predict.run_blocks` without them (the same driver).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline import __version__
from pipeline.backends.base import ModelSpec
from pipeline.config import RunConfig
from pipeline.core.tissue_mask import TissueMask
from pipeline.engine.plan import Plan
from pipeline.engine.stages import (
    BackendRef,
    BlockJob,
    BlockOutput,
    Source,
)

if TYPE_CHECKING:
    from pipeline.io.model_input import ModelInput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    """A block's job, the blocks whose shared tiles it needs (order numbers), and whether
    an earlier attempt already wrote it."""

    job: BlockJob
    needs: tuple[int, ...]
    done: bool = False


def find_tissue(inp: ModelInput, shape: tuple[int, ...], cfg: RunConfig) -> TissueMask | None:
    """The tissue mask for one input: the user's (``--mask``, applied to every input),
    detected on a low-resolution level read as the model reads the input (2D images), or
    None (volumes; ``--no-skip-background``)."""
    from pipeline.engine.tissue import detect_tissue, load_user_mask

    if cfg.mask:
        return load_user_mask(cfg.mask, shape)
    if not cfg.skip_background:
        return None
    if inp.spatial_axes != "yx":
        log.info("%s: tissue detection is for 2D images; running the whole volume", inp.ref.path)
        return None
    return detect_tissue(inp, shape, pixel_size=inp.pixel_size or None)


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
    outputs: tuple[BlockOutput, ...] = (),
) -> list[Task]:
    """One task per block, in raster order; a block only needs blocks before it.

    With a tissue mask, each job carries the mask around its block, and blocks where no
    tile has tissue are left out: their chunks stay unwritten (background, not stored).
    ``levels``: the pyramid levels (1, 2...) blocks write from memory; ``outputs``: what
    else each block writes from its pixels (class labels, polygons:
    :class:`pipeline.batch.products.BlockProducts`).
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
            outputs=outputs,
        )
        if crop is not None and not any(job.runs(t) for t in touching):
            continue
        tasks.append(Task(job, tuple(sorted(number[o] for o in owners))))
    kept = {t.job.index for t in tasks}
    return [Task(t.job, tuple(i for i in t.needs if i in kept)) for t in tasks]


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


def block_tiles(task: Task, by_index: dict[int, Task]) -> int:
    """Tiles a block task runs through the model, as its result counts them
    (:attr:`~pipeline.engine.stages.BlockResult.tiles`): its own shared tiles, and its tiles that
    no block it needs computes for it (``by_index``: the input's tasks by order number)."""
    job = task.job
    shared = {t for j in task.needs if j in by_index for t in by_index[j].job.own}
    local = sum(1 for t in job.tiles if t not in shared and job.runs(t))
    return local + sum(1 for t in job.own if job.runs(t))
