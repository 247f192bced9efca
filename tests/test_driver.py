"""The driver: many inputs in flight on a real Dask cluster and in-process, failures that
drain before the input settles, a block that kills its worker every time."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field

import dask
import pytest

from pipeline.batch.driver import Driver, Step, SyncClient, describe_task
from pipeline.core.geometry import Region


@dataclass(frozen=True)
class Job:
    index: int
    write: Region
    own: tuple = ()


@dataclass(frozen=True)
class Task:
    job: Job
    needs: tuple[int, ...]
    done: bool = False


@dataclass(frozen=True)
class Prepared:
    name: str
    tasks: tuple[Task, ...]


def make_prepared(name: str, n: int, done: tuple[int, ...] = ()) -> Prepared:
    """n blocks in a row; block i owns shared tiles and needs itself and block i - 1."""
    tasks = tuple(
        Task(
            Job(i, Region((0, 64 * i), (64, 64)), own=("t",)), tuple({max(0, i - 1), i}), i in done
        )
        for i in range(n)
    )
    return Prepared(name, tasks)


def shared_fn(name: str, index: int, kill_on: str) -> dict:
    return {index: f"{name}:{index}"}


def block_fn(name: str, task: Task, kill_on: str, *shared: dict) -> tuple:
    if kill_on == f"{name}:{task.job.index}":
        os.kill(os.getpid(), signal.SIGKILL)
    if kill_on == f"raise:{name}:{task.job.index}":
        raise ValueError(f"bad block {task.job.index}")
    got = {k: v for part in shared for k, v in part.items()}
    assert set(got) == set(task.needs), (got, task.needs)  # every needed first phase arrived
    time.sleep(0.01)
    return name, task.job.index


@dataclass
class Work:
    blocks: int = 4
    done: dict = field(default_factory=dict)  # name -> blocks already done
    kill_on: str = ""
    log: list = field(default_factory=list)

    def name(self, item):
        return item

    def prepare(self, item):
        return Step(make_prepared, (item, self.blocks, self.done.get(item, ())))

    def shared(self, prepared, task):
        self.log.append(("shared", prepared.name, task.job.index))
        return Step(shared_fn, (prepared.name, task.job.index, self.kill_on))

    def block(self, prepared, task):
        return Step(block_fn, (prepared.name, task, self.kill_on))

    def finalize(self, item, prepared):
        return Step(str.upper, (item,))

    def prepared(self, item, prepared):
        self.log.append(("prepared", item))

    def block_done(self, item, result):
        self.log.append(("block", *result))

    def finished(self, item, prepared, value):
        self.log.append(("finished", item, value))

    def failed(self, item, exc, what):
        self.log.append(("failed", item, what, getattr(exc, "reason", type(exc).__name__)))

    def settled(self, item, prepared):
        self.log.append(("settled", item))

    def deaths(self, prepared, kind, task):
        return int(kind == "block" and self.kill_on == f"{prepared.name}:{task.job.index}")


def events(work, kind):
    return [e[1:] for e in work.log if e[0] == kind]


def test_in_process_runs_only_unfinished_blocks_with_the_shared_tiles_they_need():
    work = Work(blocks=4, done={"b": (0, 1, 2)})
    Driver(SyncClient(), work, max_open=1, max_queued=2).run(["a", "b"])
    assert events(work, "finished") == [("a", "A"), ("b", "B")]
    assert sorted(events(work, "block")) == [("a", i) for i in range(4)] + [("b", 3)]
    # b's block 3 needs the first phases of blocks 2 (done) and 3: run again, nothing else
    assert [e for e in events(work, "shared") if e[0] == "b"] == [("b", 2), ("b", 3)]


def test_threads_in_process_run_many_inputs_like_a_cluster():
    from pipeline.batch.driver import ThreadClient

    work = Work(blocks=5, done={"b": (0, 1)}, kill_on="raise:c:3")
    with ThreadClient(3) as client:
        Driver(client, work, max_open=3, max_queued=7).run(["a", "b", "c", "d"])
    assert sorted(events(work, "finished")) == [("a", "A"), ("b", "B"), ("d", "D")]
    assert len([e for e in events(work, "block") if e[0] == "b"]) == 3
    assert events(work, "failed") == [("c", "block 3 at y 0:64, x 192:256", "ValueError")]
    assert events(work, "settled") == [("c",)]


def test_fully_done_input_goes_straight_to_finishing():
    work = Work(blocks=3, done={"a": (0, 1, 2)})
    progress = []
    Driver(SyncClient(), work, progress=lambda *a: progress.append(a)).run(["a"])
    assert events(work, "finished") == [("a", "A")] and not events(work, "block")
    assert progress == [("a", 3, 3)]


def test_a_failing_block_fails_its_input_only_and_settles_after_draining():
    work = Work(blocks=4, kill_on="raise:b:1")
    Driver(SyncClient(), work, max_open=3, max_queued=8).run(["a", "b", "c"])
    assert events(work, "finished") == [("a", "A"), ("c", "C")]
    assert events(work, "failed") == [("b", "block 1 at y 0:64, x 64:128", "ValueError")]
    assert events(work, "settled") == [("b",)]


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    # one strike: a block that kills its worker fails at the first death
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        with (
            LocalCluster(
                n_workers=2,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
            ) as cluster,
            Client(cluster) as c,
        ):
            yield c


def test_many_inputs_in_flight_on_a_cluster(client):
    work = Work(blocks=5, done={"s3": (0, 1)})
    progress = []
    names = [f"s{i}" for i in range(6)]
    driver = Driver(client, work, max_open=3, max_queued=4, progress=lambda *a: progress.append(a))
    driver.run(names)
    assert sorted(events(work, "finished")) == [(n, n.upper()) for n in names]
    assert len(events(work, "block")) == 6 * 5 - 2
    assert ("s0", 5, 5) in progress and ("s3", 2, 5) in progress
    assert not driver.open_items()


def test_a_block_that_kills_its_worker_every_time_is_named(client):
    work = Work(blocks=3, kill_on="b:2")
    Driver(client, work, max_open=2, max_queued=4).run(["a", "b"])
    assert events(work, "finished") == [("a", "A")]
    assert events(work, "failed") == [("b", "block 2 at y 0:64, x 128:192", "worker-crash")]
    assert events(work, "settled") == [("b",)]


def test_describe_task_for_volumes():
    task = Task(Job(7, Region((0, 32, 64), (1, 32, 32))), ())
    assert describe_task(task) == "block 7 at y 32:64, x 64:96"
    task = Task(Job(8, Region((16, 32, 64), (16, 32, 32))), ())
    assert describe_task(task) == "block 8 at z 16:32, y 32:64, x 64:96"
