"""Files written atomically: readers see the old content or the new, never a mix.

The content goes to a temporary file beside the target, is flushed to disk, then renamed
over the target (``os.replace``); on any error the temporary file is removed and the target
is unchanged (:func:`replacing`, the one place this is done). Used for the run report, the
ledger, locks and staging records, and for what the output root shows (previews, GeoJSON,
the run page: :func:`write_output`).
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from pipeline.errors import OutputError


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
        problem = f"cannot write the {what} ({exc.strerror or exc})"
        raise OutputError(problem, where=path, hint="check permissions and free space") from exc
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
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
