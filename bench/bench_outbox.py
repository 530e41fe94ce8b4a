"""Outbox durable ingest and SD-card wear: bytes written to the block device per reading, and a
day of a 5-sensor box, per file the agent writes, against the previous outbox in the same run.

    .venv/bin/python bench/bench_outbox.py [--dir DIR] [--cycles N] [--repeat R] [--baseline-commit C]
        [--previous-commit C] [--backlog N] [--levers]

Each ``put`` is durable before it returns, as the sampler issues it: one per tick, holding
every reading due at that tick (group commit). This agent appends one record to its intake log
(``pwrite`` + ``fdatasync``, O_DIRECT) and commits SQLite (``synchronous=FULL``) in batches;
the "previous" outbox (``--previous-commit``, SQLite only) commits every put. Bytes are read from
/proc/self/io: ``write_bytes`` (page cache this process dirtied and direct writes, i.e. what goes
to the block device on its behalf, in whole 4 KiB pages: intake-log blocks, fsynced WAL frames,
checkpoints, the WAL index ``-shm`` that SQLite maps) minus ``cancelled_write_bytes``. DIR must
be on a real disk, not tmpfs (write_bytes is 0 on tmpfs). ext4's own journal (inodes, directory blocks: a
new inode per atomic rewrite) is written by the kernel's jbd2 thread and is in no figure here.

A minute apart is what a box does: before each commit every page is clean again, as the
kernel's flusher leaves it within 30 s; the bench fsyncs the files between commits so the run
takes seconds, not hours. Puts back to back ("burst") flatter low rates (a page dirtied by one
commit is still dirty at the next and counted once) and are shown for throughput only.

The baseline is the outbox module of ``--baseline-commit`` (default 8cc0377: shared locking with
a -shm index, 1 KiB pages, every ack its own commit), loaded from git, and status.json rewritten
in the state dir, in the same run. "floor" rows are raw SQLite / raw file figures: what no
outbox built on them can go below. ``--levers``: raw SQLite with the outbox's rows, one design
choice at a time (locking mode, page size, compact rows, checkpoint interval, what an ack
touches), and the rollback-journal modes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.clock import Stamp, iso_epoch  # noqa: E402
from agent.fsutil import atomic_write  # noqa: E402
from agent.state import AgentState  # noqa: E402
from agent.statusfile import StatusWriter  # noqa: E402
from agent.telemetry import outbox as current  # noqa: E402
from tests.fixtures.diskio import clean, written  # noqa: E402

SENSORS_PER_BOX = 5          # the daily figure: 5 sensors sampled once a minute, uploaded each minute
MINUTES_PER_DAY = 24 * 60
STATUS_WRITES_PER_MINUTE = 3  # status.json rewrites a minute on such a box (a reading, its upload,
                              # the health figures after them; rate-limited to one a second)
TOKEN_SAVES_PER_DAY = 24 * 3600 / 3300   # 1 h access tokens, refreshed with 300 s left (26/day)
TOKEN_CACHE_BYTES = 6_500    # msal's cache with one account: access, refresh and id token, metadata
WAL_FRAME_HEADER = 24


def wchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split(":")[1]) for line in f if line.startswith("wchar"))


def stamp(i: int) -> Stamp:
    return Stamp(wall=1_795_000_000.0 + i * 60.0, mono=100.0 + i * 60.0,
                 boot="0f4c2a9e-6b1d-4d3e-9a57-2c8e1b7f6a10", synced=True)


def reading(i: int) -> dict[str, object]:
    """As the sampler queues it: its time is its stamp's wall time."""
    return {"sensor": f"sensor{i % 10}", "type": "simulated", "value": 20.0 + (i % 1000) / 100,
            "unit": "°C", "time": iso_epoch(stamp(i).wall)}


def load_baseline(commit: str, into: Path) -> ModuleType:
    """The outbox module as it was at ``commit`` (its imports are the current tree's)."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:agent/telemetry/outbox.py"],
                         capture_output=True, text=True, check=True).stdout
    path = into / f"baseline_outbox_{commit}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"baseline_outbox_{commit}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class Minutes:
    """The outbox's monotonic clock on a box putting once a minute (its timers see the minutes
    pass; the bench does not wait them out)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def open_outbox(module: ModuleType, path: Path, clock: Minutes) -> object:
    try:
        return module.Outbox(path, "bench-01", max_rows=10**7, max_bytes=10**10, monotonic=clock)
    except TypeError:            # an outbox from before the monotonic clock was injectable
        return module.Outbox(path, "bench-01", max_rows=10**7, max_bytes=10**10)


