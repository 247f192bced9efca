"""A power loss: what was recorded as written is on disk (a real ext4 file system).

The output root lives on an ext4 file system in a file, mounted through a loop device
with a journal commit every second. A "power loss" copies the file system's backing file
(what the disk holds) and mounts the copy, which replays the journal: data the kernel
had not yet written back is missing there, exactly as after a crash. Two seconds after a
write, ext4 has committed the metadata (names, sizes) but not the delayed data: files
that were never flushed come back empty. Root only (mount); skipped elsewhere.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import image_files, small_slides
from conftest import report_entries as entries
from conftest import small_run as run

#: Longer than the mount's journal commit interval: the metadata of every write is
#: committed, its data (written back only after 30 s) is not.
SETTLE = 2.5


class Disk:
    """An ext4 file system in ``folder/disk.img`` mounted at ``folder/mnt``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.image = folder / "disk.img"
        self.mnt = folder / "mnt"
        self.mounts: list[Path] = []

    def make(self, size_mb: int = 96) -> Disk:
        self.mnt.mkdir(parents=True)
        with open(self.image, "wb") as f:
            f.truncate(size_mb << 20)
        made = subprocess.run(["mkfs.ext4", "-q", "-F", str(self.image)], capture_output=True)
        if made.returncode != 0:
            pytest.skip(f"cannot make an ext4 file system here: {made.stderr!r}")
        self._mount(self.image, self.mnt)
        return self

    def _mount(self, image: Path, where: Path) -> None:
        done = subprocess.run(
            ["mount", "-o", "loop,commit=1", str(image), str(where)], capture_output=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a loop device here (needs root): {done.stderr!r}")
        self.mounts.append(where)

    def power_loss(self) -> Path:
        """What a machine finds after a power loss now: the disk's content, mounted."""
        time.sleep(SETTLE)
        n = len(self.mounts)
        copy, where = self.folder / f"after{n}.img", self.folder / f"after{n}"
        subprocess.run(["cp", "--sparse=always", str(self.image), str(copy)], check=True)
        where.mkdir()
        self._mount(copy, where)
        return where

    def unmount(self) -> None:
        """Unmount everything and delete the disk images (tens of MB each)."""
        for where in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)
        for image in self.folder.glob("*.img"):
            image.unlink()


@pytest.fixture
def disk(tmp_path):
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 is not installed")
    made = Disk(tmp_path / "disk")
    try:
        yield made.make()
    finally:
        made.unmount()


def empty_files(folder: Path) -> list[str]:
    """Files of ``folder`` that are empty, but for those empty by design: locks, block
    records and attempt marks."""
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file()
        and p.stat().st_size == 0
        and p.suffix != ".flock"
        and p.parent.name not in ("blocks", "attempts")
    )


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])  # Zarr v2 and v3 chunk file layouts
def test_a_finished_output_is_whole_after_a_power_loss_and_the_next_run_keeps_it(
    tmp_path, disk, ngff
):
    inputs = small_slides(tmp_path / "in", names=("s0", "s1"))
    reference = tmp_path / "ref.zarr"
    assert run(inputs, reference, "--ngff", ngff).returncode == 0
    out = disk.mnt / "out.zarr"
    assert run(inputs, out, "--ngff", ngff).returncode == 0

    after = disk.power_loss() / "out.zarr"

    # every file of every image, previews and root metadata included, came back whole
    assert empty_files(after) == []
    assert image_files(after) == image_files(reference)
    again = run(inputs, after, "--ngff", ngff)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Traceback" not in again.stdout + again.stderr
    assert {e["state"] for e in entries(after).values()} == {"skipped"}  # up to date, kept
    assert image_files(after) == image_files(reference)


def test_blocks_recorded_before_a_power_loss_are_on_disk_and_the_rerun_keeps_them(tmp_path, disk):
    inputs = small_slides(tmp_path / "in", names=("s0",), shape=(200, 260))
    reference = tmp_path / "ref.zarr"
    assert run(inputs, reference).returncode == 0
    out = disk.mnt / "out.zarr"
    # every block written and recorded, then the run dies before the image is finished
    killed = run(inputs, out, faults="finalize=killgroup")
    assert killed.returncode != 0

    after = disk.power_loss() / "out.zarr"

    blocks = entries(reference)["s0"]["blocks"]
    # the records that reached the disk (all of them, once the journal has committed)
    staged = list((after / ".pipeline" / "staging").glob("s0-*/blocks/*"))
    assert blocks > 1 and 0 < len(staged) <= blocks
    assert empty_files(after / ".pipeline" / "staging") == []  # and their chunks with them
    again = run(inputs, after)
    assert again.returncode == 0, again.stdout + again.stderr
    assert entries(after)["s0"]["resumed_blocks"] == len(staged)
    assert image_files(after) == image_files(reference)


def test_a_republished_output_after_a_power_loss_is_the_new_one_whole(tmp_path, disk):
    """Republishing deletes the old image once the new one is in place: by then the new
    one must be on disk, or a power loss would leave neither."""
    inputs = small_slides(tmp_path / "in", names=("s0",))
    reference = tmp_path / "ref.zarr"
    assert run(inputs, reference, "--blend", "constant").returncode == 0
    out = disk.mnt / "out.zarr"
    assert run(inputs, out).returncode == 0
    first = image_files(out)
    again = run(inputs, out, "--blend", "constant")  # another key: recomputed, replaced
    assert again.returncode == 0, again.stdout + again.stderr
    assert image_files(out) != first

    after = disk.power_loss() / "out.zarr"

    assert empty_files(after) == []
    assert image_files(after) == image_files(reference)


def test_an_up_to_date_output_with_empty_metadata_files_is_computed_again(tmp_path):
    """What a power loss left before outputs were flushed (or any damage to an image's
    metadata): the next run says so and recomputes the image instead of skipping it."""
    inputs = small_slides(tmp_path / "in", names=("s0", "s1"))
    out = tmp_path / "out.zarr"
    assert run(inputs, out).returncode == 0
    made = image_files(out)
    (out / "s0" / "0" / ".zarray").write_bytes(b"")
    (out / "s0" / "labels" / "classes" / "0" / ".zattrs").write_bytes(b"")

    again = run(inputs, out)

    assert again.returncode == 0, again.stdout + again.stderr
    assert "Traceback" not in again.stdout + again.stderr
    assert "its output s0 is damaged (0/.zarray: empty): it is computed again" in again.stderr
    assert {n: e["state"] for n, e in entries(out).items()} == {"s0": "done", "s1": "skipped"}
    assert image_files(out) == made
