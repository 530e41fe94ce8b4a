"""The outbox's intake log (agent/telemetry/intake.py): a put is durable in it before it returns,
the rows wait in SQLite's open transaction for a batch COMMIT, and the next start applies what a
power cut or a kill left in it. Real SQLite and real files; crashes are SIGKILLed processes or
copies of the files taken at one instant (what a power cut leaves)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.clock import Stamp, iso_epoch
from agent.state import OutboxCounts
from agent.telemetry import intake, readonly
from agent.telemetry.outbox import Outbox
from tests.fixtures.api import DEVICE, reading
from tests.fixtures.diskio import clean, written
from tests.fixtures.require import missing

FILES = ("outbox.sqlite3", "outbox.sqlite3-wal", "outbox.sqlite3.intake", "outbox.sqlite3.meta.json")


def open_box(path: Path, **kw: object) -> Outbox:
    kw = {"max_rows": 1_000_000, "max_bytes": 10**9, **kw}
    return Outbox(path, DEVICE, **kw)  # type: ignore[arg-type]


def power_cut(src: Path, dst: Path) -> Path:
    """The outbox's files in ``src`` as they are on disk now, copied to ``dst`` (no close)."""
    dst.mkdir()
    for name in FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    return dst / "outbox.sqlite3"


def cut_after_two_puts(tmp_path: Path) -> Path:
    """Readings 1 and 2 put, then the power cut: the outbox as the disk holds it (both in the
    intake log, none committed to SQLite yet), in ``tmp_path / "cut"``."""
    live = tmp_path / "live"
    box = open_box(live / "outbox.sqlite3")
    box.put([reading(0)])
    box.put([reading(1)])
    cut = power_cut(live, tmp_path / "cut")
    box.close()
    return cut


def seqs_of(box: Outbox) -> list[int]:
    return [r.seq for r in box.claim(10**6)]


_KILL_CHILD = """
import sys
from pathlib import Path
from agent.telemetry import intake
intake.SIZE = int(sys.argv[2])          # a small log: batch commits all the time, kills land anywhere
from agent.telemetry.outbox import Outbox
box = Outbox(Path(sys.argv[1]), "greenhouse-01", max_rows=10**6, max_bytes=10**9)
r = {"sensor": "cpu", "type": "cpu_temperature", "value": 1.0, "unit": "C",
     "time": "2026-11-25T14:39:32.123Z"}
n = 0
while True:
    seqs = box.put([r] * (1 + n % 3))
    print("put", *seqs, flush=True)
    n += 1
    if n % 4 == 0:
        rows = box.claim(5)
        box.ack([x.seq for x in rows])
        print("acked", *[x.seq for x in rows], flush=True)
"""


