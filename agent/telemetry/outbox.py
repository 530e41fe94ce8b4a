"""Durable SQLite queue between the sampler and the uploader: put / claim / ack / dead-letter.

Why it looks like this:

- WAL + ``synchronous=FULL``, and an intake log in front (agent/telemetry/intake.py): ``put``
  returns only after its readings are on disk, so a reading that ``put`` accepted survives a
  power cut or SIGKILL. The connection keeps one write transaction open; a put inserts its rows
  there and appends one record (the same rows, as stored) to ``<db>.intake`` with one
  ``pwrite`` + ``fdatasync`` (one 4 KiB block a put, where a durable SQLite commit costs ~4.6 KiB:
  SD-card wear). The batch is committed (``synchronous=FULL``, the log's generation in ``meta``
  in the same transaction) when the log is 3/4 full, the transaction has changed
  ``BATCH_BYTES``, ``COMMIT_EVERY_S`` after the last, at close, and at once for what must not
  wait on a log record (dead letters, the loss counted after corruption or a replaced file,
  ``using_connection``). The next open applies the log's records that the database has not
  committed (a torn last record is a put that never returned: ignored), commits, and starts
  the log's next generation. Where the log cannot be made (read-only or full filesystem at
  start) every change is its own commit, as before.
- ``locking_mode=EXCLUSIVE``: the service is the only process that opens the file while it
  runs (``device-agent dead-letter`` asks it through agent/statusfile.py's request files). The WAL
  index then lives in this process's memory instead of a mapped ``-shm`` file whose pages the
  kernel would write back to the SD card after every commit.
- One log record per ``put`` call (the sampler's group commit: every reading due at a tick),
  and it carries the acks that came since the previous one: an ack is held in memory until the
  next ``put`` (at most ``ACK_HOLD_S``, ``ACK_HOLD_MAX`` rows; then a record of its own), so a
  box sampling once a minute writes one block a minute. A power cut loses at most those held
  acks, which only re-sends readings the receiver de-duplicates by id.
- ``seq`` is assigned here, from 1 per device, and never reused. The database holds the
  high-water mark (``meta.seq_hw:<device>`` plus the pending rows). Because a corrupt database is
  replaced by an empty one, a small side file (``<db>.meta.json``, agent/telemetry/sidefile.py) reserves
  seqs in blocks of ``SEQ_BLOCK``: the fresh database continues after the reserved block, so a
  seq already sent can never be sent again for a different reading. Writing the side file once
  per block keeps SD-card wear at one small file per ``SEQ_BLOCK`` readings.
- Bounded by rows and bytes (payload bytes of pending rows): when full, the OLDEST pending
  rows are dropped in the same transaction and counted in ``meta.dropped`` (persistent).
- A corrupt file is moved aside to ``<db>.corrupt-<n>`` (with its -wal), logged at ERROR,
  counted in the side file (``corrupt_replaced``), announced as a state ``notice`` and a new
  database is started; the intake log's records the old one had not committed are applied to
  it (those readings are not lost). A batch COMMIT that fails on a full disk is tried again
  while puts fill the log's last quarter; the readings stay in the log and in the open
  transaction (applied again from the log when SQLite rolled it back). When the log is full
  too, that is the storage state as for any write: new readings are refused until it recovers.
- Compact rows (SD-card wear; the format: agent/telemetry/rowcodec.py): a reading as the sampler
  makes it (sensor, type, value, unit, and its stamp's time) is stored as 11 bytes, its
  sensor/type/unit and its boot as numbers kept in ``meta`` (``word:<n>``, written with the
  first row that uses one, and logged again with its first use in each generation of the intake
  log: self-contained), ~40 bytes a row, so a put rarely needs a new page. Anything else, and
  every row of older files, is JSON and read as such. (A file with compact rows cannot be read
  by an agent from before them.)
- Each row keeps how its reading was stamped (``wall``, ``mono``, ``boot``, ``synced``: see
  agent/clock.py) beside the payload, so its time can be corrected just before upload. A
  dead-lettered row keeps them too (the ``dead`` table has the same four columns), so a reading
  that ``device-agent dead-letter retry`` puts back is labelled exactly as before. Files from
  before these columns get them added on open (``ALTER TABLE``, both tables); their rows have
  none and upload with their stored time as ``unsynced``.

What ``dropped`` counts (``counts().dropped``, shown by status/MQTT/screen) and what it cannot:

- overflow: the oldest rows dropped for the bounds (persistent, exact);
- readings whose ``put`` failed (disk full, I/O error, side-file write error): the caller
  reports them with ``count_lost(n)``. They never got a seq. They are added to the persistent
  counter when the database can still be written, else kept in memory (``counts()`` includes
  them) and written with the next successful ``put``; a crash before that loses the count;
- corruption found while running: the pending rows and the old dropped count, from memory (exact);
- corruption found at start: counted from the moved-aside copy when it can still be partly read
  (its pending seqs and the old ``dropped``), less what the intake log brought back (its rows,
  its acks, its absolute ``dropped``); when it cannot, the readings it
  held are NOT countable: only ``corrupt_replaced``, the ERROR log and the notice show the loss.

Thread-safe: one connection guarded by a lock (the sampler puts, the uploader claims/acks).
"""

from __future__ import annotations

import base64
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from agent.clock import Stamp
from agent.state import OutboxCounts
from agent.telemetry import corruption, intake, readonly
from agent.telemetry.intake import IntakeLog
from agent.telemetry.rowcodec import (
    STAMP_COLUMNS,
    add_stamp_columns,
    decode_reading,
    encode_reading,
    foreign_records,
    stamp_of,
)
from agent.telemetry.sidefile import SideFile
from agent.telemetry.storage import (
    RESERVE_BYTES,
    Reserve,
    Storage,
    StorageUnavailable,
    classify,
    free_bytes,
    read_only,
)

if TYPE_CHECKING:
    from agent.clock import ClockTrust
    from agent.state import AgentState

log = logging.getLogger(__name__)

T = TypeVar("T")

PAGE_SIZE = 512             # SQLite page size of a new outbox file (SD-card wear, see _open)
ACK_HOLD_S = 300.0          # an ack waits this long at most for the next put to carry it
ACK_HOLD_MAX = 64           # more acks than this at once (a backlog draining): written at once
WAL_AUTOCHECKPOINT = 1000   # WAL frames between checkpoints (~0.5 MiB of WAL at 512 B pages)
REPAGE_MAX_BYTES = 4 * 1024 * 1024   # an older file with bigger pages is rebuilt when smaller
SEQ_BLOCK = 10_000          # seqs reserved in the side file at a time
DEAD_MAX_ROWS = 10_000      # dead-letter table bounds: beyond them the oldest dead rows are
DEAD_MAX_BYTES = 8 * 1024 * 1024   # dropped (counted into ``dropped``)
COMMIT_FILL = 0.75          # intake log this full: the batch is committed (agent/telemetry/intake.py)
COMMIT_EVERY_S = 3600.0     # ... or this long after the last batch COMMIT (monotonic)
BATCH_BYTES = 96 * 1024     # ... or once the open transaction changed about this much (rows inserted
                            # and deleted), well inside the page cache: it never spills to the WAL
STORAGE_RECHECK_S = 5.0     # while storage is full/read-only: how often to look for room again
STORAGE_LOG_EVERY_S = 600.0
RECOVER_ROOM_RESERVES = 4   # store again once free space (filesystem + free pages inside the database)
                            # is this many reserves: hysteresis, so a disk at the brink does not flap
_SQL_VARS = 500             # chunk size for IN (...) lists (SQLite's limit is 999 on old builds)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY, payload BLOB NOT NULL,
    wall REAL, mono REAL, boot TEXT, synced INTEGER);
