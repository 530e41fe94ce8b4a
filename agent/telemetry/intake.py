"""The outbox's intake log: a small preallocated file beside the database where each ``put`` is
made durable with one ``pwrite`` + ``fdatasync`` (SD-card wear: one 4 KiB page a put), while
the rows wait in SQLite's open transaction for the next batch COMMIT (agent/telemetry/outbox.py).

Why a file of its own: a durable SQLite commit appends at least one WAL frame (24 B + a 512 B
page) that crosses a 4 KiB kernel page 13 % of the time, so no SQLite setting writes less than
~4,630 B a commit (docs/PERFORMANCE.md "Telemetry"). A record of ~100 B appended to a file whose
blocks are already allocated (written with zeros once, fsynced) costs the one page it lands in:
``fdatasync`` has no size or block map to write back.

Format: ``SIZE`` bytes; records from offset 0, back to back, each a header (``HEADER``: payload
length, CRC-32 of everything after the CRC, database id, generation, index) and a payload (the
JSON list of operations the outbox applied, see ``Outbox._apply``). A scan takes records from
offset 0 while each is whole, its CRC right, its database id and generation those of the first
record and its index one more than the last: the first one that is not (zeros, a torn write
from a power cut, a record of an older generation left behind) ends the log. Starting a new
generation (after the database committed the old one) writes nothing: the next record goes to
offset 0 with the next generation number, and what lies beyond it is old and ignored.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.fsutil import fsync_dir

log = logging.getLogger(__name__)

SIZE = 64 * 1024            # the file, preallocated; the outbox commits at 3/4 of it
BLOCK = 4096                # what an append writes: the 4 KiB block(s) the record lands in
HEADER = struct.Struct("<IIQII")   # payload length, crc32, database id, generation, index
_CRC_FROM = 8               # the CRC covers the header from here on, and the payload
FORMAT = 0                  # the record format, in the length field's top byte (payloads < 16 MiB):
                            # a reader meeting a newer one stops there, loudly (a downgrade)
_LENGTH = 0xFFFFFF


class LogFull(Exception):  # noqa: N818 - a state: the outbox commits and starts a new generation
    """The record does not fit in what is left of the log."""


@dataclass
class Run:
    """The valid records at the head of a log: their database id and generation (0 when there
    are none), their payloads in order, and the offset just after the last one."""

    db_id: int = 0
    generation: int = 0
    records: list[list[Any]] = field(default_factory=list)
    end: int = 0
    bad: str | None = None      # a whole record of this run that cannot be used (what ended it)


def scan(data: bytes) -> Run:
    """The run of valid records from offset 0 of ``data`` (see the module docstring)."""
    run, offset = Run(), 0
    while offset + HEADER.size <= len(data):
        length, crc, db_id, generation, index = HEADER.unpack_from(data, offset)
        version, length = length >> 24, length & _LENGTH
        end = offset + HEADER.size + length
        if length == 0 or end > len(data):
            break
        if zlib.crc32(data[offset + _CRC_FROM:end]) != crc:
            break
        if run.records and (db_id, generation, index) != (run.db_id, run.generation, len(run.records)):
            break
        if not run.records and index != 0:
            break
        # A whole record of this run (its CRC right): what it holds must be usable, or the run
        # ends here and says so (an unknown format or operation: written by a newer agent).
        if version > FORMAT:
            run.bad = f"record {len(run.records)} has format {version} (this agent reads {FORMAT})"
            break
        try:
            ops = json.loads(data[offset + HEADER.size:end])
        except ValueError:
            run.bad = f"record {len(run.records)} is not JSON"
            break
        why = _invalid(ops)
        if why is not None:
            run.bad = f"record {len(run.records)}: {why}"
            break
        run.db_id, run.generation = db_id, generation
        run.records.append(ops)
        offset = run.end = end
    return run


def _invalid(ops: Any) -> str | None:
    """Why ``ops`` is not a list of operations ``Outbox._apply`` knows, or None."""
    if not isinstance(ops, list):
        return "not a list of operations"
    for op in ops:
        if not (isinstance(op, list) and len(op) == 2 and isinstance(op[1], list)):
            return "an operation of the wrong shape"
        kind, arg = op
        if kind == "i":
            if not all(isinstance(r, list) and len(r) == 6 and _is_int(r[0]) and isinstance(r[1], str)
                       for r in arg):
                return "an insert of the wrong shape"
        elif kind == "d":
            if not all(isinstance(r, list) and len(r) == 2 and _is_int(r[0]) and _is_int(r[1]) for r in arg):
                return "a delete of the wrong shape"
        elif kind == "m":
            if not all(isinstance(r, list) and len(r) == 2 and isinstance(r[0], str) for r in arg):
                return "a meta change of the wrong shape"
        else:
            return f"unknown operation {str(kind)[:20]!r}"
    return None


def _is_int(x: Any) -> bool:
    return type(x) is int


def read(path: Path) -> tuple[Run, int] | None:
    """The run at the head of the log at ``path`` and the file's size (read-only: ``status``
    while the service is stopped); None when there is no log."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    return scan(data), len(data)


