"""Outbox durable ingest: readings/s committed and bytes written per reading (SD-card wear).

    .venv/bin/python bench/bench_outbox.py [--dir DIR] [--ticks N] [--repeat R]

Each ``put`` is one transaction with ``synchronous=FULL`` (an fsync of the WAL per commit), as
the sampler issues it: one per tick, holding every reading due at that tick (group commit).
Bytes written are read from /proc/self/io: ``write_bytes`` (bytes of page cache this process
dirtied, i.e. what goes to the block device on its behalf, in whole 4 KiB pages: fsynced WAL
frames, checkpoints, and the WAL index ``-shm`` that SQLite maps and the kernel writes back) and
``wchar`` (bytes passed to write()). DIR must be on a real disk, not tmpfs (write_bytes is 0
on tmpfs).

Two cadences:
- burst: puts back to back. A page dirtied by one commit is often still dirty at the next, so
  it is counted once for several commits: the figure flatters low rates.
- a minute apart (what a box does): before each commit every page of the outbox is clean again,
  as the kernel's flusher leaves it within 30 s; here the bench fsyncs the files between commits
  so the run takes seconds, not hours. This is the SD wear of a real box.
The baseline is the same code on an outbox file made the way the previous version made it
(4 KiB pages), in the same run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.telemetry.outbox import PAGE_SIZE, Outbox  # noqa: E402

SENSORS_PER_BOX = 5          # the daily figure: 5 sensors sampled once a minute, uploaded each minute
MINUTES_PER_DAY = 24 * 60


def io_counters() -> dict[str, int]:
    out = {}
    with open("/proc/self/io") as f:
        for line in f:
            k, v = line.split(":")
            out[k.strip()] = int(v)
    return out


def reading(i: int) -> dict[str, object]:
    return {"sensor": f"sensor{i % 10}", "type": "simulated", "value": 20.0 + (i % 1000) / 100,
            "unit": "°C", "time": "2026-11-25T14:39:32.123Z"}


def new_outbox(base: Path, page_size: int | None) -> tuple[Path, Outbox]:
    """An outbox in a fresh directory; ``page_size``: pre-create the file with that page size
    (how an older agent left it), None: as this agent creates it."""
    d = Path(tempfile.mkdtemp(dir=base))
    path = d / "outbox.sqlite3"
    if page_size is not None:
        db = sqlite3.connect(path)
        db.execute(f"PRAGMA page_size={page_size}")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE boot (x)")
        db.execute("DROP TABLE boot")
        db.close()
    box = Outbox(path, "bench-01", max_rows=10**7, max_bytes=10**10)
    box.put([reading(0)])                       # schema, first page, seq reservation: not measured
    return d, box


def clean(d: Path) -> None:
    """Write back and clean every page of the outbox's files, as the kernel does between commits
    a minute apart (the bench cannot wait for its 30 s flusher)."""
    for p in d.iterdir():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def run_burst(base: Path, group: int, ticks: int) -> tuple[float, float, float, float]:
    d, box = new_outbox(base, None)
    before = io_counters()
    t0 = time.perf_counter()
    n = 0
    for tick in range(ticks):
        box.put([reading(tick * group + j) for j in range(group)])
        n += group
    elapsed = time.perf_counter() - t0
    after = io_counters()
    files = sum(p.stat().st_size for p in d.iterdir() if p.name.startswith("outbox.sqlite3"))
    box.close()
    shutil.rmtree(d)
    return (n / elapsed, (after["write_bytes"] - before["write_bytes"]) / n,
            (after["wchar"] - before["wchar"]) / n, files / n)


def run_paced(base: Path, page_size: int | None, cycles: int, *, day: bool) -> float:
    """write_bytes per cycle with clean pages before each one. A cycle is one put of one reading,
    or (``day``) a minute of the 5-sensor box: one put of 5 readings, then the upload's claim+ack."""
    d, box = new_outbox(base, page_size)
    clean(d)
    before = io_counters()
    for c in range(cycles):
        if day:
            box.put([reading(c * SENSORS_PER_BOX + j) for j in range(SENSORS_PER_BOX)])
            box.ack([r.seq for r in box.claim(500)])
        else:
            box.put([reading(c)])
        clean(d)
    after = io_counters()
    box.close()
    shutil.rmtree(d)
    return (after["write_bytes"] - before["write_bytes"]) / cycles


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=".", help="where to create the test databases (a real disk)")
    p.add_argument("--ticks", type=int, default=400, help="puts per run")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    base = Path(args.dir)
    print(f"outbox ingest, {args.ticks} puts per run, median of {args.repeat} runs, dir {base.resolve()}")
    print("burst (puts back to back):")
    print(f"{'readings/put':>12} {'readings/s':>11} {'puts/s':>8} {'write_bytes/rd':>15} {'wchar/rd':>9} "
          f"{'file bytes/rd':>13}")
    for group in (1, 10):
        runs = [run_burst(base, group, args.ticks) for _ in range(args.repeat)]
        rate, wb, wc, fb = (statistics.median(r[i] for r in runs) for i in range(4))
        print(f"{group:>12} {rate:>11.0f} {rate / group:>8.0f} {wb:>15.0f} {wc:>9.0f} {fb:>13.0f}")

    cycles = max(20, args.ticks // 4)
    print(f"a minute apart (pages clean before each commit; {cycles} cycles, median of {args.repeat}):")
    for label, page_size in ((f"this agent ({PAGE_SIZE} B pages)", None), ("baseline (4 KiB pages)", 4096)):
        one = statistics.median(run_paced(base, page_size, cycles, day=False) for _ in range(args.repeat))
        day = statistics.median(run_paced(base, page_size, cycles, day=True) for _ in range(args.repeat))
        print(f"  {label:<28} 1 reading per commit: {one:>6.0f} B/reading; "
              f"{SENSORS_PER_BOX} sensors at 1/min + uploads: {day * MINUTES_PER_DAY / 1e6:5.1f} MB/day "
              f"({day / SENSORS_PER_BOX:.0f} B/reading)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
