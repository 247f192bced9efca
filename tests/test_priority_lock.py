"""The device lock's order: urgent waiters first, then first come, first served."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.core.priority_lock import PriorityLock


def _queue(lock: PriorityLock, order: list[str], waiters: list[tuple[str, int]]) -> list:
    """Start one thread per ``(name, priority)``, each queued before the next starts."""
    threads = []
    for name, priority in waiters:

        def take(name=name, priority=priority) -> None:
            lock.acquire(priority)
            try:
                order.append(name)
            finally:
                lock.release()

        before = len(lock._waiting)
        thread = threading.Thread(target=take)
        thread.start()
        deadline = time.monotonic() + 10
        while len(lock._waiting) == before:  # queued behind the holder
            assert time.monotonic() < deadline, "a waiter never queued"
            time.sleep(0.001)
        threads.append(thread)
    return threads


@pytest.mark.parametrize(
    "waiters, expected",
    [
        ([("block1", 1), ("block2", 1), ("shared", 0)], ["shared", "block1", "block2"]),
        ([("a", 1), ("b", 1), ("c", 1)], ["a", "b", "c"]),
        ([("s1", 0), ("b", 1), ("s2", 0)], ["s1", "s2", "b"]),
    ],
)
def test_the_lock_goes_to_the_most_urgent_then_the_earliest(waiters, expected):
    lock, order = PriorityLock(), []
    with lock:
        threads = _queue(lock, order, waiters)
        assert order == []  # nobody got in while it was held
    for thread in threads:
        thread.join(10)
    assert order == expected


def test_the_holder_may_take_it_again_and_others_wait_for_the_last_release():
    lock, order = PriorityLock(), []
    lock.acquire()
    lock.acquire(0)  # reentrant, whatever the priority
    (thread,) = _queue(lock, order, [("other", 0)])
    lock.release()
    time.sleep(0.05)
    assert order == []  # still held once
    lock.release()
    thread.join(10)
    assert order == ["other"]


def test_only_the_holder_may_release():
    lock = PriorityLock()
    with pytest.raises(RuntimeError, match="does not hold"):
        lock.release()
    lock.acquire()
    failed = []

    def other() -> None:
        try:
            lock.release()
        except RuntimeError:
            failed.append(True)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join(10)
    assert failed == [True]
    lock.release()