def payload(ops: list[Any]) -> bytes:
    """A record's payload: the operations as compact JSON."""
    return json.dumps(ops, ensure_ascii=False, separators=(",", ":")).encode()


def encode(body: bytes, *, db_id: int, generation: int, index: int) -> bytes:
    rest = HEADER.pack(len(body), 0, db_id, generation, index)[_CRC_FROM:] + body
    return struct.pack("<II", len(body) | FORMAT << 24, zlib.crc32(rest)) + rest


class IntakeLog:
    """The open log file of one outbox. Not thread-safe: the outbox's lock guards it.

    Raises (``open``): OSError when the file cannot be created, preallocated or opened for
    writing (read-only or full filesystem): the outbox then commits every change itself.
    """

    def __init__(self, path: Path, size: int | None = None) -> None:
        self.path = Path(path)
        self.size = size or SIZE
        if self.size % BLOCK:
            raise ValueError(f"intake log size {self.size} is not a multiple of {BLOCK}")
        self._fd: int | None = None
        self._direct = False
        self._image: mmap.mmap | None = None   # the file as on disk (page-aligned for O_DIRECT)
        self.db_id = 0
        self.generation = 0
        self.index = 0
        self.offset = 0
        self.found: Run | None = None   # what open() read, also when it then failed (full disk)

    def open(self) -> Run:
        """Open (making it when missing, setting aside one of the wrong size after reading what
        it holds) and return the run found at its head. When it raises, ``found`` is what could
        be read (the caller applies it: nothing a put accepted is ignored)."""
        found = read(self.path)
        run = found[0] if found else Run()
        self.found = run
        if found is not None and (found[1] != self.size or run.bad):
            # Set aside only once the new one is made (a full disk keeps it where the next
            # start reads it again).
            aside = _free_name(self.path, "corrupt")
            self._make(keep=aside)
            why = (f"{run.bad}: it and any after it are not applied" if run.bad
                   else f"had {found[1]} bytes instead of {self.size}")
            log.error("outbox: intake log %s %s; moved aside to %s (the %d records before are used)",
                      self.path.name, why, aside.name, len(run.records))
        elif found is None:
            self._make()
        self._fd, self._direct = _open_rw(self.path)
        try:
            image = mmap.mmap(-1, self.size)
            with self.path.open("rb") as f:
                image[:] = f.read(self.size).ljust(self.size, b"\0")
        except BaseException:
            self.close()
            raise
        self._image = image
        return run

    def rewrite(self) -> None:
        """The file deleted or replaced under us: write the image (every record of the current
        generation, as on disk) to a new file at ``path`` (fsynced, renamed, directory fsynced)
        and append there from now on, same generation, same offset.

        Raises:
            OSError: it could not be made (the old file stays in use: appends are then lost
                on a power cut, the caller stops using the log).
        """
        if self._fd is None or self._image is None:
            raise OSError("intake log closed")
        _write_file(self.path, bytes(self._image))
        fd, direct = _open_rw(self.path)
        old, self._fd, self._direct = self._fd, fd, direct
        os.close(old)

    def unlinked(self) -> bool:
        """Is the open file no longer linked anywhere (deleted, or replaced by a rename)? One fstat."""
        return self._fd is not None and os.fstat(self._fd).st_nlink == 0

    def _make(self, keep: Path | None = None) -> None:
        """A new log: written with zeros and fsynced (blocks allocated, size final) under a
        temporary name, then renamed, so a crash never leaves a short log behind. ``keep``: the
        old file is linked there first."""
        _write_file(self.path, bytes(self.size), keep=keep)

    def start(self, db_id: int, generation: int, *, after: Run | None = None) -> None:
        """Write the next records as ``generation`` of database ``db_id``: from offset 0, or
        after ``after`` (that generation's records, still uncommitted) to continue it."""
        self.db_id, self.generation = db_id, generation
        if after is not None and after.records and (after.db_id, after.generation) == (db_id, generation):
            self.index, self.offset = len(after.records), after.end
        else:
            self.index, self.offset = 0, 0

    def replaced(self) -> bool:
        """Is the open file no longer the one at ``path`` (deleted, or another renamed there)?"""
        if self._fd is None:
            return False
        mine = os.fstat(self._fd)
        try:
            there = os.stat(self.path)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return (mine.st_dev, mine.st_ino) != (there.st_dev, there.st_ino)

    @property
    def fill(self) -> float:
        return self.offset / self.size

    @property
    def empty(self) -> bool:
        return self.index == 0

    def fits(self, body: bytes) -> bool:
        return self.offset + HEADER.size + len(body) <= self.size

    def append(self, body: bytes) -> None:
        """One record (``body`` from ``payload``), durable when this returns (one ``pwrite`` +
        ``fdatasync``).

        Raises:
            LogFull: no room for it (nothing written).
            OSError: the write failed; what is on disk at the tail is then unknown, and the
                offset does not move (the next record overwrites it).
        """
        if self._fd is None or self._image is None:
            raise OSError("intake log closed")
        data = encode(body, db_id=self.db_id, generation=self.generation, index=self.index)
        if self.offset + len(data) > self.size:
            raise LogFull(f"{len(data)} B record, {self.size - self.offset} B left")
        old = self._image[self.offset:self.offset + len(data)]
        self._image[self.offset:self.offset + len(data)] = data
        try:
            self._write(self.offset, len(data))
        except BaseException:
            self._image[self.offset:self.offset + len(data)] = old
            raise
        self.offset += len(data)
        self.index += 1

    def _write(self, start: int, length: int) -> None:
        """``image[start:start + length]`` to the file, durable (``fdatasync``)."""
        try:
            self._write_once(start, length)
        except OSError as err:
            if not (self._direct and err.errno == errno.EINVAL):
                raise
            # A filesystem that opens with O_DIRECT but refuses the write (alignment, FUSE):
            # plain writes from now on.
            log.info("outbox: %s: O_DIRECT refused (%s); plain writes", self.path.name, err)
            assert self._fd is not None
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
            os.close(self._fd)
            self._fd, self._direct = fd, False
            self._write_once(start, length)

    def _write_once(self, start: int, length: int) -> None:
        assert self._fd is not None and self._image is not None
        if self._direct:
            start, end = start // BLOCK * BLOCK, -(-(start + length) // BLOCK) * BLOCK
        else:
            end = start + length
        view = memoryview(self._image)[start:end]
        try:
            written = os.pwrite(self._fd, view, start)
        finally:
            view.release()
        if written != end - start:
            raise OSError(f"short write to {self.path}: {written} of {end - start} B")
        os.fdatasync(self._fd)

    def read_back(self) -> Run:
        """The run written so far (to rebuild the transaction SQLite rolled back): what every
        successful append put on disk."""
        if self._image is None:
            raise OSError("intake log closed")
        return scan(bytes(self._image))

    def clear(self) -> None:
        """Zero the first record's header (after the database committed everything: a clean
        stop), so whatever opens the log next finds it empty, whatever database sits beside it."""
        if self._fd is None or self._image is None:
            return
        self._image[:HEADER.size] = b"\0" * HEADER.size
        self._write(0, HEADER.size)
        self.index = self.offset = 0

    def close(self) -> None:
        if self._image is not None:
            self._image.close()
            self._image = None
        if self._fd is not None:
            try:
                os.close(self._fd)
            finally:
                self._fd = None


