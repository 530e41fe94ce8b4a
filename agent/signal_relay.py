"""Signal handlers that take no lock: the handler writes one byte, a thread does the work.

Python runs a signal handler in the main thread between two bytecodes, so it may interrupt
code that holds a lock (``Event.set`` holds its Condition, ``logging`` its handler lock,
``Thread.start`` the interpreter's thread table). A handler that takes the same lock again
deadlocks the process: a second SIGTERM arriving while the first handler is inside
``Event.set`` froze ``device-agent run`` for good. So every handler in the agent goes through
``relay_signals``: the handler only ``os.write``s the signal number to a non-blocking pipe
(no Python lock), and a daemon thread reads it and calls the callback, where locks, logging
and threads are safe. A burst that fills the pipe drops bytes, which is harmless: one is
enough to stop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

_STOP_RELAY = 0      # no real signal has number 0: it tells the relay thread to end


def relay_signals(signums: Iterable[int], callback: Callable[[int], None],
                  *, name: str = "signals") -> Callable[[], None]:
    """Install lock-free handlers for ``signums`` that call ``callback(signum)`` on a thread.

    Returns ``restore``: puts the previous handlers back and ends the thread. Outside the
    main thread (where Python allows no handler) nothing is installed and ``restore`` does
    nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)

    def handler(signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(OSError):    # full pipe (a burst) or closed: one byte is enough
            os.write(write_fd, bytes((signum,)))

    def relay() -> None:
        try:
            while True:
                try:
                    data = os.read(read_fd, 64)
                except InterruptedError:
                    continue
                if not data:
                    return
                for signum in data:
                    if signum == _STOP_RELAY:
                        return
                    callback(signum)
        finally:
            os.close(read_fd)

    thread = threading.Thread(target=relay, name=name, daemon=True)
    thread.start()
    previous: dict[int, Any] = {}
    for signum in signums:
        previous[signum] = signal.signal(signum, handler)

    def restore() -> None:
        for signum, old in previous.items():
            signal.signal(signum, old)
        previous.clear()
        with contextlib.suppress(OSError):
            os.set_blocking(write_fd, True)
            os.write(write_fd, bytes((_STOP_RELAY,)))
        thread.join(timeout=5.0)
        with contextlib.suppress(OSError):
            os.close(write_fd)

    return restore
