"""The durable queue: seq rules, bounds, dead letters, corruption, concurrency, SIGKILL."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agent.state import AgentState, OutboxCounts
from agent.telemetry import readonly
from agent.telemetry.outbox import SEQ_BLOCK, Outbox
from tests.fixtures.api import DEVICE, reading
from tests.outbox_files import counts_on_disk

BIG = 10**9


def open_box(path: Path, **kw: int) -> Outbox:
    return Outbox(path, DEVICE, max_rows=kw.get("max_rows", 1_000_000), max_bytes=kw.get("max_bytes", BIG))


def test_put_assigns_seq_from_one_and_claim_is_oldest_first(outbox: Outbox) -> None:
    assert outbox.put([reading(0), reading(1)]) == [1, 2]
    assert outbox.put([reading(2)]) == [3]
    rows = outbox.claim(2)
    assert [r.seq for r in rows] == [1, 2]
    assert rows[0].reading == {"id": f"{DEVICE}:1", "seq": 1, **reading(0)}
    outbox.ack([1])
    assert [r.seq for r in outbox.claim(10)] == [2, 3]
    assert outbox.counts() == OutboxCounts(pending=2, dead=0, dropped=0)


def test_dead_letter_keeps_rows_visible_and_queue_moves_on(outbox: Outbox) -> None:
    outbox.put([reading(i) for i in range(5)])
    outbox.dead_letter([1, 2], "HTTP 400 invalid_request")
    assert [r.seq for r in outbox.claim(10)] == [3, 4, 5]
    assert outbox.counts() == OutboxCounts(pending=3, dead=2, dropped=0)
    dead = outbox.dead_rows()
    why = "HTTP 400 invalid_request"
    assert [(s, w) for s, w, _ in dead] == [(1, why), (2, why)]
    assert dead[0][2]["id"] == f"{DEVICE}:1"


def test_seq_never_reused_after_restart_even_when_everything_was_acked(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    box = open_box(path)
    box.put([reading(i) for i in range(7)])
    box.ack(range(1, 8))
    box.close()
    box = open_box(path)
    assert box.put([reading()]) == [8]
    assert box.counts().pending == 1
    box.close()


def test_overflow_drops_oldest_counts_them_persistently_and_keeps_seq(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    box = open_box(path, max_rows=5)
    for i in range(8):
        box.put([reading(i)])
    assert box.counts() == OutboxCounts(pending=5, dead=0, dropped=3)
    assert [r.seq for r in box.claim(10)] == [4, 5, 6, 7, 8]
    box.ack([4, 5, 6, 7, 8])
    box.close()
    box = open_box(path, max_rows=5)
    assert box.counts() == OutboxCounts(pending=0, dead=0, dropped=3)
    assert box.put([reading()]) == [9]
    box.close()


def test_byte_bound_drops_oldest(tmp_path: Path) -> None:
    one = len(json.dumps(reading(), ensure_ascii=False, separators=(",", ":")).encode())
    box = open_box(tmp_path / "o.sqlite3", max_bytes=one * 10)
    for i in range(25):
        box.put([reading(i)])
    counts = box.counts()
    assert counts.pending + counts.dropped == 25
    assert box.pending_bytes <= one * 10
    assert counts.pending >= 9
    assert box.claim(1)[0].seq == 25 - counts.pending + 1
    box.close()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_file_is_moved_aside_and_seq_continues(tmp_path: Path, damage: str,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "outbox.sqlite3"
    box = open_box(path)
    for _ in range(40):
        box.put([reading(i) for i in range(25)])
    last = box.next_seq - 1
    box.close()
    if damage == "garbage":
        path.write_bytes(os.urandom(64 * 1024))
    else:
        with path.open("r+b") as f:
            f.truncate(path.stat().st_size // 2)
    state = AgentState()
    with caplog.at_level(logging.ERROR, logger="agent.telemetry.outbox"):
        box = Outbox(path, DEVICE, max_rows=1_000_000, max_bytes=BIG, state=state)
    assert (tmp_path / "outbox.sqlite3.corrupt-1").exists()
    assert box.corrupt_replaced == 1
    assert "corrupt" in caplog.text and "corrupt-1" in caplog.text
    assert state.snapshot.notice and "corrupt" in state.snapshot.notice
    seqs = box.put([reading()])
    assert seqs[0] > last, "a seq the old database handed out must never be handed out again"
    assert box.counts().pending == 1
    box.close()
    # The replacement is a working database: a restart continues from it.
    box = open_box(path)
    assert box.put([reading()]) == [seqs[0] + 1]
    assert box.corrupt_replaced == 1
    box.close()


def test_corruption_found_while_running_is_replaced_and_lost_rows_counted(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    box = open_box(path)
    for _ in range(30):
        box.put([reading(i) for i in range(50)])
    # White-box: commit the batch, push everything into the main file and keep SQLite's page
    # cache tiny, so the damage below is read from disk (as it would be after days of running).
    box._commit_batch(reopen=False)
    box._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    box._conn().execute("PRAGMA cache_size=1")
    box._conn().execute("PRAGMA shrink_memory")
    with path.open("r+b") as f:
        f.seek(4096)
        f.write(os.urandom(path.stat().st_size - 4096))
    rescued = box.claim(2000)
    assert box.corrupt_replaced == 1 and (tmp_path / "outbox.sqlite3.corrupt-1").exists()
    counts = box.counts()
    assert counts.pending == len(rescued) and counts.pending + counts.dropped == 1500, \
        "lost readings are accounted for (those still in the intake log are applied to the new file)"
    assert [r.seq for r in rescued] == list(range(1501 - len(rescued), 1501)), "the newest, in order"
    assert box.put([reading()])[0] > 1500
    box.close()
    with open_box(path) as again:
        assert again.counts().dropped == counts.dropped


def test_constraint_errors_never_replace_a_good_database(outbox: Outbox, tmp_path: Path) -> None:
    import sqlite3

    outbox.put([reading()])
    with pytest.raises(sqlite3.IntegrityError):
        outbox._retry_corrupt(lambda: outbox._conn().execute("INSERT INTO outbox (seq, payload) VALUES (1, x'00')"))
    assert outbox.corrupt_replaced == 0 and outbox.counts().pending == 1
    assert not list(tmp_path.glob("*.corrupt-*"))


def test_second_corruption_gets_a_new_name_and_seq_still_grows(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    seen: list[int] = []
    for _ in range(2):
        box = open_box(path)
        seen += box.put([reading(i) for i in range(3)])
        box.close()
        path.write_bytes(b"not a database" * 100)
    box = open_box(path)
    seen += box.put([reading()])
    box.close()
    assert len(seen) == len(set(seen)) and seen == sorted(seen)
    assert (tmp_path / "outbox.sqlite3.corrupt-1").exists()
    assert (tmp_path / "outbox.sqlite3.corrupt-2").exists()


def test_deleted_database_does_not_restart_seq_at_one(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    box = open_box(path)
    box.put([reading()])
    box.close()
    path.unlink()
    box = open_box(path)
    assert box.put([reading()]) == [SEQ_BLOCK + 2]
    box.close()


def test_the_open_outbox_is_its_own_and_every_accepted_reading_is_on_disk(outbox: Outbox,
                                                                         tmp_path: Path) -> None:
    """locking_mode=EXCLUSIVE: no other connection gets in while the service has it (`status`
    reads status.json, `dead-letter` asks the service), no -shm index is written next to it, and
    a copy of its files at any instant (what a power cut leaves) holds every reading ``put``
    accepted."""
    import sqlite3

    path = tmp_path / "outbox.sqlite3"
    outbox.put([reading(i) for i in range(4)])
    outbox.dead_letter([1], "bad")
    other = sqlite3.connect(path, timeout=0)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        other.execute("SELECT count(*) FROM outbox").fetchone()
    other.close()
    assert not (tmp_path / "outbox.sqlite3-shm").exists()
    assert counts_on_disk(path) == outbox.counts() == OutboxCounts(3, 1, 0)
    assert outbox.put([reading()]) == [5], "the writer is undisturbed"
    assert counts_on_disk(path) == OutboxCounts(4, 1, 0)
    assert readonly.read_counts(tmp_path / "missing.sqlite3") == OutboxCounts()


def test_acks_ride_on_the_next_put_and_are_never_handed_out_again(tmp_path: Path) -> None:
    """SD wear: an ack is held in memory and written by the next put's transaction (one commit a
    minute on a box sampling once a minute); claim/counts/oldest treat it as gone at once. A power
    cut before that put only sends the reading again (the receiver de-duplicates by id)."""
    from agent.telemetry.outbox import ACK_HOLD_MAX, ACK_HOLD_S

    t = [0.0]
    path = tmp_path / "outbox.sqlite3"
    box = Outbox(path, DEVICE, max_rows=1000, max_bytes=10**7, monotonic=lambda: t[0])
    box.put([reading(i) for i in range(3)])
    box.ack([1, 2])
    assert [r.seq for r in box.claim(10)] == [3]
    assert box.counts() == OutboxCounts(pending=1, dead=0, dropped=0)
    assert box.oldest() is not None and box.oldest().seq == 3
    assert counts_on_disk(path).pending == 3, "held: not written on their own"
    assert box.put([reading(9)]) == [4]
    assert counts_on_disk(path).pending == 2, "written with the put"
    box.ack([3])
    t[0] += ACK_HOLD_S                                  # no put for a while: the next claim writes it
    assert [r.seq for r in box.claim(10)] == [4]
    assert counts_on_disk(path).pending == 1
    box.ack([4])
    box.close()                                         # a clean stop writes what is held
    assert counts_on_disk(path).pending == 0
    with Outbox(path, DEVICE, max_rows=1000, max_bytes=10**7) as again:
        assert again.put([reading()]) == [5], "seq continues after an outbox emptied by acks"
        many = again.put([reading(i) for i in range(ACK_HOLD_MAX + 1)])
        again.ack(many)                                 # a backlog draining: written at once
        assert counts_on_disk(path).pending == 1


def test_read_counts_when_the_service_is_stopped_or_the_file_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    with open_box(path) as box:
        box.put([reading(i) for i in range(3)])
    assert readonly.read_counts(path) == OutboxCounts(pending=3, dead=0, dropped=0)
    path.write_bytes(b"\0garbage" * 1000)
    assert readonly.read_counts(path) == OutboxCounts()


def test_device_id_change_dead_letters_old_rows(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    box = open_box(path)
    box.put([reading(), reading()])
    box.close()
    box = Outbox(path, "renamed-01", max_rows=100, max_bytes=BIG)
    assert box.counts() == OutboxCounts(pending=0, dead=2, dropped=0)
    assert box.put([reading()]) == [1]
    assert box.claim(1)[0].reading["id"] == "renamed-01:1"
    box.close()


def test_concurrent_put_and_ack_lose_nothing(outbox: Outbox) -> None:
    done = threading.Event()
    acked: list[int] = []

    def producer() -> None:
        for i in range(200):
            outbox.put([reading(i), reading(i, "other")])
        done.set()

    def consumer() -> None:
        while not (done.is_set() and outbox.counts().pending == 0):
            rows = outbox.claim(37)
            outbox.ack([r.seq for r in rows])
            acked.extend(r.seq for r in rows)

    threads = [threading.Thread(target=producer), threading.Thread(target=consumer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(acked) == list(range(1, 401))


_KILL_CHILD = """
import sys
from pathlib import Path
from agent.telemetry.outbox import Outbox
box = Outbox(Path(sys.argv[1]), "greenhouse-01", max_rows=10**6, max_bytes=10**9)
r = {"sensor": "cpu", "type": "cpu_temperature", "value": 1.0, "unit": "C",
     "time": "2026-11-25T14:39:32.123Z"}
