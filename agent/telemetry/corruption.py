"""A corrupt outbox file: telling corruption from other SQLite errors, moving the file aside,
and counting what it held (the outbox's side of docs/DESIGN.md: nothing disappears unaccounted).

Why a module of its own: these are the steps the outbox (agent/telemetry/outbox.py) takes when
SQLite reports SQLITE_CORRUPT / SQLITE_NOTADB, at open or while running. Each works on a path or
a connection given to it and keeps no state; the outbox keeps the bookkeeping (its counters, the
side file's ``corrupt_replaced``, the ERROR line and the state ``notice``).

May import only the standard library. Its log lines are the outbox's (same logger name, so a
journal filter on ``agent.telemetry.outbox`` still sees them).
"""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path

log = logging.getLogger("agent.telemetry.outbox")

_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26


def is_corruption(err: sqlite3.Error) -> bool:
    """SQLITE_CORRUPT / SQLITE_NOTADB only: a constraint or I/O error must never replace a good file."""
    code = getattr(err, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)   # extended codes too
    text = str(err).lower()
    return any(s in text for s in ("malformed", "not a database", "corrupt", "disk image"))


def move_aside(path: Path) -> Path:
    """Move the corrupt file at ``path`` (and its -wal; its -shm is removed) to the first free
    ``<db>.corrupt-<n>``, kept as evidence. Returns where it went.

    Raises:
        OSError: a file cannot be moved.
    """
    n = 1
    while path.with_name(f"{path.name}.corrupt-{n}").exists():
        n += 1
    aside = path.with_name(f"{path.name}.corrupt-{n}")
    if path.exists():
        os.replace(path, aside)
    for suffix in ("-wal", "-shm"):
        extra = path.with_name(path.name + suffix)
        if extra.exists():
            if suffix == "-wal":
                os.replace(extra, aside.with_name(aside.name + suffix))
            else:
                extra.unlink()
    return aside


def salvage(aside: Path) -> tuple[list[list[int]], int] | None:
    """What a corrupt file held (runs of its pending seqs, its dropped count), if SQLite can still
    read that much of it; None when it cannot. Read-only: the aside copy is evidence, kept as it is."""
    try:
        db = sqlite3.connect(f"{aside.resolve().as_uri()}?mode=ro", uri=True, timeout=1)
    except sqlite3.Error:
        return None
    try:
        runs: list[list[int]] = []      # streamed: a backlog of a million rows is a few runs
        for (q,) in db.execute("SELECT seq FROM outbox ORDER BY seq"):
            if runs and q == runs[-1][1] + 1:
                runs[-1][1] = q
            else:
                runs.append([q, q])
    except sqlite3.Error as err:
        log.warning("outbox: %s cannot be counted (%s)", aside.name, err)
        db.close()
        return None
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone()
        dropped = int(row[0]) if row else 0
    except (sqlite3.Error, ValueError, TypeError):
        dropped = 0
    finally:
        db.close()
    return runs, dropped


def unrescued(db: sqlite3.Connection, runs: list[list[int]], old_dropped: int, *,
              replayed: tuple[list[list[int]], int], dropped: int) -> int:
    """Of what a corrupt file held (``runs`` of the seqs it had pending, its ``old_dropped``), what
    the new database ``db`` did not get back from the intake log: rows neither there nor deleted
    by the log (acks), and the dropped count beyond the one the log restored.

    ``replayed``: (seq ranges the applied log deleted, its rows left out for unknown words);
    ``dropped``: the new database's dropped count now."""
    deleted, unknown = replayed

    def there(a: int, b: int) -> int:
        count: int = db.execute("SELECT count(*) FROM outbox WHERE seq BETWEEN ? AND ?", (a, b)).fetchone()[0]
        return count

    rows = 0
    for a, b in runs:
        kept = there(a, b)
        for d0, d1 in deleted:
            lo, hi = max(a, d0), min(b, d1)
            if lo <= hi:
                kept += (hi - lo + 1) - there(lo, hi)
        rows += (b - a + 1) - kept
    return rows + max(0, old_dropped - (dropped - unknown))
