"""The button and the LED.

Button (to ground, internal pull-up): a short press calls ``on_short_press`` (wake the screen,
ask for a new code); holding it ``hold_s`` calls ``on_long_press`` (sign out) while it is still
held, so the person gets the result without guessing when to let go. While held, a countdown
notice goes into the state for the screen. Debouncing is done here on the level (stable for
``debounce_s``), not only by RPi.GPIO's bouncetime, which drops the release edge of a quick tap.
The edges are remembered too: when the level is sampled late (the observer loop was drawing), a
tap that was over by then still counts if it lasted ``debounce_s``.

LED: blinks while a code is shown, steady on when signed in, off otherwise.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from agent.panel import screens
from agent.state import AgentState, Snapshot
from agent.wakeup import name_os_thread
from hw.base import Gpio
from hw.errors import HardwareError

log = logging.getLogger(__name__)

MAX_WAIT_S = 0.5     # after an error: try the pins again this often
IDLE_WAIT_S = 30.0   # nothing due: button edges and state changes wake the thread; this is only
                     # a net under a lost edge (docs/PERFORMANCE.md: wake-ups of an idle box)
POLL_S = 0.01


class Controls:
    def __init__(self, gpio: Gpio, state: AgentState, *, button_pin: int | None,
                 led_pin: int | None, on_short_press: Callable[[], None],
                 on_long_press: Callable[[], None], hold_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, debounce_s: float = 0.03,
                 blink_s: float = 0.5, progress_after_s: float = 1.0,
                 wakeup: threading.Event | None = None) -> None:
        """``wakeup``: the observer loop's Signal when the loop calls ``serve`` (agent/observerloop.py);
        button edges set it. Without it, ``start()`` runs a thread of our own."""
        self.gpio = gpio
        self.state = state
        self.button_pin, self.led_pin = button_pin, led_pin
        self.on_short_press, self.on_long_press = on_short_press, on_long_press
        self.hold_s, self.debounce_s, self.blink_s = hold_s, debounce_s, blink_s
        self.progress_after_s = progress_after_s
        self._clock = clock
        self._wakeup = wakeup or threading.Event()
        self._observed: object = None       # the LED's inputs at the last wake (see _observe)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._raw = False                 # pressed, as last sampled
        self._raw_since = clock()
        self._pressed = False             # debounced
        self._pressed_at = 0.0
        self._long_fired = False
        self._edge_down_at: float | None = None   # a press only the edges saw (see _edge)
        self._tap = 0.0                   # the longest such press, released before a step saw it
        self._my_notice: str | None = None
        self._led: bool | None = None
        self._blink_key: tuple[str, float] | None = None
        self._blink_t0 = 0.0
        self.short_presses = 0
        self.long_presses = 0

    def start(self, *, thread: bool = True) -> Controls:
        """Set up the pins and start watching. ``thread=False``: tests call ``step()``."""
        if self.button_pin is not None:
            # Edges only wake the thread; the level decides (see module docstring).
            self.gpio.setup_input(self.button_pin, pull="up", on_edge=self._edge, edge="both",
                                  bounce_ms=0)
        if self.led_pin is not None:
            self.gpio.setup_output(self.led_pin, initial=False)
            self._led = False
        self.state.subscribe(self._observe)
        if thread:
            self._thread = threading.Thread(target=self._run, name="controls", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 1.0) -> None:
        """Stop within ``timeout_s``, LED off. The Gpio backend is closed by its owner."""
        self.state.unsubscribe(self._observe)
        self._stopping.set()
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._clear_notice()
        if self.led_pin is not None:
            try:
                self.gpio.write(self.led_pin, False)
            except HardwareError as err:
                log.debug("LED off at stop: %s", err)

    def _edge(self, pin: int, level: bool) -> None:
        if not self._pressed:             # a press the steps have not seen (yet)
            now = self._clock()
            if not level:                 # pull-up: low is pressed
                self._edge_down_at = now
            elif self._edge_down_at is not None:
                self._tap = max(self._tap, now - self._edge_down_at)
                self._edge_down_at = None
        self._wakeup.set()

    def _observe(self, snap: Snapshot) -> None:
        # Only what the LED shows: a new reading (every minute) must not wake this thread.
        key = (snap.code.user_code, snap.code.expires_at_monotonic) if snap.code else snap.phase
        if key != self._observed:
            self._observed = key
            if self._thread is not None:
                self._wakeup.set()      # else the observer loop serves state changes itself

    def _run(self) -> None:
        name_os_thread()
        while not self._stopping.is_set():
            self._wakeup.clear()
            delay = self.serve()
            self._wakeup.wait(None if delay == float("inf") else delay)

    def serve(self) -> float:
        """``step()`` that never raises (the own thread's or the observer loop's pass)."""
        if self._stopping.is_set():
            return float("inf")
        try:
            return self.step()
        except HardwareError as err:
            log.warning("controls: %s", err)
        except Exception:
            log.exception("controls step failed")
        return MAX_WAIT_S

    def step(self, now: float | None = None) -> float:
        """Sample the button, fire callbacks, set the LED. Returns seconds until the next step."""
        now = self._clock() if now is None else now
        delays = [IDLE_WAIT_S]
        if self.button_pin is not None:
            delays.append(self._button(now))
        if self.led_pin is not None:
            delays.append(self._update_led(now))
        return max(0.001, min(delays))

    # -- button -----------------------------------------------------------------------------------

    def _button(self, now: float) -> float:
        assert self.button_pin is not None
        raw = not self.gpio.read(self.button_pin)          # pull-up: pressed reads low
        if raw != self._raw:
            self._raw, self._raw_since = raw, now
        if raw != self._pressed:
            if now - self._raw_since < self.debounce_s:
                return POLL_S                               # still bouncing
            self._pressed = raw
            self._edge_down_at, self._tap = None, 0.0      # this press is ours from here
            if raw:
                self._pressed_at = self._raw_since
                self._long_fired = False
            else:
                self._released(now)
        if not self._pressed:
            tap, self._tap = self._tap, 0.0
            if tap >= self.debounce_s and not raw:
                # Pressed and released between two samples: a short press all the same.
                self.short_presses += 1
                log.info("button pressed (%.2f s, seen by its edges)", tap)
                self._call(self.on_short_press)
            return IDLE_WAIT_S
        held = now - self._pressed_at
        if not self._long_fired:
            if held >= self.hold_s:
                self._long_fired = True
                self._clear_notice()
                self.long_presses += 1
                log.info("button held %.1f s: long press", held)
                self._call(self.on_long_press)
            elif held >= self.progress_after_s:
                self._set_notice(screens.hold_notice(self.hold_s - held))
        return POLL_S if not self._long_fired else IDLE_WAIT_S

    def _released(self, now: float) -> None:
        self._clear_notice()
        if self._long_fired:
            return
        self.short_presses += 1
        log.info("button pressed (%.2f s)", now - self._pressed_at)
        self._call(self.on_short_press)

    def _set_notice(self, text: str) -> None:
        if text != self._my_notice:
            self._my_notice = text
            self.state.update(notice=text)

    def _clear_notice(self) -> None:
        """Remove our countdown, unless someone else has replaced the notice since."""
        if self._my_notice is not None:
            if self.state.snapshot.notice == self._my_notice:
                self.state.update(notice=None)
            self._my_notice = None

    @staticmethod
    def _call(fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            log.exception("button action failed")

    # -- LED --------------------------------------------------------------------------------------

    def _update_led(self, now: float) -> float:
        assert self.led_pin is not None
        snap = self.state.snapshot
        wait = IDLE_WAIT_S
        if snap.code is not None:
            key = (snap.code.user_code, snap.code.expires_at_monotonic)
            if key != self._blink_key:
                self._blink_key, self._blink_t0 = key, now
            phase = (now - self._blink_t0) / self.blink_s
            want = int(phase) % 2 == 0
            wait = (1.0 - (phase % 1.0)) * self.blink_s + 0.001
        else:
            self._blink_key = None
            want = snap.phase == "signed_in"
        if want != self._led:
            self.gpio.write(self.led_pin, want)
            self._led = want
        return wait
