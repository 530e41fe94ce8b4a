"""`device-agent run` as a subprocess, signing in at a certified OpenID provider (oidc-provider)
the way a person would: read the QR code off the panel image, open it in Chromium, sign in;
then readings reach an API that verifies the provider's JWTs through its JWKS.

Fake GPIO and the png display stand in for the hardware; the broker is a real mosquitto.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from agent.sim.api import SimApi
from agent.sim.tls import TlsFiles
from tests.agentproc import AgentProcess, write_config
from tests.fixtures.broker import Broker, Subscriber
from tests.interop.browser import Browser
from tests.interop.peers import OidcProvider

pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.broker]

DEVICE = "interop-e2e"


def read_qr(png: Path) -> str | None:
    """The text of the QR code on the panel image, as a phone camera would read it.

    ``try_invert=False``: a phone does not retry with inverted colours, so neither do we
    (the default hides a polarity bug: docs/DESIGN.md#what-the-libraries-and-peers-do). The
    128x64 image is scaled up 4x with nearest-neighbour, as a camera sees a physical panel much
    larger than its pixels.
    """
    import zxingcpp
    from PIL import Image

    try:
        with Image.open(png) as img:
            img.load()
            frame = img.convert("L")
    except (OSError, SyntaxError):
        return None   # mid-replace or not written yet
    frame = frame.resize((frame.width * 4, frame.height * 4), Image.Resampling.NEAREST)
    found = zxingcpp.read_barcodes(frame, formats=zxingcpp.BarcodeFormat.QRCode, try_invert=False)  # type: ignore[arg-type]
    return found[0].text if found else None


def wait_for_qr(png: Path, proc: AgentProcess, timeout_s: float = 20.0) -> str:
    """Poll the panel image until it holds a QR code; fail with the agent's log otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if png.exists() and (text := read_qr(png)):
            return text
        if proc.proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"no QR code on {png} within {timeout_s} s; agent output:\n{proc.output[-3000:]}")


@pytest.fixture
def jwks_api(tls: TlsFiles, oidc_provider: OidcProvider) -> Iterator[SimApi]:
    """The telemetry API trusting oidc-provider's signing keys (fetched from its JWKS)."""
    api = SimApi(tls, jwks_url=oidc_provider.jwks_url, issuer=oidc_provider.issuer,
                 audience=oidc_provider.resource, ca_file=str(tls.ca_file),
                 required_scope=oidc_provider.scope).start()
    try:
        yield api
    finally:
        api.stop()


def agent_config(tmp_path: Path, provider: OidcProvider, api: SimApi, broker: Broker,
                 tls: TlsFiles) -> tuple[Path, Path]:
    screen = tmp_path / "screen.png"
    cfg: dict[str, Any] = {
        "device": {"id": DEVICE, "state_dir": str(tmp_path / "state")},
        "auth": {"client_id": provider.client_id, "oidc_authority": provider.issuer,
                 "scopes": [provider.scope], "ca_file": str(tls.ca_file), "timeout_s": 10},
        "display": {"driver": "png", "path": str(screen)},
        "gpio": {"backend": "fake"},
        "mqtt": {"url": broker.url},
        "sensors": [{"name": "greenhouse", "type": "simulated", "interval_s": 0.2}],
        "upload": {"sink": "http", "url": api.url, "ca_file": str(tls.ca_file), "interval_s": 0.5},
        "log": {"level": "info"},
    }
    return write_config(tmp_path / "config.toml", cfg), screen


def test_qr_on_the_panel_signs_the_device_in_and_readings_reach_the_api(
        tmp_path: Path, tls: TlsFiles, oidc_provider: OidcProvider, browser: Browser,
        jwks_api: SimApi, mosquitto: Broker) -> None:
    config, screen = agent_config(tmp_path, oidc_provider, jwks_api, mosquitto, tls)
    code_topic = f"device-agent/{DEVICE}/auth/code"
    watcher = Subscriber(mosquitto, [code_topic])
    proc = AgentProcess(config)
    try:
        url = wait_for_qr(screen, proc)
        # The QR holds exactly the complete URI the provider sent.
        assert url.startswith(f"{oidc_provider.issuer}/device?user_code=")
        user_code = parse_qs(urlsplit(url).query)["user_code"][0]
        proc.wait_for_line(lambda line: user_code in line, timeout_s=5)   # the journal has it too
        announced = watcher.next(timeout_s=5, match=lambda m: bool(m.payload))
        body = json.loads(announced.payload)
        assert body["user_code"] == user_code and body["verification_uri_complete"] == url

        # A person scans the QR, compares the code with the one on the panel and signs in.
        browser.sign_in_oidc(url, user_code=user_code, login="ada")

        deadline = time.monotonic() + 30
        while jwks_api.count(DEVICE) == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert jwks_api.count(DEVICE) > 0, proc.output[-3000:]
        # The code is withdrawn from MQTT once used (an empty retained message).
        watcher.next(timeout_s=5, match=lambda m: m.payload == b"")
        seqs = sorted(jwks_api.seqs(DEVICE))
        assert seqs[0] == 1
        rc, elapsed = proc.terminate()
        assert rc == 0 and elapsed < 2.0
    finally:
        proc.close()
        watcher.close()
    assert "eyJ" not in proc.output   # no JWT in the logs
