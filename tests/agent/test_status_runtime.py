"""status.json lives in the runtime dir (tmpfs) while the service runs, so its rewrites (a few
per reading, each a new file) cost the SD card nothing; the state dir gets the last word at stop,
and `device-agent status` reads whichever is newest, running or not."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.config import parse
from agent.state import AgentState
from agent.statusfile import (
    InstanceLock,
    StatusWriter,
    previous_last_upload,
    read_status,
    runtime_status_path,
)
from tests.waiting import wait_until


def settings_for(state_dir: Path):  # noqa: ANN201 (the Settings dataclass)
    return parse({"device": {"id": "dev-1", "state_dir": str(state_dir)},
                  "auth": {"client_id": "x", "authority": "https://login.example.com/t", "scopes": ["s"]},
                  "upload": {"url": "https://api.example.com/r"}}, Path("<test>"))


def test_the_running_service_writes_status_to_the_runtime_dir_and_leaves_the_last_word_in_the_state_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run, state_dir = tmp_path / "run", tmp_path / "state"
    run.mkdir(mode=0o755)
    state_dir.mkdir(mode=0o700)
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(run))
    live = runtime_status_path(state_dir)
    assert live is not None and live.parent == run

    state = AgentState()
    when = datetime(2026, 11, 25, 14, 39, 32, 123000, tzinfo=UTC)
    writer = StatusWriter(state_dir / "status.json", state, "dev-1", min_interval_s=0.01)
    lock = InstanceLock(state_dir)
    lock.acquire()
    try:
        writer.start()
        state.signed_in("ada@contoso.example")
        state.update(last_upload=when)
        wait_until(lambda: live.exists() and json.loads(live.read_text()).get("last_upload"), 5,
                   "status in the runtime dir")
        assert not (state_dir / "status.json").exists(), "nothing rewritten on the SD card"
        assert oct(live.stat().st_mode & 0o777) == "0o600"
        doc = read_status(settings_for(state_dir))                  # `device-agent status`
        assert doc["running"] is True and doc["account"] == "ada@contoso.example"
        writer.stop()
    finally:
        lock.release()
    left = json.loads((state_dir / "status.json").read_text())
    assert left["last_upload"] == json.loads(live.read_text())["last_upload"]
    monkeypatch.delenv("RUNTIME_DIRECTORY")         # a reboot: the runtime dir is gone
    for p in run.iterdir():
        p.unlink()
    assert previous_last_upload(state_dir / "status.json") == when, "the next start knows it"
    doc = read_status(settings_for(state_dir))
    assert doc["running"] is False and doc["last_upload"] == left["last_upload"]


def test_without_a_trusted_runtime_dir_status_stays_in_the_state_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run, state_dir = tmp_path / "run", tmp_path / "state"
    run.mkdir(mode=0o777)                          # anyone could plant a status there
    run.chmod(0o777)
    state_dir.mkdir(mode=0o700)
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(run))
    if runtime_status_path(state_dir) is not None:
        pytest.skip("/run/device-agent exists on this machine")
    state = AgentState()
    writer = StatusWriter(state_dir / "status.json", state, "dev-1", min_interval_s=0.01)
    assert writer.path == state_dir / "status.json"
    writer.write(state.snapshot)
    assert (state_dir / "status.json").exists() and not list(run.iterdir())


def test_status_of_a_service_that_has_not_written_its_status_yet_does_not_wait_for_the_outbox(
        tmp_path: Path) -> None:
    from agent.telemetry.outbox import Outbox
    from tests.fixtures.api import reading

    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    lock = InstanceLock(state_dir)
    lock.acquire()
    try:
        with Outbox(state_dir / "outbox.sqlite3", "dev-1", max_rows=10, max_bytes=10**6) as box:
            box.put([reading(1)])
            t0 = time.monotonic()
            doc = read_status(settings_for(state_dir))
            assert time.monotonic() - t0 < 1.0, "the outbox is the service's: not waited for"
    finally:
        lock.release()
    assert doc["running"] is True and doc["state"] == "starting"


def test_status_never_shows_the_previous_runs_document_as_the_running_services(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A service just started (its lock held, no status written yet) while the previous run's
    status.json says "online": `status` says "starting", with the last upload it knew, until the
    new service writes its own document."""
    import os

    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(run))
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    previous = {"state": "online", "pid": 4242, "account": "old@example.com", "error": None,
                "outbox": {"pending": 0, "dead": 0, "dropped": 0}, "last_upload": "2026-01-01T00:00:00Z"}
    path = runtime_status_path(state_dir)
    assert path is not None and path.parent == run
    path.write_text(json.dumps(previous))           # RuntimeDirectoryPreserve=restart kept it
    lock = InstanceLock(state_dir)
    lock.acquire()
    try:
        doc = read_status(settings_for(state_dir))
        assert doc["running"] is True and doc["state"] == "starting", doc
        assert doc.get("pid") != 4242 and doc["last_upload"] == previous["last_upload"]
        path.write_text(json.dumps({**previous, "pid": os.getpid(), "state": "waiting_for_user"}))
        doc = read_status(settings_for(state_dir))
        assert doc["state"] == "waiting_for_user" and doc["pid"] == os.getpid(), doc
        # A read-only state dir: the lock file still names the previous run; the kernel knows.
        (state_dir / "agent.lock").write_text("4242\n")
        doc = read_status(settings_for(state_dir))
        assert doc["state"] == "waiting_for_user" and doc["pid"] == os.getpid(), doc
    finally:
        lock.release()
