"""What both sign-in flows (device code, ``authenticator.py``; app certificate, ``certificate.py``)
do alike with the IdP: their timings, the token's life on the monotonic clock, the two kinds of
failure and their names for operators, the shared back-off with its journal lines, and building
the msal application on an ``agent.net.https`` session.

One place for each, so both flows back off, word their failures and judge a token's age the
same way (docs/DESIGN.md, "Faults are states").
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import msal
import requests

from agent.config import AuthSettings
from agent.net.https import HttpsSession
from agent.net.retry import Backoff, OutageLog
from agent.signin.aadsts import Problem, explain
from agent.signin.token_cache import TokenCacheFile
from agent.state import AgentState
from agent.wakeup import Signal
from hw.records import record

# Every pass of a sign-in loop that did not wait for anything lasts at least this long, so a
# state the loop cannot leave costs a log line a second, not a core (monotonic; ends on stop).
MIN_PASS_S = 1.0
RECOVERED = "the sign-in service answers again"

_App = TypeVar("_App", bound=msal.ClientApplication)


@record
class Timing:
    """Back-off and refresh periods. Production defaults; tests shorten them."""

    backoff_initial_s: float = 2.0            # network error, timeout, 5xx, unreadable reply
    backoff_max_s: float = 300.0
    config_backoff_initial_s: float = 60.0    # tenant/app registration problems: don't hammer
    config_backoff_max_s: float = 1800.0
    refresh_every_s: float = 12 * 3600.0      # proactive refresh: keeps the refresh token alive
    refresh_margin_max_s: float = 300.0       # refresh when half the token's life, at most this, is left
    wait_slice_s: float = 0.25                # longest real wait under an injected (test) clock


@record
class Token:
    """An access token with its life on the monotonic clock, from ``expires_in`` when it came."""

    value: str
    expires_at: float    # monotonic: never handed out from then on
    refresh_at: float    # monotonic: refreshed from the IdP from then on

    @classmethod
    def received(cls, value: str, now: float, life_s: float, margin_max_s: float) -> Token:
        """Refreshed once half its life, at most ``margin_max_s``, is left: a 300 s token about
        every 150 s, an hour's token 5 min before its end."""
        life_s = max(0.0, life_s)
        return cls(value, now + life_s, now + life_s - min(life_s / 2, margin_max_s))


class IdpDown(Exception):
    """Transient: network, timeout, 5xx, unreadable reply. Back off and retry."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class IdpRefused(Exception):
    """The tenant or app registration refuses us; retrying soon will not help."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


class IdpTrouble:
    """One kind of IdP failure that may go on: one back-off for every caller (the sign-in
    thread and the uploader's refreshes alike) and its journal lines (``OutageLog``: a line
    when it starts, then at most one every 10 min with a count). Thread-safe."""

    def __init__(self, backoff: Backoff, clock: Callable[[], float], outage: OutageLog) -> None:
        self._backoff, self._clock, self._outage = backoff, clock, outage
        self._lock = threading.Lock()
        self.not_before = 0.0                 # monotonic: no attempt before this

    def ready(self, now: float) -> bool:
        return now >= self.not_before

    def failed(self, message: str, retry_after: float | None = None,
               floor_s: float = 0.0) -> float:
        """Count a failure and back off; returns the wait (at least Retry-After and ``floor_s``)."""
        with self._lock:
            delay = max(self._backoff.next_delay(retry_after), floor_s)
            self.not_before = self._clock() + delay
            self._outage.failed(message, f"retrying in {delay:.1f} s")
            return delay

    def retry_now(self) -> None:
        """Something changed that may end it (a renewed certificate, a sign-out): the next
        attempt may go at once. The outage goes on counting until the IdP answers."""
        with self._lock:
            self._backoff.reset()
            self.not_before = 0.0

    def ended(self) -> None:
        """The IdP answered properly: forget the back-off, say so if an outage was reported."""
        with self._lock:
            self._outage.ended(RECOVERED)
            self._backoff.reset()
            self.not_before = 0.0


class IdpBackoff:
    """Both kinds of IdP trouble a flow meets, for all its callers: ``down`` (network, 5xx,
    unreadable replies: ``Timing.backoff_*``, WARNING) and ``refused`` (the tenant or app
    registration: ``Timing.config_backoff_*``, ERROR, since a person must act). A request may
    go only when neither back-off runs."""

    def __init__(self, timing: Timing, logger: logging.Logger, clock: Callable[[], float],
                 rng: Callable[[], float]) -> None:
        t = timing
        self.down = IdpTrouble(Backoff(t.backoff_initial_s, t.backoff_max_s, rng), clock,
                               OutageLog(logger, level=logging.WARNING, clock=clock))
        self.refused = IdpTrouble(Backoff(t.config_backoff_initial_s, t.config_backoff_max_s, rng),
                                  clock, OutageLog(logger, level=logging.ERROR, clock=clock))

    def ready(self, now: float) -> bool:
        """Whether the back-offs allow a request to the IdP now."""
        return self.down.ready(now) and self.refused.ready(now)

    @property
    def not_before(self) -> float:
        """Monotonic: no request to the IdP before this."""
        return max(self.down.not_before, self.refused.not_before)

    def ended(self) -> None:
        """The IdP issued a token: both outages are over."""
        self.down.ended()
        self.refused.ended()


