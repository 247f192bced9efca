"""Kills at the worst moments, then the same command again: outputs bit-identical to an
uninterrupted run, finished work not redone (RELIABILITY F1-F6).

Every run is a real ``pipeline run`` process in its own process group with a real local
Dask cluster; faults are injected with ``PIPELINE_FAULTS`` (see :mod:`pipeline.core.faults`):
``killgroup`` SIGKILLs the driver and its workers at a named point, ``kill`` one worker.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL_RUN, image_dirs, image_files, run_process, write_tiff
from conftest import report_entries as entries

NAMES = ("s1", "s2", "s3")
# 150 x 200 pixels in blocks of 64 (SMALL_RUN): 12 blocks per slide
BLOCKS = 12


def make_slides(folder: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name in NAMES:
        image = rng.integers(0, 256, (150, 200), dtype=np.uint8)
        write_tiff(folder / f"{name}.tif", image, tile=(32, 32), compression="zlib")
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Slides and their uninterrupted output (in-process)."""
    root = tmp_path_factory.mktemp("ref")
    slides = make_slides(root / "slides")
    out = root / "ref.zarr"
    done = run_process("run", slides, "--out", out, "--scheduler", "sync", *SMALL_RUN)
    assert done.returncode == 0, done.stderr
    return slides, image_files(out)


def run(slides, out, *extra, faults=None, env=None):
    env = {**(env or {}), **({"PIPELINE_FAULTS": faults} if faults else {})}
    return run_process("run", slides, "--out", out, "--workers", "2", *SMALL_RUN, *extra, env=env)


def assert_same(out: Path, expected: dict) -> None:
    got = image_files(out)
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name] == expected[name], f"{name} differs from the uninterrupted run"


def staged(out: Path) -> list[str]:
    folder = out / ".pipeline" / "staging"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.mark.parametrize(
    "fault, check",
    [
        # F5 and F4: chunks of a block written, its record not: the group dies
        ("block-written@s2/5=killgroup", "resumed"),
        # F6: every block written, the pyramid half made: blocks are not redone
        ("finalize@s3=killgroup", "finishing"),
    ],
)
def test_process_group_killed_then_same_command_gives_identical_outputs(
    reference, tmp_path, fault, check
):
    slides, expected = reference
    out = tmp_path / "out.zarr"
    killed = run(slides, out, faults=fault)
    assert killed.returncode == -signal.SIGKILL
    name = fault.split("@")[1].split("/")[0].split("=")[0]
    assert name not in [p.name for p in image_dirs(out)]  # nothing that looks complete

    again = run(slides, out)

    assert again.returncode == 0, again.stderr
    assert "Traceback" not in again.stderr + again.stdout
    assert "taking over the lock of a run that is gone" in again.stderr
    assert_same(out, expected)
    entry = entries(out)[name]
    assert entry["state"] == "done" and entry["blocks"] == BLOCKS
    if check == "resumed":  # only unfinished blocks ran again
        assert 0 < entry["resumed_blocks"] < BLOCKS
    else:  # nothing ran through the model again
        assert entry["resumed_blocks"] == BLOCKS and entry["tiles"] == 0
    assert staged(out) == []
    assert not list((out / ".pipeline" / "locks").glob("*.lock"))


@pytest.mark.parametrize("point", ["publish-aside", "publish-moved"])
def test_crash_between_the_renames_of_publishing(reference, tmp_path, point):
    """F6: SIGKILL while replacing an existing output (``--force``): the next run finds
    exactly one output, equal to the reference, and recomputes nothing."""
    slides, expected = reference
    out = tmp_path / "out.zarr"
    assert run(slides, out, "--scheduler", "sync").returncode == 0
    killed = run(slides, out, "--force", "--scheduler", "sync", faults=f"{point}@s1=killgroup")
    assert killed.returncode == -signal.SIGKILL
    present = (out / "s1").exists()
    assert present == (point == "publish-moved")  # aside: neither copy in place

    again = run(slides, out, "--scheduler", "sync")

    assert again.returncode == 0, again.stderr
    assert_same(out, expected)
    assert {e["reason"] for e in entries(out).values()} == {"up-to-date"}
    assert not (out / ".pipeline" / "old").exists() or not list(
        (out / ".pipeline" / "old").iterdir()
    )
    assert staged(out) == []


