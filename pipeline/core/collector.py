"""The cycle collector kept off what lives for a whole run.

Once torch, zarr and dask are imported, a process holds about a quarter of a million
objects that live until it ends: modules, classes, functions. Every full collection of
Python's cycle collector walks all of them (0.12 s on a 2-core VM), and a run on an
8192² slide with the identity model triggers one or two: about 5 % of its time.

:func:`frozen` moves every object that exists into the collector's permanent generation
for the duration of a run (``gc.freeze``) and returns them when it ends
(``gc.unfreeze``); :func:`freeze_loaded` does it again once a model and its runtime
are loaded in a process, the other moment when many long-lived objects appear. Objects
made later are collected as usual. Reference counting frees frozen objects as before:
only a reference cycle among them waits, until the run ends (in a Dask worker, which
has no end of run, cycles among what existed when its model was loaded stay).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["freeze_loaded", "frozen"]


def freeze_loaded() -> None:
    """Keep every object that exists now out of the cycle collector's walks."""
    gc.freeze()


@contextlib.contextmanager
def frozen() -> Iterator[None]:
    """Objects that exist when entering (and those frozen inside) are not walked by the
    cycle collector until the block ends; then they are collectable again."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
