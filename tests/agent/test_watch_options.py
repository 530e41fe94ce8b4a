"""`device-agent watch` options that cannot work: refused before connecting, one line, exit 78."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def watch(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "agent", "watch", *args], capture_output=True, text=True,
                          timeout=30, env=env)


@pytest.mark.parametrize(("args", "says"), [
    (["--url", "mqtt://127.0.0.1:1", "--json", "--summary"], "--json and --summary"),
    (["--url", "mqtt://127.0.0.1:1", "--prefix", "fleet/#"], "wildcards"),
    (["--url", "mqtt://127.0.0.1:1", "--prefix", "fleet/+/x"], "wildcards"),
    (["--url", "mqtt://127.0.0.1:1", "--prefix", "#"], "wildcards"),
    (["--url", "mqtt://127.0.0.1:1", "--timeout", "-1"], "--timeout"),
    (["--url", "mqtt://127.0.0.1:1", "--timeout", "nan"], "--timeout"),
    (["--url", "mqtt://broker.example.com"], "--allow-insecure"),
    (["--url", "mqtt://192.0.2.7:1883"], "--allow-insecure"),
    (["--url", "mqtt://127.0.0.1.nip.io"], "--allow-insecure"),    # a name, not loopback
])
def test_options_that_cannot_work_exit_78_with_one_line(args: list[str], says: str) -> None:
    done = watch(*args)
    assert done.returncode == 78, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: ") and says in lines[0], done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_allow_insecure_lets_plain_mqtt_to_another_host_through() -> None:
    """Not refused (78): it tries, and fails to connect to a host that is not there (1)."""
    done = watch("--url", "mqtt://192.0.2.7:1883", "--allow-insecure", "--timeout", "1")
    assert done.returncode == 1, done
    assert "config error" not in done.stderr


def test_plain_mqtt_to_loopback_needs_no_flag() -> None:
    done = watch("--url", "mqtt://127.0.0.1:1", "--timeout", "1")
    assert done.returncode == 1 and "config error" not in done.stderr, done
