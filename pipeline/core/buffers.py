"""Block-sized host arrays reused from block to block within a thread.

A block's input window and its output are tens of MB each. Fresh memory of that size
comes from the kernel one page fault at a time, and numpy asks for transparent huge
pages for it, whose faults (zeroing 2 MB, compacting memory to find it) cost more still
on a virtual machine: on a 2-core VM that was a quarter of the CPU time of a run with
the identity model. :func:`reused` hands out the memory of the previous array of the
same role in the same thread instead, once nothing refers to that array any more, so a
block thread faults its buffers in once (plain pages of an anonymous map).

Safety rests on reference counts: a numpy view, a torch tensor made with
``torch.from_numpy`` and any other holder keep a reference to the array they read, so a
buffer still in use anywhere is never handed out again (a new one is made instead).
"""

from __future__ import annotations

import math
import mmap
import sys
import threading

import numpy as np

__all__ = ["reused"]

_LOCAL = threading.local()

#: References to a held buffer that nobody else uses: the table's, the local name's and
#: ``sys.getrefcount``'s own argument.
_FREE = 3


def reused(role: str, shape: tuple[int, ...], dtype: np.dtype | str) -> np.ndarray:
    """An uninitialised C-contiguous array of ``shape`` and ``dtype``: the memory of this
    thread's previous ``role`` array when nothing refers to it any more and it is large
    enough, else new memory (which then becomes the role's buffer)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    held: dict[str, np.ndarray] | None = getattr(_LOCAL, "held", None)
    if held is None:
        held = _LOCAL.held = {}
    base = held.get(role)
    if base is None or base.nbytes < nbytes or sys.getrefcount(base) > _FREE:
        base = held[role] = np.frombuffer(mmap.mmap(-1, max(nbytes, 1)), np.uint8)
    return base[:nbytes].view(dtype).reshape(shape)
