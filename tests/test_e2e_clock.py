"""True time on a box whose wall clock is days off: the whole agent in this process, with the real
msal/requests stack against the simulated IdP and API (their ``Date`` headers are right).

The box's clocks are injected (``Service(clock=...)``): its wall clock runs behind true time by
what the test says and the kernel's verdict is what the test says. What a person at the API sees:
readings arrive with true times (within 2 s of when they were really sampled) and the right
``time_quality``; readings a previous boot left in the outbox keep their times; status, code and
``last_upload`` times are true too.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from agent.clock import ClockTrust, Stamp, iso_epoch
from agent.config import parse
from agent.service import Service
from agent.sim.api import SimApi
from agent.telemetry.outbox import Outbox
from tests.agentproc import AgentProcess, write_config
from tests.fixtures.faketime import FakeWallClock
from tests.waiting import wait_until

DEVICE = "clock-01"
DAYS3 = 3 * 86400.0
BEFORE = [1_790_000_000.0 + i for i in range(3)]      # a previous boot's (wrong) wall times


def seconds(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class Box:
    """The box's clocks. ``stamped``: the true time of every reading it sampled, in order."""

    def __init__(self, behind_s: float, synced: bool = False) -> None:
        self.behind_s = behind_s
        self.synced = synced
        self.stamped: list[float] = []
        box = self

        class Recording(ClockTrust):
            def stamp(self) -> Stamp:
                st = super().stamp()
                box.stamped.append(time.time())
                return st

        self.trust = Recording(wall=lambda: time.time() - self.behind_s, kernel=lambda: self.synced,
                               boot_id="boot-now")


@pytest.fixture
def running(tmp_path: Path, idp: Any, idp_api: SimApi, tls: Any) -> Iterator[Any]:
    """``start(box)`` -> the signed-in Service (a previous boot's 3 readings already queued)."""
    stop = threading.Event()
    threads: list[threading.Thread] = []
    idp.set(interval_s=1)

    def start(box: Box) -> Service:
        state_dir = tmp_path / "state"
        with Outbox(state_dir / "outbox.sqlite3", DEVICE, max_rows=1000, max_bytes=10**6) as old:
            old.put([{"sensor": "temp", "type": "simulated", "value": 1.0, "unit": "",
                      "time": iso_epoch(w)} for w in BEFORE],
                    [Stamp(wall=w, mono=50.0 + i, boot="boot-before", synced=False) for i, w in enumerate(BEFORE)])
        settings = parse({
            "device": {"id": DEVICE, "state_dir": str(state_dir)},
            "auth": {"client_id": "sim-device-agent", "authority": idp.authority, "instance_discovery": False,
                     "scopes": ["api://telemetry/Readings.Write"], "ca_file": str(tls.ca_file), "timeout_s": 5},
            "sensors": [{"name": "temp", "type": "simulated", "interval_s": 0.25}],
            "upload": {"sink": "http", "url": idp_api.url, "ca_file": str(tls.ca_file), "interval_s": 0.3},
        }, tmp_path / "config.toml")
        service = Service(settings, install_signals=False, stop_event=stop, clock=box.trust)
        t = threading.Thread(target=service.run, name="service", daemon=True)
        t.start()
        threads.append(t)
        code = idp.wait_for_code(timeout_s=20)
        status = wait_until(lambda: _status(state_dir) if (_status(state_dir) or {}).get("code") else None,
                            10, "the code in status.json")
        left = status["code"]["expires_at"]
        assert abs(seconds(left) - (time.time() + 900)) < 3, "expires_at is true time, not the box's"
        idp.approve(code)
        wait_until(lambda: service.state.snapshot.phase == "signed_in", 20, "signed in")
        return service

    yield start
    stop.set()
    for t in threads:
        t.join(5)