def error_answer(result: Mapping[str, Any], status: int | None, retry_after_s: float | None,
                 flow: str = "device_code") -> IdpDown | IdpRefused:
    """An msal error result (``{"error": ...}``) as the exception the loops back off on: a 5xx
    (msal hands some over as a result, not an exception) or a transient OAuth error ("temporarily
    unavailable") is ``IdpDown``, the rest ``IdpRefused``."""
    if status is not None and status >= 500:
        return IdpDown(f"The sign-in service failed (HTTP {status})", retry_after_s)
    problem = explain_result(result, flow)
    if problem.kind == "transient":
        return IdpDown(problem.message, retry_after_s)
    return IdpRefused(problem)


class SignInFlow:
    """What a sign-in flow object holds whichever the flow: its settings and clock, the token
    cache file, the lock for msal calls and token fields, the HTTPS session and msal's replay
    cache, the shared IdP back-off, and the events its loop waits on. ``heartbeat`` is the
    monotonic time the sign-in loop last advanced."""

    def __init__(self, settings: AuthSettings, cache_path: Path, state: AgentState, *, device_id: str,
                 timing: Timing | None, clock: Callable[[], float], rng: Callable[[], float],
                 logger: logging.Logger) -> None:
        self._settings = settings
        self._state = state
        self._device_id = device_id
        self._timing = timing or Timing()
        self._clock = clock
        self._cache = TokenCacheFile(cache_path)
        self._cache.load()
        self._lock = threading.RLock()          # msal calls and the token fields
        self._session: HttpsSession | None = None
        self._idp_retry_after: float | None = None   # the last 429/503 reply's Retry-After
        self._http_cache: dict[str, Any] = {}
        self._signed_in = False
        self._stop = threading.Event()
        self._wake = Signal()                   # something for the sign-in thread to look at
        # One back-off per kind of failure for every caller (the sign-in thread and the
        # uploader's refreshes alike), with the journal's one rule for failures that go on.
        self._idp = IdpBackoff(self._timing, logger, clock, rng)
        self._down, self._refused = self._idp.down, self._idp.refused
        self.heartbeat: float = clock()

    @property
    def signed_in(self) -> bool:
        return self._signed_in

    def _may_ask_idp(self, now: float) -> bool:
        """Whether the shared back-offs allow a request to the IdP now."""
        return self._idp.ready(now)

    def _idp_down(self, err: BaseException) -> IdpDown:
        return idp_down(err, self._session, self._settings.timeout_s, self._idp_retry_after)

    def _clear_http_cache(self) -> None:
        """Forget msal's replay cache before a retry: it would answer a 5xx (or a 400) again
        from memory for up to 60 s, while our own back-off (never shorter than Retry-After)
        already decides when to ask."""
        with self._lock:
            self._http_cache.clear()


def explain_result(result: Mapping[str, Any], flow: str = "device_code") -> Problem:
    """An msal error result (``{"error": ...}``) in words for people (``aadsts.explain``)."""
    codes = result.get("error_codes")
    return explain(str(result.get("error") or ""), str(result.get("error_description") or ""),
                   codes if isinstance(codes, list) else None, flow=flow)


def idp_down(err: BaseException, session: HttpsSession | None, timeout_s: float,
             retry_after_s: float | None) -> IdpDown:
    """Name a transport failure for operators (never with response bodies: no secrets)."""
    status = session.last_status if session else None
    if isinstance(err, requests.exceptions.SSLError):
        msg = "TLS check of the sign-in service failed: check auth.ca_file"
    elif isinstance(err, requests.exceptions.Timeout):
        msg = f"The sign-in service did not answer within {timeout_s:g} s"
    elif isinstance(err, requests.exceptions.ConnectionError):
        msg = "Cannot reach the sign-in service (check the network)"
    elif status is not None and status >= 500:
        msg = f"The sign-in service failed (HTTP {status})"
    elif isinstance(err, ValueError):
        msg = "The sign-in service sent an unreadable reply"
    else:
        msg = f"Sign-in error ({type(err).__name__})"
    return IdpDown(msg, retry_after_s)


def build_app(cls: type[_App], settings: AuthSettings, session: HttpsSession,
              down: Callable[[BaseException], IdpDown], **kwargs: Any) -> _App:
    """The msal application ``cls`` for ``settings``' authority on ``session``.

    msal reads the authority's discovery document here: a 4xx there is the configuration's
    fault (``IdpRefused`` naming the key), anything else the IdP's (``down(err)``).
    """
    if settings.oidc_authority:
        kwargs.update(oidc_authority=settings.oidc_authority)
    else:
        kwargs.update(authority=settings.authority, instance_discovery=settings.instance_discovery)
    try:
        app: _App = cls(settings.client_id, http_client=session, **kwargs)
    except ValueError as err:
        status = session.last_status
        if status is not None and 400 <= status < 500:
            key = "oidc_authority" if settings.oidc_authority else "authority"
            raise IdpRefused(Problem("config", f"The sign-in authority was not found (HTTP {status}): "
                                               f"check auth.{key}")) from err
        raise down(err) from err
    except Exception as err:
        raise down(err) from err
    return app


def number(value: Any, default: float) -> float:
    """A finite float from a reply's field (``expires_in``, ``interval``), else ``default``."""
    try:
        n = float(value)
    except (TypeError, ValueError):
        return default
    return n if math.isfinite(n) else default

