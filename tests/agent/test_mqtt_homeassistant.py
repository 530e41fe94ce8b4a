"""Home Assistant device discovery and `mqtt-forget`, against a real Mosquitto and MqttPublisher."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.mqtt.publisher import MqttPublisher
from agent.state import AgentState, OutboxCounts
from tests.fixtures.broker import Broker, Subscriber, retained
from tests.waiting import wait_until

DEVICE = "greenhouse-01"
DISCOVERY = f"homeassistant/device/{DEVICE}/config"
STATUS = f"test/{DEVICE}/status"


def start(broker: Broker, **settings: Any) -> tuple[MqttPublisher, AgentState]:
    state = AgentState()
    state.update(outbox=OutboxCounts(pending=3, dead=1))
    n = MqttPublisher(broker.mqtt_settings(homeassistant=True, **settings), DEVICE, state, {}, "1.2.3")
    n.start()
    wait_until(lambda: n.connected, what="connected")
    return n, state


def fields_used(template: str) -> set[str]:
    return set(re.findall(r"value_json\.get\('(\w+)'\)", template)) | \
        set(re.findall(r"value_json\.(\w+)(?![\w(])", template)) - {"get"}


def test_device_discovery_message(mosquitto: Broker) -> None:
    n, state = start(mosquitto)
    try:
        msg = wait_until(lambda: retained(mosquitto, DISCOVERY, 0.1), what="discovery retained")
        doc = json.loads(msg.payload)
        assert doc["dev"]["ids"] == ["device_agent_greenhouse_01"] and doc["dev"]["name"] == DEVICE
        assert doc["dev"]["sw"] == "1.2.3" and doc["o"] == {"name": "device-agent", "sw": "1.2.3"}
        assert doc["state_topic"] == STATUS
        [avail] = doc["availability"]
        assert avail["topic"] == STATUS and avail["payload_not_available"] == "offline"
        cmps = doc["cmps"]
        assert set(cmps) == {"state", "account", "error", "outbox_pending", "outbox_dead", "outbox_dropped",
                             "oldest_pending", "last_upload", "clock", "storage", "signin_lapses"}
        assert all(c["p"] == "sensor" and c["unique_id"].startswith("device_agent_greenhouse_01_")
                   for c in cmps.values())
        assert len({c["unique_id"] for c in cmps.values()}) == len(cmps)
        # every template reads a field the device really publishes (optional ones via .get)
        status = json.loads(retained(mosquitto, STATUS).payload)   # type: ignore[union-attr]
        for key, c in cmps.items():
            for name in fields_used(c["value_template"]):
                if ".get(" not in c["value_template"]:
                    assert name in status, (key, name)
        assert cmps["outbox_dead"]["value_template"] == "{{ value_json.outbox.dead }}" and status["outbox"]["dead"] == 1
        assert cmps["last_upload"]["device_class"] == "timestamp"
        assert cmps["oldest_pending"]["device_class"] == "duration"
        # every status field has a component (the version is the device's "sw")
        read = set().union(*(fields_used(c["value_template"]) for c in cmps.values()))
        assert set(status) - {"version"} <= read, set(status) - {"version"} - read
        assert cmps["signin_lapses"]["unit_of_measurement"] == "d"
        assert cmps["signin_lapses"]["value_template"] == "{{ value_json.get('signin_lapses_in_days') }}"
    finally:
        n.stop()
    # availability: the clean stop left the status "offline", which the template maps to offline
    assert json.loads(retained(mosquitto, STATUS).payload)["state"] == "offline"   # type: ignore[union-attr]


def test_discovery_resent_when_home_assistant_comes_online(mosquitto: Broker) -> None:
    n, _ = start(mosquitto)
    sub = Subscriber(mosquitto, [DISCOVERY])
    try:
        sub.next(match=lambda m: m.retain)                    # what the broker holds
        assert sub.drain(0.3) == []
        sub.publish("homeassistant/status", b"offline")
        assert sub.drain(0.3) == []                           # only "online" asks for discovery
        sub.publish("homeassistant/status", b"online")        # HA's birth message after a restart
        again = sub.next(2.0)
        assert json.loads(again.payload)["dev"]["name"] == DEVICE
    finally:
        sub.close()
        n.stop()


def test_no_discovery_unless_opted_in(mosquitto: Broker) -> None:
    state = AgentState()
    n = MqttPublisher(mosquitto.mqtt_settings(), DEVICE, state, {}, "1.2.3")
    n.start()
    try:
        wait_until(lambda: retained(mosquitto, STATUS, 0.05), what="status")
        assert retained(mosquitto, DISCOVERY) is None
    finally:
        n.stop()


def write_config(tmp_path: Path, broker: Broker) -> Path:
    cfg = tmp_path / "config.toml"
    cfg.write_text(f"""
[device]
id = "{DEVICE}"
state_dir = "{tmp_path / 'state'}"

[auth]
client_id = "11111111-2222-3333-4444-555555555555"
authority = "https://login.microsoftonline.com/contoso.onmicrosoft.com"
scopes = ["api://telemetry/Readings.Write"]

[upload]
url = "https://api.example/readings"

[mqtt]
url = "{broker.url}"
topic_prefix = "test"
homeassistant = true
""")
    return cfg


@pytest.mark.parametrize("via_311", [False, True])
def test_mqtt_forget_clears_status_code_and_discovery(via_311: bool, mosquitto: Broker,
                                                      tmp_path: Path) -> None:
    from tests.fixtures.broker import OldBrokerProxy

    n, state = start(mosquitto)
    from tests.agent.test_watch import make_code

    state.code_issued(make_code(900))
    wait_until(lambda: retained(mosquitto, f"test/{DEVICE}/auth/code", 0.05), what="code retained")
    n._stopping.set()          # a power cut: nothing cleared, the broker keeps what it had
    assert retained(mosquitto, DISCOVERY) is not None
    proxy = OldBrokerProxy(mosquitto.port) if via_311 else None
    try:
        url = f"mqtt://127.0.0.1:{proxy.port}" if proxy else mosquitto.url
        cfg = write_config(tmp_path, mosquitto)
        cfg.write_text(cfg.read_text().replace(mosquitto.url, url))
        out = subprocess.run([sys.executable, "-m", "agent", "mqtt-forget", "--config", str(cfg)],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == [f"cleared test/{DEVICE}/status", f"cleared test/{DEVICE}/auth/code",
                                           f"cleared {DISCOVERY}"]
        for topic in (STATUS, f"test/{DEVICE}/auth/code", DISCOVERY):
            assert retained(mosquitto, topic) is None, topic
    finally:
        if proxy:
            proxy.close()
        n.stop()


def test_homeassistant_config_keys(mosquitto: Broker, tmp_path: Path) -> None:
    from agent import config
    from agent.errors import ConfigError

    cfg = write_config(tmp_path, mosquitto)
    settings = config.load(cfg)
    assert settings.mqtt is not None and settings.mqtt.homeassistant is True
    assert settings.mqtt.homeassistant_prefix == "homeassistant"
    cfg.write_text(cfg.read_text().replace("homeassistant = true", 'homeassistant_prefix = "ha/#"'))
    with pytest.raises(ConfigError, match="mqtt.homeassistant_prefix"):
        config.load(cfg)
