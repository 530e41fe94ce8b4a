"""examples/mosquitto/ (config and ACL) on a real Mosquitto: a device can touch only its own topics.

The example config is used as shipped, with only paths and the port replaced, so the file an
admin copies is the file tested.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from agent.mqtt.publisher import MqttPublisher
from agent.mqtt.watch import run_watch
from agent.sim.tls import TlsFiles
from agent.state import AgentState
from tests.agent.test_watch import make_code
from tests.fixtures.broker import Broker, mosquitto_binary
from tests.waiting import wait_until

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "mosquitto"
USERS = {"admin": "admin-pass", "dev-a": "a-pass", "dev-b": "b-pass", "homeassistant": "ha-pass"}


class AclBroker(Broker):
    """A Broker running examples/mosquitto/mosquitto.conf (paths replaced) with its ACL."""

    def __init__(self, workdir: Path, tls: TlsFiles) -> None:
        super().__init__(mosquitto_binary(), workdir, tls=tls)
        passwd = workdir / "passwd"
        for i, (user, pw) in enumerate(USERS.items()):
            subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if i == 0 else []), str(passwd), user, pw],
                           check=True, capture_output=True)
            (workdir / f"{user}.pw").write_text(pw + "\n")
        text = (EXAMPLES / "mosquitto.conf").read_text()
        for old, new in (("listener 8883", f"listener {self.port} 127.0.0.1"),
                         ("/etc/mosquitto/certs/ca.crt", str(tls.ca_file)),
                         ("/etc/mosquitto/certs/server.crt", str(tls.cert_file)),
                         ("/etc/mosquitto/certs/server.key", str(tls.key_file)),
                         ("/etc/mosquitto/passwd", str(passwd)),
                         ("/etc/mosquitto/acl", str(EXAMPLES / "acl")),
                         ("/var/lib/mosquitto/", f"{workdir}/"),
                         ("log_dest syslog", "log_dest stderr")):
            assert old in text, old
            text = text.replace(old, new)
        if "user root" in self.config.read_text():
            text += "user root\n"
        self.config.write_text(text)

    def settings(self, user: str, **kw: object) -> object:
        return self.mqtt_settings(username=user, password_file=str(self.workdir / f"{user}.pw"),
                                  topic_prefix="device-agent", **kw)


@pytest.fixture
def acl_broker(tmp_path: Path, tls: TlsFiles) -> Iterator[AclBroker]:
    broker = AclBroker(tmp_path / "acl-broker", tls)
    broker.start()
    yield broker
    broker.kill()


class Client:
    """A plain paho client logged in as ``user``; records what it receives and publish outcomes."""

    def __init__(self, broker: AclBroker, user: str, topics: list[str]) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.refused: list[int] = []
        self.subacks: list[list[int]] = []
        done = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.c.tls_set(ca_certs=broker.ca_file)
        self.c.username_pw_set(user, USERS[user])
        self.c.on_message = lambda c, u, m: self.got.append((m.topic, bytes(m.payload)))
        self.c.on_publish = lambda c, u, mid, rc, p: self.refused.append(mid) if rc.is_failure else None

        def on_subscribe(c: mqtt.Client, u: object, mid: int, rcs: list, p: object) -> None:
            self.subacks.append([r.value for r in rcs])
            done.set()

        self.c.on_subscribe = on_subscribe
        self.c.connect("127.0.0.1", broker.port)
        self.c.loop_start()
        if topics:
            self.c.subscribe([(t, 1) for t in topics])
            assert done.wait(5)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> bool:
        """True when the broker accepted it (MQTT 5 PUBACK without an error reason)."""
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(5)
        time.sleep(0.05)
        return info.mid not in self.refused

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_device_a_cannot_read_forge_or_command_device_b(acl_broker: AclBroker) -> None:
    commands_b: list[str] = []
    state_a, state_b = AgentState(), AgentState()
    a = MqttPublisher(acl_broker.settings("dev-a", homeassistant=True), "dev-a", state_a, {}, "1.0")
    b = MqttPublisher(acl_broker.settings("dev-b"), "dev-b", state_b,
                      {"renew_code": lambda: commands_b.append("renew_code")}, "1.0")
    a.start()
    b.start()
    admin = Client(acl_broker, "admin", ["device-agent/#"])
    try:
        wait_until(lambda: a.connected and b.connected, what="both devices connected")
        state_b.code_issued(make_code(900, "BBBBBBBBB"))
        wait_until(lambda: any(t == "device-agent/dev-b/auth/code" and p for t, p in admin.got),
                   what="admin sees B's code")
        # A (as a plain client with A's login) tries to read B's code and commands
        spy = Client(acl_broker, "dev-a", ["device-agent/dev-b/auth/code", "device-agent/+/status",
                                           "device-agent/#"])
        try:
            assert not spy.publish("device-agent/dev-b/status", b'{"state":"signed_in","account":"mallory"}',
                                   retain=True)
            assert not spy.publish("device-agent/dev-b/cmd", b'{"action":"renew_code"}')
            assert not spy.publish("device-agent/dev-a/other", b"x")          # nothing else under its id
            time.sleep(0.3)
            assert [t for t, _ in spy.got if not t.startswith("device-agent/dev-a/")] == []
            assert not any(b"BBBBBBBBB" in p for _, p in spy.got)
        finally:
            spy.close()
        assert commands_b == []
        assert json.loads([p for t, p in admin.got if t == "device-agent/dev-b/status"][-1])["state"] == "signing_in"
        # A's own topics work, Home Assistant discovery included
        assert any(t == "device-agent/dev-a/status" for t, _ in admin.got)
        # the admin commands B, and may publish nothing else
        admin.got.clear()
        assert admin.publish("device-agent/dev-b/cmd", b'{"action":"renew_code"}')
        wait_until(lambda: commands_b == ["renew_code"], what="B ran the admin's command")
        wait_until(lambda: any(t == "device-agent/dev-b/cmd/result" for t, _ in admin.got), what="result")
        assert not admin.publish("device-agent/dev-b/status", b'{"state":"offline"}', retain=True)
    finally:
        admin.close()
        a.stop()
        b.stop()


def test_device_gets_its_commands_and_ha_discovery_through_the_acl(acl_broker: AclBroker) -> None:
    ran: list[str] = []
    state = AgentState()
    a = MqttPublisher(acl_broker.settings("dev-a", homeassistant=True), "dev-a", state,
                      {"flush": lambda: ran.append("flush")}, "1.0")
    a.start()
    try:
        wait_until(lambda: a.connected, what="connected")
        watcher = Client(acl_broker, "admin", ["device-agent/dev-a/cmd/result"])
        try:
            assert watcher.publish("device-agent/dev-a/cmd", b'{"action":"flush"}')
            wait_until(lambda: ran == ["flush"] and watcher.got, what="command and result")
        finally:
            watcher.close()
        ha = Client(acl_broker, "homeassistant", ["homeassistant/device/+/config", "device-agent/+/status"])
        try:
            wait_until(lambda: {t for t, _ in ha.got} == {"homeassistant/device/dev-a/config",
                                                           "device-agent/dev-a/status"}, what="HA's view")
            ha.got.clear()
            assert ha.publish("homeassistant/status", b"online")        # HA restarted
            wait_until(lambda: any(t == "homeassistant/device/dev-a/config" for t, _ in ha.got),
                       what="discovery re-sent through the ACL")
        finally:
            ha.close()
    finally:
        a.stop()


def test_watch_works_with_the_admin_account(acl_broker: AclBroker) -> None:
    state = AgentState()
    a = MqttPublisher(acl_broker.settings("dev-a"), "dev-a", state, {}, "1.0")
    a.start()
    try:
        state.code_issued(make_code(900, "AAAAAAAAA"))
        wait_until(lambda: a.connected, what="connected")
        out, err = io.StringIO(), io.StringIO()
        time.sleep(0.3)
        rc = run_watch(url=acl_broker.url, prefix="device-agent", ca_file=acl_broker.ca_file, username="admin",
                       password_file=str(acl_broker.workdir / "admin.pw"), as_json=False, count=2,
                       timeout_s=5, out=out, err=err)
        assert rc == 0, err.getvalue()
        assert re.search(r"dev-a  CODE AAAAAAAAA", out.getvalue()) and "dev-a  signing_in" in out.getvalue()
        # a device's login cannot watch the fleet: it sees at most itself
        out = io.StringIO()
        run_watch(url=acl_broker.url, prefix="device-agent", ca_file=acl_broker.ca_file, username="dev-b",
                  password_file=str(acl_broker.workdir / "dev-b.pw"), as_json=False, timeout_s=1.5,
                  out=out, err=io.StringIO())
        assert "AAAAAAAAA" not in out.getvalue() and "dev-a" not in out.getvalue()
    finally:
        a.stop()


