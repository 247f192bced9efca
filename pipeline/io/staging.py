"""Where an image is written before it is published, how blocks record that they are
written, and how a finished image replaces the old one without a moment with neither.

Layout inside the output root::

    OUT/.pipeline/staging/<name>-<key12>/
        owner.json      {"name", "key", "input", "run", "created"}
        image/          the NGFF image group being written; published as OUT/<name>
        blocks/<id>     one empty file per block whose chunks are all written and on
                        disk (flushed before the record: see chunk_writer)
        attempts/       one empty file per block attempt while it runs (``block-<id>-<pid>-…``):
                        what is left tells which block was running when a worker died
        complete.json   the image is finished and verified: publish it, never recompute it
        discarded       its input failed: tasks still running write nothing; deleted once
                        they have settled
        halted          the same, but the work is kept for the next run to continue (a
                        full disk, a worker crash): the next run removes the flag
    OUT/.pipeline/old/<name>    the previous output, only while publishing
    OUT/.pipeline/trash/        folders being deleted

The staging folder's name holds the run key, so a rerun of the same command finds its
unfinished work and continues it; work staged under another key is never mixed in.

Publishing ``image`` as ``OUT/<name>``:

1. the old output (if any) is renamed to ``old/<name>``;
2. ``image`` is renamed to ``OUT/<name>``;
3. the caller records the input as done (the ledger);
4. ``old/<name>`` and the staging folder are deleted.

The image is flushed to disk before step 1 (``sync_tree`` when it is finished) and
the root folder after step 2, so a power loss never leaves a published image with empty
files while the old one is gone.

Each step is one rename or deletion, so a crash leaves one of these states, which
:meth:`StagingArea.repair` resolves on the next start: ``old/<name>`` beside ``OUT/<name>``
(after step 2 or 3) is deleted; ``old/<name>`` without ``OUT/<name>`` (after step 1) is
moved back. The staged image, still complete, is then published by the next run of its
input without being recomputed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core import atomic, faults

KEY_CHARS = 12
_STOP_FLAGS = ("discarded", "halted")
#: The temporary name zarr's local store writes a chunk under before renaming it.
_ORPHAN = re.compile(r"\.[0-9a-f]{32}\.partial$")


def block_id(region: Any) -> str:
    """A file name for a block's write region: ``<offset>+<shape>``, e.g. ``0_512+512_512``.
    Named by coordinates, not order number, so a different block layout never matches."""
    return "_".join(map(str, region.offset)) + "+" + "_".join(map(str, region.shape))


@dataclass(frozen=True)
class Stage:
    """One staged image (see the module docstring for the files)."""

    dir: Path

    @property
    def image(self) -> Path:
        return self.dir / "image"

    @property
    def blocks(self) -> Path:
        return self.dir / "blocks"

    def owner(self) -> dict[str, Any] | None:
        owner = atomic.read_json(self.dir / "owner.json")
        return owner if isinstance(owner, dict) else None

    def done_blocks(self) -> set[str]:
        """Ids of the blocks recorded as written."""
        try:
            return set(os.listdir(self.blocks))
        except OSError:
            return set()

    def mark_block_done(self, region: Any) -> bool:
        """Record that the chunks of the block at ``region`` are written. Creates no
        folder: a staging folder removed meanwhile stays removed (returns False)."""
        try:
            os.close(os.open(self.blocks / block_id(region), os.O_CREAT | os.O_WRONLY, 0o666))
        except FileNotFoundError:
            return False
        return True

    def info(self) -> dict[str, Any] | None:
        """What the run that finished this image recorded (``complete.json``)."""
        info = atomic.read_json(self.dir / "complete.json")
        return info if isinstance(info, dict) else None

    @contextlib.contextmanager
    def attempt(self, kind: str, region: Any) -> Iterator[None]:
        """Mark a block attempt as running while the context is open; a worker that dies
        inside leaves the mark behind (see :meth:`deaths`)."""
        mark = (
            self.dir
            / "attempts"
            / f"{kind}-{block_id(region)}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        )
        try:
            os.close(os.open(mark, os.O_CREAT | os.O_WRONLY, 0o666))
        except OSError:  # a stage being removed, or a full disk: no mark, no harm
            mark = None
        try:
            yield
        finally:
            if mark is not None:
                with contextlib.suppress(OSError):
                    os.unlink(mark)

    def deaths(self, kind: str, region: Any) -> int:
        """Attempts of a block whose process died while running it (this run)."""
        prefix = f"{kind}-{block_id(region)}-"
        try:
            return sum(name.startswith(prefix) for name in os.listdir(self.dir / "attempts"))
        except OSError:
            return 0

    def is_complete(self) -> bool:
        return (self.dir / "complete.json").is_file() and self.image.is_dir()

    def remove_orphans(self) -> int:
        """Delete the temporary files that writers killed mid-write left in the image
        (zarr writes a chunk to ``<key>.<32 hex>.partial`` and renames it); only when no
        writer of this image runs any more. Returns how many there were."""
        count = 0
        for folder, _, files in os.walk(self.image):
            for name in files:
                if _ORPHAN.search(name):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(folder, name))
                        count += 1
        return count

    def mark_complete(self, info: dict[str, Any]) -> None:
        atomic.write_json(self.dir / "complete.json", {**info, "at": time.time()})

    def is_discarded(self) -> bool:
        """True when tasks of this image must not write (discarded, halted or gone)."""
        return any((self.dir / f).exists() for f in _STOP_FLAGS) or not self.dir.exists()

    def mark_discarded(self, keep: bool = False) -> None:
        """From now on tasks of this image write nothing (they check before writing);
        ``keep``: what is written stays for the next run to continue."""
        with contextlib.suppress(OSError):  # a full disk still takes an empty file's name
            flag = self.dir / ("halted" if keep else "discarded")
            os.close(os.open(flag, os.O_CREAT | os.O_WRONLY, 0o666))


class StagingArea:
    """The staging, old and trash folders of one output root."""

    def __init__(self, out: str | os.PathLike, state: str = ".pipeline") -> None:
        self.out = Path(out)
        self.root = self.out / state
        self.staging = self.root / "staging"
        self.old = self.root / "old"
        self.trash = self.root / "trash"

    def stage(self, name: str, key: str) -> Stage:
        return Stage(self.staging / f"{name}-{key[:KEY_CHARS]}")

    def open_stage(
        self, name: str, key: str, owner: dict[str, Any], *, fresh: bool = False
    ) -> tuple[Stage, bool]:
        """The staging folder of ``name`` under ``key``, created if needed; True when it
        already held work of this key (to be continued). ``fresh``: start it over."""
        stage = self.stage(name, key)
        held = stage.owner()
        reused = (
            not fresh
            and held is not None
            and held.get("key") == key
            and not (stage.dir / "discarded").exists()
        )
        if reused:  # continued: a halted stage goes on; old attempt marks say nothing now
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stage.dir / "halted")
            shutil.rmtree(stage.dir / "attempts", ignore_errors=True)
            (stage.dir / "attempts").mkdir()
        else:
            if stage.dir.exists():
                self.remove(stage)
            stage.blocks.mkdir(parents=True)
            (stage.dir / "attempts").mkdir()
            atomic.write_json(
                stage.dir / "owner.json",
                {**owner, "name": name, "key": key, "created": time.time()},
            )
        return stage, reused

    def sync(self, stage: Stage) -> None:
        """Put a new stage on disk: its files (records, the image's metadata) and the
        folders that lead to it from the output root."""
        atomic.sync_tree(stage.dir)
        for folder in (self.staging, self.root, self.out):
            atomic.sync_path(folder)

    def stages(self) -> list[Stage]:
        try:
            return [Stage(p) for p in sorted(self.staging.iterdir()) if p.is_dir()]
        except FileNotFoundError:
            return []

    def remove(self, stage: Stage | Path) -> None:
        """Delete a staging (or any) folder: renamed into the trash first, so a crash
        mid-deletion leaves nothing that looks like work to continue."""
        path = stage.dir if isinstance(stage, Stage) else Path(stage)
        self.trash.mkdir(parents=True, exist_ok=True)
        doomed = self.trash / f"{path.name}-{uuid.uuid4().hex[:8]}"
        try:
            os.replace(path, doomed)
        except FileNotFoundError:
            return
        shutil.rmtree(doomed, ignore_errors=True)

    def publish(self, stage: Stage, final: Path, recorded: Callable[[], None]) -> Path:
        """Put ``stage.image`` in place of ``final`` (see the module docstring);
        ``recorded`` is called once the new output is in place, before the old is deleted."""
        old = self.old / final.name
        if old.exists():  # a leftover of a crash that repair did not see
            if final.exists():
                self.remove(old)
            else:
                os.replace(old, final)
        if final.exists():
            self.old.mkdir(parents=True, exist_ok=True)
            os.replace(final, old)
            faults.point("publish-aside", final.name)
        os.replace(stage.image, final)
        atomic.fsync_dir(self.out)
        faults.point("publish-moved", final.name)
        recorded()
        if old.exists():
            self.remove(old)
        self.remove(stage)
        return final

    def repair(self, names: Iterable[str] | None = None) -> list[str]:
        """Resolve what a crash while publishing left (names: only these; None: all).
        Returns one line per action, for the log."""
        wanted = None if names is None else {n.lower() for n in names}
        done = []
        try:
            olds = sorted(self.old.iterdir())
        except FileNotFoundError:
            olds = []
        for old in olds:
            if wanted is not None and old.name.lower() not in wanted:
                continue
            final = self.out / old.name
            if final.exists():
                self.remove(old)
                done.append(f"{old.name}: removed the previous output left beside the new one")
                continue
            os.replace(old, final)
            done.append(f"{old.name}: restored the previous output")
        if wanted is None and self.trash.exists():
            for item in self.trash.iterdir():
                shutil.rmtree(item, ignore_errors=True)
        return done

    def sweep(self, keep: Callable[[Stage, dict[str, Any] | None], bool]) -> list[str]:
        """Remove staging folders ``keep(stage, owner)`` rejects; returns their names."""
        removed = []
        for stage in self.stages():
            if not keep(stage, stage.owner()):
                self.remove(stage)
                removed.append(stage.dir.name)
        return removed


FULL_ERRNOS = frozenset((errno.ENOSPC, errno.EDQUOT, errno.EROFS))


def published_key(image: str | os.PathLike) -> str | None:
    """The run key stored in an image's attributes (None: not an image of ours)."""
    return published_attrs(image).get("run_key")


def published_attrs(image: str | os.PathLike) -> dict[str, Any]:
    """The ``pipeline`` attributes of an image group (Zarr v3 or v2), or ``{}``."""
    image = Path(image)
    meta = atomic.read_json(image / "zarr.json")
    attrs = meta.get("attributes") if isinstance(meta, dict) else None
    if attrs is None:
        attrs = atomic.read_json(image / ".zattrs")
    info = attrs.get("pipeline") if isinstance(attrs, dict) else None
    return info if isinstance(info, dict) else {}
