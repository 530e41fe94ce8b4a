"""An idle uploader sleeps until there is news, yet a reading still goes out at once, readings
are still batched by the upload interval, and a deleted or replaced outbox file is still
noticed (docs/INTERFACE.md: within one upload interval) — by inotify at once, or by a look once
an interval where inotify is missing. Real clocks, the real HTTP sink against the simulated API,
real files."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import UploadSettings
from agent.sim.api import SimApi
from agent.state import AgentState
from agent.telemetry import filewatch
from agent.telemetry.filewatch import FileWatch
from agent.telemetry.outbox import Outbox
from agent.telemetry.sinks.http import HttpSink
from agent.telemetry.uploader import Uploader
from tests.fixtures.api import DEVICE, FakeTokens, reading
from tests.fixtures.waiting import wait_for

HOUR_S = 3600.0
SOON_S = 5.0           # far below the hour-long waits these tests cut short


@pytest.fixture
def running(outbox: Outbox, tokens: FakeTokens, api_settings: UploadSettings) -> Iterator:
    """Start ``Uploader.run`` in a thread (real clock); stopped at the end."""
    started: list[tuple[threading.Event, threading.Thread, HttpSink]] = []

    def start(**overrides: object) -> Uploader:
        s = dataclasses.replace(api_settings, **overrides)  # type: ignore[arg-type]
        sink = HttpSink(s, DEVICE)
        up = Uploader(outbox, sink, tokens, AgentState(), s)
        stop = threading.Event()
        t = threading.Thread(target=up.run, args=(stop,), daemon=True)
        t.start()
        started.append((stop, t, sink))
        return up

    yield start
    for stop, t, sink in started:
        stop.set()
        t.join(5)
        sink.close()
        assert not t.is_alive()


def test_a_reading_queued_on_an_idle_uploader_goes_out_at_once(running, outbox: Outbox,
                                                               sim_api: SimApi) -> None:
    up = running(interval_s=HOUR_S)
    wait_for(lambda: up._idle, SOON_S, "the uploader found nothing to send and sleeps")
    outbox.put([reading(1)])
    up.readings_queued()             # what the sampler calls after its put
    wait_for(lambda: sim_api.seqs(DEVICE) == {1}, SOON_S, "the reading delivered, not an hour later")


def test_readings_queued_faster_than_the_interval_are_still_batched(running, outbox: Outbox,
                                                                    sim_api: SimApi) -> None:
    up = running(interval_s=1.0)
    wait_for(lambda: up._idle, SOON_S, "idle")
    for i in range(10):              # 10 readings over ~0.5 s, each announced
        outbox.put([reading(i)])
        up.readings_queued()
        time.sleep(0.05)
    wait_for(lambda: len(sim_api.seqs(DEVICE)) == 10, SOON_S, "all ten delivered")
    posts = [r for r in sim_api.requests if r.status == 200]
    assert len(posts) <= 3, f"{len(posts)} requests for 10 readings in half an interval"


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_an_outbox_file_gone_is_noticed_at_once_without_waiting_an_interval(
        running, outbox: Outbox, sim_api: SimApi, how: str) -> None:
    sim_api.fail(503, count=10**6)            # the readings stay in the file
    outbox.put([reading(i) for i in range(5)])
    up = running(interval_s=HOUR_S)
    wait_for(lambda: sim_api.requests, SOON_S, "a first (refused) upload")
    _take_away(outbox.path, how)
    wait_for(lambda: outbox.counts().dropped == 5, SOON_S,
             f"the {how} file noticed and its 5 rows counted, long before the hour-long interval")
    assert up is not None
    # The new file is watched too: a second loss is noticed as well.
    outbox.put([reading(9)])
    _take_away(outbox.path, how)
    wait_for(lambda: outbox.counts().dropped == 6, SOON_S, "the reopened file is watched too")


def test_without_inotify_the_file_is_looked_at_once_an_interval(
        running, outbox: Outbox, sim_api: SimApi, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(filewatch.FileWatch, "start", lambda self: False)
    sim_api.fail(503, count=10**6)
    outbox.put([reading(i) for i in range(3)])
    running(interval_s=0.5)
    wait_for(lambda: sim_api.requests, SOON_S, "a first (refused) upload")
    _take_away(outbox.path, "deleted")
    wait_for(lambda: outbox.counts().dropped == 3, SOON_S, "noticed by the look once an interval")


def test_file_watch_ignores_the_other_files_beside_it(tmp_path: Path) -> None:
    target = tmp_path / "outbox.sqlite3"
    target.write_bytes(b"x")
    calls: list[int] = []
    seen = threading.Event()

    def changed() -> None:
        calls.append(1)
        seen.set()

    watch = FileWatch(target, changed)
    if not watch.start():
        pytest.skip("no inotify on this system")
    try:
        for i in range(5):                   # status.json's atomic rewrites, SQLite's side files
            (tmp_path / f"status.json.tmp{i}").write_bytes(b"{}")
            os.replace(tmp_path / f"status.json.tmp{i}", tmp_path / "status.json")
        (tmp_path / "outbox.sqlite3-wal").write_bytes(b"w")
        with target.open("ab") as f:         # writes to the file itself are no change of file
            f.write(b"more")
        time.sleep(0.2)
        assert calls == []
        target.unlink()
        assert seen.wait(SOON_S), "a deleted file reported"
    finally:
        watch.stop()


def _take_away(path: Path, how: str) -> None:
    if how == "deleted":
        path.unlink()
    else:
        other = path.with_name("other.sqlite3")
        other.write_bytes(b"")
        os.replace(other, path)


def test_signed_out_the_uploader_sleeps_until_the_sign_in_flush(
        outbox: Outbox, tokens: FakeTokens, api_settings: UploadSettings, sim_api: SimApi) -> None:
    """No token and not signed in: no look every NO_TOKEN_POLL_S, yet the readings go out the
    moment the service's flush says a sign-in exists."""
    state = AgentState()
    looks: list[float] = []

    class Counting:
        def access_token(self) -> str | None:
            looks.append(time.monotonic())
            return tokens.access_token() if state.snapshot.phase == "signed_in" else None

        def token_rejected(self, claims_challenge: str | None = None) -> str | None:
            return tokens.token_rejected()

    outbox.put([reading(1)])
    sink = HttpSink(api_settings, DEVICE)
    up = Uploader(outbox, sink, Counting(), state, api_settings)
    stop = threading.Event()
    t = threading.Thread(target=up.run, args=(stop,), daemon=True)
    t.start()
    try:
        wait_for(lambda: looks, SOON_S, "the first look for a token")
        time.sleep(2.5)                       # longer than NO_TOKEN_POLL_S
        assert len(looks) == 1, f"looked for a token {len(looks)} times while signed out"
        state.signed_in("someone@example.com")
        up.flush()                            # what the service does at sign-in
        wait_for(lambda: sim_api.seqs(DEVICE) == {1}, SOON_S, "delivered at sign-in")
    finally:
        stop.set()
        t.join(5)
        sink.close()


def test_the_outbox_watch_starts_without_running_ldconfig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ctypes.util.find_library runs ldconfig (a subprocess, ~10 ms) at every uploader start;
    the shared loader opens glibc by its soname."""
    import subprocess


    started: list[object] = []
    real = subprocess.Popen

    def popen(*args: object, **kw: object) -> object:
        started.append(args[0] if args else kw.get("args"))
        return real(*args, **kw)  # type: ignore[call-overload]

    monkeypatch.setattr(subprocess, "Popen", popen)
    path = tmp_path / "outbox.db"
    path.write_bytes(b"")
    watch = FileWatch(path, lambda: None)
    try:
        assert watch.start()
    finally:
        watch.stop()
    assert started == [], f"subprocesses at start: {started}"
