"""`device-agent dead-letter list | retry | purge` as a subprocess against an outbox that a live
Outbox (the running service's) holds open and keeps writing to, then delivered by the uploader
to the simulated API with the original seq and id.

The live Outbox holds the file exclusively, so the command asks "the service": this test process,
holding the service's instance lock and answering the request signal exactly as `device-agent
run` does (agent.statusfile.answer_dead_letter on its own outbox)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.clock import Stamp, iso_epoch
from agent.config import UploadSettings
from agent.signal_relay import relay_signals
from agent.sim.api import SimApi
from agent.state import AgentState, OutboxCounts
from agent.statusfile import DEAD_LETTER_SIGNAL, InstanceLock, answer_dead_letter
from agent.telemetry.outbox import Outbox
from agent.telemetry.sinks.http import HttpSink
from agent.telemetry.uploader import Uploader
from tests.agent.test_clock import DAYS3, Clocks, seconds
from tests.agentproc import write_config
from tests.fixtures.api import DEVICE, FakeTokens, reading


@pytest.fixture
def config(tmp_path: Path, api_settings: UploadSettings) -> Path:
    return write_config(tmp_path / "config.toml", {
        "device": {"id": DEVICE, "state_dir": str(tmp_path / "state")},
        "auth": {"client_id": "sim", "authority": "https://127.0.0.1:1/simtenant", "instance_discovery": False,
                 "scopes": ["api://telemetry/Readings.Write"]},
        "upload": {"sink": "http", "url": api_settings.url},
    })


@contextmanager
def serving(box: Outbox) -> Iterator[Outbox]:
    """This process acts as the running service for ``box``: the instance lock and the answer."""
    state_dir = box.path.parent
    lock = InstanceLock(state_dir)
    lock.acquire()
    restore = relay_signals((DEAD_LETTER_SIGNAL,), lambda _s: threading.Thread(
        target=answer_dead_letter, args=(state_dir, box, DEVICE)).start())
    try:
        yield box
    finally:
        restore()
        lock.release()


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox(tmp_path / "state" / "outbox.sqlite3", DEVICE, max_rows=10**6, max_bytes=10**9)
    with serving(box):
        yield box
    box.close()


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "dead-letter", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])


def test_list_retry_and_purge_while_the_service_writes(config: Path, live: Outbox, sim_api: SimApi,
                                                       tokens: FakeTokens, api_settings: UploadSettings) -> None:
    live.put([reading(i) for i in range(20)])
    sim_api.poison(seqs={4, 5, 17})
    state = AgentState()
    sink = HttpSink(api_settings, DEVICE)
    up = Uploader(live, sink, tokens, state, api_settings, clock=lambda: 0.0)
    try:
        up.step()
        assert live.counts() == OutboxCounts(pending=0, dead=3, dropped=0)

        stop = threading.Event()

        def sampler() -> None:            # the service keeps writing while the command runs
            i = 100
            while not stop.is_set():
                live.put([reading(i)])
                i += 1

        writer = threading.Thread(target=sampler)
        writer.start()
        try:
            listed = cli(config, "list")
            retried = cli(config, "retry", "4", "17")
        finally:
            stop.set()
            writer.join()
        assert listed.returncode == 0, listed.stderr
        lines = listed.stdout.splitlines()
        assert [ln.split()[0] for ln in lines[1:4]] == ["4", "5", "17"]
        assert "HTTP 422" in lines[1] and "seq 4" in lines[1]
        assert lines[-1].startswith("3 dead-lettered; 0 dropped")
        assert retried.returncode == 0, retried.stderr
        assert "2 readings queued again" in retried.stdout

        assert live.counts().dead == 1, "done by the running service, on its own outbox"
        sim_api.poisoned_seqs.clear()
        while live.counts().pending:
            up.step()
        got = {r["seq"]: r for r in sim_api.readings(DEVICE)}
        assert {4, 17} <= got.keys() and 5 not in got
        assert got[17]["id"] == f"{DEVICE}:17" and got[17]["value"] == reading(16)["value"]

        purged = cli(config, "purge")
        assert purged.returncode == 0 and "1 dead-lettered readings purged" in purged.stdout
        assert live.counts().dead == 0 and live.counts().dropped == 1
        after = cli(config, "list")
        assert after.stdout.splitlines()[-1] == "0 dead-lettered; 1 dropped in total (dead letters purged: 1)"
    finally:
        sink.close()


@pytest.mark.parametrize(("args", "code", "says"), [
    (["retry"], 78, "--all, or SEQ"),               # a wrong command line is a config error (78)
    (["retry", "--all", "3"], 78, "not both"),
    (["retry", "abc"], 78, "'abc' is not a seq"),
    (["retry", "0"], 78, "'0' is not a seq"),
    (["retry", "-3"], 78, "command line"),          # argparse: unknown option
    (["retry", "²"], 78, "is not a seq"),
    (["retry", "2", "99", "100"], 1, "not dead-lettered: seq 99-100"),
    (["purge", "5"], 78, "unrecognized arguments: 5"),
    (["frobnicate"], 78, "command line"),
])
def test_bad_arguments_give_one_line_and_a_usage_exit_code(config: Path, live: Outbox, args: list[str],
                                                           code: int, says: str | None) -> None:
    live.put([reading(i) for i in range(3)])
    live.dead_letter([2], "HTTP 422 test")
    done = cli(config, *args)
    assert done.returncode == code, done
    assert "Traceback" not in done.stderr
    if says:
        assert says in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert live.counts() == OutboxCounts(pending=2, dead=1, dropped=0), "nothing changed"


def test_retry_all_and_a_missing_outbox(config: Path, tmp_path: Path) -> None:
    done = cli(config, "list")
    assert done.returncode == 0 and "nothing is dead-lettered" in done.stdout
    box = Outbox(tmp_path / "state" / "outbox.sqlite3", DEVICE, max_rows=100, max_bytes=10**6)
    box.put([reading(i) for i in range(6)])
    box.dead_letter([1, 2, 3, 5], "HTTP 400 x")
    box.close()
    done = cli(config, "retry", "--all")
    assert done.returncode == 0 and "4 readings queued again" in done.stdout and "seq 1-3, 5" in done.stdout
    with Outbox(tmp_path / "state" / "outbox.sqlite3", DEVICE, max_rows=100, max_bytes=10**6) as again:
        assert again.counts() == OutboxCounts(pending=6, dead=0, dropped=0)
        assert [r.seq for r in again.claim(10)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("synced", [False, True], ids=["untrusted-clock-days-behind", "synced-clock"])
def test_a_retried_reading_arrives_with_the_time_and_quality_it_had_before(
        config: Path, tmp_path: Path, sim_api: SimApi, tokens: FakeTokens, api_settings: UploadSettings,
        synced: bool) -> None:
    """Dead-lettering keeps the clock stamp and retry restores it: a reading sampled while the box
    was 3 days behind arrives `corrected` with the true time; one sampled synced arrives `synced`."""
    c = Clocks(0.0 if synced else DAYS3, synced=synced)
    trust = c.trust()
    trust.observe_date(c.date_header())              # a server's Date: the offset is known
    true_times, stamps = [], []
    for _ in range(3):
        stamps.append(trust.stamp())
        true_times.append(c.true)
        c.advance(10.0)
    with Outbox(tmp_path / "state" / "outbox.sqlite3", DEVICE, max_rows=1000, max_bytes=10**6,
                clock=trust) as box:
        box.put([{**reading(i), "time": iso_epoch(st.wall)} for i, st in enumerate(stamps)], stamps)
        before = {r.seq: dict(r.reading) for r in box.claim(10)}   # as the first attempt sent them
        sim_api.poison(seqs={2})
        sink = HttpSink(api_settings, DEVICE)
        up = Uploader(box, sink, tokens, AgentState(), api_settings, clock=lambda: 0.0)
        try:
            up.step()
            assert box.counts() == OutboxCounts(pending=0, dead=1, dropped=0)
            sim_api.poisoned_seqs.clear()
            with serving(box):
                retried = cli(config, "retry", "2")
            assert retried.returncode == 0 and "1 readings queued again" in retried.stdout, retried
            while box.counts().pending:
                up.step()
        finally:
            sink.close()
    got = {r["seq"]: r for r in sim_api.readings(DEVICE)}
    assert sorted(got) == [1, 2, 3]
    quality = "synced" if synced else "corrected"
    for seq in (1, 2, 3):
        assert got[seq]["time_quality"] == quality, got[seq]
        assert abs(seconds(got[seq]) - true_times[seq - 1]) < 2.0, "true time, not the box's clock"
    for key in ("id", "seq", "time", "time_quality", "value", "sensor"):
        assert got[2][key] == before[2][key], f"{key}: as it would have been sent before"


def test_dead_letters_of_an_outbox_from_before_stamps_are_migrated_and_retried(config: Path,
                                                                              tmp_path: Path) -> None:
    """An old file (no stamp columns in either table), first touched by `dead-letter retry`, then
    by the service: the old dead row comes back unstamped, a newly dead-lettered one keeps its stamp."""
    path = tmp_path / "state" / "outbox.sqlite3"
    path.parent.mkdir(parents=True)
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE outbox (seq INTEGER PRIMARY KEY, payload BLOB NOT NULL);
        CREATE TABLE dead (id INTEGER PRIMARY KEY, device TEXT NOT NULL, seq INTEGER NOT NULL,
                           payload BLOB NOT NULL, reason TEXT NOT NULL, at TEXT NOT NULL);
        CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;""")
    old.execute("INSERT INTO meta VALUES ('device_id', ?)", (DEVICE,))
    old.execute("INSERT INTO meta VALUES (?, 1)", (f"seq_hw:{DEVICE}",))
    old.execute("INSERT INTO dead VALUES (1, ?, 1, ?, 'HTTP 422 old', '2026-11-20T08:00:00.000Z')",
                (DEVICE, json.dumps(reading(0)).encode()))
    old.commit()
    old.close()
    done = cli(config, "retry", "--all")
    assert done.returncode == 0 and "1 readings queued again" in done.stdout, done
    stamp = Stamp(wall=1_796_000_000.0, mono=500.0, boot="boot-b", synced=True)
    with Outbox(path, DEVICE, max_rows=100, max_bytes=10**6) as box:
        assert box.put([reading(1)], [stamp]) == [2]
        box.dead_letter([2], "HTTP 422 new")
    assert cli(config, "retry", "2").returncode == 0
    with Outbox(path, DEVICE, max_rows=100, max_bytes=10**6) as box:
        rows = box.claim(10)
    assert [(r.seq, r.stamp) for r in rows] == [(1, None), (2, stamp)]


