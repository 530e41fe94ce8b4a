"""`device-agent watch` against a real Mosquitto fed by a real MqttPublisher, plus its formatting."""

from __future__ import annotations

import io
import json
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.mqtt.publisher import MqttPublisher
from agent.mqtt.watch import WatchEvent, classify, format_event, run_watch
from agent.sim.tls import TlsFiles
from agent.state import AgentState, DeviceCode, OutboxCounts
from tests.fixtures.broker import Broker, OldBrokerProxy, free_port, retained

DEVICE = "greenhouse-01"


def make_code(life_s: float, user_code: str = "F4XQ9ZRTL") -> DeviceCode:
    return DeviceCode(user_code=user_code, verification_uri="https://login.example/devicelogin",
                      expires_at_monotonic=time.monotonic() + life_s,
                      expires_at_wall=datetime.now(UTC) + timedelta(seconds=life_s), interval_s=5)


def watch(broker: Broker, **kw: Any) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    args: dict[str, Any] = {"url": broker.url, "prefix": "test", "ca_file": broker.ca_file,
                            "username": broker.username, "password_file": broker.password_file,
                            "as_json": False, "count": 2, "timeout_s": 5.0}
    args.update(kw)
    rc = run_watch(out=out, err=err, **args)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture
def device(request: pytest.FixtureRequest) -> Iterator[Callable[[Broker], AgentState]]:
    """A notifier for DEVICE on the given broker, with a code and an outbox; stopped at teardown."""
    made: list[MqttPublisher] = []

    def start(broker: Broker, **settings: Any) -> AgentState:
        state = AgentState()
        state.update(outbox=OutboxCounts(pending=12))
        n = MqttPublisher(broker.mqtt_settings(**settings), DEVICE, state, {}, "1.2.3")
        n.start()
        made.append(n)
        state.code_issued(make_code(14 * 60 + 33))
        deadline = time.monotonic() + 5
        while retained(broker, f"test/{DEVICE}/auth/code", 0.05) is None:
            assert time.monotonic() < deadline, "code never reached the broker"
        return state

    yield start
    for n in made:
        n.stop()


# ----------------------------------------------------------------------------- formatting

def test_format_code_status_and_cleared() -> None:
    now = datetime(2026, 11, 25, 14, 40, 0, tzinfo=UTC)
    code = classify("device-agent", "device-agent/greenhouse-01/auth/code", json.dumps(
        {"device_id": "greenhouse-01", "user_code": "F4XQ9ZRTL", "verification_uri": "https://x/devicelogin",
         "expires_at": "2026-11-25T14:54:32Z", "message": "m"}).encode(), now=now)
    assert isinstance(code, WatchEvent)
    assert format_event(code, now=now) == \
        "greenhouse-01  CODE F4XQ9ZRTL  open https://x/devicelogin  (14:32 left)"
    status = classify("device-agent", "device-agent/greenhouse-01/status", json.dumps(
        {"state": "signed_in", "account": "ada@contoso.example", "error": None,
         "outbox": {"pending": 12, "dead": 1, "dropped": 0}, "last_upload": None, "version": "1"}).encode())
    assert isinstance(status, WatchEvent)
    assert format_event(status) == "greenhouse-01  signed_in  ada@contoso.example  outbox 12 pending, 1 dead"
    offline = classify("device-agent", "device-agent/greenhouse-01/status", b'{"state":"offline"}')
    assert isinstance(offline, WatchEvent) and format_event(offline) == "greenhouse-01  offline"
    cleared = classify("device-agent", "device-agent/greenhouse-01/auth/code", b"")
    assert isinstance(cleared, WatchEvent) and format_event(cleared) == "greenhouse-01  code cleared"
    assert cleared.as_json()["kind"] == "code_cleared" and cleared.as_json()["payload"] is None


def test_classify_prefers_broker_expiry_and_rejects_junk() -> None:
    ev = classify("a/b", "a/b/dev/auth/code", b'{"user_code":"X","verification_uri":"u",'
                                              b'"expires_at":"2000-01-01T00:00:00Z"}', expiry_s=95)
    assert isinstance(ev, WatchEvent) and format_event(ev).endswith("(1:35 left)")   # not "expired"
    assert classify("a/b", "a/b/dev/status", b"\xff") == \
        "dev: ignoring an unreadable status message on a/b/dev/status"
    assert isinstance(classify("a/b", "a/b/dev/status", b"[1]"), str)
    assert classify("a/b", "a/b/dev/cmd", b"{}") is None
    assert classify("a/b", "other/dev/status", b"{}") is None


# ----------------------------------------------------------------------------- against mosquitto

