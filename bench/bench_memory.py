"""Memory of a running agent with every feature on, over a million readings.

    .venv/bin/python bench/bench_memory.py [--readings 1000000] [--dir DIR]

`device-agent run` as a subprocess: png panel, fake GPIO (button + LED), MQTT to a real
Mosquitto with Home Assistant discovery, 20 simulated sensors sampled every 10 ms, gzip uploads
to the simulated API, signed in by the simulated IdP. RSS (``VmRSS``) is read from /proc once a
second; printed: RSS once the first readings are delivered (start), the kernel's high-water mark
(``VmHWM``, peak) and RSS at the end, with the readings delivered. Flat means no growth: the
outbox, the batches and the MQTT status must not keep anything per reading.
DIR (default: a temp dir) holds the outbox: a real disk, as on a box.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.sim.api import SimApi  # noqa: E402
from agent.sim.idp import SimIdp  # noqa: E402
from agent.sim.tls import make_tls  # noqa: E402
from tests.agentproc import write_config  # noqa: E402
from tests.fixtures.broker import Broker  # noqa: E402

DEVICE = "bench-mem-01"
SENSORS = 20
INTERVAL_S = 0.01


def status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readings", type=int, default=1_000_000)
    p.add_argument("--dir", default=None, help="where the state directory goes (a real disk)")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(dir=args.dir, prefix="bench-memory-"))
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
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(api.seqs(DEVICE)) < 1000:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("the agent never delivered its first 1000 readings")
            time.sleep(0.2)
        start = status(proc.pid)
        t0 = time.monotonic()
        delivered = 0
        while delivered < args.readings:
            if proc.poll() is not None:
                raise SystemExit(f"the agent exited with {proc.returncode}")
            time.sleep(1.0)
            samples.append(status(proc.pid)["VmRSS"])
            delivered = len(api.seqs(DEVICE))
        end = status(proc.pid)
        elapsed = time.monotonic() - t0
    finally:
        proc.terminate()
        proc.wait(10)
        api.stop()
        idp.stop()
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    mib = 1024.0
    print(f"all features on ({SENSORS} sensors every {INTERVAL_S * 1000:.0f} ms, MQTT + HA discovery, png panel, "
          f"fake GPIO, gzip uploads), {delivered:,} readings delivered in {elapsed:.0f} s, "
          f"{end['Threads']} threads")
    print(f"RSS: start {start['VmRSS'] / mib:.1f} MiB, peak {end['VmHWM'] / mib:.1f} MiB, "
          f"end {end['VmRSS'] / mib:.1f} MiB (median over the run {statistics.median(samples) / mib:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
