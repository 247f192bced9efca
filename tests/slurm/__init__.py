"""A real single-node Slurm for the tests, and helpers to look at its queue.

``slurm_cluster`` (session fixture) starts the cluster with ``cluster.sh start`` unless it is
already up, waits until the node answers, sets ``SLURM_CONF`` for the session and stops at
the end only what it started. Without the Slurm packages the tests that use it are skipped,
except under CI (``CI`` set), where ``.ci/run`` installs them and their absence is a failure.
Other test modules can use it with ``from slurm import slurm_cluster``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("cluster.sh")
DRIVER = Path(__file__).with_name("driver.py")
SLURM_DIR = Path(os.environ.get("PIPELINE_SLURM_DIR", "/tmp/pipeline-slurm"))
CONF = SLURM_DIR / "slurm.conf"
UP_STATES = ("idle", "mixed", "allocated")


def _absent(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI: .ci/run installs Slurm, so this is a failure)")
    pytest.skip(message)


def _node_state() -> str:
    done = subprocess.run(
        ["sinfo", "--noheader", "--format=%T"], capture_output=True, text=True, timeout=30
    )
    return done.stdout.strip()


@pytest.fixture(scope="session")
def slurm_cluster():
    """Path of the ``slurm.conf`` of a running single-node Slurm (``SLURM_CONF`` is set)."""
    missing = [b for b in ("slurmctld", "slurmd", "munged", "sbatch") if not shutil.which(b)]
    if missing:
        _absent(
            f"Slurm is not installed ({', '.join(missing)} not found): "
            "apt-get install slurm-wlm munge"
        )
    env = {**os.environ, "SLURM_CONF": str(CONF)}
    started = False
    if subprocess.run([SCRIPT, "status"], capture_output=True, env=env).returncode != 0:
        if os.geteuid() != 0:
            _absent(
                f"the test Slurm is not running and only root can start it (sudo {SCRIPT} start)"
            )
        done = subprocess.run(
            [SCRIPT, "start"], capture_output=True, text=True, env=env, timeout=180
        )
        if done.returncode != 0:
            pytest.fail(f"could not start the test Slurm: {done.stderr.strip()}")
        started = True
    patch = pytest.MonkeyPatch()
    patch.setenv("SLURM_CONF", str(CONF))
    deadline = time.monotonic() + 60
    while not _node_state().startswith(UP_STATES):
        if time.monotonic() > deadline:
            pytest.fail(f"the test Slurm node is '{_node_state()}'; see {SLURM_DIR / 'log'}")
        time.sleep(0.5)
    try:
        yield CONF
    finally:
        patch.undo()
        if started:
            subprocess.run([SCRIPT, "stop"], capture_output=True, env=env, timeout=120)


def job_name() -> str:
    """A job name no other test (or engineer) uses, to find exactly our jobs in the queue."""
    return f"pt-{uuid.uuid4().hex[:10]}"


def jobs_named(name: str) -> dict[str, str]:
    """``{job id: state}`` of the queued, running or completing jobs called ``name``."""
    done = subprocess.run(
        ["squeue", "--noheader", f"--name={name}", "--format=%i %t"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return dict(line.split() for line in done.stdout.splitlines() if line.strip())


def assert_no_jobs_left(name: str, settle: float = 20.0) -> None:
    """No job called ``name`` still queued or running now, and none in ``squeue`` at all
    once the cancelled ones have finished ending (they show as ``CG`` for a few seconds)."""
    now = jobs_named(name)
    assert all(state == "CG" for state in now.values()), f"jobs left running: {now}"
    deadline = time.monotonic() + settle
    while now and time.monotonic() < deadline:
        time.sleep(0.5)
        now = jobs_named(name)
    assert not now, f"jobs still in squeue {settle:.0f} s after the cluster closed: {now}"
