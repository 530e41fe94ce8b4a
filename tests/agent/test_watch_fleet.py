"""`watch` at fleet scale against a default-config Mosquitto, and `watch --summary`.

A default Mosquitto allows 20 QoS 1 messages in flight and queues 1000 more per client, dropping
the rest: the retained burst of a 10,000-device fleet is where that bites.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent.mqtt.fleet import Fleet
from agent.mqtt.publisher import MqttPublisher
from agent.mqtt.watch import SummaryScreen, WatchClient, WatchEvent, classify, summary_lines
from agent.state import AgentState
from tests.fixtures.broker import Broker, Subscriber
from tests.waiting import wait_until


def status(i: int, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"state": "signed_in", "account": f"user{i}@contoso.example", "error": None,
                           "outbox": {"pending": i % 50, "dead": 0, "dropped": 0}, "last_upload": None,
                           "version": "0.1.0"}
    doc.update(extra)
    return doc


def code(device: str, life_s: float = 900, user_code: str = "F4XQ9ZRTL") -> dict[str, Any]:
    expires = (datetime.now(UTC) + timedelta(seconds=life_s)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"device_id": device, "user_code": user_code, "verification_uri": "https://login.example/devicelogin",
            "expires_at": expires, "message": "m"}


def seed_fleet(broker: Broker, n: int, *, prefix: str = "test", codes_every: int = 10) -> int:
    """Retained status for ``n`` devices and a code for every ``codes_every``-th; returns messages."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(200)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    infos = []
    try:
        for i in range(n):
            dev = f"dev{i:05d}"
            state = "signing_in" if i % codes_every == 0 else "signed_in"
            doc = status(i, state=state, account=None) if state == "signing_in" else status(i)
            infos.append(client.publish(f"{prefix}/{dev}/status", json.dumps(doc),
                                        qos=1, retain=True))
            if i % codes_every == 0:
                infos.append(client.publish(f"{prefix}/{dev}/auth/code", json.dumps(code(dev)), qos=1,
                                            retain=True))
        for info in infos:
            info.wait_for_publish(60)
    finally:
        client.disconnect()
        client.loop_stop()
    return len(infos)


def count_events(url: str, *, legacy: bool, settle_s: float = 1.5,
                 limit_s: float = 15.0) -> tuple[set[str], float]:
    """Topics a fresh WatchClient receives, and the time until the last one."""
    topics: set[str] = set()
    last = [time.monotonic()]

    def seen(ev: WatchEvent) -> None:
        topics.add(ev.topic)
        last[0] = time.monotonic()

    client = WatchClient(url, "test", on_event=seen, legacy=legacy)
    t0 = time.monotonic()
    client.connect()
    try:
        while time.monotonic() - last[0] < settle_s and time.monotonic() - t0 < limit_s:
            time.sleep(0.05)
    finally:
        client.close()
    return topics, last[0] - t0


@pytest.mark.slow
def test_watch_gets_a_10000_device_fleet_from_a_default_broker(mosquitto: Broker) -> None:
    sent = seed_fleet(mosquitto, 10_000)
    assert sent == 11_000
    old, _ = count_events(mosquitto.url, legacy=True, settle_s=1.0)
    assert len(old) < 2_000            # the trap is real: the old subscription saw a fraction
    topics, took = count_events(mosquitto.url, legacy=False)
    assert len(topics) == 11_000 and took < 10.0


@pytest.mark.slow
def test_watch_gets_the_whole_fleet_from_a_311_only_broker(mosquitto: Broker) -> None:
    from tests.fixtures.broker import OldBrokerProxy

    seed_fleet(mosquitto, 10_000)
    proxy = OldBrokerProxy(mosquitto.port)      # no MQTT 5, so no Receive Maximum: QoS 0 instead
    try:
        topics, took = count_events(f"mqtt://127.0.0.1:{proxy.port}", legacy=False)
        assert proxy.refused_v5 == 1 and len(topics) == 11_000 and took < 10.0
    finally:
        proxy.close()


