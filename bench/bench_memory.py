"""Memory of a running agent with every feature on, over a million readings.

    .venv/bin/python bench/bench_memory.py [--readings 1000000] [--dir DIR] [--baseline-tree OLD]

`device-agent run` as a subprocess: png panel, fake GPIO (button + LED), MQTT to a real
Mosquitto with Home Assistant discovery, 20 simulated sensors sampled every 10 ms, gzip uploads
to the simulated API, signed in by the simulated IdP. RSS (``VmRSS``) is read from /proc once a
second; printed: RSS once the first readings are delivered (start), the kernel's high-water mark
(``VmHWM``, peak) and RSS at the end, with the readings delivered, RSS at each quarter of the run
(flat means no growth: the outbox, the batches and the MQTT status must not keep anything per
reading), and where the end RSS is, from /proc/PID/smaps: anonymous memory (the heap of malloc's
main arena, the other threads' arenas, thread stacks, the rest: Python's object arenas, big
buffers, SQLite's page cache) and the touched pages of each file mapped (the interpreter and the
shared libraries; shared with other processes on a box only where they use the same files).
DIR (default: a temp dir) holds the outbox: a real disk, as on a box. OLD: an older checkout
(``git archive REV | tar -x -C OLD``) measured the same way after this one, for the baseline.
Each tree runs as its own systemd unit runs it: ``python -m agent run`` (the unit's ExecStart,
the console script, calls the same ``agent.cli.main``) with the unit's ``Environment=`` (glibc's
malloc settings; -OO with its bytecode prefix, compiled first as the README's install step does,
in DIR/bench-memory-bytecode, kept between runs) and none of this shell's other ``PYTHON*``
variables; printed with the figures.
"""

from __future__ import annotations

import argparse
import compileall
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.sim.api import SimApi  # noqa: E402
from agent.sim.idp import SimIdp  # noqa: E402
from agent.sim.tls import make_tls  # noqa: E402
from tests.agentproc import service_environment, unit_environment, write_config  # noqa: E402
from tests.fixtures.broker import Broker  # noqa: E402

DEVICE = "bench-mem-01"
SENSORS = 20
INTERVAL_S = 0.01
ARENA_HEAP = 64 << 20       # glibc's HEAP_MAX_SIZE on 64-bit: a thread arena's aligned reservation
MIB = 1024.0                # /proc figures are KiB


def status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0])
    return out


@dataclass
class Mapping:
    start: int
    end: int
    perms: str
    path: str
    rss_kib: int
    anon_kib: int


def read_smaps(pid: int) -> list[Mapping]:
    maps: list[Mapping] = []
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(None, 5)
        if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            lo, hi = head[0].split("-")
            maps.append(Mapping(int(lo, 16), int(hi, 16), head[1], head[5].strip() if len(head) > 5 else "", 0, 0))
        elif head[0] == "Rss:":
            maps[-1].rss_kib = int(head[1])
        elif head[0] == "Anonymous:":
            maps[-1].anon_kib = int(head[1])
    return maps


def file_group(path: str) -> str:
    """A file mapping's owner: the site-packages distribution directory, else the file's name."""
    parts = Path(path).parts
    if "site-packages" in parts:
        i = parts.index("site-packages")
        top = parts[i + 1] if i + 1 < len(parts) else path
        return top.split(".")[0] if top.endswith(".so") else top.removesuffix(".libs")
    return Path(path).name


