"""``device-agent dead-letter list | retry [--all | SEQ…] | purge``: what an operator does with
readings the far side refused.

While the service runs it holds the outbox exclusively (agent/telemetry/outbox.py: no -shm
index to wear the SD card), so the command asks it (agent/statusfile.py, ``dead_letter``) and
the service runs ``serve`` on its own connection, between two of its transactions; retried
readings go out at the uploader's next step. With no service running, ``run`` opens the file
itself; should a service start meanwhile, each side waits for the other (busy timeout).

``retry`` moves rows back into the queue with their original seq, so they are sent with their
original id ``<device>:<seq>`` (the receiver de-duplicates by it), and with the clock stamp they
were sampled with (wall, monotonic time, boot, synced: agent/clock.py), so their ``time`` and
``time_quality`` are what they would have been had they never been refused. Rows dead-lettered under an
earlier device id cannot be sent under their id any more: they are reported, not retried.
``purge`` deletes them and counts them into ``dropped`` (nothing disappears unaccounted).
"""

from __future__ import annotations

import io
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from agent.telemetry import intake
from agent.telemetry.outbox import Outbox
from agent.telemetry.rowcodec import STAMP_COLUMNS, add_stamp_columns

BUSY_TIMEOUT_S = 10.0
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 78   # a wrong command line is a config error (78)
_SQL_VARS = 500


