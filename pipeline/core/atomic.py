"""Files written atomically: readers see the old content or the new, never a mix.

The content goes to a temporary file beside the target, is flushed to disk, then renamed
over the target (``os.replace``); on any error the temporary file is removed and the target
is unchanged (:func:`replacing`, the one place this is done). Used for the run report, the
ledger, locks and staging records, and for what the output root shows (previews, GeoJSON,
the run page: :func:`write_output`).

Files written in place by others (Zarr's chunks and metadata) are made durable by
:func:`sync_path` and :func:`sync_tree` before anything records them as written: after a
power loss, a file the kernel had not yet written back reads as empty.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from pipeline.errors import DiskFullError, OutputError, ReadOnlyOutputError


@contextlib.contextmanager
def replacing(path: str | os.PathLike, *, text: bool = True, durable: bool = True) -> Iterator[IO]:
    """A new file (UTF-8 text, or binary) that replaces ``path`` when the block ends
    without error (``durable``: fsync before the rename); on an error ``path`` is
    unchanged and the temporary file removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        # os.open with 0o666 honours the umask (mkstemp would leave the file 0600)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "w" if text else "wb", encoding="utf-8" if text else None) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str, *, durable: bool = True) -> Path:
    """Write ``text`` to ``path`` atomically (``durable``: fsync before the rename)."""
    with replacing(path, durable=durable) as f:
        f.write(text)
    return Path(path)


def write_output(path: str | os.PathLike, data: bytes, what: str) -> Path:
    """Write ``data`` to ``path`` atomically and durably, its folder created: a file the
    output root shows. ``what`` names the file in errors.

    Raises
    ------
    OutputError
        When the file cannot be written (``path`` is then unchanged).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path, text=False) as f:
            f.write(data)
    except OSError as exc:
        raise output_error(exc, path, f"the {what}") from exc
    return path


def write_json(path: str | os.PathLike, data: Any, *, durable: bool = True) -> Path:
    """``data`` as indented JSON, atomically (see :func:`write_text`)."""
    return write_text(path, json.dumps(data, indent=2, default=str) + "\n", durable=durable)


def read_json(path: str | os.PathLike) -> Any | None:
    """The JSON in ``path``, or None when it is missing, unreadable or not JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def create_json(path: str | os.PathLike, data: Any) -> bool:
    """Create ``path`` holding ``data`` only if it does not exist yet; True if created.

    The content is complete before the name appears (a temporary file is hard-linked to
    ``path``; ``link`` fails atomically when the name exists, also on NFS), so a reader
    never sees an empty or partial file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    write_text(tmp, json.dumps(data, indent=2, default=str) + "\n")
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames inside the folder ``path`` durable (best effort)."""
    with contextlib.suppress(OSError):
        sync_path(path)


#: What fsync of a folder raises on file systems that do not support it (some network
#: file systems): nothing to be done there, the folder's entries are as durable as it gets.
_NO_DIR_SYNC = frozenset((errno.EINVAL, errno.ENOTSUP, errno.EBADF))


#: Threads that flush the files of a tree at once.
_SYNC_THREADS = 8


def sync_path(path: str | os.PathLike) -> bool:
    """Flush the file or folder ``path`` to disk (fsync): its content, or a folder's
    entries. False when it does not exist.

    Raises
    ------
    OSError
        When the flush fails (``EIO``, or ``ENOSPC`` on file systems that allocate late):
        what was written may not be on disk.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        os.fsync(fd)
    except OSError as exc:
        if not (exc.errno in _NO_DIR_SYNC and os.path.isdir(path)):
            raise
    finally:
        os.close(fd)
    return True


def sync_tree(root: str | os.PathLike) -> int:
    """Flush every file and folder under ``root``, and ``root`` itself, to disk: files
    first, then folders deepest first, so after a power loss the tree reads as it was
    written (without this, files the kernel had not yet written back come back empty).
    Returns how many files were flushed.

    The files are flushed by a few threads: each flush mostly waits (on the disk, or on
    the server of a network file system), and waits overlap.

    Raises
    ------
    OSError
        As :func:`sync_path`.
    """
    from concurrent.futures import ThreadPoolExecutor

    folders, files = [], []
    for folder, _, names in os.walk(root):
        folders.append(folder)
        files.extend(os.path.join(folder, name) for name in names)
    with ThreadPoolExecutor(max_workers=_SYNC_THREADS) as pool:
        count = sum(pool.map(sync_path, files))
    for folder in reversed(folders):
        sync_path(folder)
    return count


def output_error(exc: OSError, folder: str | os.PathLike, what: str = "the output") -> OutputError:
    """A clear error for a write of ``what`` that failed in ``folder``: what went wrong,
    where, and the free space (a full disk and a read-only one have their own classes)."""
    folder = Path(folder)
    free = free_space(folder)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(
            f"no space left on the device ({free})",
            where=folder,
            hint="free some space or choose another --out, then rerun the same command: "
            "finished blocks are kept",
        )
    if exc.errno == errno.EROFS:
        return ReadOnlyOutputError(
            "the output is on a read-only file system", where=folder, hint="choose a writable --out"
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return OutputError(
            f"permission denied writing {what}",
            where=folder,
            hint="check the folder's permissions or choose another --out",
        )
    return OutputError(
        f"cannot write {what} ({exc.strerror or exc}; {free})",
        where=folder,
        hint="check the file system and rerun the same command",
    )


def free_space(folder: str | os.PathLike) -> str:
    """``"free 1.2 MB of 8.0 MB"`` for the file system holding ``folder``."""
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return "free space unknown"
    return f"free {_size(usage.free)} of {_size(usage.total)}"


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"
