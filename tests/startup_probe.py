"""`device-agent run`, watched from inside, for tests/test_startup_imports.py.

Runs the real command line (``agent.cli.main``) after wrapping two functions: the code screen's
renderer and the png display's ``show`` (and telemetry waits for the code only, not at most
``TELEMETRY_AFTER_S``). The first time a frame holding a code reaches the
display, the modules imported by then (and which of them wait for their first use,
hw.lazymodule, and how many regular expressions came from the cache directory or were compiled,
agent/regexcache.py) are written as JSON to ``$STARTUP_PROBE_OUT``; a second
line follows once the outbox holds a reading, saying whether the cyclic garbage collector runs
and the GIL's switch interval is back to what it was. With ``$STARTUP_PROBE_STEADY`` instead of
that line, the modules still waiting for their first use are written there (replaced) every
0.2 s for as long as the agent runs: what the steady state keeps out (the probe itself then
uses nothing the agent does not).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import threading
from typing import Any

import agent.regexcache
import hw.png
from agent import cli, service
from agent.panel import screens

OUT = os.environ["STARTUP_PROBE_OUT"]
_code_rendered = threading.Event()
_reported = threading.Event()
_render_code = screens.render_code
_show = hw.png.PngDisplay.show
_SWITCH_S = sys.getswitchinterval()     # the service shortens it until the code is drawn
_regex = agent.regexcache.started     # the service hands it back (save_started) after the code


def _write(record: dict[str, Any]) -> None:
    with open(OUT, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def render_code(*args: Any, **kwargs: Any) -> Any:
    _code_rendered.set()
    return _render_code(*args, **kwargs)


def show(self: Any, image: Any) -> None:
    _show(self, image)
    if _code_rendered.is_set() and not _reported.is_set():
        _reported.set()
        from hw.lazymodule import is_deferred

        _write({"when": "code shown", "modules": sorted(sys.modules),
                "deferred": sorted(k for k, m in list(sys.modules.items()) if m is not None and is_deferred(m)),
                "regex": {"loaded": _regex.loaded, "compiled": _regex.compiled} if _regex else None})
        after = _steady if os.environ.get("STARTUP_PROBE_STEADY") else _after_first_reading
        threading.Thread(target=after, daemon=True).start()


def _after_first_reading() -> None:
    """Once telemetry has stored a reading: is the garbage collector on again?"""
    import sqlite3
    import time
    from pathlib import Path

    from tests.outbox_files import on_disk  # the service holds the outbox exclusively

    path = Path(os.environ["STARTUP_PROBE_OUTBOX"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if path.exists():
                with on_disk(path) as db:
                    if db.execute("SELECT count(*) FROM outbox").fetchone()[0]:
                        _write({"when": "reading stored", "gc_enabled": gc.isenabled(),
                                "switch_interval_restored": sys.getswitchinterval() == _SWITCH_S})
                        return
        except (sqlite3.Error, OSError):
            pass
        time.sleep(0.02)
    _write({"when": "no reading within 10 s"})


def _steady() -> None:
    import time

    from hw.lazymodule import is_deferred

    steady = os.environ["STARTUP_PROBE_STEADY"]
    while True:
        tmp = steady + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"time": time.time(), "deferred": sorted(
                k for k, m in list(sys.modules.items()) if m is not None and is_deferred(m))}, f)
        os.replace(tmp, steady)
        time.sleep(0.2)


screens.render_code = render_code
hw.png.PngDisplay.show = show  # type: ignore[method-assign]
# Telemetry waits for the code, or TELEMETRY_AFTER_S (tests/test_startup.py holds that bound):
# here only the code may end the wait, so what was imported before it does not hang on the load.
service.TELEMETRY_AFTER_S = 30.0

if __name__ == "__main__":
    raise SystemExit(cli.main(sys.argv[1:]))
