"""MSAL device-code sign-in (RFC 8628) and silent refresh, for a box nobody sits in front of.

One thread (:meth:`Authenticator.run`) owns the sign-in: silent first (a cached account and its
refresh token), else a device code that is published through ``AgentState`` and the journal
and polled until someone uses it. While signed in it refreshes proactively so the refresh token
never idles out (Entra: 90 days), and falls back to the code flow by itself when the grant dies.
The uploader thread calls :meth:`access_token` / :meth:`token_rejected` concurrently.

Timers are ``time.monotonic()``: MSAL's own poll loop ends on the wall clock, which jumps at
NTP sync on a box without an RTC, so it gets a monotonic ``exit_condition`` (docs/INTEROP.md).
Every HTTP call (``agent.net.https``) has a timeout and verifies against ``ca_file`` plus the system store, whatever
``REQUESTS_CA_BUNDLE`` says. Tokens are never logged, only user codes and account names.

The uploader's token source (``TokenSource``, docs/INTERNALS.md), exactly:

* ``access_token() -> str | None``: a token that is valid now by this process's monotonic
  clock, or None. Never a network call when a token is at hand; it refreshes from the IdP
  (never from msal's cache, which judges expiry by the wall clock) once less than half the
  token's lifetime, at most ``Timing.refresh_margin_max_s``, is left. Refresh failures share
  the sign-in thread's back-off: while the IdP is down no call touches the network before the
  back-off allows, and the still-valid token (or None) is returned.
* ``token_rejected(claims_challenge=None) -> str | None``: the API refused the current token
  (401). Does one refresh from the IdP (not from the cache), with ``claims_challenge`` (the
  ``claims=`` of ``WWW-Authenticate: Bearer error="insufficient_claims"``, base64 or JSON)
  passed to msal when given, and returns the fresh token. The refused token is never handed
  out again. None means no token can be had now: the IdP is down (back off; ``access_token()``
  retries when the back-off allows), or the IdP refused the refresh token or wants a person
  for the claims (a new device code starts by itself). A 401 never makes the agent give up a
  refresh token: only the IdP refusing it does (``invalid_grant``, ``interaction_required``).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import msal
import requests

from agent.config import RESERVED_SCOPES, AuthSettings
from agent.net.https import HttpsSession
from agent.net.retry import REPEAT_WARNING_S, retry_after_s  # noqa: F401 - REPEAT_WARNING_S: public here too
from agent.signin.aadsts import Problem
from agent.signin.flow import (
    MIN_PASS_S,
    IdpDown,
    IdpRefused,
    SignInFlow,
    Timing,
    Token,
    build_app,
    error_answer,
    explain_result,
    number,
)
from agent.state import AgentState, DeviceCode
from agent.wakeup import Signal, wait_any

log = logging.getLogger(__name__)
# The journal announcer: the code and URL reach the journal whatever log.level says (logs.setup).
announce = logging.getLogger(__name__ + ".code")

RENEWALS_EXHAUSTED = ("No sign-in code: press the button, send renew_code over MQTT, "
                      "or restart the agent")
_REAUTH_ERRORS = frozenset({"invalid_grant", "interaction_required", "login_required"})
CACHE_UNREADABLE = "The saved sign-in could not be read: sign in with a new code"
# The first poll waits this long after a code is issued: nobody can have typed the code yet, and
# the code's frame is drawn meanwhile without a token request taking the CPU from it (the
# request and its TLS round trip were ~2 % of the CPU to the code; docs/PERFORMANCE.md "Sign-in").
FIRST_POLL_AFTER_S = 0.25

_T = TypeVar("_T")


class _CacheDamaged(Exception):
    """msal failed while reading the token cache, before asking the IdP anything: the file
    parses, but its content is not what msal expects. Retrying cannot help; a new sign-in does."""


class Authenticator(SignInFlow):
    """Device-code sign-in, silent refresh and the uploader's token source.

    Thread model: :meth:`run` is the sign-in thread; :meth:`access_token`,
    :meth:`token_rejected`, :meth:`request_new_code` and :meth:`sign_out` may be called from
    any thread. ``heartbeat`` is the monotonic time the sign-in loop last advanced.
    """

    def __init__(self, settings: AuthSettings, cache_path: Path, state: AgentState, *, device_id: str,
                 timing: Timing | None = None, clock: Callable[[], float] = time.monotonic,
                 rng: Callable[[], float] = random.random) -> None:
        self._scopes = effective_scopes(settings)
        super().__init__(settings, cache_path, state, device_id=device_id, timing=timing, clock=clock,
                         rng=rng, logger=log)
        self._app: msal.PublicClientApplication | None = None
        self._account: dict[str, Any] | None = None
        self._token: Token | None = None
        self._rejected: str | None = None      # refused by the API: never handed out again
        self._claims: str | None = None        # a claims challenge the next sign-in must meet
        self._pass_waited = False              # the current run() pass blocked in _wait
        self._code_pass = False                # the current run() pass is a code flow
        self._last_refresh: float | None = None   # monotonic; last token from the IdP itself
        self._renewals_used = 0
        self._exhausted = False
        self._new_code = Signal()               # request_new_code(), honoured by code flows only

    # ---- public API -------------------------------------------------------------------------

    @property
    def last_refresh_monotonic(self) -> float | None:
        """Monotonic time of the last token the IdP itself issued (status signin_lapses_in_days)."""
        return self._last_refresh

    def run(self, stop: threading.Event) -> None:
        """The sign-in thread: silent, else device flow; refresh while signed in; return on stop."""
        self._stop = stop
        log.info("sign-in starting (%s, client %s)", self._settings.authority_url, self._settings.client_id)
        while not stop.is_set():
            self._beat()
            self._wake.clear()
            started = self._clock()
            self._pass_waited = False
            self._code_pass = False
            try:
                self._step()
            except IdpDown as err:
                self._on_idp_down(err)
            except IdpRefused as err:
                self._on_config_problem(err.problem)
            except _CacheDamaged as err:
                self._set_cache_aside(str(err))
            except Exception as err:   # never let the sign-in thread die
                log.exception("unexpected sign-in error (%s); retrying", type(err).__name__)
                self._on_idp_down(IdpDown(f"Sign-in error ({type(err).__name__})"))
            if not self._pass_waited:
                self._pace(started)
        log.info("sign-in stopped")

    def access_token(self) -> str | None:
        """A token valid now by the monotonic clock, or None (module docstring: the contract).

        Refreshes from the IdP once half the token's life (at most ``refresh_margin_max_s``) is
        left, as far as the shared IdP back-off allows; a failed refresh hands out the token
        while it is still valid.
        """
        with self._lock:
            if not self._signed_in:
                return None
            now = self._clock()
            tok = self._usable_token(now)
            if tok is not None and now < tok.refresh_at:
                return tok.value
            if self._app is None or self._account is None:
                # The IdP sent no account, so there is nothing to refresh with: ride it out.
                if tok is not None:
                    return tok.value
                self._begin_reauth(Problem("reauth", "The sign-in cannot be refreshed: sign in with a "
                                                     "new code"))
                return None
            if self._may_ask_idp(now):
                self._refresh_from_idp()
            tok = self._usable_token(self._clock())
            return tok.value if tok is not None else None

    def token_rejected(self, claims_challenge: str | None = None) -> str | None:
        """The API answered 401: one refresh from the IdP (module docstring: the contract).

        ``claims_challenge``: the ``claims`` of the 401's ``WWW-Authenticate`` (base64 or JSON),
        passed to msal so the new token carries them. Returns the fresh token, or None when
        none can be had now (IdP down: back off; IdP refused or wants a person: new code).
        """
        claims = claims_json(claims_challenge)
        with self._lock:
            if not self._signed_in:
                return None
            if self._token is not None:
                self._rejected = self._token.value      # never handed out again
            if claims is not None:
                self._claims = claims
            if self._app is None or self._account is None:
                self._begin_reauth(Problem("reauth", "The API refused the token (401) and the sign-in "
                                                     "cannot be refreshed: sign in with a new code"))
                return None
            if not self._may_ask_idp(self._clock()):
                return None
            log.info("the API refused the access token (401%s); refreshing it from the sign-in "
                     "service", ", with a claims challenge" if claims else "")
            self._refresh_from_idp()
            tok = self._usable_token(self._clock())
            return tok.value if tok is not None else None

    def request_new_code(self) -> bool:
        """Button / MQTT ``renew_code``: cancel the shown code (or the wait) and get a new one.

        Returns False when there is no code flow to shorten: signed in, or a saved sign-in
        being restored (then the IdP-down back-off is left alone).
        """
        # No lock: a refresh may hold it for auth.timeout_s, and a button must not wait for that.
        if self._signed_in:
            return False
        if self._account is not None:
            log.info("a new sign-in code was requested, but the saved sign-in is being restored; "
                     "sign out first to sign in anew")
            return False
        log.info("a new sign-in code was requested")
        self._new_code.set()
        self._wake.set()
        return True

    def sign_out(self) -> None:
        """Forget the account and tokens (memory and file); the code flow starts again."""
        with self._lock:
            self._cache.clear_or_log()
            self._forget_sign_in()
            self._claims = None
            self._renewals_used = 0
            self._exhausted = False
        if self._state.snapshot.code is None:
            # A code already on show stays valid: signing out again must not hide it.
            self._state.signed_out()
        log.info("signed out; a new sign-in code follows")
        self._wake.set()

    # ---- tokens -----------------------------------------------------------------------------

    def _usable_token(self, now: float) -> Token | None:
        """The current token if it may be handed out now (not expired, not refused)."""
        tok = self._token
        if tok is None or tok.value == self._rejected or now >= tok.expires_at:
            return None
        return tok

    def _refresh_from_idp(self) -> None:
        """One refresh for access_token()/token_rejected(); failures feed the shared back-off.
        Caller holds _lock."""
        try:
            self._refresh(force=True)
        except IdpDown as err:
            self._down.failed(f"token refresh failed: {err}", err.retry_after_s)
            self._clear_http_cache()
        except IdpRefused as err:
            self._refused.failed(f"token refresh refused: {err.problem.message}")
            self._state.failed(err.problem.message, err.problem.panel)
            self._clear_http_cache()

    # ---- the sign-in loop -------------------------------------------------------------------

    def _beat(self) -> None:
        self.heartbeat = self._clock()

    def _step(self) -> None:
        """One unit of work; raises IdpDown / IdpRefused for the loop to back off."""
        # A code flow is what waits unless a sign-in exists or is being restored; only then may
        # a new-code request cut this pass's waits short.
        self._code_pass = self._account is None and not self._signed_in
        if not self._code_pass:
            self._new_code.clear()
        app = self._ensure_app()
        if self._signed_in:
            self._stay_signed_in()
            return
        if self._account is None:
            self._account = self._pick_account(app)
        if self._account is not None:
            self._code_pass = False
            self._new_code.clear()
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
        # Generic providers may not know "profile", which MSAL adds to every request.
        extra: dict[str, Any] = {"exclude_scopes": ["profile"]} if s.oidc_authority else {}
        self._app = build_app(msal.PublicClientApplication, s, self._session, self._idp_down,
                              token_cache=self._cache.cache, http_cache=self._http_cache, **extra)
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

    def _waited_for_backoff(self) -> bool:
        """Wait out the shared back-off if it runs (the uploader met the outage first: its
        back-off is ours); True if it did, and the pass is over."""
        if self._may_ask_idp(self._clock()):
            return False
        self._wait_until(lambda: self._idp.not_before)
        return True

    def _sign_in_silently(self) -> None:
        if self._waited_for_backoff():
            return
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
            left = (tok.refresh_at - self._clock()) if tok else 0.0
            if left > 0:
                self._wait(left)
            else:
                self._begin_reauth(Problem("reauth", "The sign-in cannot be refreshed: sign in with "
                                                     "a new code"))
            return
        if self._waited_for_backoff():
            return
        with self._lock:
            if not self._signed_in:
                return
            log.info("refreshing the sign-in (proactive, every %.0f h)", self._timing.refresh_every_s / 3600)
            self._refresh(force=True)

    def _refresh(self, *, force: bool) -> None:
        """acquire_token_silent for the current account; updates state. Caller holds _lock.

        ``force=False`` only for the silent sign-in at start (a cached token may do); every
        later refresh is decided by our monotonic clock and goes to the IdP.

        Raises:
            IdpDown, IdpRefused: the caller decides how to wait.
        """
        app, account = self._app, self._account
        if app is None or account is None:
            return
        claims = self._claims
        try:
            result = self._read_cache("acquire_token_silent", lambda: app.acquire_token_silent_with_error(
                list(self._scopes), account, force_refresh=force, claims_challenge=claims))
        except _CacheDamaged as err:
            self._set_cache_aside(str(err))
            return
        if result and "access_token" in result:
            if claims is not None and claims == self._claims:
                self._claims = None
            self._accept(result, account)
            return
        if result and "error" not in result:
            raise IdpDown("The sign-in service sent an incomplete token reply")
        if not result:
            self._begin_reauth(Problem("reauth", "The saved sign-in has no usable refresh token: sign "
                                                 "in with a new code"))
            return
        problem = self._explain(result)
        if problem.kind == "transient":
            raise IdpDown(problem.message, self._idp_retry_after)
        if problem.kind == "reauth" or result.get("error") in _REAUTH_ERRORS:
            # The IdP itself refused the refresh token (or wants a person): only now is it given up.
            self._begin_reauth(problem)
            return
        raise IdpRefused(problem)

    def _accept(self, result: Mapping[str, Any], account: Mapping[str, Any] | None) -> None:
        """A token response (silent or device flow) succeeded. Caller holds _lock."""
        now = self._clock()
        value = str(result["access_token"])
        life_s = number(result.get("expires_in"), 3600.0)
        from_cache = result.get("token_source") == "cache"
        if from_cache:
            # msal judged this cached token by the wall clock, which may be years off on a box
            # without an RTC: it may not live longer here than it did when it was issued.
            life_s = min(life_s, self._cached_lifetime(value))
        self._token = Token.received(value, now, life_s, self._timing.refresh_margin_max_s)
        if value != self._rejected:
            self._rejected = None
        if not from_cache:
            self._last_refresh = now
            self._idp.ended()
        self._renewals_used = 0
        self._exhausted = False
        username = _display_name(account, result.get("id_token_claims") or {})
        if not self._signed_in:
            self._signed_in = True
            log.info("signed in as %s", username or "(unknown account)")
        else:
            log.debug("access token refreshed (valid %.0f s)", life_s)
        self._state.signed_in(username)
        self._set_link(True)

    def _cached_lifetime(self, secret: str) -> float:
        """The lifetime a cached access token was issued with (expires_on - cached_at: both
        written at once, so a wrong wall clock cancels out); 3600 s if it cannot be found."""
        try:
            for entry in self._cache.cache.search(msal.TokenCache.CredentialType.ACCESS_TOKEN):
                if entry.get("secret") == secret:
                    return max(0.0, float(entry["expires_on"]) - float(entry["cached_at"]))
        except (KeyError, TypeError, ValueError):
            pass
        return 3600.0

    def _forget_sign_in(self) -> None:
        """Forget the account and its tokens in memory: the one place sign-out, a refused
        refresh token and a damaged cache all go through. Caller holds _lock."""
        self._account = None
        self._token = None
        self._rejected = None
        self._signed_in = False
        self._last_refresh = None

    def _begin_reauth(self, problem: Problem) -> None:
        """The IdP refused the saved sign-in: forget the account and go back to the code flow."""
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
            self._forget_sign_in()
        self._state.sign_in_lost(problem.message)
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
            IdpDown: a transport problem (requests exception; an HTTP error status, which msal
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
            self._forget_sign_in()
        self._state.sign_in_lost(CACHE_UNREADABLE)
        self._wake.set()

    # ---- the device code flow ---------------------------------------------------------------

    def _device_flow(self, app: msal.PublicClientApplication) -> None:
        """One code's life: issue, publish, poll until used, declined, expired or cancelled."""
        self._new_code.clear()
        scopes = list(self._scopes)
        claims = self._claims
        started = self._clock()
        try:
            flow = app.initiate_device_flow(scopes=scopes, claims_challenge=claims)
        except Exception as err:
            raise self._idp_down(err) from err
        if "user_code" not in flow or "device_code" not in flow:
            if "error" not in flow:
                raise IdpDown("The sign-in service sent an incomplete device code reply")
            # MSAL does not raise on a 5xx here; it hands over the error body.
            raise error_answer(flow, self._session.last_status if self._session else None,
                               self._idp_retry_after)
        self._set_link(True)
        self._idp.ended()
        expires_in = max(1.0, number(flow.get("expires_in"), 900.0))
        # RFC 8628 §3.2: interval defaults to 5 s. 0 would make MSAL busy-loop.
        interval = max(1, int(number(flow.get("interval"), 5.0)))
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
        self._wait(FIRST_POLL_AFTER_S, self._new_code)
        self._poll(app, flow, deadline, claims)

    def _poll(self, app: msal.PublicClientApplication, flow: dict[str, Any], deadline: float,
              claims: str | None) -> None:
        def exit_condition(_flow: Mapping[str, Any]) -> bool:
            # MSAL calls this about once a second between polls, after an answer it understood
            # (pending, slow_down): our clock, our cancel events, and the IdP is answering.
            self._beat()
            self._down.ended()
            return self._cancelled() or self._clock() >= deadline

        while True:
            try:
                result = app.acquire_token_by_device_flow(flow, claims_challenge=claims,
                                                          exit_condition=exit_condition)
                self._cache.save_if_changed()
                if "access_token" in result:
                    break
                if "error" not in result:
                    down = IdpDown("The sign-in service sent an incomplete token reply")
                elif self._explain(result).kind == "transient":
                    # temporarily_unavailable / server_error as an OAuth answer: the code is
                    # still valid at the IdP, so it stays on show while we wait.
                    down = IdpDown(self._explain(result).message,
                                    self._idp_retry_after)
                else:
                    break
            except Exception as err:
                self._cache.save_if_changed()
                down = self._idp_down(err)
            if self._cancelled() or self._clock() >= deadline:
                result = {"error": "authorization_pending"}
                break
            # RFC 8628 §3.5: the interval in force (slow_down raised it; msal keeps it in the
            # flow) is the least wait, and failures stretch it further with the back-off.
            delay = self._down.failed(f"polling for the sign-in failed: {down}", down.retry_after_s,
                                      floor_s=float(flow.get("interval") or 5))
            self._clear_http_cache()
            self._wait(min(delay, max(0.0, deadline - self._clock())), self._new_code)
        if "access_token" in result:
            with self._lock:
                self._account = self._pick_account(app)
                if self._account is None:
                    log.warning("the IdP sent neither client_info nor an id_token, so this sign-in "
                                "cannot be refreshed; a new code will be needed when the token expires")
                if claims is not None and claims == self._claims:
                    self._claims = None
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
        else:
            self._state.code_cleared(notice=None)
            raise IdpRefused(problem)

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
        self._state.codes_exhausted(f"{notice[:1].upper()}{notice[1:]}. {RENEWALS_EXHAUSTED}")

    # ---- errors and waiting -----------------------------------------------------------------

    def _explain(self, result: Mapping[str, Any]) -> Problem:
        return explain_result(result)

    def _code_events(self) -> tuple[threading.Event, ...]:
        """What may cut a back-off short: a new-code request, but only while a code flow waits."""
        return (self._new_code,) if self._code_pass else ()

    def _on_idp_down(self, err: IdpDown) -> None:
        self._down.failed(str(err), err.retry_after_s)
        if not self._signed_in:
            self._state.failed(f"{err}: retrying")
        self._clear_http_cache()
        self._wait_until(lambda: self._down.not_before, *self._code_events())
        self._new_code.clear()      # a request that cut the wait short is used up: no 1 s loop

    def _on_config_problem(self, problem: Problem) -> None:
        self._refused.failed(problem.message)
        self._state.failed(problem.message, problem.panel)
        self._clear_http_cache()
        self._wait_until(lambda: self._refused.not_before, *self._code_events())
        self._new_code.clear()

    def _wait(self, seconds: float, *events: threading.Event) -> None:
        """Sleep up to ``seconds`` (monotonic), waking early on stop, ``_wake`` or ``events``."""
        deadline = self._clock() + seconds
        self._wait_until(lambda: deadline, *events)

    def _wait_until(self, deadline: Callable[[], float], *events: threading.Event) -> None:
        """Sleep until ``deadline()`` (monotonic, read again after each wake: another thread may
        push a shared back-off further), waking early on stop, ``_wake`` or ``events``. Event-
        driven (agent.wakeup): an idle sign-in thread sleeps until its deadline or news."""
        while not self._stop.is_set() and not self._wake.is_set() and not any(e.is_set() for e in events):
            left = deadline() - self._clock()
            if left <= 0:
                return
            self._pass_waited = True
            self._beat()
            wait_any(self._slice(left), self._stop, self._wake, *events)

    def _pace(self, started: float) -> None:
        """Stretch a pass that did not wait to MIN_PASS_S: only stop ends this early, so nothing
        (not even a _wake set on every pass by a bug) can turn the loop into a spin."""
        deadline = started + MIN_PASS_S
        while not self._stop.is_set():
            left = deadline - self._clock()
            if left <= 0:
                return
            self._beat()
            self._stop.wait(self._slice(left))

    def _slice(self, left: float) -> float:
        """How long one real wait may last: all of ``left`` on the real monotonic clock; a
        ``wait_slice_s`` under an injected clock, which a test moves without waking anyone."""
        return left if self._clock is time.monotonic else min(left, self._timing.wait_slice_s)

    def _set_link(self, up: bool) -> None:
        self._state.set_link("idp", "up" if up else "down")

    def _on_idp_response(self, resp: requests.Response) -> None:
        self._idp_retry_after = retry_after_s(resp) if resp.status_code in (429, 503) else None
        self._set_link(resp.status_code < 500)

    def _on_idp_failure(self, err: requests.RequestException) -> None:
        self._set_link(False)


