"""Health figures: oldest_pending_s, clock, signin_lapses_in_days in status (running or not)."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

from agent.clock import ClockTrust, Stamp, iso_epoch
from agent.config import parse
from agent.health import Health
from agent.state import AgentState, OutboxCounts
from agent.statusfile import show_status
from agent.telemetry.outbox import Outbox

DEVICE = "health-01"


def settings(tmp_path: Path, **auth: object):  # noqa: ANN201 - Settings
    return parse({"device": {"id": DEVICE, "state_dir": str(tmp_path / "state")},
                  "auth": {"client_id": "c", "authority": "https://login.example.com/t",
                           "scopes": ["api://x/y"], **auth},
                  "upload": {"url": "https://api.example.com/r"}}, tmp_path / "config.toml")


def write_cache(path: Path, issued: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"RefreshToken": {"k": {"secret": "s3cr3t", "last_modification_time": str(int(issued))}},
                                "Account": {"a": {"username": "ada@example.org"}}}))


def test_status_without_the_service_reads_the_figures_from_the_files(tmp_path: Path) -> None:
    s = settings(tmp_path, refresh_lifetime_days=30)
    write_cache(s.token_cache_path, time.time() - 10 * 86400)
    with Outbox(s.outbox_path, DEVICE, max_rows=100, max_bytes=10**6) as box:
        wall = time.time() - 600
        box.put([{"sensor": "t", "type": "simulated", "value": 1.0, "unit": "", "time": iso_epoch(wall)}],
                [Stamp(wall=wall, mono=1.0, boot="x", synced=True)])
    out = io.StringIO()
    show_status(s, as_json=True, out=out)
    doc = json.loads(out.getvalue())
    assert doc["running"] is False
    assert 598 <= doc["oldest_pending_s"] <= 605
    assert doc["signin_lapses_in_days"] == 20.0
    assert doc["clock"] in ("synced", "unsynced")
    assert doc["storage"] == "ok"
    text = io.StringIO()
    show_status(s, as_json=False, out=text)
    assert "storage:     ok" in text.getvalue()
    assert "sign-in:     lapses in 20 days if the box stays offline" in text.getvalue()
    assert "oldest:      ~10 min (age of the oldest unsent reading)" in text.getvalue()
    assert "s3cr3t" not in out.getvalue() + text.getvalue()


class FakeAuth:
    last_refresh_monotonic: float | None = None


def test_health_follows_the_oldest_reading_and_the_last_refresh(tmp_path: Path) -> None:
    mono = [1000.0]
    trust = ClockTrust(wall=lambda: 1_796_000_000.0 + mono[0], monotonic=lambda: mono[0],
                       kernel=lambda: False, boot_id="boot-b")
    state = AgentState()
    auth = FakeAuth()
    s = settings(tmp_path)
    with Outbox(s.outbox_path, DEVICE, max_rows=100, max_bytes=10**6, clock=trust) as box:
        health = Health(state, trust, box, auth, cache_path=s.token_cache_path, refresh_lifetime_days=90,
                        monotonic=lambda: mono[0])
        health.step()
        assert state.snapshot.oldest_pending_s(mono[0]) is None
        assert state.snapshot.signin_lapses_in_days(mono[0]) is None, "never signed in"
        old = Stamp(wall=1_795_000_000.0, mono=5.0, boot="boot-a", synced=False)  # a previous boot
        box.put([{"sensor": "t", "type": "s", "value": 1.0, "unit": "", "time": iso_epoch(old.wall)}], [old])
        box.put([{"sensor": "t", "type": "s", "value": 2.0, "unit": "", "time": ""}], [trust.stamp()])
        state.update(outbox=box.counts())
        auth.last_refresh_monotonic = mono[0]
        health.step()
        mono[0] += 3600.0
        snap = state.snapshot
        age = snap.oldest_pending_s(mono[0])
        assert age is not None and abs(age - (1_796_000_000.0 + 1000.0 - old.wall + 3600)) < 2
        assert snap.signin_lapses_in_days(mono[0]) == 90.0            # 1 h is 0.04 d
        assert snap.signin_lapses_in_days(mono[0] + 10.5 * 86400) == 79.5
        box.ack([1])
        state.update(outbox=box.counts())
        health.step()
        assert state.snapshot.oldest_pending_s(mono[0]) == 3600, "this boot's reading: by monotonic time"
        box.ack([2])
        state.update(outbox=OutboxCounts())
        health.step()
        assert state.snapshot.status_payload("v")["oldest_pending_s"] is None
        assert state.snapshot.status_payload("v")["clock"] == "unsynced"


def test_signing_out_ends_the_lapse_figure_at_once(tmp_path: Path) -> None:
    """Right after sign_out there is no sign-in to lapse: null, not the 90 days of the one gone,
    even before the sign-in thread has forgotten its last refresh (the next health step)."""
    mono = [1000.0]
    trust = ClockTrust(wall=lambda: 1_796_000_000.0 + mono[0], monotonic=lambda: mono[0],
                       kernel=lambda: True, boot_id="boot-a")
    state = AgentState()
    auth = FakeAuth()
    auth.last_refresh_monotonic = mono[0]
    s = settings(tmp_path)
    with Outbox(s.outbox_path, DEVICE, max_rows=100, max_bytes=10**6, clock=trust) as box:
        health = Health(state, trust, box, auth, cache_path=s.token_cache_path, refresh_lifetime_days=90,
                        monotonic=lambda: mono[0])
        state.signed_in("ada@contoso.example")
        health.step()
        assert state.snapshot.status_payload("v", mono[0])["signin_lapses_in_days"] == 90.0
        state.signed_out()
        assert state.snapshot.status_payload("v", mono[0])["signin_lapses_in_days"] is None
        health.step()                                  # auth not yet reset: still not signed in
        assert state.snapshot.status_payload("v", mono[0])["signin_lapses_in_days"] is None
        state.signed_in("ada@contoso.example")
        health.step()
        assert state.snapshot.status_payload("v", mono[0])["signin_lapses_in_days"] == 90.0
