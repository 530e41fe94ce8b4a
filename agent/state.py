"""AgentState: what the device knows, changed through methods, observed by screen, MQTT and status.

Components never reach into each other; they publish here. Every change produces a new frozen
``Snapshot`` and calls each observer with it (in the changing thread, so observers must be quick:
the screen and the MQTT notifier hand work to their own threads).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from hw.records import record

log = logging.getLogger(__name__)

Phase = Literal["starting", "signing_in", "signed_in", "error", "stopped"]
LinkState = Literal["up", "down", "unknown", "off"]
StorageState = Literal["ok", "full", "read_only"]


@record
class DeviceCode:
    """A user code as the IdP issued it. Times: monotonic for countdowns, wall for display/MQTT."""

    user_code: str
    verification_uri: str
    expires_at_monotonic: float
    expires_at_wall: datetime
    interval_s: float
    message: str = ""
    verification_uri_complete: str | None = None

    def seconds_left(self, now_monotonic: float | None = None) -> float:
        now = time.monotonic() if now_monotonic is None else now_monotonic
        return max(0.0, self.expires_at_monotonic - now)

    @property
    def qr_uri(self) -> str:
        """What the QR holds: exactly the complete URI when the IdP sent one, else the plain URI."""
        return self.verification_uri_complete or self.verification_uri

    def public(self, device_id: str, *, true_now: datetime | None = None,
               now_monotonic: float | None = None) -> dict[str, Any]:
        """The MQTT/JSON shape of docs/INTERFACE.md (no secrets in a user code).

        ``true_now`` (``Snapshot.true_now()``): ``expires_at`` is then true time plus the
        seconds left on the monotonic clock, right even when the wall clock was days off when
        the code was issued or has stepped since."""
        expires = self.expires_at_wall
        if true_now is not None:
            expires = true_now + timedelta(seconds=self.seconds_left(now_monotonic))
        data: dict[str, Any] = {
            "device_id": device_id,
            "user_code": self.user_code,
            "verification_uri": self.verification_uri,
            "expires_at": expires.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "message": self.message or f"To sign in, open {self.verification_uri} and enter the code "
                                       f"{self.user_code}.",
        }
        if self.verification_uri_complete:
            data["verification_uri_complete"] = self.verification_uri_complete
        return data


@record
class OutboxCounts:
    pending: int = 0
    dead: int = 0
    dropped: int = 0


@record
class LastReading:
    sensor: str
    value: float | None
    unit: str
    error: str | None = None


@record
class Snapshot:
    """One consistent view of the agent; observers get a new one on every change."""

    phase: Phase = "starting"
    account: str | None = None
    code: DeviceCode | None = None
    error: str | None = None                  # one short operator line: what to do
    error_panel: str | None = None            # the same, shorter, for the 128x64 panel (if it has one)
    renewals_exhausted: bool = False          # codes ran out: button / renew_code / restart
    notice: str | None = None                 # transient message (e.g. "code declined", "hold to sign out")
    outbox: OutboxCounts = field(default_factory=OutboxCounts)
    last_upload: datetime | None = None
    last_reading: LastReading | None = None
    links: dict[str, LinkState] = field(default_factory=dict)   # "idp", "api", "mqtt"
    device_id: str = ""                       # [device] id: the code screen says whose box it is
    warning: str | None = None                # still working, but a person should act soon
                                              # (a sign-in certificate about to expire)
    storage: StorageState = "ok"              # the state dir: full / read-only stops storing readings
    # Time (agent/clock.py): what applies now, what to add to the wall clock, the note for people.
    clock: str = "unsynced"                   # synced | corrected | unsynced
    clock_offset_s: float = 0.0               # true time minus time.time() (0 when trusted/unknown)
    clock_note: str | None = None             # "clock not synchronized (off by ~3 d)"
    # Health figures, kept as monotonic instants so an age is exact whenever it is read.
    oldest_pending_mono: float | None = None  # when the oldest unsent reading was sampled
    signin_lapse_mono: float | None = None    # when the refresh token dies if the box stays offline
    version: int = 0                          # increases on every change

    def true_now(self) -> datetime:
        """The wall clock corrected as readings are (agent/clock.py)."""
        return datetime.now(UTC) + timedelta(seconds=self.clock_offset_s)

    def oldest_pending_s(self, now_monotonic: float | None = None) -> int | None:
        """Age of the oldest unsent reading, whole seconds (None: nothing pending)."""
        if self.oldest_pending_mono is None or self.outbox.pending == 0:
            return None
        now = time.monotonic() if now_monotonic is None else now_monotonic
        return max(0, int(now - self.oldest_pending_mono))

    def signin_lapses_in_days(self, now_monotonic: float | None = None) -> float | None:
        """Days the sign-in survives offline (refresh-token inactivity lifetime), one decimal;
        None while not signed in (a code on show, just signed out): there is nothing to lapse."""
        if self.signin_lapse_mono is None or self.phase == "signing_in":
            return None
        now = time.monotonic() if now_monotonic is None else now_monotonic
        return max(0.0, round((self.signin_lapse_mono - now) / 86400.0, 1))

    def status_payload(self, version: str, now_monotonic: float | None = None) -> dict[str, Any]:
        """The retained MQTT status / `status --json` shape of docs/INTERFACE.md (ages as of
        ``now_monotonic``, default now)."""
        payload = {
            "state": self.phase if self.phase != "stopped" else "offline",
            "account": self.account,
            "error": self.error,
            "outbox": dataclasses.asdict(self.outbox),
            "oldest_pending_s": self.oldest_pending_s(now_monotonic),
            "last_upload": iso(self.last_upload),
            "storage": self.storage,
            "clock": self.clock,
            "signin_lapses_in_days": self.signin_lapses_in_days(now_monotonic),
            "version": version,
        }
        if self.warning:       # only while there is one: the shape stays what subscribers know
            payload["warning"] = self.warning
        if self.clock_note:    # likewise: "clock not synchronized (off by ~3 d)"
            payload["clock_note"] = self.clock_note
        return payload


Observer = Callable[[Snapshot], None]


class AgentState:
    """Thread-safe holder of the current ``Snapshot``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshot = Snapshot()
        self._observers: list[Observer] = []

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def subscribe(self, observer: Observer) -> None:
        """Call ``observer`` now with the current snapshot and after every change."""
        with self._lock:
            self._observers.append(observer)
            snap = self._snapshot
        _call(observer, snap)

    def unsubscribe(self, observer: Observer) -> None:
        with self._lock:
            if observer in self._observers:
                self._observers.remove(observer)

    def update(self, **changes: Any) -> Snapshot:
        """Apply ``changes`` (Snapshot field names) and notify observers if anything changed."""
        return self._change(lambda _old: changes)

    def _change(self, compute: Callable[[Snapshot], dict[str, Any]]) -> Snapshot:
        """Read-modify-write under the lock: ``compute`` sees the current snapshot and returns
        the fields to set, so concurrent changes (two links at once) never overwrite each other."""
        with self._lock:
            old = self._snapshot
            changes = compute(old)
            if "error" in changes and "error_panel" not in changes:
                changes = {**changes, "error_panel": None}     # a short form belongs to its error
            if all(getattr(old, k) == v for k, v in changes.items()):
                return old
            snap = dataclasses.replace(old, version=old.version + 1, **changes)
            self._snapshot = snap
            observers = list(self._observers)
        for obs in observers:
            _call(obs, snap)
        return snap

    # Named transitions, so callers say what happened rather than which fields to set.

    def code_issued(self, code: DeviceCode) -> None:
        self.update(phase="signing_in", code=code, error=None, renewals_exhausted=False)

    def code_cleared(self, notice: str | None = None) -> None:
        self.update(code=None, notice=notice)

    def signed_in(self, account: str | None) -> None:
        self.update(phase="signed_in", account=account, code=None, error=None,
                    renewals_exhausted=False, notice=None)

    def signed_out(self) -> None:
        self.update(phase="signing_in", account=None, code=None, signin_lapse_mono=None)

    def sign_in_lost(self, message: str) -> None:
        """The saved sign-in cannot be used any more (the IdP refused the refresh token, or the
        cache is damaged): one change to "signing in, account gone", with ``message`` as both
        the error and the notice the next code screen shows; never a transient "error" phase."""
        self.update(phase="signing_in", account=None, code=None, error=message, notice=message,
                    signin_lapse_mono=None)

    def codes_exhausted(self, message: str) -> None:
        """Automatic code renewals ran out: a person must ask (button, renew_code, restart)."""
        self.update(phase="error", code=None, renewals_exhausted=True, error=message)

    def failed(self, message: str, panel: str | None = None) -> None:
        """An error a person must act on; ``panel``: its short form for the 128x64 panel
        (status, MQTT and the journal carry ``message``)."""
        self.update(phase="error", error=message, error_panel=panel, code=None)

    def set_storage(self, storage: StorageState) -> None:
        """The outbox found the state directory full or read-only, or writable again."""
        self.update(storage=storage)

    def set_link(self, name: str, link: LinkState) -> None:
        def compute(old: Snapshot) -> dict[str, Any]:
            if old.links.get(name) == link:
                return {}
            return {"links": {**old.links, name: link}}

        self._change(compute)

def iso(when: datetime | None) -> str | None:
    """UTC ISO-8601 with milliseconds and Z, as in the payloads of docs/INTERFACE.md."""
    if when is None:
        return None
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def _call(observer: Observer, snap: Snapshot) -> None:
    try:
        observer(snap)
    except Exception:
        # An observer bug must not break the component that changed the state.
        log.exception("state observer %r failed", observer)
