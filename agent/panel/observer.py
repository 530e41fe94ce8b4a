"""The panel: observes AgentState and keeps the display showing the right screen.

One thread draws; state observers only hand it the newest Snapshot and wake it, so a new code
reaches the glass within one render (a few ms) of ``state.code_issued``. That thread is the
panel's own (``start()``) or the service's observer loop (``start(thread=False)`` with the loop's
``wakeup`` Signal, which then calls ``serve()``; agent/observerloop.py).

Burn-in care, for OLEDs that show the same status for months:
- blank (``display.power(False)``) after ``sleep_after_s`` without a *meaningful* change — a new
  screen, code, error or notice, or ``wake()`` (the button). New readings and outbox counts do
  not count, or a 60 s sampler would keep the panel lit forever.
- never blank while a code is shown: the person may be walking over to read it, a code lives
  at most ~15 min, and the countdown keeps changing pixels anyway.
- shift everything but the code screen by a pixel every ``shift_every_s`` (the QR stays put),
  counted from the last shift and taken by any redraw from 90 % of it on, so on a box that
  redraws for a reading each minute the shift rides on that redraw instead of waking the panel.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Literal

from PIL import Image

from agent.net.retry import OutageLog
from agent.panel import screens
from agent.state import AgentState, Snapshot
from agent.wakeup import name_os_thread
from hw.base import Display
from hw.errors import HardwareError

log = logging.getLogger(__name__)

SHIFTS = ((0, 0), (1, 0), (1, 1), (0, 1))
MAX_WAIT_S = 1.0      # a failing display is tried again this often; otherwise the panel sleeps
                      # until the state changes or something on it is due (countdown, page, shift)


class Panel:
    """Draws ``state`` on ``display`` from its own thread until ``stop``."""

    def __init__(self, display: Display, state: AgentState, *, sleep_after_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic, page_s: float = screens.PAGE_S,
                 shift_every_s: float = 60.0, wakeup: threading.Event | None = None,
                 starting_after_s: float = 0.0) -> None:
        self.display = display
        # The starting screen waits this long for news before it is drawn: at a box's start the
        # code usually follows within a fraction of a second, and a starting frame drawn just
        # before it is CPU the code waits for (docs/PERFORMANCE.md "Sign-in"). An IdP that is
        # slow or unreachable still gets the starting screen this soon (docs/INTERFACE.md).
        self.starting_after_s = starting_after_s
        self._starting_due = clock() + starting_after_s
        self.state = state
        self.sleep_after_s = sleep_after_s
        self.page_s = page_s
        self.shift_every_s = shift_every_s
        self._shift = 0                         # index into SHIFTS
        self._shifted_at = clock()
        self._clock = clock
        self._wakeup = wakeup or threading.Event()     # wake(); state changes too in own-thread mode
        self._drawn = threading.Condition()     # guards _seen / _drawn_upto (wait_drawn)
        self._seen = 0                          # snapshots observed so far
        self._drawn_upto = 0                    # ... of which the panel has drawn this many
        self._stopping = threading.Event()
        self._display_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._last_frame: bytes | None = None
        self._last_key: tuple[object, ...] | None = None
        self._drawn_as: tuple[object, ...] | None = None     # the starting screen on the glass
        self._activity_at = clock()
        self._wake_requested = False
        self._asleep = False
        self._code_key: tuple[str, float] | None = None
        self._code_seen_at = 0.0
        self._code_lifetime_s = screens.DEFAULT_CODE_LIFETIME_S
        self._strict_s = self._loose_s = math.inf    # the last pass's waits, apart (serve_split)
        # A display outage is a fault like any other: agent.net.retry.OutageLog's one rule.
        self._display_outage = OutageLog(log, clock=clock)
        self._crashed = OutageLog(log, level=logging.ERROR, clock=clock)
        self.frames_shown = 0
        self.warmed_up = threading.Event()     # set once fonts/QR paths are loaded (tests, bench)

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self, *, thread: bool = True) -> Panel:
        """Subscribe to state and start drawing. ``thread=False``: tests call ``step()``."""
        self.state.subscribe(self._observe)
        if thread:
            self._thread = threading.Thread(target=self._run, name="panel", daemon=True)
            self._thread.start()
        return self

    def wake(self) -> None:
        """The button was pressed: light the panel and restart the sleep timer."""
        self._wake_requested = True
        self._wakeup.set()

    def stop(self, final: Literal["stopped", "blank"] = "stopped", timeout_s: float = 1.0) -> None:
        """Stop drawing and leave the panel showing "stopped", or dark. Returns within ~1 s."""
        self.state.unsubscribe(self._observe)
        self._stopping.set()
        self._wakeup.set()
        with self._drawn:
            self._drawn.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("panel thread did not stop within %.1f s", timeout_s)
        try:
            with self._display_lock:
                if final == "blank":
                    self.display.power(False)
                else:
                    self.display.show(screens.render_stopped(self.display.size))
                    self.display.power(True)
        except HardwareError as err:
            log.warning("could not leave the final screen on the display: %s", err)

    @property
    def asleep(self) -> bool:
        return self._asleep

    # -- drawing ----------------------------------------------------------------------------------

    def _observe(self, snap: Snapshot) -> None:
        with self._drawn:
            self._seen += 1
        if self._thread is not None:
            self._wakeup.set()       # else the observer loop decides when to serve (it settles figures)

    def wait_drawn(self, timeout_s: float) -> bool:
        """Wait until the panel has drawn the newest state it was given (the service lets
        telemetry start only once the code is on the glass). False on timeout or stop."""
        with self._drawn:
            target = self._seen
            return self._drawn.wait_for(lambda: self._drawn_upto >= target or self._stopping.is_set(),
                                        timeout_s) and not self._stopping.is_set()

    def _run(self) -> None:
        name_os_thread()
        while not self._stopping.is_set():
            self._wakeup.clear()
            delay = self.serve()
            self._wakeup.wait(None if delay == math.inf else delay)

    def serve(self) -> float:
        """One pass of the drawing thread (the panel's own or the observer loop): draw what is
        due, tell ``wait_drawn``; returns seconds until something on the panel changes next."""
        if self._stopping.is_set():
            return math.inf
        with self._drawn:
            upto = self._seen
        delay = self._guarded_step()
        with self._drawn:
            self._drawn_upto = upto
            self._drawn.notify_all()
        if not self.warmed_up.is_set():
            # After the first frame: what every code screen needs, so the first code is
            # quick; nothing is drawn (a trial render would cost the start its CPU).
            screens.warm_up(self.display.size)
            self.warmed_up.set()
        return delay

    def _guarded_step(self) -> float:
        """``step()`` that never raises: a drawing bug must not kill the panel thread for good.
        Its traceback is logged once per streak, then counted (not once a second)."""
        try:
            delay = self.step()
        except Exception:
            self._crashed.failed("panel step failed", f"trying again in {MAX_WAIT_S:g} s",
                                 exc_info=True)
            return MAX_WAIT_S
        self._crashed.ended("panel steps work again")
        return delay

    @property
    def _failing(self) -> bool:
        """The display stopped answering and has not answered since."""
        return self._display_outage.ongoing

    def step(self, now: float | None = None) -> float:
        """Draw what is due now; returns seconds until something on the panel changes next."""
        now = self._clock() if now is None else now
        # The state's snapshot now, not the one ``_observe`` was handed: the observer loop may
        # run this step while an earlier observer of the same change still runs (it yields the
        # GIL), before ours has been told; that change would wait for the next pass.
        snap = self.state.snapshot
        name = screens.screen_name(snap)
        code = snap.code
        key = (name, code.user_code if code else None, snap.error, snap.notice,
               snap.renewals_exhausted, snap.phase, snap.account, snap.warning)
        if key != self._last_key:
            self._last_key = key
            self._activity_at = now
        if code is not None and self._code_key != (code.user_code, code.expires_at_monotonic):
            self._code_key = (code.user_code, code.expires_at_monotonic)
            self._code_seen_at = now
            self._code_lifetime_s = max(1.0, code.seconds_left(now))
        if self._wake_requested:
            self._wake_requested = False
            self._activity_at = now

        sleepy = name not in ("code", "hold") and self.sleep_after_s > 0
        should_sleep = sleepy and now - self._activity_at >= self.sleep_after_s
        if should_sleep != self._asleep:
            if not self._power(not should_sleep):
                return MAX_WAIT_S
            self._asleep = should_sleep
            log.debug("panel %s", "asleep" if should_sleep else "awake")
        if self._asleep:
            return MAX_WAIT_S if self._failing else math.inf    # dark until there is news

        page = 0
        pages = screens.page_count(snap)
        if name == "code":
            page = int((now - self._code_seen_at) // self.page_s) % pages
        elif pages > 1:     # signed in as an app, or a warning: the status alternates too
            page = int((now - self._activity_at) // self.page_s) % pages
        shift = (0, 0)
        if name != "code" and self.shift_every_s > 0:
            if now - self._shifted_at >= 0.9 * self.shift_every_s:
                self._shift, self._shifted_at = self._shift + 1, now
            shift = SHIFTS[self._shift % len(SHIFTS)]
        if name == "starting" and self._last_frame is None and now < self._starting_due:
            return max(0.005, self._starting_due - now)      # a code may come first (__init__)
        # The starting screen shows nothing but its key: the state changes of the start (links,
        # the clock's first answer) would each draw it again, CPU the code is waiting for.
        drawn_as = (key, shift) if name == "starting" else None
        if drawn_as is not None and drawn_as == self._drawn_as:
            return self._next_delay(now, name, snap)
        img = screens.render(snap, now, page, size=self.display.size,
                             code_lifetime_s=self._code_lifetime_s if code else None)
        img = _shifted(img, shift)
        frame = img.tobytes()
        if frame != self._last_frame and self._show(img):
            self._last_frame = frame
        self._drawn_as = drawn_as if frame == self._last_frame else None
        return self._next_delay(now, name, snap)

    def serve_split(self) -> tuple[float, float]:
        """``serve()`` for the observer loop: (strict, loose) seconds, where only ``loose`` (the
        burn-in shift, the ages the status screen prints) may be served late; the countdown,
        the pages and ``sleep_after_s`` are kept to the second."""
        self._strict_s = self._loose_s = math.inf
        delay = self.serve()
        if self._loose_s == math.inf:       # nothing that may slip (asleep, failing, stopping)
            return delay, math.inf
        return self._strict_s, self._loose_s

    def _next_delay(self, now: float, name: str, snap: Snapshot) -> float:
        """Seconds until something on the panel changes; keeps which waits may slip in
        ``_loose_s`` (``serve_split``)."""
        waits = [MAX_WAIT_S if self._failing else math.inf]
        loose = [math.inf]
        if name != "code" and self.shift_every_s > 0:
            loose.append(max(0.005, self._shifted_at + self.shift_every_s - now))   # burn-in shift
        if name == "code" and snap.code is not None:
            left = snap.code.seconds_left(now)
            waits.append((left % 1.0) + 0.005 if left > 0 else MAX_WAIT_S)      # next whole second
            waits.append(self.page_s - ((now - self._code_seen_at) % self.page_s) + 0.005)
        elif screens.page_count(snap) > 1:
            waits.append(self.page_s - ((now - self._activity_at) % self.page_s) + 0.005)
        if name == "status":
            # Ages the status screen prints: the oldest queued reading (whole minutes and up),
            # the days a sign-in survives offline (one decimal). Drawn again when they change.
            if snap.oldest_pending_mono is not None and snap.outbox.pending:
                loose.append(60.0 - ((now - snap.oldest_pending_mono) % 60.0) + 0.005)
            if snap.signin_lapse_mono is not None:
                # round(days, 1) flips when what is left crosses x.x5 days
                loose.append(((snap.signin_lapse_mono - now - 4320.0) % 8640.0) + 0.005)
        if self.sleep_after_s > 0 and name not in ("code", "hold"):
            waits.append(max(0.0, self._activity_at + self.sleep_after_s - now))
        self._strict_s, self._loose_s = max(0.005, min(waits)), min(loose)
        return max(0.005, min(waits + loose))

    def _show(self, img: Image.Image) -> bool:
        try:
            with self._display_lock:
                if self._stopping.is_set():
                    return False         # stop() leaves its final screen; a late step must not cover it
                self.display.show(img)
        except HardwareError as err:
            self._report(err)
            return False
        self.frames_shown += 1
        self._display_outage.ended("display answers again")
        return True

    def _power(self, on: bool) -> bool:
        try:
            with self._display_lock:
                if self._stopping.is_set():
                    return False
                self.display.power(on)
        except HardwareError as err:
            self._report(err)
            return False
        return True

    def _report(self, err: HardwareError) -> None:
        self._display_outage.failed(f"display: {err}")     # tried again every MAX_WAIT_S


def _shifted(img: Image.Image, offset: tuple[int, int]) -> Image.Image:
    if offset == (0, 0):
        return img
    out = Image.new(img.mode, img.size, 0)
    out.paste(img, offset)
    return out
