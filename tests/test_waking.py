"""An idle agent sleeps in long, event-driven waits (agent.wakeup) and still answers at once.

Every thread of a signed-in box at rest waits for minutes at a time (the uploader until its
interval, the sampler until the next reading, the sign-in until its refresh, paho until a
keepalive ping): these tests prove that news still ends those waits at once: MQTT ``flush``
and ``renew_code``, the button, ``request_stop`` and SIGTERM (exit 0 within 2 s). The deadlines
asserted are the contract's (stop 2 s) or far below the wait they cut short (an hour).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import parse
from agent.service import Service
from agent.wakeup import Signal, wait_any
from hw.fake import FakeGpio
from tests.agentproc import AgentProcess, write_config
from tests.fixtures.broker import Subscriber
from tests.fixtures.waiting import wait_for

DEVICE = "wake-01"
PREFIX = "fleet"
HOUR_S = 3600
STOP_S = 2.0          # the contract: SIGTERM/SIGINT -> exit 0 within 2 s


# ---- the primitive -------------------------------------------------------------------------

def test_wait_any_wakes_on_any_signal_and_times_out() -> None:
    a, b = Signal(), Signal()
    done: list[bool] = []
    t = threading.Thread(target=lambda: done.append(wait_any(HOUR_S, a, b)))
    t.start()
    time.sleep(0.05)
    b.set()
    t.join(STOP_S)
    assert done == [True], "a Signal set from another thread ends an hour-long wait"
    assert wait_any(0.01, Signal(), Signal()) is False
    assert wait_any(HOUR_S, Signal(), b) is True         # already set: returns at once


def test_wait_any_still_sees_a_plain_event() -> None:
    plain = threading.Event()
    done: list[bool] = []
    t = threading.Thread(target=lambda: done.append(wait_any(HOUR_S, Signal(), plain)))
    t.start()
    time.sleep(0.05)
    plain.set()
    t.join(STOP_S)
    assert done == [True]


def test_a_cleared_signal_does_not_spin_the_wait() -> None:
    """set() then clear() before the waiter looks: it goes back to sleep, it does not spin."""
    s = Signal()
    calls = 0
    real_is_set = s.is_set

    def counting() -> bool:
        nonlocal calls
        calls += 1
        return real_is_set()

    s.is_set = counting  # type: ignore[method-assign]
    t = threading.Thread(target=lambda: wait_any(0.5, s))
    t.start()
    time.sleep(0.05)
    s.set()
    s.clear()
    t.join(STOP_S)
    assert calls < 10, f"the wait looked {calls} times in 0.5 s"


# ---- a whole idle agent ------------------------------------------------------------------------

def _config(tmp_path: Path, idp: Any, api: Any, tls: Any, broker: Any, **auth: Any) -> dict[str, Any]:
    return {
        "device": {"id": DEVICE, "state_dir": str(tmp_path / "state")},
        "auth": {"client_id": "sim-device-agent", "authority": idp.authority, "instance_discovery": False,
                 "scopes": ["api://telemetry/Readings.Write"], "ca_file": str(tls.ca_file), "timeout_s": 5,
                 **auth},
        "display": {"driver": "png", "path": str(tmp_path / "screen.png"), "sleep_after_s": 0},
        "gpio": {"backend": "fake", "button": 17, "led": 27},
        "mqtt": {"url": broker.url, "topic_prefix": PREFIX},
        "sensors": [{"name": "temp", "type": "simulated", "interval_s": 1.0}],
        "upload": {"sink": "http", "url": api.url, "ca_file": str(tls.ca_file), "interval_s": HOUR_S},
    }


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Any]:
    """Start Service(config) in a thread with a FakeGpio; stops it at the end."""
    started: list[tuple[Service, threading.Thread, FakeGpio]] = []

    def start(cfg: dict[str, Any], codes: list[str] | None = None) -> tuple[Service, FakeGpio, threading.Thread]:
        gpio = FakeGpio()
        svc = Service(parse(cfg, tmp_path / "config.toml"), install_signals=False, hardware={"gpio": gpio})
        if codes is not None:
            svc.state.subscribe(lambda snap: codes.append(snap.code.user_code)
                                if snap.code and snap.code.user_code not in codes else None)
        thread = threading.Thread(target=svc.run, name="service-under-test", daemon=True)
        thread.start()
        started.append((svc, thread, gpio))
        return svc, gpio, thread

    yield start
    for svc, thread, gpio in started:
        svc.request_stop()
        thread.join(5)
        gpio.close()


@pytest.mark.slow
def test_idle_agent_answers_flush_at_once_and_stops_within_2s(
        tmp_path: Path, idp: Any, idp_api: Any, tls: Any, mosquitto: Any, running: Any) -> None:
    idp.auto_approve_after_s = 0.0
    svc, _, thread = running(_config(tmp_path, idp, idp_api, tls, mosquitto))
    sub = Subscriber(mosquitto, [f"{PREFIX}/{DEVICE}/cmd/result"])
    wait_for(lambda: idp_api.seqs(DEVICE), 20, "the first readings delivered (flush at sign-in)")
    assert svc.outbox is not None
    wait_for(lambda: svc.outbox.counts().pending > 0, 10, "a reading queued while the uploader waits an hour")
    time.sleep(0.5)                         # everyone is asleep in their long waits now
    pending = svc.outbox.counts().pending
    sub.publish(f"{PREFIX}/{DEVICE}/cmd", b'{"action": "flush"}')
    result = json.loads(sub.next(5, match=lambda m: m.topic.endswith("/cmd/result")).payload)
    assert result["action"] == "flush" and result["ok"] is True
    wait_for(lambda: len(idp_api.seqs(DEVICE)) >= pending + 1, 5, "flush ends the hour-long upload wait")

    time.sleep(0.5)                         # asleep again
    svc.request_stop()
    thread.join(STOP_S)
    assert not thread.is_alive(), "the idle service did not stop within 2 s"


@pytest.mark.slow
def test_button_and_renew_code_end_the_wait_for_a_person(
        tmp_path: Path, idp: Any, idp_api: Any, tls: Any, mosquitto: Any, running: Any) -> None:
    """Renewals used up: the sign-in thread waits with no deadline at all; the button and MQTT
    renew_code each bring a new code."""
    idp.set(interval_s=1, decline_all=True)
    codes: list[str] = []
    svc, gpio, _ = running(_config(tmp_path, idp, idp_api, tls, mosquitto, auto_renew_codes=0), codes)
    sub = Subscriber(mosquitto, [f"{PREFIX}/{DEVICE}/cmd/result"])
    wait_for(lambda: svc.state.snapshot.renewals_exhausted, 20, "the declined code used up the renewals")
    assert len(codes) == 1
    idp.set(decline_all=False)
    time.sleep(0.5)                         # the sign-in thread is asleep in its endless wait

    gpio.press(17)
    time.sleep(0.1)
    gpio.release(17)
    wait_for(lambda: svc.state.snapshot.code is not None, 5, "the button brings a new code")
    assert len(codes) == 2

    # Decline it so the renewals are used up again, then ask over MQTT.
    idp.set(decline_all=True)
    wait_for(lambda: svc.state.snapshot.renewals_exhausted, 20, "declined again")
    idp.set(decline_all=False)
    time.sleep(0.5)
    sub.publish(f"{PREFIX}/{DEVICE}/cmd", b'{"action": "renew_code"}')
    result = json.loads(sub.next(5, match=lambda m: m.topic.endswith("/cmd/result")).payload)
    assert result["ok"] is True
    wait_for(lambda: svc.state.snapshot.code is not None, 5, "renew_code brings a new code")
    assert len(codes) == 3


@pytest.mark.slow
def test_sigterm_stops_an_idle_agent_within_2s(tmp_path: Path, idp: Any, idp_api: Any, tls: Any,
                                               mosquitto: Any) -> None:
    idp.auto_approve_after_s = 0.0
    cfg = _config(tmp_path, idp, idp_api, tls, mosquitto)
    cfg["sensors"][0]["interval_s"] = 60.0
    agent = AgentProcess(write_config(tmp_path / "config.toml", cfg))
    try:
        wait_for(lambda: idp_api.seqs(DEVICE), 20, "signed in, first reading delivered")
        time.sleep(1.0)                     # every thread in its long wait
        rc, elapsed = agent.terminate()
        assert rc == 0
        assert elapsed <= STOP_S, f"exit took {elapsed:.2f} s"
    finally:
        agent.close()


@pytest.mark.slow
def test_mqtt_status_and_the_panel_still_follow_each_reading(
        tmp_path: Path, idp: Any, idp_api: Any, tls: Any, mosquitto: Any, running: Any) -> None:
    """The observers share one thread and figures are gathered per burst: each new reading and
    its upload still reach the retained MQTT status and the panel."""
    idp.auto_approve_after_s = 0.0
    cfg = _config(tmp_path, idp, idp_api, tls, mosquitto)
    cfg["upload"]["interval_s"] = 1.0
    svc, _, _ = running(cfg)
    wait_for(lambda: idp_api.seqs(DEVICE), 20, "signed in, first reading delivered")
    sub = Subscriber(mosquitto, [f"{PREFIX}/{DEVICE}/status"])
    uploads: set[str] = set()
    deadline = time.monotonic() + 20
    while len(uploads) < 3:                   # the status topic's rate limit is 5 s
        msg = sub.next(max(0.1, deadline - time.monotonic()))
        status = json.loads(msg.payload)
        if status.get("state") == "signed_in" and status.get("last_upload"):
            uploads.add(status["last_upload"])
    assert svc.panel is not None
    frames = svc.panel.frames_shown
    wait_for(lambda: svc.panel.frames_shown > frames, 5, "the panel redrawn for the next reading")
