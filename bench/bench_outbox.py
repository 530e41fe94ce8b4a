"""Outbox durable ingest: readings/s committed and bytes written per reading (SD-card wear).

    .venv/bin/python bench/bench_outbox.py [--dir DIR] [--ticks N] [--repeat R]

Each ``put`` is one transaction with ``synchronous=FULL`` (an fsync of the WAL per commit), as
the sampler issues it: one per tick, holding every reading due at that tick (group commit).
Bytes written are read from /proc/self/io: ``write_bytes`` (what the kernel sent to the block
device on our behalf, including fsynced WAL frames and checkpoints) and ``wchar`` (bytes passed
to write()). DIR must be on a real disk, not tmpfs (write_bytes is 0 on tmpfs).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.telemetry.outbox import Outbox  # noqa: E402


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


def run_once(base: Path, group: int, ticks: int) -> tuple[float, float, float, float]:
    d = Path(tempfile.mkdtemp(dir=base))
    box = Outbox(d / "outbox.sqlite3", "bench-01", max_rows=10**7, max_bytes=10**10)
    box.put([reading(0)])                       # schema, first page, seq reservation: not measured
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=".", help="where to create the test databases (a real disk)")
    p.add_argument("--ticks", type=int, default=400, help="puts per run")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    base = Path(args.dir)
    print(f"outbox ingest, {args.ticks} puts per run, median of {args.repeat} runs, dir {base.resolve()}")
    print(f"{'readings/put':>12} {'readings/s':>11} {'puts/s':>8} {'write_bytes/rd':>15} {'wchar/rd':>9} "
          f"{'file bytes/rd':>13}")
    for group in (1, 10):
        runs = [run_once(base, group, args.ticks) for _ in range(args.repeat)]
        rate, wb, wc, fb = (statistics.median(r[i] for r in runs) for i in range(4))
        print(f"{group:>12} {rate:>11.0f} {rate / group:>8.0f} {wb:>15.0f} {wc:>9.0f} {fb:>13.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
