"""The start to a code on the panel does only what the code screen needs (docs/PERFORMANCE.md
"Sign-in"): the outbox, MQTT and the rest of telemetry are imported once the code is on the
glass, never before; the garbage collector paused for the start runs again by the first
reading, and the GIL's switch interval shortened for the start is back; what the libraries
import for flows never run waits for its first use (hw.lazymodule); a second start takes its
regular expressions from the cache directory; and the shortcuts taken for speed (the ``run``
command line read without argparse, ``hw.records`` instead of ``@dataclass``) answer exactly as
what they stand in for.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent import cli
from hw.records import record
from tests.agentproc import ROOT, AgentProcess, write_config

# Heavy, and not needed to show a code (a config without [mqtt]): imported after the code only.
NOT_BEFORE_THE_CODE = ("sqlite3", "paho", "agent.telemetry", "agent.mqtt", "agent.health", "argparse",
                       "statistics",
                       # what msal and urllib3 import for flows never run (agent/signin/__init__.py)
                       "http.server", "socketserver", "html", "importlib.metadata", "xml.etree.ElementTree",
                       "pyexpat", "importlib.resources")
# Imported by a library at its top, its code run only on first use (hw.lazymodule).
DEFERRED_AT_THE_CODE = ("msal.oauth2cli.authcode", "urllib3.http2", "certifi.core", "xml.etree.cElementTree",
                        "PIL.ExifTags", "PIL.TiffTags", "segno.writers", "shutil",
                        *(("zipfile",) if sys.version_info < (3, 12) else ()))   # a package from 3.12
# ... and still waiting once signed in, readings sampled, stored and uploaded (docs/PERFORMANCE.md
# "Memory": what a Pi Zero's steady state keeps out).
DEFERRED_IN_THE_STEADY_STATE = DEFERRED_AT_THE_CODE


def _config(path: Path, device: str, state: Path, screen: Path, idp: Any, api: Any, tls: Any, *,
            sample_s: float = 60, upload_s: float | None = None) -> Path:
    """An agent signing in at the simulated IdP, one simulated sensor, the png panel."""
    upload: dict[str, Any] = {"sink": "http", "url": api.url, "ca_file": str(tls.ca_file)}
    if upload_s is not None:
        upload["interval_s"] = upload_s
    return write_config(path, {
        "device": {"id": device, "state_dir": str(state)},
        "auth": {"client_id": "sim-device-agent", "authority": idp.authority, "instance_discovery": False,
                 "scopes": ["api://telemetry/Readings.Write"], "ca_file": str(tls.ca_file)},
        "display": {"driver": "png", "path": str(screen), "sleep_after_s": 0},
        "sensors": [{"name": "temp", "type": "simulated", "interval_s": sample_s}],
        "upload": upload,
    })


def _probe_lines(path: Path, n: int, timeout_s: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            if len(lines) >= n:
                return lines
        time.sleep(0.02)
    raise AssertionError(f"the probe wrote {path.read_text() if path.exists() else 'nothing'}")


@pytest.mark.slow
def test_nothing_heavy_is_imported_before_the_code_and_gc_runs_by_the_first_reading(
        tmp_path: Path, idp: Any, idp_api: Any, tls: Any) -> None:
    state = tmp_path / "state"
    config = _config(tmp_path / "config.toml", "start-02", state, tmp_path / "screen.png", idp, idp_api, tls)
    out = tmp_path / "probe.jsonl"
    probe = str(ROOT / "tests" / "startup_probe.py")
    agent = AgentProcess(config, env={"STARTUP_PROBE_OUT": str(out),
                                      "STARTUP_PROBE_OUTBOX": str(state / "outbox.sqlite3")},
                         wrap=lambda argv: [sys.executable, probe, *argv[argv.index("run"):]])
    try:
        shown, stored = _probe_lines(out, 2, 15)
        assert shown["when"] == "code shown"
        early = sorted(m for m in shown["modules"]
                       if any(m == h or m.startswith(h + ".") for h in NOT_BEFORE_THE_CODE))
        assert early == [], f"imported before the code reached the panel: {early}"
        assert sorted(set(DEFERRED_AT_THE_CODE) - set(shown["deferred"])) == [], "ran before the code"
        assert "agent.signin.authenticator" in shown["modules"]      # the probe saw a real start
        assert stored == {"when": "reading stored", "gc_enabled": True, "switch_interval_restored": True}
        rc, _ = agent.terminate()
        assert rc == 0
    finally:
        agent.close()


@pytest.mark.slow
def test_what_waits_for_its_first_use_still_waits_once_readings_are_uploaded(
        tmp_path: Path, idp: Any, idp_api: Any, tls: Any) -> None:
    state = tmp_path / "state"
    config = _config(tmp_path / "config.toml", "start-04", state, tmp_path / "screen.png", idp, idp_api, tls,
                     sample_s=0.05, upload_s=1)
    idp.auto_approve_after_s = 0.0
    steady = tmp_path / "steady.json"
    probe = str(ROOT / "tests" / "startup_probe.py")
    agent = AgentProcess(config, env={"STARTUP_PROBE_OUT": str(tmp_path / "probe.jsonl"),
                                      "STARTUP_PROBE_STEADY": str(steady)},
                         wrap=lambda argv: [sys.executable, probe, *argv[argv.index("run"):]])
    try:
        deadline = time.monotonic() + 30
        uploads: list[int] = []         # readings the API holds, each time the count grew
        while len(uploads) < 3:
            assert time.monotonic() < deadline, f"uploads seen: {uploads}\n{agent.output[-2000:]}"
            n = len(idp_api.seqs("start-04"))
            if n and (not uploads or n > uploads[-1]):
                uploads.append(n)
            time.sleep(0.05)
        after = time.time()
        while True:
            assert time.monotonic() < deadline, "the probe stopped writing"
            seen = json.loads(steady.read_text())
            if seen["time"] > after:
                break
            time.sleep(0.05)
        ran = sorted(set(DEFERRED_IN_THE_STEADY_STATE) - set(seen["deferred"]))
        assert ran == [], f"ran in the steady state: {ran}"
        rc, _ = agent.terminate()
        assert rc == 0
    finally:
        agent.close()


@pytest.mark.slow
def test_a_second_start_takes_its_regular_expressions_from_the_cache_directory(
        tmp_path: Path, idp: Any, idp_api: Any, tls: Any) -> None:
    """agent/regexcache.py, with $CACHE_DIRECTORY as systemd sets it: the first start compiles
    and keeps them, the next one (a reboot) compiles next to none before its code is shown."""
    cache = tmp_path / "cache"
    probe = str(ROOT / "tests" / "startup_probe.py")
    figures = []
    for n in (1, 2):
        state = tmp_path / f"state{n}"
        config = _config(tmp_path / f"config{n}.toml", "start-03", state, tmp_path / f"screen{n}.png",
                         idp, idp_api, tls)
        out = tmp_path / f"probe{n}.jsonl"
        agent = AgentProcess(config, env={"STARTUP_PROBE_OUT": str(out), "CACHE_DIRECTORY": str(cache),
                                          "STARTUP_PROBE_OUTBOX": str(state / "outbox.sqlite3")},
                             wrap=lambda argv: [sys.executable, probe, *argv[argv.index("run"):]])
        try:
            shown, _ = _probe_lines(out, 2, 15)
            figures.append(shown["regex"])
            rc, _ = agent.terminate()
            assert rc == 0
        finally:
            agent.close()
    first, second = figures
    assert first["loaded"] == 0 and first["compiled"] > 50
    assert second["loaded"] >= first["compiled"] - 5 and second["compiled"] <= 5, figures


@pytest.mark.parametrize("argv", [
    ["run"], ["run", "--config", "/etc/x.toml"], ["run", "--config=/etc/x.toml"], ["run", "--config="],
    ["run", "--config", ""],
])
def test_the_run_shortcut_reads_the_command_line_as_the_parser_does(argv: list[str]) -> None:
    fast = cli._service_args(argv)
    assert fast is not None
    assert vars(fast) == vars(cli.build_parser().parse_args(argv))


@pytest.mark.parametrize("argv", [
    ["run", "--conf", "x"], ["run", "--config"], ["run", "--config", "-x"], ["run", "-h"],
    ["run", "extra"], ["run", "--config", "a", "--config", "b"], ["status"], [], ["--version"],
])
def test_anything_else_goes_to_the_parser(argv: list[str]) -> None:
    assert cli._service_args(argv) is None


def test_a_run_usage_mistake_is_still_the_parsers_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["run", "--config"])
    assert exited.value.code == 78
    err = capsys.readouterr().err
    assert err.startswith("config error: command line: argument --config: expected one argument")


@record
class _Base:
    a: int
    b: str = "x"


@record
class _Rec(_Base):
    c: tuple[int, ...] = ()
    d: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class _Base2:
    a: int
    b: str = "x"


@dataclasses.dataclass(frozen=True)
class _Dc(_Base2):
    c: tuple[int, ...] = ()
    d: dict[str, int] = dataclasses.field(default_factory=dict)


def test_a_record_answers_like_a_frozen_dataclass() -> None:
    r, d = _Rec(1, c=(2,)), _Dc(1, c=(2,))
    assert dataclasses.is_dataclass(r)
    assert [f.name for f in dataclasses.fields(r)] == [f.name for f in dataclasses.fields(d)] == ["a", "b", "c", "d"]
    assert dataclasses.asdict(r) == dataclasses.asdict(d) == {"a": 1, "b": "x", "c": (2,), "d": {}}
    assert repr(r).replace("_Rec", "_Dc") == repr(d)
    assert dataclasses.replace(r, b="y") == _Rec(1, "y", (2,))
    assert r == _Rec(1, c=(2,)) and r != _Rec(2, c=(2,)) and r != d
    assert r.d is not _Rec(1).d                        # default_factory: one per instance
    assert hash(_Base(1)) == hash(_Base(1)) and hash(_Base(1)) != hash(_Base(2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.a = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        del r.a  # type: ignore[misc]
    for bad in ((), (1, "x", (), {}, 5)):
        with pytest.raises(TypeError):
            _Rec(*bad)
    with pytest.raises(TypeError, match="unexpected keyword argument 'e'"):
        _Rec(1, e=2)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="multiple values"):
        _Rec(1, a=2)  # type: ignore[misc]
    with pytest.raises(ValueError, match="mutable default"):
        record(type("Bad", (), {"__annotations__": {"x": "list[int]"}, "x": []}))
    with pytest.raises(TypeError, match="without a default"):
        record(type("Bad", (), {"__annotations__": {"x": "int", "y": "int"}, "x": 1}))

