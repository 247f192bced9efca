"""Atomic file writes for what the output root shows (previews, the run page)."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

from pipeline.errors import OutputError


def write_atomic(path: str | os.PathLike, data: bytes, what: str) -> Path:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never half.

    The bytes go to a temporary file beside ``path``, are flushed to disk, then renamed
    over ``path``; the folder is created. ``what`` names the file in errors.

    Raises
    ------
    OutputError
        When the file cannot be written (``path`` is then unchanged).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # os.open with 0o666 honours the umask (mkstemp would leave the file 0600)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise OutputError(
            f"cannot write the {what} ({exc.strerror or exc})",
            where=path,
            hint="check permissions and free space",
        ) from exc
    return path
