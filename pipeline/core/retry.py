"""Transient I/O errors are retried a few times with backoff; everything else is not.

A network file system may fail a read once (``EIO``, ``ESTALE``, a timeout) and succeed
the next time. A damaged file fails every time: the readers raise
:class:`~pipeline.errors.InputError` (``corrupt-input``) for it, which is never retried,
nor is a full disk, a read-only folder or a missing file.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from typing import TypeVar

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: errno values worth another try: the same call may succeed a moment later.
TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EIO",
        "EAGAIN",
        "EINTR",
        "EBUSY",
        "ETIMEDOUT",
        "ESTALE",
        "ECONNRESET",
        "ECONNABORTED",
        "ECONNREFUSED",
        "EHOSTUNREACH",
        "ENETUNREACH",
        "ENETDOWN",
        "ENOLCK",
        "EREMOTEIO",
    )
    if hasattr(errno, name)
)

#: Tries in all (the first and the retries) and the first pause in seconds (doubled each time).
ATTEMPTS = 4
DELAY = 0.5


def is_transient(exc: BaseException) -> bool:
    """True for an ``OSError`` that may pass when tried again (see :data:`TRANSIENT_ERRNOS`);
    never for the pipeline's own errors (a corrupt input is an ``InputError``)."""
    return (
        isinstance(exc, OSError)
        and not isinstance(exc, PipelineError)
        and exc.errno in TRANSIENT_ERRNOS
    )


def retrying(
    fn: Callable[..., T],
    *args: object,
    attempts: int = ATTEMPTS,
    delay: float = DELAY,
    what: str = "",
    **kwargs: object,
) -> T:
    """``fn(*args, **kwargs)``, tried up to ``attempts`` times while it fails transiently.

    Pauses ``delay``, ``2 * delay``, ... seconds between tries; the last error is raised.
    """
    for attempt in range(1, attempts + 1):
        try:
            return fn(*args, **kwargs)
        except OSError as exc:
            if attempt == attempts or not is_transient(exc):
                raise
            pause = delay * 2 ** (attempt - 1)
            log.warning(
                "%s: %s (try %d of %d); retrying in %.1f s",
                what or getattr(fn, "__name__", "call"),
                exc,
                attempt,
                attempts,
                pause,
            )
            time.sleep(pause)
    raise AssertionError("unreachable")  # the loop returns or raises
