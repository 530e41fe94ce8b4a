"""How a reading is stored as a row of the outbox (agent/telemetry/outbox.py) and read back:
its payload (compact or JSON) and its stamp columns (``wall``, ``mono``, ``boot``, ``synced``).

Why compact rows (SD-card wear): a reading as the sampler makes it (sensor, type, value, unit, and
its stamp's time) is stored as 11 bytes, its sensor/type/unit and its boot as numbers ("words",
kept in the database's ``meta`` as ``word:<n>``), ~40 bytes a row, so a put rarely needs a new
page. Anything else, and every row of older files, is JSON and read as such. The outbox keeps
the words (it reads them at open and stores new ones with the row that first uses them); these
functions take them as arguments and keep no state.

May import only the standard library and ``agent.clock`` (the ``Stamp`` a row keeps).
"""

from __future__ import annotations

import base64
import json
import sqlite3
import struct
from collections.abc import Mapping
from typing import Any

from agent.clock import Stamp, iso_epoch

_STAMP_KINDS = (("wall", "REAL"), ("mono", "REAL"), ("boot", "TEXT"), ("synced", "INTEGER"))
STAMP_COLUMNS = ", ".join(name for name, _ in _STAMP_KINDS)   # how a row was stamped, in both tables
_COMPACT = b"\x01"          # a compact payload (a JSON one starts with "{"): kind number, value
_COMPACT_ROW = struct.Struct("<Hd")
_COMPACT_KEYS = ["sensor", "type", "value", "unit", "time"]   # a reading as the sampler makes it
_BOOT_TAG = "\x01"          # boot column: "\x01<n>" is word n (a kernel boot id is a UUID)


def decode_reading(device_id: str, seq: int, payload: bytes, wall: float | None,
                   texts: Mapping[int, str]) -> dict[str, Any]:
    """The docs/INTERFACE.md reading a stored row stands for (``texts``: the database's words
    by number); a compact row whose word is unknown reads as sensor ``unknown-<n>``."""
    if payload[:1] == _COMPACT and wall is not None:
        kind, value = _COMPACT_ROW.unpack_from(payload, 1)
        try:
            sensor, kind_type, unit = json.loads(texts[kind])
        except (KeyError, ValueError, TypeError):
            sensor, kind_type, unit = f"unknown-{kind}", "unknown", ""
        return {"id": f"{device_id}:{seq}", "seq": seq, "sensor": sensor, "type": kind_type,
                "value": value, "unit": unit, "time": iso_epoch(wall)}
    body = json.loads(payload)
    return {"id": f"{device_id}:{seq}", "seq": seq, **body}


def encode_reading(reading: Mapping[str, Any], st: Stamp | None, words: Mapping[str, int],
                   texts: Mapping[int, str], new_words: dict[str, int],
                   used: set[int]) -> tuple[bytes, float | None, float | None, str | None, int | None]:
    """A row (payload, wall, mono, boot, synced). A stamped reading as the sampler makes it
    is 11 bytes of payload (its sensor, type and unit a number, its time the stamp's wall
    time) and its boot a number: ~40-byte rows, a dozen to a 512 B page, so a put rarely
    needs a new page (SD-card wear). Anything else is stored as JSON, as it came.

    ``words``/``texts``: the database's words both ways; a word it does not have yet gets the next
    number in ``new_words`` (the caller stores it with the row); ``used`` collects every number
    the row uses."""
    def word(text: str) -> int:
        n = words.get(text, new_words.get(text))
        if n is None:
            n = new_words[text] = max([0, *texts, *new_words.values()]) + 1
        used.add(n)
        return n

    payload = None
    if (st is not None and list(reading) == _COMPACT_KEYS and type(reading["value"]) is float
            and reading["time"] == iso_epoch(st.wall)
            and all(type(reading[k]) is str for k in ("sensor", "type", "unit"))):
        kind = word(json.dumps([reading["sensor"], reading["type"], reading["unit"]],
                               ensure_ascii=False, separators=(",", ":")))
        if kind <= 0xFFFF:
            payload = _COMPACT + _COMPACT_ROW.pack(kind, reading["value"])
    if payload is None:
        payload = json.dumps(dict(reading), ensure_ascii=False, separators=(",", ":")).encode()
    if st is None:
        return payload, None, None, None, None
    # The boot column has TEXT affinity: the number goes in as a short tagged string.
    return payload, st.wall, st.mono, f"{_BOOT_TAG}{word(st.boot)}", int(st.synced)


