"""`watch --serve`: the admin's page in Debian's Chromium (Playwright), fed by a real Mosquitto.

Never `playwright install`: /usr/bin/chromium through tests/interop/browser.py. Under CI=true a
missing browser fails the test instead of skipping it.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent.mqtt.watch import run_watch
from tests.agent.test_watch_fleet import code, seed_fleet, status
from tests.fixtures.broker import Broker, free_port
from tests.fixtures.require import missing
from tests.interop.browser import CHROMIUM, Browser
from tests.waiting import wait_until

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "screens" / "watch-web.png"


class Served:
    """``run_watch(serve=...)`` in a thread, stopped at teardown."""

    def __init__(self, broker: Broker, listen: str, password_file: str = "") -> None:
        self.out, self.err = io.StringIO(), io.StringIO()
        self.rc: list[int] = []
        self.listen = listen
        self._stop = threading.Event()
        self.thread = threading.Thread(target=lambda: self.rc.append(run_watch(
            url=broker.url, prefix="test", ca_file="", username="", password_file="", as_json=False,
            serve=listen, serve_password_file=password_file, timeout_s=120, out=self.out, err=self.err,
            stop_event=self._stop)), daemon=True)
        SERVED.append(self)
        self.thread.start()
        wait_until(lambda: "serving the fleet on" in self.err.getvalue() or self.rc, 10, what="server up")
        assert not self.rc, self.err.getvalue()
        self.url = self.err.getvalue().split("serving the fleet on ", 1)[1].split()[0]


    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        assert self.rc == [0], self.err.getvalue()


SERVED: list[Served] = []


@pytest.fixture(autouse=True)
def _stop_servers() -> Iterator[None]:
    yield
    while SERVED:
        SERVED.pop().close()


@pytest.fixture
def browser() -> Iterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        missing(f"{CHROMIUM} not found; apt-get install chromium (never `playwright install`)")
    if importlib.util.find_spec("playwright") is None:
        missing("playwright (Python) not installed; pip install -e '.[test]'")
    b = Browser(()).start()
    yield b
    b.close()


def publish(broker: Broker, items: list[tuple[str, dict[str, Any] | None]]) -> float:
    """Retained publishes; returns the monotonic time the last one was acknowledged."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        for topic, payload in items:
            client.publish(topic, b"" if payload is None else json.dumps(payload), qos=1,
                           retain=True).wait_for_publish(5)
        return time.monotonic()
    finally:
        client.disconnect()
        client.loop_stop()


def trouble(broker: Broker) -> None:
    """A few devices that need a person for other reasons than a code."""
    publish(broker, [
        ("test/dev00003/status", status(3, state="error", account=None,
                                        error="the API refuses fresh tokens (401): check its audience and issuer")),
        ("test/dev00004/status", status(4, storage="full", oldest_pending_s=420)),
        ("test/dev00005/status", status(5, oldest_pending_s=5 * 3600 + 120,
                                        outbox={"pending": 18_000, "dead": 2, "dropped": 0})),
        ("test/dev00006/status", {"state": "offline"}),
    ])


def test_page_shows_1000_devices_and_a_new_code_within_1s(mosquitto: Broker, browser: Browser) -> None:
    from playwright.sync_api import expect

    seed_fleet(mosquitto, 1_000, codes_every=10)
    trouble(mosquitto)
    served = Served(mosquitto, f"127.0.0.1:{free_port()}")
    console: list[str] = []
    with browser.page() as page:
        page.on("console", lambda msg: console.append(msg.text))
        response = page.goto(served.url)
        assert response is not None and "script-src 'self'" in response.headers["content-security-policy"]
        expect(page.locator("#summary")).to_contain_text("1000 devices")   # no eval: the CSP forbids it
        expect(page.locator("#summary")).to_contain_text("needs attention 103")
        summary = page.text_content("#summary") or ""
        assert "signing in 100" in summary and "error 1" in summary and "offline 1" in summary
        rows = page.locator("#rows tr")
        expect(page.locator("#range")).to_have_text("1–100 of 1000")
        expect(rows).to_have_count(100)                 # one page, not 1,000 DOM rows
        # "needs attention" first: the codes (time left), then the error, storage, backlog
        first = rows.nth(0)
        assert "F4XQ9ZRTL" in (first.text_content() or "")
        assert first.locator("img").get_attribute("src", timeout=1000).startswith("data:image/svg+xml")

        # a new code (1 minute left: the most urgent) appears within 1 s of the broker having it
        published = publish(mosquitto, [("test/dev00777/status", status(777, state="signing_in")),
                                        ("test/dev00777/auth/code", code("dev00777", 60, "NEW0CODE1"))])
        page.wait_for_selector("#rows tr:first-child .user-code:text('NEW0CODE1')", timeout=3000)
        took = time.monotonic() - published
        assert took < 1.0, f"new code took {took:.2f} s to reach the page"
        top = rows.nth(0).text_content() or ""
        assert "dev00777" in top and re.search(r"(1:00|0:5\d) left", top), top

        # the code is cleared (signed in): gone from the page
        publish(mosquitto, [("test/dev00777/auth/code", None),
                            ("test/dev00777/status", status(777, account="ada@contoso.example"))])
        expect(page.locator("#rows")).not_to_contain_text("NEW0CODE1", timeout=3000)

        # the filter box
        page.fill("#filter", "dev00999")
        expect(rows).to_have_count(1)
        assert "user999@contoso.example" in (rows.nth(0).text_content() or "")
        page.fill("#filter", "refuses fresh")
        expect(page.locator("#rows tr[data-device='dev00003']")).to_have_count(1)
        expect(rows).to_have_count(1)
        page.fill("#filter", "")
        expect(rows).to_have_count(100)
        page.click("#next")
        expect(page.locator("#range")).to_have_text("101–200 of 1000")
    assert browser.blocked == []                        # no third-party assets: works offline
    assert not [m for m in console if "Content Security Policy" in m], console


