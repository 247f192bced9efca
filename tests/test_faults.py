"""Faults that are not kills (RELIABILITY F7-F12) and the nightly ledger, each with real
processes, real files and real file systems (a tmpfs for a full or read-only disk)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import SMALL_RUN, image_dirs, image_files, run_process, write_tiff
from conftest import report_entries as entries
from conftest import small_run as run
from conftest import small_slide as slide
from conftest import small_slides as slides


def stamps(out: Path, names) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every file of the named images: a rewrite changes them."""
    return {
        str(p.relative_to(out)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for name in names
        for p in (out / name).rglob("*")
        if p.is_file()
    }


def assert_same_as_a_fresh_run(folder: Path, out: Path, name: str) -> None:
    """The image ``name`` in OUT is bit-identical to a fresh run of its input alone."""
    fresh = out.with_name("fresh.zarr")
    assert run(folder / f"{name}.tif", fresh).returncode == 0
    assert image_files(out)[name] == image_files(fresh)[name]


def no_traceback(done: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in done.stdout + done.stderr, done.stderr[-3000:]


# --- F7: two runs on one output ---------------------------------------------------------


def test_second_run_on_the_same_output_exits_2_naming_the_first(tmp_path):
    folder = slides(tmp_path / "in")
    out = tmp_path / "out.zarr"
    first = run_process(
        "run", folder, "--out", out, "--workers", "2", *SMALL_RUN,
        env={"PIPELINE_FAULTS": "block=sleep:0.15"}, wait=False,
    )  # fmt: skip
    lock = out / ".pipeline" / "locks" / "run.lock"
    deadline = time.monotonic() + 60
    while not lock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    t0 = time.monotonic()
    second = run(folder, out)
    assert time.monotonic() - t0 < 15
    assert second.returncode == 2
    assert "is being written by another run" in second.stderr
    assert f"pid {first.pid}" in second.stderr and "started" in second.stderr
    no_traceback(second)
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert [p.name for p in image_dirs(out)] == ["s1", "s2", "s3"]
    assert {e["state"] for e in entries(out).values()} == {"done"}


# --- F8: a changed input ----------------------------------------------------------------


def test_changed_input_is_recomputed_alone_and_matches_a_fresh_run(tmp_path):
    folder = slides(tmp_path / "in")
    out = tmp_path / "out.zarr"
    assert run(folder, out).returncode == 0
    kept = stamps(out, ["s1", "s3"])
    slide(folder / "s2.tif", 99)  # other pixels, same name

    again = run(folder, out)

    assert again.returncode == 0, again.stderr
    report = entries(out)
    assert report["s2"]["state"] == "done" and report["s2"]["tiles"] > 0
    assert {report[n]["reason"] for n in ("s1", "s3")} == {"up-to-date"}
    assert stamps(out, ["s1", "s3"]) == kept  # not a file of the others rewritten
    assert_same_as_a_fresh_run(folder, out, "s2")


def test_stale_partial_work_of_a_changed_input_is_discarded_not_mixed(tmp_path):
    folder = slides(tmp_path / "in")
    out = tmp_path / "out.zarr"
    killed = run(folder, out, faults="block-written@s2/6=killgroup")
    assert killed.returncode == -9
    stale = [p.name for p in (out / ".pipeline" / "staging").iterdir()]
    assert [n for n in stale if n.startswith("s2-")]
    slide(folder / "s2.tif", 99)

    again = run(folder, out)

    assert again.returncode == 0, again.stderr
    assert entries(out)["s2"]["resumed_blocks"] == 0
    assert not (out / ".pipeline" / "staging").exists() or not any(
        (out / ".pipeline" / "staging").iterdir()
    )
    assert_same_as_a_fresh_run(folder, out, "s2")


def test_input_overwritten_during_its_run_fails_instead_of_a_hybrid(tmp_path):
    folder = slides(tmp_path / "in")
    out = tmp_path / "out.zarr"
    proc = run_process(
        "run", folder / "s2.tif", "--out", out, "--scheduler", "sync", *SMALL_RUN,
        env={"PIPELINE_FAULTS": "block@s2/2=sleep:2"}, wait=False,
    )  # fmt: skip
    blocks = out / ".pipeline" / "staging"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(blocks.glob("*/blocks/*"))) < 2:
        time.sleep(0.05)
    slide(folder / "s2.tif", 42)  # overwritten while block 2 runs
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, stderr
    entry = entries(out)["s2"]
    assert entry["state"] == "failed" and entry["reason"] == "input-changed", entry
    assert "s2.tif" in entry["message"] and "changed on disk" in entry["message"]
    assert image_dirs(out) == [] and not any(blocks.iterdir())


# --- F9: full and read-only disks ---------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(size)``: a real tmpfs of that size (root only), unmounted afterwards."""
    mounts = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"disk{len(mounts)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)])
        if done.returncode:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounts.append(folder)
        return folder

    yield mount
    for folder in mounts:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_full_disk_fails_clearly_then_a_rerun_after_freeing_space_continues(tmp_path, tmpfs):
    folder = slides(tmp_path / "in", shape=(256, 256))
    reference = tmp_path / "ref.zarr"
    assert run(folder, reference).returncode == 0
    disk = tmpfs("240k")
    out = disk / "out.zarr"

    full = run(folder, out)

    no_traceback(full)
    # the summary says it (report.json itself may not fit on the full disk: then it says so)
    failed = [line for line in full.stdout.splitlines() if line.startswith("  failed")]
    assert failed and all("disk-full" in line for line in failed), full.stdout
    assert f"{out}: no space left on the device (free " in full.stdout
    done = [p.name for p in image_dirs(out)]
    assert full.returncode == (1 if done else 2)
    if not (out / "report.json").exists():
        assert "report.json: could not be written: no space left" in full.stderr
    for name in done:  # what is in place is complete; nothing else looks done
        assert image_files(out)[name] == image_files(reference)[name]
    assert len(done) + len(failed) == 3

    subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
    again = run(folder, out)

    assert again.returncode == 0, again.stderr
    assert image_files(out) == image_files(reference)
    assert sum(e["resumed_blocks"] for e in entries(out).values()) > 0  # kept, not redone


def test_nothing_fits_exits_2_with_the_folder_and_free_space(tmp_path, tmpfs):
    big = slide(tmp_path / "big.tif", 0, (512, 512))
    out = tmpfs("64k") / "out.zarr"
    done = run(big, out, "--chunk", "128", "--block", "128")
    assert done.returncode == 2, done.stdout + done.stderr
    no_traceback(done)
    assert "no space left" in done.stdout + done.stderr and str(out) in done.stdout + done.stderr
    assert image_dirs(out) == []


def test_read_only_output_is_a_clear_error(tmp_path, tmpfs):
    folder = slides(tmp_path / "in", names=("s1",))
    disk = tmpfs("8m")
    assert run(folder, disk / "out.zarr").returncode == 0
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    done = run(folder, disk / "out.zarr", "--force")
    assert done.returncode == 2
    no_traceback(done)
    assert "read-only file system" in done.stderr.lower() and "out.zarr" in done.stderr


def test_a_new_output_on_a_read_only_disk_is_named_as_such(tmp_path, tmpfs):
    """The output root cannot even be created: the read-only file system is named (not
    a generic 'cannot write'), exit 2, nothing made."""
    folder = slides(tmp_path / "in", names=("s1",))
    disk = tmpfs("1m")
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    done = run(folder, disk / "new.zarr")
    assert done.returncode == 2
    no_traceback(done)
    assert "the output is on a read-only file system" in done.stderr
    assert str(disk / "new.zarr") in done.stderr and not (disk / "new.zarr").exists()


def test_report_that_cannot_be_written_is_said_not_a_traceback(tmp_path):
    folder = slides(tmp_path / "in", names=("s1",))
    out = tmp_path / "out.zarr"
    done = run(folder, out, faults="report=enospc")
    no_traceback(done)
    assert done.returncode == 1
    assert "report.json: could not be written: no space left" in done.stderr
    assert [p.name for p in image_dirs(out)] == ["s1"]  # the output itself is in place


# --- F10, F11, F12: transient errors, corrupt tiles, a model's NaN -------------------------


def test_transient_read_errors_are_retried_in_driver_and_workers(tmp_path):
    folder = slides(tmp_path / "in")
    counts = tmp_path / "counts"
    counts.mkdir()
    reference = tmp_path / "ref.zarr"
    assert run(folder, reference).returncode == 0
    out = tmp_path / "out.zarr"
    faults = "fingerprint=oserror*2;open@s2=oserror*2;block@s1/3=oserror*2;block@s3/2=oserror"
    done = run(folder, out, faults=faults, env={"PIPELINE_FAULTS_DIR": str(counts)}, sync=False)
    assert done.returncode == 1, done.stderr
    assert len(list(counts.iterdir())) == 6  # every counted fault happened
    assert "retrying" in done.stderr
    report = entries(out)
    assert report["s1"]["state"] == report["s2"]["state"] == "done"
    s3 = report["s3"]  # an error that does not go away: the input fails, saying so
    assert (
        s3["state"] == "failed" and s3["reason"] == "io-error" and "tried 4 times" in s3["message"]
    )
    files = image_files(out)
    assert files == {n: f for n, f in image_files(reference).items() if n != "s3"}


def test_corrupt_tile_fails_its_input_at_once_without_retries(tmp_path):
    folder = slides(tmp_path / "in", names=("s1",))
    bad = slide(folder / "bad.tif", 5, (128, 128))
    with tifffile.TiffFile(bad) as tif:
        start, count = tif.pages.first.dataoffsets[3], tif.pages.first.databytecounts[3]
    data = bytearray(bad.read_bytes())
    data[start + count // 2] ^= 0x01
    bad.write_bytes(bytes(data))
    out = tmp_path / "out.zarr"
    done = run(folder, out, sync=False)
    assert done.returncode == 1
    no_traceback(done)
    entry = entries(out)["bad"]
    assert entry["state"] == "failed" and entry["reason"] == "corrupt-input", entry
    assert "tile at y 0:32, x 96:128" in entry["message"] and "bad.tif" in entry["message"]
    assert "retrying" not in done.stderr
    assert entries(out)["s1"]["state"] == "done"
    # its other blocks, still queued or running when it failed, wrote nothing afterwards:
    # its staging is gone and was not made again by a late block
    assert not list((out / ".pipeline" / "staging").glob("bad-*"))


def test_model_emitting_nan_fails_that_input_naming_the_block(tmp_path):
    """F12, policy: an input whose model output is NaN/Inf anywhere fails
    (``model-output-nonfinite``, naming the block); nothing is masked silently."""
    import torch

    class NanOnWhite(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            nan = torch.full_like(x, float("nan"))
            return torch.where(x >= 1.0, nan, torch.sigmoid(x))

    model = tmp_path / "nan.pt"
    torch.jit.script(NanOnWhite()).save(str(model))
    folder = tmp_path / "in"
    write_tiff(folder / "dim.tif", np.full((96, 96), 100, np.uint8))
    white = np.full((96, 96), 100, np.uint8)
    white[70, 80] = 255
    write_tiff(folder / "white.tif", white)
    out = tmp_path / "out.zarr"
    done = run_process(
        "run", folder, "--out", out, "--model", model, "--scheduler", "sync", "--tile", "32",
        "--chunk", "32", "--block", "32", "--no-skip-background",
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    report = entries(out)
    assert report["dim"]["state"] == "done"
    entry = report["white"]
    assert entry["state"] == "failed" and entry["reason"] == "model-output-nonfinite", entry
    assert "NaN or Inf" in entry["message"] and "nan.pt" in entry["message"]
    assert [p.name for p in image_dirs(out)] == ["dim"]


# --- the nightly ledger ----------------------------------------------------------------------


def test_nightly_adds_new_slides_without_rewriting_finished_ones(tmp_path):
    folder = slides(tmp_path / "in", names=("slide 1", "slide_1", "b"))
    out = tmp_path / "out.zarr"
    assert run(folder, out).returncode == 0
    names = [p.name for p in image_dirs(out)]
    assert names == ["b", "slide_1", "slide_1-2"]
    before = stamps(out, names)
    slide(folder / "new.tif", 7)

    again = run(folder, out)

    assert again.returncode == 0, again.stderr
    report = entries(out)
    assert sorted(report) == ["b", "new", "slide_1", "slide_1-2"]  # every input named
    assert report["new"]["state"] == "done"
    assert {report[n]["reason"] for n in names} == {"up-to-date"}
    assert stamps(out, names) == before
    # one input alone, changed: it keeps its own name and the other one is untouched
    renamed = os.path.realpath(folder / "slide_1.tif")
    slide(folder / "slide_1.tif", 50)
    alone = run(folder / "slide_1.tif", out)
    assert alone.returncode == 0, alone.stderr
    assert entries(out)["slide_1-2"]["path"].endswith("slide_1.tif")
    assert stamps(out, ["slide_1"]) == {k: v for k, v in before.items() if k.startswith("slide_1/")}
    assert len(entries(out)) == 4 and os.path.exists(renamed)


def test_shards_of_an_array_run_side_by_side_into_one_output(tmp_path):
    folder = slides(tmp_path / "in", names=tuple(f"s{i}" for i in range(6)))
    out = tmp_path / "out.zarr"
    procs = [
        run_process(
            "run",
            folder,
            "--out",
            out,
            "--scheduler",
            "sync",
            *SMALL_RUN,
            env={"SLURM_ARRAY_TASK_ID": str(i), "SLURM_ARRAY_TASK_COUNT": "2"},
            wait=False,
        )  # fmt: skip
        for i in range(2)
    ]
    for proc in procs:
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
    assert [p.name for p in image_dirs(out)] == [f"s{i}" for i in range(6)]
    report = json.loads((out / "report.json").read_text())
    assert sorted(e["name"] for e in report["inputs"]) == [f"s{i}" for i in range(6)]
    runs = sorted((out / ".pipeline" / "runs").glob("*.json"))
    shares = [json.loads(p.read_text()) for p in runs]
    assert sorted(r["shard"] for r in shares) == ["1/2", "2/2"]
    assert sum(len(r["inputs"]) for r in shares) == 6
    shutil.rmtree(out)
