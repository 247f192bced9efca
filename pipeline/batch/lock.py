"""One run per output: a lock file in ``OUT/.pipeline/locks`` held for the whole run.

Lock files (JSON: host, pid, process start time, run id, start time, command)::

    locks/run.lock               a run over the whole output
    locks/shard-3-of-8.lock      shard 3 of an 8-task job array (``--shard 3/8``)

Shards of one array run side by side (they own disjoint inputs); a whole-output run
refuses while any shard holds a lock and a shard refuses while a whole-output run does,
as does a shard of an array of another size. A refused run raises :class:`LockedError`
at once, naming the holder.

Taking a lock: the file is created complete (hard link of a written temporary file, which
fails atomically if the name exists, also on NFS), then the other lock files are checked;
on a conflict the new file is removed again and, after a short random pause, the whole
attempt repeated a few times, so that of two runs starting together one wins.

A lock is **stale**, and is taken over with a warning, when its process is gone (same
host: the pid is not running or is another process, told by its start time) or, for a
lock from another host (a shared file system), when its heartbeat (the file's mtime,
touched every :data:`HEARTBEAT` seconds) is older than :data:`STALE_AFTER`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.batch.shard import Shard
from pipeline.core import atomic
from pipeline.core.atomic import output_error
from pipeline.errors import OutputError, OutputLockedError

log = logging.getLogger(__name__)

#: Seconds between heartbeats of a held lock.
HEARTBEAT = 30.0
#: A lock from another host whose heartbeat is older than this is taken over.
STALE_AFTER = 300.0
_ATTEMPTS = 5


#: The error a refused run raises (named here for callers of this module).
LockedError = OutputLockedError


class OutputLock:
    """The lock of one run (or shard) on one output root; a context manager.

    Parameters
    ----------
    folder
        ``OUT/.pipeline/locks``.
    run_id
        Recorded in the lock, to tell takeovers apart.
    shard
        This run's shard, or None for a whole-output run.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        run_id: str,
        shard: Shard | None = None,
        *,
        heartbeat: float = HEARTBEAT,
        stale_after: float = STALE_AFTER,
    ) -> None:
        self.folder = Path(folder)
        self.run_id, self.shard = run_id, shard
        self.heartbeat, self.stale_after = heartbeat, stale_after
        self.path = self.folder / ("run.lock" if shard is None else f"shard-{shard.tag}.lock")
        self.lost = False  # set by the heartbeat when another run took the lock over
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock or raise :class:`LockedError` naming the holder (an
        :class:`~pipeline.errors.OutputError` when the folder cannot be written)."""
        try:
            self._acquire()
        except OSError as exc:
            if isinstance(exc, OutputError):
                raise
            raise output_error(exc, self.folder.parent.parent) from exc

    def _acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for attempt in range(_ATTEMPTS):
            holder = self._try_once()
            if holder is None:
                self._thread = threading.Thread(target=self._beat, daemon=True, name="lock")
                self._thread.start()
                return
            if holder.get("_mine_first") or attempt == _ATTEMPTS - 1:
                break
            time.sleep(random.uniform(0.05, 0.3))  # a tie with a run starting now
        raise LockedError(
            f"is being written by another run ({describe(holder)})",
            where=self.folder.parent.parent,
            hint="wait for it to finish, or stop it; a lock whose run has ended is taken "
            f"over at once on the same host, and from another host after "
            f"{self.stale_after / 60:.0f} minutes without a heartbeat",
        )

    def _try_once(self) -> dict[str, Any] | None:
        """None when taken; else the holder (``_mine_first``: the slot itself is held)."""
        for path in self._conflicting():
            self._clear_if_stale(path)
        if not atomic.create_json(self.path, self._content()):
            holder = read_lock(self.path) or {"run": "unknown"}
            return {**holder, "_mine_first": True}
        for path in self._conflicting():
            if path == self.path:
                continue
            holder = read_lock(path)
            if holder is not None and not self._stale(path, holder):
                self._remove_mine()
                return holder
        return None

    def _conflicting(self) -> list[Path]:
        """Lock files that may not coexist with this one (this one's own name included)."""
        paths = sorted(self.folder.glob("*.lock"))
        if self.shard is None:
            return paths
        keep = []
        for path in paths:
            other = _shard_of(path.name)
            same_array = other is not None and other.count == self.shard.count
            if path == self.path or not same_array:
                keep.append(path)
        return keep

    def _content(self) -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "process_start": _process_start(os.getpid()),
            "run": self.run_id,
            "shard": None if self.shard is None else str(self.shard),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join(sys.argv)[:500],
        }

    def _stale(self, path: Path, holder: dict[str, Any]) -> bool:
        if holder.get("host") == socket.gethostname():
            start = _process_start(int(holder.get("pid", -1)))
            if start is None:
                return True
            recorded = holder.get("process_start")
            # the same pid with another start time is another process (pid reuse)
            return recorded is not None and start > 0 and abs(start - float(recorded)) > 1.0
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return True
        return age > self.stale_after

    def _clear_if_stale(self, path: Path) -> None:
        holder = read_lock(path)
        if holder is None:
            # unreadable: an old tool's lock, or being replaced; judged by age alone
            with contextlib.suppress(FileNotFoundError):
                if time.time() - path.stat().st_mtime <= self.stale_after:
                    return
            holder = {"run": None}
        elif not self._stale(path, holder):
            return
        tomb = path.with_name(f".taken-{uuid.uuid4().hex[:8]}")
        try:
            os.replace(path, tomb)
        except FileNotFoundError:
            return  # another run took it over first
        taken = read_lock(tomb) or {"run": None}
        if taken.get("run") != holder.get("run"):
            # between reading and renaming, another run replaced the stale lock: give it back
            with contextlib.suppress(FileExistsError):
                os.link(tomb, path)
        else:
            log.warning(
                "taking over the lock of a run that is gone (%s)", describe(holder) or path.name
            )
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tomb)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            holder = read_lock(self.path)
            if holder is None or holder.get("run") != self.run_id:
                self.lost = True
                log.error("the lock on %s was taken over by another run", self.folder.parent.parent)
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def _remove_mine(self) -> None:
        holder = read_lock(self.path)
        if holder is not None and holder.get("run") == self.run_id:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._remove_mine()


