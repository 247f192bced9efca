"""Blocks run in this process on a few threads, the in-process twin of a Dask worker
with several threads.

Each block task reads its input, then computes under the per-device lock
(:func:`pipeline.engine.device_section.device_lock`), then writes; with ``threads`` tasks in flight,
one block computes while the next reads and the previous one writes. At most
``threads + 1`` block tasks are queued ahead of the oldest unfinished one, so memory
stays bounded by a few blocks, and results come back in order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from pipeline.engine.stages import BLOCK_THREADS

__all__ = ["run_in_threads"]


class TaskLike(Protocol):
    job: Any  # has .index and .own
    needs: tuple[int, ...]


def run_in_threads(
    tasks: Sequence[TaskLike],
    first: Callable[[Any], dict],
    second: Callable[..., Any],
    threads: int = BLOCK_THREADS,
) -> Iterator[Any]:
    """Run ``first(job)`` (blocks that own shared tiles) and ``second(job, *shared)`` for
    every task, yielding ``second``'s results in task order.

    A task's ``needs`` are earlier tasks' indices; their ``first`` results are passed to
    its ``second``, and dropped after their last user. Tasks are submitted in order to a
    first-in first-out pool, so a task that waits for a shared result only ever waits for
    one that started before it: no deadlock whatever ``threads`` is.
    """
    if threads <= 1:
        yield from _serial(tasks, first, second)
        return
    last_user = {j: t.job.index for t in tasks for j in t.needs}
    shared: dict[int, Future] = {}
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(threads, thread_name_prefix="block") as pool:
        try:
            for task in tasks:
                job = task.job
                if job.own:
                    shared[job.index] = pool.submit(first, job)
                needs = [shared[i] for i in task.needs]
                pending.append(pool.submit(_second, second, job, needs))
                for i in [i for i in shared if last_user.get(i, -1) <= job.index]:
                    del shared[i]  # the pending task holds it until it has run
                while len(pending) > threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BaseException:
            for f in [*pending, *shared.values()]:
                f.cancel()
            raise


def _second(second: Callable[..., Any], job: Any, needs: list[Future]) -> Any:
    return second(job, *(f.result() for f in needs))


def _serial(
    tasks: Sequence[TaskLike], first: Callable[[Any], dict], second: Callable[..., Any]
) -> Iterator[Any]:
    last_user = {j: t.job.index for t in tasks for j in t.needs}
    shared: dict[int, dict] = {}
    for task in tasks:
        job = task.job
        shared[job.index] = first(job) if job.own else {}
        yield second(job, *(shared[i] for i in task.needs))
        for i in [i for i in shared if last_user.get(i, -1) <= job.index]:
            del shared[i]