while True:
    seqs = box.put([r, r])
    print(seqs[-1], flush=True)
"""


def test_put_survives_sigkill(tmp_path: Path) -> None:
    """Whatever put() returned before a SIGKILL is in the database afterwards."""
    path = tmp_path / "outbox.sqlite3"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    confirmed = 0
    for line in proc.stdout:
        confirmed = int(line)
        if confirmed >= 60:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdout.close()
    box = open_box(path)
    pending = [r.seq for r in box.claim(10**6)]
    assert pending[:confirmed] == list(range(1, confirmed + 1))
    assert box.put([reading()])[0] == pending[-1] + 1
    box.close()


def test_corrupt_at_start_but_partly_readable_counts_the_lost_rows_as_dropped(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "outbox.sqlite3"
    with Outbox(path, DEVICE, max_rows=1000, max_bytes=BIG) as box:
        for _ in range(12):
            box.put([reading(i) for i in range(100)])          # 1200 queued, 200 dropped (bound)
        box.dead_letter(range(201, 501), "HTTP 400")            # the dead table spans many pages
        assert box.counts() == OutboxCounts(pending=700, dead=300, dropped=200)
    # Damage only the dead-letter table: the service cannot open the file, but SQLite can still
    # count the outbox table of the moved-aside copy.
    db = sqlite3.connect(path)
    root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'dead'").fetchone()[0]
    size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    with path.open("r+b") as f:
        f.seek((root - 1) * size)
        f.write(b"\xff" * size)
    state = AgentState()
    box = Outbox(path, DEVICE, max_rows=1000, max_bytes=BIG, state=state)
    assert box.corrupt_replaced == 1
    assert box.counts() == OutboxCounts(pending=0, dead=0, dropped=700 + 200)
    assert state.snapshot.notice and "900 readings lost" in state.snapshot.notice
    box.close()
    assert readonly.read_counts(path).dropped == 900, "persisted in the new database"


def test_corrupt_at_start_and_unreadable_says_the_loss_could_not_be_counted(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    with open_box(path) as box:
        box.put([reading(i) for i in range(10)])
    path.write_bytes(os.urandom(16 * 1024))
    state = AgentState()
    with Outbox(path, DEVICE, max_rows=1000, max_bytes=BIG, state=state) as box:
        assert box.corrupt_replaced == 1 and box.counts().dropped == 0
    assert state.snapshot.notice and "could not be counted" in state.snapshot.notice


def test_count_lost_after_a_side_file_write_error(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    box = open_box(path)
    box.put([reading()])                                       # reserves seqs up to SEQ_BLOCK + 1
    side = path.with_name(path.name + ".meta.json")
    side.unlink()
    side.mkdir()                                               # the next reservation cannot be written
    batch = [reading(i) for i in range(SEQ_BLOCK + 5)]
    with pytest.raises(OSError):
        box.put(batch)
    assert box.count_lost(len(batch)) is True
    assert box.counts() == OutboxCounts(pending=1, dead=0, dropped=SEQ_BLOCK + 5)
    box.close()
    assert readonly.read_counts(path).dropped == SEQ_BLOCK + 5


def test_dead_letter_table_is_bounded_oldest_dropped_and_counted(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite3", DEVICE, max_rows=1000, max_bytes=10**7,
                 dead_max_rows=5, dead_max_bytes=10**6)
    box.put([reading(i) for i in range(12)])
    box.dead_letter([1, 2, 3, 4], "HTTP 422 a")
    box.dead_letter([5, 6, 7], "HTTP 422 b")
    assert box.counts() == OutboxCounts(pending=5, dead=5, dropped=2)
    assert [s for s, _, _ in box.dead_rows()] == [3, 4, 5, 6, 7]
    # ... and by bytes: one more row of ~1 kB pushes out as many old ones as needed.
    small = Outbox(tmp_path / "b.sqlite3", DEVICE, max_rows=1000, max_bytes=10**7,
                   dead_max_rows=100, dead_max_bytes=2000)
    small.put([reading(i) for i in range(10)])
    small.dead_letter(range(1, 11), "x" * 150)
    dead = small.counts().dead
    assert 0 < dead < 10 and small.counts().dropped == 10 - dead
    small.close()
    box.close()
    with Outbox(tmp_path / "o.sqlite3", DEVICE, max_rows=1000, max_bytes=10**7) as again:
        assert again.counts() == OutboxCounts(pending=5, dead=5, dropped=2), "persistent"


def test_new_outbox_has_small_pages_and_an_old_file_is_rebuilt_with_them(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """SD wear: every durable put appends one WAL frame per changed page, so a new file gets
    PAGE_SIZE pages, and a small file an older agent made (4 KiB pages) is rebuilt with them,
    nothing lost; a big one (a backlog) is used as it is."""
    import sqlite3

    from agent.telemetry import outbox as module
    from agent.telemetry.outbox import PAGE_SIZE

    with open_box(tmp_path / "new.sqlite3") as box:
        box.put([reading(1)])
    db = sqlite3.connect(tmp_path / "new.sqlite3")
    assert db.execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE == 512
    db.close()

    def old_file(name: str) -> Path:
        path = tmp_path / name
        with open_box(path) as box:
            box.put([reading(1)])
            box.dead_letter([1], "HTTP 422 x")
            box.put([reading(2)])
        db = sqlite3.connect(path)       # as an older agent would have made it: 4 KiB pages
        db.execute("PRAGMA journal_mode=DELETE")
        db.execute("PRAGMA page_size=4096")
        db.execute("VACUUM")
        assert db.execute("PRAGMA page_size").fetchone()[0] == 4096
        db.close()
        return path

    for name, limit, pages in (("small.sqlite3", module.REPAGE_MAX_BYTES, PAGE_SIZE), ("big.sqlite3", 4096, 4096)):
        monkeypatch.setattr(module, "REPAGE_MAX_BYTES", limit)
        path = old_file(name)
        with open_box(path) as box:
            assert box.put([reading(3)]) == [3]
            assert [r.seq for r in box.claim(10)] == [2, 3] and box.counts().dead == 1
        db = sqlite3.connect(path)
        assert db.execute("PRAGMA page_size").fetchone()[0] == pages, name
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.close()


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_an_outbox_file_deleted_or_replaced_while_running_is_noticed_counted_and_seq_continues(
        tmp_path: Path, how: str) -> None:
    from agent.state import AgentState

    state = AgentState()
    path = tmp_path / "outbox.sqlite3"
    box = Outbox(path, DEVICE, max_rows=1000, max_bytes=10**7, state=state)
    box.put([reading(i) for i in range(7)])
    box.dead_letter([1], "HTTP 422 x")
    assert box.check_file() is False, "nothing happened: nothing to do"
    if how == "deleted":
        path.unlink()
    else:
        other = tmp_path / "restored.sqlite3"
        with Outbox(other, DEVICE, max_rows=10, max_bytes=10**6):
            pass
        os.replace(other, path)
    assert box.check_file() is True
    assert box.counts() == OutboxCounts(pending=0, dead=0, dropped=7), "6 pending + 1 dead, counted"
    assert [box.put([reading()])] == [[8]], "seq continues"
    assert state.snapshot.notice and f"outbox file {how}" in state.snapshot.notice
    assert path.exists() and box.check_file() is False
    box.close()
    with Outbox(path, DEVICE, max_rows=1000, max_bytes=10**7) as again:
        assert again.counts() == OutboxCounts(pending=1, dead=0, dropped=7), "on disk, in the new file"
        assert [r.seq for r in again.claim(10)] == [8]


def test_acks_that_cannot_be_written_are_kept_in_memory_and_written_when_storage_returns(
        tmp_path: Path) -> None:
    """SQLite refusing writes (here ``query_only``, as on a filesystem gone read-only): a delivered
    batch is never handed out again, the readings that cannot be stored are counted, and all of it
    reaches the file once writes work again."""
    from agent.state import AgentState
    from agent.telemetry.storage import StorageUnavailable

    t = [0.0]
    state = AgentState()
    path = tmp_path / "outbox.sqlite3"
    box = Outbox(path, DEVICE, max_rows=1000, max_bytes=10**7, state=state, monotonic=lambda: t[0])
    box.put([reading(i) for i in range(10)])
    box._conn().execute("PRAGMA query_only=ON")
    with pytest.raises(StorageUnavailable):
        box.put([reading()])
    box.count_lost(1)
    assert box.storage == "read_only" and state.snapshot.storage == "read_only"
    batch = box.claim(4)
    box.ack([r.seq for r in batch])                     # delivered; the ack cannot be written
    box.dead_letter([5], "HTTP 422 x")
    assert [r.seq for r in box.claim(10)] == [6, 7, 8, 9, 10], "never handed out again"
    assert box.counts() == OutboxCounts(pending=5, dead=1, dropped=1)
    assert counts_on_disk(path) == OutboxCounts(pending=10, dead=0, dropped=0), "not on disk yet"
    with pytest.raises(StorageUnavailable):
        box.put([reading()])                            # refused at once, no write attempted
    box._conn().execute("PRAGMA query_only=OFF")
    t[0] += 10.0                                        # the next look for room
    assert box.put([reading()]) == [11]
    assert box.storage == "ok" and state.snapshot.storage == "ok"
    assert counts_on_disk(path) == OutboxCounts(pending=6, dead=1, dropped=1)
    assert [r.seq for r in box.claim(10)] == [6, 7, 8, 9, 10, 11]
    box.close()


def test_a_sampled_reading_is_a_compact_row_and_comes_back_exactly_as_it_went_in(tmp_path: Path) -> None:
    """SD wear: a stamped reading as the sampler makes it is stored in ~40 bytes (kind and boot as
    numbers, its time the stamp's); claim gives back the very same reading and stamp, also after a
    reopen and for rows dead-lettered and retried. Anything else is stored as the JSON it was."""
    import sqlite3

    from agent.clock import Stamp, iso_epoch

    path = tmp_path / "outbox.sqlite3"
    st = Stamp(wall=1_795_000_000.125, mono=321.5, boot="0f4c2a9e-6b1d-4d3e-9a57-2c8e1b7f6a10", synced=True)
    sampled = {"sensor": "bme.temperature", "type": "bme280", "value": 21.37, "unit": "°C",
               "time": iso_epoch(st.wall)}
    odd = {"sensor": "x", "type": "simulated", "value": 3, "unit": "", "time": "2026-11-25T14:39:32.123Z"}
    with Outbox(path, DEVICE, max_rows=100, max_bytes=10**6) as box:
        assert box.put([sampled, odd, dict(sampled, value=-0.5)], [st, st, st]) == [1, 2, 3]
        box.dead_letter([3], "HTTP 422 x")
    db = sqlite3.connect(path)
    sizes = dict(db.execute("SELECT seq, length(payload) + length(boot) FROM outbox"))
    db.close()
    assert sizes[1] <= 16, "kind number + value, boot number"
    assert sizes[2] > 60, "not as the sampler makes it (an int value): JSON"
    with Outbox(path, DEVICE, max_rows=100, max_bytes=10**6) as box:
        rows = box.claim(10)
        assert [r.reading for r in rows] == [{"id": f"{DEVICE}:1", "seq": 1, **sampled},
                                             {"id": f"{DEVICE}:2", "seq": 2, **odd}]
        assert [r.stamp for r in rows] == [st, st]
        assert box.dead_rows()[0][2]["value"] == -0.5
        box.dead_letter([1, 2], "HTTP 422 y")
        box.using_connection(lambda db: db.execute("INSERT INTO outbox SELECT seq, payload, wall, mono, boot, "
                                                   "synced FROM dead WHERE seq = 3"))
        assert [(r.reading["value"], r.stamp) for r in box.claim(10)] == [(-0.5, st)]


def test_a_failed_put_leaves_no_half_known_sensor_behind(tmp_path: Path) -> None:
    """A new sensor's number is written in the put's own transaction: when that rolls back, the
    number is not remembered either, so the next put writes it again."""
    from agent.clock import Stamp, iso_epoch
    from agent.telemetry.storage import StorageUnavailable

    t = [0.0]
    path = tmp_path / "outbox.sqlite3"
    st = Stamp(wall=1_795_000_000.0, mono=1.0, boot="b-1", synced=False)
    fresh = {"sensor": "new", "type": "simulated", "value": 1.0, "unit": "", "time": iso_epoch(st.wall)}
    box = Outbox(path, DEVICE, max_rows=100, max_bytes=10**6, monotonic=lambda: t[0])
    box._conn().execute("PRAGMA query_only=ON")
    with pytest.raises(StorageUnavailable):
        box.put([fresh], [st])
    box._conn().execute("PRAGMA query_only=OFF")
    t[0] += 10.0
    assert box.put([fresh], [st]) == [1]
    box.close()
    with Outbox(path, DEVICE, max_rows=100, max_bytes=10**6) as again:
        assert again.claim(1)[0].reading["sensor"] == "new"


def test_oldest_without_waiting_says_busy_while_a_put_holds_the_outbox(outbox: Outbox) -> None:
    """The health figures ask with wait=False: a put, retry or busy database never stalls them."""
    outbox.put([reading(0)])
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with outbox._lock:          # what a put's fsync or a dead-letter retry holds
            holding.set()
            release.wait(5)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert holding.wait(5)
        with pytest.raises(TimeoutError):
            outbox.oldest(wait=False)
    finally:
        release.set()
        t.join()
    row = outbox.oldest(wait=False)
    assert row is not None and row.seq == 1


def test_a_seq_reservation_the_disk_refused_is_written_by_the_next_put(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A side-file write that fails (a full disk for a moment) reserves nothing, not even in
    memory: the next put writes the reservation, so a database deleted or replaced after that
    never hands out a seq again that was already sent (the receiver would drop the new reading
    as a duplicate)."""
    import errno

    from agent.telemetry import outbox as outbox_module
    from agent.telemetry import sidefile
    from agent.telemetry.storage import StorageUnavailable

    monkeypatch.setattr(outbox_module, "SEQ_BLOCK", 5)
    monkeypatch.setattr(outbox_module, "STORAGE_RECHECK_S", 0.0)      # room again at the next put
    real, refuse = sidefile.atomic_write, {"left": 0}

    def atomic_write(*args: object, **kwargs: object) -> None:
        if refuse["left"]:
            refuse["left"] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(sidefile, "atomic_write", atomic_write)
    path = tmp_path / "outbox.sqlite3"
    side = tmp_path / "outbox.sqlite3.meta.json"
    box = open_box(path)
    handed_out = box.put([reading()] * 6)            # seqs 1-6: reserved up to 6 + 5
    refuse["left"] = 1
    for _ in range(8):                               # past the reservation; the first write fails
        try:
            handed_out += box.put([reading()])
        except StorageUnavailable:                   # the moment the disk was full: refused
            continue
        on_disk = json.loads(side.read_text())["seq_reserved"][DEVICE]
        assert on_disk >= max(handed_out), f"seq {max(handed_out)} handed out, the file reserves {on_disk}"
    box.close()
    path.unlink()                                    # the database lost: seq continues after the file
    box = open_box(path)
    assert box.put([reading()])[0] > max(handed_out)
    box.close()


def test_a_deleted_outbox_is_replaced_and_its_loss_counted_even_when_the_side_file_cannot_be_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The outbox files deleted while running, and the disk refusing the side file at that
    moment: check_file still opens a new database and counts what the old one held as dropped
    (one WARNING for the reservation), instead of raising into the uploader's thread."""
    import errno

    from agent.telemetry import sidefile

    path = tmp_path / "outbox.sqlite3"
    box = open_box(path)
    box.put([reading()] * 3)
    for p in tmp_path.iterdir():
        p.unlink()

    def refused(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sidefile, "atomic_write", refused)
    with caplog.at_level(logging.WARNING, logger="agent.telemetry.outbox"):
        assert box.check_file() is True
    assert box.counts().dropped == 3
    assert "seq reservation not written" in caplog.text
    monkeypatch.undo()
    assert box.put([reading()])[0] == 4
    box.close()
