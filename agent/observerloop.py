"""One thread serves every observer of the state: supervisor and health figures, the button and
LED, the panel, status.json and the MQTT publisher each get a step in one loop.

Before, each had a thread that a state change woke; a reading, its upload and the health
figures after each were four changes a minute, each waking four threads that then handed the
GIL to each other (docs/PERFORMANCE.md, "Idle"). Here a change wakes one thread, and changes
that only move figures (a reading, the outbox counts, the last upload, the health ages) are
gathered for ``SETTLE_S`` so a reading and its upload are drawn, written and published once;
when the loop already plans to wake within that time (the service plans a wake ``SETTLE_S``
after each reading is due), that wake serves them and they cost no wake-up of their own.
What a person acts on (a code, an error, sign-in, a notice, the button) is served at once.

Each step is a capability's own code (``Panel.serve_split``, ``StatusWriter.serve``, ...): it does
what is due and returns the seconds until it wants to run again (``math.inf``: only on news).
A step added with ``slack`` says its long waits are "about" (the panel's burn-in shift, the
button's net under a lost edge, the supervisor's health figures): a wait of ``SLACK_FROM_S`` or
more may end up to ``slack`` times itself late, so it is served by the next pass that runs for
another reason (a reading) instead of waking the box on its own. A step that also has deadlines
a person or systemd notices returns them apart (``Wait``): those are kept.
Components wake the loop for news that is not a state change (a button edge, MQTT connected,
``Panel.wake``) by setting ``news``, the ``agent.wakeup.Signal`` they were given. A step that
raises is logged once per streak (agent.net.retry.OutageLog) and tried again after ``RETRY_S``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable

from agent.net.retry import OutageLog
from agent.state import AgentState, Snapshot
from agent.wakeup import Signal, name_os_thread, wait_any

log = logging.getLogger(__name__)

SETTLE_S = 1.0        # figures-only changes are gathered this long (a reading and its upload)
RETRY_S = 1.0         # a step that raised runs again after this
SLACK_FROM_S = 20.0   # shorter waits (countdowns, rate limits, a held button) are kept exactly
# Snapshot fields that move with every reading and upload: gathered, not served at once.
FIGURES = frozenset({"last_reading", "outbox", "last_upload", "oldest_pending_mono", "signin_lapse_mono",
                     "clock_offset_s", "version"})


# What a step returns: seconds until it wants to run again, all of it "about" (``slack``
# applies); or (strict, loose): ``strict`` must be kept (a configured timeout such as
# display.sleep_after_s, a restart back-off), only ``loose`` may slip by ``slack``.
Wait = float | tuple[float, float]


class _Step:
    """One step of the loop. (A plain class: a dataclass costs ~1.5 ms to make at import, on
    the way to the first code; docs/PERFORMANCE.md "Sign-in".)"""

    __slots__ = ("name", "run", "outage", "slack", "last", "due", "latest")

    def __init__(self, name: str, run: Callable[[], Wait], outage: OutageLog, slack: float = 0.0,
                 last: bool = False) -> None:
        self.name = name
        self.run = run
        self.outage = outage
        self.slack = slack
        self.last = last
        self.due = -math.inf
        self.latest = -math.inf     # due plus its slack: the loop wakes for it by then


class ObserverLoop:
    """The observers' thread; ``add`` steps, ``start``, ``stop``."""

    def __init__(self, state: AgentState, *, settle_s: float = SETTLE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.state = state
        self.settle_s = settle_s
        self.news = Signal()              # serve every step now
        self._rearm = Signal()            # figures moved: wake to set the settle timer
        self._clock = clock
        self._steps: list[_Step] = []
        self._steps_lock = threading.Lock()
        self._last: Snapshot | None = None
        self._settle_at = math.inf        # figures changed: serve them by then
        self._planned = -math.inf         # when the sleeping loop wakes next (-inf: awake)
        self._stopping = Signal()
        self.died = Signal()              # the thread ended without stop (the service exits 1)
        self._thread: threading.Thread | None = None
        self._ident: int | None = None
        self.passes = 0                   # tests: how often every step was served
        self.wakes = 0                    # ... and how often the thread ran at all

    def add(self, name: str, step: Callable[[], Wait], *, slack: float = 0.0, last: bool = False) -> None:
        """``last``: the step hands work to another thread (MQTT publishing wakes paho's): run
        it after the others, so that thread does not wait for this one's GIL."""
        entry = _Step(name, step, OutageLog(log, level=logging.ERROR, clock=self._clock), slack=slack,
                      last=last)
        with self._steps_lock:
            self._steps.append(entry)
            self._steps.sort(key=lambda st: st.last)      # stable: otherwise in the order added
        self.news.set()

    def start(self) -> ObserverLoop:
        self.state.subscribe(self._on_state)
        self._thread = threading.Thread(target=self._run, name="observers", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 1.0) -> bool:
        """Idempotent; returns within ``timeout_s`` (a step in progress finishes): True when
        no step runs any more (the caller may close what the steps use)."""
        self.state.unsubscribe(self._on_state)
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("observer loop did not stop within %.1f s (in step)", timeout_s)
                return False
        return True

    def _on_state(self, snap: Snapshot) -> None:
        old, self._last = self._last, snap
        if threading.get_ident() == self._ident:
            self.news.set()          # one of our steps changed it: serve the others once more
        elif old is None or _serves_at_once(old, snap):
            self.news.set()
        else:
            if self._settle_at == math.inf:
                self._settle_at = self._clock() + self.settle_s
            if self._planned > self._settle_at:
                self._rearm.set()    # asleep past the settle: wake to sleep shorter; else the
                                     # wake already planned serves them (e.g. _reading_due's)

    def _run(self) -> None:
        try:
            self._serve_until_stopped()
        finally:
            if not self._stopping.is_set():
                self.died.set()

    def _serve_until_stopped(self) -> None:
        name_os_thread()
        self._ident = threading.get_ident()
        while not self._stopping.is_set():
            self._planned = -math.inf
            self.wakes += 1
            now = self._clock()
            rearm_only = self._rearm.is_set() and not self.news.is_set()
            # Figures waiting are served by any wake but the one that only set their timer.
            every = self.news.is_set() or now >= self._settle_at or (
                self._settle_at != math.inf and not rearm_only)
            self.news.clear()
            self._rearm.clear()
            if every:
                self._settle_at = math.inf
                self.passes += 1
            with self._steps_lock:
                steps = list(self._steps)
            for step in steps:
                if self._stopping.is_set():
                    return
                if every or step.due <= now:
                    strict, loose = self._call(step)
                    delay = min(strict, loose)
                    at = self._clock()
                    step.due = at + delay
                    step.latest = at + min(strict, loose + (step.slack * loose if loose >= SLACK_FROM_S else 0.0))
            wake_at = min([self._settle_at, *(s.latest for s in steps)])
            self._planned = wake_at
            wake_at = min(wake_at, self._settle_at)    # figures that came while computing it
            wait_any(wake_at - self._clock(), self._stopping, self.news, self._rearm)

    def _call(self, step: _Step) -> tuple[float, float]:
        """(strict, loose) seconds: see ``Wait``."""
        try:
            delay = step.run()
        except Exception:
            step.outage.failed(f"{step.name} step failed", f"trying again in {RETRY_S:g} s", exc_info=True)
            return RETRY_S, math.inf
        step.outage.ended(f"{step.name} steps work again")
        if isinstance(delay, tuple):
            return max(0.0, delay[0]), max(0.0, delay[1])
        return math.inf, max(0.0, delay)


def _serves_at_once(old: Snapshot, new: Snapshot) -> bool:
    """Anything but the figures changed: a person may be waiting for it."""
    return any(getattr(old, f.name) != getattr(new, f.name)
               for f in dataclasses.fields(Snapshot) if f.name not in FIGURES)