def effective_scopes(settings: AuthSettings) -> tuple[str, ...]:
    """``auth.scopes`` without the reserved OIDC scopes, which msal adds to every request itself
    and refuses to be given; one warning names ``auth.scopes`` when any were listed."""
    dropped = list(getattr(settings, "dropped_scopes", ()))
    kept = []
    for scope in settings.scopes:
        if scope in RESERVED_SCOPES:
            dropped.append(scope)
        else:
            kept.append(scope)
    if dropped:
        log.warning("auth.scopes: %s dropped: msal requests openid, profile and offline_access "
                    "itself; effective scopes: %s", ", ".join(dict.fromkeys(dropped)), " ".join(kept))
    return tuple(kept)


def claims_json(challenge: str | None) -> str | None:
    """A claims challenge as msal wants it (a JSON object string), from the ``claims=`` of a
    ``WWW-Authenticate`` header: Entra sends it base64-encoded, others as JSON. None if absent
    or unreadable (then the refresh goes without it)."""
    if not challenge or not challenge.strip():
        return None
    text = challenge.strip()
    if not text.startswith("{"):
        try:
            std = text.replace("-", "+").replace("_", "/")      # base64url as well
            text = base64.b64decode(std + "=" * (-len(std) % 4), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            log.warning("ignoring a claims challenge that is neither JSON nor base64")
            return None
    try:
        parsed = json.loads(text)
    except ValueError:
        log.warning("ignoring a claims challenge that is not JSON")
        return None
    if not isinstance(parsed, dict):
        log.warning("ignoring a claims challenge that is not a JSON object")
        return None
    return json.dumps(parsed, separators=(",", ":"))


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
