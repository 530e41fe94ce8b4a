"""Sign-in latencies against the simulated Entra ID on loopback (real msal, real HTTPS).

    .venv/bin/python bench/bench_auth.py [--rounds N]

Prints medians (and max) of: cold start to code shown, restart with a cached sign-in to
signed in, request_new_code() to the new code shown, stop to run() returning while polling.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agent.config import AuthSettings
from agent.signin.authenticator import Authenticator, Timing
from agent.sim.idp import SimIdp
from agent.sim.tls import make_tls
from agent.state import AgentState, Snapshot


def wait(state: AgentState, pred: Callable[[Snapshot], bool], timeout_s: float = 15) -> float:
    cond = threading.Condition()
    hit: list[float] = []

    def obs(s: Snapshot) -> None:
        if pred(s) and not hit:
            with cond:
                hit.append(time.monotonic())
                cond.notify_all()

    state.subscribe(obs)
    try:
        with cond:
            if not cond.wait_for(lambda: bool(hit), timeout_s):
                raise TimeoutError("condition not reached")
        return hit[0]
    finally:
        state.unsubscribe(obs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="auth-bench-"))
    tls = make_tls(tmp / "tls")
    idp = SimIdp(tls, client_id="bench").start()
    idp.set(interval_s=5)             # Entra's interval: cancellation must not wait for it
    settings = AuthSettings(client_id="bench", scopes=("api://telemetry/Readings.Write",),
                            authority=idp.authority, instance_discovery=False,
                            ca_file=str(tls.ca_file), timeout_s=10)
    timing = Timing()
    cold, renew, stop_lat, restart = [], [], [], []
    try:
        for i in range(args.rounds):
            cache = tmp / f"state{i}" / "token_cache.json"
            state = AgentState()
            auth = Authenticator(settings, cache, state, device_id="bench", timing=timing)
            stop = threading.Event()
            t0 = time.monotonic()
            th = threading.Thread(target=auth.run, args=(stop,), daemon=True)
            th.start()
            cold.append(wait(state, lambda s: s.code is not None) - t0)
            first = state.snapshot.code.user_code  # type: ignore[union-attr]
            time.sleep(random.uniform(0.2, 2.2))   # anywhere in msal's 1 s exit_condition cycle
            t0 = time.monotonic()
            auth.request_new_code()
            renew.append(wait(state, lambda s, f=first: s.code is not None and s.code.user_code != f) - t0)
            idp.approve(state.snapshot.code.user_code)  # type: ignore[union-attr]
            wait(state, lambda s: s.phase == "signed_in")
            stop.set()
            th.join()
            # restart with the cache
            state = AgentState()
            auth = Authenticator(settings, cache, state, device_id="bench", timing=timing)
            stop = threading.Event()
            t0 = time.monotonic()
            th = threading.Thread(target=auth.run, args=(stop,), daemon=True)
            th.start()
            restart.append(wait(state, lambda s: s.phase == "signed_in") - t0)
            auth.sign_out()
            wait(state, lambda s: s.code is not None)
            time.sleep(random.uniform(0.2, 2.2))
            t0 = time.monotonic()
            stop.set()
            th.join()
            stop_lat.append(time.monotonic() - t0)
    finally:
        idp.stop()

    def show(name: str, xs: list[float]) -> None:
        print(f"{name:38s} median {statistics.median(xs) * 1000:7.1f} ms   max {max(xs) * 1000:7.1f} ms"
              f"   (n={len(xs)})")

    show("cold start -> code shown", cold)
    show("restart with cache -> signed in", restart)
    show("request_new_code -> new code shown", renew)
    show("stop while polling -> run() returns", stop_lat)


if __name__ == "__main__":
    main()
