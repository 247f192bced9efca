"""One run per output: lock files, shards side by side, stale locks taken over."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from pipeline.batch.lock import LockedError, OutputLock, holders, read_lock
from pipeline.batch.shard import Shard


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def plant(folder, name, **fields):
    folder.mkdir(parents=True, exist_ok=True)
    content = {"host": socket.gethostname(), "pid": os.getpid(), "run": "other", **fields}
    (folder / name).write_text(json.dumps(content))
    return folder / name


def test_second_run_refused_at_once_naming_the_holder(tmp_path):
    folder = tmp_path / "out.zarr" / ".pipeline" / "locks"
    with OutputLock(folder, "first"):
        t0 = time.monotonic()
        with pytest.raises(LockedError) as err:
            OutputLock(folder, "second").acquire()
        assert time.monotonic() - t0 < 2
        message = str(err.value)
        assert "out.zarr" in message and f"pid {os.getpid()}" in message
        assert socket.gethostname() in message and "started" in message and "first" in message
        assert err.value.reason == "output-locked"
    assert not list(folder.glob("*.lock"))  # released
    with OutputLock(folder, "third"):
        assert [h["run"] for h in holders(folder)] == ["third"]


def test_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path, caplog):
    folder = tmp_path / "locks"
    plant(folder, "run.lock", pid=dead_pid(), process_start=1.0)
    with caplog.at_level(logging.WARNING), OutputLock(folder, "mine"):
        assert read_lock(folder / "run.lock")["run"] == "mine"
    assert "taking over the lock" in caplog.text


def test_reused_pid_is_not_the_holder(tmp_path):
    folder = tmp_path / "locks"
    plant(folder, "run.lock", pid=os.getpid(), process_start=12345.0)  # started long ago
    with OutputLock(folder, "mine"):
        assert read_lock(folder / "run.lock")["run"] == "mine"


def test_other_host_lock_is_stale_only_without_heartbeat(tmp_path):
    folder = tmp_path / "locks"
    lock = plant(folder, "run.lock", host="node-elsewhere", pid=1)
    with pytest.raises(LockedError, match="node-elsewhere"):
        OutputLock(folder, "mine", stale_after=60).acquire()
    old = time.time() - 120
    os.utime(lock, (old, old))
    with OutputLock(folder, "mine", stale_after=60):
        assert read_lock(folder / "run.lock")["run"] == "mine"


def test_heartbeat_touches_the_lock_and_notices_a_takeover(tmp_path):
    folder = tmp_path / "locks"
    lock = OutputLock(folder, "mine", heartbeat=0.05)
    lock.acquire()
    try:
        old = time.time() - 1000
        os.utime(lock.path, (old, old))
        time.sleep(0.3)
        assert time.time() - lock.path.stat().st_mtime < 5
        plant(folder, "run.lock", run="thief")
        time.sleep(0.3)
        assert lock.lost
    finally:
        lock.release()
    assert read_lock(folder / "run.lock")["run"] == "thief"  # not removed: not ours


def test_shards_of_one_array_coexist_and_exclude_everything_else(tmp_path):
    folder = tmp_path / "locks"
    with OutputLock(folder, "a", Shard(1, 3)), OutputLock(folder, "b", Shard(2, 3)):
        assert sorted(h["file"] for h in holders(folder)) == [
            "shard-1-of-3.lock",
            "shard-2-of-3.lock",
        ]
        with pytest.raises(LockedError, match="shard 1/3"):
            OutputLock(folder, "whole").acquire()
        with pytest.raises(LockedError, match="run a"):
            OutputLock(folder, "again", Shard(1, 3)).acquire()
        with pytest.raises(LockedError):
            OutputLock(folder, "other-array", Shard(1, 4)).acquire()
    with OutputLock(folder, "whole"), pytest.raises(LockedError, match="run whole"):
        OutputLock(folder, "a", Shard(1, 3)).acquire()


RACE = """
import sys, time
from pipeline.batch.lock import OutputLock, LockedError
from pipeline.batch.shard import Shard
shard = None if sys.argv[2].startswith("whole") else Shard(1, 2)
start = float(sys.argv[3])
time.sleep(max(0.0, start - time.time()))
try:
    with OutputLock(sys.argv[1], sys.argv[2]):
        time.sleep(1.5)
    print("held")
except LockedError:
    print("refused")
"""


@pytest.mark.parametrize("second", ["whole", "shard"])
def test_two_processes_starting_together_one_wins(tmp_path, second):
    start = str(time.time() + 1.0)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, str(tmp_path / "locks"), f"{who}-{i}", start],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i, who in enumerate(("whole", second))
    ]
    results = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert results == ["held", "refused"]


def test_a_run_whose_lock_was_taken_over_starts_no_further_input(tmp_path):
    from pipeline.batch.batch import Batch
    from pipeline.batch.ledger import Ledger, init_state_dir
    from pipeline.batch.tasks import InputJob
    from pipeline.core.report import InputResult, RunReport
    from pipeline.errors import OutputLockedError

    out = tmp_path / "out.zarr"
    init_state_dir(out)
    job = InputJob(str(tmp_path / "a.tif"), "a", str(out), "k" * 64, "", (0, 0), "mine")
    batch = Batch(
        out, None, Ledger(out).load(), RunReport(run="mine"), {job.path: InputResult(job.path, "a")}
    )
    batch.lock = OutputLock(out / ".pipeline" / "locks", "mine", heartbeat=0.05)
    batch.lock.acquire()
    try:
        plant(batch.lock.folder, "run.lock", run="thief")
        time.sleep(0.3)
        with pytest.raises(OutputLockedError, match="took over this run's lock"):
            batch.prepare(job)
    finally:
        batch.lock.release()
