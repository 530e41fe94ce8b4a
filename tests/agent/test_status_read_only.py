"""`device-agent status` with the service stopped and the state directory read-only (an SD card
the kernel remounted read-only, or a read-only bind mount for a monitoring user): the outbox is a
WAL database whose -shm the clean stop removed and nobody can create, and status still reads it.

The read-only directory is a bind mount in a private mount namespace (`unshare -r -m`, no
privileges needed), so nothing outside the test sees it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.clock import Stamp, iso_epoch
from agent.telemetry import readonly
from agent.telemetry.outbox import Outbox
from tests.agentproc import write_config
from tests.fixtures.api import DEVICE, reading
from tests.fixtures.require import missing

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def stopped_state(tmp_path: Path) -> tuple[Path, Path]:
    """A config and the state a cleanly stopped service leaves: 3 pending (the oldest sampled
    2 minutes ago), 1 dead-lettered, 1 dropped for the bounds; no -wal, no -shm."""
    state = tmp_path / "state"
    config = write_config(tmp_path / "config.toml", {
        "device": {"id": DEVICE, "state_dir": str(state)},
        "auth": {"client_id": "sim", "authority": "https://127.0.0.1:1/simtenant", "instance_discovery": False,
                 "scopes": ["api://telemetry/Readings.Write"]},
        "upload": {"sink": "http", "url": "https://127.0.0.1:1/v1/readings"},
    })
    now = time.time()
    stamps = [Stamp(wall=now - 120 + i, mono=100.0 + i, boot="b", synced=True) for i in range(5)]
    with Outbox(state / "outbox.sqlite3", DEVICE, max_rows=4, max_bytes=10**6) as box:
        box.put([{**reading(i), "time": iso_epoch(st.wall)} for i, st in enumerate(stamps)], stamps)
        box.dead_letter([2], "HTTP 422 test")
    (state / "agent.lock").write_text("4242\n")              # left by the service, unlocked
    assert not (state / "outbox.sqlite3-shm").exists() and not (state / "outbox.sqlite3-wal").exists()
    return config, state


def status_read_only(config: Path, state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("unshare") is None:
        missing("needs unshare (util-linux) for a private read-only mount")
    script = ('mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && '
              '{ touch "$0/probe" 2>/dev/null && echo "STATE DIR WRITABLE" >&2; exec "$@"; }')
    return subprocess.run(["unshare", "-r", "-m", "sh", "-c", script, str(state),
                           sys.executable, "-m", "agent", "status", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_status_reads_a_stopped_services_outbox_on_a_read_only_state_dir(
        stopped_state: tuple[Path, Path]) -> None:
    config, state = stopped_state
    done = status_read_only(config, state, "--json")
    assert "STATE DIR WRITABLE" not in done.stderr, "the mount must really be read-only"
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    doc = json.loads(done.stdout)
    assert doc["running"] is False
    assert doc["storage"] == "read_only"
    assert doc["outbox"] == {"pending": 3, "dead": 1, "dropped": 1}
    assert 115 <= doc["oldest_pending_s"] <= 180, doc["oldest_pending_s"]   # seq 3, sampled at now-118
    text = status_read_only(config, state)
    assert text.returncode == 0, text.stderr
    assert "outbox:      3 pending, 1 dead-lettered, 1 dropped" in text.stdout, text.stdout
    assert "storage:     read_only" in text.stdout, text.stdout
    assert not (state / "probe").exists() and not (state / "outbox.sqlite3-shm").exists()


def test_a_read_only_open_still_sees_uncheckpointed_commits_a_killed_service_left(tmp_path: Path) -> None:
    """A service killed (or a power cut) leaves its commits in the WAL and no -shm (the outbox's
    exclusive lock keeps the index in memory), and its newest readings in the intake log. Where
    -shm can be created, `status` reads with ``mode=ro``, not the immutable fallback that would
    miss what sits in the WAL, and counts what the intake log holds on top."""
    import shutil

    path = tmp_path / "outbox.sqlite3"
    left = tmp_path / "after-the-kill"
    left.mkdir()
    with Outbox(path, DEVICE, max_rows=100, max_bytes=10**6) as live:
        live.put([reading(i) for i in range(3)])
        live.flush_acks()                                          # a batch COMMIT: into the WAL
        live.put([reading(9)])                                     # in the intake log only
        live.ack([1])                                              # held: lost in a kill
        live.put([reading(10)])                                    # ... until this put carries it
        assert (tmp_path / "outbox.sqlite3-wal").stat().st_size > 0
        for name in ("outbox.sqlite3", "outbox.sqlite3-wal", "outbox.sqlite3.intake"):   # as the kill leaves them
            shutil.copyfile(tmp_path / name, left / name)
    assert not (left / "outbox.sqlite3-shm").exists()
    assert readonly.read_counts(left / "outbox.sqlite3").pending == 4
    assert readonly.read_counts(path).pending == 4, "after a clean stop"
    assert readonly.read_oldest_wall(left / "outbox.sqlite3") == readonly.read_oldest_wall(path) is not None
    with Outbox(left / "outbox.sqlite3", DEVICE, max_rows=100, max_bytes=10**6) as restarted:
        assert [r.seq for r in restarted.claim(10)] == [2, 3, 4, 5], "what status counted"


def test_status_without_the_service_says_a_full_state_dir_is_full(tmp_path: Path) -> None:
    """The state dir on a small private tmpfs, filled up: `status` judges it as the outbox would."""
    if shutil.which("unshare") is None:
        missing("needs unshare (util-linux) for a private tmpfs")
    state = tmp_path / "state"
    state.mkdir()
    config = write_config(tmp_path / "config.toml", {
        "device": {"id": DEVICE, "state_dir": str(state)},
        "auth": {"client_id": "sim", "authority": "https://127.0.0.1:1/simtenant", "instance_discovery": False,
                 "scopes": ["api://telemetry/Readings.Write"]},
        "upload": {"sink": "http", "url": "https://127.0.0.1:1/v1/readings"},
    })
    script = ('mount -t tmpfs -o size=256k tmpfs "$0" && { dd if=/dev/zero of="$0/fill" bs=4k 2>/dev/null; '
              'exec "$@"; }')
    done = subprocess.run(["unshare", "-r", "-m", "sh", "-c", script, str(state),
                           sys.executable, "-m", "agent", "status", "--json", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    doc = json.loads(done.stdout)
    assert doc["running"] is False and doc["storage"] == "full", doc


@pytest.mark.slow
@pytest.mark.parametrize("runtime_dir", [False, True])
def test_status_of_a_running_service_on_a_read_only_state_dir_is_fresh(
        stopped_state: tuple[Path, Path], tmp_path: Path, runtime_dir: bool) -> None:
    """The service runs but cannot rewrite state_dir/status.json (an SD card gone read-only):
    `status` must not show the stale file of the last run ("offline", storage "ok") while MQTT
    and the panel say read_only. The service writes the status to its runtime directory
    (systemd's RuntimeDirectory=, ``$RUNTIME_DIRECTORY``) or, without one, under the temp dir;
    `status`, run outside the service's mount namespace, finds the fresh copy."""
    if shutil.which("unshare") is None:
        missing("needs unshare (util-linux) for a private read-only mount")
    from tests.agentproc import AgentProcess

    config, state = stopped_state
    stale = {"state": "offline", "account": None, "error": None,
             "outbox": {"pending": 3, "dead": 1, "dropped": 1}, "storage": "ok",
             "updated_at": "2026-01-01T00:00:00Z", "version": "0"}
    (state / "status.json").write_text(json.dumps(stale))
    os.utime(state / "status.json", (time.time() - 3600, time.time() - 3600))
    (tmp_path / "tmp").mkdir()
    env = {"TMPDIR": str(tmp_path / "tmp")}
    if runtime_dir:
        (tmp_path / "run").mkdir(mode=0o755)
        env["RUNTIME_DIRECTORY"] = str(tmp_path / "run")
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    proc = AgentProcess(config, env=env,
                        wrap=lambda argv: ["unshare", "-r", "-m", "sh", "-c", script, str(state), *argv])

    def status(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "agent", "status", *args, "--config", str(config)],
                              capture_output=True, text=True, timeout=60, cwd=ROOT,
                              env={**os.environ, **env})
    try:
        proc.wait_for_line(lambda line: "storage read-only" in line, timeout_s=20)
        deadline = time.monotonic() + 10
        doc: dict[str, object] = {}
        while time.monotonic() < deadline:
            done = status("--json")
            assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
            doc = json.loads(done.stdout)
            if doc.get("storage") == "read_only":
                break
            time.sleep(0.2)
        assert doc.get("storage") == "read_only", doc
        assert doc["running"] is True and doc["state"] != "offline", doc
        assert doc["updated_at"] != stale["updated_at"] and doc["pid"] == proc.proc.pid, doc
        assert json.loads((state / "status.json").read_text()) == stale, "the state dir stayed read-only"
        text = status()
        assert "storage:     read_only" in text.stdout and "running (pid" in text.stdout, text.stdout
        where = tmp_path / ("run" if runtime_dir else "tmp")
        assert [p.name for p in where.rglob("*.json")], list(where.rglob("*"))
        rc, _ = proc.terminate()
    finally:
        if proc.proc.poll() is None:
            proc.kill()
        proc.close()
    assert rc == 0, proc.output[-3000:]
    assert "Traceback" not in proc.output, proc.output[-3000:]


def test_a_fallback_copy_others_could_write_is_not_believed(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The temp dir is shared: a status planted in a directory others can write never passes
    for the service's, however new it is; one in a private directory does."""
    import tempfile

    from agent.statusfile import fallback_status_paths, newest_status

    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    state = tmp_path / "state"
    state.mkdir()
    (state / "status.json").write_text('{"state": "offline"}')
    os.utime(state / "status.json", (time.time() - 60, time.time() - 60))
    fallback = fallback_status_paths(state)[-1]
    assert fallback.is_relative_to(tmp_path / "tmp")
    fallback.parent.mkdir(mode=0o700)
    fallback.write_text('{"state": "signed_in"}')
    assert newest_status(state) == {"state": "signed_in"}
    fallback.parent.chmod(0o777)
    assert newest_status(state) == {"state": "offline"}
