"""The outbox file read without writing anything: ``device-agent status`` while no service runs
(a running one holds the file exclusively and `status` reads its status.json instead), also on a
read-only state directory (an SD card remounted read-only, ``status`` as another user).

Why a module of its own: these readers never open the file for writing, never apply the intake
log (agent/telemetry/intake.py) and never checkpoint; they only add up what the database has
committed and what the log holds on top after a stop without close, exactly what the next start
applies. The running outbox (agent/telemetry/outbox.py) uses ``connect_read_only`` for its
degraded mode (a read-only or full filesystem at start).

May import the standard library, ``agent.state`` (the counts it returns) and the outbox's own
parts (``agent.telemetry.intake``, ``agent.telemetry.corruption``), never the outbox itself. Its
log lines are the outbox's (same logger name, so a journal filter still sees them).
"""

from __future__ import annotations

import base64
import json
import logging
import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any

from agent.state import OutboxCounts
from agent.telemetry import corruption, intake

log = logging.getLogger("agent.telemetry.outbox")

_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6


def read_counts(path: Path) -> OutboxCounts:
    """Counts for ``device-agent status`` while no service runs (a running one holds the file
    exclusively: `status` reads its status.json instead): a read-only connection (``mode=ro``)
    that takes no write locks and never checkpoints. A missing file reads as empty.

    A corrupt file reads as empty, with a WARNING: the service moves it aside when it starts.

    Works on a read-only state directory too (``connect_read_only``).

    Raises:
        sqlite3.OperationalError: the file cannot be read (permissions, locked for > 5 s).
    """
    path = Path(path)
    if not path.exists():
        return OutboxCounts()
    try:
        db = connect_read_only(path, timeout=5)
    except sqlite3.DatabaseError as err:
        if corruption.is_corruption(err):
            log.warning("outbox %s is corrupt (%s); the service will move it aside", path, err)
            return OutboxCounts()
        raise
    try:
        pending = db.execute("SELECT count(*) FROM outbox").fetchone()[0]
        dead = db.execute("SELECT count(*) FROM dead").fetchone()[0]
        row = db.execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone()
        dropped = int(row[0]) if row else 0
        # A stop without close (power cut, kill): what the intake log holds on top.
        view = _Uncommitted.read(db, path)
        pending += len(view.rows) - view.committed_deleted(db)
        dropped = int(view.meta.get("dropped", dropped))
        return OutboxCounts(pending=pending, dead=dead, dropped=dropped)
    except sqlite3.DatabaseError as err:
        if "no such table" in str(err):
            return OutboxCounts()
        if corruption.is_corruption(err):
            log.warning("outbox %s is corrupt (%s); the service will move it aside", path, err)
            return OutboxCounts()
        raise
    finally:
        db.close()


def read_oldest_wall(path: Path) -> float | None:
    """Wall time (epoch) the oldest pending reading was sampled, read-only as ``read_counts``
    (for ``status`` without the service); None when there is none or it cannot be read."""
    try:
        db = connect_read_only(Path(path), timeout=5)
    except sqlite3.Error:
        return None
    try:
        view = _Uncommitted.read(db, Path(path))
        names = [d[0] for d in db.execute("SELECT * FROM outbox LIMIT 0").description]
        after, row = 0, None
        while True:      # the oldest committed row the intake log has not deleted since
            row = db.execute("SELECT * FROM outbox WHERE seq > ? ORDER BY seq LIMIT 1", (after,)).fetchone()
            if row is None:
                break
            end = view.deleted_range_end(row[names.index("seq")])
            if end is None:
                break
            after = end
    except sqlite3.Error:
        return None
    finally:
        db.close()
    if row is None and view.rows:
        seq = min(view.rows)
        _, payload, wall, *_ = view.rows[seq]
        row, names = (seq, base64.b64decode(payload), wall), ["seq", "payload", "wall"]
    if row is None:
        return None
    found = dict(zip(names, row, strict=True))
    if found.get("wall") is not None:
        return float(found["wall"])
    try:
        text = json.loads(found["payload"])["time"]
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except (ValueError, KeyError, TypeError):
        return None


def connect_read_only(path: Path, *, timeout: float, check_same_thread: bool = True) -> sqlite3.Connection:
    """A connection that never writes the database or anything beside it, also where the
    directory is read-only (an SD card remounted read-only, ``status`` as another user).

    ``mode=ro`` first: it takes no write locks and sees a live writer's WAL. It cannot read a WAL
    database whose ``-shm`` is missing when that file cannot be created (a read-only
    directory after a clean stop removed it): then ``immutable=1``, which reads the main file
    as it is and needs no -shm. That is all of it after a clean stop; a WAL left by a crash is
    not seen (its commits are not lost, only not shown until a writer replays it).

    Raises:
        sqlite3.Error: neither opens (the last error; corruption is raised at once).
    """
    uri = Path(path).resolve().as_uri()
    last: sqlite3.Error | None = None
    for target in (f"{uri}?mode=ro", f"{uri}?immutable=1"):
        try:
            db = sqlite3.connect(target, uri=True, timeout=timeout, isolation_level=None,
                                 check_same_thread=check_same_thread)
        except sqlite3.OperationalError as err:
            last = err
            continue
        try:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()   # opens the WAL index
            return db
        except sqlite3.OperationalError as err:
            db.close()
            if (getattr(err, "sqlite_errorcode", 0) or 0) & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED):
                raise                     # a writer holds it: immutable would read it mid-change
            last = err                    # cannot open or create -shm (CANTOPEN, READONLY_CANTINIT)
        except BaseException:
            db.close()
            raise
    assert last is not None
    raise last


class _Uncommitted:
    """What the intake log beside an outbox file holds that its database has not committed (the
    service stopped without ``close``), for readers that must not write: ``status`` with the
    service stopped. The next start applies exactly this."""

    def __init__(self) -> None:
        self.rows: dict[int, list[Any]] = {}     # inserted and not deleted since, by seq
        self.deleted: list[list[int]] = []       # merged seq ranges deleted
        self.meta: dict[str, Any] = {}

    @classmethod
    def read(cls, db: sqlite3.Connection, path: Path) -> _Uncommitted:
        view = cls()
        try:
            found = intake.read(path.with_name(path.name + ".intake"))
        except OSError as err:
            log.debug("outbox: intake log of %s unreadable: %s", path, err)
            return view
        if found is None or not found[0].records:
            return view
        run = found[0]
        meta = dict(db.execute("SELECT key, value FROM meta WHERE key IN ('intake_id', 'intake_gen')"))
        if run.db_id == int(meta.get("intake_id") or 0) and run.generation <= int(meta.get("intake_gen") or 0):
            return view
        spans: list[list[int]] = []
        for ops in run.records:
            for kind, arg in ops:
                if kind == "i":
                    view.rows.update((r[0], r) for r in arg)
                elif kind == "d":
                    for first, last in arg:
                        for seq in [q for q in view.rows if first <= q <= last]:
                            del view.rows[seq]
                        spans.append([first, last])
                elif kind == "m":
                    view.meta.update((k, v) for k, v in arg)
        view.deleted = intake.merged_ranges(spans)
        return view

    def committed_deleted(self, db: sqlite3.Connection) -> int:
        """Committed rows the log deletes."""
        return sum(db.execute("SELECT count(*) FROM outbox WHERE seq BETWEEN ? AND ?", (a, b)).fetchone()[0]
                   for a, b in self.deleted)

    def deleted_range_end(self, seq: int) -> int | None:
        """The end of the deleted range holding ``seq``, or None when it is not deleted."""
        for first, last in self.deleted:
            if first <= seq <= last:
                return last
        return None
