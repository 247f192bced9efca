"""``pipeline run --cluster slurm`` on a real single-node Slurm (tests/slurm/cluster.sh):
workers are Slurm jobs configured through ``DASK_JOBQUEUE__SLURM__*``, outputs are
bit-identical to a local run, and no job is left in ``squeue`` afterwards, also after
Ctrl-C."""

from __future__ import annotations

import json
import signal
import time

import numpy as np
import pytest
from conftest import SMALL_RUN, image_files, run_process, write_tiff
from slurm import assert_no_jobs_left, job_name, jobs_named, slurm_cluster  # noqa: F401


@pytest.fixture(scope="module")
def slides_and_local(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    rng = np.random.default_rng(0)
    for name in ("s1", "s2", "s3"):
        image = rng.integers(0, 256, (150, 200), dtype=np.uint8)
        write_tiff(root / "in" / f"{name}.tif", image, tile=(32, 32), compression="zlib")
    local = root / "local.zarr"
    done = run_process("run", root / "in", "--out", local, "--workers", "2", *SMALL_RUN)
    assert done.returncode == 0, done.stderr
    return root / "in", image_files(local)


def slurm_env(tmp_path, name: str) -> dict:
    return {
        "DASK_JOBQUEUE__SLURM__CORES": "1",
        "DASK_JOBQUEUE__SLURM__MEMORY": "1GB",
        "DASK_JOBQUEUE__SLURM__WALLTIME": "00:10:00",
        "DASK_JOBQUEUE__SLURM__NAME": name,
        "DASK_JOBQUEUE__SLURM__LOG_DIRECTORY": str(tmp_path),
    }


@pytest.mark.usefixtures("slurm_cluster")
def test_slurm_run_equals_a_local_run_and_leaves_no_job(slides_and_local, tmp_path):
    folder, local = slides_and_local
    name = job_name()
    out = tmp_path / "out.zarr"
    done = run_process(
        "run", folder, "--out", out, "--cluster", "slurm", "--jobs", "2", *SMALL_RUN,
        env=slurm_env(tmp_path, name),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert image_files(out) == local
    report = json.loads((out / "report.json").read_text())
    assert {e["state"] for e in report["inputs"]} == {"done"}
    assert report["config"]["cluster"] == "slurm"
    assert_no_jobs_left(name)


@pytest.mark.usefixtures("slurm_cluster")
def test_ctrl_c_cancels_every_job_and_the_same_command_continues(slides_and_local, tmp_path):
    folder, local = slides_and_local
    name = job_name()
    out = tmp_path / "out.zarr"
    env = {**slurm_env(tmp_path, name), "PIPELINE_FAULTS": "block=sleep:0.5"}
    args = ("run", folder, "--out", out, "--cluster", "slurm", "--jobs", "2", *SMALL_RUN)
    driver = run_process(*args, env=env, wait=False)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if list((out / ".pipeline" / "staging").glob("*/blocks/*")) and jobs_named(name):
            break
        time.sleep(0.2)
    else:
        driver.kill()
        pytest.fail("no block was written on Slurm: " + driver.communicate()[1][-3000:])
    driver.send_signal(signal.SIGINT)
    _, stderr = driver.communicate(timeout=120)
    assert driver.returncode == 130, stderr
    assert "Traceback" not in stderr and "rerun the same command" in stderr
    assert_no_jobs_left(name)
    report = json.loads((out / "report.json").read_text())
    assert "interrupted" in {e["reason"] for e in report["inputs"]}

    again = run_process(*args, env=slurm_env(tmp_path, name))

    assert again.returncode == 0, again.stderr
    assert image_files(out) == local
    resumed = json.loads((out / "report.json").read_text())["inputs"]
    assert sum(e["resumed_blocks"] for e in resumed) > 0
    assert_no_jobs_left(name)
