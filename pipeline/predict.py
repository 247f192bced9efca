"""Blocks run without staging, ledger or output: :func:`predict_array` (an array in
memory, for notebooks, debugging and tests) and :func:`run_blocks` (bare block tasks, for
tests and benchmarks).

The blocks go through the same driver as :func:`pipeline.run.run` (with this process's
block threads, or a given Dask client), so a block is read, computed and blended exactly
as in a run; only what surrounds an input (staging, the pyramid, products, reports) is
left out.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

from pipeline.backends.base import ModelSpec
from pipeline.batch.driver import Driver, Step, ThreadClient
from pipeline.config import RunConfig
from pipeline.engine.blocks import make_tasks
from pipeline.engine.plan import make_plan
from pipeline.engine.stages import BLOCK_THREADS, BlockResult, predict_shared, process_block
from pipeline.run import backend_ref, resolve_model

__all__ = ["predict_array", "run_blocks", "run_local"]


def run_blocks(
    tasks: list,
    client,
    progress: Callable[[int, int], None] | None = None,
    *,
    on_result: Callable[[BlockResult], None] | None = None,
) -> int:
    """Run bare block tasks (no staging, no ledger: :func:`predict_array`, tests and
    benchmarks) on ``client`` (a ``distributed.Client``; None: this process's block
    threads) through the same driver as :func:`pipeline.run.run`. ``on_result`` gets each block's
    result as it arrives (with its pixels when the task writes no sink). Returns the
    tiles run."""
    work = _Blocks(progress or (lambda done, total: None), on_result)
    prepared = _Prepared([dataclasses.replace(t, done=False) for t in tasks])
    with contextlib.ExitStack() as stack:
        if client is None:
            client, slots = stack.enter_context(ThreadClient(BLOCK_THREADS)), BLOCK_THREADS
        else:
            slots = max(1, sum(client.nthreads().values()))
        Driver(client, work, max_open=1, max_queued=2 * slots + 1).run([None], {0: prepared})
    if work.error is not None:
        raise work.error
    return work.tiles


def run_local(tasks: list) -> list[BlockResult]:
    """:func:`run_blocks` in this process; the results in task order."""
    results: list[BlockResult] = []
    run_blocks(tasks, None, on_result=results.append)
    return sorted(results, key=lambda r: r.index)


@dataclasses.dataclass
class _Prepared:
    tasks: list


class _Blocks:
    """The driver's :class:`~pipeline.batch.driver.Work` for a bare list of block tasks."""

    def __init__(
        self,
        progress: Callable[[int, int], None],
        on_result: Callable[[BlockResult], None] | None = None,
    ) -> None:
        self.progress, self.on_result = progress, on_result
        self.tiles, self.done, self.total, self.error = 0, 0, 0, None

    def name(self, item) -> str:
        return "blocks"

    def shared(self, prepared, task) -> Step:
        return Step(predict_shared, (task.job,))

    def block(self, prepared, task) -> Step:
        return Step(process_block, (task.job,))

    def finalize(self, item, prepared) -> Step:
        return Step(len, ((),))

    def prepared(self, item, prepared) -> None:
        self.total = len(prepared.tasks)
        self.progress(0, self.total)

    def block_done(self, item, result) -> None:
        self.tiles += result.tiles
        self.done += 1
        if self.on_result is not None:
            self.on_result(result)
        self.progress(self.done, self.total)

    def failed(self, item, exc, what) -> None:
        self.error = exc

    def deaths(self, prepared, kind, task) -> int:
        return 0

    def finished(self, item, prepared, value) -> None:
        pass

    def settled(self, item, prepared) -> None:
        pass

    def prepare(self, item) -> Step:  # pragma: no cover - the tasks come prepared
        raise AssertionError("bare block tasks are prepared already")


def predict_array(
    array, model: str | None = None, cfg: RunConfig | None = None, *, spec: ModelSpec | None = None
):
    """In-process prediction of an array ``(C, *spatial)`` (numpy or dask).

    Same lattice, blocks and blending as :func:`pipeline.run.run`, without Dask or Zarr: for
    debugging, tests and notebooks. Returns ``(K, *spatial)`` in ``cfg.dtype``.
    """
    import numpy as np

    cfg = cfg or RunConfig()
    spec = spec or resolve_model(model, cfg)
    channels = int(array.shape[0])
    classes = spec.classes or channels
    plan = make_plan(
        spec, tuple(int(s) for s in array.shape[1:]), channels, classes, cfg, array.dtype.itemsize
    )
    ref = backend_ref(spec, cfg)
    out = np.zeros((classes, *array.shape[1:]), dtype=cfg.dtype)

    def keep(result: BlockResult) -> None:
        out[(slice(None), *result.region.to_slices())] = result.data

    run_blocks(make_tasks(plan, array, ref, spec, classes, cfg, None), None, on_result=keep)
    return out
