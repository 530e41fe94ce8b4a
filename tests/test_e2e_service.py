"""`device-agent run` as systemd would run it: fake GPIO, png panel, real mosquitto, simulated IdP and API.

What a person notices: the code on the panel (its QR decodes to the sign-in URL), on MQTT and in
the journal; after approval readings reach the API; SIGTERM stops it within 2 s with exit 0.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from agent.sim.api import SimApi
from tests.agentproc import AgentProcess, write_config
from tests.fixtures.broker import Subscriber
from tests.waiting import wait_until

DEVICE = "e2e-01"
PREFIX = "fleet"


def base_config(tmp_path: Path, idp: Any, api: Any, tls: Any, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "device": {"id": DEVICE, "state_dir": str(tmp_path / "state")},
        "auth": {"client_id": "sim-device-agent", "authority": idp.authority, "instance_discovery": False,
                 "scopes": ["api://telemetry/Readings.Write"], "ca_file": str(tls.ca_file), "timeout_s": 5},
        "display": {"driver": "png", "path": str(tmp_path / "screen.png"), "sleep_after_s": 0},
        "gpio": {"backend": "fake", "button": 17, "led": 27},
        "sensors": [{"name": "temp", "type": "simulated", "interval_s": 0.2, "waveform": "sine",
                     "period_s": 10.0}],
        "upload": {"sink": "http", "url": api.url, "ca_file": str(tls.ca_file), "interval_s": 0.5},
    }
    cfg.update(extra)
    return cfg


def decode_qr(path: Path) -> str:
    import zxingcpp

    img = Image.open(path).convert("L")
    # A phone does not try the inverted image first: neither do we.
    results = zxingcpp.read_barcodes(img, try_invert=False)
    assert results, f"no QR code readable on {path}"
    return str(results[0].text)




@pytest.mark.slow
def test_code_everywhere_then_readings_then_clean_stop(tmp_path: Path, idp: Any, idp_api: SimApi, tls: Any,
                                                       mosquitto: Any) -> None:
    cfg = base_config(tmp_path, idp, idp_api, tls,
                      mqtt={"url": mosquitto.url, "topic_prefix": PREFIX, "keepalive_s": 5})
    config = write_config(tmp_path / "config.toml", cfg)
    sub = Subscriber(mosquitto, [f"{PREFIX}/{DEVICE}/#"])
    agent = AgentProcess(config)
    try:
        screen = tmp_path / "screen.png"
        wait_until(screen.exists, 10, "the png panel")          # a 'starting' screen exists from start
        user_code = idp.wait_for_code(timeout_s=20)

        # The journal: user code and URI at INFO.
        agent.wait_for_line(lambda line: user_code in line and idp.devicelogin_url in line, timeout_s=2)
        # MQTT: the retained code message for admins.
        msg = sub.next(5, match=lambda m: m.topic.endswith("/auth/code") and bool(m.payload))
        code_msg = json.loads(msg.payload)
        assert code_msg["user_code"] == user_code
        assert code_msg["verification_uri"] == idp.devicelogin_url
        assert "verification_uri_complete" not in code_msg      # Entra does not send one
        assert msg.expiry_s is not None and 0 < msg.expiry_s <= 900
        # The panel: the QR holds exactly the verification URI.
        assert wait_until(lambda: _qr_or_none(screen), 5, "a QR code on the panel") == idp.devicelogin_url

        idp.approve(user_code)
        agent.wait_for_line(lambda line: "signed in" in line.lower(), timeout_s=15)
        cleared = sub.next(5, match=lambda m: m.topic.endswith("/auth/code") and not m.payload)
        assert cleared.retain or cleared.payload == b""
        wait_until(lambda: len(idp_api.seqs(DEVICE)) >= 5, 15, "readings at the API")
        seqs = sorted(idp_api.seqs(DEVICE))
        assert seqs[:5] == [1, 2, 3, 4, 5]
        status = sub.next(5, match=lambda m: m.topic.endswith("/status")
                          and json.loads(m.payload or b"{}").get("state") == "signed_in")
        assert json.loads(status.payload)["account"] == "ada@contoso.example"

        rc, elapsed = agent.terminate()
        assert rc == 0, agent.output[-3000:]
        assert elapsed < 2.0, f"stop took {elapsed:.2f} s"
        offline = sub.next(5, match=lambda m: m.topic.endswith("/status")
                           and json.loads(m.payload or b"{}").get("state") == "offline")
        assert offline.retain is not None
        # No secret anywhere a person or another process can read.
        _assert_no_tokens(tmp_path / "state", agent.output)
    finally:
        sub.close()
        agent.close()


def _qr_or_none(path: Path) -> str | None:
    try:
        return decode_qr(path)
    except (AssertionError, OSError, ValueError):
        return None


def _assert_no_tokens(state_dir: Path, output: str) -> None:
    cache = json.loads((state_dir / "token_cache.json").read_text())
    secrets = [v["secret"] for kind in ("AccessToken", "RefreshToken", "IdToken")
               for v in cache.get(kind, {}).values()]
    assert secrets, "the token cache holds no tokens"
    assert oct((state_dir / "token_cache.json").stat().st_mode & 0o777) == "0o600"
    for f in state_dir.iterdir():
        if f.name == "token_cache.json" or not f.is_file():
            continue
        data = f.read_bytes()
        for s in secrets:
            assert s.encode() not in data, f"a token leaked into {f.name}"
    for s in secrets:
        assert s not in output, "a token leaked into the log"


@pytest.mark.slow
def test_status_and_sign_out_while_running(tmp_path: Path, idp: Any, idp_api: SimApi, tls: Any) -> None:
    idp.auto_approve_after_s = 0.0
    config = write_config(tmp_path / "config.toml", base_config(tmp_path, idp, idp_api, tls))
    agent = AgentProcess(config)
    try:
        agent.wait_for_line(lambda line: "signed in" in line.lower(), timeout_s=20)

        def status() -> dict[str, Any]:
            out = subprocess.run([sys.executable, "-m", "agent", "status", "--json", "--config", str(config)],
                                 capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, out.stderr
            return json.loads(out.stdout)

        doc = wait_until(lambda: (d := status()).get("state") == "signed_in" and d, 5, "status signed_in")
        assert doc["running"] is True and doc["account"] == "ada@contoso.example"
        assert set(doc["outbox"]) == {"pending", "dead", "dropped"}
        first_code = idp.requests and len([r for r in idp.requests if r.path.endswith("/devicecode")])

        out = subprocess.run([sys.executable, "-m", "agent", "sign-out", "--config", str(config)],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        # The running service signs out by itself and asks for a new code.
        wait_until(lambda: len([r for r in idp.requests if r.path.endswith("/devicecode")]) > first_code,
                 15, "a new device code after sign-out")
        rc, _ = agent.terminate()
        assert rc == 0
    finally:
        agent.close()


def test_bad_config_exits_78_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[auth]\nclient_id = "x"\nauthority = "http://login.example.com/t"\nscopes = ["a"]\n'
                      '[upload]\nurl = "https://api.example.com/r"\n')
    out = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(config)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 78
    assert out.stderr.strip().count("\n") == 0, out.stderr
    assert out.stderr.startswith(f"config error: {config}: auth.authority:")
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_watchdog_only_while_sampler_advances(tmp_path: Path, idp: Any, idp_api: SimApi, tls: Any) -> None:
    """sd_notify: READY=1 once up, WATCHDOG=1 while the sampler advances, none once it hangs.

    The hang is real: a cpu_temperature sensor reading a FIFO that nobody writes blocks forever.
    """
    fifo = tmp_path / "thermal"
    os.mkfifo(fifo)
    cfg = base_config(tmp_path, idp, idp_api, tls)
    cfg["sensors"] = [{"name": "cpu", "type": "cpu_temperature", "path": str(fifo), "interval_s": 6.0}]
    config = write_config(tmp_path / "config.toml", cfg)
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.2)
    agent = AgentProcess(config, env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "2000000"})
    events: list[tuple[float, str]] = []
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 12:
            try:
                data = sock.recv(4096).decode()
            except TimeoutError:
                continue
            events.extend((time.monotonic() - t0, f) for f in data.split("\n"))
        rc, _ = agent.terminate()
    finally:
        sock.close()
        agent.close()
    names = [e for _, e in events]
    assert "READY=1" in names, names
    assert any(e.startswith("STATUS=") for e in names)
    pings = [t for t, e in events if e == "WATCHDOG=1"]
    assert pings, "no watchdog pings while the sampler was advancing"
    # The first read at t≈0 blocks for ever; pings must stop within the stale window (5 s) and
    # not come back, so systemd would restart the hung service.
    assert max(pings) < 8.0, f"watchdog still fed at {max(pings):.1f} s with the sampler hung"
    assert rc == 0
