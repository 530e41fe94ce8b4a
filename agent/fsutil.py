"""Crash-safe file writes: temp file in the same directory, fsync, rename, fsync the directory."""

from __future__ import annotations

import os
from pathlib import Path

# isort: off
import hw  # noqa: F401 - first: it defers shutil, which tempfile imports (hw/__init__.py)
import tempfile
# isort: on


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so that a power cut leaves the old or the new file, never half.

    The temp file is created with ``mode`` from the start, so a secret is never readable by
    others, not even for a moment. ``durable=False`` skips the fsyncs for files that are rewritten
    often and merely informative (status.json): readers still never see half a file, and the SD
    card is spared a flush a second.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """fsync a directory, so a rename or a new file in it survives a power cut."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (0700) if missing; the state dir holds the token cache."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
