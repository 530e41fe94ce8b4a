"""`device-agent demo`: the whole agent on a laptop, nothing to configure, nothing written outside a temp dir.

Starts the simulated Entra ID and telemetry API on loopback (with a throwaway CA), then runs the
real service with fake GPIO, simulated sensors and the console (or png) display. A person signs in
in a browser at the printed URL, or ``--auto-approve S`` approves after S seconds.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import config, logs
from agent.service import Service

if TYPE_CHECKING:      # imported in run_demo: the sims load only when a demo runs
    from agent.sim.idp import SimIdp

log = logging.getLogger("agent.demo")

DEMO_CLIENT_ID = "device-agent-demo"
DEMO_SCOPE = "api://telemetry/Readings.Write"
DEMO_APP_SCOPE = "api://telemetry/.default"      # --flow client_certificate: app-only


def demo_config(tmp: Path, *, authority: str, api_url: str, ca_file: Path, display: str) -> dict[str, Any]:
    """The TOML the demo would have needed, as a dict: printed so people can copy it."""
    return {
        "device": {"id": "demo-device", "state_dir": str(tmp / "state")},
        "auth": {"client_id": DEMO_CLIENT_ID, "authority": authority, "instance_discovery": False,
                 "scopes": [DEMO_SCOPE], "ca_file": str(ca_file), "timeout_s": 10, "auto_renew_codes": 3},
        "display": {"driver": display, "path": str(tmp / "screen.png"), "sleep_after_s": 0},
        "gpio": {"backend": "fake", "button": 17, "led": 27},
        "sensors": [
            {"name": "temperature", "type": "simulated", "interval_s": 1.0, "waveform": "sine",
             "period_s": 60.0, "amplitude": 3.0, "offset": 21.0, "unit": "°C"},
            {"name": "humidity", "type": "simulated", "interval_s": 2.0, "waveform": "sawtooth",
             "period_s": 120.0, "amplitude": 10.0, "offset": 45.0, "unit": "%"},
        ],
        "upload": {"sink": "http", "url": api_url, "ca_file": str(ca_file), "interval_s": 2.0,
                   "batch_max": 100},
        "log": {"level": "info"},
    }


def certificate_auth(raw: dict[str, Any], tmp: Path, idp: SimIdp) -> str:
    """--flow client_certificate: a throwaway certificate, uploaded to the simulated app
    registration with the application permission granted; ``raw``'s [auth] switched to it.
    Returns the certificate's thumbprint."""
    from agent.sim.appcreds import make_certificate

    files = make_certificate(tmp / "cert", raw["device"]["id"])
    thumbprint = idp.register_certificate(files.pem, DEMO_CLIENT_ID, roles=("Readings.Write",))
    raw["auth"].update(flow="client_certificate", scopes=[DEMO_APP_SCOPE],
                       certificate_file=str(files.certificate_file),
                       private_key_file=str(files.private_key_file))
    return thumbprint


