"""`device-agent run` as systemd runs it (a RuntimeDirectory): what it writes where. The live
status goes to the runtime dir (tmpfs), the outbox has no -shm index beside it (exclusive
locking), `status` and `dead-letter` work while it runs, and a clean stop leaves the last status
in the state dir for `status` after a reboot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.sim.api import SimApi
from tests.agentproc import AgentProcess, write_config
from tests.test_e2e_service import DEVICE, base_config
from tests.waiting import wait_until


@pytest.mark.slow
def test_a_running_service_rewrites_nothing_but_its_outbox_on_the_sd_card(
        tmp_path: Path, idp: Any, idp_api: SimApi, tls: Any) -> None:
    idp.auto_approve_after_s = 0.0
    run, state = tmp_path / "run", tmp_path / "state"
    run.mkdir(mode=0o755)
    config = write_config(tmp_path / "config.toml", base_config(tmp_path, idp, idp_api, tls))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "agent", *args, "--config", str(config)],
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "RUNTIME_DIRECTORY": str(run)})

    agent = AgentProcess(config, env={"RUNTIME_DIRECTORY": str(run)})
    try:
        agent.wait_for_line(lambda line: "signed in" in line.lower(), timeout_s=30)
        wait_until(lambda: len(idp_api.seqs(DEVICE)) >= 5, 20, "readings delivered")
        live = list(run.glob("status-*.json"))
        assert len(live) == 1 and json.loads(live[0].read_text())["state"] == "signed_in"
        assert not (state / "status.json").exists(), "the live status is not rewritten on the SD card"
        assert not (state / "outbox.sqlite3-shm").exists(), "no WAL index file to write back"
        doc = json.loads(cli("status", "--json").stdout)
        assert doc["running"] is True and doc["state"] == "signed_in"
        listed = cli("dead-letter", "list")
        assert listed.returncode == 0 and listed.stdout.strip().endswith("0 dead-lettered; 0 dropped in total"), listed
        rc, elapsed = agent.terminate()
    finally:
        agent.close()
    assert rc == 0 and elapsed < 2.0
    left = json.loads((state / "status.json").read_text())
    assert left["last_upload"], "the last word, in the state dir"
    for p in run.iterdir():                         # a reboot empties /run
        p.unlink()
    after = json.loads(cli("status", "--json").stdout)
    assert after["running"] is False and after["last_upload"] == left["last_upload"]

