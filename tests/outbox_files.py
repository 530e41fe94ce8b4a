"""What a power cut would leave of an outbox: a copy of its files, read by SQLite.

The service holds the outbox with ``locking_mode=EXCLUSIVE``, so no second connection can read
it while it is open. A copy of the database and its WAL taken at any instant is exactly what a
power cut at that instant leaves on the card: SQLite replays the complete commits of the copied
WAL when it opens the copy. Reading it proves the commits are on disk, not only in memory.
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


@contextmanager
def on_disk(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection to a copy of the outbox at ``path`` (and its -wal) as it is on disk now."""
    wal = path.with_name(path.name + "-wal")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / path.name
        for _ in range(100):
            # A live writer may commit or checkpoint while we copy: take a copy during which
            # neither file changed (what a power cut at one instant would leave).
            before = _marks(path, wal)
            if wal.exists():
                shutil.copyfile(wal, copy.with_name(copy.name + "-wal"))
            else:
                copy.with_name(copy.name + "-wal").unlink(missing_ok=True)
            shutil.copyfile(path, copy)
            if _marks(path, wal) == before:
                break
            time.sleep(0.005)
        db = sqlite3.connect(copy, isolation_level=None)
        try:
            yield db
        finally:
            db.close()


def counts_on_disk(path: Path) -> OutboxCounts:
    """pending / dead / dropped as a restart after a power cut would find them."""
    if not path.exists():
        return OutboxCounts()
    with on_disk(path) as db:
        pending = db.execute("SELECT count(*) FROM outbox").fetchone()[0]
        dead = db.execute("SELECT count(*) FROM dead").fetchone()[0]
        row = db.execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone()
    return OutboxCounts(pending=pending, dead=dead, dropped=int(row[0]) if row else 0)


def _marks(*paths: Path) -> list[tuple[int, int] | None]:
    out: list[tuple[int, int] | None] = []
    for p in paths:
        try:
            st = p.stat()
        except FileNotFoundError:
            out.append(None)
            continue
        out.append((st.st_size, st.st_mtime_ns))
    return out
