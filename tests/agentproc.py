"""Run `device-agent run` as a real subprocess, the way systemd would, for end-to-end tests."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(type(v))


ROOT = Path(__file__).resolve().parents[1]


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    """Write a config dict as TOML (tables, and arrays of tables for ``sensors``)."""
    lines: list[str] = []
    for section, body in cfg.items():
        if isinstance(body, list):
            for item in body:
                lines.append(f"[[{section}]]")
                lines += [f"{k} = {toml_value(v)}" for k, v in item.items()]
                lines.append("")
        else:
            lines.append(f"[{section}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in body.items()]
            lines.append("")
    path.write_text("\n".join(lines))
    return path


class AgentProcess:
    """`python -m agent run --config PATH` with its stderr collected line by line."""

    def __init__(self, config_path: Path, *, env: dict[str, str] | None = None,
                 wrap: Callable[[list[str]], list[str]] | None = None) -> None:
        """``wrap``: turns the agent's argv into the command to run (e.g. inside ``unshare``);
        it must ``exec`` the agent so that ``pid`` and signals are the agent's."""
        self.config_path = config_path
        full_env = dict(os.environ)
        full_env.pop("JOURNAL_STREAM", None)
        full_env.update(env or {})
        # This checkout's agent, run from the test's temp dir: whatever it writes to a relative
        # path lands there, never in the checkout.
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full_env.get("PYTHONPATH")]))
        argv = [sys.executable, "-m", "agent", "run", "--config", str(config_path)]
        self.proc = subprocess.Popen(
            wrap(argv) if wrap else argv,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=full_env, cwd=config_path.parent)
        self.lines: list[str] = []
        self._q: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._q.put(line)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, predicate: Callable[[str], bool], timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        for line in list(self.lines):
            if predicate(line):
                return line
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None and self._q.empty():
                    break
                continue
            if predicate(line):
                return line.rstrip("\n")
        raise AssertionError(f"no matching line within {timeout_s} s; output:\n{self.output[-4000:]}")

    def terminate(self, timeout_s: float = 5.0) -> tuple[int, float]:
        """SIGTERM; returns (exit code, seconds until exit)."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=timeout_s)
        elapsed = time.monotonic() - t0
        self._reader.join(timeout=2)
        return rc, elapsed

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
        self._reader.join(timeout=2)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()


SERVICE_CACHE_DIR = "/var/cache/device-agent"     # the unit's CacheDirectory=device-agent
# The unit's PYTHONPYCACHEPREFIX: root's, beside the venv, compiled by the README's install step
# (an older unit kept it in SERVICE_CACHE_DIR; both are relocated for a checkout).
BYTECODE_DIR = "/opt/device-agent/bytecode"
# The README's install step compiles the bytecode the unit's PYTHONOPTIMIZE asks for, with this
# exclusion (test suites and GUI tools the service never imports); tests/test_systemd.py checks
# that the README says the same.
BYTECODE_EXCLUDE = "/(tests?|idlelib|tkinter|turtledemo|lib2to3|ensurepip)/"


def _relocate(env: dict[str, str], prefix: str, to: Path) -> dict[str, str]:
    """``env`` with every value under ``prefix`` moved under ``to``."""
    return {k: str(to) + v.removeprefix(prefix) if v == prefix or v.startswith(prefix + "/") else v
            for k, v in env.items()}


def unit_environment(root: Path = ROOT, cache_dir: Path | None = None, *, bytecode_dir: Path | None = None,
                     compile_bytecode: bool = True) -> dict[str, str]:
    """The ``Environment=`` assignments of ``root``'s systemd unit: what the service runs with
    (the allocator settings, -OO and its bytecode prefix among them), for tests and benches that
    run the agent as systemd would. Quoting is not supported: the unit uses none.

    Paths in the unit's cache directory point into ``cache_dir`` instead, and the bytecode prefix
    (``/opt/device-agent/bytecode``) into ``bytecode_dir`` (defaults: one per user in the temp
    dir, kept between runs); with ``compile_bytecode`` the bytecode there is brought up to date
    first, as the install step does on a box (`install_bytecode`), so that an agent started with
    this environment does not compile its modules at start. Unlike on a box, the test's prefix
    is writable by the agent: a module the install step missed is cached there, where a test
    sees it (on a box it would be compiled in memory at every start).
    """
    unit = root / "systemd" / "device-agent.service"
    env: dict[str, str] = {}
    for line in unit.read_text().splitlines() if unit.exists() else []:
        if line.startswith("Environment="):
            for item in line.removeprefix("Environment=").split():
                key, _, value = item.partition("=")
                env[key] = value
    tmp = Path(tempfile.gettempdir())
    unit_prefix = env.get("PYTHONPYCACHEPREFIX")
    env = _relocate(env, SERVICE_CACHE_DIR, cache_dir or tmp / f"device-agent-cache-{os.getuid()}")
    env = _relocate(env, BYTECODE_DIR, bytecode_dir or tmp / f"device-agent-bytecode-{os.getuid()}")
    if compile_bytecode and unit_prefix is not None and env["PYTHONPYCACHEPREFIX"] != unit_prefix:
        install_bytecode(root, Path(env["PYTHONPYCACHEPREFIX"]), int(env.get("PYTHONOPTIMIZE", "0")))
    return env


_compiled: set[tuple[Path, Path, int]] = set()


def install_bytecode(root: Path, prefix: Path, optimize: int) -> None:
    """What the README's install step does, for a checkout: ``compileall -o OPTIMIZE`` of the
    agent, the interpreter's libraries and its standard library into the ``prefix`` tree
    (PYTHONPYCACHEPREFIX). ~40 s the first time on the dev machine, then a few seconds of
    checking that it is up to date; once per process."""
    import sysconfig

    if (root, prefix, optimize) in _compiled:
        return
    dirs = [str(root / "agent"), str(root / "hw"), sysconfig.get_path("purelib"), sysconfig.get_path("stdlib")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPYCACHEPREFIX"] = str(prefix)
    res = subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", "-o", str(optimize),
                          "-x", BYTECODE_EXCLUDE, *dirs], env=env, capture_output=True, text=True)
    # A library may carry a file that is not valid Python 3.11 (a template, a test fixture):
    # compileall reports it, goes on and exits 1; the service could not import it either.
    if res.returncode not in (0, 1):
        raise RuntimeError(f"compileall failed: {res.stderr[-2000:]}")
    _compiled.add((root, prefix, optimize))


def service_environment(root: Path = ROOT, cache_dir: Path | None = None, *, bytecode_dir: Path | None = None
                        ) -> dict[str, str]:
    """The environment systemd gives the service, for a checkout: this process's without its
    ``PYTHON*`` variables (systemd passes none but the unit's own), ``root`` on PYTHONPATH, and
    the unit's ``Environment=`` (`unit_environment`, with ``cache_dir`` and ``bytecode_dir``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "JOURNAL_STREAM"}
    env["PYTHONPATH"] = str(root)
    env.update(unit_environment(root, cache_dir, bytecode_dir=bytecode_dir))
    return env