def paced(base: Path, module: ModuleType, cycles: int, group: int, *, upload: bool) -> float:
    """Bytes to the block device per reading: ``cycles`` commits of ``group`` readings, a minute
    apart, pages clean before each; ``upload``: each put is followed by the upload's claim + ack,
    as on a box that is online. The outbox is closed at the end (its last commit and
    checkpoint counted)."""
    d = Path(tempfile.mkdtemp(dir=base))
    clock = Minutes()
    box = open_outbox(module, d / "outbox.sqlite3", clock)
    box.put([reading(0)], [stamp(0)])          # schema, first page, seq reservation: not measured
    if upload:
        box.ack([r.seq for r in box.claim(500)])
    clean(d)
    before = written()
    for c in range(cycles):
        clock.now += 60.0
        box.put([reading(c * group + j) for j in range(group)], [stamp(c * group + j) for j in range(group)])
        if upload:
            box.ack([r.seq for r in box.claim(500)])
        clean(d)
    box.close()
    clean(d)
    after = written()
    shutil.rmtree(d)
    return (after - before) / (cycles * group)


def backlog(base: Path, module: ModuleType, readings: int, batch: int) -> tuple[float, float]:
    """An outage: ``readings`` queued one a minute with nothing uploaded, then drained in acks of
    ``batch`` (the uploader's ``batch_max``) back to back. Bytes to the device per reading
    (queueing, draining), pages clean before each put and each ack."""
    d = Path(tempfile.mkdtemp(dir=base))
    clock = Minutes()
    box = open_outbox(module, d / "outbox.sqlite3", clock)
    box.put([reading(0)], [stamp(0)])
    box.ack([1])
    clean(d)
    t0 = written()
    for i in range(1, readings + 1):
        clock.now += 60.0
        box.put([reading(i)], [stamp(i)])
        clean(d)
    t1 = written()
    while rows := box.claim(batch):
        clock.now += 0.05
        box.ack([r.seq for r in rows])
        clean(d)
    box.close()
    clean(d)
    t2 = written()
    shutil.rmtree(d)
    return (t1 - t0) / readings, (t2 - t1) / readings


def burst(base: Path, group: int, ticks: int) -> tuple[float, float, float]:
    """(readings/s, bytes to the device per reading, bytes passed to write() per reading)."""
    d = Path(tempfile.mkdtemp(dir=base))
    box = current.Outbox(d / "outbox.sqlite3", "bench-01", max_rows=10**7, max_bytes=10**10)
    box.put([reading(0)], [stamp(0)])
    b0, w0, t0 = written(), wchar(), time.perf_counter()
    for tick in range(ticks):
        box.put([reading(tick * group + j) for j in range(group)], [stamp(tick * group + j) for j in range(group)])
    elapsed = time.perf_counter() - t0
    n = ticks * group
    out = (n / elapsed, (written() - b0) / n, (wchar() - w0) / n)
    box.close()
    shutil.rmtree(d)
    return out


def wal_floor(base: Path, page_size: int, commits: int) -> float:
    """Raw SQLite, WAL, exclusive locking, synchronous=FULL: each commit changes exactly one page
    (a row replaced in one leaf), so it appends one frame: the least a durable commit writes."""
    d = Path(tempfile.mkdtemp(dir=base))
    db = sqlite3.connect(d / "floor.sqlite3", isolation_level=None)
    db.execute(f"PRAGMA page_size={page_size}")
    db.execute("PRAGMA locking_mode=EXCLUSIVE")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA wal_autocheckpoint=1000")
    db.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)")
    db.execute("INSERT INTO t VALUES (1, zeroblob(40))")
    clean(d)
    before = written()
    for i in range(commits):
        db.execute("UPDATE t SET v = ? WHERE k = 1", (i.to_bytes(8, "big") * 5,))
        clean(d)
    after = written()
    db.close()
    shutil.rmtree(d)
    return (after - before) / commits