def read_lock(path: str | os.PathLike) -> dict[str, Any] | None:
    data = atomic.read_json(path)
    return data if isinstance(data, dict) else None


def describe(holder: dict[str, Any] | None) -> str:
    """``host h, pid 12, started 2025-01-31 02:00:00 UTC, run 2025…``."""
    if not holder:
        return ""
    parts = [f"host {holder.get('host', '?')}", f"pid {holder.get('pid', '?')}"]
    if holder.get("started"):
        parts.append(f"started {holder['started']}")
    if holder.get("shard"):
        parts.append(f"shard {holder['shard']}")
    if holder.get("run"):
        parts.append(f"run {holder['run']}")
    return ", ".join(parts)


def _shard_of(name: str) -> Shard | None:
    if not (name.startswith("shard-") and name.endswith(".lock")):
        return None
    index, _, count = name[6:-5].partition("-of-")
    try:
        return Shard(int(index), int(count))
    except ValueError:
        return None


def _process_start(pid: int) -> float | None:
    """The start time of process ``pid`` (seconds since the epoch; 0.0 when it runs but
    cannot be inspected), None if no such process runs."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.AccessDenied:
        return 0.0
    except (psutil.NoSuchProcess, ValueError):
        return None


def holders(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The locks currently in ``folder`` (for messages and tests)."""
    out = []
    for path in sorted(Path(folder).glob("*.lock")):
        holder = read_lock(path)
        if holder is not None:
            out.append({**holder, "file": path.name})
    return out


@contextlib.contextmanager
def short_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` for a short section (shards of one array
    rewriting the shared report and root metadata one after the other). Where ``flock``
    is missing it does nothing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
