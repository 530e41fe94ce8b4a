"""What a power cut would leave of an outbox: a copy of its files, opened as the next start would.

The service holds the outbox with ``locking_mode=EXCLUSIVE`` and keeps its newest readings in
an open transaction whose records are in the intake log beside it (agent/telemetry/intake.py),
so no second connection can read it while it is open, and the database file alone is not all of
it. A copy of the database, its WAL and the intake log taken at any instant is exactly what a
power cut at that instant leaves on the card: the copy is opened with ``Outbox`` (SQLite replays
the complete commits of the copied WAL, the outbox applies the log's records that the database
has not committed), closed, and read. Reading it proves the readings are on disk, not only in
memory.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.state import OutboxCounts

SIDE_FILES = ("-wal", ".intake", ".meta.json")


@contextmanager
def on_disk(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection to a copy of the outbox at ``path`` (with its -wal and intake log) as a
    restart after a power cut now would find it."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / path.name
        for _ in range(100):
            # A live writer may commit or append while we copy: take a copy during which no
            # file changed (what a power cut at one instant would leave).
            before = marks(path)
            for suffix in SIDE_FILES:
                side, to = path.with_name(path.name + suffix), copy.with_name(copy.name + suffix)
                try:
                    shutil.copyfile(side, to)
                except FileNotFoundError:
                    to.unlink(missing_ok=True)
            shutil.copyfile(path, copy)
            if marks(path) == before:
                break
            time.sleep(0.005)
        _restart(copy)
        db = sqlite3.connect(copy, isolation_level=None)
        try:
            yield db
        finally:
            db.close()


def _restart(copy: Path) -> None:
    """Open and close the copy as the service's next start would (its device id from the file)."""
    from agent.telemetry.outbox import Outbox

    db = sqlite3.connect(copy, isolation_level=None)
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'device_id'").fetchone()
    except sqlite3.Error:
        row = None                                  # not created yet, or mid-creation
    finally:
        db.close()
    if row is None:
        return
    Outbox(copy, str(row[0]), max_rows=10**9, max_bytes=10**12, reserve_bytes=0).close()


def counts_on_disk(path: Path) -> OutboxCounts:
    """pending / dead / dropped as a restart after a power cut would find them."""
    if not path.exists():
        return OutboxCounts()
    with on_disk(path) as db:
        pending = db.execute("SELECT count(*) FROM outbox").fetchone()[0]
        dead = db.execute("SELECT count(*) FROM dead").fetchone()[0]
        row = db.execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone()
    return OutboxCounts(pending=pending, dead=dead, dropped=int(row[0]) if row else 0)


def marks(path: Path) -> list[tuple[int, int] | None]:
    """Size and mtime of the outbox's files: they change with every durable put."""
    out: list[tuple[int, int] | None] = []
    for p in (path, *(path.with_name(path.name + s) for s in SIDE_FILES)):
        try:
            st = p.stat()
        except FileNotFoundError:
            out.append(None)
            continue
        out.append((st.st_size, st.st_mtime_ns))
    return out
