"""agent/clock.py: the kernel's verdict, server Date anchors, and how reading times are corrected.

Every clock is injected: no test sleeps, and none depends on whether this machine runs NTP.
"""

from __future__ import annotations

import email.utils
import sqlite3
from pathlib import Path

import pytest

from agent import clock as clockmod
from agent.clock import ClockTrust, Stamp, describe_offset, iso_epoch
from agent.config import UploadSettings
from agent.sim.api import SimApi
from agent.telemetry import readonly
from agent.telemetry.outbox import Outbox
from agent.telemetry.sinks.http import HttpSink
from tests.fixtures.api import DEVICE, FakeTokens

TRUE0 = 1_796_000_000.0          # the servers' time when the test starts (2026-11)
DAYS3 = 3 * 86400.0


class Clocks:
    """A box whose wall clock is ``behind_s`` behind true time; the test moves both."""

    def __init__(self, behind_s: float, *, synced: bool = False) -> None:
        self.mono = 500.0
        self.true = TRUE0
        self.behind_s = behind_s
        self.synced = synced

    def advance(self, s: float) -> None:
        self.mono += s
        self.true += s

    def trust(self, boot: str = "boot-b") -> ClockTrust:
        return ClockTrust(wall=lambda: self.true - self.behind_s, monotonic=lambda: self.mono,
                          kernel=lambda: self.synced, boot_id=boot)

    def date_header(self) -> str:
        return email.utils.formatdate(self.true, usegmt=True)


def label_one(trust: ClockTrust, stamp: Stamp, seq: int = 1, sensor: str = "t") -> dict[str, object]:
    reading: dict[str, object] = {"sensor": sensor, "time": iso_epoch(stamp.wall)}
    trust.label([(seq, reading, stamp)])
    return reading


def seconds(reading: dict[str, object]) -> float:
    from datetime import datetime

    return datetime.fromisoformat(str(reading["time"]).replace("Z", "+00:00")).timestamp()


def test_the_kernel_is_asked_read_only_and_answers() -> None:
    state = clockmod.adjtimex_state()
    assert state is not None and 0 <= state <= 5, "adjtimex(2) with modes=0 needs no privilege"
    assert clockmod.kernel_synchronized() is (state != clockmod.TIME_ERROR)
    assert len(clockmod.read_boot_id()) >= 32


def test_a_reading_sampled_days_behind_is_corrected_to_true_time_within_2_s() -> None:
    c = Clocks(DAYS3)
    trust = c.trust()
    stamp = trust.stamp()
    true_at_sampling = c.true
    assert trust.quality() == "unsynced" and trust.note() == "clock not synchronized"
    assert label_one(trust, stamp)["time_quality"] == "unsynced", "no server seen yet: best effort"
    c.advance(40.0)
    trust.observe_date(c.date_header(), source="idp")
    reading = label_one(trust, stamp, seq=2)
    assert reading["time_quality"] == "corrected"
    assert abs(seconds(reading) - true_at_sampling) < 2.0
    assert trust.quality() == "corrected"
    assert trust.note() == "clock not synchronized (off by ~3 d)"
    assert abs(trust.now() - c.true) < 2.0 and abs(trust.correction_s() - DAYS3) < 2.0


def test_an_offset_under_2_s_is_noise_and_never_applied() -> None:
    c = Clocks(1.4)
    trust = c.trust()
    stamp = trust.stamp()
    trust.observe_date(c.date_header())
    reading = label_one(trust, stamp)
    assert reading["time"] == iso_epoch(stamp.wall), "the wall time is kept exactly"
    assert reading["time_quality"] == "corrected", "a server vouched for it"
    assert trust.correction_s() == 0.0 and trust.note() == "clock not synchronized"


def test_over_60_s_in_two_answers_outweighs_the_kernels_synchronized() -> None:
    c = Clocks(7200.0, synced=True)        # a stale flag: `date -s` two hours back
    trust = c.trust()
    stamp = trust.stamp()
    assert stamp.synced and trust.quality() == "synced"
    trust.observe_date(c.date_header())
    assert trust.trusted(), "one answer is not enough"
    assert label_one(trust, stamp)["time_quality"] == "synced"
    c.advance(5.0)
    trust.observe_date(c.date_header())
    assert not trust.trusted() and trust.quality() == "corrected"
    reading = label_one(trust, stamp, seq=2)
    assert reading["time_quality"] == "corrected" and abs(seconds(reading) - (c.true - 5.0)) < 2.0
    assert trust.note() == "clock not synchronized (off by ~2 h)"


def test_a_synced_clock_within_a_minute_of_the_servers_keeps_its_own_times() -> None:
    c = Clocks(30.0, synced=True)
    trust = c.trust()
    for _ in range(3):
        trust.observe_date(c.date_header())
        c.advance(1.0)
    stamp = trust.stamp()
    assert trust.trusted() and label_one(trust, stamp)["time"] == iso_epoch(stamp.wall)


