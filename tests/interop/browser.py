"""A person with a browser: Debian's Chromium driven by Playwright, signing in on device pages.

Why a real browser: the device flow ends with a person on a web page (cookies, redirects,
forms, CSRF). Plain HTTP calls would let a provider's page quirks slip through unnoticed.

TLS: the browser does verify certificates (``ignore_https_errors`` stays False). It is told to
accept exactly one extra certificate, the session's test server certificate, by its public-key
hash (``--ignore-certificate-errors-spki-list``, honoured because Playwright always passes
``--user-data-dir``). Any other untrusted certificate still fails the navigation; a test checks
that. Every request to a host that is not loopback is aborted (oidc-provider's pages
``@import`` a web font); the blocked URLs are kept in ``Browser.blocked``.

Never ``playwright install``: Debian's /usr/bin/chromium is used through ``executable_path``.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization

log = logging.getLogger(__name__)

CHROMIUM = "/usr/bin/chromium"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
STEP_TIMEOUT_MS = 15_000
MAX_STEPS = 8
CHROMIUM_ARGS = (
    "--no-sandbox",  # root in CI containers; the pages are our own loopback peers
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


class SignInFailed(AssertionError):
    """The sign-in page did not reach the expected outcome; carries what the person saw."""


def spki_sha256(cert_file: Path) -> str:
    """Base64 SHA-256 of a certificate's SubjectPublicKeyInfo: Chromium's pin format."""
    cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    der = cert.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def is_loopback(url: str) -> bool:
    """True for URLs whose host is a loopback address (the only peers a test may talk to)."""
    parts = urlsplit(url)
    if parts.scheme in ("data", "blob", "about"):
        return True
    host = (parts.hostname or "").lower()
    return host in LOOPBACK_HOSTS or host.startswith("127.")


class Browser:
    """One headless Chromium; each sign-in runs in a fresh context, as a new person would.

    Playwright's sync API is bound to the thread that started it: call every method from the
    test thread and run the token poller (msal, the Authenticator) in another thread.
    """

    def __init__(self, trusted_cert_files: tuple[Path, ...], *, executable: str = CHROMIUM,
                 timeout_ms: int = STEP_TIMEOUT_MS) -> None:
        self._pins = [spki_sha256(p) for p in trusted_cert_files]
        self._executable = executable
        self._timeout_ms = timeout_ms
        self._pw: Any = None
        self._browser: Any = None
        self._owner: threading.Thread | None = None
        self.blocked: list[str] = []
        self.version = ""

    def start(self) -> Browser:
        """Launch Chromium. Raises playwright's Error if it cannot start."""
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        args = list(CHROMIUM_ARGS)
        if self._pins:
            args.append("--ignore-certificate-errors-spki-list=" + ",".join(self._pins))
        try:
            self._browser = self._pw.chromium.launch(executable_path=self._executable, headless=True,
                                                     args=args)
        except Exception:
            self._pw.stop()
            raise
        self.version = self._browser.version
        self._owner = threading.current_thread()
        log.info("chromium %s started", self.version)
        return self

    def close(self) -> None:
        if self._browser is not None:
            self._browser.close()
            self._browser = None
        if self._pw is not None:
            self._pw.stop()
            self._pw = None

    @contextmanager
    def page(self) -> Iterator[Any]:
        """A page in a fresh context with off-loopback requests blocked."""
        if self._browser is None:
            raise RuntimeError("Browser.start() first")
        context = self._browser.new_context(ignore_https_errors=False, service_workers="block",
                                            locale="en-US")
        context.set_default_timeout(self._timeout_ms)
        context.route("**/*", self._route)
        try:
            yield context.new_page()
        finally:
            context.close()

    def _route(self, route: Any) -> None:
        url = route.request.url
        if is_loopback(url):
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort("blockedbyclient")

    # -- oidc-provider's device pages -------------------------------------------------------

    def sign_in_oidc(self, verification_uri_complete: str | None = None, *,
                     verification_uri: str | None = None, user_code: str | None = None,
                     login: str = "ada", password: str = "correct horse",  # noqa: S107 - test persona
                     abort: bool = False) -> str:
        """Sign in on oidc-provider's device pages as a person; returns the final page's heading.

        With ``verification_uri_complete`` (the QR code's link) the code is pre-filled and the
        person only compares it with the one on the device (``user_code``, when given). With
        ``verification_uri`` the person types ``user_code``. ``abort=True`` presses "[ Abort ]"
        on the confirmation page instead of continuing.

        Raises:
            SignInFailed: an error page, a code mismatch, or no success page within MAX_STEPS.
        """
        if verification_uri_complete is None and (verification_uri is None or user_code is None):
            raise ValueError("give verification_uri_complete, or verification_uri and user_code")
        with self.page() as page:
            page.goto(verification_uri_complete or verification_uri)
            for _ in range(MAX_STEPS):
                page.wait_for_load_state("domcontentloaded")
                title = page.title()
                heading = _text(page, "h1")
                if page.locator("input[name=user_code]").count() and title == "Sign-in":
                    if user_code is None:
                        raise SignInFailed(f"asked for a code but none given: {_text(page, 'body')!r}")
                    page.fill("input[name=user_code]", user_code)
                    _click_and_wait(page, "button[form='op.deviceInputForm']")
                elif title == "Device Login Confirmation":
                    shown = _text(page, "code")
                    if user_code is not None and _norm(shown) != _norm(user_code):
                        raise SignInFailed(f"page shows code {shown!r}, the device shows {user_code!r}")
                    if abort:
                        _click_and_wait(page, "button[name=abort]")
                        return _text(page, "p.red") or _text(page, "h1")
                    _click_and_wait(page, "button[form='op.deviceConfirmForm'][autofocus]")
                elif page.locator("input[name=login]").count():
                    page.fill("input[name=login]", login)
                    page.fill("input[name=password]", password)
                    _click_and_wait(page, "button.login-submit")
                elif page.locator("input[name=prompt][value=consent]").count():
                    _click_and_wait(page, "form:has(input[name=prompt][value=consent]) button[type=submit]")
                elif title == "Sign-in Success":
                    log.info("oidc-provider sign-in done: %s", _text(page, "p"))
                    return heading
                else:
                    raise SignInFailed(f"unexpected page {title!r}: {_text(page, 'body')[:400]!r}")
            raise SignInFailed(f"no success page after {MAX_STEPS} steps; last: {page.title()!r}")

    # -- our simulated Entra ID --------------------------------------------------------------

    def sign_in_entra_sim(self, devicelogin_url: str, user_code: str, *, decline: bool = False,
                          account: str | None = None) -> str:
        """Type the code on the simulated Entra ID's /devicelogin page, then Continue or Decline.

        The page is Entra's two steps: enter code (``#otc``, ``#next``), then "Are you trying to
        sign in?" (``#user``, ``#continue`` / ``#decline``). Returns the ``#result`` text.

        Raises:
            SignInFailed: the page refused the code (its ``#error`` text is in the message).
        """
        with self.page() as page:
            page.goto(devicelogin_url)
            page.fill("#otc", user_code)
            _click_and_wait(page, "#next")
            if page.locator("#error").count():
                raise SignInFailed(f"code {user_code!r} refused: {_text(page, '#error')!r}")
            if account is not None:
                page.fill("#user", account)
            _click_and_wait(page, "#decline" if decline else "#continue")
            if page.locator("#error").count() or not page.locator("#result").count():
                raise SignInFailed(f"no outcome for {user_code!r}: {_text(page, 'body')[:400]!r}")
            return _text(page, "#result")


def _click_and_wait(page: Any, selector: str) -> None:
    """Click a submit button and wait for the resulting navigation to finish."""
    with page.expect_navigation(wait_until="domcontentloaded"):
        page.click(selector)


def _text(page: Any, selector: str) -> str:
    loc = page.locator(selector)
    return loc.first.inner_text().strip() if loc.count() else ""


def _norm(code: str) -> str:
    return re.sub(r"[^0-9A-Za-z]", "", code).upper()
