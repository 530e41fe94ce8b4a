"""Draining a backlog to the simulated API over HTTPS: batched uploader vs one POST per reading.

    .venv/bin/python bench/bench_drain.py [--readings 100000] [--naive 2000] [--repeat 3] [--dir DIR]

The API runs in a separate process (``python -m agent sim api``) so the figures and the peak RSS
are the agent side only: Outbox (SQLite, synchronous=FULL) -> Uploader -> HttpSink -> TLS.
The naive loop uses the same sink, session (keep-alive), TLS and API, one reading per POST, on
a subset; its rate is extrapolated. Peak RSS is ru_maxrss of this process (the whole run).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.config import UploadSettings  # noqa: E402
from agent.sim.jwks import SimKeys  # noqa: E402
from agent.state import AgentState  # noqa: E402
from agent.telemetry.outbox import Outbox  # noqa: E402
from agent.telemetry.sinks.http import HttpSink  # noqa: E402
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
    finally:
        api.terminate()
        api.wait(timeout=10)
        if api.stdout:
            api.stdout.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
