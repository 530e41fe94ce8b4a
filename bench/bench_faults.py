"""Fault figures: SIGKILL at random moments, then a drain; and what poison isolation costs.

    .venv/bin/python bench/bench_faults.py kills [--kills 200] [--latency-ms 80] [--seed 11]
    .venv/bin/python bench/bench_faults.py poison [--readings 5000] [--poisoned 10] [--batch 500]

kills: `device-agent run` (a 100 Hz simulated sensor, uploads every 0.2 s in batches of 200) is
SIGKILLed N times against the simulated API answering after LATENCY; about half the kills wait
until a POST is in flight at the API and land within that request (mid-upload: the batch may or
may not be stored, the answer never arrives). Then one last run drains. Prints the readings the
outbox ever accepted, how many of them never reached the receiver (must be 0), the duplicates
the receiver de-duplicated by id (the price of at-least-once), and the times.

poison: an outbox of N readings, K of them refused by a strict receiver (422 for any request
holding one), drained by the real uploader and HTTP sink over HTTPS. Prints the good readings
that arrived (must be all N-K), the dead letters (must be exactly the K), and the extra requests
the bisection cost against the same drain without poison.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.sim.api import SimApi  # noqa: E402
from agent.sim.idp import SimIdp  # noqa: E402
from agent.sim.tls import make_tls  # noqa: E402
from tests.agentproc import AgentProcess, write_config  # noqa: E402
from tests.test_e2e_durability import highest_assigned_seq  # noqa: E402

DEVICE = "durable-01"      # highest_assigned_seq reads this device's high-water mark


def kills(n: int, latency_ms: float, seed: int) -> None:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as d:
        tmp = Path(d)
        tls = make_tls(tmp / "tls")
        idp = SimIdp(tls, tenant="simtenant", client_id="sim-device-agent").start()
        api = SimApi(tls, jwks_url=idp.jwks_url, issuer=idp.issuer, audience="api://telemetry",
                     ca_file=str(tls.ca_file)).start()
        idp.auto_approve_after_s = 0.0
        api.latency_s = latency_ms / 1000
        config = write_config(tmp / "config.toml", {
            "device": {"id": DEVICE, "state_dir": str(tmp / "state")},
            "auth": {"client_id": "sim-device-agent", "authority": idp.authority, "instance_discovery": False,
                     "scopes": ["api://telemetry/Readings.Write"], "ca_file": str(tls.ca_file), "timeout_s": 5},
            "sensors": [{"name": "fast", "type": "simulated", "interval_s": 0.01}],
            "upload": {"sink": "http", "url": api.url, "ca_file": str(tls.ca_file), "interval_s": 0.2,
                       "batch_max": 200},
            "log": {"level": "warning"},
        })
        try:
            t0 = time.monotonic()
            first = AgentProcess(config)
            try:
                deadline = time.monotonic() + 30
                while api.count(DEVICE) == 0 and time.monotonic() < deadline:
                    time.sleep(0.05)
            finally:
                first.kill()
            mid_upload = 0
            for i in range(n):
                proc = AgentProcess(config)
                try:
                    if i % 2 == 0:
                        time.sleep(rng.uniform(0.05, 1.5))          # anywhere: start-up, mid-sample...
                    else:
                        deadline = time.monotonic() + 3.0           # ... or inside a POST
                        while api.in_flight == 0 and time.monotonic() < deadline:
                            time.sleep(0.002)
                        time.sleep(rng.uniform(0.0, api.latency_s))
                    if api.in_flight:
                        mid_upload += 1
                finally:
                    proc.kill()
            kill_s = time.monotonic() - t0
            target = highest_assigned_seq(tmp / "state")
            t1 = time.monotonic()
            last = AgentProcess(config)
            try:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline and not set(range(1, target + 1)) <= api.seqs(DEVICE):
                    time.sleep(0.05)
                drain_s = time.monotonic() - t1
                rc, _ = last.terminate()
            finally:
                last.close()
            received = api.seqs(DEVICE)
            lost = len(set(range(1, target + 1)) - received)
            print(f"kills: {n} SIGKILLs ({mid_upload} while a POST was in flight at the API), "
                  f"API latency {latency_ms:g} ms, seed {seed}")
            print(f"readings accepted by the outbox (seq 1..{target}): {target}")
            print(f"readings lost: {lost}")
            print(f"duplicates at the receiver (de-duplicated by id): {api.duplicates}")
            print(f"time: {kill_s:.1f} s of kills and restarts, drain after the last restart {drain_s:.1f} s, "
                  f"exit code {rc}")
        finally:
            api.stop()
            idp.stop()


def poison(readings: int, poisoned: int, batch: int, seed: int) -> None:
    import logging

    from agent.config import UploadSettings
    from agent.sim.jwks import SimKeys
    from agent.state import AgentState
    from agent.telemetry.outbox import Outbox
    from agent.telemetry.sinks.http import HttpSink
    from agent.telemetry.uploader import Uploader

    logging.getLogger("agent").setLevel(logging.CRITICAL)     # the dead-letter lines are expected
    rng = random.Random(seed)
    keys = SimKeys(issuer="https://127.0.0.1/bench/v2.0", audience="api://telemetry", scope="Readings.Write")

    class Tokens:
        def access_token(self) -> str:
            return keys.mint()

        def token_rejected(self, claims_challenge: str | None = None) -> str:
            return keys.mint()

    def drain(bad: set[int]) -> tuple[int, int, int, float]:
        with tempfile.TemporaryDirectory(prefix="bench-poison-") as d:
            tmp = Path(d)
            tls = make_tls(tmp / "tls")
            api = SimApi(tls, jwks=keys.jwks(), issuer=keys.issuer, audience="api://telemetry").start()
            box = Outbox(tmp / "outbox.sqlite3", DEVICE, max_rows=10**7, max_bytes=10**10)
            for i in range(0, readings, 500):
                box.put([{"sensor": "t", "type": "simulated", "value": float(j), "unit": "",
                          "time": "2026-11-25T14:00:00.000Z"} for j in range(i, min(readings, i + 500))])
            api.poison(seqs=bad)
            settings = UploadSettings(sink="http", url=api.url, ca_file=str(tls.ca_file), batch_max=batch,
                                      interval_s=10.0, timeout_s=10.0)
            sink = HttpSink(settings, DEVICE)
            up = Uploader(box, sink, Tokens(), AgentState(), settings)   # type: ignore[arg-type]
            t0 = time.monotonic()
            try:
                while box.counts().pending:
                    up.step()
                elapsed = time.monotonic() - t0
                good = len(api.seqs(DEVICE))
                dead = {s for s, _, _ in box.dead_rows(limit=readings)}
                if dead != bad:
                    raise SystemExit(f"dead letters {sorted(dead)[:20]} are not the poisoned {sorted(bad)[:20]}")
                return good, len(dead), len(api.requests), elapsed
            finally:
                sink.close()
                box.close()
                api.stop()

    bad = set(rng.sample(range(1, readings + 1), poisoned))
    base_good, _, base_requests, base_s = drain(set())
    good, dead, requests, elapsed = drain(bad)
    print(f"poison: {readings} readings, {poisoned} refused by the receiver (422 for any request holding one), "
          f"batch_max {batch}, seed {seed}")
    print(f"good readings at the receiver: {good} of {readings - poisoned}; dead-lettered: {dead} "
          f"(exactly the refused ones)")
    print(f"requests: {requests} vs {base_requests} without poison: {requests - base_requests} extra "
          f"({(requests - base_requests) / max(1, poisoned):.1f} per refused reading); "
          f"drain {elapsed:.2f} s vs {base_s:.2f} s")
    if base_good != readings:
        raise SystemExit(f"baseline delivered {base_good} of {readings}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    k = sub.add_parser("kills")
    k.add_argument("--kills", type=int, default=200)
    k.add_argument("--latency-ms", type=float, default=80.0)
    k.add_argument("--seed", type=int, default=11)
    q = sub.add_parser("poison")
    q.add_argument("--readings", type=int, default=5000)
    q.add_argument("--poisoned", type=int, default=10)
    q.add_argument("--batch", type=int, default=500)
    q.add_argument("--seed", type=int, default=11)
    args: Any = p.parse_args(argv)
    if args.what == "kills":
        kills(args.kills, args.latency_ms, args.seed)
    else:
        poison(args.readings, args.poisoned, args.batch, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