def test_external_kill_mid_batch(reference, tmp_path):
    """F4 from outside: ``kill -9 -PGID`` once about half the blocks are recorded."""
    slides, expected = reference
    out = tmp_path / "out.zarr"
    proc = run_process(
        "run",
        slides,
        "--out",
        out,
        "--workers",
        "2",
        *SMALL_RUN,
        env={"PIPELINE_FAULTS": "block=sleep:0.1"},
        wait=False,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        blocks = list((out / ".pipeline" / "staging").glob("*/blocks/*"))
        done = len(image_dirs(out)) if out.exists() else 0
        if len(blocks) + done * BLOCKS >= len(NAMES) * BLOCKS // 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)

    again = run(slides, out)

    assert again.returncode == 0, again.stderr
    assert_same(out, expected)
    report = entries(out)
    ran = sum(e["blocks"] - e["resumed_blocks"] for e in report.values() if e["state"] == "done")
    assert ran < len(NAMES) * BLOCKS  # finished images and blocks were not redone


def test_worker_killed_once_on_a_block(reference, tmp_path):
    """F1 and F3: workers die during blocks (a named block's first attempt, and the first
    attempts of two other blocks and of a first phase); Dask reruns them elsewhere."""
    slides, expected = reference
    out = tmp_path / "out.zarr"
    counts = tmp_path / "counts"
    counts.mkdir()
    done = run(
        slides,
        out,
        faults="block@s2/3=kill*1;block=kill*2;shared=kill*1",
        env={"PIPELINE_FAULTS_DIR": str(counts)},
    )
    assert done.returncode == 0, done.stderr
    assert len(list(counts.iterdir())) == 4  # every kill happened
    assert_same(out, expected)


def test_block_that_kills_its_worker_every_time(reference, tmp_path):
    """F2: that input fails as worker-crash naming the block, the others are done, no
    output for it; its written blocks are kept and a run without the fault continues."""
    slides, expected = reference
    out = tmp_path / "out.zarr"
    failed = run(
        slides,
        out,
        faults="block@s2/5=kill",
        env={"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1"},
    )
    assert failed.returncode == 1, failed.stderr
    report = entries(out)
    s2 = report["s2"]
    assert s2["state"] == "failed" and s2["reason"] == "worker-crash", s2
    # named, possibly with the blocks that ran beside it on the worker's other threads
    assert "block 5 at y 64:128, x 64:128" in s2["message"] and "s2.tif" in s2["message"]
    assert s2["output"] is None and not (out / "s2").exists()
    assert report["s1"]["state"] == report["s3"]["state"] == "done"
    assert "Traceback" not in failed.stdout + failed.stderr
    assert "block 5" in failed.stdout  # the summary names it

    again = run(slides, out)

    assert again.returncode == 0, again.stderr
    assert_same(out, expected)
    assert entries(out)["s2"]["resumed_blocks"] > 0


def test_ctrl_c_keeps_finished_work_and_writes_the_report(reference, tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it): exit 130, report.json
    says which inputs were interrupted, the same command continues them."""
    slides, expected = reference
    out = tmp_path / "out.zarr"
    args = ("run", slides, "--out", out, "--workers", "2", *SMALL_RUN)
    proc = run_process(*args, env={"PIPELINE_FAULTS": "block=sleep:0.1"}, wait=False)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(out.glob(".pipeline/staging/*/blocks/*"))) < 8:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "rerun the same command to continue" in stderr
    report = entries(out)
    interrupted = [e for e in report.values() if e["reason"] == "interrupted"]
    assert interrupted and all(e["state"] == "pending" for e in interrupted)
    assert not list((out / ".pipeline" / "locks").glob("*.lock"))  # released

    again = run_process(*args)

    assert again.returncode == 0, again.stderr
    assert_same(out, expected)
    assert sum(e["resumed_blocks"] for e in entries(out).values()) > 0
