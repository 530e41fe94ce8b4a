"""Storage trouble is a state, not a loop: the real agent (`python -m agent run`) with its state
directory on a 4 MiB tmpfs in a private mount namespace (`unshare -r -m`, no privileges needed),
filled from outside through /proc/PID/root, against the simulated IdP and API over HTTPS."""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.agentproc import AgentProcess
from tests.fixtures.require import missing
from tests.fixtures.waiting import wait_for
from tests.test_e2e_durability import DEVICE, agent_config


def in_private_tmpfs(mnt: Path, size: str = "4M") -> Callable[[list[str]], list[str]]:
    def wrap(argv: list[str]) -> list[str]:
        return ["unshare", "-r", "-m", "sh", "-c", f'mount -t tmpfs -o size={size} tmpfs "{mnt}" && exec "$@"',
                "sh", *argv]
    return wrap


def fill(path: Path) -> int:
    """Write ``path`` until the filesystem says ENOSPC. Returns the bytes written."""
    written = 0
    block = b"\xff" * 65536
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                written += f.write(block)
            except OSError as err:
                assert err.errno == errno.ENOSPC, err
                break
        for size in (4096, 512):          # the last crumbs
            try:
                while True:
                    written += f.write(block[:size])
            except OSError:
                pass
    return written


def contiguous(api: Any) -> int:
    """The highest seq the API holds if it holds every seq below it, else 0. Readings the agent
    could not store never got a seq, so contiguous means: nothing stored was lost."""
    seqs = api.seqs(DEVICE)
    top = max(seqs, default=0)
    return top if seqs == set(range(1, top + 1)) else 0


def status(root: Path) -> dict[str, Any]:
    return json.loads((root / "status.json").read_text())