def run_demo(*, auto_approve_s: float | None, duration_s: float | None, display: str = "console",
             flow: str = "device_code") -> int:
    from agent.sim.api import SimApi
    from agent.sim.idp import SimIdp
    from agent.sim.tls import make_tls

    logs.setup("info")
    tmp = Path(tempfile.mkdtemp(prefix="device-agent-demo-"))
    idp = api = None
    try:
        tls = make_tls(tmp / "tls")
        idp = SimIdp(tls, client_id=DEMO_CLIENT_ID).start()
        idp.auto_approve_after_s = auto_approve_s
        api = SimApi(tls, jwks_url=idp.jwks_url, issuer=idp.issuer, audience="api://telemetry",
                     ca_file=str(tls.ca_file), db_path=tmp / "api.sqlite3").start()
        raw = demo_config(tmp, authority=idp.authority, api_url=api.url, ca_file=tls.ca_file, display=display)
        thumbprint = certificate_auth(raw, tmp, idp) if flow == "client_certificate" else None
        settings = config.parse(raw, Path("<demo>"))
        service = Service(settings)
        watcher = threading.Thread(target=_summaries,
                                   args=(service, idp, api, tmp, auto_approve_s, duration_s, thumbprint),
                                   name="demo-summary", daemon=True)
        watcher.start()
        code = service.run()
        _final(service, api, settings.device.id)
        return code
    finally:
        for peer in (api, idp):
            if peer is not None:
                peer.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _banner(idp: Any, api: Any, tmp: Path, auto_approve_s: float | None, user_code: str,
            thumbprint: str | None = None) -> None:
    lines = [
        "device-agent demo — everything below runs on this machine (loopback only)",
        f"  identity provider  {idp.authority}   (simulated Entra ID)",
        f"  telemetry API      {api.url}",
        f"  temp dir           {tmp}   (removed at exit)",
    ]
    if thumbprint is not None:
        lines += [
            f"  sign in            as app {DEMO_CLIENT_ID}, no code: certificate {thumbprint}",
            f"                     ({tmp / 'cert' / 'device.crt'}, key 0600 beside it; "
            "uploaded to the simulated app registration)",
        ]
    else:
        lines += [
            f"  sign in            open {idp.devicelogin_url} and enter the code {user_code}",
            "                     (the demo CA is self-made: your browser will warn; that is expected)",
        ]
    if auto_approve_s is not None and thumbprint is None:
        lines.append(f"  auto-approve       the code will be approved after {auto_approve_s:g} s")
    lines.append("  stop               Ctrl-C")
    _say("\n".join(lines))


def _summaries(service: Service, idp: Any, api: Any, tmp: Path, auto_approve_s: float | None,
               duration_s: float | None, thumbprint: str | None = None) -> None:
    """The banner once the first code is out, then a one-line summary every few seconds;
    stops the service after ``duration_s``."""
    start = time.monotonic()
    stop = service.stop_event
    device_id = service.settings.device.id
    # Printed after the panel took the top of the terminal, so that it stays readable below it.
    def shown() -> bool:
        snap = service.state.snapshot
        return snap.code is not None or (thumbprint is not None and snap.phase in ("signed_in", "error"))

    while not stop.wait(0.1) and not shown() and time.monotonic() - start < 10:
        pass
    code = service.state.snapshot.code
    _banner(idp, api, tmp, auto_approve_s, code.user_code if code else "the panel shows", thumbprint)

    def next_wait() -> float:
        if duration_s is None:
            return 5.0
        return min(5.0, max(0.05, duration_s - (time.monotonic() - start)))

    while not stop.wait(next_wait()):
        if duration_s is not None and time.monotonic() - start >= duration_s:
            log.info("demo: --duration %g s reached; stopping", duration_s)
            service.request_stop()
            return
        _say(_summary_line(service, api, device_id))


def _summary_line(service: Service, api: Any, device_id: str) -> str:
    snap = service.state.snapshot
    received = len(api.seqs(device_id))
    last = snap.last_reading
    reading = f"{last.sensor}={last.value:.2f}{last.unit}" if last and last.value is not None else "-"
    who = f"signed in as {snap.account}" if snap.phase == "signed_in" else (
        f"waiting for code {snap.code.user_code}" if snap.code else snap.phase)
    return (f"demo: {who} | last reading {reading} | API has {received} readings | "
            f"outbox {snap.outbox.pending} pending, {snap.outbox.dead} dead, {snap.outbox.dropped} dropped")


def _final(service: Service, api: Any, device_id: str) -> None:
    _say(_summary_line(service, api, device_id))


def _say(text: str) -> None:
    """One line for the person at the terminal. A closed pipe (``demo 2>&1 | head``) must not
    end the summary thread: it is also the one that stops the demo at --duration."""
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError):      # BrokenPipeError, or stderr already closed
        pass