def _status(state_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((state_dir / "status.json").read_text())
    except (OSError, ValueError):
        return None


def arrived(api: SimApi, n: int) -> list[dict[str, Any]]:
    """Wait for the previous boot's 3 readings and ``n`` of this boot's; all of them, by seq."""
    wait_until(lambda: api.count(DEVICE) >= 3 + n, 20, f"{n} readings of this boot at the API")
    return api.readings(DEVICE)


def check_true_times(got: list[dict[str, Any]], box: Box) -> list[str]:
    """This boot's readings against the true sampling times; returns their qualities."""
    assert [r["time"] for r in got[:3]] == [iso_epoch(w) for w in BEFORE], "a previous boot is left alone"
    assert [r["time_quality"] for r in got[:3]] == ["unsynced"] * 3
    mine = got[3:]
    for r in mine:
        true = box.stamped[r["seq"] - 4]
        assert abs(seconds(r["time"]) - true) < 2.0, (r, true)
    times = [seconds(r["time"]) for r in mine]
    assert times == sorted(times), "the correction never reorders a sensor's readings"
    return [r["time_quality"] for r in mine]


@pytest.mark.slow
def test_days_behind_readings_arrive_with_true_times(running: Any, idp_api: SimApi, tmp_path: Path) -> None:
    box = Box(DAYS3)
    service = running(box)
    got = arrived(idp_api, 8)
    assert set(check_true_times(got, box)) == {"corrected"}
    snap = service.state.snapshot
    assert snap.clock == "corrected" and snap.clock_note == "clock not synchronized (off by ~3 d)"
    assert snap.last_upload is not None and abs(snap.last_upload.timestamp() - time.time()) < 5
    status = wait_until(lambda: s if (s := _status(tmp_path / "state")) and s.get("signin_lapses_in_days")
                        else None, 5, "health figures in status.json")
    assert status["clock"] == "corrected" and "off by ~3 d" in status["clock_note"]
    assert 89.9 <= status["signin_lapses_in_days"] <= 90.0
    assert abs(seconds(status["updated_at"]) - time.time()) < 5


@pytest.mark.slow
def test_a_clock_that_becomes_synchronized_mid_run(running: Any, idp_api: SimApi) -> None:
    box = Box(DAYS3)
    service = running(box)
    arrived(idp_api, 6)
    box.behind_s, box.synced = 0.0, True          # NTP got through: wall right, kernel says so
    wait_until(lambda: service.state.snapshot.clock == "synced", 5, "status clock synced")
    assert service.state.snapshot.clock_note is None
    n = idp_api.count(DEVICE) - 3
    qualities = check_true_times(arrived(idp_api, n + 6), box)
    first_synced = qualities.index("synced")
    assert qualities[:first_synced] == ["corrected"] * first_synced and first_synced >= 6
    assert set(qualities[first_synced:]) == {"synced"}


@pytest.mark.slow
def test_a_1_hour_ntp_step_while_readings_queue(running: Any, idp_api: SimApi) -> None:
    box = Box(3600.0)
    service = running(box)
    arrived(idp_api, 3)
    idp_api.fail(503, count=10_000)                # the API is down: readings queue
    wait_until(lambda: service.state.snapshot.outbox.pending >= 8, 10, "a queue")
    assert (service.state.snapshot.oldest_pending_s() or 0) >= 1
    box.behind_s, box.synced = 0.0, True           # chrony steps the clock an hour forward
    time.sleep(1.0)
    idp_api.clear_faults()
    assert service.uploader is not None
    service.uploader.flush()
    queued = len(box.stamped)
    qualities = check_true_times(arrived(idp_api, queued + 3), box)
    assert "corrected" in qualities[:queued - 3] and qualities[-1] == "synced"


@pytest.mark.slow
def test_a_real_process_three_days_behind_sends_true_times(tmp_path: Path, idp: Any, idp_api: SimApi,
                                                            tls: Any) -> None:
    """`device-agent run` under libfaketime, wall clock only (the kernel's verdict is whatever this
    machine's is: unsynchronized, or synchronized and then outweighed by the servers)."""
    wall = FakeWallClock(tmp_path / "faketime")
    wall.set_offset(-DAYS3)
    idp.set(interval_s=1)
    idp.auto_approve_after_s = 0.0
    config = write_config(tmp_path / "config.toml", {
        "device": {"id": DEVICE, "state_dir": str(tmp_path / "state")},
        "auth": {"client_id": "sim-device-agent", "authority": idp.authority, "instance_discovery": False,
                 "scopes": ["api://telemetry/Readings.Write"], "ca_file": str(tls.ca_file), "timeout_s": 5},
        "sensors": [{"name": "temp", "type": "simulated", "interval_s": 0.25}],
        "upload": {"sink": "http", "url": idp_api.url, "ca_file": str(tls.ca_file), "interval_s": 0.5},
    })
    started = time.time()
    agent = AgentProcess(config, env=wall.env())
    try:
        wait_until(lambda: idp_api.count(DEVICE) >= 12, 30, "readings at the API")
        got = idp_api.arrivals(DEVICE)
        for reading, received in got:
            assert reading["time_quality"] == "corrected", reading
            late = received - seconds(reading["time"])
            assert -2.0 < late < received - started + 2.0, (reading, received)
        assert all(received - seconds(r["time"]) < 2.5 for r, received in got[-4:]), \
            "readings sampled while signed in arrive within an upload interval of their true time"
        out = subprocess.run([sys.executable, "-m", "agent", "status", "--json", "--config", str(config)],
                             capture_output=True, text=True, timeout=30, cwd=tmp_path, env=_env(wall))
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert doc["clock"] == "corrected" and doc["clock_note"] == "clock not synchronized (off by ~3 d)"
        assert abs(seconds(doc["last_upload"]) - time.time()) < 10
        rc, _ = agent.terminate()
        assert rc == 0, agent.output[-2000:]
    finally:
        agent.close()


def _env(wall: FakeWallClock) -> dict[str, str]:
    import os

    return {**os.environ, **wall.env()}
