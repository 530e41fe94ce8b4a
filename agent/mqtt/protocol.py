"""The device's topics and payloads as pure code: commands, results and what the broker holds.

No sockets and no threads here: ``Outbound.plan`` takes a snapshot and a monotonic time and says
which retained messages to publish, so it is tested without a broker.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.state import DeviceCode, Snapshot

ACTIONS = ("renew_code", "sign_out", "flush", "publish_status")
MAX_COMMAND_BYTES = 4096
STATUS_MIN_INTERVAL_S = 5.0          # outbox/last_upload-only changes: at most this often
STATUS_AGE_INTERVAL_S = 60.0         # ages alone (a stalled box's oldest_pending_s): this often
CHURN_KEYS = frozenset({"outbox", "last_upload"})                        # change with every reading/upload
AGE_KEYS = frozenset({"oldest_pending_s", "signin_lapses_in_days"})     # change with time alone
OFFLINE = b'{"state":"offline"}'


# --------------------------------------------------------------------------- commands

@dataclass(frozen=True)
class Command:
    """A parsed ``P/D/cmd`` message: ``action`` is valid when ``error`` is None."""

    action: str | None
    error: str | None


def parse_command(payload: bytes) -> Command:
    """Check one command message; never raises (every message gets exactly one result)."""
    if len(payload) > MAX_COMMAND_BYTES:
        return Command(None, f"payload too large ({len(payload)} bytes; at most {MAX_COMMAND_BYTES})")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return Command(None, "payload is not UTF-8 JSON")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return Command(None, 'payload is not JSON; send {"action": "<name>"}')
    if not isinstance(data, dict):
        return Command(None, f'payload must be a JSON object like {{"action": "<name>"}}, '
                             f"not {_json_type(data)}")
    action = data.get("action")
    if "action" not in data:
        return Command(None, f"missing \"action\"; one of: {', '.join(ACTIONS)}")
    if not isinstance(action, str):
        return Command(None, f"\"action\" must be a string, not {_json_type(action)}")
    if action not in ACTIONS:
        shown = action if len(action) <= 64 else action[:64] + "..."
        return Command(action, f"unknown action {shown!r}; one of: {', '.join(ACTIONS)}")
    return Command(action, None)


def result_payload(action: str | None, error: str | None) -> bytes:
    return json.dumps({"action": action, "ok": error is None, "error": error},
                      separators=(",", ":")).encode()


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------- what to publish

@dataclass(frozen=True)
class Publication:
    """One retained message the broker should hold; ``expiry_s`` is MQTT 5's Message Expiry."""

    topic: str
    payload: bytes
    expiry_s: int | None = None


class Outbound:
    """Decides what the broker should hold for this device; pure, clock passed in, unit-tested.

    ``plan`` assumes its publications are made (the caller only asks while connected and asks
    with ``force=True`` after every (re)connect, when the broker's copy is unknown).

    Status: what a person acts on (state, error, storage, clock, ...) goes out at once; sample-
    rate churn (outbox counts, last upload) at most every ``status_min_interval_s``; ages that
    move with time alone (``oldest_pending_s``, ``signin_lapses_in_days``) at most every
    ``status_age_interval_s`` — and at least that often while ``oldest_pending_s`` is non-null
    (``plan`` asks to be called again then), so a box whose uploads stall, with no reading and
    no other change, still shows the backlog growing (``watch --summary`` thresholds see it).
    """

    def __init__(self, prefix: str, device_id: str, version: str, *,
                 status_min_interval_s: float = STATUS_MIN_INTERVAL_S,
                 status_age_interval_s: float = STATUS_AGE_INTERVAL_S) -> None:
        self.device_id = device_id
        self.version = version
        self.status_topic = f"{prefix}/{device_id}/status"
        self.code_topic = f"{prefix}/{device_id}/auth/code"
        self.min_interval_s = status_min_interval_s
        self.age_interval_s = status_age_interval_s
        self._status: dict[str, Any] | None = None
        self._status_at = -math.inf
        self._code: DeviceCode | None = None
        self.code_published = False          # a code may be on the broker: stop() must clear it

    def plan(self, snap: Snapshot, now: float, *,
             force: bool = False) -> tuple[list[Publication], float | None]:
        """Publications needed now, and the monotonic time to ask again (None: on change only)."""
        out: list[Publication] = []
        wake: list[float] = []

        status = snap.status_payload(self.version, now)
        old = self._status
        if force or old is None or status != old:
            changed = set() if old is None else {k for k in status.keys() | old.keys()
                                                 if status.get(k) != old.get(k)}
            if force or old is None or changed - CHURN_KEYS - AGE_KEYS:
                due = now                                   # what a person acts on: at once
            elif changed & CHURN_KEYS:
                due = self._status_at + self.min_interval_s
            else:
                due = self._status_at + self.age_interval_s
            if now >= due:
                out.append(Publication(self.status_topic, _json(status)))
                self._status, self._status_at = status, now
            else:
                wake.append(due)
        if self._status is not None and self._status.get("oldest_pending_s") is not None:
            # A backlog ages while nothing else happens: come back to show it.
            again = self._status_at + self.age_interval_s
            wake.append(again if again > now else now + self.age_interval_s)

        code = snap.code if snap.code is not None and snap.code.seconds_left(now) > 0 else None
        if force or code != self._code:
            if code is not None:
                # Whole seconds, rounded down: the broker must never offer a code that is dead.
                expiry = max(1, int(code.seconds_left(now)))
                public = code.public(self.device_id, true_now=snap.true_now(), now_monotonic=now)
                out.append(Publication(self.code_topic, _json(public), expiry))
                self.code_published = True
            else:
                out.append(Publication(self.code_topic, b""))
                self.code_published = False
            self._code = code
        if code is not None:
            wake.append(code.expires_at_monotonic)   # 3.1.1 has no expiry: clear it ourselves
        return out, min(wake) if wake else None

    def offline_status(self, snap: Snapshot) -> Publication:
        status = snap.status_payload(self.version)
        status["state"] = "offline"
        return Publication(self.status_topic, _json(status))


def _json(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