@pytest.mark.slow
def test_watch_cli_whole_fleet_within_10s_and_60_mib(mosquitto: Broker) -> None:
    seed_fleet(mosquitto, 10_000)
    cmd = [sys.executable, "-m", "agent", "watch", "--url", mosquitto.url, "--prefix", "test", "--json"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        seen: set[str] = set()
        while len(seen) < 11_000:
            line = proc.stdout.readline()
            assert line, f"watch ended after {len(seen)} messages"
            seen.add(json.loads(line)["topic"])
            assert time.monotonic() - t0 < 10.0, f"only {len(seen)} of 11000 within 10 s"
        with open(f"/proc/{proc.pid}/status") as f:
            hwm_kib = next(int(x.split()[1]) for x in f if x.startswith("VmHWM:"))
        assert hwm_kib <= 60 * 1024, f"watch peaked at {hwm_kib / 1024:.1f} MiB"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(5) == 0
    finally:
        proc.kill()
        proc.wait()


def test_live_updates_after_the_burst_nothing_missed(mosquitto: Broker) -> None:
    seed_fleet(mosquitto, 1_500)
    got: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()

    def seen(ev: WatchEvent) -> None:
        with lock:
            got[ev.topic] = ev.payload or {}

    client = WatchClient(mosquitto.url, "test", on_event=seen)
    client.connect()
    try:
        wait_until(lambda: len(got) == 1_650, 10.0, what="retained burst")
        # 3,000 live changes as fast as one publisher can send them: a burst, like a fleet
        # reconnecting after a broker restart.
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        pub.max_inflight_messages_set(500)
        pub.connect("127.0.0.1", mosquitto.port)
        pub.loop_start()
        infos = [pub.publish(f"test/dev{i % 1500:05d}/status",
                             json.dumps(status(i, outbox={"pending": i, "dead": 0, "dropped": 0})),
                             qos=1, retain=True) for i in range(3_000)]
        for info in infos:
            info.wait_for_publish(30)
        pub.disconnect()
        pub.loop_stop()

        def final() -> bool:
            with lock:
                return all(got[f"test/dev{d:05d}/status"]["outbox"]["pending"] == 1500 + d for d in range(1500))

        wait_until(final, 10.0, what="every device's last status")
    finally:
        client.close()


def test_device_cmd_subscription_survives_a_command_burst(mosquitto: Broker) -> None:
    # The device's own subscription has no retained burst (one exact topic, retained commands
    # answered, never run), but an admin script commanding it faster than it answers must not lose
    # commands in the broker's 20-in-flight window: every one of them gets its result.
    state = AgentState()
    n = MqttPublisher(mosquitto.mqtt_settings(), "dev-a", state, {}, "1.2.3")
    n.start()
    sub = Subscriber(mosquitto, ["test/dev-a/cmd/result"])
    try:
        wait_until(lambda: n.connected, what="device connected")
        burst = 1_500
        admin = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        admin.max_inflight_messages_set(burst)      # a script firing at a whole fleet at once
        admin.connect("127.0.0.1", mosquitto.port)
        admin.loop_start()
        infos = [admin.publish("test/dev-a/cmd", b'{"action": "publish_status"}', qos=1) for _ in range(burst)]
        for info in infos:
            info.wait_for_publish(10)
        admin.disconnect()
        admin.loop_stop()
        results = []
        deadline = time.monotonic() + 20
        while len(results) < burst and time.monotonic() < deadline:
            results += sub.drain(0.2)
        assert len(results) == burst
        assert {json.loads(m.payload)["action"] for m in results} == {"publish_status"}
    finally:
        sub.close()
        n.stop()


# ----------------------------------------------------------------------------- --summary

def ev(device: str, kind: str, payload: dict[str, Any] | None, expiry_s: int | None = None) -> WatchEvent:
    topic = f"p/{device}/status" if kind == "status" else f"p/{device}/auth/code"
    raw = b"" if payload is None else json.dumps(payload).encode()
    out = classify("p", topic, raw, expiry_s=expiry_s)
    assert isinstance(out, WatchEvent)
    return out


def test_summary_lists_who_needs_a_person_most_urgent_first() -> None:
    fleet = Fleet(backlog_s=3600)
    fleet.apply(ev("ok-1", "status", status(1)))
    fleet.apply(ev("old-device", "status", {"state": "signed_in"}))      # an older agent: few fields
    fleet.apply(ev("late", "status", status(2, state="signing_in")))
    fleet.apply(ev("late", "code", code("late", user_code="LATE0CODE"), expiry_s=600))
    fleet.apply(ev("soon", "status", status(3, state="signing_in")))
    fleet.apply(ev("soon", "code", code("soon", user_code="SOON0CODE"), expiry_s=60))
    fleet.apply(ev("broken", "status", status(4, state="error", error="the API refuses fresh tokens (401)")))
    fleet.apply(ev("sd-card", "status", status(5, storage="read_only")))
    fleet.apply(ev("backlog", "status", status(6, oldest_pending_s=9000)))
    fleet.apply(ev("fine-backlog", "status", status(7, oldest_pending_s=60)))
    fleet.apply(ev("lapsing", "status", status(8, warning="sign-in lapses in 3 days: sign in again",
                                                 signin_lapses_in_days=3)))
    fleet.apply(ev("used", "code", code("used", user_code="USED0CODE"), expiry_s=600))
    fleet.apply(ev("used", "code", None))                                # cleared: signed in
    lines = summary_lines(fleet, now=datetime(2026, 12, 1, 10, 0, tzinfo=UTC))
    assert lines[0].startswith("10 devices   signing_in 2  signed_in 6  error 1  starting 0  offline 0")
    assert "unknown 1" in lines[0]                                       # "used" has no status yet
    assert lines[1] == "needs a person now: 6"
    body = [line.split()[0] for line in lines[2:]]
    assert body == ["soon", "late", "broken", "sd-card", "backlog", "lapsing"]
    assert "CODE SOON0CODE 0:59 left" in lines[2] or "CODE SOON0CODE 1:00 left" in lines[2]
    assert "error: the API refuses fresh tokens (401)" in lines[4]
    assert "storage read-only" in lines[5]
    assert "oldest reading waiting 2 h 30 min" in lines[6]
    assert "warning: sign-in lapses in 3 days" in lines[7]


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_summary_redraws_in_place_on_a_tty_and_prints_plain_otherwise() -> None:
    fleet = Fleet()
    fleet.apply(ev("a", "status", status(1)))
    tty, plain = FakeTty(), io.StringIO()
    SummaryScreen(tty).refresh(fleet, force=True)
    screen = SummaryScreen(plain)
    screen.refresh(fleet, force=True)
    screen.refresh(fleet, force=True)               # nothing changed: a log gets nothing new
    assert tty.getvalue().startswith("\x1b[H1 devices") and "\x1b[J" in tty.getvalue()
    assert "\x1b" not in plain.getvalue() and plain.getvalue().count("1 devices") == 1


def test_summary_cli_against_the_broker(mosquitto: Broker) -> None:
    seed_fleet(mosquitto, 30, codes_every=10)
    out = subprocess.run([sys.executable, "-m", "agent", "watch", "--url", mosquitto.url, "--prefix", "test",
                          "--summary", "--timeout", "2"], capture_output=True, text=True, timeout=20,
                         env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().split("\n\n")[-1].splitlines()
    assert last[0].startswith("30 devices   signing_in 3  signed_in 27")
    assert last[1] == "needs a person now: 3"
    assert all("CODE F4XQ9ZRTL" in line for line in last[2:])


@pytest.mark.slow
def test_a_code_cleared_while_watch_was_away_is_cleared_after_it_reconnects(mosquitto: Broker) -> None:
    from tests.fixtures.broker import OldBrokerProxy

    state = AgentState()
    device = MqttPublisher(mosquitto.mqtt_settings(), "dev-a", state, {}, "1")
    device.start()
    proxy = OldBrokerProxy(mosquitto.port, on_v5="forward")
    fleet = Fleet()
    client = WatchClient(f"mqtt://127.0.0.1:{proxy.port}", "test", on_event=fleet.apply)
    try:
        from tests.agent.test_watch import make_code

        state.code_issued(make_code(900))
        wait_until(lambda: device.connected, what="device connected")
        client.connect()
        wait_until(lambda: any(d.code for d in fleet.devices()), what="watch sees the code")
        proxy.on_v5 = "close"                 # watch's network is down for a while ...
        proxy.drop_connections()
        state.signed_in("ada@contoso.example")   # ... while the code is used and cleared
        time.sleep(1.0)
        proxy.on_v5 = "forward"               # back: watch reconnects, the clear is history
        wait_until(lambda: all(d.code is None for d in fleet.devices())
                   and fleet.devices()[0].state == "signed_in", 15, what="watch's view after reconnect")
    finally:
        client.close()
        proxy.close()
        device.stop()