@pytest.mark.slow
def test_page_at_10000_devices_is_one_page_of_rows(mosquitto: Broker, browser: Browser) -> None:
    from playwright.sync_api import expect

    seed_fleet(mosquitto, 10_000, codes_every=10)
    served = Served(mosquitto, f"127.0.0.1:{free_port()}")
    with browser.page() as page:
        t0 = time.monotonic()
        page.goto(served.url)
        expect(page.locator("#summary")).to_contain_text("10000 devices", timeout=10_000)
        expect(page.locator("#range")).to_have_text("1–100 of 10000")
        expect(page.locator("#rows tr")).to_have_count(100)
        assert page.locator("#rows tr.has-code").count() == 100           # codes first
        page.fill("#filter", "dev09999")
        expect(page.locator("#rows tr")).to_have_count(1)
        assert time.monotonic() - t0 < 10


def test_screenshot_for_the_readme(mosquitto: Broker, browser: Browser) -> None:
    from playwright.sync_api import expect

    seed_fleet(mosquitto, 1_000, codes_every=250)
    trouble(mosquitto)
    served = Served(mosquitto, f"127.0.0.1:{free_port()}")
    with browser.page() as page:
        page.set_viewport_size({"width": 1280, "height": 760})
        page.goto(served.url)
        expect(page.locator("#rows tr")).to_have_count(100)
        png = page.screenshot()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("WRITE_SCREENSHOTS"):
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        SCREENSHOT.write_bytes(png)


# ----------------------------------------------------------------------------- access (no browser)

def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_loopback_only_without_a_password(mosquitto: Broker) -> None:
    err = io.StringIO()
    rc = run_watch(url=mosquitto.url, prefix="test", ca_file="", username="", password_file="",
                   as_json=False, serve="0.0.0.0:8080", timeout_s=1, err=err)
    assert rc == 78 and err.getvalue().count("\n") == 1
    assert err.getvalue().startswith("config error: --serve 0.0.0.0:8080: sign-in codes would be open")


def test_dns_rebinding_is_refused_on_loopback(mosquitto: Broker) -> None:
    served = Served(mosquitto, f"127.0.0.1:{free_port()}")
    assert get(served.url + "api/fleet")[0] == 200
    assert get(served.url + "api/fleet", {"Host": "evil.example:80"})[0] == 421


def test_password_file_means_basic_auth(mosquitto: Broker, tmp_path: Path) -> None:
    publish(mosquitto, [("test/dev-a/auth/code", code("dev-a"))])
    pw = tmp_path / "pw"
    pw.write_text("correct horse\n")
    served = Served(mosquitto, f"0.0.0.0:{free_port()}", password_file=str(pw))
    url = served.url.replace("0.0.0.0", "127.0.0.1") + "api/fleet"
    status_, body = get(url)
    assert status_ == 401 and b"F4XQ9ZRTL" not in body
    bad = base64.b64encode(b"admin:wrong").decode()
    assert get(url, {"Authorization": f"Basic {bad}"})[0] == 401
    good = base64.b64encode(b"admin:correct horse").decode()
    wait_until(lambda: b"F4XQ9ZRTL" in get(url, {"Authorization": f"Basic {good}"})[1], what="code served")


def test_serve_address_and_password_file_mistakes_are_one_line_exit_78(mosquitto: Broker, tmp_path: Path) -> None:
    from agent.mqtt.web import parse_listen
    from agent.net.hosts import is_loopback_host as is_loopback

    assert parse_listen("[::1]:8080") == ("::1", 8080) and is_loopback("::1") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.1")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for serve, pw, expect in (("8080", "", "config error: --serve: '8080' must look like 127.0.0.1:8080\n"),
                              ("127.0.0.1:99999", "", "config error: --serve: '127.0.0.1:99999' must look"),
                              ("0.0.0.0:8080", str(tmp_path / "missing"),
                               "config error: --serve-password-file "),
                              ("0.0.0.0:8080", str(empty), "config error: --serve-password-file ")):
        err = io.StringIO()
        rc = run_watch(url=mosquitto.url, prefix="test", ca_file="", username="", password_file="",
                       as_json=False, serve=serve, serve_password_file=pw, timeout_s=1, err=err)
        assert rc == 78 and err.getvalue().startswith(expect) and err.getvalue().count("\n") == 1, err.getvalue()