def lever(base: Path, *, page: int, exclusive: bool, compact: bool, online: bool, hw_each_ack: bool,
          checkpoint: int, commits: int) -> float:
    """Raw SQLite with the outbox's rows, one reading per commit, pages clean before each: what
    one design choice is worth on its own. ``online``: the previous reading is deleted in the
    same commit (an ack riding on the put); ``hw_each_ack``: and ``meta`` rewritten with it."""
    d = Path(tempfile.mkdtemp(dir=base))
    db = sqlite3.connect(d / "lever.sqlite3", isolation_level=None)
    db.execute(f"PRAGMA page_size={page}")
    if exclusive:
        db.execute("PRAGMA locking_mode=EXCLUSIVE")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute(f"PRAGMA wal_autocheckpoint={checkpoint}")
    db.execute("CREATE TABLE outbox (seq INTEGER PRIMARY KEY, payload BLOB NOT NULL, wall REAL, mono REAL, "
               "boot TEXT, synced INTEGER)")
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID")
    json_row = json.dumps(reading(0), ensure_ascii=False, separators=(",", ":")).encode()
    boot = stamp(0).boot

    def put(seq: int) -> None:
        payload = b"\x01" + seq.to_bytes(2, "little") + b"\0" * 8 if compact else json_row
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO outbox VALUES (?, ?, ?, ?, ?, 1)",
                   (seq, payload, 1.795e9 + seq * 60.0, 100.0 + seq * 60.0, "\x011" if compact else boot))
        if online:
            db.execute("DELETE FROM outbox WHERE seq < ?", (seq,))
            if hw_each_ack:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('seq_hw', ?)", (seq - 1,))
        db.execute("COMMIT")

    for seq in range(1, 31):
        put(seq)
    clean(d)
    before = written()
    for seq in range(31, 31 + commits):
        put(seq)
        clean(d)
    after = written()
    db.close()
    shutil.rmtree(d)
    return (after - before) / commits


LEVERS = [   # (what, lever() arguments), each on its own
    ("shared locking (-shm), 1 KiB pages, JSON rows, offline (8cc0377's new files)",
     dict(page=1024, exclusive=False, compact=False, online=False, hw_each_ack=False, checkpoint=256)),
    ("locking_mode=EXCLUSIVE (WAL index in memory), 1 KiB pages",
     dict(page=1024, exclusive=True, compact=False, online=False, hw_each_ack=False, checkpoint=256)),
    ("exclusive, 512 B pages",
     dict(page=512, exclusive=True, compact=False, online=False, hw_each_ack=False, checkpoint=256)),
    ("exclusive, 512 B pages, compact rows",
     dict(page=512, exclusive=True, compact=True, online=False, hw_each_ack=False, checkpoint=256)),
    ("exclusive, 512 B, compact, checkpoint every 64 frames",
     dict(page=512, exclusive=True, compact=True, online=False, hw_each_ack=False, checkpoint=64)),
    ("exclusive, 512 B, compact, checkpoint every 1,000 frames",
     dict(page=512, exclusive=True, compact=True, online=False, hw_each_ack=False, checkpoint=1000)),
    ("exclusive, 512 B, compact, checkpoint every 7 frames (no frame straddles a WAL page)",
     dict(page=512, exclusive=True, compact=True, online=False, hw_each_ack=False, checkpoint=7)),
    ("exclusive, 512 B, online: the previous reading's ack in the put's commit",
     dict(page=512, exclusive=True, compact=True, online=True, hw_each_ack=False, checkpoint=1000)),
    ("... the same with meta.seq_hw rewritten by each ack (a second page)",
     dict(page=512, exclusive=True, compact=True, online=True, hw_each_ack=True, checkpoint=1000)),
    ("exclusive, 1 KiB pages, online, no meta write",
     dict(page=1024, exclusive=True, compact=True, online=True, hw_each_ack=False, checkpoint=1000)),
]


def rollback_journal(base: Path, mode: str, commits: int) -> float:
    """Raw SQLite with a rollback journal (``mode``), 512 B pages: a reading replacing the last."""
    d = Path(tempfile.mkdtemp(dir=base))
    db = sqlite3.connect(d / "rj.sqlite3", isolation_level=None)
    db.execute("PRAGMA page_size=512")
    db.execute(f"PRAGMA journal_mode={mode}")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE outbox (seq INTEGER PRIMARY KEY, payload BLOB)")
    db.execute("INSERT INTO outbox VALUES (0, x'00')")
    clean(d)
    before = written()
    for seq in range(1, commits + 1):
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO outbox VALUES (?, zeroblob(40))", (seq,))
        db.execute("DELETE FROM outbox WHERE seq < ?", (seq,))
        db.execute("COMMIT")
        clean(d)
    after = written()
    db.close()
    shutil.rmtree(d)
    return (after - before) / commits


def append_floor(base: Path, commits: int) -> float:
    """Any design at all: one small record appended and fdatasync'd per commit."""
    d = Path(tempfile.mkdtemp(dir=base))
    fd = os.open(d / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, b"\0" * 40)
        os.fdatasync(fd)
        before = written()
        for _ in range(commits):
            os.write(fd, b"r" * 40)
            os.fdatasync(fd)
        after = written()
    finally:
        os.close(fd)
    shutil.rmtree(d)
    return (after - before) / commits


