"""A reentrant lock that hands itself to the most urgent waiter first.

The device section of a worker is one lock that several block threads queue for. A
plain lock wakes waiters in no particular order, so a task whose result other blocks
wait for (the shared edge tiles of a block pair) could wait behind every block that
arrived after it, and with it every block that needs it: on a 2-core VM that left one
block of four starting half a second late. :class:`PriorityLock` serves waiters by
``(priority, arrival)``: a lower priority number first, and first come, first served
among equals.
"""

from __future__ import annotations

import heapq
import itertools
import threading

__all__ = ["PriorityLock"]


class PriorityLock:
    """Reentrant mutual exclusion; when released, it goes to the waiter with the lowest
    ``priority`` (:meth:`acquire`), the earliest among equals. ``with lock:`` takes it at
    :attr:`DEFAULT`."""

    #: The priority of ``with lock:`` (and of :meth:`acquire` without one).
    DEFAULT = 1

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0
        self._waiting: list[tuple[int, int]] = []  # heap of (priority, arrival)
        self._arrivals = itertools.count()

    def acquire(self, priority: int = DEFAULT) -> bool:
        """Wait for the lock (at once when this thread holds it already)."""
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return True
            entry = (priority, next(self._arrivals))
            heapq.heappush(self._waiting, entry)
            try:
                while self._owner is not None or self._waiting[0] != entry:
                    self._cond.wait()
            except BaseException:  # interrupted while waiting: leave the queue
                self._waiting.remove(entry)
                heapq.heapify(self._waiting)
                self._cond.notify_all()
                raise
            heapq.heappop(self._waiting)
            self._owner, self._depth = me, 1
            return True

    def release(self) -> None:
        """Release one level of this thread's hold; the last one hands the lock on."""
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("cannot release a lock this thread does not hold")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify_all()

    def __enter__(self) -> PriorityLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
