"""Many inputs in flight: the driver keeps every worker busy with blocks of several inputs.

Each input goes through four steps. The first three run as tasks on workers, the last
in the driver:

1. **prepare** — open the input, plan it, detect tissue, open (or continue) its staging;
2. **blocks** — the first phase (shared tiles of owner blocks) and the second (each
   block), for the blocks not yet recorded as done; an owner block already done still
   runs its first phase when a block still to run needs its shared tiles;
3. **finalize** — pyramid, metadata, labels, verification;
4. **publish** — :meth:`Work.finished`, in the driver, as soon as that input is finalised.

At most ``max_open`` inputs are open at once and at most ``max_queued`` block tasks are
submitted and unfinished; blocks are taken from the earliest open input first, so inputs
finish in order and early, and shared first-phase results live briefly. The driver never
fetches pixels: first-phase results go from worker to worker.

A failed input stops submitting; its tasks already submitted drain (they check that their
staging is discarded and return at once) and :meth:`Work.settled` is called when none is
left running, so its staging can be deleted without a late task recreating it. A block
that kills its worker on every attempt (Dask's ``KilledWorker``, after
``distributed.scheduler.allowed-failures`` deaths while it ran, told by the attempt marks
of :meth:`Work.deaths`) fails its input as ``worker-crash`` naming the block; other tasks
struck by those deaths (assigned to a dying worker, or depending on a task that was) are
submitted again.

The same loop runs in-process: with :class:`SyncClient` (``scheduler="sync"``) each task
runs when it is submitted; with :class:`ThreadClient` (one input on a one-worker layout)
tasks run on a few threads of this process.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline.errors import WorkerCrashError

log = logging.getLogger(__name__)

#: Priority of prepare and finalize tasks: ahead of every block, so the next input is
#: planned while blocks run and a finished input is published without waiting.
URGENT = 1 << 30


@dataclass(frozen=True)
class Step:
    """A task for a worker: ``fn(*args)``."""

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()


class Work(Protocol):
    """What the steps of an input are and what happens when they end (see run.py)."""

    def name(self, item: Any) -> str: ...
    def prepare(self, item: Any) -> Step: ...
    def shared(self, prepared: Any, task: Any) -> Step: ...
    def block(self, prepared: Any, task: Any) -> Step: ...  # the shared results are appended
    def finalize(self, item: Any, prepared: Any) -> Step: ...
    def prepared(self, item: Any, prepared: Any) -> None: ...
    def block_done(self, item: Any, result: Any) -> None: ...
    def finished(self, item: Any, prepared: Any, value: Any) -> None: ...
    def failed(self, item: Any, exc: BaseException, what: str) -> None: ...
    def deaths(self, prepared: Any, kind: str, task: Any) -> int: ...  # see Stage.deaths
    def settled(self, item: Any, prepared: Any) -> None: ...


@dataclass
class _Input:
    item: Any
    prepared: Any = None
    failed: bool = False
    closed: bool = False
    pending: collections.deque = field(default_factory=collections.deque)  # tasks to submit
    firsts: dict[int, Any] = field(default_factory=dict)  # first-phase futures still needed
    last_user: dict[int, int] = field(default_factory=dict)
    owners: set[int] = field(default_factory=set)  # first phases that must run
    by_index: dict[int, Any] = field(default_factory=dict)
    retried: list[tuple[str, int]] = field(default_factory=list)  # resubmitted (KilledWorker)
    replaced: dict = field(default_factory=dict)  # first-phase future -> its resubmission
    running: set = field(default_factory=set)  # this input's unfinished futures
    done: int = 0
    total: int = 0
    finalizing: bool = False


class Driver:
    """Runs the steps of many inputs on ``client`` (a ``distributed.Client`` or a
    :class:`SyncClient`); see the module docstring."""

    def __init__(
        self,
        client: Any,
        work: Work,
        *,
        max_open: int = 2,
        max_queued: int = 4,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> None:
        self.client, self.work = client, work
        self.max_open, self.max_queued = max(1, max_open), max(1, max_queued)
        self.progress = progress
        self.inputs: list[_Input] = []
        self.meta: dict[Any, tuple[_Input, str, Any]] = {}  # future -> (input, kind, task)
        self.queued = 0
        self.seq = 0
        self.completion: Any = None

    def open_items(self) -> list[Any]:
        """Inputs started and not yet finished or settled (for an interrupted run)."""
        return [i.item for i in self.inputs if not i.closed]

    def run(self, items: Sequence[Any], ready: dict[int, Any] | None = None) -> None:
        """Run every item to its end; ``ready``: items (by position) prepared already."""
        ready = ready or {}
        todo = collections.deque(enumerate(items))
        self.completion = _completion(self.client)
        try:
            while True:
                while todo and sum(not i.closed for i in self.inputs) < self.max_open:
                    position, item = todo.popleft()
                    self._open(item, ready.get(position))
                self._fill()
                if not self.meta:
                    if todo:
                        continue
                    return
                self._handle(next(self.completion))
        except BaseException:
            if self.meta and not isinstance(self.client, SyncClient):
                self.client.cancel(list(self.meta))
            raise

    # --- submitting ---------------------------------------------------------------------

    def _submit(self, inp: _Input, kind: str, step: Step, task: Any = None, deps=()) -> Any:
        priority = URGENT if kind in ("prepare", "finalize") else -self.seq
        self.seq += 1
        fut = self.client.submit(step.fn, *step.args, *deps, pure=False, priority=priority)
        self.meta[fut] = (inp, kind, task, step, tuple(deps))
        inp.running.add(fut)
        self.completion.add(fut)
        return fut

    def _open(self, item: Any, prepared: Any) -> None:
        inp = _Input(item)
        self.inputs.append(inp)
        try:
            if prepared is not None:
                self._prepared(inp, prepared)
            else:
                self._submit(inp, "prepare", self.work.prepare(item))
        except Exception as exc:
            self._fail(inp, exc, "opening and planning")
            self._settle(inp)

    def _prepared(self, inp: _Input, prepared: Any) -> None:
        inp.prepared = prepared
        tasks = list(prepared.tasks)
        inp.by_index = {t.job.index: t for t in tasks}
        todo = [t for t in tasks if not t.done]
        inp.total, inp.done = len(tasks), len(tasks) - len(todo)
        with_own = {t.job.index for t in tasks if t.job.own}
        inp.owners = {j for t in todo for j in t.needs if j in with_own}
        inp.last_user = {j: t.job.index for t in todo for j in t.needs}
        # a first phase runs just before the first block that needs it is submitted
        inp.pending = collections.deque(todo)
        self.work.prepared(inp.item, prepared)
        self._progress(inp)
        if not todo:
            self._finalize(inp)

    def _fill(self) -> None:
        for inp in self.inputs:
            while inp.pending and not inp.failed and self.queued < self.max_queued:
                self._submit_block(inp, inp.pending.popleft())
            if self.queued >= self.max_queued:
                return

    def _submit_block(self, inp: _Input, task: Any) -> None:
        for j in task.needs:
            if j in inp.owners and j not in inp.firsts:
                owner = inp.by_index[j]
                inp.firsts[j] = self._submit(
                    inp, "shared", self.work.shared(inp.prepared, owner), owner
                )
        deps = [inp.firsts[j] for j in task.needs if j in inp.firsts]
        self._submit(inp, "block", self.work.block(inp.prepared, task), task, deps)
        self.queued += 1
        for j in task.needs:
            if inp.last_user.get(j) == task.job.index:
                inp.firsts.pop(j, None)  # the scheduler keeps it until its users are done

    def _finalize(self, inp: _Input) -> None:
        inp.finalizing = True
        self._submit(inp, "finalize", self.work.finalize(inp.item, inp.prepared))

    # --- results -------------------------------------------------------------------------

    def _handle(self, fut: Any) -> None:
        inp, kind, task, step, deps = self.meta.pop(fut)
        inp.running.discard(fut)
        if kind == "block":
            self.queued -= 1
        error = _error(fut)
        if error is not None and not inp.failed and _killed(error):
            if self._resubmit(inp, fut, kind, task, step, deps):
                return
        if not inp.failed:
            if error is not None:
                self._fail(inp, self._explain(inp, error, kind, task), _what(kind, task))
            else:
                self._advance(inp, kind, fut)
        self._settle(inp)

    def _resubmit(self, inp: _Input, fut: Any, kind: str, task: Any, step: Step, deps) -> bool:
        """A dying worker also strikes the tasks assigned to it that were not running, and
        the tasks depending on those: a task that was not itself running at its workers'
        deaths is submitted again (a few times), on the new first phases it needs. Opening
        and finishing an input have no attempt marks: they are submitted again a few times."""
        key = (kind, -1 if task is None else task.job.index)
        if task is not None and self.work.deaths(inp.prepared, kind, task) >= _culprit_deaths():
            return False
        if inp.retried.count(key) >= _RESUBMIT:
            return False
        inp.retried.append(key)
        deps = tuple(_latest(inp.replaced, d) for d in deps)
        new = self._submit(inp, kind, step, task, deps)
        if kind == "block":
            self.queued += 1
        elif kind == "shared":
            inp.replaced[fut] = new
        return True

    def _explain(self, inp: _Input, error: BaseException, kind: str, task: Any) -> BaseException:
        """Dask's ``KilledWorker`` names a task key; say which block died, and why it
        matters. On a worker with several block threads the blocks that ran beside the
        culprit at every death cannot be told from it: all of them are named."""
        if not _killed(error):
            return error
        what = _what(kind, task)
        if task is not None:
            threshold = _culprit_deaths()
            beside = [
                t
                for t in inp.prepared.tasks
                if t is not task
                and any(
                    self.work.deaths(inp.prepared, k, t) >= threshold for k in ("block", "shared")
                )
            ]
            if beside:
                others = "; ".join(describe_task(t) for t in beside[:3])
                what = f"{what} (or {others}, which ran on the same worker each time it died)"
        return WorkerCrashError(
            f"{what} killed its worker on every attempt (the worker process died: out of "
            "memory, a crash in the model runtime, or killed from outside)",
            hint="lower --block or memory_budget_mb, or check the worker logs; "
            "the input's other blocks are kept for a rerun",
        )

    def _settle(self, inp: _Input) -> None:
        if inp.failed and not inp.running and not inp.closed:
            inp.closed = True
            self.work.settled(inp.item, inp.prepared)

    def _advance(self, inp: _Input, kind: str, fut: Any) -> None:
        try:
            if kind == "prepare":
                self._prepared(inp, fut.result())
            elif kind == "block":
                self.work.block_done(inp.item, fut.result())
                inp.done += 1
                self._progress(inp)
                if inp.done == inp.total and not inp.finalizing:
                    self._finalize(inp)
            elif kind == "finalize":
                self.work.finished(inp.item, inp.prepared, fut.result())
                inp.closed = True
        except Exception as exc:  # publishing or recording failed: that input fails
            self._fail(inp, exc, "finishing" if kind == "finalize" else kind)

    def _fail(self, inp: _Input, exc: BaseException, what: str) -> None:
        inp.failed = True
        inp.pending.clear()
        inp.firsts.clear()
        self.work.failed(inp.item, exc, what)

    def _progress(self, inp: _Input) -> None:
        if self.progress is not None:
            self.progress(self.work.name(inp.item), inp.done, inp.total)


def _latest(replaced: dict, fut: Any) -> Any:
    while fut in replaced:
        fut = replaced[fut]
    return fut


def _what(kind: str, task: Any) -> str:
    if task is not None:
        return describe_task(task)
    return {"prepare": "opening and planning", "finalize": "finishing"}.get(kind, kind)


def describe_task(task: Any) -> str:
    """``block 5 at y 512:1024, x 0:512``."""
    region = task.job.write
    axes = "zyx"[3 - len(region.shape) :]
    spans = ", ".join(
        f"{a} {o}:{o + s}"
        for a, o, s in zip(axes, region.offset, region.shape)
        if s > 1 or a != "z"
    )
    return f"block {task.job.index} at {spans}"


#: Resubmissions of a block struck by others' worker deaths (its own deaths decide).
_RESUBMIT = 3


def _culprit_deaths() -> int:
    """Deaths while running it that make a block the culprit: every strike Dask allowed
    (``allowed-failures`` + 1). A block that merely ran beside the culprit on a worker
    with several threads dies with it only now and then."""
    import dask

    return max(1, int(dask.config.get("distributed.scheduler.allowed-failures", 3)) + 1)


def _killed(error: BaseException) -> bool:
    """True for Dask's ``KilledWorker``: the task's workers died on every attempt."""
    try:
        from distributed import KilledWorker
    except ImportError:  # pragma: no cover - distributed is a dependency
        return False
    return isinstance(error, KilledWorker)


class SyncFuture:
    """A task run at once in this process (the in-process path)."""

    def __init__(self, fn: Callable[..., Any], args: Sequence[Any]) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        try:
            values = [a.result() if isinstance(a, SyncFuture) else a for a in args]
            self.value = fn(*values)
        except Exception as exc:  # kept for the driver, as a Dask future would
            self.error = exc
        self.status = "finished" if self.error is None else "error"

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value

    def exception(self) -> BaseException | None:
        return self.error


class SyncClient:
    """The part of ``distributed.Client`` the driver uses, running tasks in-process."""

    def submit(self, fn: Callable[..., Any], *args: Any, **options: Any) -> SyncFuture:
        return SyncFuture(fn, args)

    def cancel(self, futures: Sequence[Any]) -> None:
        pass


class ThreadClient:
    """The part of ``distributed.Client`` the driver uses, running tasks in this process on
    ``threads`` threads: the in-process twin of a worker with several block threads (one
    block computes while the next reads and the previous one writes).

    Tasks start in the order they are submitted (first in, first out), and the driver
    submits a block's first-phase dependencies before the block, so a task that waits for
    another only ever waits for one that started before it: no deadlock.
    """

    def __init__(self, threads: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="block")

    def submit(self, fn: Callable[..., Any], *args: Any, **options: Any) -> Any:
        return self.pool.submit(_call_resolved, fn, args)

    def cancel(self, futures: Sequence[Any]) -> None:
        for fut in futures:
            fut.cancel()

    def __enter__(self) -> ThreadClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _call_resolved(fn: Callable[..., Any], args: Sequence[Any]) -> Any:
    from concurrent.futures import Future

    return fn(*(a.result() if isinstance(a, Future) else a for a in args))


class _ThreadCompletion:
    def __init__(self) -> None:
        import queue

        self.done: queue.SimpleQueue = queue.SimpleQueue()

    def add(self, fut: Any) -> None:
        fut.add_done_callback(self.done.put)

    def __next__(self) -> Any:
        return self.done.get()


def _error(fut: Any) -> BaseException | None:
    """The exception a finished future holds, or None (Dask's, in-process and threads')."""
    status = getattr(fut, "status", None)
    if status is not None:  # distributed.Future, SyncFuture
        return fut.exception() if status != "finished" else None
    return fut.exception()  # concurrent.futures.Future, done


class _SyncCompletion:
    def __init__(self) -> None:
        self.done: collections.deque = collections.deque()

    def add(self, fut: SyncFuture) -> None:
        self.done.append(fut)

    def __next__(self) -> SyncFuture:
        return self.done.popleft()


def _completion(client: Any) -> Any:
    if isinstance(client, SyncClient):
        return _SyncCompletion()
    if isinstance(client, ThreadClient):
        return _ThreadCompletion()
    from distributed import as_completed

    return as_completed()