def per_write(base: Path, write: Callable[[Path], None], n: int = 20) -> float:
    """Bytes to the block device per call of ``write(dir)``, each written back before the next."""
    d = Path(tempfile.mkdtemp(dir=base))
    write(d)
    clean(d)
    before = written()
    for _ in range(n):
        write(d)
        clean(d)
    after = written()
    shutil.rmtree(d)
    return (after - before) / n


def status_writer(runtime: Path | None) -> Callable[[Path], None]:
    """One status.json rewrite as StatusWriter does it, in the state dir (``runtime`` None, the
    baseline) or in a runtime dir (tmpfs, as /run/device-agent is)."""
    state = AgentState()
    state.signed_in("greenhouse@contoso.onmicrosoft.com")

    def write(d: Path) -> None:
        if runtime is None:
            StatusWriter(d / "status.json", state, "bench-01", fallbacks=[]).write(state.snapshot)
        else:
            old = os.environ.get("RUNTIME_DIRECTORY")
            os.environ["RUNTIME_DIRECTORY"] = str(runtime)
            try:
                writer = StatusWriter(d / "status.json", state, "bench-01")
                assert writer.path.parent == runtime, writer.path
                writer.write(state.snapshot)
            finally:
                if old is None:
                    os.environ.pop("RUNTIME_DIRECTORY")
                else:
                    os.environ["RUNTIME_DIRECTORY"] = old
    return write


def token_cache_save(d: Path) -> None:
    atomic_write(d / "token_cache.json", json.dumps({"x": "t" * TOKEN_CACHE_BYTES}).encode(), mode=0o600)


def side_file_save(d: Path) -> None:
    atomic_write(d / "outbox.sqlite3.meta.json", json.dumps({"seq_reserved": {"bench-01": 10**6}}).encode())