def test_readings_of_an_earlier_boot_are_never_shifted_by_this_boots_offset() -> None:
    c = Clocks(DAYS3)
    earlier = Stamp(wall=TRUE0 - 10 * 86400, mono=12.0, boot="boot-a", synced=False)
    trust = c.trust("boot-b")
    trust.observe_date(c.date_header())
    reading = label_one(trust, earlier)
    assert reading["time"] == iso_epoch(earlier.wall) and reading["time_quality"] == "unsynced"
    synced_earlier = Stamp(wall=TRUE0 - 86400, mono=12.0, boot="boot-a", synced=True)
    assert label_one(trust, synced_earlier, seq=2)["time_quality"] == "synced"


def test_an_ntp_step_while_readings_queue_changes_nothing_for_them() -> None:
    c = Clocks(3600.0)
    trust = c.trust()
    trust.observe_date(c.date_header())          # sign-in, before the step
    queued = []
    for _ in range(5):
        queued.append((trust.stamp(), c.true))
        c.advance(10.0)
    c.behind_s, c.synced = 0.0, True             # chrony steps the clock one hour forward
    after = [(trust.stamp(), c.true) for _ in range(1)]
    c.advance(10.0)
    trust.observe_date(c.date_header())          # the upload's answer, after the step
    rows = [(i + 1, {"sensor": "t", "time": iso_epoch(st.wall)}, st) for i, (st, _) in enumerate(queued + after)]
    trust.label(rows)
    for (_, reading, _), (_, true) in zip(rows, queued + after, strict=True):
        assert abs(seconds(reading) - true) < 2.0
    assert [r["time_quality"] for _, r, _ in rows] == ["corrected"] * 5 + ["synced"]
    assert trust.quality() == "synced" and trust.note() is None


def test_the_correction_never_reorders_a_sensors_readings() -> None:
    c = Clocks(DAYS3)
    trust = c.trust()
    trust.observe_date(c.date_header())
    first = trust.stamp()                        # corrected: true time (to the half second)
    c.advance(0.3)
    c.behind_s, c.synced = 1.5, True             # synced now, but the wall is 1.5 s behind
    second = trust.stamp()
    rows = [(1, {"sensor": "t"}, first), (2, {"sensor": "t"}, second), (3, {"sensor": "u"}, second)]
    trust.label(rows)
    times = [seconds(r) for _, r, _ in rows]
    assert times[1] >= times[0], "never earlier than the reading before it"
    assert times[2] == pytest.approx(second.wall, abs=1e-3), "another sensor is not held back"
    # Labelling the same rows again (a retried batch) gives the same answer.
    again = [(1, {"sensor": "t"}, first), (2, {"sensor": "t"}, second)]
    trust.label(again)
    assert [r["time"] for _, r, _ in again] == [r["time"] for _, r, _ in rows[:2]]


def test_garbage_and_missing_date_headers_are_ignored() -> None:
    trust = Clocks(DAYS3).trust()
    assert trust.observe_date(None) is None and trust.observe_date("yesterday-ish") is None
    assert trust.quality() == "unsynced"


@pytest.mark.parametrize(("offset", "text"), [(3 * 86400 + 500, "~3 d"), (-5 * 3600, "~5 h"),
                                              (12 * 60 + 10, "~12 min"), (40, "~40 s"), (59.5, "~1 min")])
def test_describe_offset(offset: float, text: str) -> None:
    assert describe_offset(offset) == text


