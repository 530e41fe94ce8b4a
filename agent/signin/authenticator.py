"""MSAL device-code sign-in (RFC 8628) and silent refresh, for a box nobody sits in front of.

One thread (:meth:`Authenticator.run`) owns the sign-in: silent first (a cached account and its
refresh token), else a device code that is published through ``AgentState`` and the journal
and polled until someone uses it. While signed in it refreshes proactively so the refresh token
never idles out (Entra: 90 days), and falls back to the code flow by itself when the grant dies.
The uploader thread calls :meth:`access_token` / :meth:`token_rejected` concurrently.

Timers are ``time.monotonic()``: MSAL's own poll loop ends on the wall clock, which jumps at
NTP sync on a box without an RTC, so it gets a monotonic ``exit_condition`` (FIELD-NOTES).
Every HTTP call has a timeout and verifies against ``ca_file`` plus the system store, whatever
``REQUESTS_CA_BUNDLE`` says. Tokens are never logged, only user codes and account names.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import msal
import requests

from agent.config import AuthSettings
from agent.net.https import HttpsSession
from agent.net.retry import Backoff, retry_after_s
from agent.signin.aadsts import Problem, explain
from agent.signin.token_cache import TokenCacheFile
from agent.state import AgentState, DeviceCode

log = logging.getLogger(__name__)
# The journal announcer: the code and URL reach the journal whatever log.level says (logs.setup).
announce = logging.getLogger(__name__ + ".code")

RENEWALS_EXHAUSTED = ("No sign-in code: press the button, send renew_code over MQTT, "
                      "or restart the agent")
_REAUTH_ERRORS = frozenset({"invalid_grant", "interaction_required", "login_required"})
# Every pass of the sign-in loop that did not wait for anything lasts at least this long, so a
# state the loop cannot leave costs a log line a second, not a core (monotonic; ends on stop).
MIN_PASS_S = 1.0
CACHE_UNREADABLE = "The saved sign-in could not be read: sign in with a new code"

_T = TypeVar("_T")


@dataclass(frozen=True)
class Timing:
    """Back-off and refresh periods. Production defaults; tests shorten them."""

    backoff_initial_s: float = 2.0            # network error, timeout, 5xx, unreadable reply
    backoff_max_s: float = 300.0
    config_backoff_initial_s: float = 60.0    # tenant/app registration problems: don't hammer
    config_backoff_max_s: float = 1800.0
    refresh_every_s: float = 12 * 3600.0      # proactive refresh: keeps the refresh token alive
    min_token_life_s: float = 300.0           # access_token() refreshes when less is left
    wait_slice_s: float = 0.25                # how often waits look at request_new_code/sign_out
    rejected_retry_max_s: float = 30.0        # refused token, refresh failed: retry cap (from backoff_initial_s)


@dataclass
class _Token:
    value: str
    expires_at: float  # monotonic


class _IdpDown(Exception):
    """Transient: network, timeout, 5xx, unreadable reply. Back off and retry."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class _CacheDamaged(Exception):
    """msal failed while reading the token cache, before asking the IdP anything: the file
    parses, but its content is not what msal expects. Retrying cannot help; a new sign-in does."""


