"""The backends this process has opened and not yet closed (fake GPIO, displays).

Each one registers when it opens and releases when it closes, so a test suite can check after
every test that nothing it opened was left open (tests/fixtures/leaks.py). Costs one dict entry
per open backend; nothing here decides behaviour.
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_open: dict[int, tuple[object, str]] = {}


def register(obj: object, what: str) -> None:
    """``obj`` is open now; ``what`` says which one in a leak report (e.g. "png display x.png")."""
    with _lock:
        _open[id(obj)] = (obj, what)


def release(obj: object) -> None:
    """``obj`` was closed (a second close is fine)."""
    with _lock:
        _open.pop(id(obj), None)


def still_open() -> list[tuple[object, str]]:
    """Everything registered and not released, oldest first."""
    with _lock:
        return list(_open.values())
