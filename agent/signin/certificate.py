"""App-only sign-in with an X.509 certificate (``auth.flow = "client_certificate"``), via msal.

For tenants that block device code flow with Conditional Access (AADSTS53003 on every code):
the box is an application identity of its own, authenticated by a certificate registered on the
app, and gets app-only tokens for ``<resource>/.default`` through msal's confidential client
(OAuth client credentials, the client authenticated by a signed JWT, RFC 7523). No code, no
person: the panel says "signed in as app <client_id>". :class:`CertificateAuthenticator` is the
same token source as :class:`agent.signin.authenticator.Authenticator` for the uploader and the
service (``run``, ``access_token``, ``token_rejected``, ``request_new_code``, ``sign_out``,
``heartbeat``).

The assertion is signed here and handed to msal as a callable (msal's documented
``{"client_assertion": callable}`` credential), not as msal's ``{"private_key", "thumbprint"}``
credential, for two reasons seen in msal 1.39: that credential reuses one assertion (one ``jti``)
for 9 minutes, which an IdP that refuses replayed assertions rejects on a 401's forced refresh;
and it offers the SHA-256 thumbprint (``x5t#S256``, PS256) only together with the ``x5c``
chain. Here every token request gets a fresh assertion: PS256 + ``x5t#S256`` always, the chain
in ``x5c`` only with ``auth.send_certificate_chain`` (subject name + issuer registrations).

msal keeps app tokens in the token cache file (``state_dir/token_cache.json``), so a restart
reuses a valid token without signing anything. A certificate that expires within 30 days is a
warning (screen, status, MQTT); an expired one, or one the IdP does not know, is an error that
says which. Timers are monotonic; the certificate's validity and the assertion's ``exp`` are
wall-clock facts by nature.
"""

from __future__ import annotations

import base64
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import msal
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from agent.clock import ClockTrust
from agent.config import AuthSettings, private_file_problem
from agent.errors import AgentError
from agent.net.https import HttpsSession
from agent.net.retry import Backoff, retry_after_s
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
    number,
)
from agent.state import AgentState
from agent.wakeup import wait_any

log = logging.getLogger(__name__)

WARN_WITHIN = timedelta(days=30)
ASSERTION_LIFETIME_S = 600          # Entra accepts at most 10 minutes
FILES_CHECK_S = 5.0                 # how often a wait looks for renewed certificate files
REFUSED_FRESH = "the API refuses fresh tokens (401): check its audience and issuer"
NO_CODES = "no sign-in codes with auth.flow = \"client_certificate\": the box signs in as an app"


