"""Slurm through dask-jobqueue: settings, job scripts, and jobs on a real single-node Slurm.

The tests marked with the ``slurm_cluster`` fixture submit real jobs (tests/slurm/cluster.sh
starts the cluster; its node has two fake GPUs so GPU requests can be allocated).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import dask
import pytest
from distributed import as_completed
from slurm import DRIVER, assert_no_jobs_left, job_name, jobs_named, slurm_cluster  # noqa: F401

import pipeline
from pipeline.cluster.clients import cancel_leftovers, make_cluster, slurm_client
from pipeline.cluster.slurm import (
    SlurmSettings,
    gpu_for_worker,
    import_jobqueue,
    lifetime_for,
    walltime_seconds,
)
from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
# dask_jobqueue registers its defaults with dask.config when first imported; imported for the
# first time inside a dask.config.set() block, they would vanish when the block ends
import_jobqueue()


# -- settings ---------------------------------------------------------------------------


def test_unknown_key_is_named_with_the_known_ones():
    with pytest.raises(ConfigError) as info:
        SlurmSettings.from_mapping({"partition": "gpu", "queue": "gpu"})
    error = info.value
    assert error.where == "slurm.queue" and "unknown key 'queue'" in error.problem
    assert "did you mean 'partition'" in error.hint and "walltime" in error.hint
    with pytest.raises(ConfigError, match="did you mean 'walltime'"):
        SlurmSettings.from_mapping({"waltime": "01:00:00"})


@pytest.mark.parametrize(
    ("mapping", "where", "hint"),
    [
        ({"walltime": 3600}, "slurm.walltime", "quote it"),  # YAML's reading of 01:00:00
        ({"walltime": "two hours"}, "slurm.walltime", "HH:MM:SS"),
        ({"walltime": "1:75:00"}, "slurm.walltime", "HH:MM:SS"),
        ({"memory": "lots"}, "slurm.memory", "'4GB'"),
        ({"memory": 16}, "slurm.memory", "'4GB'"),
        ({"cores": 0}, "slurm.cores", "cores: 1"),
        ({"gpus": True}, "slurm.gpus", "gpus"),
        ({"gpu_directive": "gpu"}, "slurm.gpu_directive", "--gres=gpu:N"),
        ({"job_extra_directives": "--qos=high"}, "slurm.job_extra_directives", "list"),
        ({"job_extra_directives": ["#SBATCH --qos=high"]}, "slurm.job_extra_directives", "alone"),
        ({"gpus": 2, "processes": 4}, "slurm.processes", "leave processes out"),
        ({"gpus": 4, "cores": 2}, "slurm.cores", "at least one core"),
        ({"partition": ""}, "slurm.partition", "quote"),
    ],
)
def test_bad_values_are_config_errors_with_hints(mapping, where, hint):
    with pytest.raises(ConfigError) as info:
        SlurmSettings.from_mapping(mapping)
    assert info.value.where == where
    assert hint in info.value.hint


def test_settings_from_yaml_mapping():
    settings = SlurmSettings.from_mapping(
        {
            "partition": "gpu",
            "walltime": "1-00:00:00",
            "gpus": 2,
            "gpu-directive": "gpus",
            "job_extra_directives": ["--qos=high"],
        }
    )
    assert settings.gpus == 2 and settings.gpu_directive == "gpus"
    assert settings.job_extra_directives == ("--qos=high",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.gpus = 1


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 1800),
        ("30:15", 1815),
        ("02:00:00", 7200),
        ("1-00", 86400),
        ("1-02:30", 95400),
        ("2-00:00:10", 172810),
        ("UNLIMITED", 0),
        ("1:75:00", None),
        ("soon", None),
    ],
)
def test_walltime_seconds(text, seconds):
    assert walltime_seconds(text) == seconds


@pytest.mark.parametrize("walltime", [60, 600, 1800, 3600, 12 * 3600, 7 * 86400])
def test_lifetime_ends_every_worker_before_the_walltime(walltime):
    lifetime, stagger = lifetime_for(walltime)
    assert stagger > 0 and lifetime - stagger > walltime / 2
    # the latest a worker can end still leaves a margin to hand over its results
    assert walltime - (lifetime + stagger) >= min(300, walltime // 5)
    assert lifetime_for(0) is None


def test_gpu_for_worker():
    assert gpu_for_worker("PipelineSLURMCluster-3-0", "4,6") == "4"
    assert gpu_for_worker("PipelineSLURMCluster-3-1", "4,6") == "6"
    assert gpu_for_worker("PipelineSLURMCluster-3-2", "4,6") is None
    assert gpu_for_worker("PipelineSLURMCluster-3-0", "") is None


# -- job scripts (no Slurm needed) ------------------------------------------------------


def _script(settings: SlurmSettings, site: dict) -> str:
    # SLURMCluster reads the site's configuration whenever it builds a job script
    with dask.config.set({f"jobqueue.slurm.{k}": v for k, v in site.items()}):
        cluster = make_cluster(settings)
        try:
            return cluster.job_script()
        finally:
            cluster.close()


def test_job_script_takes_the_site_config_and_our_overrides(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    site = {
        "cores": 8,
        "memory": "32GB",
        "queue": "site-queue",
        "walltime": "04:00:00",
        "job-extra-directives": ["--qos=site"],
        "job-script-prologue": ["module load cuda"],
    }
    script = _script(
        SlurmSettings(partition="gpu", account="lab", gpus=2, job_extra_directives=("--x=1",)),
        site,
    )
    header = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH -p gpu" in header and "#SBATCH -p site-queue" not in header
    assert "#SBATCH -A lab" in header and "#SBATCH -t 04:00:00" in header
    assert "#SBATCH --cpus-per-task=8" in header and "#SBATCH --mem=30G" in header
    # the site's directives stay, ours and the GPU request are added
    assert header[-3:] == ["#SBATCH --qos=site", "#SBATCH --x=1", "#SBATCH --gres=gpu:2"]
    assert "module load cuda" in script and f"export PYTHONPATH={ROOT}" in script
    command = script.splitlines()[-1]
    assert command.startswith(f"{sys.executable} -m distributed.cli.dask_worker")
    # one worker process per GPU, the cores split among them, each pinned to its GPU
    assert "--nworkers 2" in command and "--nthreads 4" in command
    assert "--preload pipeline.cluster.slurm" in command and "export PIPELINE_PIN_GPU=1" in script
    # 4 h walltime: workers end between 3 h 45 and 3 h 55, never past the walltime
    assert "--lifetime 13800s --lifetime-stagger 300s" in command
    assert "--lifetime-restart" not in command


def test_job_script_gpus_directive_and_site_lifetime_kept():
    site = {"cores": 2, "memory": "4GB", "worker-extra-args": ["--lifetime", "50m"]}
    script = _script(SlurmSettings(gpus=1, gpu_directive="gpus", walltime="01:00:00"), site)
    assert "#SBATCH --gpus=1" in script and "--gres" not in script
    assert "--lifetime 50m" in script and "--lifetime-stagger" not in script
    # a single GPU per job needs no pinning: the job sees only its GPU
    assert "--preload" not in script and "--nworkers" not in script


def test_dashboard_on_loopback_and_missing_sizes_are_config_errors():
    with dask.config.set({"jobqueue.slurm.cores": 1, "jobqueue.slurm.memory": "1GB"}):
        cluster = make_cluster(SlurmSettings())
    try:
        assert cluster.scheduler.http_server.address == "127.0.0.1"
    finally:
        cluster.close()
    with pytest.raises(ConfigError) as info:
        make_cluster(SlurmSettings(memory="1GB"))
    assert "cores per Slurm job is not set" in info.value.problem
    assert "DASK_JOBQUEUE__SLURM__CORES" in info.value.hint


# -- on a real Slurm ----------------------------------------------------------------------


def _settings(tmp_path: Path, name: str, **more) -> SlurmSettings:
    return SlurmSettings(
        cores=1,
        memory="1GB",
        walltime="00:10:00",
        job_name=name,
        log_directory=str(tmp_path),
        **more,
    )


def _driver(tmp_path: Path, name: str, mode: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DASK_JOBQUEUE__SLURM__CORES": "1",
        "DASK_JOBQUEUE__SLURM__MEMORY": "1GB",
        "DASK_JOBQUEUE__SLURM__WALLTIME": "00:10:00",
        "DASK_JOBQUEUE__SLURM__NAME": name,
        "DASK_JOBQUEUE__SLURM__LOG_DIRECTORY": str(tmp_path),
        # jobs get none of the driver's environment: the job script must carry PYTHONPATH
        "DASK_JOBQUEUE__SLURM__JOB_EXTRA_DIRECTIVES": '["--export=NONE"]',
    }
    return subprocess.Popen(
        [sys.executable, str(DRIVER), mode, "2"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "driver.err").open("w"),
        text=True,
    )


@pytest.mark.usefixtures("slurm_cluster")
def test_jobs_from_env_config_run_tasks_and_leave_nothing(tmp_path):
    name = job_name()
    driver = _driver(tmp_path, name, "done")
    out, _ = driver.communicate(timeout=120)
    assert driver.returncode == 0, (tmp_path / "driver.err").read_text()
    report = json.loads(out.splitlines()[0])
    results, submitted = report["results"], set(report["submitted"])
    assert len(results) == 20
    jobs = {r["job"] for r in results}
    assert None not in jobs and jobs <= submitted and 1 <= len(submitted) <= 2
    assert {r["host"] for r in results} == {socket.gethostname()}
    # the jobs imported this tree's pipeline, not another installed copy
    assert {r["pipeline"] for r in results} == {pipeline.__file__}
    assert_no_jobs_left(name)


@pytest.mark.usefixtures("slurm_cluster")
def test_exception_inside_context_cancels_jobs(tmp_path):
    name = job_name()
    with pytest.raises(RuntimeError, match="boom"):
        with slurm_client(_settings(tmp_path, name), jobs=2) as client:
            client.gather(client.map(time.sleep, [0.5] * 4, pure=False))
            assert jobs_named(name), "no job of ours was running"
            raise RuntimeError("boom")
    assert_no_jobs_left(name)


@pytest.mark.usefixtures("slurm_cluster")
@pytest.mark.parametrize(
    ("sig", "codes"),
    [(signal.SIGINT, {-signal.SIGINT, 130}), (signal.SIGTERM, {128 + signal.SIGTERM})],
    ids=["ctrl-c", "sigterm"],
)
def test_interrupted_driver_cancels_jobs(tmp_path, sig, codes):
    name = job_name()
    driver = _driver(tmp_path, name, "wait")
    try:
        for line in driver.stdout:
            if line.strip() == "READY":
                break
        else:
            pytest.fail(f"driver ended early: {(tmp_path / 'driver.err').read_text()}")
        running = jobs_named(name)
        assert running and set(running.values()) == {"R"}
        driver.send_signal(sig)
        driver.wait(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode in codes, (tmp_path / "driver.err").read_text()
    assert_no_jobs_left(name)


@pytest.mark.usefixtures("slurm_cluster")
def test_refused_job_is_a_config_error_before_any_submission(tmp_path):
    name = job_name()
    with pytest.raises(ConfigError) as info:
        with slurm_client(_settings(tmp_path, name, partition="no-such-partition"), jobs=1):
            pass
    assert "partition" in info.value.problem.lower() and "sinfo" in info.value.hint
    assert not jobs_named(name)


@pytest.mark.usefixtures("slurm_cluster")
def test_safety_net_cancels_jobs_still_queued(tmp_path):
    name = job_name()
    submit = ["sbatch", "--parsable", f"--job-name={name}", "--cpus-per-task=1", "--mem=10M"]
    submit += [f"--output={tmp_path}/%j.out", "--wrap", "sleep 300"]
    job = subprocess.run(submit, capture_output=True, text=True, check=True).stdout.strip()
    assert jobs_named(name)
    # an id Slurm does not know (long finished) is passed over
    assert cancel_leftovers({job, "999999"}) == [job]
    assert_no_jobs_left(name)


@pytest.mark.usefixtures("slurm_cluster")
@pytest.mark.parametrize("directive", ["gres", "gpus"])
def test_one_worker_per_gpu(tmp_path, directive):
    # the test node's two GPUs are fake, but Slurm allocates them and sets CUDA_VISIBLE_DEVICES
    name = job_name()
    settings = SlurmSettings(
        cores=2,
        memory="1GB",
        gpus=2,
        gpu_directive=directive,
        job_name=name,
        log_directory=str(tmp_path),
    )
    with slurm_client(settings, jobs=1) as client:
        client.gather(client.map(time.sleep, [0.2] * 4, pure=False))
        client.wait_for_workers(2, timeout=60)
        seen = client.run(
            lambda: (os.environ["SLURM_JOB_ID"], os.environ.get("CUDA_VISIBLE_DEVICES"))
        )
        threads = set(client.nthreads().values())
    assert len(seen) == 2 and len({job for job, _ in seen.values()}) == 1
    assert sorted(gpu for _, gpu in seen.values()) == ["0", "1"]
    assert threads == {1}
    assert_no_jobs_left(name)


@pytest.mark.usefixtures("slurm_cluster")
def test_jobs_past_their_lifetime_are_replaced(tmp_path):
    # a site lifetime far below any walltime makes the replacement visible in seconds
    name = job_name()
    lifetime = ["--lifetime", "5s", "--lifetime-stagger", "1s"]

    def job_after(seconds: float) -> str:  # nested: shipped by value, workers lack this module
        time.sleep(seconds)
        return os.environ["SLURM_JOB_ID"]

    results = []
    # two worker processes in one job, as with two GPUs: dask-jobqueue alone never replaces
    # such a job once its workers are gone
    settings = dataclasses.replace(_settings(tmp_path, name), cores=2, processes=2)
    with dask.config.set({"jobqueue.slurm.worker-extra-args": lifetime}):
        with slurm_client(settings, jobs=1) as client:
            # results are taken as they come, as the pipeline does: a retiring worker
            # then holds no result that would be lost with it and computed again
            futures = client.map(job_after, [1.0] * 20, pure=False)
            for future in as_completed(futures, timeout=90):
                results.append(future.result())
                future.release()
            submitted = set(client.cluster.submitted)
    jobs = Counter(results)
    assert sum(jobs.values()) == 20 and set(jobs) <= submitted
    # 10 s of work for 2 workers that last about 5 s each: several generations of jobs
    assert len(jobs) >= 2, jobs
    assert_no_jobs_left(name)
