"""Sampler schedule (injected monotonic clock, no sleeping), failures, naming, group commit."""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.config import SensorSettings
from agent.state import AgentState
from agent.telemetry.outbox import Outbox
from agent.telemetry.sampler import Sampler
from agent.telemetry.storage import StorageUnavailable
from hw.base import Measurement
from hw.errors import HardwareError
from tests.fixtures.api import DEVICE
from tests.fixtures.clock import FakeClock
from tests.outbox_files import counts_on_disk


class SteppingStop:
    """Stands in for threading.Event in run(): wait() advances the fake clock instead of sleeping
    (plus a scheduler ``lateness``); stops after ``until`` seconds of fake time."""

    def __init__(self, clock: FakeClock, until: float, lateness: float = 0.0,
                 stall_at: float | None = None, stall_s: float = 0.0) -> None:
        self.clock, self.until, self.lateness = clock, until, lateness
        self.stall_at, self.stall_s = stall_at, stall_s
        self.waits = 0

    def is_set(self) -> bool:
        return self.clock.now >= self.until

    def wait(self, timeout: float) -> bool:
        self.waits += 1
        self.clock.now += timeout + self.lateness * (self.waits % 3)   # late by 0, 1 or 2 x lateness
        if self.stall_at is not None and self.clock.now >= self.stall_at:
            self.clock.now += self.stall_s                                 # e.g. SD card hang
            self.stall_at = None
        return self.is_set()


