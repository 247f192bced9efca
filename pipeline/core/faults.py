"""Fault injection for the test suite and benchmarks: off unless ``PIPELINE_FAULTS`` is set.

The code calls :func:`point` at named moments (a block about to run, a block written but
not yet recorded, between the two renames of publishing...). With ``PIPELINE_FAULTS``
unset, a point does nothing. Otherwise the variable lists rules, separated by ``;``::

    POINT[@MATCH]=ACTION[*COUNT]

``POINT``
    the point's name. On workers: ``prepare`` (about to open an input), ``open`` (opening
    it, retried), ``shared`` (a block's first phase), ``block`` (a block about to run its
    stages), ``block-written`` (a block's chunks written, its done-record not yet),
    ``finalize``. In the driver: ``fingerprint`` (reading an input for its run key,
    retried), ``publish-aside`` (old output moved aside, new one not yet in),
    ``publish-moved`` (new output in place, ledger not yet updated), ``report``.
``MATCH``
    the point's subject as text: the output name (``prepare``, ``open``, ``finalize``,
    ``publish-*``), ``NAME/INDEX`` for blocks (``slide_1/5``), the input path
    (``fingerprint``); any subject when left out.
``ACTION``
    ``kill`` (SIGKILL this process: a worker dies, or the driver when the point runs
    there), ``killgroup`` (SIGKILL this process group: the driver and its local workers
    at once, as ``kill -9 -PGID`` would), ``oserror`` (raise a transient
    ``OSError(EIO)``), ``enospc`` (raise ``OSError(ENOSPC)``), ``sleep:SECONDS``.
``COUNT``
    fire this many times in all, counted across processes in the folder
    ``PIPELINE_FAULTS_DIR`` (required with a count); every time when left out.

Example: ``PIPELINE_FAULTS="block@slide_1/5=kill*1"`` kills the worker that first runs
block 5 of ``slide_1``; Dask reruns the block on another worker.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time

log = logging.getLogger(__name__)

ENV = "PIPELINE_FAULTS"
ENV_DIR = "PIPELINE_FAULTS_DIR"


def point(name: str, subject: object = None) -> None:
    """Act on the rules of ``PIPELINE_FAULTS`` that match ``name`` and ``subject``."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    for rule in filter(None, (r.strip() for r in spec.split(";"))):
        where, _, action = rule.partition("=")
        at, _, match = where.partition("@")
        if at != name or (match and match != str(subject)):
            continue
        action, _, count = action.partition("*")
        if count and not _take(rule, int(count)):
            continue
        _act(action, f"{name}@{subject}")


def _take(rule: str, count: int) -> bool:
    """Claim one of ``count`` firings of ``rule``, across processes (a file per firing)."""
    folder = os.environ.get(ENV_DIR)
    if not folder:
        raise RuntimeError(f"{ENV} has a count but {ENV_DIR} is not set")
    stem = "".join(c if c.isalnum() else "_" for c in rule)
    for i in range(count):
        try:
            fd = os.open(os.path.join(folder, f"{stem}.{i}"), os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return True
    return False


def _act(action: str, where: str) -> None:
    log.warning("fault injected at %s: %s", where, action)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # never returns: the signal is delivered first
    elif action == "killgroup":
        os.killpg(os.getpgid(0), signal.SIGKILL)
        time.sleep(60)
    elif action == "oserror":
        raise OSError(errno.EIO, f"injected I/O error at {where}")
    elif action == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {where})")
    elif action.startswith("sleep:"):
        time.sleep(float(action[6:]))
    else:
        raise ValueError(f"unknown fault action {action!r} in {ENV}")