class _ConfigProblem(Exception):
    """The tenant or app registration refuses us; retrying soon will not help."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


class Authenticator:
    """Device-code sign-in, silent refresh and the uploader's token source.

    Thread model: :meth:`run` is the sign-in thread; :meth:`access_token`,
    :meth:`token_rejected`, :meth:`request_new_code` and :meth:`sign_out` may be called from
    any thread. ``heartbeat`` is the monotonic time the sign-in loop last advanced.
    """

    def __init__(self, settings: AuthSettings, cache_path: Path, state: AgentState, *, device_id: str,
                 timing: Timing | None = None, clock: Callable[[], float] = time.monotonic,
                 rng: Callable[[], float] = random.random) -> None:
        self._settings = settings
        self._state = state
        self._device_id = device_id
        self._timing = timing or Timing()
        self._clock = clock
        self._cache = TokenCacheFile(cache_path)
        self._cache.load()
        self._lock = threading.RLock()          # silent MSAL calls and the token fields
        self._app: msal.PublicClientApplication | None = None
        self._session: HttpsSession | None = None
        self._idp_retry_after: float | None = None   # the last 429/503 reply's Retry-After
        self._http_cache: dict[str, Any] = {}
        self._account: dict[str, Any] | None = None
        self._token: _Token | None = None
        self._forced_token: str | None = None  # token obtained because the API refused one
        self._rejected: str | None = None      # refused by the API, and no replacement yet
        self._rejected_retry = Backoff(self._timing.backoff_initial_s, self._timing.rejected_retry_max_s, rng)
        self._rejected_next = 0.0              # monotonic; next refresh try for a refused token
        self._pass_waited = False              # the current run() pass blocked in _wait
        self._signed_in = False
        self._last_refresh: float | None = None   # monotonic; last token from the IdP itself
        self._renewals_used = 0
        self._exhausted = False
        self._stop = threading.Event()
        self._wake = threading.Event()          # something for the sign-in thread to look at
        self._new_code = threading.Event()      # request_new_code()
        self._transient = Backoff(self._timing.backoff_initial_s, self._timing.backoff_max_s, rng)
        self._config = Backoff(self._timing.config_backoff_initial_s, self._timing.config_backoff_max_s, rng)
        self.heartbeat: float = clock()

    # ---- public API -------------------------------------------------------------------------

    @property
    def signed_in(self) -> bool:
        return self._signed_in

    def run(self, stop: threading.Event) -> None:
        """The sign-in thread: silent, else device flow; refresh while signed in; return on stop."""
        self._stop = stop
        log.info("sign-in starting (%s, client %s)", self._settings.authority_url, self._settings.client_id)
        while not stop.is_set():
            self._beat()
            self._wake.clear()
            started = self._clock()
            self._pass_waited = False
            try:
                self._step()
                self._transient.reset()
                self._config.reset()
            except _IdpDown as err:
                self._on_idp_down(err)
            except _ConfigProblem as err:
                self._on_config_problem(err.problem)
            except _CacheDamaged as err:
                self._set_cache_aside(str(err))
            except Exception as err:   # never let the sign-in thread die
                log.exception("unexpected sign-in error (%s); retrying", type(err).__name__)
                self._on_idp_down(_IdpDown(f"Sign-in error ({type(err).__name__})"))
            if not self._pass_waited:
                self._pace(started)
        log.info("sign-in stopped")

    def access_token(self) -> str | None:
        """A valid access token, refreshed silently when near expiry; None if not signed in, or
        while a token the API refused (token_rejected) is waiting for its backed-off refresh."""
        with self._lock:
            if not self._signed_in:
                return None
            tok = self._token
            if tok is not None and self._rejected is not None and tok.value == self._rejected:
                return self._replace_rejected()
            now = self._clock()
            if tok is not None and tok.expires_at - now > self._timing.min_token_life_s:
                return tok.value
            if self._app is None or self._account is None:
                if tok is not None and tok.expires_at > now:
                    return tok.value
                self._begin_reauth(Problem("reauth", "The sign-in cannot be refreshed: sign in with a "
                                                     "new code"))
                return None
            try:
                self._refresh(force=False)
            except _IdpDown as err:
                log.warning("token refresh failed: %s", err)
                tok = self._token
                return tok.value if tok is not None and tok.expires_at > self._clock() else None
            except _ConfigProblem as err:
                log.warning("token refresh refused: %s", err.problem.message)
                self._state.failed(err.problem.message)
                return None
            return self._token.value if self._signed_in and self._token else None

    def token_rejected(self) -> str | None:
        """The API answered 401: force one refresh. None means: back to the code flow (or, on a
        transient IdP failure, no token right now; the caller retries later)."""
        with self._lock:
            if not self._signed_in:
                return None
            rejected = self._token.value if self._token else None
            if rejected is not None and rejected == self._rejected:
                return self._replace_rejected()    # known already; its retry is backed off
            if rejected is not None and rejected == self._forced_token:
                self._begin_reauth(Problem("reauth", "The API refused a freshly refreshed token (401): "
                                                     "sign in with a new code"))
                return None
            if self._app is None or self._account is None:
                self._begin_reauth(Problem("reauth", "The API refused the token (401): sign in with a "
                                                     "new code"))
                return None
            log.info("the API refused the access token (401); refreshing it")
            try:
                self._refresh(force=True)
            except _IdpDown as err:
                # Never hand the refused token out again: access_token() retries instead.
                self._rejected = rejected
                self._rejected_retry.reset()
                delay = self._rejected_retry.next_delay(err.retry_after_s or 0.0)
                self._rejected_next = self._clock() + delay
                log.warning("token refresh after a 401 failed: %s; trying again in %.1f s", err, delay)
                return None
            except _ConfigProblem as err:
                self._state.failed(err.problem.message)
                return None
            if not self._signed_in or self._token is None:
                return None
            self._forced_token = self._token.value
            return self._token.value

    def _replace_rejected(self) -> str | None:
        """The current token was refused and its forced refresh failed: retry that refresh,
        backed off, and hand out nothing until a new token exists. Caller holds _lock."""
        now = self._clock()
        if now < self._rejected_next:
            return None
        self._clear_http_cache()    # else msal may replay the last 5xx without asking
        try:
            self._refresh(force=True)
        except (_IdpDown, _ConfigProblem) as err:
            retry_after = err.retry_after_s if isinstance(err, _IdpDown) else None
            delay = self._rejected_retry.next_delay(retry_after or 0.0)
            self._rejected_next = self._clock() + delay
            message = err.problem.message if isinstance(err, _ConfigProblem) else str(err)
            log.warning("refreshing the refused access token failed: %s; trying again in %.1f s",
                        message, delay)
            if isinstance(err, _ConfigProblem):
                self._state.failed(message)
            return None
        tok = self._token
        if not self._signed_in or tok is None or tok.value == self._rejected:
            return None
        log.info("the refused access token was replaced")
        self._rejected = None
        self._forced_token = tok.value
        return tok.value

    def request_new_code(self) -> bool:
        """Button / MQTT ``renew_code``: cancel the shown code (or the wait) and get a new one.

        Returns False when signed in (there is no code to renew).
        """
        if self._signed_in:
            return False
        log.info("a new sign-in code was requested")
        self._new_code.set()
        self._wake.set()
        return True

    def sign_out(self) -> None:
        """Forget the account and tokens (memory and file); the code flow starts again."""
        with self._lock:
            try:
                self._cache.clear()
            except OSError as err:
                log.error("cannot clear the token cache %s: %s", self._cache.path, err.strerror or err)
            self._account = None
            self._token = None
            self._forced_token = None
            self._rejected = None
            self._signed_in = False
            self._renewals_used = 0
            self._exhausted = False
        if self._state.snapshot.code is None:
            # A code already on show stays valid: signing out again must not hide it.
            self._state.signed_out()
        log.info("signed out; a new sign-in code follows")
        self._wake.set()

    # ---- the sign-in loop -------------------------------------------------------------------

    def _beat(self) -> None:
        self.heartbeat = self._clock()

    def _step(self) -> None:
        """One unit of work; raises _IdpDown / _ConfigProblem for the loop to back off."""
        app = self._ensure_app()
        if self._signed_in:
            self._stay_signed_in()
            return
        if self._account is None:
            self._account = self._pick_account(app)
        if self._account is not None:
            self._sign_in_silently()
            return
        if self._exhausted and not self._new_code.is_set():
            self._wait(math.inf, self._new_code)
            return
        self._device_flow(app)

    def _ensure_app(self) -> msal.PublicClientApplication:
        if self._app is not None:
            return self._app
        s = self._settings
        if self._session is None:
            self._session = HttpsSession(s.ca_file, s.timeout_s, on_response=[self._on_idp_response],
                                         on_failure=[self._on_idp_failure])
        kwargs: dict[str, Any] = {"client_id": s.client_id, "token_cache": self._cache.cache,
                                  "http_client": self._session, "http_cache": self._http_cache}
        if s.oidc_authority:
            # Generic providers may not know "profile", which MSAL adds to every request.
            kwargs.update(oidc_authority=s.oidc_authority, exclude_scopes=["profile"])
        else:
            kwargs.update(authority=s.authority, instance_discovery=s.instance_discovery)
        try:
            self._app = msal.PublicClientApplication(**kwargs)
        except ValueError as err:
            status = self._session.last_status
            if status is not None and 400 <= status < 500:
                raise _ConfigProblem(Problem(
                    "config", f"The sign-in authority was not found (HTTP {status}): check "
                              f"auth.{'oidc_authority' if s.oidc_authority else 'authority'}")) from err
            raise self._idp_down(err) from err
        except Exception as err:
            raise self._idp_down(err) from err
        self._set_link(True)
        return self._app

    def _pick_account(self, app: msal.PublicClientApplication) -> dict[str, Any] | None:
        with self._lock:
            try:
                accounts = self._read_cache("get_accounts", app.get_accounts)
            except _CacheDamaged as err:
                self._set_cache_aside(str(err))
                return None
        if len(accounts) > 1:
            log.warning("the token cache holds %d accounts; using %s", len(accounts),
                        accounts[0].get("username"))
        return accounts[0] if accounts else None

    def _sign_in_silently(self) -> None:
        with self._lock:
            log.info("signing in silently as %s", (self._account or {}).get("username"))
            self._refresh(force=False)

    def _stay_signed_in(self) -> None:
        """Wait until the proactive refresh is due (or something changes), then refresh."""
        # A sign-in served from the cache alone has not exercised the refresh token: due now.
        if self._last_refresh is not None:
            due = self._last_refresh + self._timing.refresh_every_s
            if self._clock() < due:
                self._wait(due - self._clock())
                return
        if self._account is None:
            # No account could be cached (the IdP sent no id_token): ride the token to its end.
            tok = self._token
            left = (tok.expires_at - self._clock() - self._timing.min_token_life_s) if tok else 0.0
            if left > 0:
                self._wait(left)
            else:
                self._begin_reauth(Problem("reauth", "The sign-in cannot be refreshed: sign in with "
                                                     "a new code"))
            return
        with self._lock:
            if not self._signed_in:
                return
            log.info("refreshing the sign-in (proactive, every %.0f h)", self._timing.refresh_every_s / 3600)
            self._refresh(force=True)

    def _refresh(self, *, force: bool) -> None:
        """acquire_token_silent for the current account; updates state. Caller holds _lock.

        Raises:
            _IdpDown, _ConfigProblem: the caller decides how to wait.
        """
        app, account = self._app, self._account
        if app is None or account is None:
            return
        try:
            result = self._read_cache("acquire_token_silent", lambda: app.acquire_token_silent_with_error(
                list(self._settings.scopes), account, force_refresh=force))
        except _CacheDamaged as err:
            self._set_cache_aside(str(err))
            return
        if result and "access_token" in result:
            self._accept(result, account)
            return
        if result and "error" not in result:
            raise _IdpDown("The sign-in service sent an incomplete token reply")
        if not result:
            self._begin_reauth(Problem("reauth", "The saved sign-in has no usable refresh token: sign "
                                                 "in with a new code"))
            return
        problem = self._explain(result)
        if problem.kind == "transient":
            raise _IdpDown(problem.message, self._idp_retry_after)
        if problem.kind == "reauth" or result.get("error") in _REAUTH_ERRORS:
            self._begin_reauth(problem)
            return
        raise _ConfigProblem(problem)

    def _accept(self, result: Mapping[str, Any], account: Mapping[str, Any] | None) -> None:
        """A token response (silent or device flow) succeeded. Caller holds _lock."""
        now = self._clock()
        expires_in = _number(result.get("expires_in"), 3600.0)
        self._token = _Token(str(result["access_token"]), now + expires_in)
        if self._token.value != self._rejected:
            self._rejected = None
        if result.get("token_source") != "cache":
            self._last_refresh = now
        self._renewals_used = 0
        self._exhausted = False
        username = _display_name(account, result.get("id_token_claims") or {})
        if not self._signed_in:
            self._signed_in = True
            log.info("signed in as %s", username or "(unknown account)")
        else:
            log.debug("access token refreshed (valid %.0f s)", expires_in)
        self._state.signed_in(username)
        self._set_link(True)

    def _begin_reauth(self, problem: Problem) -> None:
        """The saved sign-in is dead: forget the account and go back to the code flow."""
        log.warning("%s; starting the device code flow", problem.message)
        with self._lock:
            app, account = self._app, self._account
            if app is not None and account is not None:
                try:
                    with self._cache.using():
                        app.remove_account(account)
                except Exception as err:
                    log.warning("cannot remove the account from the token cache: %s", type(err).__name__)
                if self._still_listed(account):
                    # The next pass would pick it again, find it dead again, and so on.
                    self._cache.quarantine("msal cannot remove the account it holds")
            self._account = None
            self._token = None
            self._forced_token = None
            self._rejected = None
            self._signed_in = False
        self._state.failed(problem.message)
        self._state.update(phase="signing_in", account=None, notice=problem.message)
        self._wake.set()

    def _still_listed(self, account: Mapping[str, Any]) -> bool:
        """Whether the cache still holds ``account`` (searched locally: get_accounts() may ask
        the network for authority aliases when it finds none)."""
        key = (account.get("home_account_id"), account.get("environment"))
        try:
            return any((a.get("home_account_id"), a.get("environment")) == key for a in self._cache.accounts())
        except Exception:
            return True

    def _read_cache(self, what: str, call: Callable[[], _T]) -> _T:
        """Run an msal call that reads the token cache and sort its failures by who is at fault.

        Raises:
            _IdpDown: a transport problem (requests exception; an HTTP error status, which msal
                raises as MsalServiceError, also when it replays one from its http_cache) or a
                reply msal could not read (it failed after sending a request).
            _CacheDamaged: anything else msal raised before asking the IdP: the cache choked it.
        """
        session = self._session
        sent = session.sent if session else 0
        try:
            with self._cache.using():
                return call()
        except Exception as err:
            if isinstance(err, (requests.RequestException, msal.exceptions.MsalServiceError)) or (
                    session is not None and session.sent != sent):
                raise self._idp_down(err) from err
            raise _CacheDamaged(f"msal cannot read it: {type(err).__name__} in {what}") from err

    def _set_cache_aside(self, why: str) -> None:
        """The token cache is damaged: move it aside (secrets scrubbed) and start a new code."""
        with self._lock:
            self._cache.quarantine(why)         # logs the WARNING, with the file it became
            self._account = None
            self._token = None
            self._forced_token = None
            self._rejected = None
            self._signed_in = False
        self._state.failed(CACHE_UNREADABLE)
        self._state.update(phase="signing_in", account=None, notice=CACHE_UNREADABLE)
        self._wake.set()

    # ---- the device code flow ---------------------------------------------------------------

    def _device_flow(self, app: msal.PublicClientApplication) -> None:
        """One code's life: issue, publish, poll until used, declined, expired or cancelled."""
        self._new_code.clear()
        scopes = list(self._settings.scopes)
        started = self._clock()
        try:
            flow = app.initiate_device_flow(scopes=scopes)
        except Exception as err:
            raise self._idp_down(err) from err
        if "user_code" not in flow or "device_code" not in flow:
            if "error" not in flow:
                raise _IdpDown("The sign-in service sent an incomplete device code reply")
            problem = self._explain(flow)
            status = self._session.last_status if self._session else None
            if status is not None and status >= 500:
                # MSAL does not raise on a 5xx here; it hands over the error body.
                raise _IdpDown(f"The sign-in service failed (HTTP {status})",
                               self._idp_retry_after)
            if problem.kind == "transient":
                raise _IdpDown(problem.message, self._idp_retry_after)
            raise _ConfigProblem(problem)
        self._set_link(True)
        expires_in = max(1.0, _number(flow.get("expires_in"), 900.0))
        # RFC 8628 §3.2: interval defaults to 5 s. 0 would make MSAL busy-loop.
        interval = max(1, int(_number(flow.get("interval"), 5.0)))
        flow["interval"] = interval
        deadline = started + expires_in
        uri = str(flow.get("verification_uri") or flow.get("verification_url") or "")
        code = DeviceCode(user_code=str(flow["user_code"]), verification_uri=uri,
                          expires_at_monotonic=deadline,
                          expires_at_wall=datetime.now(UTC) + timedelta(seconds=expires_in),
                          interval_s=float(interval), message=str(flow.get("message") or ""),
                          verification_uri_complete=flow.get("verification_uri_complete") or None)
        # The journal first, then the screen and MQTT (observers of the state).
        # The device id too: whoever approves can tell the code is this box's (not a phisher's).
        announce.info("To sign in, open %s and enter the code %s (expires in %d min); the code "
                      "is for device %s", uri, code.user_code, max(1, round(expires_in / 60)),
                      self._device_id)
        if code.verification_uri_complete:
            log.info("Or open %s (the code is filled in)", code.verification_uri_complete)
        self._state.code_issued(code)
        self._poll(app, flow, deadline)

    def _poll(self, app: msal.PublicClientApplication, flow: dict[str, Any], deadline: float) -> None:
        def exit_condition(_flow: Mapping[str, Any]) -> bool:
            # MSAL calls this about once a second between polls: our clock, our cancel events.
            self._beat()
            return self._cancelled() or self._clock() >= deadline

        poll_backoff = Backoff(self._timing.backoff_initial_s, self._timing.backoff_max_s)
        while True:
            try:
                result = app.acquire_token_by_device_flow(flow, exit_condition=exit_condition)
                self._cache.save_if_changed()
                if "access_token" in result or "error" in result:
                    break
                down = _IdpDown("The sign-in service sent an incomplete token reply")
            except Exception as err:
                self._cache.save_if_changed()
                down = self._idp_down(err)
            if self._cancelled() or self._clock() >= deadline:
                result = {"error": "authorization_pending"}
                break
            # The code stays valid at the IdP: keep showing it and poll again later.
            delay = min(poll_backoff.next_delay(down.retry_after_s or 0.0),
                        max(0.0, deadline - self._clock()))
            log.warning("%s; polling again in %.1f s", down, delay)
            self._clear_http_cache()
            self._wait(delay, self._new_code)
        if "access_token" in result:
            with self._lock:
                self._account = self._pick_account(app)
                if self._account is None:
                    log.warning("the IdP sent neither client_info nor an id_token, so this sign-in "
                                "cannot be refreshed; a new code will be needed when the token expires")
                self._accept(result, self._account)
            return
        error = result.get("error")
        if error in ("authorization_pending", "slow_down"):
            # MSAL returns the last pending reply when exit_condition said stop.
            if self._stop.is_set():
                self._state.code_cleared(notice="stopped")
            elif self._new_code.is_set():
                self._state.code_cleared(notice="new code requested")
            else:
                log.info("sign-in code expired unused")
                self._renew_or_wait("code expired")
            return
        problem = self._explain(result)
        if problem.kind == "expired":
            log.info("sign-in code expired: %s", problem.message)
            self._renew_or_wait("code expired")
        elif problem.kind == "declined":
            log.info("sign-in declined: %s", problem.message)
            self._renew_or_wait("sign-in declined")
        elif problem.kind in ("bad_code", "reauth"):
            log.warning("sign-in code refused: %s", problem.message)
            self._renew_or_wait("code not accepted")
        elif problem.kind == "transient":
            self._state.code_cleared(notice="sign-in service error")
            raise _IdpDown(problem.message, self._idp_retry_after)
        else:
            self._state.code_cleared(notice=None)
            raise _ConfigProblem(problem)

    def _cancelled(self) -> bool:
        return self._stop.is_set() or self._new_code.is_set()

    def _renew_or_wait(self, notice: str) -> None:
        """After an unused code: a new one, unless auth.auto_renew_codes ran out."""
        self._state.code_cleared(notice=notice)
        limit = self._settings.auto_renew_codes
        if self._renewals_used < limit:
            self._renewals_used += 1
            log.info("%s; requesting a new code (automatic renewal %d of %d)", notice,
                     self._renewals_used, limit)
            return
        self._exhausted = True
        log.error("%s and no automatic renewals are left: press the button, send renew_code over "
                  "MQTT, or restart the agent", notice)
        self._state.update(phase="error", code=None, renewals_exhausted=True,
                           error=f"{notice[:1].upper()}{notice[1:]}. {RENEWALS_EXHAUSTED}")

    # ---- errors and waiting -----------------------------------------------------------------

    def _explain(self, result: Mapping[str, Any]) -> Problem:
        codes = result.get("error_codes")
        return explain(str(result.get("error") or ""), str(result.get("error_description") or ""),
                       codes if isinstance(codes, list) else None)

    def _idp_down(self, err: BaseException) -> _IdpDown:
        """Name a transport failure for operators (never with response bodies: no secrets)."""
        status = self._session.last_status if self._session else None
        retry_after = self._idp_retry_after
        if isinstance(err, requests.exceptions.SSLError):
            msg = "TLS check of the sign-in service failed: check auth.ca_file"
        elif isinstance(err, requests.exceptions.Timeout):
            msg = f"The sign-in service did not answer within {self._settings.timeout_s:g} s"
        elif isinstance(err, requests.exceptions.ConnectionError):
            msg = "Cannot reach the sign-in service (check the network)"
        elif status is not None and status >= 500:
            msg = f"The sign-in service failed (HTTP {status})"
        elif isinstance(err, ValueError):
            msg = "The sign-in service sent an unreadable reply"
        else:
            msg = f"Sign-in error ({type(err).__name__})"
        return _IdpDown(msg, retry_after)

    def _on_idp_down(self, err: _IdpDown) -> None:
        delay = self._transient.next_delay(err.retry_after_s or 0.0)
        log.warning("%s; retrying in %.1f s", err, delay)
        if not self._signed_in:
            self._state.failed(f"{err}: retrying")
        self._clear_http_cache()
        self._wait(delay, self._new_code)

    def _on_config_problem(self, problem: Problem) -> None:
        delay = self._config.next_delay()
        log.error("%s; trying again in %.0f min (or on request_new_code)", problem.message, delay / 60)
        self._state.failed(problem.message)
        self._clear_http_cache()
        self._wait(delay, self._new_code)

    def _clear_http_cache(self) -> None:
        """Forget MSAL's replay cache before a retry: it would answer a 5xx (or a 400) again
        from memory for up to 60 s, while our own back-off already decides when to ask."""
        with self._lock:
            self._http_cache.clear()

    def _wait(self, seconds: float, *events: threading.Event) -> None:
        """Sleep up to ``seconds`` (monotonic), waking early on stop, ``_wake`` or ``events``."""
        deadline = self._clock() + seconds
        while not self._stop.is_set() and not self._wake.is_set() and not any(e.is_set() for e in events):
            left = deadline - self._clock()
            if left <= 0:
                return
            self._pass_waited = True
            self._beat()
            self._stop.wait(min(left, self._timing.wait_slice_s))

    def _pace(self, started: float) -> None:
        """Stretch a pass that did not wait to MIN_PASS_S: only stop ends this early, so nothing
        (not even a _wake set on every pass by a bug) can turn the loop into a spin."""
        deadline = started + MIN_PASS_S
        while not self._stop.is_set():
            left = deadline - self._clock()
            if left <= 0:
                return
            self._beat()
            self._stop.wait(min(left, self._timing.wait_slice_s))

    def _set_link(self, up: bool) -> None:
        self._state.set_link("idp", "up" if up else "down")

    def _on_idp_response(self, resp: requests.Response) -> None:
        self._idp_retry_after = retry_after_s(resp) if resp.status_code in (429, 503) else None
        self._set_link(resp.status_code < 500)

    def _on_idp_failure(self, err: requests.RequestException) -> None:
        self._set_link(False)


def _number(value: Any, default: float) -> float:
    try:
        n = float(value)
    except (TypeError, ValueError):
        return default
    return n if math.isfinite(n) else default


def _display_name(account: Mapping[str, Any] | None, claims: Mapping[str, Any]) -> str | None:
    """Something a person recognises: Entra sends preferred_username; a bare OIDC provider may
    send only ``sub`` (msal then fills the account's username with a placeholder sentence)."""
    username = str((account or {}).get("username") or "")
    if username and " " not in username:
        return username
    for claim in ("preferred_username", "email", "name", "sub"):
        value = claims.get(claim)
        if isinstance(value, str) and value:
            return value
    return username or None
