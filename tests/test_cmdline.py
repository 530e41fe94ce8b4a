"""Command-line mistakes: one line on stderr, exit 78 (docs/INTERFACE.md exit codes), --help 0.

Through the real process: argparse's own exit code (2) and tracebacks are what a user would see.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.sim.jwks import SimKeys

ROOT = Path(__file__).resolve().parents[1]


def agent(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               DEVICE_AGENT_CONFIG=str(cwd / "missing.toml"))
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True,
                          timeout=60, env=env, cwd=cwd)


@pytest.mark.parametrize("args", [
    [], ["frobnicate"], ["run", "--bogus"], ["dead-letter"], ["dead-letter", "purge", "5"],
    ["demo", "--duration", "soon"], ["watch"], ["status", "--json", "extra"],
    ["sim", "idp", "--port", "99999"], ["sim", "idp", "--port", "-1"], ["sim", "idp", "--port", "http"],
    ["sim", "api", "--port", "99999"], ["sim", "api", "--port", "-1", "--jwks-file", "j.json"],
    ["sim", "api"], ["sim", "idp", "--nonsense"],
])
def test_a_command_line_mistake_is_one_line_and_exit_78(tmp_path: Path, args: list[str]) -> None:
    done = agent(tmp_path, *args)
    assert done.returncode == 78, done
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: command line: "), done.stderr
    assert list(tmp_path.iterdir()) == [], "nothing written to the current directory"


@pytest.mark.parametrize("args", [["--help"], ["dead-letter", "retry", "--help"], ["sim", "idp", "--help"],
                                  ["sim", "api", "--help"], ["--version"]])
def test_help_still_exits_0(tmp_path: Path, args: list[str]) -> None:
    done = agent(tmp_path, *args)
    assert done.returncode == 0, done
    assert done.stdout and not done.stderr


def test_sim_api_without_tls_dir_writes_nothing_into_the_current_directory(tmp_path: Path) -> None:
    """Its CA goes to a temp dir, like `sim idp`'s; it used to leave ./sim-tls/ behind."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    (tmp_path / "jwks.json").write_text(json.dumps(SimKeys().jwks()))
    work = tmp_path / "cwd"
    work.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "agent", "sim", "api", "--port", "0",
                             "--jwks-file", str(tmp_path / "jwks.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=work)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert "simulated telemetry API" in first, proc.stderr.read() if proc.poll() is not None else first
        trust = proc.stdout.readline()
        assert str(tmp_path / "tmp") in trust, trust
        assert list(work.iterdir()) == []
        proc.terminate()
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