@pytest.mark.parametrize("log_size", [8192, intake.SIZE])
def test_readings_accepted_before_a_sigkill_are_there_after_the_restart_exactly_once(
        tmp_path: Path, log_size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kill a process putting (and acking) as fast as it can, several times over one outbox:
    every seq a put returned and that was not acked is pending after each restart, each once,
    in order; acked ones may come back (an ack is held until the next put), nothing else."""
    monkeypatch.setattr(intake, "SIZE", log_size)
    path = tmp_path / "outbox.sqlite3"
    accepted: set[int] = set()
    acked: set[int] = set()
    for round_ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(path), str(log_size)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        lines = 0
        for line in proc.stdout:
            kind, *nums = line.split()
            (accepted if kind == "put" else acked).update(int(n) for n in nums)
            lines += 1
            if lines >= 150 + 40 * round_:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        for line in proc.stdout.read().splitlines():     # printed before the kill landed
            kind, *nums = line.split()
            (accepted if kind == "put" else acked).update(int(n) for n in nums)
        proc.stdout.close()
        with open_box(path) as box:
            pending = seqs_of(box)
            assert pending == sorted(set(pending)), "each once, in order"
            assert set(pending) >= accepted - acked, sorted(accepted - acked - set(pending))[:10]
            # A put may be on disk and killed before it printed (or before it returned): at most
            # two puts of at most 3 readings above what was printed.
            assert set(pending) <= accepted | set(range(max(accepted) + 1, max(accepted) + 7)), \
                "only readings that were put"
            accepted |= set(pending)
    with open_box(path) as box:
        box.ack(seqs_of(box))
    with open_box(path) as box:
        assert seqs_of(box) == [], "a clean stop after the acks: nothing comes back"
        assert box.put([reading()])[0] > max(accepted), "seq never reused"


def test_a_torn_last_record_is_ignored_and_nothing_else_is_lost(tmp_path: Path) -> None:
    live = tmp_path / "live"
    box = open_box(live / "outbox.sqlite3")
    for i in range(5):
        box.put([reading(i)])
    before = power_cut(live, tmp_path / "before")
    tail = box._intake.offset if box._intake else 0
    box.put([reading(5), reading(6)])                     # the put the power cut tears
    record = (live / "outbox.sqlite3.intake").read_bytes()[tail:box._intake.offset if box._intake else 0]
    box.close()
    assert len(record) > intake.HEADER.size
    for name, torn in (("half", record[:len(record) // 2]),
                       ("bad-crc", record[:-1] + bytes([record[-1] ^ 0xFF])),
                       ("header-only", record[:intake.HEADER.size])):
        cut = power_cut(before.parent, tmp_path / name)
        with (cut.parent / "outbox.sqlite3.intake").open("r+b") as f:
            f.seek(tail)
            f.write(torn)
        with open_box(cut) as again:
            assert seqs_of(again) == [1, 2, 3, 4, 5], name
            assert again.put([reading(9)]) == [6], "the torn put never returned: its seqs were never handed out"
        with open_box(cut) as again:
            assert seqs_of(again) == [1, 2, 3, 4, 5, 6], name


def test_a_crash_after_the_batch_commit_before_the_next_generation_does_not_apply_it_twice(
        tmp_path: Path) -> None:
    """A dead letter commits the batch at once; the log still holds the records of the
    generation just committed until the next put overwrites them. Applying them again would put
    seq 1 back in the queue beside its dead letter."""
    live = tmp_path / "live"
    box = open_box(live / "outbox.sqlite3")
    box.put([reading(i) for i in range(3)])
    box.put([reading(3)])
    box.dead_letter([1], "HTTP 422 refused")
    cut = power_cut(live, tmp_path / "cut")
    box.close()
    assert intake.read(cut.with_name("outbox.sqlite3.intake"))[0].records, "the old records are there"
    with open_box(cut) as again:
        assert again.counts() == OutboxCounts(pending=3, dead=1, dropped=0)
        assert seqs_of(again) == [2, 3, 4]
    assert readonly.read_counts(cut) == OutboxCounts(pending=3, dead=1, dropped=0)


def test_a_batch_commits_when_the_log_is_three_quarters_full_and_readings_keep_their_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(intake, "SIZE", 8192)
    path = tmp_path / "outbox.sqlite3"
    box = open_box(path)
    generations = set()
    for i in range(200):
        box.put([reading(i)])
        if i % 3 == 0:
            box.ack([r.seq for r in box.claim(2)])
        assert box._intake is not None and box._intake.fill < 1.0
        generations.add(box._intake.generation)
    assert len(generations) > 5, "committed many times over"
    live = [r.seq for r in box.claim(10**6)]
    cut = power_cut(tmp_path, tmp_path / "cut")
    box.close()
    with open_box(cut) as again:
        assert seqs_of(again) == live
    with open_box(path) as again:
        assert seqs_of(again) == live


def test_a_reading_too_big_for_the_log_is_committed_with_the_batch(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(intake, "SIZE", 8192)
    path = tmp_path / "outbox.sqlite3"
    box = open_box(path)
    box.put([reading(0)])
    big = [dict(reading(i), note="x" * 100) for i in range(100)]       # ~20 kB: more than the log
    assert box.put(big) == list(range(2, 102))
    cut = power_cut(tmp_path, tmp_path / "cut")
    box.close()
    with open_box(cut) as again:
        assert seqs_of(again) == list(range(1, 102))


def test_status_with_the_service_stopped_counts_what_the_log_holds(tmp_path: Path) -> None:
    live = tmp_path / "live"
    st = Stamp(wall=1_795_000_000.0, mono=5.0, boot="b-1", synced=True)
    box = open_box(live / "outbox.sqlite3", max_rows=5)
    box.put([{**reading(0), "time": iso_epoch(st.wall)}], [st])
    box.flush_acks()                                            # committed
    for i in range(1, 8):                                       # seqs 2-8: 1-3 dropped for the bound
        box.put([{**reading(i), "time": iso_epoch(st.wall + i)}], [Stamp(st.wall + i, 5.0 + i, "b-1", True)])
    box.ack([4])
    box.put([reading(8)])                                       # seq 9, carries the ack of 4
    assert box.counts() == OutboxCounts(pending=5, dead=0, dropped=3)
    cut = power_cut(live, tmp_path / "cut")
    box.close()
    assert readonly.read_counts(cut) == OutboxCounts(pending=5, dead=0, dropped=3)
    assert readonly.read_oldest_wall(cut) == st.wall + 4, "seq 5: 1 (committed) to 3 dropped, 4 acked, in the log"
    with open_box(cut, max_rows=5) as again:
        assert again.counts() == OutboxCounts(pending=5, dead=0, dropped=3)
        assert seqs_of(again) == [5, 6, 7, 8, 9]


def test_a_damaged_or_short_intake_log_is_handled_once_and_nothing_committed_is_lost(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "outbox.sqlite3"
    log_path = tmp_path / "outbox.sqlite3.intake"
    with open_box(path) as box:
        box.put([reading(i) for i in range(3)])
    log_path.write_bytes(os.urandom(intake.SIZE))             # garbage: no valid record
    with open_box(path) as box:
        assert seqs_of(box) == [1, 2, 3]
        assert box.put([reading()]) == [4]
    # A short file (truncated): its valid records are used, the file is set aside once.
    cut = cut_after_two_puts(tmp_path)
    short = cut.with_name("outbox.sqlite3.intake")
    short.write_bytes(short.read_bytes()[:4096])
    with caplog.at_level(logging.ERROR, logger="agent.telemetry.intake"):
        with open_box(cut) as again:
            assert seqs_of(again) == [1, 2]
            assert again.put([reading(2)]) == [3]
    assert cut.with_name("outbox.sqlite3.intake.corrupt-1").exists()
    assert short.stat().st_size == intake.SIZE
    assert len([r for r in caplog.records if "intake log" in r.getMessage()]) == 1
    with open_box(cut) as again:
        assert seqs_of(again) == [1, 2, 3]
    assert not cut.with_name("outbox.sqlite3.intake.corrupt-2").exists()


def test_without_a_writable_intake_log_every_put_is_its_own_commit(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    (tmp_path / "outbox.sqlite3.intake").mkdir()              # cannot be opened as a file
    box = open_box(path)
    assert box._intake is None
    box.put([reading(0)])
    cut = power_cut(tmp_path, tmp_path / "cut")
    box.close()
    with open_box(cut) as again:
        assert seqs_of(again) == [1]


def test_sqlite_refusing_writes_in_the_open_transaction_loses_no_accepted_reading(tmp_path: Path) -> None:
    """The database full (``max_page_count``) while readings wait in the open transaction: puts
    are refused and counted, the accepted ones stay queued and delivered, and once there is room
    again a batch COMMIT takes them all."""
    from agent.telemetry.storage import StorageUnavailable

    t = [0.0]
    path = tmp_path / "outbox.sqlite3"
    box = open_box(path, monotonic=lambda: t[0])
    accepted = []
    for i in range(20):
        accepted += box.put([reading(i)])
    db = box._conn()
    db.execute(f"PRAGMA max_page_count={db.execute('PRAGMA page_count').fetchone()[0]}")
    with pytest.raises(StorageUnavailable):
        for i in range(2000):
            accepted += box.put([dict(reading(i), note="y" * 200)])
    box.count_lost(1)
    assert box.storage == "full"
    assert seqs_of(box) == accepted, "every accepted reading still queued"
    box.ack(accepted[:5])
    db.execute("PRAGMA max_page_count=1073741823")
    t[0] += 10.0
    accepted += box.put([reading(99)])
    assert box.storage == "ok"
    box._commit_batch()
    assert seqs_of(box) == accepted[5:]
    cut = power_cut(tmp_path, tmp_path / "cut")
    box.close()
    with open_box(cut) as again:
        assert seqs_of(again) == accepted[5:]
        assert again.counts().dropped == 1


_FULL_CHILD = """
import errno, json, sys
from pathlib import Path
from agent.telemetry.outbox import Outbox
from agent.telemetry.storage import StorageUnavailable
d = Path(sys.argv[1])
t = [0.0]
r = {"sensor": "cpu", "type": "cpu_temperature", "value": 1.0, "unit": "C", "time": "2026-11-25T14:39:32.123Z"}
box = Outbox(d / "outbox.sqlite3", "greenhouse-01", max_rows=10**6, max_bytes=10**9, reserve_bytes=64 * 1024,
             monotonic=lambda: t[0])
accepted = []
for _ in range(20):
    accepted += box.put([r])
with open(d / "filler", "wb", buffering=0) as f:
    try:
        while True:
            f.write(b"x" * 4096)
    except OSError as err:
        assert err.errno == errno.ENOSPC
refused = 0
for _ in range(3000):
    try:
        accepted += box.put([r])
    except StorageUnavailable:
        refused += 1
        box.count_lost(1)
        if refused >= 5:
            break
    t[0] += 0.01
full = box.storage
log_at_full = box._intake.fill
queued = [x.seq for x in box.claim(10**6)]
box.ack(queued[:10])                                    # delivered on the full disk
(d / "filler").unlink()
t[0] += 10.0
after = box.put([r])
storage_after = box.storage
box.close()
again = Outbox(d / "outbox.sqlite3", "greenhouse-01", max_rows=10**6, max_bytes=10**9)
print(json.dumps({"accepted": accepted, "refused": refused, "full": full, "queued": queued, "log": log_at_full,
                  "after": after, "storage_after": storage_after,
                  "restart": [x.seq for x in again.claim(10**6)], "dropped": again.counts().dropped}))
again.close()
"""


def test_a_full_disk_at_the_batch_commit_keeps_every_accepted_reading(tmp_path: Path) -> None:
    """A real full filesystem (a private 1 MiB tmpfs): the COMMIT at 3/4 of the log fails, puts
    go on into the log's last quarter (durable there), then are refused; the readings in the
    log stay queued (SQLite may have rolled the transaction back: applied again
    from the log), new ones are refused and counted, acks still work, and once there is room the
    batch commits and a restart finds exactly what was accepted and not acked."""
    if shutil.which("unshare") is None:
        missing("needs unshare (util-linux) for a private tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    script = f'mount -t tmpfs -o size=1M tmpfs "{mnt}" && exec "$@"'
    out = subprocess.run(["unshare", "-r", "-m", "sh", "-c", script, "sh", sys.executable, "-c", _FULL_CHILD,
                          str(mnt)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    assert got["full"] == "full" and got["refused"] >= 1
    assert got["log"] > 0.9, "puts were accepted into the log's last quarter after the COMMIT failed"
    assert len(got["accepted"]) > 300
    assert got["queued"] == got["accepted"], "nothing accepted was lost when the commit failed"
    assert got["storage_after"] == "ok"
    assert got["restart"] == got["accepted"][10:] + got["after"]
    assert got["dropped"] == got["refused"]
    assert "Traceback" not in out.stderr


def test_sd_wear_one_reading_a_minute_costs_about_one_4k_block(disk_path: Path) -> None:
    """Goal 4 of issue 14 (bench/bench_outbox.py measures it properly): one reading a minute,
    acked within the minute, each put durable: <= 4,500 B to the block device per reading,
    batch commits and checkpoints included."""
    t = [0.0]
    d = disk_path / "box"
    box = open_box(d / "outbox.sqlite3", monotonic=lambda: t[0])
    st = Stamp(wall=1_795_000_000.0, mono=1.0, boot="b-1", synced=True)
    box.put([{**reading(0), "time": iso_epoch(st.wall)}], [st])
    clean(d)
    start = written()
    n = 300
    for i in range(1, n + 1):
        t[0] += 60.0
        stamp = Stamp(st.wall + 60 * i, 1.0 + 60 * i, "b-1", True)
        box.put([{**reading(i), "time": iso_epoch(stamp.wall)}], [stamp])
        box.ack([r.seq for r in box.claim(10)])
        clean(d)
    box.close()
    clean(d)
    per_reading = (written() - start) / n
    assert 4096 <= per_reading <= 4500, per_reading


def test_the_open_transaction_never_spills_into_the_wal_between_commits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite writes an open transaction's pages to the WAL when they outgrow its page cache:
    wear the log was meant to save. An outage backlog queued and then drained in batches of
    500, with a log big enough that only ``BATCH_BYTES`` ends a batch: the WAL grows only at
    batch commits."""
    monkeypatch.setattr(intake, "SIZE", 1024 * 1024)
    path = tmp_path / "outbox.sqlite3"
    wal = tmp_path / "outbox.sqlite3-wal"
    box = open_box(path)
    seen: list[tuple[int, int]] = []

    def look() -> None:
        assert box._intake is not None
        seen.append((box._intake.generation, wal.stat().st_size))

    for i in range(3000):
        box.put([dict(reading(i), note="n" * (i % 40))])        # JSON rows, ~150 B
        look()
    while rows := box.claim(500):
        box.ack([r.seq for r in rows])
        look()
    box.close()
    for (gen_a, size_a), (gen_b, size_b) in zip(seen, seen[1:], strict=False):
        if gen_a == gen_b:
            assert size_a == size_b, f"the WAL grew from {size_a} to {size_b} B without a commit (gen {gen_a})"
    assert len({g for g, _ in seen}) > 5


def test_an_intake_log_deleted_while_running_is_replaced_and_nothing_accepted_is_lost(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Appends to a deleted log would reach a file nobody reads after a power cut: the
    uploader's check_file() notices (one stat), the batch is committed and a new log made."""
    live = tmp_path / "live"
    box = open_box(live / "outbox.sqlite3")
    box.put([reading(i) for i in range(3)])
    (live / "outbox.sqlite3.intake").unlink()
    with caplog.at_level(logging.ERROR, logger="agent.telemetry.outbox"):
        assert box.check_file() is False, "the database itself is still the file"
    assert "intake log outbox.sqlite3.intake deleted or replaced" in caplog.text
    assert (live / "outbox.sqlite3.intake").stat().st_size == intake.SIZE
    box.put([reading(3)])
    box.check_file()
    assert caplog.text.count("deleted or replaced") == 1
    cut = power_cut(live, tmp_path / "cut")
    box.close()
    with open_box(cut) as again:
        assert seqs_of(again) == [1, 2, 3, 4]


def test_a_filesystem_refusing_direct_writes_gets_plain_ones(disk_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Some filesystems open with O_DIRECT and then refuse the write (EINVAL): the record is
    written the plain way instead, and every one after it. (On a real disk, where O_DIRECT
    opens: tmpfs has none before Linux 6.6.)"""
    import errno

    log_file = intake.IntakeLog(disk_path / "x.intake")
    log_file.open()
    if not log_file._direct:
        log_file.close()
        pytest.skip(f"{disk_path}: no O_DIRECT on this filesystem")
    log_file.start(7, 1)
    real = os.pwrite
    refused = []

    def pwrite(fd: int, data: object, offset: int) -> int:
        if not refused:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(intake.os, "pwrite", pwrite)
    log_file.append(intake.payload([["m", [["k", 1]]]]))
    log_file.append(intake.payload([["m", [["k", 2]]]]))
    log_file.close()
    run = intake.read(disk_path / "x.intake")
    assert run is not None and refused == [0]
    assert run[0].records == [[["m", [["k", 1]]]], [["m", [["k", 2]]]]] and run[0].db_id == 7


def _stamped(sensor: str, wall: float, boot: str, value: float = 1.0) -> tuple[dict[str, object], Stamp]:
    """A reading as the sampler makes it (stored as a compact row: sensor and boot as numbers)."""
    return ({"sensor": sensor, "type": "temperature", "value": value, "unit": "C", "time": iso_epoch(wall)},
            Stamp(wall=wall, mono=wall - 1_795_000_000.0 + 5, boot=boot, synced=True))


@pytest.mark.parametrize("fate", ["deleted", "corrupt"])
def test_readings_replayed_into_a_new_database_keep_their_sensor_and_boot(tmp_path: Path, fate: str) -> None:
    """Compact rows name their sensor and boot by numbers the database defines (meta word:<n>).
    A log applied to a new database (the old one corrupt, or deleted while stopped) must carry
    what its rows' numbers mean, even when the database first learnt them in an earlier batch."""
    live = tmp_path / "live"
    box = open_box(live / "outbox.sqlite3")
    box.put(*map(list, zip(_stamped("greenhouse-air", 1_795_000_000.0, "boot-A"), strict=True)))
    box.flush_acks()                                   # the batch COMMIT: the words are in the database
    box.put(*map(list, zip(_stamped("greenhouse-air", 1_795_000_060.0, "boot-A", 21.5), strict=True)))
    cut = power_cut(live, tmp_path / "cut")
    box.close()
    for name in ("outbox.sqlite3", "outbox.sqlite3-wal"):
        f = cut.with_name(name)
        if f.exists():
            if fate == "deleted":
                f.unlink()
            else:
                f.write_bytes(b"\xa5" * f.stat().st_size)
    with open_box(cut) as again:
        again.put(*map(list, zip(_stamped("soil-probe", 1_795_000_120.0, "boot-B", 7.0), strict=True)))
        got = [(r.seq, r.reading["sensor"], r.reading["value"], r.stamp.boot if r.stamp else None)
               for r in again.claim(10)]
    assert got == [(2, "greenhouse-air", 21.5, "boot-A"), (3, "soil-probe", 7.0, "boot-B")]


def test_another_databases_rows_whose_words_the_log_does_not_define_are_counted_never_mislabelled(
        tmp_path: Path) -> None:
    """A log of another database whose rows use numbers it does not define (a log written before
    every generation defined them): this database has its own words under those numbers."""
    path = tmp_path / "outbox.sqlite3"
    with open_box(path) as box:
        box.put(*map(list, zip(_stamped("soil-probe", 1_795_000_000.0, "boot-B"), strict=True)))
    import base64
    import struct
    compact = base64.b64encode(b"\x01" + struct.pack("<Hd", 1, 21.5)).decode()
    records = [[["i", [[7, compact, 1_795_000_060.0, 65.0, "\x012", 1]]]],
               [["i", [[8, base64.b64encode(b'{"sensor":"x","value":2.0}').decode(), None, None, None, None]]]]]
    data = b"".join(intake.encode(intake.payload(ops), db_id=4242, generation=3, index=i)
                    for i, ops in enumerate(records))
    path.with_name("outbox.sqlite3.intake").write_bytes(data.ljust(intake.SIZE, b"\0"))
    with open_box(path) as box:
        got = [(r.seq, r.reading["sensor"]) for r in box.claim(10)]
        assert got == [(1, "soil-probe"), (8, "x")], "seq 7 is not stored as this database's soil-probe"
        assert box.counts().dropped == 1


_DELETED_LOG_FULL_DISK_CHILD = """
import errno, json, sys
from pathlib import Path
from agent.telemetry.outbox import Outbox
d, cut = Path(sys.argv[1]), Path(sys.argv[2])
r = {"sensor": "cpu", "type": "cpu_temperature", "value": 1.0, "unit": "C", "time": "2026-11-25T14:39:32.123Z"}
from agent.telemetry.storage import StorageUnavailable
reserve = int(sys.argv[3])
t = [0.0]
box = Outbox(d / "outbox.sqlite3", "greenhouse-01", max_rows=10**6, max_bytes=10**9, reserve_bytes=reserve,
             monotonic=lambda: t[0])
accepted = box.put([r])
box.flush_acks()
for i in range(40):
    accepted += box.put([dict(r, note="z" * 100)])      # in the log and the open transaction
with open(d / "filler", "wb", buffering=0) as f:
    try:
        while True:
            f.write(b"x" * 4096)
    except OSError as err:
        assert err.errno == errno.ENOSPC
(d / "outbox.sqlite3.intake").unlink()                  # an operator's cleanup
switched = box.check_file()
refused = 0
for i in range(3):
    try:
        accepted += box.put([r])
    except StorageUnavailable:
        refused += 1
if refused:                                             # room again (the operator sees the error)
    (d / "filler").unlink()
    t[0] += 10.0
    accepted += box.put([r])
for name in ("outbox.sqlite3", "outbox.sqlite3-wal", "outbox.sqlite3.intake", "outbox.sqlite3.meta.json"):
    if (d / name).is_file():                            # the power cut: the files as they are now
        (cut / name).write_bytes((d / name).read_bytes())
print(json.dumps({"accepted": accepted, "switched": switched, "refused": refused}))
"""


@pytest.mark.parametrize("reserve", [128 * 1024, 0])
def test_an_intake_log_deleted_on_a_full_disk_is_made_again_from_memory(tmp_path: Path, reserve: int) -> None:
    """A real full filesystem (a private 1 MiB tmpfs) where the batch COMMIT cannot be made:
    the deleted log is written again from the image in memory (with the storage reserve's room),
    so the readings accepted before and after are all found after a power cut. Without a
    reserve it cannot be: new readings are refused (never appended to the unlinked file) until
    there is room, and then nothing accepted is missing."""
    if shutil.which("unshare") is None:
        missing("needs unshare (util-linux) for a private tmpfs")
    mnt, cut = tmp_path / "small", tmp_path / "cut"
    mnt.mkdir()
    cut.mkdir()
    script = f'mount -t tmpfs -o size=1M tmpfs "{mnt}" && exec "$@"'
    out = subprocess.run(["unshare", "-r", "-m", "sh", "-c", script, "sh", sys.executable, "-c",
                          _DELETED_LOG_FULL_DISK_CHILD, str(mnt), str(cut), str(reserve)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    assert got["switched"] is False
    assert (got["refused"], len(got["accepted"])) == ((0, 44) if reserve else (3, 42)), out.stderr[-2000:]
    with open_box(cut / "outbox.sqlite3") as again:
        assert seqs_of(again) == got["accepted"], "every reading a put accepted survives the power cut"
    assert "made again from memory" in out.stderr
    assert out.stderr.count("cannot be made again") == (0 if reserve else 1), "one line, not one a put"
    assert "Traceback" not in out.stderr


def test_a_put_right_after_the_log_was_deleted_makes_it_again_before_it_returns(tmp_path: Path) -> None:
    """Between the deletion and the uploader's next check_file() a put must not append to the
    unlinked file (one fstat a put notices it)."""
    live = tmp_path / "live"
    box = open_box(live / "outbox.sqlite3")
    box.put([reading(i) for i in range(3)])
    (live / "outbox.sqlite3.intake").unlink()
    box.put([reading(3)])
    cut = power_cut(live, tmp_path / "cut")
    box.close()
    with open_box(cut) as again:
        assert seqs_of(again) == [1, 2, 3, 4]


def test_dead_letter_commands_with_the_service_stopped_after_a_crash_see_and_keep_what_the_log_holds(
        tmp_path: Path) -> None:
    """`dead-letter list|purge` with no service after a kill: the log's records (a loss counted,
    a put) are applied first, so `list` agrees with `status` and the purge's count is not
    overwritten by the log's `dropped` at the next start."""
    import io

    from agent.telemetry import dead_letters

    live = tmp_path / "live"
    box = open_box(live / "outbox.sqlite3")
    box.put([reading(i) for i in range(3)])
    box.dead_letter([1], "HTTP 422")           # committed at once
    box.count_lost(2, "put failed")            # dropped 2: an intake record
    box.put([reading(9)])
    cut = power_cut(live, tmp_path / "cut")
    box.close()
    assert readonly.read_counts(cut) == OutboxCounts(pending=3, dead=1, dropped=2)
    out = io.StringIO()
    assert dead_letters.run(cut, DEVICE, "list", out=out) == 0
    assert "1 dead-lettered; 2 dropped in total" in out.getvalue()
    assert dead_letters.run(cut, DEVICE, "purge", out=io.StringIO()) == 0
    assert readonly.read_counts(cut) == OutboxCounts(pending=3, dead=0, dropped=3)
    with open_box(cut) as again:
        assert again.counts() == OutboxCounts(pending=3, dead=0, dropped=3), "2 lost + 1 purged"
        assert seqs_of(again) == [2, 3, 4]


_UNUSABLE_LOG_CHILD = """
import errno, json, os, sys
from pathlib import Path
from agent.telemetry.outbox import Outbox
d = Path(sys.argv[1])
r = {"sensor": "cpu", "type": "cpu_temperature", "value": 1.0, "unit": "C", "time": "2026-11-25T14:39:32.123Z"}
def box():
    return Outbox(d / "outbox.sqlite3", "greenhouse-01", max_rows=10**6, max_bytes=10**9, reserve_bytes=0)
def seen(b):
    return {"seqs": [x.seq for x in b.claim(100)], "dropped": b.counts().dropped, "log": b._intake is not None}
b = box()
b.put([r] * 3)
b.flush_acks()                          # seq 1-3 committed
b.put([r] * 2)
b.count_lost(2)                         # then killed: no close
b._intake.close()
b._db.close()
os.truncate(d / "outbox.sqlite3.intake", 32 * 1024)   # the wrong size (its records still readable)
with open(d / "filler", "wb", buffering=0) as f:
    try:
        while True:
            f.write(b"x" * 4096)
    except OSError as err:
        assert err.errno == errno.ENOSPC
with open(d / "filler-2", "wb", buffering=0) as f:
    try:
        while True:
            f.write(b"x" * 4096)
    except OSError as err:
        assert err.errno == errno.ENOSPC
out = {}
with box() as b:                        # no room at all
    out["full"] = seen(b)
os.truncate(d / "filler", os.path.getsize(d / "filler") - 40 * 1024)
with box() as b:                        # room for a commit, not for a new 64 KiB log
    out["no_log"] = seen(b)
    b.count_lost(1)                     # committed on its own: the log must not set it back
(d / "filler").unlink()
with box() as b:                        # room again: a log is made; nothing applied twice
    b.put([r])
    out["later"] = seen(b)
print(json.dumps(out))
"""


def test_records_of_a_log_that_cannot_be_used_at_start_are_applied_once(tmp_path: Path) -> None:
    """A log of the wrong size on a full disk (a real 1 MiB tmpfs): no new log can be made, so it
    stays where it is until its records are applied (the database can commit again), and they
    are not applied again at a later start (dropped and seq would go backwards)."""
    if shutil.which("unshare") is None:
        missing("needs unshare (util-linux) for a private tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    script = f'mount -t tmpfs -o size=1M tmpfs "{mnt}" && exec "$@"'
    out = subprocess.run(["unshare", "-r", "-m", "sh", "-c", script, "sh", sys.executable, "-c",
                          _UNUSABLE_LOG_CHILD, str(mnt)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    assert got["full"]["seqs"][:3] == [1, 2, 3]
    assert got["no_log"] == {"seqs": [1, 2, 3, 4, 5], "dropped": 2, "log": False}, out.stderr[-2000:]
    assert got["later"] == {"seqs": [1, 2, 3, 4, 5, 6], "dropped": 3, "log": True}
    assert "Traceback" not in out.stderr


def test_corruption_found_at_start_counts_what_the_log_did_not_bring_back_once(tmp_path: Path) -> None:
    """The database is corrupt at the next start (its meta table damaged; the outbox table still
    readable in the aside copy) and the intake log holds an ack, new readings and the dropped
    count: the new database gets them from the log, and only the rows that neither came back nor
    were acked are added to dropped (not the log's rows, not the old dropped count again)."""
    import sqlite3

    live = tmp_path / "live"
    path = live / "outbox.sqlite3"
    with open_box(path) as box:
        box.put([reading(i) for i in range(5)])              # seq 1-5, committed at close
        box.count_lost(2, "put failed")                      # dropped 2, committed at close
    box = open_box(path)
    box.ack([1, 2])                                          # held: goes with the next put's record
    box.put([reading(5), reading(6)])                        # seq 6-7, in the log only
    box.count_lost(1, "put failed")                          # dropped 3, in the log only
    cut = power_cut(live, tmp_path / "cut")
    box.close()
    db = sqlite3.connect(cut)
    root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'meta'").fetchone()[0]
    size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    cut.with_name("outbox.sqlite3-wal").unlink(missing_ok=True)
    with cut.open("r+b") as f:
        f.seek((root - 1) * size)
        f.write(b"\xff" * size)
    with open_box(cut) as again:
        assert again.corrupt_replaced == 1
        assert seqs_of(again) == [6, 7], "the log's readings are in the new database"
        assert again.counts().dropped == 3 + 3, "3 counted before (from the log) + seq 3-5 lost"


@pytest.mark.parametrize("newer", ["operation", "format"])
def test_a_record_this_agent_cannot_read_ends_the_log_there_with_one_error_and_no_crash(
        tmp_path: Path, newer: str, caplog: pytest.LogCaptureFixture) -> None:
    """After a downgrade the log may hold a whole record (its CRC right) with an operation or a
    format this agent does not know: the records before it are applied, it and what follows are
    set aside (one ERROR line), `status` and the service start as usual."""
    cut = cut_after_two_puts(tmp_path)
    log_path = cut.with_name("outbox.sqlite3.intake")
    run = intake.read(log_path)[0]
    body = intake.payload([["x", [[1, 2]]]] if newer == "operation" else [["m", [["k", 1]]]])
    record = bytearray(intake.encode(body, db_id=run.db_id, generation=run.generation, index=len(run.records)))
    if newer == "format":
        record[3] = 1                                       # format 1 in the length's top byte
        record[4:8] = intake.zlib.crc32(bytes(record[8:])).to_bytes(4, "little")
    with log_path.open("r+b") as f:
        f.seek(run.end)
        f.write(record)
    assert readonly.read_counts(cut) == OutboxCounts(pending=2, dead=0, dropped=0)
    with caplog.at_level(logging.ERROR, logger="agent.telemetry"):
        with open_box(cut) as again:
            assert seqs_of(again) == [1, 2]
            assert again.put([reading(2)]) == [3]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "not applied" in errors[0].getMessage() and not errors[0].exc_info
    assert cut.with_name("outbox.sqlite3.intake.corrupt-1").exists(), "kept as evidence"
    with open_box(cut) as again:
        assert seqs_of(again) == [1, 2, 3]


def test_rebuilding_the_open_transaction_does_not_count_its_bytes_twice(tmp_path: Path) -> None:
    """SQLite rolling the open transaction back (an error) makes the outbox apply the log's
    records again; they are the same bytes, so the batch must not come due sooner (SD wear)."""
    with open_box(tmp_path / "outbox.sqlite3") as box:
        for i in range(5):
            box.put([dict(reading(i), note="z" * 200)])
        before = box._batch_bytes
        assert before > 1000
        box._conn().execute("ROLLBACK")                   # as SQLite does after some errors
        assert seqs_of(box) == [1, 2, 3, 4, 5], "rebuilt from the log"
        assert box._batch_bytes == before