CREATE TABLE IF NOT EXISTS dead (
    id INTEGER PRIMARY KEY, device TEXT NOT NULL, seq INTEGER NOT NULL, payload BLOB NOT NULL,
    reason TEXT NOT NULL, at TEXT NOT NULL, wall REAL, mono REAL, boot TEXT, synced INTEGER);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class Row:
    """One pending reading. ``reading`` is the docs/INTERFACE.md reading object (id and seq included;
    ``time`` and ``time_quality`` as the clock labelled them at claim). ``stamp``: how it was
    sampled (None for rows queued before stamps existed)."""

    seq: int
    reading: dict[str, Any]
    stamp: Stamp | None = None


class Outbox:
    """The durable queue. See the module docstring for the guarantees.

    ``state`` (optional): where a corrupt-file replacement is announced (``notice``).
    ``clock`` (optional): labels each claimed reading's ``time``/``time_quality``.

    Raises:
        sqlite3.OperationalError: the file cannot be opened at all (permissions, disk full).
    """

    def __init__(self, path: Path, device_id: str, *, max_rows: int, max_bytes: int,
                 state: AgentState | None = None, dead_max_rows: int = DEAD_MAX_ROWS,
                 dead_max_bytes: int = DEAD_MAX_BYTES, reserve_bytes: int = RESERVE_BYTES,
                 clock: ClockTrust | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        if max_rows < 1 or max_bytes < 1:
            raise ValueError("max_rows and max_bytes must be positive")
        self.path = Path(path)
        self.device_id = device_id
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.dead_max_rows = dead_max_rows
        self.dead_max_bytes = dead_max_bytes
        self._state = state
        self.clock = clock
        self._lock = threading.RLock()
        self._side = SideFile(self.path.with_name(self.path.name + ".meta.json"))   # seq reservations
        self.corrupt_files: list[Path] = []
        self._db: sqlite3.Connection | None = None
        self._pending = 0
        self._pending_bytes = 0
        self._dead = 0
        self._dropped = 0
        self._lost_unsaved = 0      # lost readings not yet in meta.dropped (the DB was unwritable)
        self._next_seq = 1
        self._data_version: int | None = None
        self._monotonic = monotonic
        self.storage: Storage = "ok"
        self._space = Reserve(self.path.with_name(self.path.name + ".reserve"), reserve_bytes)
        self._storage_checked = -math.inf
        self._storage_logged = -math.inf
        self._degraded_conn = False     # opened read-only / as a stand-in: reopen when storage returns
        self._held: dict[int, str | None] = {}   # delivered (None) or dead (reason), not yet on disk
        self._held_since = 0.0                   # monotonic: when the first held ack came
        self._lost_reasons: dict[str, int] = {}  # of _lost_unsaved, per reason
        self._file_id: tuple[int, int] | None = None
        self._replacing = False
        self._words: dict[str, int] = {}         # compact rows: sensor kinds and boots, by number
        self._texts: dict[int, str] = {}         # (meta "word:<n>", written with the first row using it)
        self._logged_words: set[int] = set()     # words defined in the intake log's current generation
        self._intake_path = self.path.with_name(self.path.name + ".intake")
        self._replayed: tuple[list[list[int]], int] = ([], 0)   # another database's log applied at
                                                             # open: its seq ranges deleted, rows left out
        self._intake: IntakeLog | None = None    # None: every change is its own commit (see _open)
        self._db_id = 0                          # meta "intake_id": whose records the log holds
        self._batch_bytes = 0                    # changed in the open transaction since its BEGIN
        self._committed_at = monotonic()
        self._commit_failed_at: float | None = None
        self._relink_failed = False              # the deleted intake log could not be made again
        self._open_checked()

    # ----------------------------------------------------------------- public API

    def put(self, readings: Sequence[Mapping[str, Any]],
            stamps: Sequence[Stamp | None] | None = None) -> list[int]:
        """Queue ``readings`` (sensor, type, value, unit, time) in one durable transaction;
        ``stamps``: one per reading (agent/clock.py), or None.

        Returns the assigned seqs. When this returns, the readings are on disk.
        """
        if not readings:
            return []
        marks: list[Stamp | None] = list(stamps) if stamps is not None else [None] * len(readings)
        if len(marks) != len(readings):
            raise ValueError("one stamp per reading")
        with self._lock:
            if self.storage != "ok" and not self._recover():
                raise StorageUnavailable(self.storage, "reading not stored")
            seqs = self._write(lambda: self._put(readings, marks))
            self._maybe_commit()
            return seqs

    def claim(self, limit: int) -> list[Row]:
        """The oldest ``limit`` pending rows, ascending seq. They stay queued until acked."""
        with self._lock:
            self._notice_outside_changes()
            if self.storage != "ok":
                self._recover()
            else:
                self._flush_stale_acks()
            self._maybe_commit()
            self._ensure_tx(quiet=True)
            return self._retry_corrupt(lambda: self._claim(limit))

    def ack(self, seqs: Iterable[int]) -> None:
        """The sink confirmed these: remove them for good. A few are held in memory and written
        by the next ``put``'s transaction (one commit, one leaf page for both: SD-card wear);
        ``claim`` and ``counts`` treat them as gone at once."""
        seqs = sorted(set(seqs))
        if not seqs:
            return
        with self._lock:
            if (self.storage == "ok" and len(self._held) + len(seqs) <= ACK_HOLD_MAX
                    and all(r is None for r in self._held.values())):
                if not self._held:
                    self._held_since = self._monotonic()
                for seq in seqs:
                    self._held[seq] = None
                return
            self._remove_or_hold(seqs, None)

    def flush_acks(self) -> None:
        """Write the acks held for the next ``put`` now and commit the batch (close, sign-out,
        dead-letter commands: a box signed out is often unplugged next)."""
        with self._lock:
            if self._held and self.storage == "ok" and self._db is not None and not self._degraded_conn:
                self._flush_held()
            self._maybe_commit(force=True)

    def _flush_stale_acks(self) -> None:
        if (self._held and self._monotonic() - self._held_since >= ACK_HOLD_S and self._db is not None
                and not self._degraded_conn):
            self._flush_held()          # one intake record (durable), no batch commit

    def dead_letter(self, seqs: Iterable[int], reason: str) -> None:
        """The sink will never accept these: move them to the dead-letter table (kept, counted)."""
        seqs = sorted(set(seqs))
        if not seqs:
            return
        with self._lock:
            self._remove_or_hold(seqs, reason)

    def count_lost(self, n: int, reason: str | None = None) -> bool:
        """``n`` readings were lost before they got a seq (their ``put`` failed): count them as
        dropped (``reason``: default "storage full"/"storage read-only" while that is the state,
        else "put failed"). Never raises. Returns False when the count could only be kept in
        memory (the database is unwritable too); the next successful ``put`` writes it."""
        if n <= 0:
            return True
        with self._lock:
            why = reason or (f"storage {self.storage.replace('_', '-')}" if self.storage != "ok"
                             else "put failed")
            self._lost_unsaved += n
            self._lost_reasons[why] = self._lost_reasons.get(why, 0) + n
            if self.storage != "ok":
                return False            # no write attempts on a full disk: the reserve is for acks
            return self._save_lost()

    def check_file(self) -> bool:
        """Is the open database still the file at ``path``? When it was deleted or replaced
        (compared by st_dev/st_ino), the rows it held are counted as dropped, a new database is
        opened there and seq continues. Cheap (two stats: the intake log beside it too); the
        uploader calls it every step. Returns True when it had to switch."""
        with self._lock:
            if self._db is None or self._degraded_conn or self._file_id is None:
                return False
            now_id = _file_id(self.path)
            if now_id == self._file_id:
                self._check_intake()
                return False
            what = "deleted" if now_id is None else "replaced"
            counts = self.counts()
            lost = counts.pending + counts.dead
            old_dropped, next_seq = counts.dropped, self._next_seq
            self.close()
            # The -wal and -shm beside the path are the old database's: SQLite would replay that
            # WAL onto whatever file is there now (corrupting it, or resurrecting old rows).
            for suffix in ("-wal", "-shm"):
                try:
                    self.path.with_name(self.path.name + suffix).unlink()
                except FileNotFoundError:
                    pass
            self._held.clear()
            self._lost_unsaved, self._lost_reasons = 0, {}
            self._replacing = True
            try:
                self._open_checked()
            finally:
                self._replacing = False
            # We know exactly what the old file handed out: continue right after it.
            top = self._conn().execute("SELECT coalesce(max(seq), 0) FROM outbox").fetchone()[0]
            self._next_seq = max(next_seq, top + 1)
            if self._next_seq - 1 + SEQ_BLOCK > self._side.reserved(self.device_id) or not self._side.path.exists():
                try:
                    self._side.reserve(self.device_id, self._next_seq - 1 + SEQ_BLOCK)
                except OSError as err:      # the loss is still counted; a put past it tries again
                    log.warning("outbox: seq reservation not written (%s)", err)
            total = max(self._dropped, old_dropped) + lost
            try:
                with self._durable() as db:
                    _count_dropped(db, total, lost, f"outbox file {what}")
            except (sqlite3.Error, OSError) as err:
                log.debug("outbox: could not record the loss: %s", err)
            self._dropped = total
            msg = (f"outbox file {what} while running: {lost} readings it held are lost (counted as "
                   f"dropped); a new one is in use, seq continues at {self._next_seq}")
            log.error("%s (%s)", msg, self.path)
            if self._state is not None:
                self._state.update(notice=msg, outbox=self.counts())
            return True

    def _save_lost(self) -> bool:
        if not self._lost_unsaved:
            return True
        try:
            with self._changing() as do:
                do(["m", [["dropped", self._dropped + self._lost_unsaved], *self._lost_reason_values()]])
        except (sqlite3.Error, OSError, RuntimeError) as err:
            log.debug("outbox: could not record %d lost readings on disk: %s", self._lost_unsaved, err)
            return False
        self._dropped += self._lost_unsaved
        self._lost_unsaved = 0
        self._lost_reasons.clear()
        return True

    def _lost_reason_values(self) -> list[list[Any]]:
        """meta ``dropped:<reason>`` after adding ``_lost_reasons``: absolute values (an intake
        record must give the same result however often it is applied)."""
        db = self._conn()
        out: list[list[Any]] = []
        for reason, n in self._lost_reasons.items():
            row = db.execute("SELECT value FROM meta WHERE key = ?", (f"dropped:{reason}",)).fetchone()
            out.append([f"dropped:{reason}", int(row[0] if row and row[0] is not None else 0) + n])
        return out

    def counts(self) -> OutboxCounts:
        with self._lock:
            self._notice_outside_changes()
            held_dead = sum(1 for r in self._held.values() if r is not None)
            return OutboxCounts(pending=self._pending - len(self._held), dead=self._dead + held_dead,
                                dropped=self._dropped + self._lost_unsaved)

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    @property
    def corrupt_replaced(self) -> int:
        """How many corrupt database files were moved aside over the device's life."""
        return self._side.corrupt_replaced

    @property
    def next_seq(self) -> int:
        return self._next_seq

    def dead_rows(self, limit: int = 100) -> list[tuple[int, str, dict[str, Any]]]:
        """(seq, reason, reading) of dead-lettered rows of this device, oldest first."""
        with self._lock:
            cur = self._conn().execute(
                "SELECT seq, reason, payload, wall FROM dead WHERE device = ? ORDER BY id LIMIT ?",
                (self.device_id, limit))
            return [(s, r, self._reading(s, p, w)) for s, r, p, w in cur]

    def using_connection(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``op`` on the outbox's own connection between two of its transactions (the
        running service's side of ``device-agent dead-letter``: nobody else may open the file),
        then re-read the counters it may have changed.

        Raises:
            RuntimeError: the outbox is closed; whatever ``op`` raises.
        """
        with self._lock:
            self.flush_acks()
            db = self._conn()
            if self._intake is not None:
                # op runs its own transactions: the batch is committed first (raises if it cannot be)
                self._commit_batch(reopen=False)
            try:
                return op(db)
            finally:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                self._ensure_tx(quiet=True)
                self._reload_counts()

    def close(self) -> None:
        self._close(commit=True)

    def _close(self, *, commit: bool) -> None:
        """``commit``: held acks written and the batch committed (a clean stop); without, the
        intake log keeps what the open transaction held (the database is being replaced)."""
        with self._lock:
            try:
                if commit:
                    self.flush_acks()
            except (sqlite3.Error, OSError, StorageUnavailable) as err:
                log.debug("outbox: held acks not written at close (sent again next run): %s", err)
            if commit and self._intake is not None and self._db is not None:
                try:
                    self._commit_batch(reopen=False)
                    self._intake.clear()        # all in the database: the next start finds it empty
                except (sqlite3.Error, OSError) as err:
                    log.warning("outbox: not committed at close (%s); the intake log keeps the readings "
                                "for the next start", err)
            if self._intake is not None:
                self._intake.close()
                self._intake = None
            if self._db is not None:
                try:
                    self._db.close()
                finally:
                    self._db = None

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- internals

    # ---- storage trouble (see agent/telemetry/storage.py)

    def _write(self, op: Callable[[], T]) -> T:
        """``op`` (a write); a full or read-only disk becomes the storage state and
        StorageUnavailable, anything else propagates."""
        try:
            return self._retry_corrupt(op)
        except (sqlite3.OperationalError, OSError) as err:
            problem = classify(err, self.path.parent)
            if problem is None:
                raise
            self._storage_trouble(problem, f"{type(err).__name__}: {err}")
            raise StorageUnavailable(problem, str(err)) from err

    # ---- the intake log and the open transaction (agent/telemetry/intake.py)
    #
    # While the log is in use, the connection keeps one write transaction open, and what it
    # holds is always the last COMMIT plus the log's records of the current generation, in
    # order: every change either appends a record (durable on its own: a put) or commits the
    # batch with it (dead letters, counts after a loss). When SQLite rolls the transaction back
    # by itself (a full disk at COMMIT) the records are applied again from the log.

    def _apply(self, db: sqlite3.Connection, ops: list[list[Any]]) -> None:
        """Apply intake operations: ``["i", rows]`` (outbox rows as stored, payload base64),
        ``["d", [[first, last], ...]]`` (seq ranges deleted), ``["m", [[key, value], ...]]``.
        Absolute values only: the same result however often a record is applied."""
        for kind, arg in ops:
            before = db.total_changes
            if kind == "i":
                db.executemany("INSERT OR REPLACE INTO outbox (seq, payload, wall, mono, boot, synced) "
                               "VALUES (?, ?, ?, ?, ?, ?)",
                               [(q, base64.b64decode(p), w, m, b, y) for q, p, w, m, b, y in arg])
                self._batch_bytes += sum(len(r[1]) for r in arg)
            elif kind == "d":
                db.executemany("DELETE FROM outbox WHERE seq BETWEEN ? AND ?", arg)
            elif kind == "m":
                db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", arg)
            else:
                raise ValueError(f"unknown intake operation {kind!r}")
            self._batch_bytes += 48 * (db.total_changes - before)

    @contextmanager
    def _changing(self) -> Iterator[Callable[[list[Any]], None]]:
        """One durable change, built by calling ``do(op)`` (applied at once, so the next op sees
        it): with the intake log, inside the open transaction plus one log record (or the batch
        committed with it when the log has no room); without it, its own transaction."""
        db = self._conn()
        ops: list[list[Any]] = []

        def do(op: list[Any]) -> None:
            self._apply(db, [op])
            ops.append(op)

        if self._intake is None:
            with _tx(db):
                yield do
            return
        self._ensure_tx()
        db.execute("SAVEPOINT change")
        released = False
        try:
            yield do
            log_file = self._intake
            payload = intake.payload(ops) if ops else b""
            # Deleted under us and not made again, or no room: this change commits the batch
            # (refused when that fails too: the log's image rebuilds the rest).
            if not ops or ((not log_file.unlinked() or self._relink(log_file)) and log_file.fits(payload)):
                if ops:
                    log_file.append(payload)
                db.execute("RELEASE change")
            else:
                db.execute("RELEASE change")
                released = True
                self._commit_batch(force=True)        # this change in the same commit
        except BaseException:
            if not released:
                self._undo("change")
            raise

    @contextmanager
    def _durable(self) -> Iterator[sqlite3.Connection]:
        """A change made durable by a COMMIT of its own (with the batch before it): dead letters,
        losses counted after corruption or a replaced file. Without the log: a transaction."""
        db = self._conn()
        if self._intake is None:
            with _tx(db):
                yield db
            return
        self._ensure_tx()
        db.execute("SAVEPOINT durable")
        try:
            yield db
            db.execute("RELEASE durable")
        except BaseException:
            self._undo("durable")
            raise
        self._commit_batch(force=True)

    def _undo(self, savepoint: str) -> None:
        db = self._conn()
        try:
            db.execute(f"ROLLBACK TO {savepoint}")
            db.execute(f"RELEASE {savepoint}")
        except sqlite3.Error as err:
            log.debug("outbox: rollback to %s: %s (the transaction is rebuilt from the log)", savepoint, err)
        if not db.in_transaction:
            self._ensure_tx(quiet=True)

    def _ensure_tx(self, *, quiet: bool = False) -> None:
        """With the log: the open transaction exists and holds the log's records (after SQLite
        rolled it back on an error, they are applied again). ``quiet``: a failure is only logged
        (readers then see the last COMMIT; the next write tries again)."""
        db = self._db
        if self._intake is None or db is None or self._degraded_conn or db.in_transaction:
            return
        try:
            self._reapply()
        except (sqlite3.Error, OSError) as err:
            if not quiet:
                raise
            log.debug("outbox: intake records not applied again yet: %s", err)

    def _reapply(self) -> None:
        db, log_file = self._conn(), self._intake
        assert log_file is not None
        db.execute("BEGIN IMMEDIATE")
        self._batch_bytes = 0               # the transaction is rebuilt: counted again as applied
        try:
            if not log_file.empty:
                run = log_file.read_back()
                records = run.records if (run.db_id, run.generation) == (self._db_id, log_file.generation) else []
                if len(records) < log_file.index:
                    log.error("outbox: the intake log lost %d of its %d records (%s)",
                              log_file.index - len(records), log_file.index, self._intake_path)
                for ops in records[:log_file.index]:
                    self._apply(db, ops)
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        log.debug("outbox: open transaction rebuilt from %d intake records", log_file.index)

    def _commit_batch(self, *, force: bool = False, reopen: bool = True) -> None:
        """COMMIT the open transaction (synchronous=FULL) with the log's generation in meta, then
        start the log's next generation. ``force``: also when the log is empty (a change made
        inside the transaction without a record). ``reopen``: begin the next transaction.

        On failure the transaction is rolled back (if SQLite did not already) and rebuilt from
        the log, and the error raised: every record is still in the log.
        """
        log_file, db = self._intake, self._conn()
        if log_file is None:
            return
        if not db.in_transaction:
            self._reapply()
        if log_file.empty and not force:
            db.execute("ROLLBACK")                  # nothing in it
        else:
            try:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('intake_gen', ?)", (log_file.generation,))
                db.execute("COMMIT")
            except sqlite3.Error:
                if db.in_transaction:
                    try:
                        db.execute("ROLLBACK")
                    except sqlite3.Error as err:
                        log.debug("outbox: rollback after a failed commit: %s", err)
                self._ensure_tx(quiet=True)
                raise
            log_file.start(self._db_id, log_file.generation + 1)
            self._batch_bytes = 0
            self._logged_words = set()
        self._committed_at = self._monotonic()
        if reopen:
            self._ensure_tx(quiet=True)

    def _maybe_commit(self, *, force: bool = False) -> None:
        """Commit the batch when it is due (the log 3/4 full, the transaction big, an hour since
        the last): never raises. A COMMIT that fails (a full disk) is tried again every
        ``STORAGE_RECHECK_S`` while puts go on filling the log's last quarter: the readings are
        durable there. When the log has no room left, the put's own COMMIT fails and that is
        the storage state (agent/telemetry/storage.py)."""
        log_file, db = self._intake, self._db
        if log_file is None or db is None or self._degraded_conn or log_file.empty:
            return
        now = self._monotonic()
        if not force and not (log_file.fill >= COMMIT_FILL or self._batch_bytes >= BATCH_BYTES
                              or now - self._committed_at >= COMMIT_EVERY_S):
            return
        if self._commit_failed_at is not None and now - self._commit_failed_at < STORAGE_RECHECK_S:
            return
        try:
            self._commit_batch()
        except (sqlite3.Error, OSError) as err:
            # One line when it starts (the storage state, if it comes to that, has its own).
            level = logging.WARNING if self._commit_failed_at is None else logging.DEBUG
            self._commit_failed_at = now
            log.log(level, "outbox: batch COMMIT failed (%s: %s); the readings stay in the intake log "
                    "(%d%% of it used), tried again every %d s", type(err).__name__, err,
                    round(log_file.fill * 100), STORAGE_RECHECK_S)
            return
        if self._commit_failed_at is not None:
            log.info("outbox: batch COMMIT works again")
        self._commit_failed_at = None

    def _check_intake(self) -> None:
        """The intake log deleted or replaced while running: appends would go to a file nobody
        finds after a power cut. The image in memory holds every record of the current
        generation: written to a new file there, the generation goes on at the same offset (no
        COMMIT needed, which a full disk may refuse). When that fails, the batch is committed
        and a new log made; when the COMMIT fails too, the log (and its image, which rebuilds
        the transaction SQLite rolls back) stays, and each put tries again, committing the
        batch with it or refused (the storage state) until one works."""
        log_file = self._intake
        if log_file is None or not log_file.replaced() or self._relink(log_file):
            return
        try:
            self._commit_batch(reopen=False)
        except (sqlite3.Error, OSError) as err:
            log.debug("outbox: could not commit the open batch either (%s)", err)
            return
        log_file.close()
        self._intake = None               # every change its own commit if a new log cannot be made
        fresh = IntakeLog(self._intake_path)
        try:
            run = fresh.open()
            if run.records:
                fresh.clear()             # whatever was put there is not this database's to apply
        except OSError as err:
            fresh.close()
            log.warning("outbox: no new intake log (%s); every reading is its own commit", err)
            return
        fresh.start(self._db_id, log_file.generation)
        self._intake = fresh
        self._relink_failed = False
        self._ensure_tx(quiet=True)

    def _relink(self, log_file: IntakeLog) -> bool:
        """Write the log's image to a new file at its path (``IntakeLog.rewrite``); on a full disk
        with the storage reserve released for it. False when it cannot be made (one ERROR line
        until it works again)."""
        try:
            try:
                log_file.rewrite()
            except OSError as err:
                if classify(err, self.path.parent) != "full" or not self._space.release():
                    raise
                log_file.rewrite()
        except OSError as err:
            level = logging.DEBUG if self._relink_failed else logging.ERROR
            self._relink_failed = True
            log.log(level, "outbox: intake log %s deleted or replaced while running, and it cannot be "
                    "made again (%s: %s): the open batch is committed with the next change, new "
                    "readings refused until that works", self._intake_path.name, type(err).__name__, err)
            return False
        self._relink_failed = False
        log.error("outbox: intake log %s deleted or replaced while running: made again from memory "
                  "(%d records of the open batch)", self._intake_path.name, log_file.index)
        return True

    def _start_intake(self, db: sqlite3.Connection) -> None:
        """At open, before the counters are read: apply what the log holds that the database
        has not committed (a stop without ``close``: power cut, SIGKILL), commit, and start the
        log's next generation. Without a usable log file (read-only or full filesystem) every
        change commits on its own, as before the log, once the records that could still be
        read are applied (and the file removed: they must not be applied again later)."""
        meta = dict(db.execute("SELECT key, value FROM meta WHERE key IN ('intake_id', 'intake_gen')"))
        db_id, committed = int(meta.get("intake_id") or 0), int(meta.get("intake_gen") or 0)
        log_file = IntakeLog(self._intake_path)
        try:
            run = log_file.open()
        except OSError as err:
            log_file.close()
            log.info("outbox: no intake log (%s: %s); every reading is its own commit", self._intake_path.name, err)
            found = log_file.found
            if found is not None and found.records:
                self._replay(db, found, db_id, committed, new_id=False)
                try:
                    if found.bad:         # kept as evidence, never applied
                        os.replace(self._intake_path, intake.aside_name(self._intake_path))
                    else:
                        self._intake_path.unlink(missing_ok=True)
                except OSError as gone:
                    log.error("outbox: intake log %s applied but not removed (%s)", self._intake_path.name, gone)
            return
        try:
            generation, db_id = self._replay(db, run, db_id, committed, new_id=True)
            if run.records:
                log_file.clear()
            log_file.start(db_id, generation + 1)
        except BaseException:
            log_file.close()
            raise
        self._intake, self._db_id = log_file, db_id
        self._batch_bytes, self._committed_at = 0, self._monotonic()
        self._logged_words = set()

    def _replay(self, db: sqlite3.Connection, run: intake.Run, db_id: int, committed: int, *,
                new_id: bool) -> tuple[int, int]:
        """Apply (and commit) the records of ``run`` the database has not committed; ``new_id``:
        give a database without one its intake id. Returns (the generation committed, the id)."""
        fresh = new_id and db_id == 0
        if fresh:
            db_id = int.from_bytes(os.urandom(8), "little") >> 1 or 1
        # Another database's records (this file was replaced, or rebuilt after corruption):
        # none of them is in it, all are applied. Ours: those of a generation not committed.
        replay = bool(run.records) and (run.db_id != db_id or run.generation > committed)
        generation = max(committed, run.generation if run.db_id == db_id else 0)
        if not (fresh or replay):
            return generation, db_id
        records, unknown = run.records, 0
        if replay and run.db_id != db_id:
            records, unknown = foreign_records(run.records)
            spans = [r for ops in records for kind, arg in ops if kind == "d" for r in arg]
            self._replayed = (intake.merged_ranges(spans), unknown)
        with _tx(db):
            if fresh:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('intake_id', ?)", (db_id,))
            if replay:
                for ops in records:
                    self._apply(db, ops)
                if unknown:
                    dropped = int((db.execute("SELECT value FROM meta WHERE key = 'dropped'")
                                   .fetchone() or [0])[0] or 0)
                    _count_dropped(db, dropped + unknown, unknown, "intake log without its words")
            db.execute("INSERT OR REPLACE INTO meta VALUES ('intake_gen', ?)", (generation,))
        if unknown:
            log.error("outbox: %d readings in the intake log of another database use sensor or "
                      "boot numbers it does not define: not stored (counted as dropped)", unknown)
        if replay:
            rows = sum(len(arg) for ops in run.records for kind, arg in ops if kind == "i")
            log.info("outbox: %d intake records (%d readings) applied after a stop without close "
                     "(power cut or kill)", len(run.records), rows)
        return generation, db_id

    def _remove_or_hold(self, seqs: list[int], reason: str | None) -> None:
        """Ack / dead-letter; when the disk cannot take even that, remember it in memory so the
        uploader does not send the same batch again and again (written when storage returns;
        after a crash before that, the rows are sent once more and de-duplicated by id)."""
        if self._held:
            self._flush_held()
        try:
            self._write(lambda: self._remove(seqs, dead_reason=reason))
        except StorageUnavailable:
            for seq in seqs:
                self._held.setdefault(seq, reason)
            log.debug("outbox: %d %s kept in memory (storage %s)", len(seqs),
                      "acks" if reason is None else "dead letters", self.storage)

    def _flush_held(self) -> None:
        held, self._held = self._held, {}
        by_reason: dict[str | None, list[int]] = {}
        for seq, reason in sorted(held.items()):
            by_reason.setdefault(reason, []).append(seq)
        try:
            for reason, seqs in by_reason.items():
                self._write(lambda s=seqs, r=reason: self._remove(s, dead_reason=r))   # type: ignore[misc]
                for seq in seqs:
                    held.pop(seq)
        except StorageUnavailable:
            pass
        finally:
            self._held.update(held)

    def _storage_trouble(self, problem: Storage, detail: str) -> None:
        if problem == "full":
            self._space.release()      # room for acks and dead letters, not for new readings
        self._storage_checked = self._monotonic()
        if self.storage == problem:
            return
        self.storage = problem
        self._log_storage(logging.WARNING, "outbox: storage %s (%s): new readings are not stored (counted "
                          "as dropped) until %s; deliveries go on", problem.replace("_", "-"), detail[:200],
                          "there is room again" if problem == "full" else "the filesystem is writable again")
        self._announce()

    def _log_storage(self, level: int, msg: str, *args: object) -> None:
        """Storage state changes, at most one line per ``STORAGE_LOG_EVERY_S`` at ``level`` (a
        disk that flaps between full and not must not flood the journal); the rest at DEBUG."""
        now = self._monotonic()
        if now - self._storage_logged >= STORAGE_LOG_EVERY_S:
            self._storage_logged = now
        else:
            level = logging.DEBUG
        log.log(level, msg, *args)

    def _announce(self) -> None:
        setter = getattr(self._state, "set_storage", None)
        if setter is not None:
            setter(self.storage)

    def _recover(self) -> bool:
        """Storage is full/read-only: every ``STORAGE_RECHECK_S``, look whether it came back
        (writable, room for ``RECOVER_ROOM_RESERVES`` reserves, counting free pages inside the
        database: after a long outage filled the disk with our own backlog, delivering it frees
        pages there, not on the filesystem). True when storing works again."""
        now = self._monotonic()
        if now - self._storage_checked < STORAGE_RECHECK_S:
            return False
        self._storage_checked = now
        directory = self.path.parent
        if read_only(directory):
            return False
        room = free_bytes(directory) or 0
        if self._db is not None and not self._degraded_conn:
            try:
                pages = self._db.execute("PRAGMA freelist_count").fetchone()[0]
                room += pages * self._db.execute("PRAGMA page_size").fetchone()[0]
            except sqlite3.Error:
                pass
        if room < RECOVER_ROOM_RESERVES * self._space.size:
            return False
        if self._degraded_conn:
            held, lost, reasons = dict(self._held), self._lost_unsaved, dict(self._lost_reasons)
            next_seq = self._next_seq
            self.close()
            try:
                self._open_checked()
            except (sqlite3.Error, OSError) as err:
                log.debug("outbox: reopening failed: %s", err)
                return False
            self._held, self._lost_unsaved, self._lost_reasons = held, lost, reasons
            self._next_seq = max(self._next_seq, next_seq)
            if self._degraded_conn:
                return False
        elif not self._space.make():
            log.debug("outbox: storing again without a full reserve (room only inside the database)")
        previous, self.storage = self.storage, "ok"
        log.info("outbox: storage ok again (was %s; %d kB free); storing readings",
                 previous.replace("_", "-"), room // 1024)
        self._announce()
        if self._held:
            self._flush_held()
        self._save_lost()
        return self.storage == "ok"

    def _open_degraded(self, problem: Storage, err: BaseException) -> None:
        """The database cannot be opened for writing (read-only or full filesystem at start):
        open it read-only so pending readings are still delivered (acks kept in memory), or an
        empty stand-in when even that fails."""
        try:
            db = readonly.connect_read_only(self.path, timeout=30, check_same_thread=False)
            try:
                self._load(db, writable=False)
            except BaseException:
                db.close()
                raise
        except sqlite3.Error:
            db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            db.executescript(_SCHEMA)
            self._load(db, writable=False)
        self._db = db
        self._degraded_conn = True
        self._file_id = None
        self._storage_trouble(problem, f"{type(err).__name__}: {err}")

    def _notice_outside_changes(self) -> None:
        """Another connection committed (``device-agent dead-letter retry|purge`` while we run):
        re-read the counters. ``PRAGMA data_version`` changes only for other connections'
        commits, so this costs one cheap statement when nothing happened."""
        if self._db is None:
            return
        try:
            version = self._db.execute("PRAGMA data_version").fetchone()[0]
            if self._data_version is not None and version != self._data_version:
                self._reload_counts()
                log.info("outbox changed by another process: %d pending, %d dead", self._pending, self._dead)
            self._data_version = version
        except sqlite3.Error as err:
            log.debug("outbox: data_version check failed: %s", err)

    def _reload_counts(self) -> None:
        """Counters from the file, after a change not made by put/ack/dead_letter."""
        db = self._conn()
        self._pending, self._pending_bytes, top = db.execute(
            "SELECT count(*), coalesce(sum(length(payload)), 0), coalesce(max(seq), 0) "
            "FROM outbox").fetchone()
        self._dead = db.execute("SELECT count(*) FROM dead").fetchone()[0]
        row = db.execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone()
        self._dropped = int(row[0]) if row else 0
        self._next_seq = max(self._next_seq, top + 1)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("outbox is closed")
        return self._db

    def _open_checked(self) -> None:
        try:
            self._open()
        except (sqlite3.OperationalError, OSError) as err:
            problem = classify(err, self.path.parent)
            if problem is None:
                raise
            self._open_degraded(problem, err)
        except sqlite3.DatabaseError as err:
            if not corruption.is_corruption(err):
                raise
            aside = self._set_aside()
            salvage = corruption.salvage(aside)
            self._open()
            # What the aside copy held and the intake log did not bring back (its rows, its
            # acks) nor count again (its absolute ``dropped``).
            lost = self._unrescued(*salvage) if salvage is not None else None
            self._report_corrupt(err, aside, lost)
            if lost:
                self._add_dropped(lost)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # 16 statements, not 128: each ack size is a new IN (...) statement (~12 KiB of VDBE).
        db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None, check_same_thread=False,
                             cached_statements=16)
        try:
            os.chmod(self.path, 0o600)
            # Before WAL and the first table, or it is too late: a new file gets small pages, an
            # existing one keeps its size. A commit appends one WAL frame per page it changes (24
            # bytes + the page) and the kernel writes the 4 KiB pages of the WAL file it lands in:
            # one, or two when the frame straddles a boundary (frame size / 4096 of the time).
            # 512 B pages (536 B frames) make that 1.13 pages per commit, the floor of SQLite's
            # WAL (bench/bench_outbox.py, docs/PERFORMANCE.md).
            db.execute(f"PRAGMA page_size={PAGE_SIZE}")
            # Exclusive before the first access to the WAL, so SQLite never creates the mapped
            # -shm index (it is rebuilt in heap memory from the WAL at open): otherwise the
            # kernel writes two index pages back to the card after every commit. The lock is
            # taken at once and held until close; a `dead-letter` command that has the file
            # open makes this wait up to the connect timeout (busy handler).
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            db.execute("PRAGMA journal_mode=WAL").fetchone()
            # Power-cut safety does not depend on the lock or the index: with synchronous=FULL
            # every COMMIT fsyncs the WAL, which holds the committed frames and their checksums,
            # before put() returns; after a power cut the next open replays every complete
            # commit from the WAL (the index is only a cache of where the frames are).
            db.execute("PRAGMA synchronous=FULL")
            # Checkpoints copy WAL frames into the database file (and fsync it): rarer is less
            # wear, while the WAL stays small (~0.5 MiB) on an SD card.
            db.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT}")
            db.execute("PRAGMA cache_size=-256")    # KiB, not 2 MiB: the head and tail of one table
            db.executescript(_SCHEMA)
            add_stamp_columns(db)
            _small_pages(db, self.path)
            self._start_intake(db)
            self._load(db)
            if self._intake is not None:
                db.execute("BEGIN IMMEDIATE")       # the open transaction of the intake log
        except BaseException:
            if self._intake is not None:
                self._intake.close()
                self._intake = None
            db.close()
            raise
        self._db = db
        self._degraded_conn = False
        self._data_version = None
        self._file_id = _file_id(self.path)
        if not self._space.make():
            self._storage_trouble("full", "no room for the storage reserve")

    def _load(self, db: sqlite3.Connection, *, writable: bool = True) -> None:
        """Counters from the database; one scan of the pending rows (lengths only)."""
        dev = self.device_id
        meta = dict(db.execute("SELECT key, value FROM meta"))
        self._texts = {int(k[5:]): str(v) for k, v in meta.items()
                       if isinstance(k, str) and k.startswith("word:") and k[5:].isdigit()}
        self._words = {v: k for k, v in self._texts.items()}
        stored_dev = meta.get("device_id")
        if not writable:
            pass
        elif stored_dev is None:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('device_id', ?)", (dev,))
        elif stored_dev != dev:
            self._adopt_other_device(db, str(stored_dev))
            meta = dict(db.execute("SELECT key, value FROM meta"))
        self._pending, self._pending_bytes, max_pending = db.execute(
            "SELECT count(*), coalesce(sum(length(payload)), 0), coalesce(max(seq), 0) FROM outbox"
        ).fetchone()
        self._dead = db.execute("SELECT count(*) FROM dead").fetchone()[0]
        self._dropped = int(meta.get("dropped", 0))
        hw = max(int(meta.get(f"seq_hw:{dev}", 0)), max_pending)
        if hw == 0 and self._side.reserved(self.device_id):
            # A new database (the old one was corrupt or deleted): continue after everything the
            # old one may have handed out, so no seq is ever reused.
            hw = self._side.reserved(self.device_id)
            if not self._replacing:       # check_file() says where seq continues itself
                log.warning("outbox: new database; seq continues at %d", hw + 1)
        self._next_seq = hw + 1

    def _adopt_other_device(self, db: sqlite3.Connection, old: str) -> None:
        """The device id changed: pending rows carry the old id, so dead-letter them (visible)."""
        now = _now_iso()
        with _tx(db):
            n = db.execute(
                f"INSERT INTO dead (device, seq, payload, reason, at, {STAMP_COLUMNS}) "  # noqa: S608
                f"SELECT ?, seq, payload, ?, ?, {STAMP_COLUMNS} FROM outbox",
                (old, f"device id changed from {old} to {self.device_id}", now)).rowcount
            db.execute("DELETE FROM outbox")
            db.execute("INSERT OR REPLACE INTO meta VALUES ('device_id', ?)", (self.device_id,))
        if n:
            log.warning("outbox: device id changed from %s to %s; %d pending readings dead-lettered",
                        old, self.device_id, n)

    def _put(self, readings: Sequence[Mapping[str, Any]], stamps: list[Stamp | None]) -> list[int]:
        db = self._conn()
        first = self._next_seq
        seqs = list(range(first, first + len(readings)))
        new_words: dict[str, int] = {}
        used: set[int] = set()
        rows = [(q, *encode_reading(r, st, self._words, self._texts, new_words, used))
                for q, r, st in zip(seqs, readings, stamps, strict=True)]
        # Every word a row uses is defined in the same generation of the log (its first use there):
        # a log applied to another database (the file replaced after corruption, or deleted while
        # stopped) then never leaves a row whose numbers that database does not know.
        define = {n: t for t, n in new_words.items()}
        if self._intake is not None:
            define.update((n, self._texts[n]) for n in used - self._logged_words if n in self._texts)
        generation = self._intake.generation if self._intake is not None else None
        if seqs[-1] > self._side.reserved(self.device_id):
            self._side.reserve(self.device_id, seqs[-1] + SEQ_BLOCK)
        added = sum(len(row[1]) for row in rows)
        acked = sorted(s for s, r in self._held.items() if r is None)
        dropped = 0
        unsaved = self._lost_unsaved     # lost while the database was unwritable: write now
        with self._changing() as do:
            # The acks held since the last put first: the rows they free make room in the leaf
            # page the new rows go to (at a minute's cadence, one page and one WAL frame).
            gone, gone_bytes = self._delete_counted(db, acked) if acked else (0, 0)
            if acked:
                do(["d", _ranges(acked)])
            if define:                               # a new sensor or boot, or its first use this generation
                do(["m", [[f"word:{n}", text] for n, text in sorted(define.items())]])
            do(["i", [[q, base64.b64encode(p).decode(), w, m, b, y] for q, p, w, m, b, y in rows]])
            pending = self._pending - gone + len(seqs)
            pending_bytes = self._pending_bytes - gone_bytes + added
            meta: list[list[Any]] = []
            if unsaved:
                meta += [["dropped", self._dropped + unsaved], *self._lost_reason_values()]
            if pending > self.max_rows or pending_bytes > self.max_bytes:
                victims, freed = self._oldest_over(db, pending - self.max_rows, pending_bytes - self.max_bytes)
                dropped = len(victims)
                if victims:
                    last = victims[-1]
                    do(["d", _ranges(victims)])     # exactly these (a row put back later stays)
                    pending -= dropped
                    pending_bytes -= freed
                    key = f"seq_hw:{self.device_id}"
                    meta += [["dropped", self._dropped + unsaved + dropped], [key, max(self._meta_int(key), last)]]
            if meta:
                do(["m", meta])
        # Only after the commit: a failed transaction leaves the counters untouched.
        for text, n in new_words.items():
            self._words[text], self._texts[n] = n, text
        if self._intake is not None and self._intake.generation == generation:
            self._logged_words |= used      # (not when the change committed the batch: a new generation)
        for seq in acked:
            self._held.pop(seq, None)
        self._next_seq = seqs[-1] + 1
        self._pending, self._pending_bytes = pending, pending_bytes
        self._dropped += unsaved
        self._lost_unsaved -= unsaved
        if unsaved:
            self._lost_reasons.clear()
        if dropped:
            self._dropped += dropped
            log.warning("outbox full (%d rows / %d bytes max): dropped the %d oldest readings "
                        "(%d dropped in total)", self.max_rows, self.max_bytes, dropped, self._dropped)
        return seqs

    def _meta_int(self, key: str) -> int:
        row = self._conn().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        try:
            return int(row[0]) if row and row[0] is not None else 0
        except (TypeError, ValueError):
            return 0

    def _delete_counted(self, db: sqlite3.Connection, seqs: list[int]) -> tuple[int, int]:
        """How many of these rows are pending, and their payload bytes (before deleting them)."""
        removed = removed_bytes = 0
        for i in range(0, len(seqs), _SQL_VARS):
            chunk = seqs[i:i + _SQL_VARS]
            marks = ",".join("?" * len(chunk))
            n, size = db.execute(
                f"SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox WHERE seq IN ({marks})",  # noqa: S608
                chunk).fetchone()
            removed += n
            removed_bytes += size
        return removed, removed_bytes

    def _oldest_over(self, db: sqlite3.Connection, rows_over: int, bytes_over: int) -> tuple[list[int], int]:
        """The oldest pending rows to drop until both bounds hold: (their seqs, their bytes)."""
        victims: list[int] = []
        freed = after = 0
        while rows_over > 0 or bytes_over > 0:
            take = max(rows_over, 0) + (64 if bytes_over > 0 else 0)
            found = db.execute("SELECT seq, length(payload) FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
                               (after, take)).fetchall()
            if not found:
                break
            for seq, size in found:
                if rows_over <= 0 and bytes_over <= 0:
                    break
                rows_over -= 1
                bytes_over -= size
                freed += size
                after = seq
                victims.append(seq)
        return victims, freed

    def _claim(self, limit: int) -> list[Row]:
        db = self._conn()
        query = "SELECT seq, payload, wall, mono, boot, synced FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?"
        if not self._held:
            found = db.execute(query, (0, max(0, limit))).fetchall()
        else:
            # Delivered while the disk could not record it: never hand those out again.
            found, after = [], 0
            while len(found) < limit:
                chunk = db.execute(query, (after, limit + 256)).fetchall()
                if not chunk:
                    break
                found += [r for r in chunk if r[0] not in self._held]
                after = chunk[-1][0]
            found = found[:limit]
        rows = [Row(seq, self._reading(seq, payload, wall), self._stamp_of(wall, mono, boot, synced))
                for seq, payload, wall, mono, boot, synced in found]
        if self.clock is not None:
            self.clock.label((r.seq, r.reading, r.stamp) for r in rows)
        return rows

    def oldest(self, *, wait: bool = True) -> Row | None:
        """The oldest pending row (its age is status ``oldest_pending_s``), unlabelled.

        ``wait=False``: raise TimeoutError at once instead of waiting for the lock, which a
        put's fsync, a dead-letter retry or a busy database may hold for seconds (the health
        figures must never stall the observer thread)."""
        if not self._lock.acquire(blocking=wait):
            raise TimeoutError("the outbox is busy")
        try:
            rows = self._conn().execute("SELECT seq, payload, wall, mono, boot, synced FROM outbox "
                                        "ORDER BY seq LIMIT ?", (len(self._held) + 1,)).fetchall()
            row = next((r for r in rows if r[0] not in self._held), None)
        finally:
            self._lock.release()
        if row is None:
            return None
        seq, payload, wall, mono, boot, synced = row
        return Row(seq, self._reading(seq, payload, wall), self._stamp_of(wall, mono, boot, synced))

    def _reading(self, seq: int, payload: bytes, wall: float | None) -> dict[str, Any]:
        return decode_reading(self.device_id, seq, payload, wall, self._texts)

    def _stamp_of(self, wall: float | None, mono: float | None, boot: str | None,
                  synced: int | None) -> Stamp | None:
        return stamp_of(wall, mono, boot, synced, self._texts)

    def _delete(self, db: sqlite3.Connection, seqs: list[int], dead_reason: str | None, *,
                hw_implied: bool = False) -> tuple[int, int]:
        """Inside a transaction: delete (or move to ``dead``) these rows. Returns (rows, bytes).

        The seq high-water mark goes to ``meta`` only when the rows left no longer imply it
        (the newest row went): an ack carried by a ``put`` (``hw_implied``: the new rows are
        newer) or of older rows changes one leaf page and no meta page."""
        removed = removed_bytes = 0
        for i in range(0, len(seqs), _SQL_VARS):
            chunk = seqs[i:i + _SQL_VARS]
            marks = ",".join("?" * len(chunk))
            removed_bytes += db.execute(
                f"SELECT coalesce(sum(length(payload)), 0) FROM outbox WHERE seq IN ({marks})",  # noqa: S608
                chunk).fetchone()[0]
            if dead_reason is not None:
                db.execute(
                    f"INSERT INTO dead (device, seq, payload, reason, at, {STAMP_COLUMNS}) "  # noqa: S608
                    f"SELECT ?, seq, payload, ?, ?, {STAMP_COLUMNS} FROM outbox WHERE seq IN ({marks})",
                    (self.device_id, dead_reason[:500], _now_iso(), *chunk))
            removed += db.execute(f"DELETE FROM outbox WHERE seq IN ({marks})", chunk).rowcount  # noqa: S608
        if not hw_implied:
            top = db.execute("SELECT coalesce(max(seq), 0) FROM outbox").fetchone()[0]
            if top < seqs[-1]:
                key = f"seq_hw:{self.device_id}"
                db.execute("INSERT OR REPLACE INTO meta VALUES (?, max(coalesce((SELECT value FROM meta "
                           "WHERE key = ?), 0), ?))", (key, key, seqs[-1]))
        return removed, removed_bytes

    def _remove(self, seqs: list[int], *, dead_reason: str | None) -> None:
        db = self._conn()
        dead_dropped = 0
        if dead_reason is None:
            # An ack: one intake record (the seq high-water mark with it when the newest row goes).
            with self._changing() as do:
                removed, removed_bytes = self._delete_counted(db, seqs)
                top = db.execute("SELECT coalesce(max(seq), 0) FROM outbox").fetchone()[0]
                do(["d", _ranges(seqs)])
                if top <= seqs[-1]:
                    key = f"seq_hw:{self.device_id}"
                    do(["m", [[key, max(self._meta_int(key), seqs[-1])]]])
        else:
            with self._durable():       # a dead letter is committed at once
                removed, removed_bytes = self._delete(db, seqs, dead_reason)
                dead_dropped = self._bound_dead(db)
        self._pending -= removed
        self._pending_bytes -= removed_bytes
        if dead_reason is not None:
            self._dead += removed - dead_dropped
            log.error("outbox: %d readings dead-lettered (seq %d..%d): %s",
                      removed, seqs[0], seqs[-1], dead_reason)
        if dead_dropped:
            self._dropped += dead_dropped
            log.warning("outbox: dead-letter table full (%d rows / %d bytes max): dropped the %d "
                        "oldest dead letters (%d dropped in total)", self.dead_max_rows,
                        self.dead_max_bytes, dead_dropped, self._dropped)

    def _bound_dead(self, db: sqlite3.Connection) -> int:
        """Inside the dead-lettering transaction: drop the oldest dead rows beyond the bounds,
        counted into ``dropped``. Returns how many."""
        rows, size = db.execute("SELECT count(*), coalesce(sum(length(payload) + length(reason)), 0) "
                                "FROM dead").fetchone()
        if rows <= self.dead_max_rows and size <= self.dead_max_bytes:
            return 0
        over_rows, over_bytes, n = rows - self.dead_max_rows, size - self.dead_max_bytes, 0
        while over_rows > 0 or over_bytes > 0:
            victims = db.execute("SELECT id, length(payload) + length(reason) FROM dead ORDER BY id LIMIT ?",
                                 (max(over_rows, 0) + 64,)).fetchall()
            if not victims:
                break
            cut = victims[0][0]
            for rid, length in victims:
                if over_rows <= 0 and over_bytes <= 0:
                    break
                cut, n = rid, n + 1
                over_rows -= 1
                over_bytes -= length
            db.execute("DELETE FROM dead WHERE id <= ?", (cut,))
        _count_dropped(db, self._dropped + n, n, "dead-letter table full")
        return n

    # ---- corruption (the steps themselves: agent/telemetry/corruption.py)

    def _retry_corrupt(self, op: Callable[[], T]) -> T:
        try:
            return op()
        except sqlite3.DatabaseError as err:
            if not corruption.is_corruption(err):
                raise
            # Found while running: we know how many readings the old file held, so they are
            # accounted for as dropped (with those dropped before) in the new database.
            lost = self._dropped + self._pending
            self._close(commit=False)       # the intake log's records go to the new database
            self._replace_corrupt(err, lost=lost)
            self._open()
            lost -= self._pending + self._dropped       # those rescued from the log
            if lost > 0:
                self._add_dropped(lost)
            return op()

    def _add_dropped(self, n: int) -> None:
        with self._durable() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('dropped', ?)", (self._dropped + n,))
        self._dropped += n

    def _replace_corrupt(self, err: Exception, *, lost: int) -> None:
        """Move the corrupt file aside; ``lost``: what it held (known while running)."""
        self._report_corrupt(err, self._set_aside(), lost)

    def _unrescued(self, runs: list[list[int]], old_dropped: int) -> int:
        """What a corrupt file held that the new database did not get back (corruption.unrescued)."""
        return corruption.unrescued(self._conn(), runs, old_dropped, replayed=self._replayed,
                                    dropped=self._dropped)

    def _set_aside(self) -> Path:
        """Move the corrupt file (and its -wal) aside to ``<db>.corrupt-<n>``; counted in the side file."""
        aside = corruption.move_aside(self.path)
        self.corrupt_files.append(aside)
        self._side.count_corrupt()
        self._pending = self._pending_bytes = self._dead = self._dropped = 0
        self._replayed = ([], 0)
        return aside

    def _report_corrupt(self, err: Exception, aside: Path, lost: int | None) -> None:
        what = (f"{lost} readings lost (counted as dropped)" if lost is not None
                else "the readings it held are lost and could not be counted")
        log.error("outbox database was corrupt (%s); moved aside to %s, started a new one; %s "
                  "(%d corrupt files replaced so far)", err, aside.name, what, self.corrupt_replaced)
        if self._state is not None:
            self._state.update(notice=f"outbox corrupt: moved aside to {aside.name}; {what}")


class _tx:
    """``BEGIN IMMEDIATE`` .. ``COMMIT`` (``ROLLBACK`` on error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.db.execute("COMMIT")
        else:
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error:
                pass


def _small_pages(db: sqlite3.Connection, path: Path) -> None:
    """A file an older agent made (1 or 4 KiB pages) is rebuilt with PAGE_SIZE pages while it is
    small (VACUUM under a rollback journal: a crash leaves the old file or the new one). A
    bigger one (a backlog) keeps its pages: the rebuild would take a while and twice its room.
    Nothing is lost either way; a failure (no room) only leaves the old page size."""
    page = db.execute("PRAGMA page_size").fetchone()[0]
    if page == PAGE_SIZE or page * db.execute("PRAGMA page_count").fetchone()[0] > REPAGE_MAX_BYTES:
        return
    try:
        db.execute("PRAGMA journal_mode=DELETE").fetchone()
        db.execute(f"PRAGMA page_size={PAGE_SIZE}")
        db.execute("VACUUM")
        log.info("outbox: %s rebuilt with %d B pages (was %d B: less SD-card wear per commit)",
                 path.name, PAGE_SIZE, page)
    except sqlite3.OperationalError as err:
        log.info("outbox: %s keeps its %d B pages (%s)", path.name, page, err)
    finally:
        db.execute("PRAGMA journal_mode=WAL").fetchone()


def _ranges(seqs: list[int]) -> list[list[int]]:
    """Ascending seqs as [first, last] runs (an ack of a batch is one range)."""
    out: list[list[int]] = []
    for seq in seqs:
        if out and seq == out[-1][1] + 1:
            out[-1][1] = seq
        else:
            out.append([seq, seq])
    return out


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _count_dropped(db: sqlite3.Connection, total: int, n: int, reason: str) -> None:
    """Inside a transaction: the persistent ``dropped`` total, and ``n`` more for ``reason``
    (``meta.dropped:<reason>``, shown by ``device-agent dead-letter list``)."""
    db.execute("INSERT OR REPLACE INTO meta VALUES ('dropped', ?)", (total,))
    db.execute("INSERT OR REPLACE INTO meta VALUES (?, coalesce((SELECT value FROM meta WHERE key = ?), 0) + ?)",
               (f"dropped:{reason}", f"dropped:{reason}", n))


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
