"""SD wear at a box's real pace: bytes ``/proc/self/io`` counts for one durable put when puts
come seconds apart and when they come a minute apart (really waiting), for this agent's outbox
and, as the baseline, a bare O_DIRECT 4 KiB ``pwrite`` + ``fdatasync`` to a preallocated file.

    .venv/bin/python bench/bench_outbox_pace.py [--dir DIR] [--gaps 1,40] [--puts 3]

Why: bench/bench_outbox.py puts its readings "a minute apart" without waiting (it fsyncs the
files between puts instead), which takes seconds; the idle agent, which waits, showed twice the
bytes per reading (docs/PERFORMANCE.md "A Pi Zero's budget"). This bench shows that gap with
real waits. DIR must be a real disk (write_bytes is 0 on tmpfs).
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.telemetry.outbox import Outbox  # noqa: E402


def write_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    raise RuntimeError("no write_bytes in /proc/self/io")


def reading(i: int) -> dict[str, object]:
    return {"sensor": "env.temperature", "type": "temperature", "value": 20.0 + i / 10, "unit": "°C"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/work")
    ap.add_argument("--gaps", default="1,40", help="seconds between puts, comma-separated")
    ap.add_argument("--puts", type=int, default=3, help="timed puts per gap")
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(dir=args.dir, prefix="bench-pace-"))
    box = Outbox(d / "outbox.sqlite3", "bench-pace", max_rows=10**6, max_bytes=10**9)
    bare_path = d / "bare.bin"
    with open(bare_path, "wb") as f:          # preallocated and written, like the intake log
        f.write(b"\0" * 65536)
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(bare_path, os.O_RDWR | os.O_DIRECT)
    block = mmap.mmap(-1, 4096)
    box.put([reading(0)])
    n = 1
    print(f"bytes counted by /proc/self/io per durable put, median of {args.puts}, dir {args.dir}")
    for gap in [float(g) for g in args.gaps.split(",")]:
        agent, bare = [], []
        for _ in range(args.puts):
            time.sleep(gap)
            a = write_bytes()
            box.put([reading(n)])
            b = write_bytes()
            block[:8] = n.to_bytes(8, "little")
            os.pwrite(fd, block, 0)
            os.fdatasync(fd)
            c = write_bytes()
            agent.append(b - a)
            bare.append(c - b)
            n += 1
        print(f"  {gap:5.0f} s apart: this agent's outbox {statistics.median(agent):6.0f} B "
              f"({', '.join(map(str, agent))}); bare O_DIRECT block {statistics.median(bare):6.0f} B")
    box.close()
    os.close(fd)


if __name__ == "__main__":
    main()