def median(f: Callable[[], float], repeat: int) -> float:
    return statistics.median(f() for _ in range(repeat))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=".", help="where to create the test databases (a real disk)")
    p.add_argument("--cycles", type=int, default=2000, help="commits per paced run (checkpoints included)")
    p.add_argument("--ticks", type=int, default=400, help="puts per burst run")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--baseline-commit", default="8cc0377")
    p.add_argument("--previous-commit", default="a86e465",
                   help="the SQLite-only outbox before the intake log, measured beside it")
    p.add_argument("--backlog", type=int, default=3000, help="readings queued in the outage row")
    p.add_argument("--runtime-dir", default="/dev/shm", help="a tmpfs standing in for /run")
    p.add_argument("--levers", action="store_true", help="also: raw SQLite, one design choice at a time")
    args = p.parse_args()
    base = Path(args.dir).resolve()
    work = Path(tempfile.mkdtemp(dir=base))
    runtime = Path(tempfile.mkdtemp(dir=args.runtime_dir))
    try:
        old = load_baseline(args.baseline_commit, work)
        previous = load_baseline(args.previous_commit, work)
        print(f"outbox wear, median of {args.repeat} runs, {args.cycles} puts a run, dir {base}")
        print(f"  this agent: intake log ({current.intake.SIZE // 1024} KiB, one pwrite + fdatasync a put) in front "
              f"of SQLite ({current.PAGE_SIZE} B pages, exclusive, compact rows), batch COMMIT at "
              f"{current.COMMIT_FILL:.0%} of the log or every {current.COMMIT_EVERY_S / 60:.0f} min; "
              f"previous {args.previous_commit}: the same SQLite outbox, every put its own commit; "
              f"baseline {args.baseline_commit}: {old.PAGE_SIZE} B pages, shared locking (-shm), an ack per commit")

        print("\nburst (puts back to back, this agent):")
        print(f"{'readings/put':>12} {'readings/s':>11} {'B to device/rd':>15} {'B to write()/rd':>16}")
        for group in (1, 10):
            runs = [burst(work, group, args.ticks) for _ in range(args.repeat)]
            rate, wb, wc = (statistics.median(r[i] for r in runs) for i in range(3))
            print(f"{group:>12} {rate:>11.0f} {wb:>15.0f} {wc:>16.0f}")

        print("\na minute apart, 1 reading per commit (bytes to the block device per reading):")
        rows = []
        for label, module in (("this agent", current), (f"previous ({args.previous_commit})", previous),
                              (f"baseline ({args.baseline_commit})", old)):
            online = median(lambda m=module: paced(work, m, args.cycles, 1, upload=True), args.repeat)
            offline = median(lambda m=module: paced(work, m, args.cycles, 1, upload=False), args.repeat)
            rows.append((label, online, offline))
            print(f"  {label:<22} online (each reading acked within the minute): {online:>6.0f} B; "
                  f"offline (the queue grows): {offline:>6.0f} B")
        frame = current.PAGE_SIZE + WAL_FRAME_HEADER
        floor512 = median(lambda: wal_floor(work, 512, args.cycles // 2), args.repeat)
        floor1k = median(lambda: wal_floor(work, 1024, args.cycles // 2), args.repeat)
        append = median(lambda: append_floor(work, args.cycles // 2), args.repeat)
        print(f"  floor: SQLite WAL, one {frame} B frame per commit (512 B pages): {floor512:>6.0f} B "
              f"(theory 4096 x (1 + {frame}/4096) = {4096 + frame} B); 1 KiB pages: {floor1k:.0f} B")
        print(f"  floor: any design, a 40 B record appended + fdatasync per commit: {append:>6.0f} B")
        print(f"  ratio this agent / previous (online): {rows[0][1] / rows[1][1]:.2f}; "
              f"/ baseline: {rows[0][1] / rows[2][1]:.2f}")
        print(f"\nan outage: {args.backlog} readings queued a minute apart, none uploaded, then drained "
              "in acks of 500 (bytes to the block device per reading):")
        for label, module in (("this agent", current), (f"previous ({args.previous_commit})", previous)):
            runs = [backlog(work, module, args.backlog, 500) for _ in range(args.repeat)]
            queued, drained = (statistics.median(r[i] for r in runs) for i in range(2))
            print(f"  {label:<22} queueing: {queued:>6.0f} B; draining: {drained:>6.0f} B")
        if args.levers:
            print("\nlevers, raw SQLite with the outbox's rows, 1 reading per commit (bytes per reading):")
            for what, kw in LEVERS:
                print(f"  {median(lambda k=kw: lever(work, commits=args.cycles // 2, **k), args.repeat):>7.0f}  {what}")
            for mode in ("TRUNCATE", "PERSIST", "DELETE"):
                got = median(lambda m=mode: rollback_journal(work, m, args.cycles // 4), args.repeat)
                print(f"  {got:>7.0f}  rollback journal ({mode}), 512 B pages, no WAL")

        print(f"\na day of {SENSORS_PER_BOX} sensors at 1/min, uploaded each minute "
              f"({SENSORS_PER_BOX} readings per commit), per file:")
        cycles_day = max(200, args.cycles // 2)
        day: dict[str, dict[str, float]] = {}
        for label, module, status_dir in (("this agent", current, runtime),
                                          (f"previous ({args.previous_commit})", previous, runtime),
                                          (f"baseline ({args.baseline_commit})", old, None)):
            outbox_b = median(lambda m=module: paced(work, m, cycles_day, SENSORS_PER_BOX, upload=True),
                              args.repeat) * SENSORS_PER_BOX * MINUTES_PER_DAY
            status_b = per_write(work, status_writer(status_dir)) * STATUS_WRITES_PER_MINUTE * MINUTES_PER_DAY
            token_b = per_write(work, token_cache_save) * TOKEN_SAVES_PER_DAY
            side_b = per_write(work, side_file_save) * SENSORS_PER_BOX * MINUTES_PER_DAY / current.SEQ_BLOCK
            day[label] = {"outbox": outbox_b, "status": status_b, "token": token_b, "side": side_b}
        print(f"  {'':<22} {'outbox files':>15} {'status.json':>12} {'token cache':>12} "
              f"{'seq side file':>14} {'total/day':>10} {'per reading':>12}")
        for label, kinds in day.items():
            total = sum(kinds.values())
            print(f"  {label:<22} {kinds['outbox'] / 1e6:>12.2f} MB {kinds['status'] / 1e6:>9.2f} MB "
                  f"{kinds['token'] / 1e6:>9.2f} MB {kinds['side'] / 1e6:>11.3f} MB {total / 1e6:>7.2f} MB "
                  f"{total / (SENSORS_PER_BOX * MINUTES_PER_DAY):>9.0f} B")
        labels = list(day)
        print(f"  ratio this agent / previous (total): "
              f"{sum(day[labels[0]].values()) / sum(day[labels[1]].values()):.2f}; / baseline: "
              f"{sum(day[labels[0]].values()) / sum(day[labels[2]].values()):.2f}")
        print(f"  (status: {STATUS_WRITES_PER_MINUTE} rewrites a minute, this agent's in {runtime.parent} "
              f"(tmpfs, as /run); token cache: {TOKEN_SAVES_PER_DAY:.0f} fsynced saves a day of "
              f"{TOKEN_CACHE_BYTES} B; ext4 journal blocks not counted)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(runtime, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
