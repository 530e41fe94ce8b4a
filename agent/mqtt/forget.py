"""`device-agent mqtt-forget`: remove a retired device's retained messages from the broker.

A retained status stays on the broker forever: a device taken out of service would show as
"offline" in every admin's ``watch`` (and as an unavailable device in Home Assistant) until its
topics are cleared. Clearing is publishing a zero-length retained message on each.
"""

from __future__ import annotations

import sys
import threading
from typing import TextIO

import paho.mqtt.client as mqtt

from agent.config import Settings
from agent.errors import ConfigError, NotifyError
from agent.mqtt.connection import (
    credentials_message,
    describe_connect_error,
    new_client,
    parse_broker_url,
    read_password,
    shutdown_client,
    tls_context,
)
from agent.mqtt.homeassistant import discovery_topic

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 78


def retained_topics(settings: Settings) -> list[str]:
    """Every retained topic the agent may have left for this device (discovery even if now off)."""
    m = settings.mqtt
    assert m is not None
    base = f"{m.topic_prefix}/{settings.device.id}"
    return [f"{base}/status", f"{base}/auth/code", discovery_topic(m.homeassistant_prefix, settings.device.id)]


def run_forget(settings: Settings, *, timeout_s: float = 10.0, out: TextIO | None = None,
               err: TextIO | None = None) -> int:
    """Clear the topics; 0 when the broker acknowledged every clear, 1 otherwise, 78 no [mqtt]."""
    out = out or sys.stdout
    err = err or sys.stderr
    m = settings.mqtt
    if m is None:
        print(f"config error: {settings.path}: mqtt: no [mqtt] section, nothing to forget", file=err)
        return EXIT_CONFIG
    try:
        address = parse_broker_url(m.url)
        ctx = tls_context(m.ca_file, m.client_cert, m.client_key) if address.tls else None
        password = read_password(m.password_file) if m.password_file else None
    except (ConfigError, NotifyError) as e:
        print(f"config error: {settings.path}: {e}", file=err)
        return EXIT_CONFIG
    topics = retained_topics(settings)
    for protocol in (mqtt.MQTTv5, mqtt.MQTTv311):
        answered = threading.Event()
        outcome: list[int] = []

        def on_connect(client: mqtt.Client, userdata: object, flags: object, reason: object,
                       properties: object, outcome: list[int] = outcome,
                       answered: threading.Event = answered) -> None:
            outcome.append(getattr(reason, "value", 0))
            answered.set()

        client = new_client(protocol, f"device-agent-{settings.device.id}-forget", address, ctx,
                            m.username, password)
        client.on_connect = on_connect
        refused: set[int] = set()
        client.on_publish = (lambda c, u, mid, reason, props, refused=refused:
                             refused.add(mid) if getattr(reason, "is_failure", False) else None)
        try:
            client.connect(address.host, address.port, keepalive=30)
        except OSError as e:
            print(f"error: {describe_connect_error(e, address, ca_hint='mqtt.ca_file')}", file=err)
            return EXIT_FAILURE
        client.loop_start()
        try:
            if not answered.wait(timeout_s):
                print(f"error: {address} did not answer the MQTT CONNECT within {timeout_s:g} s", file=err)
                return EXIT_FAILURE
            rc = outcome[0]
            if rc == 132 and protocol == mqtt.MQTTv5:
                continue
            if rc in (134, 135):
                print(f"error: {credentials_message(rc, 'mqtt.username/password_file')}", file=err)
                return EXIT_FAILURE
            if rc:
                print(f"error: {address} refused the connection ({rc})", file=err)
                return EXIT_FAILURE
            infos = [client.publish(t, b"", qos=1, retain=True) for t in topics]
            for t, info in zip(topics, infos, strict=True):
                info.wait_for_publish(timeout_s)
                if not info.is_published() or info.mid in refused:
                    print(f"error: {address} did not accept clearing {t} (check the broker's ACL)", file=err)
                    return EXIT_FAILURE
            for t in topics:
                print(f"cleared {t}", file=out)
            return EXIT_OK
        finally:
            shutdown_client(client, 1.0)
    print(f"error: {address} refused both MQTT 5 and 3.1.1", file=err)
    return EXIT_FAILURE
