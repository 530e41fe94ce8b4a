"""The outbox's side file, ``<db>.meta.json``: what must outlive the database itself, because a
corrupt database is replaced by an empty one (agent/telemetry/corruption.py).

It holds two things: per device, the highest seq reserved (the outbox reserves seqs in blocks,
so a fresh database continues after the block and a seq already sent is never sent again for a
different reading: docs/DESIGN.md), and how many corrupt files were moved aside over the
device's life (``corrupt_replaced``). Written atomically (agent/fsutil.py), once per block of
seqs: SD-card wear is one small file per block of readings.

May import the standard library and ``agent.fsutil``. Its log lines are the outbox's (same
logger name, so a journal filter on ``agent.telemetry.outbox`` still sees them).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from agent.fsutil import atomic_write

log = logging.getLogger("agent.telemetry.outbox")


class SideFile:
    """``<db>.meta.json``, read once when made; every change written at once.

    An unreadable file (not JSON, I/O error) reads as empty, with an ERROR line: reservations
    start afresh from what the database holds.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._data = self._read()

    def reserved(self, device_id: str) -> int:
        """The highest seq reserved for ``device_id`` (0: none)."""
        return int(self._data.get("seq_reserved", {}).get(device_id, 0))

    def reserve(self, device_id: str, upto: int) -> None:
        """Reserve seqs up to ``upto`` for ``device_id``.

        Raises:
            OSError: the file cannot be written. Nothing is reserved then, not even in memory:
                a reservation only the memory holds would let the next puts hand out seqs past
                what the file promises, and a new database after a restart would reuse them.
        """
        data = {**self._data, "seq_reserved": {**self._data.get("seq_reserved", {}), device_id: upto}}
        self._write(data)
        self._data = data

    @property
    def corrupt_replaced(self) -> int:
        """How many corrupt database files were moved aside over the device's life."""
        return int(self._data.get("corrupt_replaced", 0))

    def count_corrupt(self) -> None:
        """One more corrupt file moved aside.

        Raises:
            OSError: the file cannot be written (the count is kept in memory).
        """
        self._data["corrupt_replaced"] = self.corrupt_replaced + 1
        self._write(self._data)

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_bytes())
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            log.error("outbox: %s unreadable (%s); seq reservations start afresh", self.path, err)
            return {}

    def _write(self, data: dict[str, Any]) -> None:
        atomic_write(self.path, json.dumps(data, sort_keys=True).encode(), mode=0o600)
