"""Supervision, sd_notify and the status file: the parts of the service that need no peers."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from agent import service as service_mod
from agent.config import parse
from agent.errors import AgentError
from agent.sdnotify import Notifier
from agent.service import Supervised
from agent.sim.tls import TlsFiles
from agent.state import AgentState
from agent.statusfile import InstanceLock, StatusWriter, running_pid


def test_crashed_component_is_restarted_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service_mod, "RESTART_BACKOFF_S", (0.01, 0.05))
    stop = threading.Event()
    runs: list[int] = []

    def flaky(ev: threading.Event) -> None:
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError("sensor bus glitch")
        ev.wait()

    sup = Supervised("flaky", flaky, stop)
    sup.start()
    deadline = time.monotonic() + 3
    while len(runs) < 3 and time.monotonic() < deadline:
        sup.check(time.monotonic())
        time.sleep(0.01)
    assert len(runs) == 3 and sup.crashes == 2
    assert sup.thread is not None and sup.thread.is_alive()
    stop.set()
    sup.join(time.monotonic() + 1)
    assert not sup.thread.is_alive()


def test_sd_notify_datagrams(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(2)
    n = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "4000000"})
    assert n.enabled and n.watchdog_s == 4.0
    n.notify("READY=1", "STATUS=waiting for sign-in")
    assert server.recv(1024) == b"READY=1\nSTATUS=waiting for sign-in"
    n.close()
    server.close()


def test_sd_notify_is_silent_without_systemd() -> None:
    n = Notifier({})
    assert not n.enabled and n.watchdog_s is None
    n.notify("READY=1")  # nothing to send to, nothing raised


def test_second_instance_on_same_state_dir_is_refused(state_dir: Path) -> None:
    first = InstanceLock(state_dir)
    first.acquire()
    try:
        assert running_pid(state_dir) == os.getpid()
        with pytest.raises(AgentError, match="already running"):
            InstanceLock(state_dir).acquire()
    finally:
        first.release()
    assert running_pid(state_dir) is None


def test_status_file_follows_state_without_secrets(state_dir: Path) -> None:
    state = AgentState()
    path = state_dir / "status.json"
    writer = StatusWriter(path, state, "dev-1", min_interval_s=0.01)
    writer.start()
    state.signed_in("ada@contoso.example")
    deadline = time.monotonic() + 2
    doc: dict = {}
    while time.monotonic() < deadline:
        if path.exists():
            doc = json.loads(path.read_text())
            if doc.get("state") == "signed_in":
                break
        time.sleep(0.01)
    writer.stop()
    assert doc["state"] == "signed_in" and doc["account"] == "ada@contoso.example"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert json.loads(path.read_text())["state"] == "signed_in"


def test_demo_config_is_valid(tmp_path: Path, tls: TlsFiles) -> None:
    from agent.demo import demo_config

    raw = demo_config(tmp_path, authority="https://127.0.0.1:1/simtenant", api_url="https://127.0.0.1:2/v1/readings",
                      ca_file=tls.ca_file, display="console")
    s = parse(raw, Path("<demo>"))
    assert s.gpio.backend == "fake" and s.display.driver == "console"
    assert str(s.device.state_dir).startswith(str(tmp_path))


def test_unusable_state_dir_is_one_line_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from agent.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("")
    config = tmp_path / "c.toml"
    config.write_text(f'[device]\nstate_dir = "{blocker}/state"\n[auth]\nclient_id = "x"\n'
                      'authority = "https://login.example.com/t"\nscopes = ["s"]\n'
                      '[upload]\nurl = "https://api.example.com/r"\n')
    # A file in the way is the config's mistake: named as device.state_dir, exit 78.
    assert main(["run", "--config", str(config)]) == 78
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith(f"config error: {config}: device.state_dir: '{blocker}/state' is under")


def test_last_upload_is_read_back_after_a_restart(state_dir: Path) -> None:
    from datetime import UTC, datetime

    from agent.statusfile import previous_last_upload

    state = AgentState()
    when = datetime(2026, 11, 25, 14, 39, 32, 123000, tzinfo=UTC)
    state.update(last_upload=when)
    StatusWriter(state_dir / "status.json", state, "dev-1").write(state.snapshot)
    assert previous_last_upload(state_dir / "status.json") == when
    (state_dir / "status.json").write_text("{garbage")
    assert previous_last_upload(state_dir / "status.json") is None


def test_log_lines_and_tracebacks_never_carry_a_token() -> None:
    import io
    import logging

    from agent import logs

    stream = io.StringIO()
    logs.setup("debug", stream=stream)
    log = logging.getLogger("agent.test")
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhZGEifQ.c2lnbmF0dXJlLXNpZ25hdHVyZQ"
    opaque = "opaque-SECRET-token-value-123"
    log.warning("API said: Invalid header value b'Bearer %s\\n'", opaque)
    try:
        raise ValueError(f"refresh failed for {jwt}")
    except ValueError:
        log.exception("sign-in step failed")
    text = stream.getvalue()
    logging.getLogger().handlers.clear()
    assert "sign-in step failed" in text and "Traceback" in text and "[redacted]" in text
    assert opaque not in text and jwt not in text and jwt[:30] not in text


def test_sign_in_code_reaches_the_journal_even_at_level_warning() -> None:
    import io
    import logging

    from agent import logs
    from agent.signin import authenticator as auth

    stream = io.StringIO()
    logs.setup("warning", stream=stream)
    auth.announce.info("To sign in, open %s and enter the code %s", "https://idp/devicelogin", "ABCD")
    logging.getLogger("agent.signin.authenticator").info("routine chatter")
    text = stream.getvalue()
    logging.getLogger().handlers.clear()
    assert "enter the code ABCD" in text and "routine chatter" not in text


def test_sign_out_writes_the_held_acks_first(tmp_path: Path) -> None:
    """Acks the outbox holds in memory are on disk before the sign-out starts (the box is
    often unplugged next: they would be sent again)."""
    from agent.config import parse
    from agent.telemetry.outbox import Outbox
    from tests.fixtures.api import reading

    settings = parse({"device": {"id": "dev-1", "state_dir": str(tmp_path / "state")},
                      "auth": {"client_id": "x", "authority": "https://login.example.com/t", "scopes": ["s"]},
                      "upload": {"url": "https://api.example.com/r"}}, Path("<test>"))
    svc = service_mod.Service(settings, install_signals=False)
    box = Outbox(tmp_path / "state" / "outbox.sqlite3", "dev-1", max_rows=100, max_bytes=10**6)
    held_at_sign_out: list[int] = []

    class Auth:
        def sign_out(self) -> None:
            held_at_sign_out.append(len(box._held))

    try:
        box.put([reading(i) for i in range(5)])
        box.ack([r.seq for r in box.claim(3)])
        assert len(box._held) == 3, "the outbox holds these acks for the next put"
        svc.outbox, svc.auth = box, Auth()      # type: ignore[assignment]
        svc._sign_out_cmd()
        assert held_at_sign_out == [0]
    finally:
        box.close()