def breakdown(pid: int) -> tuple[dict[str, int], dict[str, int]]:
    """(anonymous KiB by kind, file-backed RSS KiB by owner) of ``pid`` now."""
    maps = read_smaps(pid)
    anon: dict[str, int] = defaultdict(int)
    files: dict[str, int] = defaultdict(int)
    for i, m in enumerate(maps):
        prev = maps[i - 1] if i else None
        if m.path.startswith("/") and not m.path.startswith("/dev/") and not m.path.startswith("/memfd"):
            files[file_group(m.path)] += m.rss_kib - m.anon_kib
            anon["private copies of file pages (relocations, .data)"] += m.anon_kib
        elif m.path == "[heap]":
            anon["malloc main arena (brk heap)"] += m.rss_kib
        elif m.path == "[stack]":
            anon["main thread stack"] += m.rss_kib
        elif m.path.startswith("["):
            anon[m.path] += m.rss_kib
        elif m.start % ARENA_HEAP == 0 and "rw" in m.perms:
            anon["malloc thread arenas"] += m.rss_kib
        elif (prev is not None and prev.end == m.start and prev.perms.startswith("---")
              and prev.end - prev.start == 4096 and "rw" in m.perms):
            anon["thread stacks"] += m.rss_kib
        else:
            anon["other anonymous (Python object arenas, big buffers, SQLite cache)"] += m.rss_kib
    return dict(anon), dict(files)


def print_breakdown(start: tuple[dict[str, int], dict[str, int]], end: tuple[dict[str, int], dict[str, int]],
                    top: int = 12) -> None:
    """Where RSS is, at the start and the end of the run, largest first."""
    (anon0, files0), (anon1, files1) = start, end
    print(f"  from smaps, start -> end: anonymous {sum(anon0.values()) / MIB:.1f} -> {sum(anon1.values()) / MIB:.1f}"
          f" MiB, file-backed {sum(files0.values()) / MIB:.1f} -> {sum(files1.values()) / MIB:.1f} MiB")
    for kind, a, b in (("anon", anon0, anon1), ("file", files0, files1)):
        ranked = sorted(set(a) | set(b), key=lambda k: -b.get(k, 0))
        shown = [k for k in ranked if max(a.get(k, 0), b.get(k, 0)) >= 64][:top]
        for name in shown:
            print(f"    {kind} {a.get(name, 0) / MIB:5.1f} -> {b.get(name, 0) / MIB:5.1f} MiB  {name}")
        rest = [k for k in ranked if k not in shown]
        if rest:
            print(f"    {kind} {sum(a.get(k, 0) for k in rest) / MIB:5.1f} -> "
                  f"{sum(b.get(k, 0) for k in rest) / MIB:5.1f} MiB  {len(rest)} others")


