"""Home Assistant MQTT discovery for one device, as pure code (opt-in: ``mqtt.homeassistant``).

One device-based discovery message (``<H>/device/<device_id>/config``, retained) declares every
entity at once: a ``dev`` block, the ``o`` (origin) block, shared ``state_topic`` = the device's
retained status, and ``cmps`` with one sensor per status field. Availability comes from the same
status topic: the Last Will (and a clean stop) make its state ``offline``. Templates use
``value_json.get(...)`` so fields an older agent does not send show as unknown, not as errors.
"""

from __future__ import annotations

import json
from typing import Any

ORIGIN = "device-agent"
AVAILABLE = "{{ 'offline' if value_json.state == 'offline' else 'online' }}"

# component id -> (name, value template, extra options)
_SENSORS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "state": ("State", "{{ value_json.state }}", {"icon": "mdi:account-key"}),
    "account": ("Account", "{{ value_json.get('account') or 'none' }}", {"icon": "mdi:account"}),
    "error": ("Error", "{{ value_json.get('error') or 'none' }}",
              {"icon": "mdi:alert-circle", "entity_category": "diagnostic"}),
    "outbox_pending": ("Outbox pending", "{{ value_json.outbox.pending }}",
                       {"unit_of_measurement": "readings", "state_class": "measurement"}),
    "outbox_dead": ("Outbox dead letters", "{{ value_json.outbox.dead }}",
                    {"unit_of_measurement": "readings", "state_class": "measurement"}),
    "outbox_dropped": ("Outbox dropped", "{{ value_json.outbox.dropped }}",
                       {"unit_of_measurement": "readings", "state_class": "measurement"}),
    "oldest_pending": ("Oldest pending reading", "{{ value_json.get('oldest_pending_s') }}",
                       {"device_class": "duration", "unit_of_measurement": "s",
                        "state_class": "measurement"}),
    "last_upload": ("Last upload", "{{ value_json.get('last_upload') }}", {"device_class": "timestamp"}),
    "clock": ("Clock", "{{ value_json.get('clock') }}",
              {"icon": "mdi:clock-check", "entity_category": "diagnostic"}),
    "storage": ("Storage", "{{ value_json.get('storage') }}",
                {"icon": "mdi:sd", "entity_category": "diagnostic"}),
    "signin_lapses": ("Sign-in lapses in", "{{ value_json.get('signin_lapses_in_days') }}",
                      {"device_class": "duration", "unit_of_measurement": "d",
                       "state_class": "measurement", "icon": "mdi:timer-sand"}),
}


def discovery_topic(ha_prefix: str, device_id: str) -> str:
    return f"{ha_prefix}/device/{device_id}/config"


def birth_topic(ha_prefix: str) -> str:
    """Where Home Assistant says ``online`` when it (re)starts: discovery must be sent again."""
    return f"{ha_prefix}/status"


def discovery_payload(prefix: str, device_id: str, version: str) -> bytes:
    """The retained discovery message for ``device_id`` whose status is ``<prefix>/<id>/status``."""
    status_topic = f"{prefix}/{device_id}/status"
    uid = f"device_agent_{device_id}".replace(".", "_").replace("-", "_")
    cmps: dict[str, Any] = {}
    for key, (name, template, extra) in _SENSORS.items():
        cmps[key] = {"p": "sensor", "name": name, "unique_id": f"{uid}_{key}", "value_template": template,
                     **extra}
    doc = {
        "dev": {"ids": [uid], "name": device_id, "mf": "device-agent", "mdl": "device-agent", "sw": version},
        "o": {"name": ORIGIN, "sw": version},
        "availability": [{"topic": status_topic, "value_template": AVAILABLE,
                          "payload_available": "online", "payload_not_available": "offline"}],
        "state_topic": status_topic,
        "qos": 1,
        "cmps": cmps,
    }
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