class RecordingOutbox:
    """The outbox's put/counts, recording when each put happened (the outbox itself has its own tests)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.puts: list[tuple[float, list[dict[str, Any]]]] = []

    def put(self, readings: list[dict[str, Any]]) -> list[int]:
        self.puts.append((self.clock.now, list(readings)))
        return list(range(len(readings)))

    def counts(self) -> Any:
        from agent.state import OutboxCounts

        return OutboxCounts()

    def times(self, sensor: str) -> list[float]:
        return [t for t, rs in self.puts for r in rs if r["sensor"] == sensor]


class FakeSensor:
    kind = "simulated"

    def __init__(self, values: list[Measurement] | None = None) -> None:
        self.values = values or [Measurement(21.5, "°C")]
        self.fail: Exception | None = None
        self.reads = 0

    def read(self) -> list[Measurement]:
        self.reads += 1
        if self.fail is not None:
            raise self.fail
        return self.values

    def close(self) -> None:
        pass


def settings(name: str, interval_s: float, kind: str = "simulated") -> SensorSettings:
    return SensorSettings(name=name, type=kind, interval_s=interval_s)


def test_no_drift_over_1000_ticks_with_late_wakeups() -> None:
    clock = FakeClock()
    box = RecordingOutbox(clock)
    sampler = Sampler([(settings("a", 0.1), FakeSensor())], box, AgentState(), clock=clock)
    start = clock.now
    sampler.run(SteppingStop(clock, until=start + 100.0, lateness=0.004))   # type: ignore[arg-type]
    times = box.times("a")
    assert len(times) == 1000
    # Reading k happens at start + k*interval plus at most this wake-up's lateness: no accumulation.
    for k, t in enumerate(times):
        assert start + k * 0.1 - 1e-9 <= t <= start + k * 0.1 + 0.0081, (k, t - start)


def test_stall_skips_missed_slots_instead_of_catching_up() -> None:
    clock = FakeClock()
    box = RecordingOutbox(clock)
    sampler = Sampler([(settings("a", 1.0), FakeSensor())], box, AgentState(), clock=clock)
    start = clock.now
    sampler.run(SteppingStop(clock, until=start + 200.0, stall_at=start + 50.0, stall_s=60.0))  # type: ignore[arg-type]
    times = box.times("a")
    # ~200 s of schedule minus the 60 s stall: about 140 readings, never ~200.
    assert 139 <= len(times) <= 142
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert max(gaps) >= 60.0
    assert min(gaps) >= 1.0 - 1e-9, "no burst of back-to-back catch-up readings"
    # After the stall the sensor is back on its original grid (start + k*1.0).
    after = [t for t in times if t > start + 111]
    assert all(abs((t - start) - round(t - start)) < 1e-6 for t in after)
    assert sampler.slots[0].skipped >= 59


def test_wall_clock_jump_does_not_move_the_schedule() -> None:
    clock = FakeClock()
    box = RecordingOutbox(clock)
    wall_base = datetime(2026, 11, 25, 14, 0, tzinfo=UTC)

    def wall() -> datetime:
        elapsed = clock.now - 1000.0
        jump = timedelta(hours=-3) if elapsed >= 10 else timedelta(0)   # NTP steps the clock back
        return wall_base + timedelta(seconds=elapsed) + jump

    sampler = Sampler([(settings("a", 1.0), FakeSensor())], box, AgentState(), clock=clock, wall=wall)
    sampler.run(SteppingStop(clock, until=1020.0))  # type: ignore[arg-type]
    times = box.times("a")
    assert len(times) == 20
    assert [round(t - 1000.0, 6) for t in times] == [float(k) for k in range(20)]
    stamps = [r["time"] for _, rs in box.puts for r in rs]
    assert stamps[0] == "2026-11-25T14:00:00.000Z"
    assert stamps[10] == "2026-11-25T11:00:10.000Z"


def test_one_put_per_tick_holds_every_due_reading_and_quantities_are_named() -> None:
    clock = FakeClock()
    box = RecordingOutbox(clock)
    bme = FakeSensor([Measurement(21.0, "°C", "temperature"), Measurement(40.0, "%", "humidity")])
    pairs = [(settings("cpu", 2.0, "cpu_temperature"), FakeSensor()), (settings("env", 2.0, "bme280"), bme)]
    sampler = Sampler(pairs, box, AgentState(), clock=clock)
    sampler.run(SteppingStop(clock, until=1004.0))  # type: ignore[arg-type]
    assert len(box.puts) == 2
    assert [r["sensor"] for r in box.puts[0][1]] == ["cpu", "env.temperature", "env.humidity"]
    first = box.puts[0][1][1]
    assert first["type"] == "bme280" and first["unit"] == "°C" and first["value"] == 21.0
    assert first["time"].endswith("Z") and len(first["time"]) == len("2026-11-25T14:39:32.123Z")


def test_failing_sensor_never_kills_the_sampler_and_is_reported(tmp_path: Path) -> None:
    clock = FakeClock()
    state = AgentState()
    box = Outbox(tmp_path / "o.sqlite3", DEVICE, max_rows=1000, max_bytes=10**7)
    broken, good, weird = FakeSensor(), FakeSensor(), FakeSensor([Measurement(math.nan, "°C")])
    broken.fail = HardwareError("i2c bus 1: remote I/O error")
    pairs = [(settings("broken", 1.0), broken), (settings("good", 1.0), good),
             (settings("weird", 1.0), weird)]
    sampler = Sampler(pairs, box, state, clock=clock)
    sampler.run(SteppingStop(clock, until=1005.0))  # type: ignore[arg-type]
    sensors = {r.reading["sensor"] for r in box.claim(1000)}
    assert sensors == {"good"}, "failed reads queue nothing, good sensors keep going"
    assert box.counts().pending == 5
    assert sampler.errors == {"broken": 5, "good": 0, "weird": 5}
    assert state.snapshot.outbox.pending == 5
    # The failure shows on the state (screen/status): the last failing read, with its reason.
    last = state.snapshot.last_reading
    assert last is not None and last.value is None and last.error and "non-finite" in last.error
    broken.fail = RuntimeError("driver bug")
    sampler.run(SteppingStop(clock, until=1007.0))  # type: ignore[arg-type]
    broken.fail = None
    sampler.run(SteppingStop(clock, until=1009.0))  # type: ignore[arg-type]
    assert sampler.errors["broken"] == 7
    assert box.counts().pending == 5 + 2 + 2 * 2
    box.close()


def _fill_until_full(box: Outbox) -> None:
    """Cap the database at its current size (SQLite's max_page_count: a real SQLITE_FULL) and
    fill what room is left, so every further put fails with "database or disk is full"."""
    db = box._conn()
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count={pages + 1}")
    for n in (5, 1):                 # then single small rows: no slack left for a sampler tick
        for i in range(10_000):
            try:
                box.put([{"sensor": "f", "type": "s", "value": float(i), "unit": "", "time": ""}] * n)
            except StorageUnavailable as err:
                assert err.storage == "full" and "full" in str(err)
                break
        else:
            raise AssertionError("never filled up")


def test_disk_full_losses_are_counted_as_dropped_and_logged_without_flooding(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    state = AgentState()
    path = tmp_path / "o.sqlite3"
    storage_clock = FakeClock()            # the outbox's look for room again: held back until the end
    box = Outbox(path, DEVICE, max_rows=10**6, max_bytes=10**9, monotonic=storage_clock, state=state)
    _fill_until_full(box)
    before = box.counts()
    pairs = [(settings("a", 1.0), FakeSensor()), (settings("b", 1.0), FakeSensor())]
    sampler = Sampler(pairs, box, state, clock=clock)
    with caplog.at_level(logging.INFO, logger="agent.telemetry.sampler"):
        sampler.run(SteppingStop(clock, until=1000.0 + 25 * 60.0))  # type: ignore[arg-type]
    lost = 2 * 25 * 60
    assert sampler.readings_lost == lost
    assert box.counts().dropped == before.dropped + lost
    assert state.snapshot.outbox.dropped == before.dropped + lost, "status/MQTT see the loss"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    # The one rule (agent.net.retry.OutageLog): the first failure, then one line every 10 min
    # with a count, not one per tick.
    assert len(errors) == 3, [r.getMessage() for r in errors]
    assert all(r.exc_info is None for r in errors), "storage full is a state, not a traceback"
    assert "storage full" in errors[0].getMessage() and state.snapshot.storage == "full"
    assert "still failing: 600 failed attempts in the last 10 min" in errors[1].getMessage()
    assert errors[1].getMessage().endswith("(601 since 10 min ago); 1202 readings lost so far")
    assert errors[2].getMessage().endswith("(1201 since 20 min ago); 2402 readings lost so far")
    box._conn().execute("PRAGMA max_page_count=1000000")
    storage_clock.now += 10.0
    with caplog.at_level(logging.INFO, logger="agent.telemetry.sampler"):
        sampler.run(SteppingStop(clock, until=clock.now + 3.0))  # type: ignore[arg-type]
    assert state.snapshot.storage == "ok"
    assert "queuing readings again" in caplog.text
    box.close()
    with Outbox(path, DEVICE, max_rows=10**6, max_bytes=10**9) as again:
        assert again.counts().dropped == before.dropped + lost, "the count survives a restart"


def test_losses_while_the_database_is_unwritable_are_kept_in_memory_then_saved(tmp_path: Path) -> None:
    clock = FakeClock()
    state = AgentState()
    path = tmp_path / "o.sqlite3"
    box = Outbox(path, DEVICE, max_rows=10**6, max_bytes=10**9, monotonic=clock)
    box._conn().execute("PRAGMA query_only=ON")       # every write fails: "readonly database"
    sampler = Sampler([(settings("a", 1.0), FakeSensor())], box, state, clock=clock)
    sampler.run(SteppingStop(clock, until=1010.0))  # type: ignore[arg-type]
    assert box.counts().dropped == 10 and state.snapshot.outbox.dropped == 10
    assert counts_on_disk(path).dropped == 0, "not on disk yet"
    box._conn().execute("PRAGMA query_only=OFF")
    sampler.run(SteppingStop(clock, until=1016.0))  # type: ignore[arg-type]
    assert box.counts().dropped == 10 and box.counts().pending == 6, "storing again, nothing more lost"
    assert counts_on_disk(path).dropped == 10, "written with the first put that worked"
    box.close()


def test_a_sensor_failing_for_an_hour_is_a_warning_every_10_min_with_a_count(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    box = RecordingOutbox(clock)
    broken = FakeSensor()
    broken.fail = HardwareError("i2c bus 1: remote I/O error")
    sampler = Sampler([(settings("soil", 5.0), broken)], box, AgentState(), clock=clock)  # type: ignore[arg-type]
    with caplog.at_level(logging.DEBUG, logger="agent.telemetry.sampler"):
        sampler.run(SteppingStop(clock, until=1000.0 + 3600.0))  # type: ignore[arg-type]
        broken.fail = None
        sampler.run(SteppingStop(clock, until=clock.now + 5.0))  # type: ignore[arg-type]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert broken.reads >= 720 and len(warnings) == 6, warnings     # at 0, 10, ... 50 min
    assert warnings[0].startswith("sensor soil: read failed: HardwareError: i2c bus 1: remote I/O error; "
                                  "no reading queued")
    assert all("still failing: 120 failed attempts in the last 10 min" in w for w in warnings[1:])
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(m.startswith("sensor soil: reading again after HardwareError") and "(after 720 failed "
               "attempts in 60 min)" in m for m in info), info
