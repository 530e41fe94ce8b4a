"""The requests the agent runs on still has the hook agent.net.https trusts ``ca_file`` through.

``_TrustAdapter`` overrides ``HTTPAdapter.build_connection_pool_key_attributes`` (requests
>= 2.32.2). On an older (or a future) requests without that hook the override is never called:
the configured CA would silently not be trusted. pyproject.toml's floor says the same.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from agent.net.https import _TrustAdapter
from agent.net.tls import shared_context

ROOT = Path(__file__).resolve().parents[2]
FLOOR = (2, 32, 2)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def test_pyproject_requires_the_requests_with_the_hook() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if re.match(r"requests\b", d)]
    floor = re.search(r">=\s*([\d.]+)", spec)
    assert floor and _version(floor.group(1)) >= FLOOR, spec


def test_installed_requests_calls_the_adapter_hook() -> None:
    assert _version(requests.__version__) >= FLOOR
    assert callable(getattr(HTTPAdapter, "build_connection_pool_key_attributes", None))
    calls: list[Any] = []

    class Spy(_TrustAdapter):
        def build_connection_pool_key_attributes(self, request: Any, verify: Any,
                                                 cert: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
            calls.append(verify)
            return super().build_connection_pool_key_attributes(request, verify, cert)

    context = shared_context("")
    adapter = Spy(context)
    prepared = requests.Request("GET", "https://127.0.0.1:9/").prepare()
    # What requests does for every request before it connects (no connection is made here).
    conn = adapter.get_connection_with_tls_context(prepared, verify="/nonexistent/bundle.pem")
    assert calls == ["/nonexistent/bundle.pem"]
    assert conn.conn_kw.get("ssl_context") is context
    adapter.close()
