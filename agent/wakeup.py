"""Waiting for news without polling: an Event that others can follow, and a wait on several.

An idle box should sleep until someone has news (a reading queued, a command, a new code
requested, stop), not look every quarter second (docs/PERFORMANCE.md: wake-ups a minute). A
``threading.Event`` wakes one wait; a thread that must react to several (its own wake-up and the
service's stop) used to wait on one in short slices and look at the others in between.
``Signal`` is an Event whose ``set`` also sets the events that follow it, so ``wait_any`` sleeps
on one private event until any of them is set, or the timeout passes.

A plain ``threading.Event`` among them (a test's stop event) still works: it is looked at every
``PLAIN_EVENT_POLL_S``, the old slicing, only for the waits that have one.
"""

from __future__ import annotations

import threading
import time

PLAIN_EVENT_POLL_S = 0.25


class Signal(threading.Event):
    """A ``threading.Event`` that wakes ``wait_any`` calls waiting on it with others."""

    def __init__(self) -> None:
        super().__init__()
        self._followers: list[threading.Event] = []
        self._followers_lock = threading.RLock()   # set() may come from a signal handler

    def set(self) -> None:
        super().set()
        with self._followers_lock:
            followers = list(self._followers)
        for follower in followers:
            follower.set()

    def _follow(self, event: threading.Event) -> None:
        with self._followers_lock:
            self._followers.append(event)

    def _unfollow(self, event: threading.Event) -> None:
        with self._followers_lock:
            try:
                self._followers.remove(event)
            except ValueError:
                pass


def wait_any(timeout_s: float, *events: threading.Event) -> bool:
    """Sleep until one of ``events`` is set or ``timeout_s`` (monotonic) has passed.

    Returns whether one is set. ``Signal``s wake the wait at once; plain Events within
    ``PLAIN_EVENT_POLL_S``. ``timeout_s`` may be ``math.inf``.
    """
    if any(e.is_set() for e in events):
        return True
    signals = [e for e in events if isinstance(e, Signal)]
    plain = [e for e in events if not isinstance(e, Signal)]
    if not signals and len(plain) == 1:
        return plain[0].wait(None if timeout_s == float("inf") else max(0.0, timeout_s))
    woken = threading.Event()
    for s in signals:
        s._follow(woken)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            woken.clear()      # before looking: a set() from now on leaves it set for the wait
            if any(e.is_set() for e in events):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if plain:
                left = min(left, PLAIN_EVENT_POLL_S)
            woken.wait(None if left == float("inf") else left)
    finally:
        for s in signals:
            s._unfollow(woken)


def name_os_thread(name: str | None = None) -> None:
    """Give the calling thread its Python name in the kernel too (``/proc/PID/task/TID/comm``,
    15 bytes), so ``top -H`` and the idle bench can say which thread wakes; Python 3.11 leaves
    every thread called "python". Never raises: a name is a convenience."""
    comm = (name or threading.current_thread().name).encode()[:15]
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "wb") as f:
            f.write(comm)
    except OSError:
        pass