def _open_rw(path: Path) -> tuple[int, bool]:
    """The log open for appends: (fd, whether O_DIRECT)."""
    # O_DIRECT: an append writes exactly the 4 KiB block(s) it lands in. Through the page
    # cache the kernel writes back whole folios, and a kernel that caches the file in large
    # folios (ext4 since Linux 6.16) would write 16 KiB or 64 KiB for a 100 B record.
    # Filesystems without O_DIRECT (tmpfs before 6.6) get plain writes.
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_DIRECT), True
    except OSError:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC), False


def _write_file(path: Path, data: bytes, *, keep: Path | None = None) -> None:
    """``data`` as the file at ``path``: written under a temporary name and fsynced (blocks
    allocated, size final), renamed, the directory fsynced: a crash never leaves a short log."""
    tmp = path.with_name(path.name + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        for start in range(0, len(data), BLOCK):     # page by page: small folios for plain writes too
            view = memoryview(data)[start:start + BLOCK]
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    if keep is not None:
        try:
            os.link(path, keep)           # the old file stays at path until the new one replaces it
        except OSError:
            os.replace(path, keep)        # no hard links (vfat)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def aside_name(path: Path) -> Path:
    """Where a log that cannot be used is moved aside: ``<log>.corrupt-<n>``."""
    return _free_name(path, "corrupt")


def _free_name(path: Path, what: str) -> Path:
    n = 1
    while path.with_name(f"{path.name}.{what}-{n}").exists():
        n += 1
    return path.with_name(f"{path.name}.{what}-{n}")


def merged_ranges(spans: list[list[int]]) -> list[list[int]]:
    """The [first, last] seq ranges of the log's deletes, sorted, overlapping or adjacent ones
    merged: what replaying them deletes (the outbox after another database's log, ``status``)."""
    out: list[list[int]] = []
    for first, last in sorted(spans):
        if out and first <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], last)
        else:
            out.append([first, last])
    return out
