"""When the tenant blocks device code flow: `device-agent run` as systemd runs it (png panel, real
mosquitto, simulated Entra ID and API over HTTPS).

1. Conditional Access answers AADSTS53003 to every device code: the panel, the journal and MQTT
   say what to do (use auth.flow = "client_certificate").
2. With the certificate flow the box signs in as an app, readings reach the API, and a
   certificate that expires soon is a warning on the panel, in status and on MQTT.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageChops

from agent.panel import screens
from agent.panel.observer import SHIFTS, _shifted
from agent.signin.aadsts import DEVICE_CODE_BLOCKED, DEVICE_CODE_BLOCKED_PANEL
from agent.sim.api import SimApi
from agent.sim.appcreds import make_certificate
from agent.state import Snapshot
from tests.agentproc import AgentProcess, write_config
from tests.fixtures.broker import Subscriber
from tests.test_e2e_service import DEVICE, PREFIX, base_config
from tests.waiting import wait_until


def shows(path: Path, expected: Image.Image) -> bool:
    """Whether the png panel shows ``expected`` (allowing the panel's burn-in pixel shift)."""
    try:
        with Image.open(path) as img:
            got = img.convert("1")
            got.load()
    except (OSError, ValueError):
        return False
    return any(ImageChops.difference(got.convert("L"), _shifted(expected, s).convert("L")).getbbox() is None
               for s in SHIFTS)


def status_where(sub: Subscriber, pred: Any, timeout_s: float = 10) -> dict[str, Any]:
    msg = sub.next(timeout_s, match=lambda m: m.topic.endswith("/status") and bool(m.payload)
                   and pred(json.loads(m.payload)))
    return dict(json.loads(msg.payload))


@pytest.mark.slow
def test_device_code_blocked_by_policy_says_use_the_certificate_flow(tmp_path: Path, idp: Any,
                                                                     idp_api: SimApi, tls: Any,
                                                                     mosquitto: Any) -> None:
    idp.set(device_code_blocked=True)
    cfg = base_config(tmp_path, idp, idp_api, tls,
                      mqtt={"url": mosquitto.url, "topic_prefix": PREFIX, "keepalive_s": 5})
    sub = Subscriber(mosquitto, [f"{PREFIX}/{DEVICE}/#"])
    agent = AgentProcess(write_config(tmp_path / "config.toml", cfg))
    try:
        line = agent.wait_for_line(lambda ln: DEVICE_CODE_BLOCKED in ln, timeout_s=20)
        assert "ERROR" in line or "error" in line.lower()
        status = status_where(sub, lambda s: s.get("error"))
        assert status["state"] == "error" and status["error"] == DEVICE_CODE_BLOCKED
        # The panel carries the short form of the same remedy (one short line on 128x64).
        expected = screens.render(Snapshot(phase="error", error=DEVICE_CODE_BLOCKED,
                                           error_panel=DEVICE_CODE_BLOCKED_PANEL), 0.0)
        wait_until(lambda: shows(tmp_path / "screen.png", expected), 5, "the remedy on the panel")
        assert not [m for m in sub.drain() if m.topic.endswith("/auth/code") and m.payload]
        assert agent.terminate()[0] == 0
    finally:
        sub.close()
        agent.close()


@pytest.mark.slow
def test_certificate_flow_signs_in_as_app_and_warns_before_expiry(tmp_path: Path, idp: Any, idp_api: SimApi,
                                                                  tls: Any, mosquitto: Any) -> None:
    cert = make_certificate(tmp_path / "cert", DEVICE, valid_days=20)
    idp.register_certificate(cert.pem, "sim-device-agent", roles=("Readings.Write",))
    cfg = base_config(tmp_path, idp, idp_api, tls,
                      mqtt={"url": mosquitto.url, "topic_prefix": PREFIX, "keepalive_s": 5})
    cfg["auth"].update(flow="client_certificate", scopes=["api://telemetry/.default"],
                       certificate_file=str(cert.certificate_file), private_key_file=str(cert.private_key_file))
    path = write_config(tmp_path / "config.toml", cfg)
    sub = Subscriber(mosquitto, [f"{PREFIX}/{DEVICE}/#"])
    agent = AgentProcess(path)
    try:
        agent.wait_for_line(lambda ln: "signed in as app sim-device-agent" in ln, timeout_s=20)
        warning = agent.wait_for_line(lambda ln: "expires on" in ln, timeout_s=5)
        assert "WARNING" in warning and "(in 19 days): renew it (README)" in warning
        status = status_where(sub, lambda s: s.get("state") == "signed_in" and s.get("warning"))
        assert status["account"] == "app sim-device-agent" and "(in 19 days)" in status["warning"]
        wait_until(lambda: len(idp_api.seqs(DEVICE)) >= 3, 15, "readings at the API")
        assert not [q for q in idp.requests if q.path.endswith("/devicecode")]
        # The panel alternates: status, "signed in as app", the warning.
        identity = screens.render(Snapshot(phase="signed_in", account="app sim-device-agent"), 0.0, 1)
        wait_until(lambda: shows(tmp_path / "screen.png", identity), 15, "'signed in as app' on the panel")
        warn_page = screens.render_notice(status["warning"], title="Warning")
        wait_until(lambda: shows(tmp_path / "screen.png", warn_page), 15, "the warning on the panel")
        # `device-agent status` says it too.
        out = subprocess.run([sys.executable, "-m", "agent", "status", "--config", str(path)],
                             capture_output=True, text=True, timeout=30)
        assert "warning:" in out.stdout and "renew it (README)" in out.stdout, out.stdout + out.stderr
        rc, _ = agent.terminate()
        assert rc == 0, agent.output[-2000:]
        assert len([a for a in idp.app_credentials.assertions if a.accepted]) == 1
    finally:
        sub.close()
        agent.close()
