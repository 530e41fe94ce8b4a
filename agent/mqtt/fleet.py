"""The admin's picture of a fleet: the latest status and code of every device, and who needs a person.

Pure and thread-safe: ``Fleet.apply`` takes ``watch`` events (on paho's thread); the summary and
the web page read ``counts``, ``rows`` and ``needs_attention`` (their own threads). Status fields
added by newer agents (``storage``, ``oldest_pending_s``, ``clock``, ...) are read when present and
ignored when an older device does not send them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.mqtt.watch import WatchEvent

BACKLOG_ATTENTION_S = 3600.0     # a reading waiting longer than this needs someone to look
STATES = ("signing_in", "signed_in", "error", "starting", "offline")


@dataclass
class Device:
    """One device as the broker last told us; ``code_deadline`` is monotonic."""

    device_id: str
    status: dict[str, Any] | None = None
    code: dict[str, Any] | None = None
    code_deadline: float | None = None
    changed: int = 0                 # Fleet.version at the last change (the page asks "what's new")

    @property
    def state(self) -> str:
        state = (self.status or {}).get("state")
        return state if isinstance(state, str) else "unknown"

    def seconds_left(self, now: float) -> float | None:
        if self.code is None or self.code_deadline is None:
            return None
        return max(0.0, self.code_deadline - now)

    def attention(self, now: float, backlog_s: float = BACKLOG_ATTENTION_S) -> list[str]:
        """Why a person is needed: pending code, error, storage, a stale backlog, a warning (may be empty)."""
        why: list[str] = []
        left = self.seconds_left(now)
        if left is not None and left > 0:
            why.append("code")
        s = self.status or {}
        if s.get("state") == "error" or (s.get("error") and s.get("state") != "offline"):
            why.append("error")
        storage = s.get("storage")
        if isinstance(storage, str) and storage not in ("ok", ""):
            why.append("storage")
        oldest = s.get("oldest_pending_s")
        if isinstance(oldest, int | float) and not isinstance(oldest, bool) and oldest > backlog_s:
            why.append("backlog")
        if s.get("warning") and s.get("state") != "offline":
            why.append("warning")       # still working, but someone should act soon
        return why

    def rank(self, now: float, backlog_s: float = BACKLOG_ATTENTION_S) -> tuple[Any, ...]:
        """Sort key: codes by time left, errors, storage, backlog (oldest first), warnings, the rest."""
        why = self.attention(now, backlog_s)
        if "code" in why:
            return (0, self.seconds_left(now), self.device_id)
        if "error" in why:
            return (1, 0, self.device_id)
        if "storage" in why:
            return (2, 0, self.device_id)
        if "backlog" in why:
            return (3, -float((self.status or {}).get("oldest_pending_s") or 0), self.device_id)
        if "warning" in why:
            return (4, 0, self.device_id)
        return (5, 0, self.device_id)

    def row(self, now: float, backlog_s: float = BACKLOG_ATTENTION_S) -> dict[str, Any]:
        """The JSON row of the web page and ``--summary`` (only what a person reads)."""
        s = self.status or {}
        raw_box = s.get("outbox")
        box: dict[str, Any] = raw_box if isinstance(raw_box, dict) else {}
        code = self.code or {}
        left = self.seconds_left(now)
        return {
            "device_id": self.device_id,
            "state": self.state,
            "account": s.get("account"),
            "error": s.get("error"),
            "storage": s.get("storage"),
            "clock": s.get("clock"),
            "warning": s.get("warning"),
            "signin_lapses_in_days": s.get("signin_lapses_in_days"),
            "outbox": {k: box.get(k) for k in ("pending", "dead", "dropped")},
            "oldest_pending_s": s.get("oldest_pending_s"),
            "last_upload": s.get("last_upload"),
            "version": s.get("version"),
            "code": None if left is None or left <= 0 else {
                "user_code": code.get("user_code"),
                "uri": code.get("verification_uri_complete") or code.get("verification_uri"),
                "verification_uri": code.get("verification_uri"),
                "seconds_left": int(left),
            },
            "attention": self.attention(now, backlog_s),
        }


class Fleet:
    """Every device seen on the broker; ``version`` increases on every change."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 backlog_s: float = BACKLOG_ATTENTION_S) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._devices: dict[str, Device] = {}
        self._clock = clock
        self.backlog_s = backlog_s
        self.version = 0

    def __len__(self) -> int:
        return len(self._devices)

    def apply(self, ev: WatchEvent) -> None:
        """Record one event (paho's thread: quick, never raises for a well-formed event)."""
        with self._lock:
            dev = self._devices.get(ev.device_id)
            if dev is None:
                dev = self._devices[ev.device_id] = Device(ev.device_id)
            if ev.kind == "status":
                dev.status = ev.payload
            elif ev.kind == "code":
                dev.code = ev.payload
                dev.code_deadline = _deadline(ev, self._clock())
            else:
                dev.code = dev.code_deadline = None
            self.version += 1
            dev.changed = self.version
            self._changed.notify_all()

    def wait_changed(self, since: int, timeout_s: float) -> int:
        """Block until ``version`` passes ``since`` (or the timeout); returns the version."""
        with self._lock:
            self._changed.wait_for(lambda: self.version != since, timeout_s)
            return self.version

    def devices(self) -> list[Device]:
        with self._lock:
            return list(self._devices.values())

    def counts(self) -> dict[str, int]:
        """Devices by state (the states of docs/INTERFACE.md first, then anything else seen)."""
        out = dict.fromkeys(STATES, 0)
        for dev in self.devices():
            out[dev.state] = out.get(dev.state, 0) + 1
        return out

    def needs_attention(self) -> list[Device]:
        now = self._clock()
        found = [d for d in self.devices() if d.attention(now, self.backlog_s)]
        return sorted(found, key=lambda d: d.rank(now, self.backlog_s))

    def rows(self, query: str = "", offset: int = 0, limit: int = 100) -> tuple[int, list[dict[str, Any]]]:
        """Matching devices, "needs attention" first; (how many match, the page asked for)."""
        now = self._clock()
        found = list(_matching(self.devices(), query.strip().lower()))
        found.sort(key=lambda d: d.rank(now, self.backlog_s))
        return len(found), [d.row(now, self.backlog_s) for d in found[offset:offset + limit]]


def _matching(devices: Iterable[Device], query: str) -> Iterable[Device]:
    if not query:
        yield from devices
        return
    for d in devices:
        s = d.status or {}
        hay = " ".join(str(x) for x in (d.device_id, d.state, s.get("account") or "", s.get("error") or "",
                                        s.get("storage") or "", (d.code or {}).get("user_code") or ""))
        if query in hay.lower():
            yield d


def _deadline(ev: WatchEvent, now: float) -> float | None:
    """When the code dies (monotonic): the broker's Message Expiry, else the payload's expires_at."""
    if ev.expiry_s is not None:
        return ev.received_monotonic + ev.expiry_s
    try:
        expires = datetime.strptime(str((ev.payload or {})["expires_at"]), "%Y-%m-%dT%H:%M:%SZ")
    except (KeyError, ValueError):
        return None
    return now + (expires.replace(tzinfo=UTC) - ev.received_at).total_seconds()