def test_watch_text_over_tls_with_password(mosquitto_tls: Broker, device: Callable[..., AgentState]) -> None:
    device(mosquitto_tls)
    rc, out, err = watch(mosquitto_tls)
    assert rc == 0, err
    lines = sorted(out.splitlines())
    assert len(lines) == 2
    assert re.fullmatch(r"greenhouse-01  CODE F4XQ9ZRTL  open https://login\.example/devicelogin  "
                        r"\(14:(3[0-3]) left\)", lines[0]), lines[0]
    assert lines[1] == "greenhouse-01  signing_in  outbox 12 pending"


def test_watch_json_and_live_changes(mosquitto: Broker, device: Callable[..., AgentState]) -> None:
    state = device(mosquitto)
    out, err = io.StringIO(), io.StringIO()
    import threading

    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(run_watch(
        url=mosquitto.url, prefix="test", ca_file="", username="", password_file="", as_json=True,
        count=4, timeout_s=5.0, out=out, err=err)))
    t.start()
    deadline = time.monotonic() + 5
    while out.getvalue().count("\n") < 2:
        assert time.monotonic() < deadline, out.getvalue()
        time.sleep(0.01)
    state.signed_in("ada@contoso.example")
    t.join(6)
    assert result == [0], err.getvalue()
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert all(set(e) == {"device_id", "topic", "kind", "payload", "received_at"} for e in events)
    kinds = [e["kind"] for e in events]
    assert sorted(kinds[:2]) == ["code", "status"] and sorted(kinds[2:]) == ["code_cleared", "status"]
    code = next(e for e in events if e["kind"] == "code")
    assert code["device_id"] == DEVICE and code["topic"] == f"test/{DEVICE}/auth/code"
    assert code["payload"]["user_code"] == "F4XQ9ZRTL"
    later = next(e for e in events[2:] if e["kind"] == "status")
    assert (later["payload"]["state"], later["payload"]["account"]) == ("signed_in", "ada@contoso.example")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", code["received_at"])


@pytest.mark.parametrize("on_v5", ["refuse", "close"])
def test_watch_through_a_311_only_broker(on_v5: str, mosquitto: Broker,
                                         device: Callable[..., AgentState]) -> None:
    device(mosquitto)
    proxy = OldBrokerProxy(mosquitto.port, on_v5=on_v5)
    try:
        rc, out, err = watch(mosquitto, url=f"mqtt://127.0.0.1:{proxy.port}")
        assert rc == 0, err
        assert "CODE F4XQ9ZRTL" in out and proxy.refused_v5 == 1
    finally:
        proxy.close()


def test_watch_timeout_without_events_exits_0(mosquitto: Broker) -> None:
    t0 = time.monotonic()
    rc, out, err = watch(mosquitto, timeout_s=0.3, count=None)
    assert (rc, out, err) == (0, "", "")
    assert time.monotonic() - t0 < 1.5


def test_watch_unknown_ca_is_one_line_exit_1(mosquitto_tls: Broker, other_ca: TlsFiles) -> None:
    rc, out, err = watch(mosquitto_tls, ca_file=str(other_ca.ca_file))
    assert rc == 1 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: TLS: the certificate of 127.0.0.1:") and "check --ca-file" in err


def test_watch_refused_credentials(mosquitto_tls: Broker, tmp_path: Path) -> None:
    wrong = tmp_path / "pw"
    wrong.write_text("nope\n")
    rc, _, err = watch(mosquitto_tls, password_file=str(wrong))
    assert rc == 1
    assert err == ("error: MQTT broker refused the credentials (135 Not authorized): "
                   "check --username/--password-file\n")


def test_watch_connection_refused_and_bad_url() -> None:
    out, err = io.StringIO(), io.StringIO()
    rc = run_watch(url=f"mqtt://127.0.0.1:{free_port()}", prefix="p", ca_file="", username="",
                   password_file="", as_json=False, timeout_s=2, out=out, err=err)
    assert rc == 1 and err.getvalue().startswith("error: connection to 127.0.0.1:") \
        and err.getvalue().count("\n") == 1
    err = io.StringIO()
    rc = run_watch(url="https://broker.example", prefix="p", ca_file="", username="", password_file="",
                   as_json=False, out=out, err=err)
    assert rc == 78 and err.getvalue() == ("config error: --url: 'https://broker.example' must look like "
                                           "mqtts://host[:port] or mqtt://host[:port]\n")


def test_watch_cli_exits_0_on_sigint(mosquitto: Broker, device: Callable[..., AgentState]) -> None:
    device(mosquitto)
    cmd = [sys.executable, "-m", "agent", "watch", "--url", mosquitto.url, "--prefix", "test"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        assert ready, "watch printed nothing within 10 s"
        assert proc.stdout.readline().startswith("greenhouse-01  ")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(3) == 0
        assert proc.stderr.read() == ""
    finally:
        proc.kill()
        proc.wait()
