"""`device-agent dead-letter` against a running `device-agent run`: the service dead-letters the
readings the simulated API refuses, the command lists them and puts one back, and the running
service delivers it with its original seq and id."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.agentproc import AgentProcess
from tests.test_e2e_durability import DEVICE, agent_config

ROOT = Path(__file__).resolve().parents[1]


def dead_letter(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "dead-letter", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


@pytest.mark.slow
def test_dead_letter_list_and_retry_while_the_service_runs(tmp_path: Path, idp: Any, idp_api: Any,
                                                           tls: Any) -> None:
    idp.auto_approve_after_s = 0.0
    idp_api.poison(seqs={30, 31, 77})
    config = agent_config(tmp_path, idp, idp_api, tls)
    proc = AgentProcess(config)
    try:
        proc.wait_for_line(lambda line: "signed in" in line.lower(), timeout_s=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not {29, 32, 76, 78} <= idp_api.seqs(DEVICE):
            time.sleep(0.1)
        listed = dead_letter(config, "list")
        assert listed.returncode == 0, listed.stderr
        rows = [ln.split()[0] for ln in listed.stdout.splitlines()[1:-1]]
        assert rows == ["30", "31", "77"], listed.stdout
        assert "HTTP 422" in listed.stdout
        idp_api.poisoned_seqs.discard(31)            # the receiver now takes this one
        retried = dead_letter(config, "retry", "31")
        assert retried.returncode == 0 and "1 readings queued again" in retried.stdout, retried
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and 31 not in idp_api.seqs(DEVICE):
            time.sleep(0.1)
        bad = dead_letter(config, "retry", "31")     # no longer dead-lettered
        rc, _ = proc.terminate()
    finally:
        proc.close()
    assert rc == 0
    got = {r["seq"]: r for r in idp_api.readings(DEVICE)}
    assert 31 in got and got[31]["id"] == f"{DEVICE}:31", "delivered with its original seq and id"
    assert 30 not in got and 77 not in got
    assert bad.returncode == 1 and "not dead-lettered: seq 31" in bad.stderr