def test_an_outbox_from_before_stamps_is_migrated_and_its_rows_still_upload(
        tmp_path: Path, api_settings: UploadSettings, sim_api: SimApi, tokens: FakeTokens) -> None:
    path = tmp_path / "outbox.sqlite3"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE outbox (seq INTEGER PRIMARY KEY, payload BLOB NOT NULL);
        CREATE TABLE dead (id INTEGER PRIMARY KEY, device TEXT NOT NULL, seq INTEGER NOT NULL,
                           payload BLOB NOT NULL, reason TEXT NOT NULL, at TEXT NOT NULL);
        CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;""")
    old.execute("INSERT INTO meta VALUES ('device_id', ?)", (DEVICE,))
    old.execute("INSERT INTO outbox VALUES (1, ?)", (b'{"sensor":"cpu","type":"cpu_temperature","value":41.0,'
                                                      b'"unit":"\xc2\xb0C","time":"2026-11-20T08:00:00.000Z"}',))
    old.commit()
    old.close()
    # `status` without the service: the old row's own time (it has no stamp columns yet)
    assert readonly.read_oldest_wall(path) == pytest.approx(seconds({"time": "2026-11-20T08:00:00.000Z"}))
    c = Clocks(DAYS3)
    trust = c.trust()
    trust.observe_date(c.date_header())
    with Outbox(path, DEVICE, max_rows=1000, max_bytes=10**6, clock=trust) as box:
        stamp = trust.stamp()
        box.put([{"sensor": "cpu", "type": "cpu_temperature", "value": 42.0, "unit": "°C",
                  "time": iso_epoch(stamp.wall)}], [stamp])
        assert box.oldest() is not None and box.oldest().stamp is None    # the old row, unstamped
        sink = HttpSink(api_settings, DEVICE)
        assert sink.send(box.claim(10), tokens.token or "").acked == [1, 2]
        sink.close()
    got = sim_api.readings(DEVICE)
    assert got[0]["time"] == "2026-11-20T08:00:00.000Z" and got[0]["time_quality"] == "unsynced"
    assert got[1]["time_quality"] == "corrected" and abs(seconds(got[1]) - c.true) < 2.0


def test_mqtt_code_and_status_carry_true_time_while_the_box_is_days_behind() -> None:
    import json
    import time as _time
    from datetime import UTC, datetime, timedelta

    from agent.mqtt.protocol import Outbound
    from agent.state import DeviceCode, Snapshot

    now = _time.monotonic()
    # Issued while the wall clock was 3 days behind: the wall expiry is 3 days early.
    box_wall = datetime.now(UTC) - timedelta(days=3)
    code = DeviceCode("ABCD-EFGH", "https://login.example/device", now + 600, box_wall + timedelta(seconds=600), 5)
    snap = Snapshot(phase="signing_in", code=code, clock="corrected", clock_offset_s=0.0,
                    clock_note="clock not synchronized (off by ~3 d)")
    pubs, _ = Outbound("p", "d", "1").plan(snap, now)
    by_topic = {p.topic: p for p in pubs}
    body = json.loads(by_topic["p/d/auth/code"].payload)
    expires = datetime.fromisoformat(body["expires_at"].replace("Z", "+00:00"))
    assert abs((expires - datetime.now(UTC)).total_seconds() - 600) < 2, "true time + seconds left"
    status = json.loads(by_topic["p/d/status"].payload)
    assert status["clock"] == "corrected" and status["clock_note"] == "clock not synchronized (off by ~3 d)"
    synced = json.loads(Outbound("p", "d", "1").plan(Snapshot(clock="synced"), now)[0][0].payload)
    assert synced["clock"] == "synced" and "clock_note" not in synced


def shift_servers(trust: ClockTrust, c: Clocks, by_s: float) -> None:
    """The servers' Date headers move by ``by_s`` (every anchor the median sees)."""
    for _ in range(clockmod.KEEP_ANCHORS):
        trust.observe_date(email.utils.formatdate(c.true + by_s, usegmt=True))


def test_a_retried_batch_keeps_its_times_after_the_label_store_wrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clockmod, "KEEP_LABELS", 100)
    c = Clocks(DAYS3)
    trust = c.trust()
    trust.observe_date(c.date_header())
    stamp = trust.stamp()
    first = [(seq, {"sensor": "t"}, stamp) for seq in range(1, 301)]     # three stores' worth
    trust.label(first)
    shift_servers(trust, c, 30.0)        # a relabel from scratch would say 30 s later now
    retried = [(seq, {"sensor": "t"}, stamp) for seq in range(201, 301)]
    trust.label(retried)
    assert [r["time"] for _, r, _ in retried] == [r["time"] for _, r, _ in first[200:]], \
        "the newest KEEP_LABELS keep their times"
    forgotten = [(1, {"sensor": "t"}, stamp)]
    trust.label(forgotten)
    assert seconds(forgotten[0][1]) - seconds(first[0][1]) == pytest.approx(30.0, abs=1.0), \
        "a label older than the bound is given afresh"


def test_a_row_claimed_after_newer_ones_keeps_its_time_too() -> None:
    c = Clocks(DAYS3)
    trust = c.trust()
    trust.observe_date(c.date_header())
    stamp = trust.stamp()
    trust.label([(seq, {"sensor": "t"}, stamp) for seq in (10, 11, 12)])
    late = [(5, {"sensor": "u"}, stamp)]     # held back while the disk was full, claimed later
    trust.label(late)
    shift_servers(trust, c, 30.0)
    again = [(5, {"sensor": "u"}, stamp)]
    trust.label(again)
    assert again[0][1]["time"] == late[0][1]["time"]


def test_the_label_store_answers_like_a_dict_of_the_newest_seqs() -> None:
    import random

    rng = random.Random(14)
    store = clockmod.Labels(keep=50)
    model: dict[int, tuple[float, str]] = {}
    top = 0
    for _ in range(5000):
        if rng.random() < 0.8:
            top += rng.randint(1, 3)
            seq = top
        else:
            seq = rng.randint(max(1, top - 80), top + 1)       # a retry, a held row, a gap
            top = max(top, seq)
        t, quality = rng.uniform(0, 1e9), rng.choice(clockmod.QUALITIES)
        store.put(seq, t, quality)
        model[seq] = (t, quality)
        assert len(store) <= 50 + 50 // 4
        newest = sorted(model)[-50:]
        for s in newest[-5:] + rng.sample(newest, min(5, len(newest))):
            assert store.get(s) == model[s]
    assert store.get(top + 1) is None and store.get(0) is None
