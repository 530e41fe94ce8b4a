"""The service: wiring, lifecycle, signals, the sd_notify watchdog, and component supervision.

config -> hardware -> sign-in -> announcers (screen, journal, MQTT) -> sampler -> uploader.
Each long-running component is a thread under a supervisor: if one crashes it is logged and
restarted with back-off, the process keeps running. SIGTERM/SIGINT stop everything within 2 s.
"""

from __future__ import annotations

import gc
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypedDict

import agent.regexcache  # first of ours: patterns a previous start compiled (agent/regexcache.py)
from agent import __version__, logs
from agent.clock import ClockTrust
from agent.config import Settings
from agent.errors import AgentError, ConfigError
from agent.fsutil import ensure_private_dir
from agent.net.retry import Backoff, OutageLog
from agent.observerloop import SETTLE_S, ObserverLoop
from agent.sdnotify import Notifier
from agent.signal_relay import relay_signals
from agent.state import AgentState, Snapshot
from agent.statusfile import (
    DEAD_LETTER_SIGNAL,
    SIGN_OUT_SIGNAL,
    InstanceLock,
    StatusWriter,
    acknowledge_sign_out,
    answer_dead_letter,
    previous_last_upload,
    status_path,
)
from agent.wakeup import Signal, name_os_thread, wait_any

if TYPE_CHECKING:     # imported for real in _start, so `device-agent --help` stays quick
    from agent.config import SensorSettings
    from agent.health import Health
    from agent.mqtt.publisher import MqttPublisher
    from agent.panel.observer import Panel
    from agent.signin.authenticator import Authenticator
    from agent.signin.certificate import CertificateAuthenticator
    from agent.telemetry.outbox import Outbox
    from agent.telemetry.sampler import Sampler
    from agent.telemetry.uploader import Uploader
    from hw.base import Display, Gpio, Sensor

log = logging.getLogger(__name__)

STOP_BUDGET_S = 1.5          # of the 2 s stop (docs/INTERFACE.md#exit-codes-and-error-lines), the joins' share
STOP_TOTAL_S = 1.9           # ... and everything, MQTT's goodbye included
CLOSE_SHARE_S = 0.3          # ... of which the closers after the observer loop (display, files)
HEALTH_EVERY_S = 60.0        # health figures without news (the kernel's clock verdict)
HEALTH_BUSY_RETRY_S = 1.0    # ... again this soon when the outbox was busy (never waited for)
TELEMETRY_AFTER_S = 0.5      # telemetry starts at the sign-in's first news or this long after start
START_SWITCH_S = 0.0005       # the GIL's switch interval until the code is drawn (run)
STARTING_SCREEN_AFTER_S = 0.25  # the starting screen unless a code or sign-in came first; before telemetry
RESTART_BACKOFF_S = (1.0, 60.0)
HEALTHY_RUN_S = 300.0        # a component that ran this long before crashing starts a new streak


def _nothing() -> None:
    """Nothing to do (a restore with nothing to restore, a crash nobody waits on)."""


