"""MqttPublisher over long broker outages: reconnect waits come from agent.net.retry.Backoff (with
jitter), and the journal follows OutageLog (a line when it starts, at most one every 10 min with
a count, one when it ends). Real paho; real sockets (a refusing port, a front that hangs up, a
3.1.1-only front before a real Mosquitto)."""

from __future__ import annotations

import itertools
import logging
import re
import socket
import threading
import time

import pytest

from agent.config import MqttSettings
from agent.mqtt.publisher import MqttPublisher
from agent.net.retry import REPEAT_WARNING_S
from agent.state import AgentState
from tests.fixtures.broker import Broker, OldBrokerProxy, free_port
from tests.waiting import wait_until

LOGGER = "agent.mqtt.publisher"
DEVICE = "greenhouse-01"


class TickingClock:
    """A monotonic clock on which every reading is ``step_s`` later than the one before: while
    the broker is unreachable only the outage journal reads the publisher's clock, once per
    failed attempt, so each attempt "takes" ``step_s``."""

    def __init__(self, step_s: float) -> None:
        self._ticks = itertools.count()
        self.step_s = step_s
        self._lock = threading.Lock()
        self.now = 0.0

    def __call__(self) -> float:
        with self._lock:
            self.now = 1000.0 + next(self._ticks) * self.step_s
            return self.now


def records(caplog: pytest.LogCaptureFixture, level: int | None = None) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and (level is None or r.levelno == level)]


