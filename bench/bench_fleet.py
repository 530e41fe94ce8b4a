"""A fleet through a default-config Mosquitto: how fast a fresh `watch` sees it, latency, memory.

N simulated devices, many per process: ``--publishers`` of them (100) are the product's
``MqttPublisher`` with a connection each; every other one is an ``AgentState`` whose publications
are decided by the product's own ``agent.mqtt.protocol.Outbound`` (payloads, Message Expiry,
clears) and sent over a few shared paho clients with the same QoS/retain/expiry as
``MqttPublisher`` (10,000 publishers would be 30,000 threads). Churn runs
all along (codes issued, codes used, outbox changes). ``device-agent watch --json`` runs as its
own process (its RSS is measured from /proc), once with the old QoS 1 subscription
(``--legacy-qos1``: the baseline) and once as shipped.

Run: .venv/bin/python bench/bench_fleet.py [--devices 1000 10000] [--churn 100] [--publishers 100]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests.fixtures.broker

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

from agent.mqtt.protocol import Outbound, Publication, _json  # noqa: E402
from agent.mqtt.publisher import MqttPublisher  # noqa: E402
from agent.state import AgentState, DeviceCode, OutboxCounts  # noqa: E402
from tests.fixtures.broker import Broker  # noqa: E402

PREFIX = "fleet"
CLIENTS = 4
CODE_EVERY = 10          # every 10th device waits for a sign-in at the start


class Fleet:
    """N devices' truth (AgentState + Outbound each) and the paho clients that publish it."""

    def __init__(self, broker: Broker, n: int, real: int) -> None:
        self.n = n
        self.real = min(real, n)
        self.states = [AgentState() for _ in range(n)]
        self.outs = [Outbound(PREFIX, f"dev{i:05d}", "bench", status_min_interval_s=0) for i in range(n)]
        # the first `real` devices are the product's MqttPublisher itself, one connection each
        self.publishers = [MqttPublisher(broker.mqtt_settings(topic_prefix=PREFIX), f"dev{i:05d}",
                                         self.states[i], {}, "bench", status_min_interval_s=0)
                           for i in range(self.real)]
        for pub in self.publishers:
            pub.start()
        self.sent: dict[tuple[str, bytes], float] = {}     # (topic, payload) -> wall time published
        self.lock = threading.Lock()
        self.clients = []
        for _ in range(CLIENTS):
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
            c.max_inflight_messages_set(200)
            c.connect("127.0.0.1", broker.port)
            c.loop_start()
            self.clients.append(c)
        self.serial = 0
        self.paused = threading.Event()       # churn holds still (to compare final views)

    def outbound(self, i: int) -> Outbound:
        return self.publishers[i]._out if i < self.real else self.outs[i]

    def publish(self, i: int, *, force: bool = False) -> list[mqtt.MQTTMessageInfo]:
        if i < self.real:
            # MqttPublisher publishes by itself; note when the change happened and what it sends
            snap, dev = self.states[i].snapshot, f"dev{i:05d}"
            now = time.time()
            with self.lock:
                self.sent[(f"{PREFIX}/{dev}/status", _json(snap.status_payload("bench")))] = now
                if snap.code is not None:
                    self.sent[(f"{PREFIX}/{dev}/auth/code", _json(snap.code.public(dev)))] = now
            return []
        pubs, _ = self.outs[i].plan(self.states[i].snapshot, time.monotonic(), force=force)
        return [self._send(i, p) for p in pubs]

    def _send(self, i: int, pub: Publication) -> mqtt.MQTTMessageInfo:
        props = None
        if pub.expiry_s is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = pub.expiry_s
        with self.lock:
            self.sent[(pub.topic, pub.payload)] = time.time()
        return self.clients[i % CLIENTS].publish(pub.topic, pub.payload, qos=1, retain=True, properties=props)

    def code(self, i: int) -> None:
        self.serial += 1
        now = time.monotonic()
        self.states[i].code_issued(DeviceCode(f"C{self.serial:08d}", "https://login.example/devicelogin",
                                              now + 900, datetime.now(UTC) + timedelta(seconds=900), 5))

    def seed(self) -> None:
        infos = []
        for i in range(self.n):
            if i % CODE_EVERY == 0:
                self.code(i)
            else:
                self.states[i].signed_in(f"user{i}@contoso.example")
            self.states[i].update(outbox=OutboxCounts(pending=i % 50))
            infos += self.publish(i, force=True)
        for info in infos:
            info.wait_for_publish(120)
        deadline = time.monotonic() + 30
        while not all(p.connected for p in self.publishers):
            if time.monotonic() > deadline:
                raise SystemExit("the MqttPublisher devices did not all connect")
            time.sleep(0.1)
        time.sleep(1.0)          # their retained truth is published right after connecting

    def churn(self, stop: threading.Event, per_s: float) -> None:
        rng = random.Random(1)
        while not stop.is_set():
            if self.paused.is_set():
                stop.wait(0.05)
                continue
            i = rng.randrange(self.n)
            snap = self.states[i].snapshot
            roll = rng.random()
            if snap.code is not None and roll < 0.5:
                self.states[i].signed_in(f"user{i}@contoso.example")          # code used: cleared
            elif roll < 0.2:
                self.code(i)                                                # a new code
            else:
                self.serial += 1
                self.states[i].update(outbox=OutboxCounts(pending=self.serial))
            self.publish(i)
            stop.wait(1.0 / per_s)

    def close(self) -> None:
        stoppers = [threading.Thread(target=p.stop) for p in self.publishers]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()
        for c in self.clients:
            c.disconnect()
            c.loop_stop()


