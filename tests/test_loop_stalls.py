"""The observers' one thread (agent/observerloop.py) never waits on a slow peer: a long-press
sign-out while a token refresh holds the sign-in, or health figures while the outbox is busy,
leave the panel, the button and the watchdog running; and a dead loop thread ends the process.
A whole Service in a thread (simulated IdP, png panel, fake GPIO)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import parse
from agent.panel import screens
from agent.service import Service
from hw.fake import FakeGpio
from tests.fixtures.waiting import wait_for

DEVICE = "loop-stalls-1"
BUTTON = 17


def _config(tmp_path: Path, idp: Any, api: Any, tls: Any) -> dict[str, Any]:
    return {
        "device": {"id": DEVICE, "state_dir": str(tmp_path / "state")},
        "auth": {"client_id": "sim-device-agent", "authority": idp.authority, "instance_discovery": False,
                 "scopes": ["api://telemetry/Readings.Write"], "ca_file": str(tls.ca_file), "timeout_s": 5},
        "display": {"driver": "png", "path": str(tmp_path / "screen.png"), "sleep_after_s": 0},
        "gpio": {"backend": "fake", "button": BUTTON},
        "sensors": [{"name": "temp", "type": "simulated", "interval_s": 1.0}],
        "upload": {"sink": "http", "url": api.url, "ca_file": str(tls.ca_file), "interval_s": 3600},
    }


@pytest.fixture
def service(tmp_path: Path, idp: Any, idp_api: Any, tls: Any) -> Iterator[tuple[Service, FakeGpio, threading.Thread]]:
    gpio = FakeGpio()
    svc = Service(parse(_config(tmp_path, idp, idp_api, tls), tmp_path / "config.toml"), install_signals=False,
                  hardware={"gpio": gpio})
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(svc.run()), name="service-under-test", daemon=True)
    thread.start()
    wait_for(lambda: svc.state.snapshot.code is not None and svc.panel is not None and svc.outbox is not None,
          20, "a code on show, telemetry started")
    yield svc, gpio, thread
    svc.request_stop()
    thread.join(5)
    gpio.close()


def _button_and_panel_still_answer(svc: Service, gpio: FakeGpio) -> None:
    """What a person sees: holding the button shows its countdown on the glass."""
    assert svc.panel is not None
    frames = svc.panel.frames_shown
    gpio.press(BUTTON)
    try:
        wait_for(lambda: screens.is_hold_notice(svc.state.snapshot.notice), 3, "the hold's countdown noticed")
        wait_for(lambda: svc.panel is not None and svc.panel.frames_shown > frames, 1, "... and drawn")
    finally:
        gpio.release(BUTTON)


@pytest.mark.slow
def test_a_long_press_while_a_token_refresh_hangs_leaves_the_button_and_panel_working(
        service: tuple[Service, FakeGpio, threading.Thread]) -> None:
    svc, gpio, _ = service
    assert svc.auth is not None
    # What access_token() does for a whole IdP refresh (up to auth.timeout_s): hold the sign-in.
    with svc.auth._lock:
        gpio.press(BUTTON)
        wait_for(lambda: svc.state.snapshot.notice == "Signing out…", 8, "the long press fired")
        gpio.release(BUTTON)
        time.sleep(0.2)
        _button_and_panel_still_answer(svc, gpio)


@pytest.mark.slow
def test_health_figures_while_the_outbox_is_locked_leave_the_button_and_panel_working(
        service: tuple[Service, FakeGpio, threading.Thread]) -> None:
    svc, gpio, _ = service
    assert svc.outbox is not None
    with svc.outbox._lock:        # a dead-letter retry, a put's fsync, a busy wait
        svc._health_due = True
        svc._observers.news.set()
        time.sleep(0.3)
        _button_and_panel_still_answer(svc, gpio)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the death it provokes
def test_a_dead_observer_thread_ends_the_service_with_exit_1(
        tmp_path: Path, idp: Any, idp_api: Any, tls: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A bug outside a step's guard (here a BaseException from a step) ends the loop's thread:
    the service says so once and exits 1 (systemd restarts it), it does not run on headless."""
    gpio = FakeGpio()
    svc = Service(parse(_config(tmp_path, idp, idp_api, tls), tmp_path / "config.toml"), install_signals=False,
                  hardware={"gpio": gpio})
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(svc.run()), name="service-under-test", daemon=True)
    thread.start()
    try:
        wait_for(lambda: svc.outbox is not None and svc.state.snapshot.code is not None, 20, "running")

        def broken() -> float:
            raise KeyboardInterrupt      # not an Exception: no step guard catches it
        svc._observers.add("broken", broken)
        thread.join(5)
        assert not thread.is_alive(), "the service kept running without its observers' thread"
        assert result == [1]
        died = [r for r in caplog.records if "observers' thread died" in r.getMessage()]
        assert len(died) == 1 and died[0].levelname == "ERROR"
    finally:
        svc.request_stop()
        thread.join(5)
        gpio.close()
