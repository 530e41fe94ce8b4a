"""Token requests the uploader's calls cost: a day of 300 s tokens, and an hour of IdP outage.

    .venv/bin/python bench/bench_token_refresh.py

Real msal against the simulated Entra ID on loopback HTTPS; simulated time: the Authenticator's
monotonic clock and the process's wall clock (msal's cache, the sim's tokens) move together by
the step, so a day takes seconds. Prints, for ``access_token()`` called as the uploader does:
token requests in a day of 300 s tokens (one call per 10 s upload), and token requests plus
journal warnings in an hour with the token expired and the IdP answering 503 (one call per 2 s).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import threading
import time
from pathlib import Path

from agent.config import AuthSettings
from agent.signin.authenticator import Authenticator, Timing
from agent.sim.idp import SimIdp
from agent.sim.tls import make_tls
from agent.state import AgentState

_real_time = time.time
_offset = [0.0]


def _now_wall() -> float:
    return _real_time() + _offset[0]


def _now_monotonic() -> float:
    return time.monotonic() + _offset[0]


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def measure(idp: SimIdp, tls_ca: str, cache: Path, *, token_life_s: int, calls: int, every_s: float,
            outage: bool, warnings: _Warnings) -> tuple[int, int]:
    """(token requests, warnings) for ``calls`` access_token() calls ``every_s`` apart."""
    idp.set(access_token_lifetime_s=token_life_s, fail_token_next=0)
    state = AgentState()
    settings = AuthSettings(client_id="sim-device-agent", scopes=("api://telemetry/Readings.Write",),
                            authority=idp.authority, instance_discovery=False, ca_file=tls_ca)
    auth = Authenticator(settings, cache, state, device_id="bench",
                         timing=dataclasses.replace(Timing(), wait_slice_s=0.05), clock=_now_monotonic)
    stop = threading.Event()
    thread = threading.Thread(target=auth.run, args=(stop,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while state.snapshot.phase != "signed_in" and time.monotonic() < deadline:
        time.sleep(0.02)
    if outage:
        idp.set(fail_token_next=10**9, fail_status=503)
    before = len([r for r in idp.requests if r.grant_type == "refresh_token"])
    warned = warnings.count
    start = 3600.0 if outage else 0.0       # outage: the token has just expired
    for i in range(calls):
        _offset[0] = start + every_s * i
        auth.access_token()
    requests = len([r for r in idp.requests if r.grant_type == "refresh_token"]) - before
    stop.set()
    thread.join(10)
    _offset[0] = 0.0
    return requests, warnings.count - warned


def main() -> None:
    time.time = _now_wall   # msal's token cache and the sim judge tokens by the wall clock
    warnings = _Warnings()
    logging.getLogger("agent").addHandler(warnings)
    logging.getLogger("agent").setLevel(logging.INFO)
    workdir = Path(tempfile.mkdtemp(prefix="bench-token-"))
    tls = make_tls(workdir / "tls")
    idp = SimIdp(tls, client_id="sim-device-agent").start()
    idp.auto_approve_after_s = 0
    idp.set(interval_s=1)
    try:
        day, _ = measure(idp, str(tls.ca_file), workdir / "day.json", token_life_s=300, calls=8640,
                         every_s=10.0, outage=False, warnings=warnings)
        print(f"300 s tokens, a day of uploads every 10 s: {day} token requests")
        hour, warned = measure(idp, str(tls.ca_file), workdir / "outage.json", token_life_s=3600,
                               calls=1800, every_s=2.0, outage=True, warnings=warnings)
        print(f"IdP down for an hour, token expired, a call every 2 s: {hour} token requests, "
              f"{warned} warnings")
    finally:
        idp.stop()


if __name__ == "__main__":
    main()
