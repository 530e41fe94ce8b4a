"""The promise that matters most: a reading the agent accepted is never lost.

`device-agent run` samples a 100 Hz simulated sensor and uploads to the simulated API; it is
SIGKILLed at random moments 50 times and restarted each time. At the end the API holds every
`seq` from 1 to the highest one the outbox ever assigned (duplicates allowed, de-duplicated by id).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest

from tests.agentproc import AgentProcess, write_config
from tests.outbox_files import on_disk

KILLS = 50
DEVICE = "durable-01"


def agent_config(tmp_path: Path, idp: Any, api: Any, tls: Any, **upload: Any) -> Path:
    cfg = {
        "device": {"id": DEVICE, "state_dir": str(tmp_path / "state")},
        "auth": {"client_id": "sim-device-agent", "authority": idp.authority, "instance_discovery": False,
                 "scopes": ["api://telemetry/Readings.Write"], "ca_file": str(tls.ca_file), "timeout_s": 5},
        "sensors": [{"name": "fast", "type": "simulated", "interval_s": 0.01, "waveform": "sawtooth",
                     "period_s": 1.0}],
        "upload": {"sink": "http", "url": api.url, "ca_file": str(tls.ca_file), "interval_s": 0.2,
                   "batch_max": 200, **upload},
        "log": {"level": "info"},
    }
    return write_config(tmp_path / "config.toml", cfg)


def highest_assigned_seq(state_dir: Path) -> int:
    """The highest seq the outbox ever handed out, read from its own database."""
    # The running agent holds the outbox exclusively: read what is on disk (a copy of its files).
    with on_disk(state_dir / "outbox.sqlite3") as db:
        hw = db.execute("SELECT coalesce(max(value), 0) FROM meta WHERE key = ?", (f"seq_hw:{DEVICE}",))
        pending = db.execute("SELECT coalesce(max(seq), 0) FROM outbox")
        dead = db.execute("SELECT coalesce(max(seq), 0) FROM dead")
        return max(int(hw.fetchone()[0]), int(pending.fetchone()[0]), int(dead.fetchone()[0]))


@pytest.mark.slow
def test_sigkill_50_times_loses_nothing(tmp_path: Path, idp: Any, idp_api: Any, tls: Any) -> None:
    idp.auto_approve_after_s = 0.0
    config = agent_config(tmp_path, idp, idp_api, tls)
    rng = random.Random(8628)

    first = AgentProcess(config)
    try:
        first.wait_for_line(lambda line: "signed in" in line.lower(), timeout_s=30)
        time.sleep(0.5)
    finally:
        first.kill()

    for _ in range(KILLS):
        proc = AgentProcess(config)
        try:
            # Kill anywhere: during start-up, mid-sample, mid-upload.
            time.sleep(rng.uniform(0.05, 1.2))
        finally:
            proc.kill()

    last = AgentProcess(config)
    try:
        last.wait_for_line(lambda line: "running as" in line, timeout_s=20)
        time.sleep(0.5)
        target = highest_assigned_seq(tmp_path / "state")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if set(range(1, target + 1)) <= idp_api.seqs(DEVICE):
                break
            time.sleep(0.2)
        rc, elapsed = last.terminate()
    finally:
        last.close()
    assert rc == 0 and elapsed < 2.0
    final = highest_assigned_seq(tmp_path / "state")
    received = idp_api.seqs(DEVICE)
    missing = sorted(set(range(1, target + 1)) - received)
    assert target > 500, f"only {target} readings in 50 runs: the sampler did not run at 100 Hz"
    assert not missing, f"{len(missing)} accepted readings never reached the API, first {missing[:10]}"
    assert final >= target