def settled(value: Callable[[], int], timeout_s: float, what: str, quiet_s: float = 2.0) -> int:
    """``value()`` once it is non-zero and has not changed for ``quiet_s``."""
    deadline = time.monotonic() + timeout_s
    last, since = value(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = value()
        if now != last:
            last, since = now, time.monotonic()
        elif now and time.monotonic() - since >= quiet_s:
            return now
    raise AssertionError(f"not settled within {timeout_s} s: {what}")


@pytest.mark.slow
def test_disk_full_keeps_delivering_counts_what_it_cannot_store_and_resumes_by_itself(
        tmp_path: Path, idp: Any, idp_api: Any, tls: Any) -> None:
    if shutil.which("unshare") is None:
        missing("needs unshare (util-linux) for a private tmpfs")
    mnt = tmp_path / "state"
    mnt.mkdir()
    idp.auto_approve_after_s = 0.0
    config = agent_config(tmp_path, idp, idp_api, tls)
    proc = AgentProcess(config, wrap=in_private_tmpfs(mnt))
    try:
        root = Path(f"/proc/{proc.proc.pid}/root") / str(mnt).lstrip("/")
        proc.wait_for_line(lambda line: "signed in" in line.lower(), timeout_s=30)
        wait_for(lambda: idp_api.count(DEVICE) >= 200, 20, "first uploads", poll_s=0.1)

        idp_api.fail(503, count=10**6)             # a backlog builds up while the API is down
        time.sleep(1.5)
        filled = fill(root / "filler")
        proc.wait_for_line(lambda line: "storage full" in line, timeout_s=10)
        wait_for(lambda: status(root).get("storage") == "full", 10, "status says storage full", poll_s=0.1)
        idp_api.clear_faults()

        # The backlog stored before the disk filled is delivered and acknowledged on the full disk.
        wait_for(lambda: status(root)["outbox"]["pending"] == 0, 60, "backlog delivered (status: 0 pending)",
                 poll_s=0.1)
        before_full = contiguous(idp_api)
        assert before_full > 200, before_full
        requests, dups = len(idp_api.requests), idp_api.duplicates
        time.sleep(3.0)
        assert contiguous(idp_api) == before_full, "nothing stored while full"
        assert idp_api.duplicates == dups, "no batch sent again and again"
        assert len(idp_api.requests) - requests <= 2, "no resend loop while full"
        full_status = status(root)
        assert full_status["storage"] == "full" and full_status["outbox"]["dropped"] > 0

        (root / "filler").unlink()                 # space returns
        proc.wait_for_line(lambda line: "storage ok again" in line, timeout_s=20)
        wait_for(lambda: status(root).get("storage") == "ok", 10, "status says ok again", poll_s=0.1)
        wait_for(lambda: contiguous(idp_api) > before_full + 100, 20, "storing and delivering again", poll_s=0.1)
        rc, elapsed = proc.terminate()
    finally:
        proc.close()
    assert rc == 0 and elapsed < 2.0
    assert filled > 1_000_000
    assert "Traceback" not in proc.output, proc.output[-3000:]
    warnings = [ln for ln in proc.lines if "storage full" in ln]
    assert len(warnings) <= 3, warnings
    print(f"filled {filled} bytes; dropped while full: {full_status['outbox']['dropped']}; "  # noqa: T201
          f"duplicates at the API: {idp_api.duplicates}")
    assert os.path.exists(mnt) and not any(mnt.iterdir()), "the tmpfs was private to the agent"


@pytest.mark.slow
def test_read_only_state_dir_at_start_delivers_the_backlog_and_stores_again_once_writable(
        tmp_path: Path, idp: Any, idp_api: Any, tls: Any) -> None:
    """An SD card the kernel remounted read-only before the service started (a running
    filesystem cannot be remounted read-only while files are open for writing: EBUSY)."""
    if shutil.which("unshare") is None:
        missing("needs unshare (util-linux) for a private tmpfs")
    idp.auto_approve_after_s = 0.0
    src = tmp_path / "state"
    config = agent_config(tmp_path, idp, idp_api, tls)
    first = AgentProcess(config)                      # signs in and queues a backlog (API down)
    try:
        first.wait_for_line(lambda line: "signed in" in line.lower(), timeout_s=30)
        wait_for(lambda: idp_api.count(DEVICE) >= 100, 20, "first uploads", poll_s=0.1)
        idp_api.fail(503, count=10**6)
        time.sleep(1.5)
        assert first.terminate()[0] == 0
    finally:
        first.close()
    delivered_before = contiguous(idp_api)
    idp_api.clear_faults()

    mnt = tmp_path / "ro"
    mnt.mkdir()
    trigger = tmp_path / "make-writable"

    def wrap(argv: list[str]) -> list[str]:
        script = (f'mount -t tmpfs -o size=8M tmpfs "{mnt}" && cp -a "{src}/." "{mnt}/" && '
                  f'mount -o remount,ro "{mnt}" && '
                  f'(while [ ! -e "{trigger}" ]; do sleep 0.1; done; mount -o remount,rw "{mnt}") & '
                  'exec "$@"')
        return ["unshare", "-r", "-m", "sh", "-c", script, "sh", *argv]

    ro_config = tmp_path / "ro.toml"
    ro_config.write_text(config.read_text().replace(str(src), str(mnt)))
    proc = AgentProcess(ro_config, wrap=wrap)
    try:
        proc.wait_for_line(lambda line: "storage read-only" in line, timeout_s=20)
        backlog = settled(lambda: contiguous(idp_api), 30, "backlog delivered from the read-only outbox",
                          quiet_s=3.0)
        assert backlog > delivered_before + 50, (backlog, delivered_before)
        dups = idp_api.duplicates
        time.sleep(2.0)
        assert idp_api.duplicates == dups and contiguous(idp_api) == backlog, "acks kept in memory: no resend"
        trigger.touch()                              # the filesystem is writable again
        proc.wait_for_line(lambda line: "storage ok again" in line, timeout_s=20)
        wait_for(lambda: contiguous(idp_api) > backlog + 100, 20, "storing and delivering again", poll_s=0.1)
        root = Path(f"/proc/{proc.proc.pid}/root") / str(mnt).lstrip("/")
        wait_for(lambda: status(root).get("storage") == "ok", 10, "status says ok", poll_s=0.1)
        assert status(root)["outbox"]["dropped"] > 0, "readings sampled while read-only are counted"
        rc, _ = proc.terminate()
    finally:
        proc.close()
    assert rc == 0
    assert "Traceback" not in proc.output, proc.output[-3000:]
    cannot = [ln for ln in proc.lines if "cannot write" in ln]
    assert len(cannot) <= 1, cannot


@pytest.mark.slow
def test_outbox_deleted_while_running_is_noticed_within_an_upload_interval_and_seq_continues(
        tmp_path: Path, idp: Any, idp_api: Any, tls: Any) -> None:
    idp.auto_approve_after_s = 0.0
    config = agent_config(tmp_path, idp, idp_api, tls, interval_s=1.0)
    state = tmp_path / "state"
    proc = AgentProcess(config)
    try:
        proc.wait_for_line(lambda line: "signed in" in line.lower(), timeout_s=30)
        wait_for(lambda: idp_api.count(DEVICE) >= 100, 20, "first uploads", poll_s=0.1)
        idp_api.fail(503, count=10**6)           # so the file holds a backlog when it goes
        time.sleep(1.0)
        delivered = contiguous(idp_api)
        (state / "outbox.sqlite3").unlink()
        t0 = time.monotonic()
        line = proc.wait_for_line(lambda ln: "outbox file deleted while running" in ln, timeout_s=5)
        noticed_s = time.monotonic() - t0
        idp_api.clear_faults()
        wait_for(lambda: status(state)["outbox"]["dropped"] > 0, 10, "the loss counted in status", poll_s=0.1)
        wait_for(lambda: max(idp_api.seqs(DEVICE)) > delivered + 200, 30, "new readings delivered")
        rc, _ = proc.terminate()
    finally:
        proc.close()
    assert rc == 0
    assert noticed_s < 1.0 + 0.5, f"noticed after {noticed_s:.1f} s (upload interval 1 s)"
    lost = int(line.split("running: ")[1].split()[0])
    seqs = idp_api.seqs(DEVICE)
    gap = set(range(1, max(seqs) + 1)) - seqs
    assert lost > 0 and len(gap) <= lost, (lost, len(gap))
    assert min(s for s in seqs if s > delivered + lost) > delivered, "seq continued, none reused"
    assert status(state)["outbox"]["dropped"] >= lost
    assert "Traceback" not in proc.output
