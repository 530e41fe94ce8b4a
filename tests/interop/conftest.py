"""Fixtures for the interop tests: a certified OpenID provider and a real browser.

Both are session-scoped: Node and Chromium take about a second each to start, and every test
signs in with its own fresh msal app / browser context, so nothing leaks between tests except
grants at the provider (which tests that revoke clear with ``revoke_all``).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sim.tls import TlsFiles
from tests.fixtures.require import missing, need_binary
from tests.interop.browser import CHROMIUM, Browser
from tests.interop.peers import (
    NODE_MODULES,
    OidcProvider,
    installed_oidc_provider_version,
    start_oidc_provider,
)


def require_node() -> str:
    """Path of node with oidc-provider installed next to provider.mjs; skip/fail otherwise."""
    venv_node = Path(sys.executable).with_name("node")     # .ci/setup puts one there if needed
    node = str(venv_node) if venv_node.exists() else need_binary("node", "run .ci/setup (Node >= 20.19)")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    major, minor = (int(x) for x in version.lstrip("v").split(".")[:2])
    if (major, minor) < (20, 19):
        missing(f"{node} is {version}; oidc-provider 9 needs Node >= 20.19 (run .ci/setup)")
    if installed_oidc_provider_version() is None:
        missing(f"oidc-provider not installed in {NODE_MODULES}; run .ci/setup "
                "(it runs `npm ci` in tests/interop)")
    return node


def require_browser() -> str:
    """Path of Debian's chromium with Playwright importable; skip/fail otherwise."""
    if not os.access(CHROMIUM, os.X_OK):
        missing(f"{CHROMIUM} not found; apt-get install chromium (never `playwright install`)")
    if importlib.util.find_spec("playwright") is None:
        missing("playwright (Python) not installed; pip install -e '.[test]'")
    return CHROMIUM


@pytest.fixture(scope="session")
def oidc_provider(tls: TlsFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    """oidc-provider on a free loopback port, issuer https://127.0.0.1:PORT/oidc."""
    node = require_node()
    provider = start_oidc_provider(tls, tmp_path_factory.mktemp("oidc-provider"), node=node)
    try:
        yield provider
    finally:
        provider.stop()


@pytest.fixture(scope="session")
def browser(tls: TlsFiles) -> Iterator[Browser]:
    """Headless Debian Chromium trusting exactly the test server certificate."""
    executable = require_browser()
    b = Browser((Path(tls.cert_file),), executable=executable).start()
    try:
        yield b
    finally:
        b.close()
