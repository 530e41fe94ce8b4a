"""The figures that tell an admin a box is healthy, kept on AgentState by the service loop.

``clock`` (synced / corrected / unsynced) and its note come from agent/clock.py;
``oldest_pending_s`` is the age of the oldest unsent reading, the one number that says "this box
is falling behind"; ``signin_lapses_in_days`` is how long the refresh token survives if the box
stays offline (the IdP's inactivity lifetime, ``auth.refresh_lifetime_days``, counted from the
last token the IdP itself issued). Both are kept as monotonic instants on the snapshot, so every
reader (status, MQTT, panel) computes an exact age whenever it looks; this pass only runs when
something changed, and AgentState notifies observers only when a value really moved.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.statusfile import refresh_token_time

if TYPE_CHECKING:
    from agent.clock import ClockTrust
    from agent.state import AgentState
    from agent.telemetry.outbox import Outbox, Row

log = logging.getLogger(__name__)


class Health:
    """``step()`` once a second (the service's main loop)."""

    def __init__(self, state: AgentState, clock: ClockTrust, outbox: Outbox, auth: Any, *,
                 cache_path: Path, refresh_lifetime_days: float,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.state = state
        self.clock = clock
        self.outbox = outbox
        self.auth = auth
        self.cache_path = cache_path
        self.lifetime_s = refresh_lifetime_days * 86400.0
        self.monotonic = monotonic
        self._oldest: tuple[int, float] | None = None       # (seq, sampled at, monotonic)
        self._cache_seen: tuple[float, float | None] | None = None   # (mtime, RT time)

    def step(self) -> bool:
        """Update the figures; False when the outbox was busy and the oldest reading's age is
        last pass's (ask again soon: the caller is the observers' thread, which must not wait)."""
        now = self.monotonic()
        changes: dict[str, Any] = dict(self.clock.status())
        oldest, fresh = self._oldest_mono(now)
        changes["oldest_pending_mono"] = oldest
        changes["signin_lapse_mono"] = self._lapse_mono(now)
        self.state.update(**changes)
        return fresh

    def _oldest_mono(self, now: float) -> tuple[float | None, bool]:
        kept = None if self._oldest is None else self._oldest[1]
        # The outbox's lock can be held for seconds (a put's fsync, a dead-letter retry, a busy
        # database, VACUUM at open): never wait for it here, keep the last figure instead.
        try:
            row = self.outbox.oldest(wait=False)
        except TimeoutError:
            return kept, False
        except Exception as err:  # noqa: BLE001 - a figure must never stop the service loop
            log.debug("health: oldest pending row unreadable: %s", err)
            return kept, True
        return self._sampled(row, now), True

    def _sampled(self, row: Row | None, now: float) -> float | None:
        """The monotonic instant ``row`` (the oldest pending reading, or None) was sampled."""
        if row is None:
            self._oldest = None
            return None
        if self._oldest is not None and self._oldest[0] == row.seq:
            return self._oldest[1]
        st = row.stamp
        if st is not None and st.boot == self.clock.boot_id:
            sampled = st.mono
        else:
            # Another boot (or an unstamped row): its monotonic time means nothing here; its
            # (corrected) wall time is the best there is.
            if st is not None:
                when, _ = self.clock.true_time(st)
            else:
                try:
                    when = datetime.fromisoformat(str(row.reading["time"]).replace("Z", "+00:00")).timestamp()
                except (KeyError, ValueError):
                    when = self.clock.now()
            sampled = now - max(0.0, self.clock.now() - when)
        self._oldest = (row.seq, sampled)
        return sampled

    def _lapse_mono(self, now: float) -> float | None:
        last = getattr(self.auth, "last_refresh_monotonic", None)
        if isinstance(last, int | float):
            return float(last) + self.lifetime_s
        try:
            mtime = self.cache_path.stat().st_mtime
        except OSError:
            return None
        if self._cache_seen is None or self._cache_seen[0] != mtime:
            self._cache_seen = (mtime, refresh_token_time(self.cache_path))
        issued = self._cache_seen[1]
        if issued is None:
            return None
        # Written by an earlier run: msal stamped it with the wall clock of that time.
        return now + (issued + self.lifetime_s - self.clock.now())