def test_the_race_of_a_command_and_a_starting_service_ends_in_a_wait_not_a_failure(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No service ran when the command looked, so it opened the file; a service starting now
    waits for it (busy timeout), and the other way round the command says to run it again."""
    import io
    import time

    from agent.telemetry import dead_letters

    path = tmp_path / "state" / "outbox.sqlite3"
    with Outbox(path, DEVICE, max_rows=100, max_bytes=10**6) as box:
        box.put([reading(i) for i in range(3)])
        box.dead_letter([2], "HTTP 422 x")
    cli_side = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    cli_side.execute("BEGIN IMMEDIATE")                 # the command, mid-retry
    cli_side.execute("DELETE FROM dead")

    def command_done() -> None:
        cli_side.execute("ROLLBACK")
        cli_side.close()

    threading.Timer(0.5, command_done).start()
    t0 = time.monotonic()
    with Outbox(path, DEVICE, max_rows=100, max_bytes=10**6) as service:
        assert time.monotonic() - t0 >= 0.4, "waited for the command"
        assert service.counts() == OutboxCounts(pending=2, dead=1, dropped=0)
        monkeypatch.setattr(dead_letters, "BUSY_TIMEOUT_S", 0.2)
        with pytest.raises(dead_letters.DeadLetterError, match="in use .* run the command again"):
            dead_letters.run(path, DEVICE, "list", out=io.StringIO())


def test_two_commands_at_once_each_get_their_own_answer_and_each_runs_once(
        config: Path, live: Outbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """`dead-letter list` and `dead-letter retry` started together: one request file each, both
    answered (neither "did not answer" after 20 s), the retry run once (two signals, two threads)."""
    import time

    from agent.telemetry import dead_letters

    live.put([reading(i) for i in range(6)])
    live.dead_letter([2, 3, 5], "HTTP 422 test")
    served: list[str] = []
    real = dead_letters.serve

    def slow_serve(*args: object, **kwargs: object) -> dict[str, object]:
        served.append(str(args[2]))
        time.sleep(0.5)                   # both requests are pending while the first is served
        return real(*args, **kwargs)      # type: ignore[arg-type]

    monkeypatch.setattr(dead_letters, "serve", slow_serve)
    root = Path(__file__).resolve().parents[2]
    procs = [subprocess.Popen([sys.executable, "-m", "agent", "dead-letter", *args, "--config", str(config)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root)
             for args in (["list"], ["retry", "3"], ["list"])]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    for listed in (outs[0][0], outs[2][0]):       # before or after the retry: either is right
        assert listed.splitlines()[-1].startswith(("3 dead-lettered", "2 dead-lettered")), listed
    assert "1 readings queued again" in outs[1][0], outs[1]
    assert sorted(served) == ["list", "list", "retry"], "each request served exactly once"
    assert live.counts().dead == 2
    state_dir = live.path.parent
    assert not [p.name for p in state_dir.iterdir() if p.suffix in (".request", ".done")], "cleaned up"


def test_dead_letter_works_on_a_read_only_state_dir_through_the_runtime_dir(
        config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SD card went read-only while the service runs: the command's request and answer go to
    the runtime dir (``$RUNTIME_DIRECTORY``, tmpfs), not the state dir. The read-only state dir
    is a bind mount in the command's private mount namespace (`unshare -r -m`)."""
    import os
    import shutil

    from tests.fixtures.require import missing

    if shutil.which("unshare") is None:
        missing("needs unshare (util-linux) for a private read-only mount")
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(run))
    box = Outbox(tmp_path / "state" / "outbox.sqlite3", DEVICE, max_rows=10**6, max_bytes=10**9)
    state = box.path.parent
    try:
        box.put([reading(i) for i in range(4)])
        box.dead_letter([2], "HTTP 422 test")
        with serving(box):
            script = ('mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && '
                      '{ touch "$0/probe" 2>/dev/null && echo "STATE DIR WRITABLE" >&2; exec "$@"; }')
            done = subprocess.run(["unshare", "-r", "-m", "sh", "-c", script, str(state), sys.executable,
                                   "-m", "agent", "dead-letter", "retry", "2", "--config", str(config)],
                                  capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2],
                                  env={**os.environ, "RUNTIME_DIRECTORY": str(run)})
        assert done.returncode == 0, done.stderr
        assert "1 readings queued again" in done.stdout, done.stdout
        assert box.counts().dead == 0
        assert list(run.iterdir()) == [], "request and answer removed"
    finally:
        box.close()
