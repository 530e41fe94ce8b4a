"""Across brokers: devices on an edge Mosquitto, `watch` on a central one, bridged as README says.

The bridge settings under test are the README's (MQTT 5 bridge so Message Expiry crosses it,
``cleansession false`` so a code cleared while the bridge was down is not left behind).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.mqtt.fleet import Fleet
from agent.mqtt.publisher import MqttPublisher
from agent.mqtt.watch import WatchClient
from agent.state import AgentState
from tests.agent.test_watch import make_code
from tests.fixtures.broker import Broker, Subscriber, mosquitto_binary, retained
from tests.waiting import wait_until

BRIDGE = ["bridge_protocol_version mqttv50", "cleansession false", "restart_timeout 1 2"]


@pytest.fixture
def bridged(tmp_path: Path) -> Iterator[tuple[Broker, Broker]]:
    central = Broker(mosquitto_binary(), tmp_path / "central").start()
    edge = Broker(mosquitto_binary(), tmp_path / "edge")
    edge.config.write_text(edge.config.read_text() + "\n".join(
        ["connection central", f"address 127.0.0.1:{central.port}", "remote_clientid edge-1",
         "topic test/# both 1", *BRIDGE]) + "\n")
    edge.start()
    yield central, edge
    edge.kill()
    central.kill()


def view(fleet: Fleet, device: str) -> dict[str, Any]:
    return next((d.row(0) | {"raw_code": d.code} for d in fleet.devices() if d.device_id == device), {})


def test_codes_clears_statuses_and_commands_cross_the_bridge(bridged: tuple[Broker, Broker]) -> None:
    central, edge = bridged
    ran: list[str] = []
    s1, s2 = AgentState(), AgentState()
    d1 = MqttPublisher(edge.mqtt_settings(), "dev1", s1, {"flush": lambda: ran.append("flush")}, "1")
    d2 = MqttPublisher(edge.mqtt_settings(), "dev2", s2, {}, "1")
    fleet = Fleet()
    watch = WatchClient(central.url, "test", on_event=fleet.apply)
    d1.start()
    d2.start()
    try:
        wait_until(lambda: d1.connected and d2.connected, what="devices on the edge")
        s1.code_issued(make_code(900, "CODE1CODE"))
        wait_until(lambda: retained(central, "test/dev1/auth/code", 0.05), 10, what="code bridged")
        watch.connect()
        wait_until(lambda: (view(fleet, "dev1").get("code") or {}).get("user_code") == "CODE1CODE",
                   what="watch on central sees the code")
        expiry = retained(central, "test/dev1/auth/code")
        assert expiry is not None and expiry.expiry_s is not None and expiry.expiry_s <= 900   # crossed intact

        s1.signed_in("ada@contoso.example")
        wait_until(lambda: view(fleet, "dev1").get("code") is None
                   and view(fleet, "dev1")["state"] == "signed_in", what="clear and status on central")

        # a command sent on the central broker reaches the device on the edge; the result returns
        sub = Subscriber(central, ["test/dev1/cmd/result"])
        try:
            sub.publish("test/dev1/cmd", b'{"action": "flush"}')
            result = sub.next(5.0)
            assert json.loads(result.payload)["ok"] is True and ran == ["flush"]
        finally:
            sub.close()

        s2.code_issued(make_code(900, "CODE3CODE"))
        wait_until(lambda: retained(central, "test/dev2/auth/code", 0.05), 10, what="dev2 code bridged")

        # the bridge goes down (central restarts); meanwhile dev1 signs out and gets a new code,
        # dev2 signs in (its code must vanish from central too): nothing crosses until it is back
        watch.close()
        central.stop()
        s1.signed_out()
        s1.code_issued(make_code(900, "CODE2CODE"))
        s2.signed_in("bob@contoso.example")
        wait_until(lambda: retained(edge, "test/dev2/auth/code", 0.05) is None, what="dev2 cleared on edge")
        central.start()

        # the retained truth on central after the bridge reconnected: what a fresh watch sees
        def truth() -> bool:
            code1 = retained(central, "test/dev1/auth/code", 0.1)
            code2 = retained(central, "test/dev2/auth/code", 0.1)
            st2 = retained(central, "test/dev2/status", 0.1)
            return (code1 is not None and json.loads(code1.payload)["user_code"] == "CODE2CODE"
                    and code1.expiry_s is not None and code2 is None
                    and st2 is not None and json.loads(st2.payload)["state"] == "signed_in")

        wait_until(truth, 15, what="central's retained truth after the bridge reconnect")
        fresh = Fleet()
        done = threading.Event()
        late = WatchClient(central.url, "test", on_event=lambda ev: (fresh.apply(ev), done.set()))
        late.connect()
        try:
            wait_until(lambda: view(fresh, "dev2").get("state") == "signed_in"
                       and (view(fresh, "dev1").get("code") or {}).get("user_code") == "CODE2CODE",
                       what="fresh watch on central")
            assert view(fresh, "dev2").get("code") is None
        finally:
            late.close()
    finally:
        watch.close()
        d1.stop()
        d2.stop()
