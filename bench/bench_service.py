"""Whole-agent figures: process start to code on the panel, and idle cost of a signed-in agent.

    .venv/bin/python bench/bench_service.py startup [--runs 10] [--baseline-tree DIR]
    .venv/bin/python bench/bench_service.py idle [--minutes 10] [--baseline-tree DIR]

startup: `device-agent run` (png display) from exec to a panel image whose QR decodes to the
sign-in URL, against a bare msal script (import msal, initiate_device_flow, print the code)
against the same simulated IdP in the same run; medians and the ratio, for wall time and for
CPU time (user+sys of all threads, read the moment the image appears).
idle: a signed-in agent sampling one sensor a minute, with MQTT, png panel, button and LED;
CPU time, wake-ups a minute (voluntary context switches summed over /proc/PID/task/*) and RSS
over N minutes, beside an older checkout of the agent when --baseline-tree is given.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.sim.api import SimApi  # noqa: E402
from agent.sim.idp import SimIdp  # noqa: E402
from agent.sim.tls import make_tls  # noqa: E402
from tests.agentproc import service_environment, unit_environment, write_config  # noqa: E402
from tests.fixtures.diskio import LoopFs, can_loop, device_bytes  # noqa: E402

CLIENT = "sim-device-agent"
SCOPE = "api://telemetry/Readings.Write"


def config(tmp: Path, idp: SimIdp, api: SimApi, tls: Any, *, interval_s: float, state: str,
           mqtt_url: str | None = None, device: str = "bench-01", png_dir: Path | None = None,
           state_root: Path | None = None) -> Path:
    extra: dict[str, Any] = {}
    if mqtt_url:
        extra = {"mqtt": {"url": mqtt_url},
                 "gpio": {"backend": "fake", "button": 17, "led": 27}}
    return write_config(tmp / f"{state}.toml", {**extra,
        "device": {"id": device, "state_dir": str((state_root or tmp) / state)},
        "auth": {"client_id": CLIENT, "authority": idp.authority, "instance_discovery": False,
                 "scopes": [SCOPE], "ca_file": str(tls.ca_file)},
        "display": {"driver": "png", "path": str((png_dir or tmp) / f"{state}.png"), "sleep_after_s": 0},
        "sensors": [{"name": "temp", "type": "simulated", "interval_s": interval_s}],
        "upload": {"sink": "http", "url": api.url, "ca_file": str(tls.ca_file)},
        "log": {"level": "warning"},
    })


def qr_text(path: Path) -> str | None:
    import zxingcpp
    from PIL import Image

    try:
        img = Image.open(path).convert("L")
        img.load()
    except (OSError, ValueError):
        return None
    found = zxingcpp.read_barcodes(img, try_invert=False)
    return str(found[0].text) if found else None


def cpu_s(pid: int) -> float:
    """CPU time (user + sys, all threads, dead ones included) of a running process, in ns
    precision: its CPUCLOCK_SCHED clock (what clock_getcpuclockid(3) returns; /proc ticks are
    10 ms, too coarse for a 200 ms start)."""
    return time.clock_gettime(((~pid) << 3) | 2)


def time_agent_to_code(tmp: Path, idp: SimIdp, api: SimApi, tls: Any, n: int,
                       tree: Path = ROOT, cache_dir: Path | None = None) -> tuple[float, float]:
    """(wall s, CPU s) from exec to the first panel image holding the code's QR. The CPU clock
    is read the moment a new image appears, before it is decoded. ``tree``: the checkout whose
    agent runs (``python -m agent`` from its root), as systemd runs it: the unit's environment
    and bytecode, and ``cache_dir`` as its ``$CACHE_DIRECTORY`` (``CacheDirectory=``; the
    regex cache, agent/regexcache.py), kept from one run to the next as on a box."""
    cfg = config(tmp, idp, api, tls, interval_s=60, state=f"start{n}")
    png = tmp / f"start{n}.png"
    env = service_environment(tree)
    if cache_dir is not None:
        env["CACHE_DIRECTORY"] = str(cache_dir)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)], cwd=tree, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen = None
    try:
        while time.perf_counter() - t0 < 30:
            try:
                st = png.stat()
            except FileNotFoundError:
                st = None
            if st is not None and (st.st_ino, st.st_mtime_ns) != seen:
                wall, cpu = time.perf_counter() - t0, cpu_s(proc.pid)
                seen = (st.st_ino, st.st_mtime_ns)
                if qr_text(png) == idp.devicelogin_url:
                    return wall, cpu
            time.sleep(0.001)
        raise RuntimeError("no code on the panel within 30 s")
    finally:
        proc.terminate()
        proc.wait(10)


def time_bare_msal(idp: SimIdp, tls: Any) -> tuple[float, float]:
    """(wall s, CPU s) of the bare script; its CPU as it printed the code (process_time)."""
    script = textwrap.dedent(f"""
        import msal, requests, sys, time
        s = requests.Session(); s.verify = {str(tls.ca_file)!r}; s.trust_env = False
        app = msal.PublicClientApplication({CLIENT!r}, authority={idp.authority!r},
                                           instance_discovery=False, http_client=s)
        flow = app.initiate_device_flow(scopes=[{SCOPE!r}])
        print(flow["user_code"], flush=True)
        print(time.process_time(), file=sys.stderr)
    """)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    elapsed = time.perf_counter() - t0
    _, err = proc.communicate(timeout=30)
    if proc.returncode != 0 or len(line.strip()) != 9:
        raise RuntimeError(err)
    return elapsed, float(err.strip().splitlines()[-1])


def startup(runs: int, baseline_tree: Path | None = None) -> None:
    """``baseline_tree``: an older checkout of the agent, timed in the same rounds (its figures
    and its ratio to the same bare script follow this agent's)."""
    # An installed agent runs from bytecode (pip compiles it); a checkout under
    # PYTHONDONTWRITEBYTECODE would recompile every module at every start. msal is installed.
    for tree in (ROOT, *([baseline_tree] if baseline_tree else [])):
        for pkg in ("agent", "hw"):
            compileall.compile_dir(str(tree / pkg), quiet=1)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        tls = make_tls(tmp / "tls")
        with SimIdp(tls, client_id=CLIENT) as idp:
            api = SimApi(tls, jwks_url=idp.jwks_url, ca_file=str(tls.ca_file)).start()
            try:
                agent, bare, older = [], [], []
                # Each tree's cache directory starts empty: the first run is a box's first start.
                caches = [tmp / "cache-agent", tmp / "cache-baseline"]
                for i in range(runs):   # interleaved, so both see the same machine load
                    bare.append(time_bare_msal(idp, tls))
                    agent.append(time_agent_to_code(tmp, idp, api, tls, i, cache_dir=caches[0]))
                    if baseline_tree:
                        older.append(time_agent_to_code(tmp, idp, api, tls, runs + i, baseline_tree,
                                                        cache_dir=caches[1]))
            finally:
                api.stop()
    # Both sides share the machine, but a loaded one stretches the bare script's network waits
    # (the simulated IdP runs in this process) more than the agent's, which overlap its imports.
    print(f"load average before / after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f} "
          f"({os.cpu_count()} CPUs); quiet-machine figures need it below ~0.5")
    for what, i in (("wall", 0), ("CPU (user+sys)", 1)):
        a = [x[i] for x in agent]
        b = [x[i] for x in bare]
        ma, mb = statistics.median(a), statistics.median(b)
        print(f"{what}: process start -> code on the panel (png, QR decoded): median {ma * 1000:.0f} ms "
              f"(min {min(a) * 1000:.0f}, max {max(a) * 1000:.0f}), {runs} runs")
        print(f"{what}: bare msal script -> code printed:                    median {mb * 1000:.0f} ms "
              f"(min {min(b) * 1000:.0f}, max {max(b) * 1000:.0f}), {runs} runs")
        print(f"{what}: ratio agent / bare msal: {ma / mb:.2f}; the first run alone (an empty cache "
              f"directory, a box's first start): {a[0] * 1000:.0f} ms")
        if older:
            o = [x[i] for x in older]
            mo = statistics.median(o)
            print(f"{what}: baseline tree {baseline_tree}: median {mo * 1000:.0f} ms (min {min(o) * 1000:.0f}, "
                  f"max {max(o) * 1000:.0f}); ratio baseline / bare msal: {mo / mb:.2f}")


def proc_stats(pid: int) -> tuple[float, int, int]:
    """(CPU seconds, RSS KiB, peak RSS KiB) of ``pid`` from /proc."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return cpu_s(pid), int(status["VmRSS"].split()[0]), int(status["VmHWM"].split()[0])


def write_bytes(pid: int) -> int:
    """Bytes the process sent (or dirtied, for the block device) on its own behalf."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def wakeups(pid: int) -> dict[tuple[int, str], int]:
    """Voluntary context switches (a thread went to sleep, so something woke it) per thread,
    keyed by (tid, the thread's OS name)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = "main" if task.name == str(pid) else (task / "comm").read_text().strip()
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    out[(int(task.name), name)] = int(line.split()[1])
        except OSError:
            pass           # the thread ended
    return out


def _thread_figure(per_minute: float, name: str) -> str:
    """"12" for an unnamed thread (an agent that does not name them), "uploader 12" otherwise."""
    return f"{per_minute:.0f}" if name.startswith("python") else f"{name} {per_minute:.0f}"


def _trace(pid: int, t0: float, until: float, every_s: float = 0.1) -> None:
    """Until ``until``: a line on stderr for each thread of ``pid`` that woke in the last
    ``every_s`` (seconds since t0, name, how many times), to see which thread wakes why."""
    last = wakeups(pid)
    while time.monotonic() < until:
        time.sleep(every_s)
        now = wakeups(pid)
        moved = [f"{name}+{n - last.get((tid, name), 0)}" for (tid, name), n in sorted(now.items())
                 if n != last.get((tid, name), 0)]
        if moved:
            print(f"{time.monotonic() - t0:7.1f} s  {' '.join(moved)}", file=sys.stderr, flush=True)
        last = now


def _stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each agent and wait for it; one that does not stop in 10 s is killed."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def idle(minutes: float, baseline_tree: Path | None, trace: bool = False) -> None:
    """A signed-in box at rest: one sensor read a minute, uploads every 10 s, png panel, the
    button and LED (fake GPIO), MQTT. Read once a minute: CPU time of the process and the
    wake-ups of all its threads. ``baseline_tree``: an older checkout of the agent, run beside
    this one over the same minutes, against the same IdP, API and broker."""
    from tests.fixtures.broker import Broker

    trees = [("this agent", ROOT)] + ([("baseline", baseline_tree)] if baseline_tree else [])
    with tempfile.TemporaryDirectory() as d, tempfile.TemporaryDirectory(dir="/dev/shm") as shm_dir:  # noqa: S108
        tmp, shm = Path(d), Path(shm_dir)
        tmp_fs = subprocess.run(["stat", "-f", "-c", "%T", d], capture_output=True, text=True).stdout.strip()
        # each agent's state dir on an ext4 of its own (with a journal, as a Pi's root) when root
        # can make one: on a shared filesystem the agents' files share inode-table blocks, and
        # whichever writes first after writeback is charged for the block (docs/PERFORMANCE.md,
        # "SD wear at a box's pace")
        with contextlib.ExitStack() as undo:      # each clean-up runs even when one before it fails
            disks: list[LoopFs] = []
            for _ in trees if can_loop() else []:
                disks.append(LoopFs(tmp, "journal"))
                undo.callback(disks[-1].close)
            if disks:
                tmp_fs = "its own ext4 with a journal"
            tls = make_tls(tmp / "tls")
            broker = Broker("/usr/sbin/mosquitto", tmp / "broker")
            undo.callback(broker.stop)
            broker.start()
            idp = undo.enter_context(SimIdp(tls, client_id=CLIENT))
            idp.auto_approve_after_s = 0.0
            api = SimApi(tls, jwks_url=idp.jwks_url, ca_file=str(tls.ca_file)).start()
            undo.callback(api.stop)
            procs: list[subprocess.Popen[bytes]] = []
            undo.callback(_stop_all, procs)
            for n, (_, tree) in enumerate(trees):
                cfg = config(tmp, idp, api, tls, interval_s=60, state=f"idle{n}", mqtt_url=broker.url,
                             device=f"bench-{n:02d}", png_dir=shm,
                             state_root=disks[n].mnt if disks else None)
                run_dir = shm / f"run{n}"         # systemd's RuntimeDirectory= (/run/device-agent)
                run_dir.mkdir(mode=0o700)
                env = dict(os.environ, PYTHONPATH=str(tree), RUNTIME_DIRECTORY=str(run_dir),
                           **unit_environment(tree))   # as systemd runs it
                procs.append(subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)],
                                              cwd=tree, env=env, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL))
            deadline = time.monotonic() + 60
            while not all(api.seqs(f"bench-{n:02d}") for n in range(len(trees))):
                if time.monotonic() > deadline:
                    raise RuntimeError("an agent never delivered a reading")
                time.sleep(0.2)
            time.sleep(5)                    # start-up done: the first upload, MQTT truth
            for disk in disks:
                disk.sync()                  # start-up's writes before the window, not in it
            before = [(proc_stats(p.pid)[0], wakeups(p.pid), write_bytes(p.pid)) for p in procs]
            dev0 = [device_bytes(disk.dev) for disk in disks]
            t0 = time.monotonic()
            rounds = max(1, round(minutes))
            samples: list[list[int]] = [[] for _ in procs]
            for k in range(rounds):         # one reading a minute, like the box it models
                end = t0 + 60 * minutes * (k + 1) / rounds
                if trace:
                    _trace(procs[0].pid, t0, end)
                time.sleep(max(0.0, end - time.monotonic()))
                for i, p in enumerate(procs):
                    samples[i].append(proc_stats(p.pid)[1])
            after = [(proc_stats(p.pid), wakeups(p.pid), write_bytes(p.pid)) for p in procs]
            elapsed = time.monotonic() - t0
            for disk in disks:
                disk.sync()                  # the window's writes, which writeback would send later
            device = [device_bytes(disk.dev) - b for disk, b in zip(disks, dev0, strict=True)]
            delivered = [len(api.seqs(f"bench-{n:02d}")) for n in range(len(trees))]
    print(f"idle, signed in, 1 reading/min, MQTT + png panel (in /dev/shm, as /run) + button/LED, "
          f"{elapsed / 60:.1f} min:")
    figures = []
    for i, (label, _) in enumerate(trees):
        (cpu1, rss, hwm), wake1, wb1 = after[i]
        cpu0, wake0, wb0 = before[i]
        per_thread = sorted((((wake1[t] - wake0.get(t, 0)) * 60 / elapsed, t[1]) for t in wake1), reverse=True)
        pct, wakes = 100 * (cpu1 - cpu0) / elapsed, sum(w for w, _ in per_thread)
        figures.append((pct, wakes))
        print(f"  {label}: CPU {cpu1 - cpu0:.3f} s ({pct:.3f} % of one core); wake-ups {wakes:.0f} a minute "
              f"over {len(per_thread)} threads ({', '.join(_thread_figure(w, n) for w, n in per_thread)}); RSS end "
              f"{rss / 1024:.1f} MiB (median {statistics.median(samples[i]) / 1024:.1f}, peak "
              f"{hwm / 1024:.1f}); readings delivered {delivered[i]}; written to disk "
              f"{(wb1 - wb0) * 86400 / elapsed / 1e6:.1f} MB/day (state dir on {tmp_fs}"
              + (f"; that device received {device[i] * 86400 / elapsed / 1e6:.1f} MB/day)" if disks else ")"))
    if len(figures) == 2:
        (pa, wa), (pb, wb) = figures
        print(f"  ratio this agent / baseline: CPU {pa / pb:.3f}, wake-ups {wa / wb:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("startup")
    s.add_argument("--runs", type=int, default=10)
    s.add_argument("--baseline-tree", type=Path, default=None,
                   help="an older checkout (git archive REV | tar -x -C DIR) timed in the same rounds")
    i = sub.add_parser("idle")
    i.add_argument("--minutes", type=float, default=10.0)
    i.add_argument("--baseline-tree", type=Path, default=None,
                   help="an older checkout (git archive REV | tar -x -C DIR) run beside this one")
    i.add_argument("--trace", action="store_true",
                   help="print on stderr, every 0.1 s, which threads of this agent woke")
    args = p.parse_args()
    if args.what == "startup":
        startup(args.runs, args.baseline_tree)
    else:
        idle(args.minutes, args.baseline_tree, args.trace)


if __name__ == "__main__":
    main()
