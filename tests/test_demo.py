"""`device-agent demo`: nothing to configure, readings flow after the (auto-)approved sign-in."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_signs_in_and_delivers_readings_then_cleans_up(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "agent", "demo", "--auto-approve", "1", "--duration", "14"],
                         capture_output=True, text=True, timeout=90, env=env, cwd=tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "Traceback" not in text
    code = re.search(r"enter the code ([A-Z0-9]{9})", text)
    assert code, text[-3000:]
    assert "signed in as ada@contoso.example" in text
    finals = re.findall(r"API has (\d+) readings", text)
    assert finals and int(finals[-1]) >= 5, text[-2000:]
    # The console panel drew the code (a pipe gets whole frames, half blocks).
    assert "\u2588" in out.stdout
    # Nothing left behind: the demo's temp dir is gone.
    assert not list(tmp_path.glob("device-agent-demo-*"))


@pytest.mark.slow
def test_demo_with_a_throwaway_certificate_signs_in_as_app_without_a_code(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "agent", "demo", "--flow", "client_certificate",
                          "--display", "none", "--duration", "6"],
                         capture_output=True, text=True, timeout=90, env=env, cwd=tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "Traceback" not in text
    assert "signed in as app device-agent-demo" in text
    assert re.search(r"no code: certificate [0-9A-F]{40}", text), text[-2000:]
    assert "enter the code" not in text and "devicecode" not in text
    finals = re.findall(r"API has (\d+) readings", text)
    assert finals and int(finals[-1]) >= 3, text[-2000:]
    assert not list(tmp_path.glob("device-agent-demo-*"))


ROOT = Path(__file__).resolve().parents[1]


def _demo_into_a_closed_pipe(tmp_path: Path, *extra: str) -> subprocess.Popen[str]:
    """`device-agent demo ... 2>&1 | head -2`: two lines read, then the pipe's reader is gone."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "agent", "demo", "--auto-approve", "0.5", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    assert proc.stdout is not None
    for _ in range(2):
        assert proc.stdout.readline()
    proc.stdout.close()
    return proc


@pytest.mark.slow
def test_demo_into_a_closed_pipe_still_stops_at_its_duration(tmp_path: Path) -> None:
    proc = _demo_into_a_closed_pipe(tmp_path, "--duration", "4")
    try:
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_demo_into_a_closed_pipe_exits_0_on_sigterm(tmp_path: Path) -> None:
    import signal
    import time

    proc = _demo_into_a_closed_pipe(tmp_path)
    try:
        time.sleep(4)                      # signed in, summaries and panel writing into the void
        assert proc.poll() is None, "the demo ended on its own"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