class CredentialError(AgentError):
    """The certificate or key file cannot be used; ``key`` is the config key to blame."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass(frozen=True)
class Credential:
    """A private key and its certificate (first in ``chain``, then its issuers)."""

    private_key: rsa.RSAPrivateKey
    chain: tuple[x509.Certificate, ...]

    @property
    def certificate(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def thumbprint(self) -> str:
        """SHA-1 hex, upper case: what the Entra portal lists under "Certificates"."""
        return self.certificate.fingerprint(hashes.SHA1()).hex().upper()  # noqa: S303 - a name, not security

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc

    @property
    def not_before(self) -> datetime:
        return self.certificate.not_valid_before_utc


def load_credential(certificate_file: str, private_key_file: str) -> Credential:
    """Read the PEM certificate (chain) and PEM private key, and check that they belong together.

    Raises:
        CredentialError: naming ``auth.certificate_file`` or ``auth.private_key_file``.
    """
    cert_pem = _read("auth.certificate_file", certificate_file)
    try:
        chain = tuple(x509.load_pem_x509_certificates(cert_pem))
    except ValueError as err:
        raise CredentialError("auth.certificate_file", f"{certificate_file!r} holds no PEM certificate "
                                                       "(-----BEGIN CERTIFICATE-----)") from err
    key_pem = _read("auth.private_key_file", private_key_file)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError as err:
        raise CredentialError("auth.private_key_file", f"{private_key_file!r} is encrypted; store it "
                                                       "unencrypted with mode 0600 (openssl pkey)") from err
    except ValueError as err:
        raise CredentialError("auth.private_key_file", f"{private_key_file!r} holds no PEM private "
                                                       "key") from err
    if not isinstance(key, rsa.RSAPrivateKey):
        raise CredentialError("auth.private_key_file", f"{private_key_file!r} is not an RSA key; Entra "
                                                       "certificate credentials are RSA (RS256/PS256)")
    if key.public_key().public_numbers() != chain[0].public_key().public_numbers():  # type: ignore[union-attr]
        raise CredentialError("auth.private_key_file", f"{private_key_file!r} does not belong to "
                                                       f"auth.certificate_file {certificate_file!r} "
                                                       "(different public keys)")
    return Credential(key, chain)


def _read(key: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise CredentialError(key, f"cannot read {path!r}: {err.strerror or err}") from err


def validity_problem(cred: Credential, now: datetime) -> Problem | None:
    """An expired or not-yet-valid certificate (an error), or one expiring within 30 days (a
    warning, ``kind="pending"``: it still works); None when all is well."""
    day = cred.not_after.strftime("%Y-%m-%d")
    if now >= cred.not_after:
        return Problem("config", f"The certificate in auth.certificate_file expired on {day}: create a "
                                 "new one and upload it to the app registration (README)",
                       short=f"Certificate expired on {day}: renew it (README)")
    if now < cred.not_before:
        return Problem("config", "The certificate in auth.certificate_file is not valid before "
                                 f"{cred.not_before:%Y-%m-%d %H:%M} UTC: check the device clock",
                       short=f"Certificate not valid before {cred.not_before:%Y-%m-%d}: check the clock")
    left = cred.not_after - now
    if left <= WARN_WITHIN:
        days = max(0, left.days)
        return Problem("pending", f"The certificate in auth.certificate_file expires on {day} (in "
                                  f"{days} day{'s' if days != 1 else ''}): renew it (README)")
    return None


def make_assertion(cred: Credential, *, client_id: str, token_endpoint: str, send_chain: bool,
                   now: float | None = None) -> str:
    """The signed client assertion for one token request (fresh ``jti`` every time)."""
    issued = int(time.time() if now is None else now)
    headers: dict[str, Any] = {
        "typ": "JWT",
        "x5t#S256": base64.urlsafe_b64encode(cred.certificate.fingerprint(hashes.SHA256()))
                          .rstrip(b"=").decode(),
    }
    if send_chain:
        headers["x5c"] = [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode()
                          for c in cred.chain]
    claims = {"aud": token_endpoint, "iss": client_id, "sub": client_id, "jti": str(uuid.uuid4()),
              "iat": issued, "nbf": issued, "exp": issued + ASSERTION_LIFETIME_S}
    return jwt.encode(claims, cred.private_key, algorithm="PS256", headers=headers)


class CertificateAuthenticator(SignInFlow):
    """App-only sign-in and the uploader's token source for ``auth.flow = "client_certificate"``.

    Thread model as :class:`agent.signin.authenticator.Authenticator`: :meth:`run` is the
    sign-in thread; the other methods may be called from any thread.

    Raises:
        CredentialError: at construction, when the certificate or key cannot be used.
    """

    def __init__(self, settings: AuthSettings, cache_path: Path, state: AgentState, *, device_id: str,
                 timing: Timing | None = None, clock: Callable[[], float] = time.monotonic,
                 rng: Callable[[], float] = random.random,
                 wall_clock: Callable[[], float] = time.time, trust: ClockTrust | None = None) -> None:
        # The assertion's iat/exp and the certificate's validity are wall-clock facts; a box
        # without an RTC may be off, so the time is the IdP's (its Date headers) when the
        # kernel's clock is not trusted (agent/clock.py).
        self._trust = trust or ClockTrust(wall=wall_clock)
        self._credential = load_credential(settings.certificate_file, settings.private_key_file)
        super().__init__(settings, cache_path, state, device_id=device_id, timing=timing, clock=clock,
                         rng=rng, logger=log)
        self._cred_mtimes = self._mtimes()
        self._app: msal.ConfidentialClientApplication | None = None
        self._token: Token | None = None
        self._forced_token: str | None = None    # obtained because the API refused the one before
        self._rejected: str | None = None        # refused, not replaced yet
        self._rejected_next = 0.0                # monotonic: next try to replace it
        self._rejected_retry = Backoff(self._timing.backoff_initial_s, 600.0, rng)
        self.assertions_signed = 0

    # ---- the token source ----------------------------------------------------------------------

    @property
    def account(self) -> str:
        """What the panel, status and MQTT show as the signed-in identity."""
        return f"app {self._settings.client_id}"

    def run(self, stop: threading.Event) -> None:
        """The sign-in thread: get an app token, keep it fresh, return on stop."""
        self._stop = stop
        log.info("app sign-in starting (%s, client %s, certificate %s)", self._settings.authority_url,
                 self._settings.client_id, self._credential.thumbprint)
        while not stop.is_set():
            self.heartbeat = self._clock()
            self._wake.clear()
            started = self._clock()
            try:
                wait_s = self._step()
            except IdpDown as err:
                wait_s = self._down.failed(str(err), err.retry_after_s)
                if not self._signed_in:
                    self._state.failed(f"{err}: retrying")
            except IdpRefused as err:
                problem = self._told_by_validity(err.problem)
                wait_s = self._refused.failed(problem.message)
                self._state.failed(problem.message, problem.panel)
            except Exception as err:   # never let the sign-in thread die
                log.exception("unexpected sign-in error (%s); retrying", type(err).__name__)
                wait_s = self._down.failed(f"Sign-in error ({type(err).__name__})")
            self._clear_http_cache()
            self._wait(max(wait_s, started + MIN_PASS_S - self._clock()))
        log.info("sign-in stopped")

    def access_token(self) -> str | None:
        """A valid app token, or None while there is none.

        From memory while more than half its life (at most ``refresh_margin_max_s``) is left;
        then, or with no token yet, from msal (its cache at first, else the IdP) as far as the
        shared back-off allows: while the IdP is down no call touches the network or the journal
        before the back-off is over, and the token is handed out while it is still valid.
        """
        with self._lock:
            tok = self._token
            now = self._clock()
            if tok is not None and tok.value == self._rejected:
                return self._replace_rejected()
            if tok is not None and now < tok.refresh_at:
                return tok.value
            if self._may_ask_idp(now):
                try:
                    self._acquire(force=tok is not None)
                except (IdpDown, IdpRefused) as err:
                    self._backed_off(err, "app token refresh failed" if tok else "no app token yet")
            tok = self._token
            return tok.value if tok is not None and tok.expires_at > self._clock() else None

    def token_rejected(self, claims_challenge: str | None = None) -> str | None:
        """The API answered 401: a new token from the IdP (for ``claims_challenge`` if given).
        None: none now (the IdP failed or its back-off runs, or a fresh token was refused as
        well; retried backed off)."""
        with self._lock:
            rejected = self._token.value if self._token else None
            if rejected is not None and rejected == self._forced_token:
                # A token fresh from the IdP was refused too: the API's audience or issuer is
                # wrong. A new token is tried, backed off; there is no person to ask.
                self._rejected = rejected
                self._rejected_next = self._clock() + self._rejected_retry.next_delay()
                log.error("%s", REFUSED_FRESH)
                return None
            if not self._may_ask_idp(self._clock()):
                self._rejected = rejected       # replaced when the shared back-off is over
                return None
            log.info("the API refused the app token (401); getting a new one")
            try:
                self._acquire(force=True, claims_challenge=claims_challenge)
            except (IdpDown, IdpRefused) as err:
                self._rejected = rejected
                self._backed_off(err, "new app token after a 401 failed", show=True)
                return None
            self._forced_token = self._token.value if self._token else None
            return self._forced_token

    def request_new_code(self) -> bool:
        """There are no codes in this flow (button / MQTT renew_code)."""
        return False

    def sign_out(self) -> None:
        """Forget the app tokens (memory and file); the next pass signs in again by itself: the
        certificate is the credential, nobody has to approve anything."""
        with self._lock:
            self._cache.clear_or_log()
            self._app = None           # its in-memory view of the cache is stale now
            self._down.retry_now()
            self._refused.retry_now()
            self._token = None
            self._forced_token = None
            self._rejected = None
            self._signed_in = False
        self._state.signed_out()
        log.info("signed out; signing in again as app %s", self._settings.client_id)
        self._wake.set()

    # ---- the loop --------------------------------------------------------------------------------

    def _step(self) -> float:
        """One pass: check the certificate, have a token, say how long until the next pass."""
        self._reload_if_changed()
        problem = validity_problem(self._credential, datetime.fromtimestamp(self._trust.now(), UTC))
        if problem is not None and problem.kind != "pending" and self._trust.quality() == "unsynced":
            # An unsynchronized clock and no server's Date yet: this box cannot tell whether the
            # certificate is valid. The IdP can, and its answer carries the time.
            log.debug("certificate validity unknown here (clock not synchronized): asking the IdP")
            problem = None
        if problem is not None and problem.kind != "pending":
            with self._lock:
                self._signed_in = False
                self._token = None
            raise IdpRefused(problem)
        warning = problem.message if problem is not None else None
        if self._state.snapshot.warning != warning:
            if warning:
                log.warning("%s", warning)
            self._state.update(warning=warning)
        with self._lock:
            tok = self._token
            now = self._clock()
            due = tok is None or now >= tok.refresh_at - 1.0
            if due and not self._may_ask_idp(now):
                # The uploader met the outage first: its back-off is ours.
                return max(self._timing.wait_slice_s, self._idp.not_before - now)
            if due:
                self._acquire(force=tok is not None)
                tok = self._token
            if tok is not None and self._rejected == tok.value:
                # Refused by the API and not replaced yet: replace it here when its back-off
                # is over, whether or not the uploader asks meanwhile.
                if self._clock() >= self._rejected_next:
                    self._replace_rejected()
                    tok = self._token
                if tok is not None and self._rejected == tok.value:
                    return max(self._timing.wait_slice_s, self._rejected_next - self._clock(),
                               self._idp.not_before - self._clock())
        if tok is None:
            raise IdpDown("The sign-in service sent no token")
        # Proactive: a new token a second before access_token() would have to fetch one.
        return max(0.0, tok.refresh_at - self._clock() - 1.0)

    def _acquire(self, *, force: bool, claims_challenge: str | None = None) -> None:
        """A token from msal: its cache unless ``force``; raises IdpDown / IdpRefused. Caller
        holds _lock (or is the sign-in thread, which takes it here)."""
        with self._lock:
            app = self._ensure_app()
            scopes = list(self._settings.scopes)
            try:
                with self._cache.using():
                    if force:
                        app.remove_tokens_for_client()
                    result = app.acquire_token_for_client(scopes, claims_challenge=claims_challenge)
            except Exception as err:
                raise self._idp_down(err) from err
            if not isinstance(result, dict) or "access_token" not in result:
                status = self._session.last_status if self._session else None
                if not isinstance(result, dict) or "error" not in result or (status or 0) >= 500:
                    raise IdpDown(f"The sign-in service failed (HTTP {status})" if status
                                   else "The sign-in service sent an incomplete token reply",
                                   self._idp_retry_after)
                raise error_answer(result, status, self._idp_retry_after, flow="client_certificate")
            now = self._clock()
            expires_in = number(result.get("expires_in") or 3600, 3600.0)
            self._token = Token.received(str(result["access_token"]), now, expires_in,
                                         self._timing.refresh_margin_max_s)
            self._idp.ended()
            if self._token.value != self._rejected:
                self._rejected = None
                self._rejected_retry.reset()
            if not self._signed_in:
                self._signed_in = True
                source = "cached" if result.get("token_source") == "cache" else "new"
                log.info("signed in as app %s (%s token, valid %.0f min)", self._settings.client_id,
                         source, expires_in / 60)
            self._state.signed_in(self.account)
            self._state.set_link("idp", "up")

    def _replace_rejected(self) -> str | None:
        """The current token was refused; until a different one exists, hand out nothing new.
        Caller holds _lock."""
        now = self._clock()
        if now < self._rejected_next:
            return self._rejected       # the uploader knows it is refused and waits
        if not self._may_ask_idp(now):
            return None
        try:
            self._acquire(force=True)
        except (IdpDown, IdpRefused) as err:
            self._backed_off(err, "replacing the refused app token failed")
            return None
        return self._token.value if self._token else None

    def _told_by_validity(self, problem: Problem) -> Problem:
        """The IdP refused the certificate (AADSTS700027) while this box's clock was not trusted
        enough to judge it: its answer's Date now tells the time, so say the certificate's own
        fault when it has one ("expired on DATE", "not valid before ...") rather than the IdP's
        words alone."""
        if problem.aadsts != 700027 or self._trust.quality() == "unsynced":
            return problem
        local = validity_problem(self._credential, datetime.fromtimestamp(self._trust.now(), UTC))
        if local is None or local.kind == "pending":
            return problem
        return Problem(local.kind, local.message, problem.aadsts, local.short)

    def _backed_off(self, err: IdpDown | IdpRefused, what: str, *, show: bool = False) -> None:
        """A request for the uploader failed: it feeds the shared back-off and its journal rule
        (``show``: the state says a refusal). Caller holds _lock."""
        if isinstance(err, IdpDown):
            self._down.failed(f"{what}: {err}", err.retry_after_s)
        else:
            self._refused.failed(f"{what}: {err.problem.message}")
            if show:
                self._state.failed(err.problem.message, err.problem.panel)
        self._clear_http_cache()

    def _ensure_app(self) -> msal.ConfidentialClientApplication:
        if self._app is not None:
            return self._app
        s = self._settings
        if self._session is None:
            self._session = HttpsSession(s.ca_file, s.timeout_s, on_response=[self._on_idp_response],
                                         on_failure=[lambda err: self._state.set_link("idp", "down")])
        self._app = build_app(msal.ConfidentialClientApplication, s, self._session, self._idp_down,
                              token_cache=self._cache.cache, http_cache=self._http_cache,
                              client_credential={"client_assertion": self._assertion})
        return self._app

    def _assertion(self, context: Mapping[str, Any]) -> str:
        """msal calls this once per token request it sends (never for a cached token)."""
        endpoint = str(context.get("token_endpoint") or "")
        self.assertions_signed += 1
        return make_assertion(self._credential, client_id=self._settings.client_id,
                              token_endpoint=endpoint, send_chain=self._settings.send_certificate_chain,
                              now=self._trust.now())

    def _mtimes(self) -> tuple[float, float]:
        try:
            return (Path(self._settings.certificate_file).stat().st_mtime,
                    Path(self._settings.private_key_file).stat().st_mtime)
        except OSError:
            return (0.0, 0.0)

    def _reload_if_changed(self) -> None:
        """A renewed certificate dropped in place is used without a restart."""
        mtimes = self._mtimes()
        if mtimes == self._cred_mtimes:
            return
        self._cred_mtimes = mtimes      # a bad pair is looked at again when the files change again
        key_problem = private_file_problem(Path(self._settings.private_key_file))
        if key_problem:
            log.warning("not using the changed certificate files: auth.private_key_file: %s", key_problem)
            return
        try:
            cred = load_credential(self._settings.certificate_file, self._settings.private_key_file)
        except CredentialError as err:
            log.warning("not using the changed certificate files: %s", err)
            return       # e.g. the key replaced before the certificate: wait for the next change
        if cred.thumbprint != self._credential.thumbprint:
            log.info("certificate changed: now %s (expires %s)", cred.thumbprint, cred.not_after.date())
        self._credential = cred
        self._refused.retry_now()       # a refusal may have been this certificate's: ask now

    # ---- errors and waiting -------------------------------------------------------------------

    def _on_idp_response(self, resp: requests.Response) -> None:
        self._trust.observe_response(resp)
        self._idp_retry_after = retry_after_s(resp) if resp.status_code in (429, 503) else None
        self._state.set_link("idp", "up" if resp.status_code < 500 else "down")

    def _wait(self, seconds: float) -> None:
        """Sleep up to ``seconds`` (monotonic); wake on stop, sign-out, or changed certificate
        files (looked at every ``FILES_CHECK_S``: a renewed certificate ends an error wait)."""
        deadline = self._clock() + seconds
        next_files = self._clock() + FILES_CHECK_S
        while not self._stop.is_set() and not self._wake.is_set():
            now = self._clock()
            left = deadline - now
            if left <= 0:
                return
            if now >= next_files:
                next_files = now + FILES_CHECK_S
                if self._mtimes() != self._cred_mtimes:
                    return
            self.heartbeat = now
            # Event-driven (agent.wakeup) up to the next look at the files; slices under an
            # injected clock, which a test moves without waking anyone.
            wait = min(left, next_files - now)
            if self._clock is not time.monotonic:
                wait = min(wait, self._timing.wait_slice_s)
            wait_any(wait, self._stop, self._wake)