def test_an_unreachable_broker_for_hours_is_a_line_every_10_min_not_one_per_attempt(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    clock = TickingClock(15.0)
    n = MqttPublisher(MqttSettings(url=f"mqtt://127.0.0.1:{free_port()}"), DEVICE, AgentState(), {}, "x",
                      clock=clock, reconnect_delay_s=(0.005, 0.01))
    n.start()
    try:
        wait_until(lambda: len([r for r in records(caplog) if "cannot connect" in r.getMessage()
                                or "refused" in r.getMessage()]) >= 300, 30.0, what="300 attempts")
    finally:
        n.stop()
    attempts = [r for r in records(caplog) if r.levelno in (logging.DEBUG, logging.WARNING)
                and r.getMessage().startswith("MQTT: ") and "retrying" in r.getMessage()]
    warnings = [r.getMessage() for r in records(caplog, logging.WARNING)]
    elapsed = clock.now - 1000.0
    assert len(attempts) >= 300 and elapsed >= 299 * 15.0
    assert 1 + elapsed // REPEAT_WARNING_S // 2 <= len(warnings) <= 1 + elapsed // REPEAT_WARNING_S, warnings
    assert "repeats are counted and reported every 10 min" in warnings[0]
    assert all(re.search(r"still failing: \d+ failed attempts in the last 1\d min", w) for w in warnings[1:])
    assert len(warnings) < len(attempts) / 10, "no line per retry"


class _HangUpFront:
    """A load balancer without a backend: accepts the TCP connection, then closes it. Records
    when each attempt arrived."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.arrivals: list[float] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.arrivals.append(time.monotonic())
            conn.recv(1024)                      # the CONNECT
            conn.close()

    def close(self) -> None:
        self._listener.close()


@pytest.mark.slow
def test_reconnect_waits_come_from_the_jittered_backoff_and_a_hang_up_is_said_once(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    front = _HangUpFront()
    # rng 0.0: equal jitter gives half of each doubled step: 0.3, 0.6, 1.2, 1.2 (cap 2.4 x 0.5).
    # paho's own doubling would wait 0.6, 1.2, 2.4, 2.4.
    n = MqttPublisher(MqttSettings(url=f"mqtt://127.0.0.1:{front.port}"), DEVICE, AgentState(), {}, "x",
                      reconnect_delay_s=(0.6, 2.4), rng=lambda: 0.0)
    n.start()
    try:
        wait_until(lambda: len(front.arrivals) >= 5, 15.0, what="five attempts")
    finally:
        n.stop()
        front.close()
    gaps = [b - a for a, b in zip(front.arrivals, front.arrivals[1:], strict=False)][:4]
    for gap, expected in zip(gaps, [0.3, 0.6, 1.2, 1.2], strict=True):
        assert expected - 0.05 <= gap <= expected + 0.25, gaps
    warnings = [r.getMessage() for r in records(caplog, logging.WARNING)]
    assert len(warnings) == 1 and "hung up before answering" in warnings[0], warnings


def test_a_311_only_broker_is_said_once_not_on_every_connection(
        mosquitto: Broker, old_broker: OldBrokerProxy, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    n = MqttPublisher(mosquitto.mqtt_settings(url=f"mqtt://127.0.0.1:{old_broker.port}"), DEVICE,
                      AgentState(), {}, "x", reconnect_delay_s=(0.1, 0.2))
    n.start()
    try:
        wait_until(lambda: n.connected and n.protocol == "3.1.1", what="connected via 3.1.1")
        for i in range(2):
            mosquitto.restart(crash=True)        # every connection drops; each new one tries 5 first
            wait_until(lambda i=i: old_broker.refused_v5 >= i + 2 and n.connected, 10.0,
                       what="reconnected")
    finally:
        n.stop()
    said = [r for r in records(caplog) if "does not support MQTT 5" in r.getMessage()]
    assert len(said) >= 3
    assert [r.levelno for r in said] == [logging.WARNING] + [logging.DEBUG] * (len(said) - 1)
    assert any(r.levelno == logging.INFO and r.getMessage().startswith(
        f"MQTT: connected to 127.0.0.1:{old_broker.port} (MQTT 3.1.1) (after ") for r in records(caplog))



@pytest.mark.slow
def test_after_a_lost_311_connection_trying_mqtt_5_again_waits_the_back_off(
        mosquitto: Broker, old_broker: OldBrokerProxy) -> None:
    """A lost 3.1.1 connection makes the next one try MQTT 5: that attempt waits the back-off
    like any reconnect (a 3.1.1 broker that drops us at once, e.g. a cloned box with our client
    id, must not get a reconnect loop)."""
    n = MqttPublisher(mosquitto.mqtt_settings(url=f"mqtt://127.0.0.1:{old_broker.port}"), DEVICE,
                      AgentState(), {}, "x", reconnect_delay_s=(1.5, 1.5), rng=lambda: 1.0)
    n.start()
    try:
        wait_until(lambda: n.connected and n.protocol == "3.1.1", what="connected via 3.1.1")
        tries = old_broker.refused_v5
        dropped = time.monotonic()
        mosquitto.kill()                          # the connection drops (paho sees it at once)
        wait_until(lambda: old_broker.refused_v5 > tries, 10.0, what="MQTT 5 tried")
        waited = old_broker.refused_v5_at[tries] - dropped     # both ends timed, no polling lag
        retried_311 = [t for t, level in old_broker.connects if dropped < t < old_broker.refused_v5_at[tries]
                       and level == 4]
        mosquitto.start()
        wait_until(lambda: n.connected, 10.0, what="reconnected")
    finally:
        n.stop()
    # Backoff(1.5, 1.5) with jitter factor 1.0: one wait of 1.5 s, not none (the bug was 0.01 s)
    # and not two (3 s); the old client is shut down during the wait, not after it (which made
    # it up to 1 s longer: paho's reconnect loop sleeps in 1 s steps).
    assert 1.4 <= waited <= 2.5, waited
    assert retried_311 == [], "the old 3.1.1 client reconnected by itself during the back-off"


def test_a_publishing_bug_logs_its_traceback_once_then_counts(
        mosquitto: Broker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    clock = TickingClock(15.0)
    state = AgentState()
    n = MqttPublisher(mosquitto.mqtt_settings(), DEVICE, state, {}, "x", clock=clock)
    n.start()
    try:
        wait_until(lambda: n.connected, what="connected")
        real = n._out.plan

        def broken(*args: object, **kwargs: object) -> object:
            raise KeyError("plan bug")

        n._out.plan = broken  # type: ignore[method-assign]
        for i in range(300):                      # 300 state changes, each wakes the publisher
            state.update(error=f"e{i}")
            time.sleep(0.002)
        wait_until(lambda: len([r for r in records(caplog) if "publishing failed" in r.getMessage()]) >= 50,
                   what="many failed passes")
        n._out.plan = real  # type: ignore[method-assign]
        state.update(error=None)
        wait_until(lambda: any("publishing works again" in r.getMessage() for r in records(caplog, logging.INFO)),
                   what="works again")
    finally:
        n.stop()
    failed = [r for r in records(caplog) if "publishing failed" in r.getMessage()]
    errors = [r for r in failed if r.levelno == logging.ERROR]
    assert len(failed) >= 50 and 1 <= len(errors) <= 1 + (clock.now - 1000.0) // REPEAT_WARNING_S
    assert len(errors) < len(failed) / 5, "no traceback per pass"
    assert errors[0].exc_info is not None and all(r.exc_info is None for r in errors[1:])