class Supervised:
    """A component thread that is restarted when it dies with an exception. (A plain class: a
    dataclass costs ~1.5 ms to make at import, docs/PERFORMANCE.md "Sign-in".)"""

    def __init__(self, name: str, target: Callable[[threading.Event], None], stop: threading.Event, *,
                 on_crash: Callable[[], None] = _nothing,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.target = target
        self.stop = stop
        self.on_crash = on_crash        # wakes the supervisor (Service._main_wake)
        self.clock = clock
        self.thread: threading.Thread | None = None
        self.crashes = 0
        self.restart_at = 0.0
        self.done = False
        self.error: str | None = None
        self.backoff: Backoff | None = None     # made at the first crash, from RESTART_BACKOFF_S
        self.started_at = 0.0
        # Crashes in a row are one fault for the journal (agent.net.retry.OutageLog): the
        # traceback once, then a line every 10 min with a count, not a traceback per restart.
        self.outage: OutageLog | None = None

    def start(self) -> None:
        self.started_at = self.clock()
        self.thread = threading.Thread(target=self._body, name=self.name, daemon=True)
        self.thread.start()

    def _body(self) -> None:
        name_os_thread()
        try:
            self.target(self.stop)
            self.done = True
        except Exception as err:  # the supervisor restarts us; the process must not die
            self.crashes += 1
            self.error = f"{type(err).__name__}: {err}"
            now = self.clock()
            if self.backoff is None or self.outage is None:
                self.backoff = Backoff(*RESTART_BACKOFF_S, jitter=(0.8, 1.2))
                self.outage = OutageLog(log, level=logging.ERROR, clock=self.clock)
            if self.outage.ongoing and now - self.started_at >= HEALTHY_RUN_S:
                # It ran fine for a while: a new fault, with its own traceback and back-off.
                self.outage.ended(f"{self.name} ran {now - self.started_at:.0f} s before crashing again")
                self.backoff.reset()
            delay = self.backoff.next_delay()
            self.restart_at = now + delay
            self.outage.failed(f"{self.name} crashed: {self.error}"[:300],
                               f"restarting in {delay:.0f} s", exc_info=True)
            self.on_crash()

    def needs_restart(self) -> bool:
        return not (self.stop.is_set() or self.done or self.thread is None or self.thread.is_alive())

    def check(self, now: float) -> None:
        """Restart the thread if it died and its back-off elapsed."""
        if not self.needs_restart():
            return
        if now >= self.restart_at:
            log.debug("restarting %s", self.name)     # the crash's line said when
            self.start()

    def join(self, deadline: float) -> None:
        if self.thread is not None:
            self.thread.join(timeout=max(0.0, deadline - time.monotonic()))


class Hardware(TypedDict, total=False):
    """Backends handed in instead of opened from config (tests, the demo)."""

    gpio: Gpio
    display: Display


class Service:
    """One agent process. ``run`` blocks until ``stop`` is set (by a signal or a caller)."""

    def __init__(self, settings: Settings, *, install_signals: bool = True,
                 hardware: Hardware | None = None, stop_event: threading.Event | None = None,
                 clock: ClockTrust | None = None, gc_paused: bool = False) -> None:
        self.settings = settings
        # The caller paused the cyclic GC for the start (agent.cli): resumed in run().
        self._gc_paused = gc_paused
        # One opinion about the time for the whole process (agent/clock.py); tests inject theirs.
        self.clock = clock or ClockTrust()
        self.health: Health | None = None
        self.state = AgentState()
        self.state.update(device_id=settings.device.id)    # the code screen says whose box it is
        self.stop_event = stop_event or Signal()
        self._install_signals = install_signals
        self._hardware: Hardware = hardware or {}
        self._sd = Notifier()
        self._components: list[Supervised] = []
        self._closers: list[tuple[str, Callable[[], None]]] = []
        # Made by _start; None before it (and panel/notifier stay None when not configured).
        self.auth: Authenticator | CertificateAuthenticator | None = None
        self.sampler: Sampler | None = None
        self.uploader: Uploader | None = None
        self.panel: Panel | None = None
        self.notifier: MqttPublisher | None = None
        self.outbox: Outbox | None = None
        self._lock = InstanceLock(settings.device.state_dir)
        self._was_signed_in = False
        self._running = False
        self._exit_code = 0           # 1: the observers' thread died (_main_loop)
        self._news: threading.Event | None = None     # what the main thread waits on at start
        # The observers' one thread (agent/observerloop.py): supervisor, health, button/LED,
        # panel, status file, MQTT publishing; its Signal is the supervisor's news too.
        self._observers = ObserverLoop(self.state)
        self._main_wake = self._observers.news
        self._next_beat = self._next_health = 0.0
        self._last_status = ""                         # the STATUS= line systemd has
        self._status_lock = threading.Lock()
        self._health_due = True
        self._health_key: object = None
        self._sensors: list[tuple[SensorSettings, Sensor]] = []

    # ---- lifecycle -------------------------------------------------------------------------

    def run(self) -> int:
        s = self.settings
        ensure_private_dir(s.device.state_dir)
        self._lock.acquire()
        restore_signals: Callable[[], None] = _nothing
        try:
            if self._install_signals:
                restore_signals = self._signals()
            started = time.monotonic()
            # Until the code is drawn, a thread back from the network (the sign-in's TLS and
            # HTTP answers) gets the GIL within 0.5 ms instead of 5: its next request goes out
            # while the other threads import and draw, not after them (docs/PERFORMANCE.md).
            switch_s = sys.getswitchinterval()
            sys.setswitchinterval(START_SWITCH_S)
            try:
                self._start()
                self._await_sign_in_news(started)
            finally:
                sys.setswitchinterval(switch_s)
            self._resume_gc()
            agent.regexcache.save_started()      # what this start compiled, for the next one
            if not self.stop_event.is_set():
                self._start_telemetry()
            self._running = True
            self._sd.notify("READY=1", f"STATUS={self._status_line(self.state.snapshot)}")
            log.info("device-agent %s running as %s (state in %s)", __version__, s.device.id, s.device.state_dir)
            self._main_loop()
        finally:
            self._resume_gc()
            self._shutdown()
            restore_signals()
            self._lock.release()
        return self._exit_code

    def _resume_gc(self) -> None:
        """The code is on the glass (or TELEMETRY_AFTER_S passed): the collector runs again.
        What the start made lives as long as the process (modules, classes, functions): it is
        set aside from later collections (gc.freeze), so the idle box never walks it again.
        No collection first: it would cost ~25 ms of CPU on the way to the first reading to
        free a few hundred cyclic leftovers of the imports (kept, a few tens of KiB)."""
        if self._gc_paused:
            self._gc_paused = False
            gc.freeze()
            gc.enable()

    def request_stop(self) -> None:
        self.stop_event.set()
        self._main_wake.set()
        self._wake()

    def _wake(self) -> None:
        """Wake the main thread's wait (stop_event alone cannot: it may be the caller's)."""
        news = self._news
        if news is not None:
            news.set()

    def _signals(self) -> Callable[[], None]:
        """Stop on SIGTERM/SIGINT, sign out on SIGN_OUT_SIGNAL; returns the restore."""
        def on_signal(signum: int) -> None:
            # On agent.signal_relay's thread, never in the handler: it takes locks.
            if signum == SIGN_OUT_SIGNAL:
                threading.Thread(target=self._sign_out_requested, name="sign-out", daemon=True).start()
                return
            if signum == DEAD_LETTER_SIGNAL:      # `device-agent dead-letter`: on our outbox
                threading.Thread(target=answer_dead_letter, name="dead-letter", daemon=True,
                                 args=(self.settings.device.state_dir, self.outbox, self.settings.device.id,
                                       self._flush_cmd)).start()
                return
            if not self.stop_event.is_set():
                log.info("received %s; stopping", signal.Signals(signum).name)
            self.request_stop()

        return relay_signals((signal.SIGTERM, signal.SIGINT, SIGN_OUT_SIGNAL, DEAD_LETTER_SIGNAL), on_signal)

    def _start(self) -> None:
        """Sign-in first, then hardware and the announcers; telemetry follows in
        ``_start_telemetry``. Hardware failures are fatal (exit 1, one line).

        Order is the time to a code on the glass (docs/PERFORMANCE.md): the sign-in thread asks
        the IdP before anything else is built, and the display stack is imported while it waits
        on the network; nothing the code screen does not need runs before the code is shown.
        """
        # Sign-in first: its package defers what msal and urllib3 import for flows never run
        # (agent/signin/__init__.py), before agent.net imports requests.
        from agent.signin.authenticator import Authenticator

        s = self.settings
        from agent.net.https import observe_responses
        # Every HTTPS answer (IdP, API, Graph) tells the clock what time the server thinks it is;
        # from the first one on, the code's expires_at and the status times are true.
        self.clock.on_change = lambda fields: self.state.update(**fields)
        loop = self._observers.start()
        def stop_loop() -> None:
            loop.stop()
        self._closers.append(("observers", stop_loop))
        self._closers.append(("clock observer", observe_responses(self.clock.observe_response)))
        self.state.subscribe(self._on_state)
        auth = self.auth = self._make_auth() or Authenticator(s.auth, s.token_cache_path, self.state,
                                                              device_id=s.device.id)
        self._supervise("auth", auth.run)

        previous = previous_last_upload(status_path(s))
        if previous is not None:
            self.state.update(last_upload=previous)     # "last upload" survives a restart
        status = StatusWriter(status_path(s), self.state, s.device.id)
        status.start(thread=False)
        loop.add("status file", status.serve)
        self._closers.append(("status file", status.stop))

        gpio, display, self._sensors = self._open_hardware()

        if display is not None:
            from agent.panel.observer import Panel

            panel = self.panel = Panel(display, self.state, sleep_after_s=s.display.sleep_after_s,
                                       wakeup=loop.news, starting_after_s=STARTING_SCREEN_AFTER_S)
            panel.start(thread=False)
            loop.add("panel", panel.serve_split, slack=0.5)   # the shift only: sleep_after_s on time
            self._closers.append(("panel", lambda: panel.stop(final=s.display.on_stop)))
        if gpio is not None and (s.gpio.button is not None or s.gpio.led is not None):
            from agent.panel.controls import Controls

            controls = Controls(gpio, self.state, button_pin=s.gpio.button, led_pin=s.gpio.led,
                                on_short_press=self._button_short, on_long_press=self._button_long,
                                wakeup=loop.news)
            controls.start(thread=False)
            loop.add("controls", controls.serve, slack=1.5)   # its 30 s net: up to 75 s
            self._closers.append(("controls", controls.stop))
        if s.mqtt is not None:
            from agent.mqtt.publisher import MqttPublisher

            self.notifier = MqttPublisher(s.mqtt, s.device.id, self.state, self._commands(), __version__,
                                          wakeup=loop.news)
            self.notifier.start(thread=False)
            loop.add("mqtt", self.notifier.serve, last=True)
            self._closers.append(("mqtt", self.notifier.stop))
        else:
            self.state.set_link("mqtt", "off")

    def _await_sign_in_news(self, started: float) -> None:
        """Until the sign-in has something to show (a code, signed in, an error) and the panel
        has drawn it, at most ``TELEMETRY_AFTER_S`` after start, or stop: then telemetry may
        have the CPU (imports, SQLite, the first reading, a TLS connection)."""
        news = self._news = threading.Event()     # request_stop and the signals set it too
        deadline = started + TELEMETRY_AFTER_S

        def observe(snap: Snapshot) -> None:
            if snap.phase != "starting":
                news.set()

        self.state.subscribe(observe)
        try:
            observe(self.state.snapshot)
            while not news.is_set() and not self.stop_event.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                news.wait(left)
        finally:
            self._news = None
            self.state.unsubscribe(observe)
        if self.panel is not None and not self.stop_event.is_set():
            # The code on the glass first: the panel thread draws it while we wait here.
            self.panel.wait_drawn(max(0.0, deadline - time.monotonic()))

    def _start_telemetry(self) -> None:
        """Outbox, sampler and uploader: readings flow in every sign-in state from here on."""
        import sqlite3

        from agent.health import Health
        from agent.telemetry.outbox import Outbox
        from agent.telemetry.sampler import Sampler
        from agent.telemetry.sinks import make_sink
        from agent.telemetry.uploader import Uploader

        s = self.settings
        try:
            outbox = self.outbox = Outbox(s.outbox_path, s.device.id, max_rows=s.upload.outbox_max_rows,
                                          max_bytes=s.upload.outbox_max_bytes, state=self.state,
                                          clock=self.clock)
        except sqlite3.Error as err:
            raise AgentError(f"{s.outbox_path}: cannot open the outbox ({err}); check that "
                             f"{s.device.state_dir} belongs to the user running the agent") from err
        self._closers.append(("outbox", outbox.close))
        self.state.update(outbox=outbox.counts())
        assert self.auth is not None
        uploader = self.uploader = Uploader(outbox, make_sink(s.upload, s.device.id), self.auth, self.state,
                                            s.upload, wall=self.clock.now_utc)
        sampler = self.sampler = Sampler(self._sensors, outbox, self.state, trust=self.clock,
                                         on_queued=uploader.readings_queued)
        self.health = Health(self.state, self.clock, outbox, self.auth, cache_path=s.token_cache_path,
                             refresh_lifetime_days=s.auth.refresh_lifetime_days)
        self.health.step()
        self._supervise("sampler", sampler.run)
        self._supervise("uploader", uploader.run)
        if self.state.snapshot.phase == "signed_in":
            uploader.flush()

    def _supervise(self, name: str, target: Callable[[threading.Event], None]) -> None:
        sup = Supervised(name, target, self.stop_event, on_crash=self._main_wake.set)
        sup.start()
        self._components.append(sup)

    def _make_auth(self) -> CertificateAuthenticator | None:
        """auth.flow = "client_certificate": the app-only token source (same interface as the
        device flow's Authenticator); None for the device code flow."""
        s = self.settings
        if s.auth.flow != "client_certificate":
            return None
        from agent.signin.certificate import CertificateAuthenticator, CredentialError

        try:
            return CertificateAuthenticator(s.auth, s.token_cache_path, self.state, device_id=s.device.id)
        except CredentialError as err:
            raise ConfigError(f"{s.path}: {err}") from err

    def _open_hardware(self) -> tuple[Gpio | None, Display | None, list[tuple[SensorSettings, Sensor]]]:
        """GPIO, display and sensors from config (or injected by tests/demo)."""
        from hw import registry
        from hw.errors import HardwareError

        s = self.settings
        try:
            gpio = self._hardware.get("gpio")
            needs_gpio = (s.gpio.button is not None or s.gpio.led is not None
                          or any(registry.sensor_uses_gpio(x.type) for x in s.sensors))
            if gpio is None and needs_gpio:
                gpio = registry.open_gpio(s.gpio.backend)
            if gpio is not None:
                self._closers.append(("gpio", gpio.close))
            display = self._hardware.get("display")
            if display is None:
                display = registry.open_display(s.display.driver, s.display)
            if display is not None:
                self._closers.append(("display", display.close))
            sensors = []
            for cfg in s.sensors:
                sensor = registry.open_sensor(cfg.type, cfg.options, gpio)
                self._closers.append((f"sensor {cfg.name}", sensor.close))
                sensors.append((cfg, sensor))
        except HardwareError as err:
            raise AgentError(str(err)) from err
        return gpio, display, sensors

    def _main_loop(self) -> None:
        """The main thread sleeps until stop, or until the observers' thread dies; supervision
        is a step of the observer loop."""
        self._next_beat = self._next_health = time.monotonic()
        self._observers.add("supervisor", self._supervise_step, slack=0.5)
        self._observers.add("readings", self._reading_due)
        wait_any(math.inf, self.stop_event, self._observers.died)
        if self._observers.died.is_set() and not self.stop_event.is_set():
            # Panel, MQTT, status, restarts and the watchdog all ran on it: exit 1, systemd
            # starts the agent again (its traceback went to the journal as it died).
            log.error("the observers' thread died (panel, MQTT, status and the watchdog stopped); "
                      "exiting")
            self._exit_code = 1

    def _reading_due(self) -> float:
        """Plan the observers' wake ``SETTLE_S`` after the sampler's next reading: the reading
        and its upload (and the health figures after them) are then served by that one wake,
        not by one to set the settle timer and one when it ends (agent/observerloop.py)."""
        due = getattr(self.sampler, "beat_due", None)
        if due is None:
            return math.inf
        left = due + SETTLE_S - time.monotonic()
        return left if left > 0 else math.inf       # late: the reading's own news serves it

    def _supervise_step(self) -> tuple[float, float]:
        """Supervise, feed the watchdog only while the loop and the sampler really advance.

        Event-driven: run when a component dies (or its restart is due), the watchdog is due
        (every WatchdogSec/4), the health figures are (news of the outbox or the sign-in, else
        every HEALTH_EVERY_S) or on any other pass of the loop; returns seconds until the next
        of those. The status line goes to systemd from the state observer (``_on_state``).
        """
        wd = self._sd.watchdog_s
        beat_every = wd / 4 if wd else math.inf
        stale_after = max(5.0, wd / 2) if wd else 30.0
        now = time.monotonic()
        for comp in self._components:
            comp.check(now)
        if self.health is not None and (self._health_due or now >= self._next_health):
            # Health figures follow the outbox and the sign-in (news from _on_state), and
            # the kernel's clock verdict at least every HEALTH_EVERY_S.
            self._health_due = False
            self._next_health = now + HEALTH_EVERY_S
            if not self.health.step():
                self._next_health = now + HEALTH_BUSY_RETRY_S   # the outbox was busy
        fields = []
        if wd and now >= self._next_beat:
            self._next_beat = now + beat_every
            # The sampler may sleep for a whole interval: stale only past the time it
            # promised to be back (beat_due), not when its last pass is merely old.
            due = getattr(self.sampler, "beat_due", getattr(self.sampler, "heartbeat", now))
            if now - max(due, getattr(self.sampler, "heartbeat", now)) < stale_after:
                fields.append("WATCHDOG=1")
        if fields:
            with self._status_lock:          # one socket, shared with _on_state
                self._sd.notify(*fields)
        # The watchdog and the restart back-off are kept; the health figures may wait for a pass.
        strict = min([self._next_beat if wd else math.inf,
                      *(c.restart_at for c in self._components if c.needs_restart())])
        loose = self._next_health if self.health is not None else math.inf
        now = time.monotonic()
        return strict - now, loose - now

    def _shutdown(self) -> None:
        self.stop_event.set()
        self._sd.notify("STOPPING=1")
        started = time.monotonic()
        deadline = started + STOP_BUDGET_S
        # The broker is the one peer that can be slow to answer: say "offline" and clear the code
        # while the component threads wind down, not after them.
        mqtt_closer = next((c for c in self._closers if c[0] == "mqtt"), None)
        mqtt_thread: threading.Thread | None = None
        if mqtt_closer is not None:
            self._closers.remove(mqtt_closer)
            mqtt_thread = threading.Thread(target=self._close, args=mqtt_closer, name="mqtt-stop", daemon=True)
            mqtt_thread.start()
        for comp in self._components:
            comp.join(deadline)
        for comp in self._components:
            if comp.thread is not None and comp.thread.is_alive():
                log.warning("%s did not stop in time; exiting anyway (outbox commits are atomic)", comp.name)
        # The closers below leave the final screen and status; no observer step may follow them.
        # A step still running would race the closers (the final screen, the last status): the
        # loop gets what is left of the whole stop but the closers' share.
        self._observers.stop(max(0.1, started + STOP_TOTAL_S - CLOSE_SHARE_S - time.monotonic()))
        self.state.update(phase="stopped", code=None)
        for name, close in reversed(self._closers):
            self._close(name, close)
        self._closers.clear()
        if mqtt_thread is not None:
            mqtt_thread.join(max(0.0, started + STOP_TOTAL_S - time.monotonic()))
        self._sd.close()
        if self._running:
            log.info("stopped")

    def _on_state(self, snap: Snapshot) -> None:
        """Upload the backlog the moment a token exists, not at the next interval; tell systemd
        when its status line changes."""
        line = self._status_line(snap)
        with self._status_lock:
            if line != self._last_status:
                self._last_status = line
                self._sd.notify(f"STATUS={line}")
        key = (snap.outbox, snap.phase, snap.last_upload)
        if key != self._health_key:          # health.step's own updates leave this unchanged
            self._health_key = key
            self._health_due = True           # the observer loop's next pass (it settles figures)
        signed_in = snap.phase == "signed_in"
        if signed_in and not self._was_signed_in and self.uploader is not None:
            self.uploader.flush()
        self._was_signed_in = signed_in

    @staticmethod
    def _close(name: str, close: Callable[[], None]) -> None:
        try:
            close()
        except Exception:
            log.exception("closing %s failed", name)

    # ---- controls and commands -------------------------------------------------------------

    def _commands(self) -> dict[str, Callable[[], None]]:
        return {"renew_code": self._renew_code_cmd, "sign_out": self._sign_out_cmd, "flush": self._flush_cmd}

    def _renew_code_cmd(self) -> None:
        if self.auth is not None and not self.auth.request_new_code():
            if self.settings.auth.flow == "client_certificate":
                raise AgentError("no sign-in codes with auth.flow = \"client_certificate\"")
            raise AgentError("no code to renew: signed in, or restoring the saved sign-in; "
                             "send sign_out first to get a new code")

    def _sign_out_cmd(self) -> None:
        log.info("signing out (requested)")
        if self.outbox is not None:
            # Acks held in memory (agent/telemetry/outbox.py) go to disk first: a box signed out
            # is often unplugged next, and those readings would be sent again.
            self.outbox.flush_acks()
        if self.auth is not None:
            self.auth.sign_out()

    def _sign_out_requested(self) -> None:
        """`device-agent sign-out` (SIGUSR1): sign out, then tell the command it is done."""
        self._sign_out_cmd()
        acknowledge_sign_out(self.settings.device.state_dir)

    def _flush_cmd(self) -> None:
        if self.uploader is not None:
            self.uploader.flush()

    def _button_short(self) -> None:
        if self.panel is not None:
            self.panel.wake()
        snap = self.state.snapshot
        if snap.phase != "signed_in" and snap.code is None and self.auth is not None:
            self.auth.request_new_code()

    def _button_long(self) -> None:
        """On its own short-lived thread (as SIGUSR1's): sign-out waits for a token refresh
        in progress (up to auth.timeout_s), and the observers' thread, which calls this, serves
        the panel, the button, MQTT and the watchdog meanwhile."""
        self.state.update(notice="Signing out…")
        threading.Thread(target=self._sign_out_logged, name="sign-out", daemon=True).start()

    def _sign_out_logged(self) -> None:
        try:
            self._sign_out_cmd()
        except Exception:
            log.exception("sign-out (button) failed")

    @staticmethod
    def _status_line(snap: Snapshot) -> str:
        if snap.phase == "signed_in":
            return f"signed in as {snap.account}; {snap.outbox.pending} readings pending"
        if snap.code is not None:
            return f"waiting for sign-in with code {snap.code.user_code}"
        if snap.error:
            return f"error: {snap.error}"
        return snap.phase


def run_service(settings: Settings, *, stop_event: threading.Event | None = None,
                gc_paused: bool = False) -> int:
    """`device-agent run`: configure logging, run until SIGTERM/SIGINT, return the exit code.
    ``gc_paused``: the caller disabled the cyclic GC for the start; the service enables it."""
    logs.setup(settings.log.level)
    return Service(settings, stop_event=stop_event, gc_paused=gc_paused).run()
