"""Reading, computing and writing overlap: with a model, a reader and a writer that
each sleep, blocks take about as long as the slowest stage, not the sum of the three;
the device section still runs one block at a time."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest
import torch  # noqa: F401  (imported before the clock starts: the blocks' device code uses it)

from pipeline.backends.identity import IdentityBackend, identity_spec
from pipeline.config import RunConfig
from pipeline.engine import stages
from pipeline.engine.blocks import make_tasks
from pipeline.engine.plan import make_plan
from pipeline.engine.stages import BackendRef
from pipeline.predict import run_blocks, run_local

STAGE_S = 0.15
BLOCKS = 6


class Clock:
    """Intervals (stage, block, start, end) recorded from every thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: list[tuple[str, int, float, float]] = []

    def sleep(self, stage: str, block: int) -> None:
        t0 = time.perf_counter()
        time.sleep(STAGE_S)
        with self.lock:
            self.spans.append((stage, block, t0, time.perf_counter()))

    def of(self, stage: str) -> list[tuple[int, float, float]]:
        return [(b, s, e) for name, b, s, e in self.spans if name == stage]


#: What the slow parts report to (module state: Dask pickles the jobs, even in-process).
RUN: dict = {}


class SlowImage:
    """An in-memory image whose reads take STAGE_S (a slow disk or decoder)."""

    def __init__(self, data: np.ndarray) -> None:
        self.data = data
        self.shape, self.dtype, self.ndim = data.shape, data.dtype, data.ndim

    def __getitem__(self, key):
        RUN["clock"].sleep("read", -1)
        return self.data[key]


class SleepyModel(IdentityBackend):
    """The identity model, taking STAGE_S per batch (a slow network)."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(identity_spec({"ndim": 2}))
        self.clock = clock

    def run_tensor(self, batch):
        self.clock.sleep("predict", -1)
        return super().run_tensor(batch)


class SlowOutput:
    """A per-block output that takes STAGE_S to write (a slow codec or filesystem)."""

    def write(self, job, data: np.ndarray) -> None:
        RUN["clock"].sleep("write", job.index)
        RUN["got"][job.index] = data


def _tasks():
    clock = RUN["clock"] = Clock()
    RUN["got"] = {}
    image = np.random.default_rng(0).integers(0, 256, (1, 64, 64 * BLOCKS), dtype=np.uint8)
    cfg = RunConfig(backend="identity", tile=(64,), overlap=0, blend="crop", block=64, chunk=64)
    spec = identity_spec({"ndim": 2})
    plan = make_plan(spec, image.shape[1:], 1, 1, cfg)
    ref = BackendRef("sleepy-model", "identity", overrides=(("ndim", 2),))
    stages._BACKENDS[ref] = SleepyModel(clock)  # the per-process model cache
    tasks = make_tasks(plan, SlowImage(image), ref, spec, 1, cfg, None)
    assert len(tasks) == BLOCKS and not any(t.needs for t in tasks)  # one read, one batch each
    out = SlowOutput()
    return image, [
        dataclasses.replace(t, job=dataclasses.replace(t.job, outputs=(out,))) for t in tasks
    ]


def _check(image: np.ndarray, wall: float) -> None:
    clock, got = RUN["clock"], RUN["got"]
    assert len(clock.of("read")) == len(clock.of("predict")) == len(clock.of("write")) == BLOCKS
    serial = 3 * BLOCKS * STAGE_S
    # the slowest stage alone takes BLOCKS * STAGE_S; the other two add one step each
    assert wall < 0.6 * serial, f"{wall:.2f} s for stages that sum to {serial:.2f} s"
    predicts = sorted(clock.of("predict"), key=lambda s: s[1])
    for (_, _, end), (_, start, _) in zip(predicts, predicts[1:]):
        assert start >= end - 1e-3  # the device section: one block at a time
    reads = clock.of("read")
    assert any(s < pe and ps < e for _, s, e in reads for _, ps, pe in predicts)
    merged = np.concatenate([got[i] for i in range(BLOCKS)], axis=2)
    np.testing.assert_array_equal(merged, image)


def test_in_process_blocks_overlap_read_compute_write():
    image, tasks = _tasks()
    t0 = time.perf_counter()
    results = list(run_local(tasks))
    wall = time.perf_counter() - t0
    assert [r.index for r in results] == list(range(BLOCKS))  # in order
    _check(image, wall)


@pytest.mark.slow
def test_dask_worker_threads_overlap_read_compute_write():
    from distributed import Client, LocalCluster

    from pipeline.engine.stages import BLOCK_THREADS

    image, tasks = _tasks()
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=BLOCK_THREADS,
            processes=False,  # the sleepy model lives in this process's cache
            dashboard_address=":0",
        ) as cluster,
        Client(cluster) as client,
    ):
        t0 = time.perf_counter()
        run_blocks(tasks, client, lambda done, total: None)
        wall = time.perf_counter() - t0
    _check(image, wall)