def measure(tree: Path, readings: int, base_dir: str | None, label: str) -> None:
    # The service's environment and bytecode, as on a box: a unit with a bytecode prefix
    # (PYTHONPYCACHEPREFIX) gets it compiled by unit_environment, as the install step does; an
    # older one runs from the bytecode pip compiles next to the sources (a checkout under
    # PYTHONDONTWRITEBYTECODE would compile every module at start, and keep the compiler's heap).
    cache = Path(base_dir or tempfile.gettempdir()) / "bench-memory-cache"
    bytecode = cache.with_name("bench-memory-bytecode")
    unit_env = unit_environment(tree, cache, bytecode_dir=bytecode)
    env = service_environment(tree, cache, bytecode_dir=bytecode)
    prefix = Path(unit_env["PYTHONPYCACHEPREFIX"]) if "PYTHONPYCACHEPREFIX" in unit_env else None
    if prefix is None:
        for pkg in ("agent", "hw"):
            compileall.compile_dir(str(tree / pkg), quiet=1)
    cached_before = set(prefix.rglob("*.pyc")) if prefix else set()
    tmp = Path(tempfile.mkdtemp(dir=base_dir, prefix="bench-memory-"))
    tls = make_tls(tmp / "tls")
    broker = Broker("/usr/sbin/mosquitto", tmp / "broker").start()
    idp = SimIdp(tls, client_id="sim-device-agent").start()
    idp.auto_approve_after_s = 0.0
    api = SimApi(tls, jwks_url=idp.jwks_url, ca_file=str(tls.ca_file)).start()
    cfg = write_config(tmp / "config.toml", {
        "device": {"id": DEVICE, "state_dir": str(tmp / "state")},
        "auth": {"client_id": "sim-device-agent", "authority": idp.authority, "instance_discovery": False,
                 "scopes": ["api://telemetry/Readings.Write"], "ca_file": str(tls.ca_file)},
        "display": {"driver": "png", "path": str(tmp / "screen.png"), "sleep_after_s": 0},
        "gpio": {"backend": "fake", "button": 17, "led": 27},
        "mqtt": {"url": broker.url, "homeassistant": True},
        "sensors": [{"name": f"s{i}", "type": "simulated", "interval_s": INTERVAL_S} for i in range(SENSORS)],
        "upload": {"sink": "http", "url": api.url, "ca_file": str(tls.ca_file), "interval_s": 1,
                   "batch_max": 500},
        "log": {"level": "warning"},
    })
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)], cwd=tree, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples: list[tuple[int, int]] = []       # (delivered, VmRSS KiB)
    try:
        deadline = time.monotonic() + 60
        while len(api.seqs(DEVICE)) < 1000:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("the agent never delivered its first 1000 readings")
            time.sleep(0.2)
        start = status(proc.pid)
        where_start = breakdown(proc.pid)
        t0 = time.monotonic()
        delivered = 0
        while delivered < readings:
            if proc.poll() is not None:
                raise SystemExit(f"the agent exited with {proc.returncode}")
            time.sleep(1.0)
            delivered = len(api.seqs(DEVICE))
            samples.append((delivered, status(proc.pid)["VmRSS"]))
        end = status(proc.pid)
        where = breakdown(proc.pid)
        # What the service compiled itself (and cached) because the install step had not.
        compiled_at_start = sorted(set(prefix.rglob("*.pyc")) - cached_before) if prefix else []
        elapsed = time.monotonic() - t0
    finally:
        proc.terminate()
        proc.wait(10)
        api.stop()
        idp.stop()
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    quarters = [next(rss for n, rss in samples if n >= readings * q / 4) for q in (1, 2, 3)] + [end["VmRSS"]]
    print(f"{label} ({tree}): all features on ({SENSORS} sensors every {INTERVAL_S * 1000:.0f} ms, "
          f"MQTT + HA discovery, png panel, fake GPIO, gzip uploads), {delivered:,} readings delivered in "
          f"{elapsed:.0f} s, {end['Threads']} threads; run as its systemd unit runs it, with the unit's "
          f"environment: {' '.join(f'{k}={v}' for k, v in unit_env.items())}")
    print(f"  RSS: start {start['VmRSS'] / MIB:.1f} MiB, peak {end['VmHWM'] / MIB:.1f} MiB, "
          f"end {end['VmRSS'] / MIB:.1f} MiB (median over the run "
          f"{statistics.median(r for _, r in samples) / MIB:.1f} MiB)")
    print(f"  RSS at 1/4, 1/2, 3/4, end of the run: {', '.join(f'{q / MIB:.1f}' for q in quarters)} MiB; "
          f"end anonymous {end['RssAnon'] / MIB:.1f} MiB, file-backed {end['RssFile'] / MIB:.1f} MiB")
    if prefix is not None:
        print(f"  bytecode: {len(compiled_at_start)} modules compiled by the agent itself (not by the install "
              f"step){': ' + ', '.join(p.name for p in compiled_at_start[:10]) if compiled_at_start else ''}")
    print_breakdown(where_start, where)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readings", type=int, default=1_000_000)
    p.add_argument("--dir", default=None, help="where the state directory goes (a real disk)")
    p.add_argument("--baseline-tree", type=Path, default=None,
                   help="an older checkout (git archive REV | tar -x -C DIR), measured after this one")
    args = p.parse_args()
    measure(ROOT, args.readings, args.dir, "this agent")
    if args.baseline_tree is not None:
        measure(args.baseline_tree.resolve(), args.readings, args.dir, "baseline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
