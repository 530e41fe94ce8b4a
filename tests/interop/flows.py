"""Test-side helpers: run msal's device-flow poller in a thread while the browser signs in.

Kept out of the test modules so the end-to-end tests (a `device-agent run` subprocess, the
Authenticator) reuse the same "person" steps.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import jwt
import msal

from agent.state import AgentState, Snapshot
from tests.interop.peers import CaSession, OidcProvider

if TYPE_CHECKING:
    from agent.signin.authenticator import Authenticator

POLL_LIMIT_S = 60.0


def msal_app(provider: OidcProvider, *, exclude_profile: bool = True,
             cache: msal.SerializableTokenCache | None = None) -> msal.PublicClientApplication:
    """A public client for oidc-provider the way the agent builds one (oidc_authority, CA session)."""
    return msal.PublicClientApplication(
        provider.client_id,
        oidc_authority=provider.issuer,
        http_client=CaSession(provider.ca_file),
        token_cache=cache,
        exclude_scopes=["profile"] if exclude_profile else None,
    )


def sign_in_while_polling(app: msal.PublicClientApplication, flow: dict[str, Any],
                          person: Callable[[], object], *, limit_s: float = POLL_LIMIT_S) -> dict[str, Any]:
    """Poll for the token in a thread while ``person()`` signs in (in this thread).

    The poller's exit condition is a monotonic deadline (msal's default reads the wall clock).
    Raises whatever ``person`` raises, after stopping the poller.
    """
    result: dict[str, Any] = {}
    stop = threading.Event()
    deadline = time.monotonic() + min(limit_s, float(flow.get("expires_in", limit_s)))

    def poll() -> None:
        result.update(app.acquire_token_by_device_flow(
            flow, exit_condition=lambda _f: stop.is_set() or time.monotonic() > deadline))

    poller = threading.Thread(target=poll, name="msal-device-poll", daemon=True)
    poller.start()
    try:
        person()
    except BaseException:
        stop.set()
        raise
    finally:
        poller.join(timeout=limit_s + 10)
    if poller.is_alive():
        raise AssertionError("msal poller did not return")
    return result


def verify_access_token(provider: OidcProvider, token: str) -> dict[str, Any]:
    """Verify an access token as a resource server would: RS256 via the provider's JWKS."""
    jwks = jwt.PyJWKClient(provider.jwks_url, ssl_context=_ssl_context(provider))
    key = jwks.get_signing_key_from_jwt(token)
    claims: dict[str, Any] = jwt.decode(token, key.key, algorithms=["RS256"], audience=provider.resource,
                                        issuer=provider.issuer)
    return claims


def jwt_header(token: str) -> dict[str, Any]:
    head = token.split(".")[0]
    return dict(json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4))))


def refresh_token_of(cache: msal.SerializableTokenCache) -> str:
    """The single refresh token in an msal cache (tests compare them to see rotation)."""
    tokens = [rt["secret"] for rt in json.loads(cache.serialize()).get("RefreshToken", {}).values()]
    if len(tokens) != 1:
        raise AssertionError(f"expected one refresh token in the cache, found {len(tokens)}")
    return str(tokens[0])


def _ssl_context(provider: OidcProvider) -> Any:
    import ssl

    return ssl.create_default_context(cafile=str(provider.ca_file))


class StateLog:
    """Every ``Snapshot`` the agent publishes, so a test can wait for what a person would see."""

    def __init__(self, state: AgentState) -> None:
        self._cond = threading.Condition()
        self.history: list[Snapshot] = []
        state.subscribe(self._on_change)

    def _on_change(self, snap: Snapshot) -> None:
        with self._cond:
            self.history.append(snap)
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[Snapshot], bool], what: str,
                 timeout_s: float = POLL_LIMIT_S) -> Snapshot:
        """The first snapshot (past or future) matching ``predicate``.

        Raises:
            AssertionError: none within ``timeout_s``; the message lists the phases seen.
        """
        deadline = time.monotonic() + timeout_s
        with self._cond:
            seen = 0
            while True:
                for snap in self.history[seen:]:
                    if predicate(snap):
                        return snap
                seen = len(self.history)
                left = deadline - time.monotonic()
                if left <= 0:
                    trail = [(s.phase, s.code.user_code if s.code else None, s.notice, s.error)
                             for s in self.history[-8:]]
                    raise AssertionError(f"timed out waiting for {what}; last states: {trail}")
                self._cond.wait(left)

    def codes(self) -> list[str]:
        """User codes shown so far, in order, without repeats."""
        out: list[str] = []
        for snap in self.history:
            if snap.code is not None and (not out or out[-1] != snap.code.user_code):
                out.append(snap.code.user_code)
        return out

    def mark(self) -> int:
        """A position in the history; ``since(mark)`` gives what happened after it."""
        with self._cond:
            return len(self.history)

    def since(self, mark: int) -> list[Snapshot]:
        with self._cond:
            return list(self.history[mark:])


@contextmanager
def running(auth: Authenticator) -> Iterator[threading.Event]:
    """Run ``auth.run`` in a thread; stop it (and check it stopped) on exit."""
    stop = threading.Event()
    thread = threading.Thread(target=auth.run, args=(stop,), name="sign-in", daemon=True)
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(timeout=10)
        if thread.is_alive():
            raise AssertionError("Authenticator.run did not return within 10 s of stop")
