"""Signal handling that takes no lock and needs no help from the main thread.

Python runs a signal handler in the main thread between two bytecodes, so it may interrupt
code that holds a lock (``Event.set`` holds its Condition, ``logging`` its handler lock,
``Thread.start`` the interpreter's thread table). A handler that takes the same lock again
deadlocks the process: a second SIGTERM arriving while the first handler is inside
``Event.set`` froze ``device-agent run`` for good. And the kernel may deliver a signal to any
thread: the Python handler then waits until the main thread next runs bytecode, which an idle
agent, asleep in one long wait, may never do.

So every handler in the agent goes through ``relay_signals``: the Python handler does nothing;
``signal.set_wakeup_fd`` makes the interpreter's C-level handler write the signal number to a
non-blocking pipe at once, from whichever thread the signal landed on; a daemon thread reads it
and calls the callback, where locks, logging and threads are safe. A burst that fills the pipe
drops bytes, which is harmless: one is enough to stop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

from agent.wakeup import name_os_thread

_STOP_RELAY = 0      # no real signal has number 0: it tells the relay thread to end


def _noted(signum: int, frame: FrameType | None) -> None:
    """The Python-level handler: nothing (the wake-up fd already carried the signal)."""


def relay_signals(signums: Iterable[int], callback: Callable[[int], None],
                  *, name: str = "signals", ignore_after: bool = False) -> Callable[[], None]:
    """Install lock-free handlers for ``signums`` that call ``callback(signum)`` on a thread.

    Returns ``restore``: puts the previous handlers back and ends the thread. Outside the
    main thread (where Python allows no handler) nothing is installed and ``restore`` does
    nothing. ``ignore_after``: ``restore`` ignores these signals instead, for a process that
    is about to exit: a SIGTERM burst that outlives the stop is the same stop, never a
    KeyboardInterrupt or death by signal in the last flush.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    wanted = frozenset(signums)
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)       # set_wakeup_fd's rule, and a full pipe never blocks

    def relay() -> None:
        name_os_thread()
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
                    if signum in wanted:
                        callback(signum)
        finally:
            os.close(read_fd)

    thread = threading.Thread(target=relay, name=name, daemon=True)
    thread.start()
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    previous: dict[int, Any] = {signum: signal.signal(signum, _noted) for signum in wanted}

    def restore() -> None:
        for signum, old in previous.items():
            signal.signal(signum, signal.SIG_IGN if ignore_after else old)
        previous.clear()
        signal.set_wakeup_fd(previous_fd)
        with contextlib.suppress(OSError):
            os.set_blocking(write_fd, True)
            os.write(write_fd, bytes((_STOP_RELAY,)))
        thread.join(timeout=5.0)
        with contextlib.suppress(OSError):
            os.close(write_fd)

    return restore
