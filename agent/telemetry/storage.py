"""Storage trouble as a state: telling a full or read-only state directory from other errors,
and the space kept in reserve so that acknowledging deliveries still works on a full disk.

Why a reserve file: SQLite in WAL mode needs free space to *delete* rows too (the deletion is
appended to the WAL before it is checkpointed into the database). On a full disk the uploader
could then deliver a batch but never record it, and would send it again and again. A small
preallocated file (``<db>.reserve``, written with zeros and fsynced, so the filesystem really
allocated its blocks) is given back the moment the disk is found full: acks and dead-letters then
have room, while new readings are refused (and counted as dropped) until the filesystem has
room for the reserve again.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

Storage = Literal["ok", "full", "read_only"]

RESERVE_BYTES = 512 * 1024
_SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_FULL, _SQLITE_CANTOPEN = 8, 10, 13, 14
LOW_WATER = 64 * 1024           # an I/O error with less free space than this is a full disk


class StorageUnavailable(Exception):  # noqa: N818 - a state, not a bug
    """The outbox cannot store readings now: ``storage`` is "full" or "read_only"."""

    def __init__(self, storage: Storage, detail: str = "") -> None:
        super().__init__(f"storage {storage.replace('_', '-')}" + (f" ({detail})" if detail else ""))
        self.storage = storage


def classify(err: BaseException, directory: Path) -> Storage | None:
    """"full" or "read_only" when ``err`` (sqlite3 or OS) comes from the state directory's
    filesystem being full or read-only; None for anything else (a bug, a corrupt file...)."""
    code = getattr(err, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    number = getattr(err, "errno", None)
    if read_only(directory) or number == errno.EROFS or primary == _SQLITE_READONLY:
        return "read_only"
    if number in (errno.ENOSPC, errno.EDQUOT) or primary == _SQLITE_FULL:
        return "full"
    if primary in (_SQLITE_IOERR, _SQLITE_CANTOPEN) or (isinstance(err, sqlite3.OperationalError)
                                                        and "disk is full" in str(err)):
        free = free_bytes(directory)
        if free is not None and free < LOW_WATER:
            return "full"
    return None


def read_only(directory: Path) -> bool:
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def free_bytes(directory: Path) -> int | None:
    """Bytes an unprivileged writer may still use there (None if it cannot be asked)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class Reserve:
    """``path``, ``size`` bytes really allocated; ``release()`` gives them back to the disk."""

    def __init__(self, path: Path, size: int = RESERVE_BYTES) -> None:
        self.path = Path(path)
        self.size = size

    @property
    def held(self) -> bool:
        try:
            return self.path.stat().st_size >= self.size
        except OSError:
            return False

    def make(self) -> bool:
        """Allocate the reserve (if it is not there yet). False when there is no room (or the
        filesystem is read-only): then nothing is left behind."""
        if self.size <= 0 or self.held:
            return True
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                block = b"\0" * 65536
                left = self.size
                while left > 0:
                    left -= os.write(fd, block[:left])
                os.fsync(fd)
            finally:
                os.close(fd)
            return True
        except OSError as err:
            log.debug("storage reserve %s: %s", self.path, err)
            self.release()
            return False

    def release(self) -> bool:
        """Give the space back. True if there was something to give."""
        try:
            self.path.unlink()
            return True
        except FileNotFoundError:
            return False
        except OSError as err:
            log.debug("storage reserve %s not released: %s", self.path, err)
            return False
