"""The unit file passes systemd's own checks and stays hardened (exposure <= 2.5)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.require import need_binary

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "device-agent.service"
MAX_EXPOSURE = 2.5


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointed at this checkout's entry point (verify checks it exists)."""
    exe = Path(sys.executable).with_name("device-agent")
    text = UNIT.read_text().replace("/opt/device-agent/bin/device-agent", str(exe))
    out = tmp_path / "device-agent.service"
    out.write_text(text)
    return out


def test_unit_verifies(unit_copy: Path) -> None:
    analyze = need_binary("systemd-analyze", "apt-get install systemd")
    res = subprocess.run([analyze, "verify", str(unit_copy)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "device-agent.service" not in res.stderr, res.stderr


def test_security_exposure_at_most_2_5(unit_copy: Path) -> None:
    analyze = need_binary("systemd-analyze", "apt-get install systemd")
    res = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(unit_copy)],
                         capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", res.stdout)
    assert m, res.stdout[-2000:] + res.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE, res.stdout


def test_unit_promises() -> None:
    """What the service relies on: notify + watchdog, state dir, no restart loop on a bad config."""
    text = UNIT.read_text()
    for line in ("Type=notify", "StateDirectory=device-agent", "RuntimeDirectory=device-agent",
                 "ConfigurationDirectory=device-agent", "RestartPreventExitStatus=78",
                 "SupplementaryGroups=gpio i2c spi", "DevicePolicy=closed", "User=device-agent"):
        assert re.search(rf"^{re.escape(line)}$", text, re.M), line
    assert re.search(r"^WatchdogSec=\d+", text, re.M)
    assert "time-sync.target" in text and "time-wait-sync" not in text.split("[Service]")[0].replace(
        "systemd-time-wait-sync is deliberately not required", "")
