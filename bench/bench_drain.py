"""Draining a backlog to the simulated API over HTTPS: batched uploader vs one POST per reading,
and the bytes on the wire and CPU per reading with ``upload.compress`` "gzip" vs "none".

    .venv/bin/python bench/bench_drain.py [--readings 100000] [--naive 2000] [--repeat 3] [--dir DIR]

The API runs in a separate process (``python -m agent sim api``) so the figures and the peak RSS
are the agent side only: Outbox (SQLite, synchronous=FULL) -> Uploader -> HttpSink -> TLS.
The naive loop uses the same sink, session (keep-alive), TLS and API, one reading per POST, on
a subset; its rate is extrapolated. Peak RSS is ru_maxrss of this process (the whole run).

Wire bytes: request body plus request line and headers as sent (TLS framing not counted), per
reading, for the same backlog: 8 sensors sampled every 10 s, stamped by the clock and labelled
with ``time_quality`` at claim, as the service queues them. CPU per 1,000 readings: this
process's CPU time (claim + label + serialise + compress + TLS + ack) over the drain.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.clock import ClockTrust, Stamp, iso_epoch  # noqa: E402
from agent.config import UploadSettings  # noqa: E402
from agent.sim.jwks import SimKeys  # noqa: E402
from agent.state import AgentState  # noqa: E402
from agent.telemetry.outbox import Outbox  # noqa: E402
from agent.telemetry.sinks.http import HttpSink, encode_body  # noqa: E402
from agent.telemetry.uploader import Uploader  # noqa: E402

DEVICE = "bench-01"


class Tokens:
    def __init__(self, keys: SimKeys) -> None:
        self.token = keys.mint()

    def access_token(self) -> str | None:
        return self.token

    def token_rejected(self) -> str | None:
        return None


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fill(path: Path, n: int) -> Outbox:
    box = Outbox(path, DEVICE, max_rows=10**7, max_bytes=10**10)
    for i in range(0, n, 1000):
        box.put([{"sensor": f"s{j % 8}", "type": "simulated", "value": 20.0 + j % 100 / 10, "unit": "°C",
                  "time": "2026-11-25T14:39:32.123Z"} for j in range(i, min(n, i + 1000))])
    return box


def fill_stamped(path: Path, n: int, clock: ClockTrust) -> Outbox:
    """A backlog as the service stores it: 8 sensors every 10 s, each reading stamped."""
    box = Outbox(path, DEVICE, max_rows=10**7, max_bytes=10**10, clock=clock)
    t0 = 1_795_000_000.0
    rng = random.Random(1)           # values as noisy as a real sensor's: no free compression
    for i in range(0, n, 1000):
        readings, stamps = [], []
        for j in range(i, min(n, i + 1000)):
            wall = t0 + (j // 8) * 10.0
            stamps.append(Stamp(wall=wall, mono=100.0 + (j // 8) * 10.0, boot="bench", synced=True))
            readings.append({"sensor": f"greenhouse{j % 8}.temperature", "type": "bme280",
                             "value": round(rng.gauss(21.0, 3.0), 2), "unit": "°C",
                             "time": iso_epoch(wall)})
        box.put(readings, stamps)
    return box


def wire(box: Outbox, settings: UploadSettings, tokens: Tokens) -> tuple[int, int, float]:
    """Drain ``box``: (readings, bytes on the wire, CPU seconds of this process)."""
    sink = HttpSink(settings, DEVICE)
    sent_bytes = [0]

    def count(resp: object) -> None:
        req = resp.request  # type: ignore[attr-defined]
        sent_bytes[0] += len(f"{req.method} {req.path_url} HTTP/1.1\r\n") + 2
        sent_bytes[0] += sum(len(k) + len(v) + 4 for k, v in req.headers.items())
        sent_bytes[0] += len(req.body or b"")

    sink.client.on_response.append(count)
    up = Uploader(box, sink, tokens, AgentState(), settings)
    sent = 0
    c0 = time.process_time()
    try:
        while box.counts().pending:
            before = box.counts().pending
            if up.step() > 0 and box.counts().pending:
                raise RuntimeError("unexpected wait while draining (API failing?)")
            sent += before - box.counts().pending
    finally:
        sink.close()
    return sent, sent_bytes[0], time.process_time() - c0


def drain(box: Outbox, settings: UploadSettings, tokens: Tokens,
          limit: int | None = None) -> tuple[int, float]:
    sink = HttpSink(settings, DEVICE)
    up = Uploader(box, sink, tokens, AgentState(), settings)
    sent = 0
    t0 = time.perf_counter()
    try:
        while box.counts().pending and (limit is None or sent < limit):
            before = box.counts().pending
            wait = up.step()
            sent += before - box.counts().pending
            if wait > 0 and box.counts().pending:
                raise RuntimeError(f"unexpected wait {wait} s while draining (API failing?)")
    finally:
        sink.close()
    return sent, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readings", type=int, default=100_000)
    p.add_argument("--naive", type=int, default=2000, help="readings sent one per POST (subset)")
    p.add_argument("--batch", type=int, default=500, help="upload.batch_max")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", default=".", help="where the outbox lives (a real disk)")
    p.add_argument("--wire", type=int, default=20_000, help="readings for the gzip/none comparison")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.dir))
    keys = SimKeys(issuer="https://bench/v2.0")
    (work / "jwks.json").write_text(json.dumps(keys.jwks()))
    api = subprocess.Popen([sys.executable, "-m", "agent", "sim", "api", "--port", "0", "--tls-dir",
                            str(work / "tls"), "--jwks-file", str(work / "jwks.json"), "--audience",
                            "api://telemetry"], stdout=subprocess.PIPE, text=True)
    try:
        assert api.stdout is not None
        url = api.stdout.readline().split()[-1]
        settings = UploadSettings(url=url, ca_file=str(work / "tls" / "ca.pem"), batch_max=args.batch,
                                  interval_s=10.0, timeout_s=30.0)
        tokens = Tokens(keys)
        batched, naive = [], []
        rss_before = rss_mib()
        for r in range(args.repeat):
            box = fill(work / f"batched-{r}.sqlite3", args.readings)
            sent, secs = drain(box, settings, tokens)
            box.close()
            batched.append(sent / secs)
            box = fill(work / f"naive-{r}.sqlite3", args.naive)
            sent, secs = drain(box, UploadSettings(**{**settings.__dict__, "batch_max": 1}), tokens)
            box.close()
            naive.append(sent / secs)
        b, n = statistics.median(batched), statistics.median(naive)
        print(f"drain to the simulated API over HTTPS (loopback), median of {args.repeat} runs")
        print(f"  batched (batch_max={args.batch}): {args.readings} readings, {b:,.0f} readings/s "
              f"({args.readings / b:.1f} s)")
        print(f"  naive (1 reading per POST, keep-alive): {args.naive} readings, {n:,.0f} readings/s "
              f"(100k would take {100_000 / n:.0f} s)")
        print(f"  ratio batched/naive: {b / n:.0f}x")
        print(f"  peak RSS of the agent-side process: {rss_mib():.1f} MiB "
              f"(before draining: {rss_before:.1f} MiB)")
        clock = ClockTrust(kernel=lambda: True, boot_id="bench")
        figures: dict[str, list[tuple[float, float]]] = {"none": [], "gzip": []}
        for r in range(args.repeat):
            for compress in ("none", "gzip"):
                box = fill_stamped(work / f"wire-{compress}-{r}.sqlite3", args.wire, clock)
                n, nbytes, cpu = wire(box, UploadSettings(**{**settings.__dict__, "compress": compress}), tokens)
                box.close()
                figures[compress].append((nbytes / n, cpu / n * 1000))
        per = {k: statistics.median(b for b, _ in v) for k, v in figures.items()}
        cpu_k = {k: statistics.median(c for _, c in v) for k, v in figures.items()}
        print(f"bytes on the wire per reading ({args.wire} readings, batch_max={args.batch}, "
              f"body + request line + headers, TLS framing not counted), median of {args.repeat}")
        print(f"  compress = \"none\": {per['none']:.1f} B/reading, CPU {cpu_k['none'] * 1000:.1f} ms "
              f"per 1,000 readings")
        print(f"  compress = \"gzip\": {per['gzip']:.1f} B/reading, CPU {cpu_k['gzip'] * 1000:.1f} ms "
              f"per 1,000 readings")
        print(f"  gzip sends {100 * (1 - per['gzip'] / per['none']):.0f} % fewer bytes, for "
              f"{(cpu_k['gzip'] - cpu_k['none']) * 1000:+.1f} ms CPU per 1,000 readings")
        box = fill_stamped(work / "encode.sqlite3", args.batch, clock)
        rows = box.claim(args.batch)
        box.close()
        for gz in (False, True):
            secs = min(timeit.repeat(lambda gz=gz: encode_body(DEVICE, rows, gzipped=gz), number=20, repeat=7))
            print(f"  serialising{' + gzip' if gz else ''} alone: {secs / 20 / len(rows) * 1e6:.2f} ms CPU "
                  f"per 1,000 readings (best of 7)")
    finally:
        api.terminate()
        api.wait(timeout=10)
        if api.stdout:
            api.stdout.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