def stamp_of(wall: float | None, mono: float | None, boot: str | None, synced: int | None,
             texts: Mapping[int, str]) -> Stamp | None:
    """The stamp a row's columns hold (its boot a word number or, in older rows, the boot id);
    None for a row from before stamps."""
    if isinstance(boot, str) and boot.startswith(_BOOT_TAG) and boot[1:].isdigit():
        boot = texts.get(int(boot[1:]), boot)
    return _stamp(wall, mono, boot, synced)


def foreign_records(records: list[list[Any]]) -> tuple[list[list[Any]], int]:
    """Another database's intake records, for this one: its compact rows decoded to JSON (their
    sensor/type/unit and boot numbers are that database's ``word:<n>``, which this one may use
    for other words) and its word definitions left out. Returns (records, rows left out because
    a number they use is not defined in the records: never stored mislabelled)."""
    words: dict[int, str] = {}
    out: list[list[Any]] = []
    unknown = 0
    for ops in records:
        new_ops: list[Any] = []
        for kind, arg in ops:
            if kind == "m":
                keep = []
                for key, value in arg:
                    if isinstance(key, str) and key.startswith("word:") and key[5:].isdigit():
                        words[int(key[5:])] = str(value)
                    else:
                        keep.append([key, value])
                if keep:
                    new_ops.append(["m", keep])
            elif kind == "i":
                rows = []
                for q, p, w, m, b, y in arg:
                    row = _plain_row(q, p, w, m, b, y, words)
                    if row is None:
                        unknown += 1
                    else:
                        rows.append(row)
                if rows:
                    new_ops.append(["i", rows])
            else:
                new_ops.append([kind, arg])
        out.append(new_ops)
    return out, unknown


def _plain_row(q: int, p: str, w: Any, m: Any, b: Any, y: Any, words: Mapping[int, str]) -> list[Any] | None:
    """An intake row with its word numbers replaced by what they stand for; None when one is unknown."""
    if isinstance(b, str) and b.startswith(_BOOT_TAG) and b[1:].isdigit():
        b = words.get(int(b[1:]))
        if b is None:
            return None
    payload = base64.b64decode(p)
    if payload[:1] == _COMPACT and w is not None:
        kind, value = _COMPACT_ROW.unpack_from(payload, 1)
        try:
            sensor, kind_type, unit = json.loads(words[kind])
        except (KeyError, ValueError, TypeError):
            return None
        body = {"sensor": sensor, "type": kind_type, "value": value, "unit": unit, "time": iso_epoch(w)}
        p = base64.b64encode(json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()).decode()
    return [q, p, w, m, b, y]


def add_stamp_columns(db: sqlite3.Connection) -> None:
    """Migrate an outbox from before stamps (``outbox`` and ``dead``): add the columns, old rows
    keep NULLs. Also run by ``device-agent dead-letter``, which may meet a file the service has
    not opened since an upgrade."""
    for table in ("outbox", "dead"):
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        for name, kind in _STAMP_KINDS:
            if have and name not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")


def _stamp(wall: float | None, mono: float | None, boot: str | None, synced: int | None) -> Stamp | None:
    if wall is None or mono is None or boot is None:
        return None
    return Stamp(wall=float(wall), mono=float(mono), boot=str(boot), synced=bool(synced))
