"""What a local worker does when it starts (the local cluster's ``--preload``).

Kept apart from :mod:`pipeline.cluster.clients` so that a worker's start imports nothing
heavy: the imports its blocks need run in a background thread (:data:`WARM_ENV`).
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import threading
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

#: Modules (comma-separated) a worker imports in the background from its start.
WARM_ENV = "PIPELINE_WORKER_WARM"
#: Set (non-empty) when the driver is not logging at debug level.
QUIET_ENV = "PIPELINE_WORKER_QUIET"
#: distributed's own configuration logs tornado.application at ERROR: "Exception in callback"
TORNADO_LOGS = ("tornado", "tornado.application")


def dask_setup(worker: Any) -> None:
    """Worker preload (``--preload pipeline.cluster.worker_start``): a local worker
    ignores SIGINT and starts importing what its blocks will need.

    Ctrl-C in a terminal reaches every process of the foreground group; the driver then
    stops the run and closes the cluster, while workers that took the signal themselves
    would only print tracebacks. The imports (torch, the backend, the block stages: 1-2 s
    on a small machine) run in a background thread: the worker joins the cluster at once,
    and they overlap the driver's planning instead of delaying the first block."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.environ.get(QUIET_ENV):
        # tornado's tracebacks of callbacks that fail while a worker closes (seen on
        # Ctrl-C) reach the terminal like distributed's own logs, which silence_logs hides
        for name in TORNADO_LOGS:
            logging.getLogger(name).setLevel(logging.CRITICAL)
    modules = [m for m in os.environ.get(WARM_ENV, "").split(",") if m]
    if modules:
        threading.Thread(target=_import_all, args=(modules,), daemon=True).start()


def _import_all(modules: Sequence[str]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - the block importing it will say what is wrong
            log.debug("warming %s failed: %s", name, exc)
