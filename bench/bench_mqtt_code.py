"""Latency from ``state.code_issued`` on an MqttPublisher to an admin's watch client receiving it.

Loopback, a real Mosquitto (plain, and TLS + password), agent.mqtt.watch's own client code.
Run: .venv/bin/python bench/bench_mqtt_code.py [--codes 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests.fixtures.broker

from agent.mqtt.publisher import MqttPublisher  # noqa: E402
from agent.mqtt.watch import WatchClient, WatchEvent  # noqa: E402
from agent.sim.tls import make_tls  # noqa: E402
from agent.state import AgentState, DeviceCode  # noqa: E402
from tests.fixtures.broker import Broker  # noqa: E402


def measure(broker: Broker, codes: int) -> list[float]:
    state = AgentState()
    notifier = MqttPublisher(broker.mqtt_settings(), "bench-01", state, {}, "bench")
    arrived: dict[str, float] = {}
    got = threading.Event()

    def on_event(ev: WatchEvent) -> None:
        if ev.kind == "code" and ev.payload:
            arrived[str(ev.payload["user_code"])] = ev.received_monotonic
            got.set()

    watcher = WatchClient(broker.url, "test", on_event=on_event, ca_file=broker.ca_file,
                          username=broker.username, password_file=broker.password_file)
    notifier.start()
    try:
        deadline = time.monotonic() + 10
        while not notifier.connected:
            if time.monotonic() > deadline:
                raise SystemExit("notifier did not connect")
            time.sleep(0.01)
        watcher.connect()
        time.sleep(0.2)                        # let retained/initial messages settle
        latencies = []
        for i in range(codes):
            user_code = f"BENCH{i:04d}"
            got.clear()
            t0 = time.monotonic()
            state.code_issued(DeviceCode(user_code, "https://login.example/devicelogin", t0 + 900,
                                         datetime.now(UTC) + timedelta(seconds=900), 5))
            while user_code not in arrived:
                if not got.wait(5):
                    raise SystemExit(f"code {user_code} never arrived")
                got.clear()
            latencies.append(arrived[user_code] - t0)
        return latencies
    finally:
        watcher.close()
        notifier.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--codes", type=int, default=200)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tls = make_tls(Path(tmp) / "tls")
        for name, kwargs in (("plain mqtt://", {}), ("mqtts:// + password", {"tls": tls, "password": True})):
            broker = Broker("/usr/sbin/mosquitto", Path(tmp) / name.split()[0].strip(":/"), **kwargs).start()
            try:
                lat = sorted(x * 1000 for x in measure(broker, args.codes))
            finally:
                broker.kill()
            q = statistics.quantiles(lat, n=100, method="inclusive")
            print(f"{name:22s} codes={len(lat)}  p50={statistics.median(lat):.2f} ms  "
                  f"p99={q[98]:.2f} ms  max={lat[-1]:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
