"""MqttPublisher against a real Mosquitto, plus its pure parts (command parsing, what to publish)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import MqttSettings
from agent.errors import AgentError, NotifyError
from agent.mqtt.protocol import ACTIONS, MAX_COMMAND_BYTES, Outbound, parse_command
from agent.mqtt.publisher import MqttPublisher
from agent.state import AgentState, DeviceCode, OutboxCounts, Snapshot
from tests.fixtures.broker import Broker, OldBrokerProxy, Received, Subscriber, retained
from tests.waiting import wait_until

DEVICE = "greenhouse-01"
STATUS = f"test/{DEVICE}/status"
CODE = f"test/{DEVICE}/auth/code"
CMD = f"test/{DEVICE}/cmd"
RESULT = f"test/{DEVICE}/cmd/result"


def make_code(life_s: float, user_code: str = "F4XQ9ZRTL", now: float | None = None) -> DeviceCode:
    mono = time.monotonic() if now is None else now
    return DeviceCode(user_code=user_code, verification_uri="https://login.example/devicelogin",
                      expires_at_monotonic=mono + life_s,
                      expires_at_wall=datetime.now(UTC) + timedelta(seconds=life_s), interval_s=5)




def is_code(user_code: str) -> Callable[[Received], bool]:
    return lambda m: m.topic == CODE and bool(m.payload) and json.loads(m.payload)["user_code"] == user_code


def is_cleared(m: Received) -> bool:
    return m.topic == CODE and m.payload == b""


@pytest.fixture
def notifiers() -> Iterator[Callable[..., MqttPublisher]]:
    """Build and start notifiers; every one is stopped at teardown."""
    made: list[MqttPublisher] = []

    def make(settings: MqttSettings, state: AgentState, commands: dict[str, Callable[[], None]] | None = None,
             **kw: Any) -> MqttPublisher:
        n = MqttPublisher(settings, DEVICE, state, commands or {}, "1.2.3", **kw)
        n.start()
        made.append(n)
        return n

    yield make
    for n in made:
        n.stop()


@pytest.fixture
def subscribers() -> Iterator[Callable[..., Subscriber]]:
    made: list[Subscriber] = []

    def make(broker: Broker, topics: list[str] | None = None) -> Subscriber:
        s = Subscriber(broker, topics or [f"test/{DEVICE}/#"])
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


# ----------------------------------------------------------------------------- pure parts

@pytest.mark.parametrize("payload, action, error_part", [
    (b'{"action": "renew_code"}', "renew_code", None),
    (b'{"action": "sign_out", "extra": 1}', "sign_out", None),
    (b"not json", None, "not JSON"),
    (b"\xff\xfe\x00", None, "not UTF-8"),
    (b"[1, 2]", None, "not an array"),
    (b'"renew_code"', None, "not a string"),
    (b"{}", None, 'missing "action"'),
    (b'{"action": 5}', None, "must be a string, not a number"),
    (b'{"action": null}', None, "must be a string, not null"),
    (b'{"action": "reboot"}', "reboot", "unknown action 'reboot'"),
    (b'{"action": "x"}' + b" " * MAX_COMMAND_BYTES, None, "too large"),
    (b"[" * 100_000, None, "too large"),
    (b"[" * 4000, None, "not JSON"),
])
def test_parse_command(payload: bytes, action: str | None, error_part: str | None) -> None:
    cmd = parse_command(payload)
    assert cmd.action == action
    if error_part is None:
        assert cmd.error is None
    else:
        assert cmd.error is not None and error_part in cmd.error


def test_outbound_throttles_outbox_churn_but_not_what_people_act_on() -> None:
    out = Outbound("test", DEVICE, "1.2.3", status_min_interval_s=5.0)
    pubs, wake = out.plan(Snapshot(), 100.0, force=True)
    assert [p.topic for p in pubs] == [STATUS, CODE] and pubs[1].payload == b""   # the truth: no code
    assert wake is None

    pubs, wake = out.plan(Snapshot(outbox=OutboxCounts(pending=1)), 101.0)
    assert pubs == [] and wake == 105.0                       # count-only: waits for the window
    pubs, wake = out.plan(Snapshot(outbox=OutboxCounts(pending=2)), 102.0)
    assert pubs == [] and wake == 105.0
    pubs, _ = out.plan(Snapshot(outbox=OutboxCounts(pending=3)), 105.0)
    assert json.loads(pubs[0].payload)["outbox"]["pending"] == 3   # the latest value, not a stale one

    pubs, _ = out.plan(Snapshot(phase="error", error="boom", outbox=OutboxCounts(pending=4)), 105.5)
    status = json.loads(pubs[0].payload)
    assert (status["state"], status["error"], status["outbox"]["pending"]) == ("error", "boom", 4)
    same = Snapshot(phase="error", error="boom", outbox=OutboxCounts(pending=4))
    assert out.plan(same, 106.0) == ([], None)


def test_outbound_throttles_ages_but_republishes_a_growing_backlog_every_minute() -> None:
    """``oldest_pending_s`` changes every second: alone it is published once a minute, not at
    the churn rate, and at least once a minute while uploads stall and nothing else changes."""
    out = Outbound("test", DEVICE, "1.2.3", status_min_interval_s=5.0, status_age_interval_s=60.0)
    stalled = Snapshot(phase="signed_in", outbox=OutboxCounts(pending=3), oldest_pending_mono=40.0)
    pubs, wake = out.plan(stalled, 100.0, force=True)
    assert json.loads(pubs[0].payload)["oldest_pending_s"] == 60 and wake == 160.0

    published: list[tuple[float, int]] = []
    t, wake_at = 100.0, 160.0
    while t < 400.0:                                  # the publisher asks on every second tick
        t += 1.0
        pubs, wake = out.plan(stalled, t)
        published += [(t, json.loads(p.payload)["oldest_pending_s"]) for p in pubs if p.topic == STATUS]
        assert wake is not None, "while a backlog ages, plan asks to be called again"
        wake_at = wake
    assert published == [(160.0, 120), (220.0, 180), (280.0, 240), (340.0, 300), (400.0, 360)]
    assert wake_at == 460.0

    # Only asked when plan said so (a publisher that sleeps until then): the same publications.
    out2 = Outbound("test", DEVICE, "1.2.3", status_age_interval_s=60.0)
    _, wake = out2.plan(stalled, 100.0, force=True)
    ages = []
    for _ in range(3):
        pubs, wake = out2.plan(stalled, wake)
        ages.append(json.loads(pubs[0].payload)["oldest_pending_s"])
    assert ages == [120, 180, 240]

    # A reading (outbox churn) within the window still waits for the 5 s rate, not the minute.
    more = Snapshot(phase="signed_in", outbox=OutboxCounts(pending=4), oldest_pending_mono=40.0)
    pubs, wake = out.plan(more, 401.0)
    assert pubs == [] and wake == 405.0
    pubs, _ = out.plan(more, 405.0)
    assert json.loads(pubs[0].payload)["outbox"]["pending"] == 4
    # What a person acts on goes out at once, with the age as of now.
    failed = Snapshot(phase="error", error="boom", outbox=OutboxCounts(pending=4), oldest_pending_mono=40.0)
    pubs, _ = out.plan(failed, 406.0)
    assert json.loads(pubs[0].payload)["oldest_pending_s"] == 366

    # Nothing pending: no age to show, no timed wake-up.
    idle = Outbound("test", DEVICE, "1.2.3")
    idle.plan(Snapshot(phase="signed_in"), 100.0, force=True)
    assert idle.plan(Snapshot(phase="signed_in"), 500.0) == ([], None)


def test_outbound_code_expiry_renewal_and_republish() -> None:
    out = Outbound("test", DEVICE, "1.2.3")
    first = make_code(900, "AAAA", now=1000.0)
    snap = Snapshot(phase="signing_in", code=first)
    pubs, wake = out.plan(snap, 1000.0, force=True)
    code_pub = [p for p in pubs if p.topic == CODE][0]
    assert json.loads(code_pub.payload)["user_code"] == "AAAA"
    assert code_pub.expiry_s == 900 and wake == 1900.0 and out.code_published

    pubs, _ = out.plan(snap, 1010.4, force=True)               # a reconnect: expiry recomputed
    assert [p.expiry_s for p in pubs if p.topic == CODE] == [889]

    renewed = make_code(900, "BBBB", now=1500.0)
    pubs, _ = out.plan(Snapshot(phase="signing_in", code=renewed), 1500.0)
    assert [json.loads(p.payload)["user_code"] for p in pubs] == ["BBBB"]

    pubs, _ = out.plan(Snapshot(phase="signing_in", code=renewed), 2400.0)   # expired, still in state
    assert [(p.topic, p.payload) for p in pubs] == [(CODE, b"")] and not out.code_published


def test_bad_tls_files_and_password_file_raise_notify_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    state = AgentState()
    with pytest.raises(NotifyError, match=r"mqtt\.ca_file .*cannot load CA certificates"):
        MqttPublisher(MqttSettings(url="mqtts://127.0.0.1:8883", ca_file=str(garbage)), DEVICE, state, {}, "x")
    with pytest.raises(NotifyError, match="cannot load the client certificate"):
        MqttPublisher(MqttSettings(url="mqtts://127.0.0.1:8883", client_cert=str(garbage),
                                  client_key=str(garbage)), DEVICE, state, {}, "x")
    with pytest.raises(NotifyError, match=r"mqtt\.password_file .*cannot read the password"):
        MqttPublisher(MqttSettings(url="mqtt://127.0.0.1:1883", username="u",
                                  password_file=str(tmp_path / "missing")), DEVICE, state, {}, "x")


# ----------------------------------------------------------------------------- against mosquitto

@pytest.mark.parametrize("variant", ["mosquitto", "mosquitto_tls"])
def test_code_reaches_a_late_subscriber_with_expiry(variant: str, request: pytest.FixtureRequest) -> None:
    broker: Broker = request.getfixturevalue(variant)
    notifiers = request.getfixturevalue("notifiers")   # after the broker: stopped before it is killed
    state = AgentState()
    n = notifiers(broker.mqtt_settings(), state)
    wait_until(lambda: n.connected, what="connected")
    state.code_issued(make_code(900))
    msg = wait_until(lambda: retained(broker, CODE, 0.1), what="retained code")
    body = json.loads(msg.payload)
    assert body == {"device_id": DEVICE, "user_code": "F4XQ9ZRTL",
                    "verification_uri": "https://login.example/devicelogin",
                    "expires_at": body["expires_at"],
                    "message": "To sign in, open https://login.example/devicelogin and enter the code "
                               "F4XQ9ZRTL."}
    assert 895 <= msg.expiry_s <= 900
    status = json.loads(retained(broker, STATUS).payload)
    assert status == {"state": "signing_in", "account": None, "error": None,
                      "outbox": {"pending": 0, "dead": 0, "dropped": 0}, "last_upload": None, "storage": "ok",
                      "oldest_pending_s": None, "clock": "unsynced", "signin_lapses_in_days": None,
                      "version": "1.2.3"}
    assert state.snapshot.links["mqtt"] == "up"


def test_code_cleared_within_1s_of_sign_in(mosquitto: Broker, notifiers: Callable[..., MqttPublisher],
                                           subscribers: Callable[..., Subscriber]) -> None:
    state = AgentState()
    sub = subscribers(mosquitto)
    notifiers(mosquitto.mqtt_settings(), state)
    state.code_issued(make_code(900))
    sub.next(match=is_code("F4XQ9ZRTL"))
    t0 = time.monotonic()
    state.signed_in("ada@contoso.example")
    cleared = sub.next(1.0, match=is_cleared)
    assert cleared.at - t0 < 1.0
    assert retained(mosquitto, CODE) is None
    assert json.loads(retained(mosquitto, STATUS).payload)["account"] == "ada@contoso.example"


def test_renewed_code_replaces_the_old(mosquitto: Broker, notifiers: Callable[..., MqttPublisher],
                                       subscribers: Callable[..., Subscriber]) -> None:
    state = AgentState()
    sub = subscribers(mosquitto)
    notifiers(mosquitto.mqtt_settings(), state)
    state.code_issued(make_code(900, "OLDCODE1"))
    sub.next(match=is_code("OLDCODE1"))
    state.code_issued(make_code(900, "NEWCODE2"))
    sub.next(match=is_code("NEWCODE2"))
    assert json.loads(retained(mosquitto, CODE).payload)["user_code"] == "NEWCODE2"


@pytest.mark.slow
def test_code_cleared_at_expiry(mosquitto: Broker, notifiers: Callable[..., MqttPublisher],
                                subscribers: Callable[..., Subscriber]) -> None:
    state = AgentState()
    sub = subscribers(mosquitto)
    notifiers(mosquitto.mqtt_settings(), state)
    code = make_code(2.5)
    state.code_issued(code)                     # nobody calls code_cleared: the notifier must notice
    first = sub.next(match=is_code("F4XQ9ZRTL"))
    assert first.expiry_s == 2
    cleared = sub.next(4.0, match=is_cleared)
    assert code.expires_at_monotonic - 0.1 <= cleared.at <= code.expires_at_monotonic + 1.0
    assert retained(mosquitto, CODE) is None


@pytest.mark.slow
def test_clearing_while_disconnected_is_published_on_reconnect(
        mosquitto: Broker, notifiers: Callable[..., MqttPublisher]) -> None:
    state = AgentState()
    n = notifiers(mosquitto.mqtt_settings(), state)
    state.code_issued(make_code(900))
    wait_until(lambda: retained(mosquitto, CODE, 0.1), what="retained code")
    control = Subscriber(mosquitto, [])            # another device's code: proves retained survives
    control.publish("test/other/auth/code", b'{"user_code":"OTHER"}', retain=True)
    control.close()

    mosquitto.stop()                               # clean stop: retained messages are saved
    wait_until(lambda: state.snapshot.links.get("mqtt") == "down", what="link down")
    state.signed_in("ada@contoso.example")         # used while the broker is away
    mosquitto.start()

    wait_until(lambda: n.connected, 6.0, what="reconnected")
    wait_until(lambda: retained(mosquitto, CODE, 0.1) is None, 2.0, what="code cleared on the broker")
    assert retained(mosquitto, "test/other/auth/code") is not None
    status = json.loads(retained(mosquitto, STATUS).payload)
    assert (status["state"], status["account"]) == ("signed_in", "ada@contoso.example")


@pytest.mark.slow
def test_status_and_code_republished_after_broker_crash(
        mosquitto: Broker, notifiers: Callable[..., MqttPublisher]) -> None:
    state = AgentState()
    n = notifiers(mosquitto.mqtt_settings(), state)
    state.code_issued(make_code(900))
    wait_until(lambda: retained(mosquitto, CODE, 0.1), what="retained code")
    mosquitto.restart(crash=True)                  # SIGKILL: the broker forgets everything
    wait_until(lambda: n.connected and state.snapshot.links["mqtt"] == "up", 6.0, what="reconnected")
    msg = wait_until(lambda: retained(mosquitto, CODE, 0.1), 2.0, what="code republished")
    assert 890 <= msg.expiry_s < 900
    assert json.loads(retained(mosquitto, STATUS).payload)["state"] == "signing_in"


def test_outbox_flood_is_coalesced(mosquitto: Broker, notifiers: Callable[..., MqttPublisher],
                                   subscribers: Callable[..., Subscriber]) -> None:
    state = AgentState()
    sub = subscribers(mosquitto, [STATUS])
    n = notifiers(mosquitto.mqtt_settings(), state, status_min_interval_s=0.5)
    wait_until(lambda: n.connected, what="connected")
    sub.next()                                      # the status published on connect
    for i in range(1, 41):                          # a 100 Hz sampler's depth changes for 0.4 s
        state.update(outbox=OutboxCounts(pending=i))
        time.sleep(0.01)
    seen = [json.loads(sub.next(2.0).payload)["outbox"]["pending"]]
    while seen[-1] != 40:
        seen.append(json.loads(sub.next(2.0).payload)["outbox"]["pending"])
    assert len(seen) <= 3, f"{len(seen)} status messages for one flood"
    assert sub.drain(0.2) == []
    state.failed("the API refused the token (403): check the scopes")   # what people act on: at once
    t0 = time.monotonic()
    msg = sub.next(1.0)
    assert json.loads(msg.payload)["state"] == "error" and msg.at - t0 < 0.3


@pytest.mark.slow
def test_a_stalled_box_republishes_its_growing_backlog_at_a_bounded_rate(
        mosquitto: Broker, notifiers: Callable[..., MqttPublisher], subscribers: Callable[..., Subscriber]) -> None:
    """Uploads stalled, no reading arrives, nothing in the state changes: the retained status
    still shows ``oldest_pending_s`` growing, once per age interval (1 s here, 60 s by default)."""
    state = AgentState()
    state.update(phase="signed_in", outbox=OutboxCounts(pending=7), oldest_pending_mono=time.monotonic() - 100)
    sub = subscribers(mosquitto, [STATUS])
    n = notifiers(mosquitto.mqtt_settings(), state, status_min_interval_s=0.2, status_age_interval_s=1.0)
    wait_until(lambda: n.connected, what="connected")
    first = json.loads(sub.next().payload)["oldest_pending_s"]
    assert 100 <= first <= 102
    seen = sub.drain(3.6)
    ages = [json.loads(m.payload)["oldest_pending_s"] for m in seen]
    assert 3 <= len(ages) <= 4, f"one status per age interval, got {ages}"
    assert ages == sorted(ages) and ages[0] > first and ages[-1] >= first + 3, ages
    gaps = [b.at - a.at for a, b in zip(seen, seen[1:], strict=False)]
    assert all(g >= 0.8 for g in gaps), gaps
    retained_age = json.loads(retained(mosquitto, STATUS).payload)["oldest_pending_s"]
    assert retained_age >= ages[-1], "a subscriber arriving now sees the grown backlog"


def test_last_will_on_sigkill(mosquitto: Broker, subscribers: Callable[..., Subscriber]) -> None:
    sub = subscribers(mosquitto, ["test/will-dev/status"])
    script = (
        "import sys, time\n"
        "from agent.config import MqttSettings\n"
        "from agent.mqtt.publisher import MqttPublisher\n"
        "from agent.state import AgentState\n"
        "MqttPublisher(MqttSettings(url=sys.argv[1], topic_prefix='test', keepalive_s=5),"
        " 'will-dev', AgentState(), {}, '1.2.3').start()\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, mosquitto.url])
    try:
        live = sub.next(10.0)
        assert json.loads(live.payload)["state"] == "starting"
        proc.kill()
        proc.wait()
        t0 = time.monotonic()
        will = sub.next(2.0)
        assert will.payload == b'{"state":"offline"}' and will.at - t0 < 1.0
        assert retained(mosquitto, "test/will-dev/status").payload == b'{"state":"offline"}'
    finally:
        proc.kill()
        proc.wait()


def test_stop_publishes_offline_and_clears_code(mosquitto: Broker) -> None:
    state = AgentState()
    n = MqttPublisher(mosquitto.mqtt_settings(), DEVICE, state, {}, "1.2.3")
    n.start()
    state.code_issued(make_code(900))
    wait_until(lambda: retained(mosquitto, CODE, 0.1), what="retained code")
    t0 = time.monotonic()
    n.stop()
    assert time.monotonic() - t0 < 1.0
    status = json.loads(retained(mosquitto, STATUS).payload)
    assert status["state"] == "offline" and status["version"] == "1.2.3"   # full status, not the Will
    assert retained(mosquitto, CODE) is None
    assert state.snapshot.links["mqtt"] == "off"


def test_start_never_blocks_and_stop_is_quick_when_broker_is_down(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="agent.mqtt.publisher")
    from tests.fixtures.broker import free_port

    state = AgentState()
    n = MqttPublisher(MqttSettings(url=f"mqtt://127.0.0.1:{free_port()}"), DEVICE, state, {}, "x")
    t0 = time.monotonic()
    n.start()
    assert time.monotonic() - t0 < 0.5              # no connect attempt in the caller's thread
    wait_until(lambda: state.snapshot.links.get("mqtt") == "down", what="link down")
    wait_until(lambda: any("refused" in r.getMessage() for r in caplog.records), what="warning")
    state.code_issued(make_code(900))             # the rest of the agent carries on
    t0 = time.monotonic()
    n.stop()
    assert time.monotonic() - t0 < 1.5


def test_wrong_password_logs_once_and_keeps_running(
        mosquitto_tls: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        notifiers: Callable[..., MqttPublisher]) -> None:
    caplog.set_level(logging.INFO, logger="agent.mqtt.publisher")
    wrong = tmp_path / "wrong-password"
    wrong.write_text("nope\n")
    state = AgentState()
    n = notifiers(mosquitto_tls.mqtt_settings(password_file=str(wrong)), state)
    wait_until(lambda: [r for r in caplog.records if r.levelno == logging.ERROR], what="error logged")
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert ("MQTT broker refused the credentials (135 Not authorized): "
            "check mqtt.username/password_file") in errors[0]
    assert state.snapshot.links["mqtt"] == "down" and not n.connected
    state.code_issued(make_code(900))              # state changes still flow, nothing blocks
    assert state.snapshot.phase == "signing_in"


def test_tls_with_password_and_client_settings(mosquitto_tls: Broker,
                                               notifiers: Callable[..., MqttPublisher]) -> None:
    state = AgentState()
    n = notifiers(mosquitto_tls.mqtt_settings(), state)
    wait_until(lambda: n.connected, what="connected over TLS")
    state.signed_in("ada@contoso.example")
    wait_until(lambda: (m := retained(mosquitto_tls, STATUS, 0.1)) and b"ada@contoso" in m.payload,
               what="status over TLS")


def test_client_certificate_login(tmp_path: Path, notifiers: Callable[..., MqttPublisher]) -> None:
    """mTLS: the broker requires a client certificate from the same CA; config client_cert/key."""
    import trustme

    from agent.sim.tls import TlsFiles
    from tests.fixtures.broker import mosquitto_binary

    ca = trustme.CA()
    files = TlsFiles(tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server.key")
    ca.cert_pem.write_to_path(str(files.ca_file))
    server = ca.issue_cert("127.0.0.1")
    server.private_key_and_cert_chain_pem.write_to_path(str(files.cert_file))
    server.private_key_pem.write_to_path(str(files.key_file))
    client = ca.issue_cert("greenhouse-01.devices.example")
    client.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
    client.private_key_pem.write_to_path(str(tmp_path / "client.key"))
    broker = Broker(mosquitto_binary(), tmp_path / "broker", tls=files)
    with broker.config.open("a") as f:
        f.write("require_certificate true\n")
    broker.start()
    made: list[MqttPublisher] = []
    try:
        made.append(notifiers(broker.mqtt_settings(client_cert=str(tmp_path / "client.pem"),
                                                   client_key=str(tmp_path / "client.key")), AgentState()))
        wait_until(lambda: made[0].connected, what="connected with a client certificate")
        bare = AgentState()                         # the broker really demands the certificate:
        made.append(notifiers(broker.mqtt_settings(), bare))
        wait_until(lambda: bare.snapshot.links.get("mqtt") == "down", what="refused without one")
        assert not made[1].connected
    finally:
        for x in made:
            x.stop()
        broker.kill()


def test_falls_back_to_mqtt_311(mosquitto: Broker, old_broker: OldBrokerProxy,
                                notifiers: Callable[..., MqttPublisher],
                                subscribers: Callable[..., Subscriber]) -> None:
    proxy = old_broker
    state = AgentState()
    sub = subscribers(mosquitto)
    n = notifiers(mosquitto.mqtt_settings(url=f"mqtt://127.0.0.1:{proxy.port}"), state)
    wait_until(lambda: n.connected, what="connected via 3.1.1")
    assert n.protocol == "3.1.1" and proxy.refused_v5 == 1 and proxy.forwarded == 1
    state.code_issued(make_code(900))
    msg = sub.next(match=is_code("F4XQ9ZRTL"))
    assert msg.expiry_s is None                  # 3.1.1 carries no expiry
    state.signed_in("ada")
    sub.next(1.0, match=is_cleared)
    # commands still work over 3.1.1 (no correlation data there)
    sub.publish(CMD, b'{"action": "publish_status"}')
    result = sub.next(match=lambda m: m.topic == RESULT)
    assert json.loads(result.payload) == {"action": "publish_status", "ok": True, "error": None}


@pytest.mark.slow
def test_hang_ups_before_connack_never_switch_to_311(mosquitto: Broker, request: pytest.FixtureRequest,
                                                     subscribers: Callable[..., Subscriber]) -> None:
    # A load balancer with no backend (or a broker at its connection limit) hangs up on CONNECT:
    # that says nothing about MQTT 5, and 3.1.1 would leave dead codes on the broker (no expiry).
    proxy = OldBrokerProxy(mosquitto.port, on_v5="close")
    request.addfinalizer(proxy.close)
    sub = subscribers(mosquitto)
    notifiers = request.getfixturevalue("notifiers")
    state = AgentState()
    n = notifiers(mosquitto.mqtt_settings(url=f"mqtt://127.0.0.1:{proxy.port}"), state,
                  reconnect_delay_s=(0.2, 0.5))
    wait_until(lambda: proxy.refused_v5 >= 3, 8.0, what="three hang-ups")
    proxy.on_v5 = "forward"                   # the backend is back
    wait_until(lambda: n.connected, 5.0, what="connected")
    assert n.protocol == "5" and set(proxy.levels) == {5}
    state.code_issued(make_code(600))
    assert sub.next(match=is_code("F4XQ9ZRTL")).expiry_s is not None


def test_after_a_311_connection_the_next_one_tries_mqtt_5(mosquitto: Broker, old_broker: OldBrokerProxy,
                                                          notifiers: Callable[..., MqttPublisher],
                                                          subscribers: Callable[..., Subscriber]) -> None:
    proxy = old_broker
    state = AgentState()
    state.code_issued(make_code(600))
    n = notifiers(mosquitto.mqtt_settings(url=f"mqtt://127.0.0.1:{proxy.port}"), state,
                  reconnect_delay_s=(0.2, 0.5))
    wait_until(lambda: n.connected and n.protocol == "3.1.1", what="connected via 3.1.1")
    proxy.on_v5 = "forward"                   # the broker behind was upgraded
    mosquitto.restart(crash=True)             # ... and restarted: every connection drops
    wait_until(lambda: n.connected and n.protocol == "5", 8.0, what="reconnected with MQTT 5")
    assert proxy.levels[0] == 4 and proxy.levels[-1] == 5
    # the broker lost its retained copies (crash): the reconnect republished them, code with expiry
    code = wait_until(lambda: retained(mosquitto, CODE, 0.1), what="code republished")
    assert code.expiry_s is not None and 0 < code.expiry_s <= 600
    assert wait_until(lambda: retained(mosquitto, STATUS, 0.1), what="status republished")


@pytest.mark.slow
def test_mqtt_311_code_cleared_by_own_timer(mosquitto: Broker, old_broker: OldBrokerProxy,
                                            notifiers: Callable[..., MqttPublisher],
                                            subscribers: Callable[..., Subscriber]) -> None:
    proxy = old_broker
    state = AgentState()
    sub = subscribers(mosquitto)
    n = notifiers(mosquitto.mqtt_settings(url=f"mqtt://127.0.0.1:{proxy.port}"), state)
    wait_until(lambda: n.connected, what="connected via 3.1.1")
    code = make_code(2.0)
    state.code_issued(code)
    sub.next(match=is_code("F4XQ9ZRTL"))
    cleared = sub.next(3.5, match=is_cleared)
    assert cleared.at <= code.expires_at_monotonic + 1.0


# ----------------------------------------------------------------------------- commands

def test_commands_and_their_results(mosquitto: Broker, notifiers: Callable[..., MqttPublisher],
                                    subscribers: Callable[..., Subscriber]) -> None:
    calls: list[str] = []

    def sign_out() -> None:
        raise AgentError("not signed in; nothing to sign out")

    def flush() -> None:
        raise ZeroDivisionError("bug")

    state = AgentState()
    sub = subscribers(mosquitto)
    n = notifiers(mosquitto.mqtt_settings(), state,
                  {"renew_code": lambda: calls.append("renew_code"), "sign_out": sign_out, "flush": flush})
    wait_until(lambda: n.connected, what="connected")
    sub.drain(0.1)

    def ask(payload: bytes, retain: bool = False) -> dict[str, Any]:
        corr = uuid.uuid4().bytes
        sub.publish(CMD, payload, correlation=corr, retain=retain)
        return json.loads(sub.next(match=lambda m: m.topic == RESULT and m.correlation == corr).payload)

    assert ask(b'{"action": "renew_code"}') == {"action": "renew_code", "ok": True, "error": None}
    assert calls == ["renew_code"]
    assert ask(b'{"action": "sign_out"}') == {"action": "sign_out", "ok": False,
                                              "error": "not signed in; nothing to sign out"}
    assert ask(b'{"action": "flush"}') == {"action": "flush", "ok": False,
                                           "error": "internal error: ZeroDivisionError: bug"}
    assert ask(b'{"action": "reboot"}')["error"].startswith("unknown action 'reboot'")
    assert ask(b"\xff\x00binary") == {"action": None, "ok": False, "error": "payload is not UTF-8 JSON"}
    before = state.snapshot.version
    assert ask(b'{"action": "publish_status"}') == {"action": "publish_status", "ok": True, "error": None}
    sub.next(match=lambda m: m.topic == STATUS)      # republished on request
    assert state.snapshot.version == before


@pytest.mark.parametrize("via_311", [False, True])
def test_retained_command_is_not_rerun_on_connect(via_311: bool, mosquitto: Broker,
                                                  request: pytest.FixtureRequest,
                                                  subscribers: Callable[..., Subscriber]) -> None:
    calls: list[str] = []
    sub = subscribers(mosquitto)
    sub.publish(CMD, b'{"action": "sign_out"}', retain=True)   # left on the broker by a careless admin
    sub.drain(0.1)
    proxy = request.getfixturevalue("old_broker") if via_311 else None
    notifiers = request.getfixturevalue("notifiers")
    url = f"mqtt://127.0.0.1:{proxy.port}" if proxy else mosquitto.url
    n = notifiers(mosquitto.mqtt_settings(url=url), AgentState(), {"sign_out": lambda: calls.append("x")})
    wait_until(lambda: n.connected, what="connected")
    results = [json.loads(m.payload) for m in sub.drain(0.5) if m.topic == RESULT]
    assert calls == []                          # a reboot must not sign the device out again
    # ...but the admin who left it learns why nothing happened: one result, over 5 and 3.1.1.
    assert results == [{"action": "sign_out", "ok": False,
                        "error": "retained commands are not run: publish without retain"}]
    assert calls == []


def test_slow_command_does_not_stall_mqtt(mosquitto: Broker, notifiers: Callable[..., MqttPublisher],
                                          subscribers: Callable[..., Subscriber]) -> None:
    release = threading.Event()
    state = AgentState()
    sub = subscribers(mosquitto)
    n = notifiers(mosquitto.mqtt_settings(), state, {"sign_out": lambda: release.wait(5)})
    wait_until(lambda: n.connected, what="connected")
    sub.publish(CMD, b'{"action": "sign_out"}')
    time.sleep(0.05)                                # the command is now running
    state.code_issued(make_code(900))
    t0 = time.monotonic()
    sub.next(1.0, match=is_code("F4XQ9ZRTL"))
    assert time.monotonic() - t0 < 0.5
    release.set()
    result = sub.next(match=lambda m: m.topic == RESULT)
    assert json.loads(result.payload)["ok"] is True


def _payloads() -> st.SearchStrategy[bytes]:
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
    json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(
        st.text(max_size=8), c, max_size=4), max_leaves=10)
    actions = st.sampled_from(ACTIONS) | st.text(max_size=30) | scalars | st.lists(scalars, max_size=3)
    shaped = st.fixed_dictionaries({"action": actions}, optional={"x": json_values})
    return st.one_of(
        st.binary(max_size=200),
        json_values.map(lambda v: json.dumps(v).encode()),
        shaped.map(lambda v: json.dumps(v).encode()),
        st.binary(min_size=MAX_COMMAND_BYTES + 1, max_size=MAX_COMMAND_BYTES + 50),
    )


def test_fuzzed_commands_each_get_exactly_one_result(mosquitto_module: Broker) -> None:
    state = AgentState()

    def boom() -> None:
        raise AgentError("refused")

    n = MqttPublisher(mosquitto_module.mqtt_settings(), DEVICE, state,
                     {"renew_code": lambda: None, "sign_out": boom, "flush": lambda: 1 / 0}, "1.2.3")
    n.start()
    sub = Subscriber(mosquitto_module, [RESULT])
    sent = 0
    try:
        wait_until(lambda: n.connected, what="connected")

        @settings(max_examples=500, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow])
        @given(payload=_payloads())
        def one(payload: bytes) -> None:
            nonlocal sent
            corr = uuid.uuid4().bytes
            sub.publish(CMD, payload, correlation=corr)
            sent += 1
            result = sub.next(5.0)
            assert result.correlation == corr, "a result for another message (or a duplicate)"
            body = json.loads(result.payload)
            assert set(body) == {"action", "ok", "error"}
            assert body["ok"] is (body["error"] is None)
            assert body["action"] is None or isinstance(body["action"], str)
            if parse_command(payload).error is not None:
                assert body["ok"] is False

        one()
        assert sent >= 500
        assert sub.drain(0.2) == []                 # nothing extra after the last one
        assert n.connected and state.snapshot.links["mqtt"] == "up"
    finally:
        sub.close()
        n.stop()


def test_connecting_is_logged_before_connected(mosquitto: Broker, notifiers: Callable[..., MqttPublisher],
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent.mqtt.publisher")
    n = notifiers(mosquitto.mqtt_settings(), AgentState())
    wait_until(lambda: n.connected and any("MQTT: connected" in r.message for r in caplog.records),
               what="connected")
    lines = [r.message for r in caplog.records if r.message.startswith("MQTT: connect")]
    assert lines[0].startswith("MQTT: connecting to "), lines
    assert lines[1].startswith("MQTT: connected to "), lines


def test_rebuilds_asked_for_while_one_runs_run_one_at_a_time() -> None:
    """Observer-loop mode: a late on_disconnect asks for a rebuild while the last one still
    runs (paho's join, the back-off); the second waits for the first, never two clients at once."""
    import paho.mqtt.client as mqtt

    from tests.fixtures.broker import free_port

    state = AgentState()
    n = MqttPublisher(MqttSettings(url=f"mqtt://127.0.0.1:{free_port()}"), DEVICE, state, {}, "x")
    running: list[int] = []
    done: list[Any] = []
    overlap: list[int] = []

    def slow_rebuild(protocol: Any) -> None:
        running.append(1)
        overlap.append(len(running))
        time.sleep(0.3)
        running.pop()
        done.append(protocol)

    n._rebuild = slow_rebuild  # type: ignore[method-assign]   # the far side: no broker here
    n.start(thread=False)
    try:
        n._rebuild_as = mqtt.MQTTv311
        n.serve()
        time.sleep(0.05)
        n._rebuild_as = mqtt.MQTTv5          # the late on_disconnect
        n.serve()
        wait_until(lambda: len(done) == 2, what="both rebuilds")
        assert max(overlap) == 1, "two rebuilds at once"
        assert done == [mqtt.MQTTv311, mqtt.MQTTv5]
    finally:
        n.stop()