def run_watch(broker: Broker, fleet: Fleet, *, legacy: bool, window_s: float) -> dict[str, float]:
    """A fresh `watch --json` process: time to see every device, latencies, peak RSS."""
    cmd = [sys.executable, "-m", "agent", "watch", "--url", broker.url, "--prefix", PREFIX, "--json",
           "--timeout", str(window_s)]
    if legacy:
        cmd.append("--legacy-qos1")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    statuses: set[str] = set()
    all_at = None
    all_wall = float("inf")
    latencies: list[float] = []
    real_latencies: list[float] = []
    hwm = 0
    last: dict[str, bytes | None] = {}
    pauser = threading.Timer(window_s - 1.5, fleet.paused.set)
    pauser.start()
    for line in proc.stdout:
        ev = json.loads(line)
        last[ev["topic"]] = (None if ev["payload"] is None else
                             json.dumps(ev["payload"], separators=(",", ":"), ensure_ascii=False).encode())
        if ev["kind"] == "status":
            statuses.add(ev["device_id"])
            if all_at is None and len(statuses) == fleet.n:
                all_at = time.monotonic() - t0
                all_wall = time.time()
        if all_at is not None and ev["payload"] is not None:
            payload = json.dumps(ev["payload"], separators=(",", ":"), ensure_ascii=False).encode()
            with fleet.lock:
                sent = fleet.sent.get((ev["topic"], payload))
            if sent is not None and sent >= all_wall:      # live changes, not the retained burst
                got = datetime.strptime(ev["received_at"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
                (real_latencies if int(ev["device_id"][3:]) < fleet.real else latencies).append(
                    got.timestamp() - sent)
        hwm = max(hwm, _hwm_kib(proc.pid))
    proc.wait()
    # nothing missed: the watch's last view of every device equals what the device published last
    wrong = 0
    for out in (fleet.outbound(i) for i in range(fleet.n)):
        truth_status = json.dumps(out._status, separators=(",", ":"), ensure_ascii=False).encode()
        seen_code = last.get(out.code_topic)
        truth_code = out._code.user_code if out._code is not None else None
        seen_user_code = json.loads(seen_code)["user_code"] if seen_code else None
        wrong += last.get(out.status_topic) != truth_status or seen_user_code != truth_code
    fleet.paused.clear()
    lat = sorted(x * 1000 for x in latencies if x >= 0)
    real = sorted(x * 1000 for x in real_latencies if x >= 0)
    return {"seen": len(statuses), "wrong": wrong,
            "all_s": all_at if all_at is not None else float("nan"),
            "p50_ms": statistics.median(lat) if lat else float("nan"),
            "p99_ms": statistics.quantiles(lat, n=100, method="inclusive")[98] if len(lat) > 1 else float("nan"),
            "samples": len(lat), "rss_mib": hwm / 1024,
            "real": (f"{statistics.median(real):.1f} / {statistics.quantiles(real, n=100, method='inclusive')[98]:.1f}"
                     f" ms ({len(real)})" if len(real) > 1 else "-")}


def _hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--devices", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--churn", type=float, default=100.0, help="changes per second during the runs")
    p.add_argument("--window", type=float, default=20.0, help="seconds each watch runs")
    p.add_argument("--publishers", type=int, default=100,
                   help="how many of the devices are real MqttPublisher instances (own connection each)")
    args = p.parse_args()
    print(f"{'devices':>8} {'watch':<22} {'statuses seen':>14} "
          f"{'all seen after':>15} {'final view wrong':>17} "
          f"{'p50 pub->watch':>15} {'p99':>9} {'live samples':>13} {'watch RSS':>10}  MqttPublisher p50 / p99")
    for n in args.devices:
        with tempfile.TemporaryDirectory() as tmp:
            broker = Broker("/usr/sbin/mosquitto", Path(tmp) / "broker").start()
            fleet = Fleet(broker, n, args.publishers)
            stop = threading.Event()
            try:
                fleet.seed()
                churn = threading.Thread(target=fleet.churn, args=(stop, args.churn), daemon=True)
                churn.start()
                for name, legacy in (("baseline: QoS 1", True), ("shipped (RecvMax 65535)", False)):
                    r = run_watch(broker, fleet, legacy=legacy, window_s=args.window)
                    all_s = "never" if r["all_s"] != r["all_s"] else f"{r['all_s']:.2f} s"
                    print(f"{n:>8} {name:<22} {r['seen']:>8}/{n:<5} {all_s:>15} {r['wrong']:>17} "
                          f"{r['p50_ms']:>12.1f} ms "
                          f"{r['p99_ms']:>6.1f} ms {r['samples']:>13} {r['rss_mib']:>6.1f} MiB  {r['real']}",
                          flush=True)
            finally:
                stop.set()
                fleet.close()
                broker.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
