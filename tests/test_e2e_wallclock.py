"""Wall-clock jumps under a real `device-agent run`: only the agent's wall clock moves
(libfaketime, monotonic left alone), while the simulated IdP and API keep real time.

A box without an RTC boots a year off and NTP puts it right later, or the other way round.
What a person would notice: a code that vanishes early or lingers, a device that stops
refreshing (msal judges its cached tokens by the wall clock) and then throws away its sign-in
over the API's 401s, or a back-off that ends at once or never.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from agent.sim.api import SimApi
from tests.agentproc import AgentProcess, write_config
from tests.fixtures.faketime import FakeWallClock
from tests.waiting import wait_until

YEAR_S = 365 * 24 * 3600
DEVICE = "clock-01"
CODE_LIFE_S = 6
TOKEN_LIFE_S = 4


def refreshes(idp: Any, since: float = 0.0) -> list[Any]:
    return [r for r in list(idp.requests) if r.path.endswith("/token") and r.grant_type == "refresh_token"
            and r.time >= since]


@pytest.mark.slow
def test_wall_clock_jumps_neither_end_nor_stretch_codes_tokens_or_back_off(
        tmp_path: Path, idp: Any, idp_api: SimApi, tls: Any) -> None:
    clock = FakeWallClock(tmp_path / "faketime")
    idp.set(interval_s=1, code_expires_in_s=CODE_LIFE_S, access_token_lifetime_s=TOKEN_LIFE_S)
    cfg = {
        "device": {"id": DEVICE, "state_dir": str(tmp_path / "state")},
        "auth": {"client_id": "sim-device-agent", "authority": idp.authority, "instance_discovery": False,
                 "scopes": ["api://telemetry/Readings.Write"], "ca_file": str(tls.ca_file), "timeout_s": 5},
        "sensors": [{"name": "temp", "type": "simulated", "interval_s": 0.25, "waveform": "sine",
                     "period_s": 10.0}],
        "upload": {"sink": "http", "url": idp_api.url, "ca_file": str(tls.ca_file), "interval_s": 0.5},
    }
    agent = AgentProcess(write_config(tmp_path / "config.toml", cfg), env=clock.env())
    try:
        # -- polling: a year forward, then a year back; each code lives its 6 s, no less, no more.
        first = idp.wait_for_code(15)
        t_first = time.monotonic()
        time.sleep(1.5)
        clock.set_offset(YEAR_S)
        second = idp.wait_for_new_code(first, timeout_s=15)
        t_second = time.monotonic()
        time.sleep(1.5)
        clock.set_offset(-YEAR_S)
        third = idp.wait_for_new_code(second, timeout_s=15)
        t_third = time.monotonic()
        for life in (t_second - t_first, t_third - t_second):
            assert CODE_LIFE_S - 1.0 <= life <= CODE_LIFE_S + 3.0, \
                f"codes lived {t_second - t_first:.1f} s and {t_third - t_second:.1f} s, not ~{CODE_LIFE_S} s"

        # -- signed in with the clock a year behind: tokens are refreshed at half their life by the
        # monotonic clock (every ~2 s, not on every upload), and after another year back msal's
        # cache would call them "valid for a year": never handed out, never a 401 at the API.
        idp.approve(third)
        wait_until(lambda: idp_api.seqs(DEVICE), timeout_s=15, what="readings at the API")
        signed_in = time.monotonic()
        time.sleep(3.0)
        before_jump = refreshes(idp, signed_in)
        assert len(before_jump) <= 3, f"{len(before_jump)} refreshes in 3 s of 4 s tokens"
        clock.set_offset(-2 * YEAR_S)
        jumped = time.monotonic()
        time.sleep(8.0)
        after_jump = refreshes(idp, jumped)
        assert 3 <= len(after_jump) <= 6, f"{len(after_jump)} refreshes in 8 s of 4 s tokens"
        refused = [r for r in idp_api.requests if r.status == 401 and r.t >= signed_in]
        assert refused == [], f"the API refused {len(refused)} stale tokens"
        delivered = len(idp_api.seqs(DEVICE))
        wait_until(lambda: len(idp_api.seqs(DEVICE)) > delivered + 5, timeout_s=5,
                   what="readings keep arriving")
        assert not [r for r in idp.requests if r.path.endswith("/devicecode") and r.time > t_third], \
            "the agent asked for a new code although its sign-in works"

        # -- an IdP outage with Retry-After 3 s, the clock jumping forward two years during it:
        # retries neither come at once nor wait for the wall clock to catch up.
        idp.set(fail_token_next=10**6, fail_status=503, retry_after_s=3)
        outage = time.monotonic()
        time.sleep(1.0)
        clock.set_offset(2 * YEAR_S)
        failed = wait_until(lambda: len(refreshes(idp, outage)) >= 3 and refreshes(idp, outage),
                            timeout_s=20, what="3 refresh attempts during the outage")
        gaps = [b.time - a.time for a, b in zip(failed, failed[1:3], strict=False)]
        assert all(3.0 - 0.1 <= g <= 8.5 for g in gaps), gaps
        idp.set(fail_token_next=0)
        delivered = len(idp_api.seqs(DEVICE))
        wait_until(lambda: len(idp_api.seqs(DEVICE)) > delivered, timeout_s=15,
                   what="deliveries after the outage")
        assert "Traceback" not in agent.output
    finally:
        rc = None
        if agent.proc.poll() is None:
            rc, _ = agent.terminate()
        agent.close()
    assert rc == 0, agent.output[-3000:]
