"""Staging, block records and publishing: a crash at any moment leaves a repairable state."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from pipeline.core.atomic import output_error
from pipeline.core.geometry import Region
from pipeline.core.retry import is_transient, retrying
from pipeline.io.staging import StagingArea, block_id

KEY = "0123456789abcdef" * 4


def image(folder, text):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zarr.json").write_text(text)
    return folder


def test_stage_is_continued_under_its_key_and_restarted_under_another(tmp_path):
    area = StagingArea(tmp_path)
    stage, reused = area.open_stage("a", KEY, {"input": "/x/a.tif"})
    assert not reused and stage.dir.name == f"a-{KEY[:12]}"
    r1, r2 = Region((0, 0), (512, 512)), Region((0, 512), (512, 256))
    assert stage.mark_block_done(r1)
    assert stage.done_blocks() == {block_id(r1)} and block_id(r2) == "0_512+512_256"
    again, reused = area.open_stage("a", KEY, {"input": "/x/a.tif"})
    assert reused and again.done_blocks() == {block_id(r1)}
    other = KEY[::-1]
    fresh, reused = area.open_stage("a", other, {"input": "/x/a.tif"})
    assert not reused and fresh.done_blocks() == set()
    # the discarded stage of a failed input is not continued
    fresh.mark_discarded()
    assert area.open_stage("a", other, {})[0].done_blocks() == set()


def test_a_removed_stage_is_not_recreated_by_a_late_block(tmp_path):
    area = StagingArea(tmp_path)
    stage, _ = area.open_stage("a", KEY, {})
    stage.mark_discarded()
    assert stage.is_discarded()
    area.remove(stage)
    assert not stage.mark_block_done(Region((0, 0), (8, 8)))
    assert not stage.dir.exists() and stage.is_discarded()
    assert not list((tmp_path / ".pipeline" / "trash").iterdir())


def test_publish_replaces_the_old_output(tmp_path):
    area = StagingArea(tmp_path)
    final = image(tmp_path / "a", "old")
    stage, _ = area.open_stage("a", KEY, {})
    image(stage.image, "new")
    calls = []
    area.publish(stage, final, lambda: calls.append((final / "zarr.json").read_text()))
    assert calls == ["new"] and (final / "zarr.json").read_text() == "new"
    assert not stage.dir.exists() and not (area.old / "a").exists()


PUBLISH = """
import sys
from pathlib import Path
from pipeline.io.staging import StagingArea
out = Path(sys.argv[1])
area = StagingArea(out)
stage, _ = area.open_stage("a", sys.argv[2], {})
(stage.image).mkdir()
(stage.image / "zarr.json").write_text("new")
(stage.dir / "complete.json").write_text("{}")
area.publish(stage, out / "a", lambda: (out / "recorded").write_text("yes"))
"""


@pytest.mark.parametrize("point", ["publish-aside", "publish-moved"])
def test_crash_inside_publishing_is_repaired(tmp_path, point):
    """RELIABILITY F6 (publishing part): SIGKILL between the two renames, and after them."""
    image(tmp_path / "a", "old")
    env = {
        **os.environ,
        "PIPELINE_FAULTS": f"{point}=kill",
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    done = subprocess.run([sys.executable, "-c", PUBLISH, str(tmp_path), KEY], env=env)
    assert done.returncode == -9
    area = StagingArea(tmp_path)
    if point == "publish-aside":  # neither in place: the old one is moved back
        assert not (tmp_path / "a").exists() and (area.old / "a").exists()
        assert area.repair() == ["a: restored the previous output"]
        assert (tmp_path / "a" / "zarr.json").read_text() == "old"
        # the staged image is still complete: the next run publishes it, not recomputes it
        assert area.stage("a", KEY).is_complete()
    else:  # the new one in place, the old beside it: deleted
        assert area.repair() == ["a: removed the previous output left beside the new one"]
        assert (tmp_path / "a" / "zarr.json").read_text() == "new"
    assert not (area.old / "a").exists()
    assert not (tmp_path / "recorded").exists()  # nothing recorded as done by the dead run


def test_repair_only_touches_the_names_it_owns(tmp_path):
    area = StagingArea(tmp_path)
    image(area.old / "a", "old-a")
    image(area.old / "b", "old-b")
    assert area.repair(["A"]) == ["a: restored the previous output"]
    assert (area.old / "b").exists() and not (tmp_path / "b").exists()


def test_sweep_removes_what_no_one_continues(tmp_path):
    area = StagingArea(tmp_path)
    area.open_stage("a", KEY, {"input": "/keep"})
    area.open_stage("b", KEY, {"input": "/drop"})
    removed = area.sweep(lambda stage, owner: owner["input"] == "/keep")
    assert removed == [f"b-{KEY[:12]}"] and [s.dir.name for s in area.stages()] == [f"a-{KEY[:12]}"]


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 1 MiB tmpfs (root only)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)]).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_error_names_the_folder_and_the_free_space(tiny_disk):
    with pytest.raises(OSError) as err:
        with open(tiny_disk / "big", "wb") as f:
            f.write(b"\0" * (2 << 20))
    exc = output_error(err.value, tiny_disk / "out.zarr")
    assert exc.reason == "disk-full" and str(tiny_disk / "out.zarr") in exc.message
    assert "no space left" in exc.message and "free 0 B of 1.0 MB" in exc.message
    assert not is_transient(err.value)


def test_transient_errors_are_retried_and_others_are_not():
    calls = []

    def flaky(n):
        calls.append(1)
        if len(calls) <= n:
            raise OSError(errno.EIO, "flaky")
        return "ok"

    assert retrying(flaky, 2, delay=0.01) == "ok" and len(calls) == 3
    calls.clear()
    with pytest.raises(OSError):
        retrying(flaky, 9, delay=0.01, attempts=3)
    assert len(calls) == 3
    calls.clear()

    def missing():
        calls.append(1)
        raise FileNotFoundError(errno.ENOENT, "gone")

    with pytest.raises(FileNotFoundError):
        retrying(missing, delay=0.01)
    assert len(calls) == 1


def test_a_halted_stage_is_continued_and_its_attempt_marks_cleared(tmp_path):
    area = StagingArea(tmp_path)
    stage, _ = area.open_stage("a", KEY, {})
    region = Region((0, 0), (8, 8))
    stage.mark_block_done(region)
    with stage.attempt("block", region):
        assert stage.deaths("block", region) == 1  # running: a death now would leave it
    assert stage.deaths("block", region) == 0
    (stage.dir / "attempts" / f"block-{block_id(region)}-123-abc").touch()  # a dead worker's
    assert stage.deaths("block", region) == 1
    stage.mark_discarded(keep=True)
    assert stage.is_discarded()  # tasks still running stop writing
    again, reused = area.open_stage("a", KEY, {})
    assert reused and not again.is_discarded() and again.done_blocks() == {block_id(region)}
    assert again.deaths("block", region) == 0


def test_temporary_files_of_killed_writers_are_removed(tmp_path):
    area = StagingArea(tmp_path)
    stage, _ = area.open_stage("a", KEY, {})
    chunk = stage.image / "0" / "c" / "0" / "1"
    chunk.parent.mkdir(parents=True)
    chunk.write_bytes(b"kept")
    orphan = chunk.with_suffix(".0123456789abcdef0123456789abcdef.partial")
    orphan.write_bytes(b"half a chunk")
    assert stage.remove_orphans() == 1
    assert chunk.exists() and not orphan.exists()
