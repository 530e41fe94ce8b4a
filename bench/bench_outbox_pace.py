"""SD wear at a box's real pace: what one durable put costs when the puts really come seconds or
a minute apart, for this agent's outbox beside the baseline (SQLite's WAL alone, one commit per
reading: the outbox before the intake log) and the floor of any design (a bare O_DIRECT 4 KiB
``pwrite`` + ``fdatasync`` to a preallocated file), on ext4 with its journal (mke2fs's default,
and how Raspberry Pi OS formats its root, mounted ``noatime`` as it does) and without one (like
this VM's root).

    sudo .venv/bin/python bench/bench_outbox_pace.py [--gaps 1,60] [--puts 5] [--dir /work]

Each (filesystem, design) pair runs in its own process on its own freshly made ext4 on a loop
device (sparse images in DIR, removed afterwards), all at once. Two figures per put:

* process: ``/proc/self/io`` (what the issue measures): the pages the put dirtied or wrote;
* device: bytes the loop device received from before the first put until 50 s after the last
  (the kernel's writeback has run), over the puts: the journal, the inode and the data, all of it.

Why a bench of its own: bench/bench_outbox.py puts its readings "a minute apart" without
waiting (it cleans the pages between puts instead), and that misses what the kernel does after a
real pause (docs/PERFORMANCE.md "SD wear at a box's pace"). Without root or loop devices, each
design runs in turn in its own directory of DIR (not at once: files made together share an
inode-table block, and the first to dirty it is charged for it), with the process figure only.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fixtures.diskio import LoopFs, can_loop, device_bytes, written  # noqa: E402

DESIGNS = {
    "agent": "this agent's outbox",
    "wal": "baseline: SQLite WAL alone",
    "bare": "floor: a bare O_DIRECT block",
}
FILESYSTEMS = {"journal": "ext4, journal (Pi OS root)", "nojournal": "ext4, no journal (this VM's root)"}
SETTLE_S = 50.0       # journal commit <= 5 s, dirty pages written back 30 s after, flusher every 5 s


def reading(i: int) -> dict[str, object]:
    return {"sensor": "env.temperature", "type": "temperature", "value": 20.0 + i / 10, "unit": "°C"}


def make_put(design: str, d: Path):
    """The durable put of one reading for ``design``, its files made in ``d``."""
    if design == "agent":
        from agent.telemetry.outbox import Outbox
        box = Outbox(d / "outbox.sqlite3", "bench-pace", max_rows=10**6, max_bytes=10**9)
        return lambda i: box.put([reading(i)])
    if design == "wal":      # the outbox's settings before the intake log, one commit per reading
        db = sqlite3.connect(d / "wal.sqlite3", isolation_level=None)
        for pragma in ("page_size=512", "locking_mode=EXCLUSIVE", "journal_mode=WAL", "synchronous=FULL"):
            db.execute(f"PRAGMA {pragma}")
        db.execute("CREATE TABLE outbox (seq INTEGER PRIMARY KEY, payload BLOB NOT NULL)")

        def put_wal(i: int) -> None:
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO outbox VALUES (?, ?)", (i, json.dumps(reading(i)).encode()))
            db.execute("COMMIT")
        return put_wal
    path = d / "bare.bin"
    with open(path, "wb") as f:          # written once, blocks allocated: like the intake log
        f.write(b"\0" * 65536)
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    block = mmap.mmap(-1, 4096)

    def put_bare(i: int) -> None:
        block[:8] = i.to_bytes(8, "little")
        os.pwrite(fd, block, 4096 * (i % 16))
        os.fdatasync(fd)
    return put_bare


def child(design: str, d: Path, dev: str | None, gap: float, puts: int) -> None:
    """One design on one filesystem: a first put (files made), everything written back, then
    ``puts`` puts ``gap`` s apart; prints one JSON line."""
    put = make_put(design, d)
    put(0)
    subprocess.run(["sync", "-f", str(d)], check=False)   # this filesystem only, not the others
    dev0 = device_bytes(dev)
    process = []
    for i in range(1, puts + 1):
        time.sleep(gap)
        before = written()
        put(i)
        process.append(written() - before)
    time.sleep(SETTLE_S)
    print(json.dumps({"process": process, "device": (device_bytes(dev) - dev0) / puts}))


def spawn(design: str, d: Path, dev: str | None, gap: float, puts: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, __file__, "--child", design, str(d), dev or "-", str(gap), str(puts)],
                            stdout=subprocess.PIPE, text=True)


def collect(p: subprocess.Popen[str]) -> dict[str, object]:
    out, _ = p.communicate()
    if p.returncode != 0:
        raise SystemExit(f"a bench child failed (exit {p.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/work", help="a real disk: loop images, or the designs' files")
    ap.add_argument("--gaps", default="1,60", help="seconds between puts, comma-separated")
    ap.add_argument("--puts", type=int, default=5, help="puts per gap")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        design, d, dev, gap, puts = args.child
        child(design, Path(d), None if dev == "-" else dev, float(gap), int(puts))
        return
    base = Path(args.dir)
    loops = can_loop()
    print(f"bytes per durable put, {args.puts} puts per gap, one reading per put; "
          + ("each design on its own fresh ext4 (loop device), all at once" if loops else
             f"no loop devices (needs root): each design in turn in {base}, process figures only"))
    print(f"  {'filesystem':34} {'design':28} {'gap':>5}  {'process: mean (each put)':>40}  {'device':>7}")
    for gap in [float(g) for g in args.gaps.split(",")]:
        rows: list[tuple[str, str, dict[str, object]]] = []
        if loops:
            mounts: list[LoopFs] = []
            procs: list[tuple[str, str, subprocess.Popen[str]]] = []
            try:
                for kind in FILESYSTEMS:
                    for design in DESIGNS:
                        fs = LoopFs(base, kind)
                        mounts.append(fs)
                        assert fs.mnt is not None
                        procs.append((kind, design, spawn(design, fs.mnt, fs.dev, gap, args.puts)))
                rows = [(kind, design, collect(p)) for kind, design, p in procs]
            finally:
                for _, _, p in procs:        # a child that failed (or Ctrl-C): none left on a mount
                    if p.poll() is None:
                        p.kill()
                        p.wait()
                for fs in mounts:
                    fs.close()
        else:
            for design in DESIGNS:
                d = Path(tempfile.mkdtemp(dir=base, prefix=f"bench-pace-{design}-"))
                try:
                    rows.append(("here", design, collect(spawn(design, d, None, gap, args.puts))))
                finally:
                    shutil.rmtree(d)
        for kind, design, r in rows:
            process = r["process"]
            assert isinstance(process, list)
            each = ", ".join(str(b) for b in process)
            device = f"{r['device']:7.0f}" if loops else "      -"
            print(f"  {FILESYSTEMS.get(kind, str(base)):34} {DESIGNS[design]:28} {gap:4.0f}s  "
                  f"{statistics.mean(process):6.0f} ({each:>32})  {device}")


if __name__ == "__main__":
    main()