class DeadLetterError(Exception):
    """A user mistake or a state the command cannot act on: one line, ``exit_code``."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def parse_seqs(args: Sequence[str]) -> list[int]:
    """SEQ arguments as numbers.

    Raises:
        DeadLetterError: one is not a whole number >= 1 (exit 78, like any command-line mistake).
    """
    seqs = []
    for arg in args:
        text = arg.strip()
        if not (text.isascii() and text.isdigit()) or int(text) < 1:
            raise DeadLetterError(f"{arg!r} is not a seq (a whole number >= 1, as `dead-letter list` "
                                  "shows them)", EXIT_USAGE)
        seqs.append(int(text))
    return sorted(set(seqs))


def check_args(action: str, seqs: Sequence[str], *, all_: bool) -> list[int]:
    """The SEQ arguments as numbers, once the command line makes sense.

    Raises:
        DeadLetterError: it does not (exit 78).
    """
    if action not in ("list", "retry", "purge"):
        raise DeadLetterError(f"unknown action {action!r}", EXIT_USAGE)
    if action == "retry":
        if all_ and seqs:
            raise DeadLetterError("give either --all or SEQ numbers, not both", EXIT_USAGE)
        if not all_ and not seqs:
            raise DeadLetterError("say which: --all, or SEQ numbers from `dead-letter list`", EXIT_USAGE)
    return parse_seqs(seqs)


def run(path: Path, device_id: str, action: str, seqs: Sequence[str] = (), *, all_: bool = False,
        out: IO[str] = sys.stdout) -> int:
    """One ``dead-letter`` command against the outbox file at ``path`` (no service running).
    Returns the exit code.

    Raises:
        DeadLetterError: bad arguments (exit 78) or seqs that are not dead-lettered (exit 1).
        sqlite3.Error: the outbox cannot be read or written (busy for longer than the timeout).
    """
    wanted = check_args(action, seqs, all_=all_)
    if not Path(path).exists():
        if wanted:
            raise DeadLetterError(f"no outbox at {path}: nothing is dead-lettered")
        print(f"no outbox at {path}: nothing is dead-lettered", file=out)
        return EXIT_OK
    try:
        _apply_intake_log(Path(path), device_id)
        db = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None)
    except sqlite3.OperationalError as err:
        if "locked" in str(err):
            raise DeadLetterError(f"{path} is in use (a service started meanwhile?): run the command "
                                  "again") from err
        raise
    try:
        return run_on(db, device_id, action, wanted, out)
    except sqlite3.OperationalError as err:
        if "locked" in str(err):
            raise DeadLetterError(f"{path} is in use (a service started meanwhile?): run the command "
                                  "again") from err
        raise
    finally:
        db.close()


def _apply_intake_log(path: Path, device_id: str) -> None:
    """A stop without close (power cut, kill) leaves readings, acks and counters in the outbox's
    intake log that the database has not committed: open and close the outbox as the service
    would (it applies them, commits, and empties the log), so the command sees what ``status``
    shows and what it changes is not overwritten by the log at the next start."""
    try:
        found = intake.read(path.with_name(path.name + ".intake"))
    except OSError:
        return
    if found is None or not found[0].records:
        return
    Outbox(path, device_id, max_rows=2**62, max_bytes=2**62, reserve_bytes=0).close()


def run_on(db: sqlite3.Connection, device_id: str, action: str, wanted: list[int], out: IO[str]) -> int:
    """One checked command on an open outbox connection (the file's, or the running service's)."""
    if action == "retry":
        add_stamp_columns(db)      # a file the service has not opened since an upgrade
    if action == "list":
        return _list(db, device_id, out)
    if action == "retry":
        return _retry(db, device_id, wanted, out)
    if action == "purge":
        return _purge(db, out)
    raise DeadLetterError(f"unknown action {action!r}", EXIT_USAGE)


def serve(outbox: Outbox, device_id: str, action: str, wanted: list[int], *, all_: bool) -> dict[str, Any]:
    """The running service's side: the command on its own outbox connection. Returns the answer
    for the command line: ``exit``, ``output`` and, for a refusal, ``error``."""
    out = io.StringIO()
    try:
        if action == "retry" and not all_ and not wanted:
            raise DeadLetterError("say which: --all, or SEQ numbers from `dead-letter list`", EXIT_USAGE)
        code = outbox.using_connection(lambda db: run_on(db, device_id, action, wanted, out))
    except DeadLetterError as err:
        return {"exit": err.exit_code, "output": out.getvalue(), "error": str(err)}
    except (sqlite3.Error, RuntimeError) as err:
        return {"exit": EXIT_FAILURE, "output": out.getvalue(), "error": f"{outbox.path}: {err}"}
    return {"exit": code, "output": out.getvalue()}


def _list(db: sqlite3.Connection, device_id: str, out: IO[str]) -> int:
    rows = db.execute("SELECT seq, device, at, reason FROM dead ORDER BY seq, id").fetchall()
    if rows:
        print(f"{'SEQ':>10}  {'DEAD-LETTERED AT':<24}  REASON", file=out)
    for seq, device, at, reason in rows:
        other = f"[device {device}: cannot be retried] " if device != device_id else ""
        print(f"{seq:>10}  {at:<24}  {other}{reason}", file=out)
    meta = dict(db.execute("SELECT key, value FROM meta WHERE key = 'dropped' OR key LIKE 'dropped:%'"))
    dropped = int(meta.pop("dropped", 0) or 0)
    why = ", ".join(f"{k.split(':', 1)[1]}: {v}" for k, v in sorted(meta.items()))
    print(f"{len(rows)} dead-lettered; {dropped} dropped in total" + (f" ({why})" if why else ""), file=out)
    return EXIT_OK


def _retry(db: sqlite3.Connection, device_id: str, wanted: list[int], out: IO[str]) -> int:
    db.execute("BEGIN IMMEDIATE")
    try:
        dead = db.execute("SELECT seq, device FROM dead").fetchall()
        mine = {s for s, d in dead if d == device_id}
        others = {s for s, d in dead if d != device_id}
        if wanted:
            missing = [s for s in wanted if s not in mine and s not in others]
            foreign = [s for s in wanted if s in others and s not in mine]
            if missing:
                raise DeadLetterError(f"not dead-lettered: {_ranges(missing)} (see `device-agent "
                                      "dead-letter list`)")
            if foreign:
                raise DeadLetterError(f"{_ranges(foreign)}: dead-lettered under an earlier device id, "
                                      "cannot be sent under their id; `purge` them")
            todo = wanted
        else:
            todo = sorted(mine)
        moved = 0
        for i in range(0, len(todo), _SQL_VARS):
            chunk = todo[i:i + _SQL_VARS]
            marks = ",".join("?" * len(chunk))
            # The newest copy of each seq (a row retried and refused again is in the table twice).
            moved += db.execute(
                f"INSERT OR IGNORE INTO outbox (seq, payload, {STAMP_COLUMNS}) "  # noqa: S608
                f"SELECT seq, payload, {STAMP_COLUMNS} FROM dead d "
                f"WHERE device = ? AND seq IN ({marks}) AND id = (SELECT max(id) FROM dead "
                f"WHERE device = d.device AND seq = d.seq)", (device_id, *chunk)).rowcount
            db.execute(f"DELETE FROM dead WHERE device = ? AND seq IN ({marks})",  # noqa: S608
                       (device_id, *chunk))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    print(f"{moved} readings queued again with their seq and id"
          + (f" ({_ranges(todo)})" if todo else ""), file=out)
    if not wanted and others:
        print(f"{len(others)} dead-lettered under an earlier device id left alone; `purge` drops them",
              file=out)
    return EXIT_OK


def _purge(db: sqlite3.Connection, out: IO[str]) -> int:
    db.execute("BEGIN IMMEDIATE")
    try:
        n = db.execute("DELETE FROM dead").rowcount
        if n:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('dropped', coalesce((SELECT value FROM meta "
                       "WHERE key = 'dropped'), 0) + ?)", (n,))
            db.execute("INSERT OR REPLACE INTO meta VALUES ('dropped:dead letters purged', coalesce("
                       "(SELECT value FROM meta WHERE key = 'dropped:dead letters purged'), 0) + ?)", (n,))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    print(f"{n} dead-lettered readings purged (counted as dropped)", file=out)
    return EXIT_OK


def _ranges(seqs: Sequence[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"seq 1-3, 7"``: short even for thousands of seqs."""
    parts: list[str] = []
    start = prev = None
    for s in sorted(seqs):
        if prev is not None and s == prev + 1:
            prev = s
            continue
        if start is not None:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        start = prev = s
    if start is not None:
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
    return "seq " + ", ".join(parts)
