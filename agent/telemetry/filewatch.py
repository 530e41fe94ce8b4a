"""Notice at once, without polling, that a file was deleted, renamed away or replaced (Linux inotify).

docs/INTERFACE.md promises that an outbox file deleted or replaced while the agent runs is
noticed within one upload interval. Looking at it once an interval wakes an idle box every
``interval_s`` for nothing; inotify tells us instead. One watch on the file's inode:
``IN_ATTRIB`` (its link count dropped: unlinked, or another file renamed over it),
``IN_MOVE_SELF`` (renamed away), ``IN_DELETE_SELF``; one on its directory for the directory
itself going. Events on other files in the directory (SQLite's -wal, status.json's atomic
rewrites) do not reach us, so they cost no wake-up either.

A thread blocks in ``select`` on the inotify fd and a stop pipe (no timeout: an idle watch
never wakes) and calls ``on_change``. ``rearm()`` watches whatever file the path names now (the
owner calls it after it reopened the file). Where inotify is missing (not Linux, no libc, the
per-user watch limit reached) ``start`` returns False and the owner keeps its periodic look.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import struct
import threading
from collections.abc import Callable
from pathlib import Path

from agent.clock import load_libc
from agent.wakeup import name_os_thread

log = logging.getLogger(__name__)

IN_ATTRIB = 0x00000004
IN_MOVE_SELF = 0x00000800
IN_DELETE_SELF = 0x00000400
IN_IGNORED = 0x00008000
IN_CLOEXEC = 0o2000000
IN_NONBLOCK = 0o4000
FILE_MASK = IN_ATTRIB | IN_MOVE_SELF | IN_DELETE_SELF
DIR_MASK = IN_MOVE_SELF | IN_DELETE_SELF
_EVENT = struct.Struct("iIII")          # wd, mask, cookie, len (struct inotify_event)


class FileWatch:
    """Calls ``on_change()`` (on its own thread) when the file at ``path`` may not be the same."""

    def __init__(self, path: Path, on_change: Callable[[], None]) -> None:
        self.path = path
        self._on_change = on_change
        self._libc: ctypes.CDLL | None = None
        self._fd = -1
        self._wds: set[int] = set()
        self._lock = threading.Lock()
        self._stop_r = self._stop_w = -1
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        return self._thread is not None

    def start(self) -> bool:
        """Watch the path; False when inotify is not available here (the owner polls then)."""
        try:
            libc = load_libc()
            fd = libc.inotify_init1(IN_CLOEXEC | IN_NONBLOCK)
        except (OSError, AttributeError) as err:
            log.debug("no inotify (%s): the outbox file is looked at once an upload interval", err)
            return False
        if fd < 0:
            log.debug("inotify_init1: %s", os.strerror(ctypes.get_errno()))
            return False
        self._libc, self._fd = libc, fd
        if not self.rearm():
            self._close_fds()
            return False
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="outbox-watch", daemon=True)
        self._thread.start()
        return True

    def rearm(self) -> bool:
        """Watch the inode the path names now (and its directory); False if that failed."""
        if self._libc is None:
            return False
        with self._lock:
            wds = set()
            for target, mask in ((self.path, FILE_MASK), (self.path.parent, DIR_MASK)):
                wd = self._libc.inotify_add_watch(self._fd, os.fsencode(target), mask)
                if wd < 0:
                    log.debug("inotify_add_watch %s: %s", target, os.strerror(ctypes.get_errno()))
                    return False
                wds.add(wd)
            for old in self._wds - wds:       # the replaced file's inode, if it still exists
                self._libc.inotify_rm_watch(self._fd, old)
            self._wds = wds
            return True

    def stop(self) -> None:
        if self._thread is not None:
            with contextlib.suppress(OSError):
                os.write(self._stop_w, b"x")
            self._thread.join(2.0)
            self._thread = None
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in (self._fd, self._stop_r, self._stop_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._stop_r = self._stop_w = -1

    def _run(self) -> None:
        name_os_thread()
        while True:
            try:
                ready, _, _ = select.select([self._fd, self._stop_r], [], [])
            except InterruptedError:
                continue
            if self._stop_r in ready:
                return
            try:
                data = os.read(self._fd, 4096)
            except BlockingIOError:
                continue
            except OSError as err:
                log.warning("outbox file watch failed (%s); looking at the file once an interval", err)
                return
            if self._relevant(data):
                try:
                    self._on_change()
                except Exception:   # noqa: BLE001 - the owner's bug must not end the watch
                    log.exception("outbox file watch callback failed")

    def _relevant(self, data: bytes) -> bool:
        """Any event on a watch we still hold (not the IN_IGNORED of one we replaced)."""
        with self._lock:
            wds = set(self._wds)
        offset, hit = 0, False
        while offset + _EVENT.size <= len(data):
            wd, mask, _, length = _EVENT.unpack_from(data, offset)
            offset += _EVENT.size + length
            if wd in wds and not mask & IN_IGNORED:
                hit = True
        return hit
