"""A simulated Microsoft Entra ID that speaks the device-code dialect over HTTPS on loopback.

Used by the tests (as a real HTTP peer for msal) and by ``device-agent demo`` / ``sim idp``.
It reproduces what the agent can observe of Entra: the v2.0 discovery document, the
``devicecode`` and ``token`` endpoints with Entra's JSON shapes (AADSTS codes in
``error_description`` and ``error_codes``, ``trace_id``/``correlation_id``/``timestamp``),
RS256 JWTs signed by a key made at start with its JWKS, opaque rotating refresh tokens, and a
small sign-in page (``/devicelogin``) where a person types the code and approves or declines.
Switches (``idp.switches`` / ``idp.set(...)``) inject the failures the agent must survive.

User codes are 9 characters from an unambiguous upper-case alphabet (no 0/O/1/I/L), e.g.
``F4XQ9ZRTM``, as Entra issues them today; the agent shows them exactly as sent.

Nothing here ever logs a token: codes and approvals are logged, tokens never.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import logging
import secrets
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from agent.cmdline import EXIT_CONFIG, Parser, port
from agent.net.hosts import is_loopback_host
from agent.signal_relay import relay_signals
from agent.sim.appcreds import ASSERTION_ERRORS, AppCredentials, AssertionRefused, issue_app_token
from agent.sim.server import JsonHandler, LoopbackHTTPSServer
from agent.sim.tls import TlsFiles, make_tls

log = logging.getLogger(__name__)

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
CLIENT_CREDENTIALS_GRANT = "client_credentials"
USER_CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"
USER_CODE_LENGTH = 9
DEFAULT_USER = "ada@contoso.example"
OIDC_SCOPES = frozenset({"openid", "profile", "email", "offline_access"})
GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000"
MAX_REQUEST_RECORDS = 20000
REFRESH_IDLE_LIMIT_S = 90 * 24 * 3600.0   # Entra: refresh tokens expire after 90 days unused
_NS = uuid.UUID("5e1d0a6c-3f52-4c1a-9d7e-2f6b1c0de5a1")   # stable GUIDs for tenants and users

# The AADSTS errors the switches can produce: code -> (OAuth "error", extra fields, message).
# The "error" values are what Entra sends with each code, as seen in real responses:
#  - 50059, 90133, 9001023: invalid_request (tenant / endpoint problems, raised before any user).
#  - 7000218: invalid_client ("must contain client_assertion or client_secret": the app
#    registration has "Allow public client flows" off).
#  - 53003: invalid_grant with suberror "message_only" (Conditional Access blocked issuance).
#  - 50076: interaction_required with suberror "basic_action" and a claims challenge. Entra has
#    also been seen answering invalid_grant for 50076; msal treats both as "needs interaction".
#  - 700082, 50173: invalid_grant (refresh token idle > 90 days; grant revoked).
#  - 65001: invalid_grant with suberror "consent_required".
#  - 70016 authorization_pending, 70019/70020 expired_token come from the flow itself.
_CLAIMS_MFA = json.dumps({"access_token": {"capolids": {"essential": True,
                                                        "values": ["4b3e1c9a-sim-policy"]}}})
AADSTS_ERRORS: dict[int, tuple[str, dict[str, str], str]] = {
    50059: ("invalid_request", {},
            "No tenant-identifying information found in either the request or implied by any "
            "provided credentials."),
    90133: ("invalid_request", {},
            "Device Code flow is not supported under /common or /consumers endpoint."),
    9001023: ("invalid_request", {},
              "The grant type is not supported over the /common or /consumers endpoints. Please use "
              "the /organizations or tenant-specific endpoint."),
    7000218: ("invalid_client", {},
              "The request body must contain the following parameter: 'client_assertion' or "
              "'client_secret'."),
    53003: ("invalid_grant", {"suberror": "message_only"},
            "Access has been blocked by Conditional Access policies. The access policy does not "
            "allow token issuance."),
    50076: ("interaction_required", {"suberror": "basic_action", "claims": _CLAIMS_MFA},
            "Due to a configuration change made by your administrator, or because you moved to a "
            "new location, you must use multi-factor authentication to access 'api://telemetry'."),
    700082: ("invalid_grant", {},
             "The refresh token has expired due to inactivity. The token was issued on {issued} "
             "and was inactive for 90.00:00:00."),
    50173: ("invalid_grant", {},
            "The provided grant has expired due to it being revoked, a fresh auth token is needed. "
            "The user might have changed or reset their password."),
    65001: ("invalid_grant", {"suberror": "consent_required"},
            "The user or administrator has not consented to use the application with ID '{client}' "
            "named 'device-agent'. Send an interactive authorization request for this user and "
            "resource."),
    70016: ("authorization_pending", {},
            "OAuth 2.0 device flow error. Authorization is pending. Continue polling."),
    70019: ("expired_token", {}, "Verification code expired."),
    70020: ("expired_token", {},
            "The provided value for the input parameter 'device_code' is not valid. This device "
            "code has expired."),
    70000: ("invalid_grant", {},
            "The provided value for the input parameter 'device_code' is not valid."),
    900144: ("invalid_request", {}, "The request body must contain the following parameter: '{param}'."),
    700016: ("unauthorized_client", {},
             "Application with identifier '{client}' was not found in the directory '{tenant}'. This "
             "can happen if the application has not been installed by the administrator of the "
             "tenant or consented to by any user in the tenant."),
    9002313: ("invalid_grant", {}, "Invalid request. Request is malformed or invalid."),
    90002: ("invalid_tenant", {},
            "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are "
            "signing into the correct cloud."),
    70011: ("invalid_scope", {},
            "The provided request must include a 'scope' input parameter. The provided value for the "
            "input parameter 'scope' is not valid."),
}
AADSTS_ERRORS.update(ASSERTION_ERRORS)   # the client-credentials grant's answers (agent.sim.appcreds)


@dataclass
class Switches:
    """Failure and shape switches; simple fields so tests set them directly or via ``idp.set``.

    Counters (``*_next``/``slow_down_polls``) count down once per matching request. AADSTS error
    switches stay on until set back to ``None``, as a tenant misconfiguration would.
    """

    code_expires_in_s: int = 900               # devicecode expires_in (Entra: 900)
    interval_s: int = 5                        # devicecode interval (Entra: 5); 0 tests clamping
    verification_uri_complete: bool = False    # Entra sends none; some OIDC providers do
    include_message: bool = True               # generic OIDC providers may omit it
    include_interval: bool = True
    slow_down_polls: int = 0                   # the next N device-code polls answer slow_down
    enforce_interval: bool = False             # polls faster than the interval answer slow_down
    decline_all: bool = False                  # the user declines every code at the next poll
    fail_discovery_next: int = 0               # the next N discovery requests answer fail_status
    fail_devicecode_next: int = 0              # the next N devicecode requests answer fail_status
    fail_token_next: int = 0                   # the next N token requests answer fail_status
    fail_status: int = 503                     # 500 server_error; 503 (or 400) temporarily_unavailable
    retry_after_s: int | None = None           # Retry-After header on those failures
    malformed_devicecode_next: int = 0         # the next N devicecode answers are malformed
    malformed_token_next: int = 0              # the next N token answers are malformed
    malformed_kind: str = "not_json"           # not_json (200 HTML) | missing_fields (200 JSON)
    devicecode_error: int | None = None        # AADSTS code answered to every devicecode request
    token_error: int | None = None             # AADSTS code answered to every token request
    refresh_error: int | None = None           # AADSTS code answered to refresh_token grants only
    rotate_refresh_tokens: bool = True         # Entra renews refresh tokens on use
    access_token_lifetime_s: int = 3600
    expired_code_aadsts: int = 70020           # 70019 or 70020 for a poll after expiry
    device_code_blocked: bool = False          # Conditional Access blocks device code flow: every
                                               # devicecode request and poll answers AADSTS53003
    claims_need_sign_in: bool = False          # a refresh with a claims challenge answers 50076


@dataclass
class _Code:
    device_code: str
    user_code: str
    client_id: str
    scopes: list[str]
    issued_at: float
    expires_at: float
    interval_s: int
    status: str = "pending"            # pending | approved | declined | redeemed
    user: str | None = None
    last_poll: float | None = None


@dataclass
class _Grant:
    """What a refresh token stands for."""

    user: str
    client_id: str
    scopes: list[str]
    issued_wall: float
    last_used: float
    revoked: bool = False


class RequestRecord(NamedTuple):
    """One handled request, for tests that measure poll spacing."""

    time: float          # idp.clock() when answered
    path: str
    grant_type: str | None
    status: int


class OAuthError(Exception):
    """An Entra-shaped error answer (status 400 unless given)."""

    def __init__(self, aadsts: int, status: int = 400, **fmt: str) -> None:
        super().__init__(aadsts)
        self.aadsts, self.status, self.fmt = aadsts, status, fmt


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def user_guid(user: str) -> str:
    """A stable object id for a user name (so a re-sign-in finds the same account)."""
    return str(uuid.uuid5(_NS, "user:" + user.lower()))


def display_name(user: str) -> str:
    return user.split("@", 1)[0].replace(".", " ").title()


class SimIdp:
    """Simulated Entra ID tenant on loopback HTTPS. ``start()`` returns self; always ``stop()``."""

    def __init__(self, tls: TlsFiles, *, host: str = "127.0.0.1", port: int = 0,
                 tenant: str = "simtenant", client_id: str | None = None,
                 client_name: str = "device-agent",
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.tls = tls
        self.host, self.port = host, port
        self.tenant = tenant
        self.tenant_id = str(uuid.uuid5(_NS, "tenant:" + tenant))
        self.client_id = client_id
        self.client_name = client_name
        self.clock = clock
        self.wall_clock = wall_clock
        self.switches = Switches()
        self.auto_approve_after_s: float | None = None
        self.requests: list[RequestRecord] = []
        self.claims_requests: list[str] = []       # the ``claims`` of every token request that had one
        self._lock = threading.RLock()
        self._new_code = threading.Condition(self._lock)
        self._codes: dict[str, _Code] = {}          # by device_code
        self._by_user_code: dict[str, _Code] = {}
        self._latest_user_code: str | None = None
        self._grants: dict[str, _Grant] = {}        # by refresh token
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        # App registrations' certificates and the client-credentials checks (agent.sim.appcreds).
        self.app_credentials = AppCredentials(token_url=lambda: self.token_url, wall_clock=wall_clock)
        self.kid = _b64url(hashlib.sha256(self._public_jwk_raw().encode()).digest()[:15])
        self._server: LoopbackHTTPSServer | None = None

    # ---- lifecycle and addresses -------------------------------------------------------------
    def start(self) -> SimIdp:
        """Bind (loopback only; ValueError otherwise) and serve in a daemon thread."""
        handler = type("SimIdpHandler", (_IdpHandler,), {"idp": self})
        self._server = LoopbackHTTPSServer(self.host, self.port, handler, self.tls).start()
        log.info("simulated IdP listening at %s (tenant %s)", self.base_url, self.tenant)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> SimIdp:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("SimIdp not started")
        base = self._server.base_url
        return base.replace("https://::1", "https://[::1]")

    @property
    def authority(self) -> str:
        return f"{self.base_url}/{self.tenant}"

    @property
    def issuer(self) -> str:
        return f"{self.base_url}/{self.tenant}/v2.0"

    @property
    def jwks_url(self) -> str:
        return f"{self.base_url}/{self.tenant}/discovery/v2.0/keys"

    @property
    def devicelogin_url(self) -> str:
        return f"{self.base_url}/devicelogin"

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/{self.tenant}/oauth2/v2.0/token"

    @property
    def devicecode_url(self) -> str:
        return f"{self.base_url}/{self.tenant}/oauth2/v2.0/devicecode"

    # ---- control API for tests and the demo --------------------------------------------------
    def set(self, **kw: Any) -> None:
        """Change switches; unknown names raise TypeError (catches typos in tests)."""
        known = {f.name for f in fields(Switches)}
        if unknown := set(kw) - known:
            raise TypeError(f"unknown switches {sorted(unknown)}; known: {sorted(known)}")
        with self._lock:
            for k, v in kw.items():
                setattr(self.switches, k, v)

    def wait_for_code(self, timeout_s: float = 10) -> str:
        """The newest user code, waiting up to ``timeout_s`` (real time) for one to be issued.

        Raises:
            TimeoutError: no code was issued in time.
        """
        deadline = time.monotonic() + timeout_s
        with self._new_code:
            while self._latest_user_code is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no device code issued within {timeout_s} s")
                self._new_code.wait(left)
            return self._latest_user_code

    def wait_for_new_code(self, previous: str | None, timeout_s: float = 10) -> str:
        """Like ``wait_for_code`` but for a code other than ``previous`` (a renewal)."""
        deadline = time.monotonic() + timeout_s
        with self._new_code:
            while self._latest_user_code in (None, previous):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no new device code issued within {timeout_s} s")
                self._new_code.wait(left)
            return self._latest_user_code

    def approve(self, user_code: str, user: str = DEFAULT_USER) -> None:
        """The person signs in as ``user`` and approves. Raises KeyError/ValueError if impossible."""
        with self._lock:
            code = self._pending(user_code)
            code.status, code.user = "approved", user
        log.info("device code %s approved by %s", user_code, user)

    def decline(self, user_code: str) -> None:
        """The person declines on the sign-in page."""
        with self._lock:
            code = self._pending(user_code)
            code.status = "declined"
        log.info("device code %s declined", user_code)

    def pending_codes(self) -> list[str]:
        """User codes issued, not yet approved/declined and not expired, oldest first."""
        now = self.clock()
        with self._lock:
            for c in self._codes.values():
                self._maybe_auto_approve(c, now)
            return [c.user_code for c in self._codes.values()
                    if c.status == "pending" and now < c.expires_at]

    def expire_codes(self) -> None:
        """Every pending code expires now (for tests on a real clock)."""
        now = self.clock()
        with self._lock:
            for c in self._codes.values():
                if c.status == "pending":
                    c.expires_at = min(c.expires_at, now)

    def code_status(self, user_code: str) -> str:
        """pending | approved | declined | redeemed | expired (KeyError if never issued)."""
        with self._lock:
            code = self._by_user_code[_norm(user_code)]
            self._maybe_auto_approve(code, self.clock())
            if code.status == "pending" and self.clock() >= code.expires_at:
                return "expired"
            return code.status

    def revoke_refresh_tokens(self) -> None:
        """Every refresh token issued so far fails with invalid_grant / AADSTS50173."""
        with self._lock:
            for grant in self._grants.values():
                grant.revoked = True
        log.info("all refresh tokens revoked")

    def mint_access_token(self, lifetime_s: float = 3600, **claims: Any) -> str:
        """An access token as the token endpoint would issue it; ``claims`` override/add claims."""
        base = self._access_claims(DEFAULT_USER, self.client_id or "sim-device-agent",
                                   ["api://telemetry/Readings.Write"], lifetime_s)
        base.update(claims)
        return self._sign(base)

    def public_jwks(self) -> dict[str, Any]:
        jwk = json.loads(self._public_jwk_raw())
        jwk.update({"kid": self.kid, "use": "sig", "alg": "RS256", "issuer": self.issuer})
        return {"keys": [jwk]}

    # ---- internals ---------------------------------------------------------------------------
    def _public_jwk_raw(self) -> str:
        return RSAAlgorithm.to_jwk(self._key.public_key())

    def _maybe_auto_approve(self, code: _Code, now: float) -> None:
        # Evaluated lazily (at polls and look-ups) on the injected clock: no timer threads.
        if (code.status == "pending" and self.auto_approve_after_s is not None
                and now - code.issued_at >= self.auto_approve_after_s and now < code.expires_at):
            code.status, code.user = "approved", DEFAULT_USER
            log.info("device code %s auto-approved for %s", code.user_code, DEFAULT_USER)

    def _pending(self, user_code: str) -> _Code:
        code = self._by_user_code.get(_norm(user_code))
        if code is None:
            raise KeyError(f"unknown user code {user_code!r}")
        if code.status != "pending":
            raise ValueError(f"user code {user_code!r} is already {code.status}")
        if self.clock() >= code.expires_at:
            raise ValueError(f"user code {user_code!r} has expired")
        return code

    def _sign(self, claims: dict[str, Any]) -> str:
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self.kid, "typ": "JWT"})

    def _access_claims(self, user: str, client_id: str, scopes: Sequence[str],
                       lifetime_s: float, requested: str | None = None) -> dict[str, Any]:
        now = int(self.wall_clock())
        resource_scopes = [s for s in scopes if s not in OIDC_SCOPES]
        if resource_scopes and "/" in resource_scopes[0]:
            aud = resource_scopes[0].rsplit("/", 1)[0]
            scp = [s.rsplit("/", 1)[1] for s in resource_scopes if s.rsplit("/", 1)[0] == aud]
        else:   # only OIDC scopes or bare names: Entra issues a Microsoft Graph token
            aud = GRAPH_APP_ID
            scp = [s for s in resource_scopes] or ["User.Read"]
        oid = user_guid(user)
        return {
            "aud": aud, "iss": self.issuer, "iat": now, "nbf": now, "exp": now + int(lifetime_s),
            "azp": client_id, "azpacr": "0", "name": display_name(user), "oid": oid,
            "preferred_username": user, "scp": " ".join(scp),
            "sub": _b64url(hashlib.sha256(f"{oid}:{client_id}".encode()).digest()),
            "tid": self.tenant_id, "uti": _b64url(secrets.token_bytes(16)), "ver": "2.0",
            **_honoured(requested),
        }

    def _id_claims(self, user: str, client_id: str) -> dict[str, Any]:
        now = int(self.wall_clock())
        oid = user_guid(user)
        return {
            "aud": client_id, "iss": self.issuer, "iat": now, "nbf": now, "exp": now + 3600,
            "name": display_name(user), "oid": oid, "preferred_username": user,
            "sub": _b64url(hashlib.sha256(f"{oid}:{client_id}".encode()).digest()),
            "tid": self.tenant_id, "uti": _b64url(secrets.token_bytes(16)), "ver": "2.0",
        }

    def _issue_tokens(self, user: str, client_id: str, scopes: list[str],
                      want_client_info: bool, requested: str | None = None) -> dict[str, Any]:
        lifetime = self.switches.access_token_lifetime_s
        resource_scopes = [s for s in scopes if s not in OIDC_SCOPES]
        body: dict[str, Any] = {
            "token_type": "Bearer",
            # Entra echoes the resource scopes it granted, not openid/profile/offline_access.
            "scope": " ".join(resource_scopes) if resource_scopes else "openid profile User.Read",
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": self._sign(self._access_claims(user, client_id, scopes, lifetime, requested)),
        }
        if "offline_access" in scopes:
            rt = "0.A" + secrets.token_urlsafe(96)
            self._grants[rt] = _Grant(user, client_id, list(scopes), self.wall_clock(), self.clock())
            body["refresh_token"] = rt
        if "openid" in scopes:
            body["id_token"] = self._sign(self._id_claims(user, client_id))
        if want_client_info:
            info = {"uid": user_guid(user), "utid": self.tenant_id}
            body["client_info"] = _b64url(json.dumps(info).encode())
        return body

    def _new_code_for(self, client_id: str, scopes: list[str]) -> dict[str, Any]:
        sw = self.switches
        now = self.clock()
        while True:
            user_code = "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(USER_CODE_LENGTH))
            if user_code not in self._by_user_code:
                break
        code = _Code(device_code="DAQABIQEAAAB" + secrets.token_urlsafe(48), user_code=user_code,
                     client_id=client_id, scopes=scopes, issued_at=now,
                     expires_at=now + sw.code_expires_in_s, interval_s=sw.interval_s)
        self._codes[code.device_code] = code
        self._by_user_code[user_code] = code
        uri = self.devicelogin_url
        body: dict[str, Any] = {
            "user_code": user_code, "device_code": code.device_code, "verification_uri": uri,
            "expires_in": sw.code_expires_in_s,
        }
        if sw.include_interval:
            body["interval"] = sw.interval_s
        if sw.include_message:
            body["message"] = (f"To sign in, use a web browser to open the page {uri} and enter the "
                               f"code {user_code} to authenticate.")
        if sw.verification_uri_complete:
            body["verification_uri_complete"] = f"{uri}?otc={user_code}"
        with self._new_code:
            self._latest_user_code = user_code
            self._new_code.notify_all()
        log.info("issued device code %s (expires in %d s, interval %d s) for client %s",
                 user_code, sw.code_expires_in_s, sw.interval_s, client_id)
        return body

    def _check_client(self, form: dict[str, str]) -> str:
        client_id = form.get("client_id", "")
        if not client_id:
            raise OAuthError(900144, param="client_id")
        if self.client_id is not None and client_id != self.client_id:
            raise OAuthError(700016, client=client_id, tenant=self.tenant)
        return client_id

    def devicecode(self, form: dict[str, str]) -> dict[str, Any]:
        """POST /{tenant}/oauth2/v2.0/devicecode."""
        with self._lock:
            if self.switches.device_code_blocked:
                raise OAuthError(53003)
            if self.switches.devicecode_error is not None:
                raise OAuthError(self.switches.devicecode_error, client=form.get("client_id", ""))
            client_id = self._check_client(form)
            scopes = form.get("scope", "").split()
            if not scopes:
                raise OAuthError(900144, param="scope")
            return self._new_code_for(client_id, scopes)

    def token(self, form: dict[str, str]) -> dict[str, Any]:
        """POST /{tenant}/oauth2/v2.0/token."""
        grant_type = form.get("grant_type", "")
        with self._lock:
            if self.switches.token_error is not None:
                raise OAuthError(self.switches.token_error, client=form.get("client_id", ""))
            client_id = self._check_client(form)
            if grant_type == DEVICE_CODE_GRANT:
                if self.switches.device_code_blocked:
                    raise OAuthError(53003)
                return self._device_code_grant(form, client_id)
            if grant_type == CLIENT_CREDENTIALS_GRANT:
                return self._client_credentials_grant(form, client_id)
            if grant_type == "refresh_token":
                return self._refresh_grant(form, client_id)
            if not grant_type:
                raise OAuthError(900144, param="grant_type")
            raise _UnsupportedGrant(grant_type)

    def _device_code_grant(self, form: dict[str, str], client_id: str) -> dict[str, Any]:
        sw = self.switches
        now = self.clock()
        code = self._codes.get(form.get("device_code", ""))
        if code is None or code.client_id != client_id:
            raise _BadVerificationCode()
        if code.status == "redeemed":
            raise OAuthError(70000)
        if code.status == "pending" and now >= code.expires_at:
            raise OAuthError(sw.expired_code_aadsts)
        previous_poll, code.last_poll = code.last_poll, now
        if code.status == "pending":
            if sw.decline_all:
                code.status = "declined"
                log.info("device code %s declined (decline_all switch)", code.user_code)
            else:
                self._maybe_auto_approve(code, now)
        if code.status == "declined":
            raise _Declined()
        if sw.slow_down_polls > 0:
            sw.slow_down_polls -= 1
            raise _SlowDown()
        if (sw.enforce_interval and previous_poll is not None
                and now - previous_poll < code.interval_s):
            raise _SlowDown()
        if code.status == "pending":
            raise OAuthError(70016)
        code.status = "redeemed"
        log.info("device code %s redeemed: tokens issued for %s", code.user_code, code.user)
        return self._issue_tokens(code.user or DEFAULT_USER, client_id, code.scopes,
                                  form.get("client_info") == "1", self._requested_claims(form))

    def _refresh_grant(self, form: dict[str, str], client_id: str) -> dict[str, Any]:
        sw = self.switches
        if sw.refresh_error is not None:
            raise OAuthError(sw.refresh_error, client=client_id, issued=_entra_time(self.wall_clock()))
        rt = form.get("refresh_token", "")
        if not rt:
            raise OAuthError(900144, param="refresh_token")
        grant = self._grants.get(rt)
        if grant is None or grant.client_id != client_id:
            raise OAuthError(9002313)
        if grant.revoked:
            raise OAuthError(50173)
        if self.clock() - grant.last_used > REFRESH_IDLE_LIMIT_S:
            raise OAuthError(700082, issued=_entra_time(grant.issued_wall))
        requested = self._requested_claims(form)
        if requested is not None and sw.claims_need_sign_in:
            raise OAuthError(50076)     # the claims (e.g. MFA) need the person, not the refresh token
        grant.last_used = self.clock()
        scopes = form.get("scope", "").split() or grant.scopes
        if "offline_access" not in scopes and "offline_access" in grant.scopes:
            scopes = [*scopes, "offline_access"]
        body = self._issue_tokens(grant.user, client_id, scopes, form.get("client_info") == "1", requested)
        if sw.rotate_refresh_tokens:
            del self._grants[rt]
        else:   # the same refresh token stays valid; answer with it as Entra does on reuse
            new_rt = body.pop("refresh_token", None)
            if new_rt:
                del self._grants[new_rt]
            body["refresh_token"] = rt
        log.info("refresh token redeemed for %s (rotated: %s)", grant.user, sw.rotate_refresh_tokens)
        return body

    def register_certificate(self, certificate_pem: bytes | str, client_id: str | None = None,
                             roles: Sequence[str] = ("Readings.Write",)) -> str:
        """Upload a certificate to the app registration and grant (with admin consent) the
        application permissions ``roles``; returns the SHA-1 thumbprint the portal would show."""
        client = client_id or self.client_id or "sim-device-agent"
        reg = self.app_credentials.register(client, certificate_pem)
        self.app_credentials.app_roles[client] = tuple(roles)
        log.info("certificate %s registered for app %s", reg.thumbprint, client)
        return reg.thumbprint

    def _client_credentials_grant(self, form: dict[str, str], client_id: str) -> dict[str, Any]:
        """App-only tokens for a certificate-authenticated client (agent.sim.appcreds)."""
        try:
            self.app_credentials.check(form, client_id)
            body = issue_app_token(self._sign, issuer=self.issuer, tenant_id=self.tenant_id,
                                   client_id=client_id, scopes=form.get("scope", "").split(),
                                   roles=self.app_credentials.roles_for(client_id),
                                   lifetime_s=self.switches.access_token_lifetime_s,
                                   wall_clock=self.wall_clock)
        except AssertionRefused as err:
            log.info("client credentials refused for %s: AADSTS%d", client_id, err.aadsts)
            raise OAuthError(err.aadsts, 400, **err.fmt) from err    # status by position: fmt is all message fields
        log.info("app-only token issued for %s", client_id)
        return body

    def _requested_claims(self, form: dict[str, str]) -> str | None:
        """A token request's claims challenge (msal's ``claims_challenge``), kept on record."""
        requested = form.get("claims") or None
        if requested is not None:
            self.claims_requests.append(requested)
        return requested

    def discovery(self) -> dict[str, Any]:
        """The v2.0 openid-configuration, shaped like Entra's."""
        t = f"{self.base_url}/{self.tenant}"
        return {
            "token_endpoint": f"{t}/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt",
                                                      "client_secret_basic"],
            "jwks_uri": self.jwks_url,
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": self.issuer,
            "request_uri_parameter_supported": False,
            "userinfo_endpoint": f"{self.base_url}/oidc/userinfo",
            "authorization_endpoint": f"{t}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{t}/oauth2/v2.0/devicecode",
            "http_logout_supported": True,
            "frontchannel_logout_supported": True,
            "end_session_endpoint": f"{t}/oauth2/v2.0/logout",
            "claims_supported": ["sub", "iss", "cloud_instance_name", "cloud_instance_host_name",
                                 "cloud_graph_host_name", "msgraph_host", "aud", "exp", "iat",
                                 "auth_time", "acr", "nonce", "preferred_username", "name", "tid",
                                 "ver", "at_hash", "c_hash", "email"],
            "kerberos_endpoint": f"{t}/kerberos",
            "tenant_region_scope": "EU",
            "cloud_instance_name": "microsoftonline.com",
            "cloud_graph_host_name": "graph.windows.net",
            "msgraph_host": "graph.microsoft.com",
            "rbac_url": "https://pas.windows.net",
        }

    def error_body(self, err: OAuthError, correlation_id: str) -> dict[str, Any]:
        error, extra, template = AADSTS_ERRORS.get(err.aadsts, ("invalid_request", {}, "Simulated error."))
        fmt = {"client": "", "tenant": self.tenant, "issued": "", "param": ""}
        fmt.update(err.fmt)
        return _entra_error(error, err.aadsts, template.format(**fmt), correlation_id, self.wall_clock(),
                            extra)


# Errors whose "error" value is the OAuth device-flow error itself.
class _SlowDown(OAuthError):
    def __init__(self) -> None:
        super().__init__(0)


class _Declined(OAuthError):
    def __init__(self) -> None:
        super().__init__(0)


class _BadVerificationCode(OAuthError):
    def __init__(self) -> None:
        super().__init__(0)


class _UnsupportedGrant(OAuthError):
    def __init__(self, grant_type: str) -> None:
        super().__init__(0, grant_type=grant_type)


_FLOW_ERRORS: dict[type, tuple[str, int, str]] = {
    _SlowDown: ("slow_down", 70016, "OAuth 2.0 device flow error. Polling too frequently; slow down."),
    # Entra: "authorization_declined — the end user denied the authorization request".
    _Declined: ("authorization_declined", 70000,
                "The request was denied because the user declined the authorization request."),
    _BadVerificationCode: ("bad_verification_code", 70000,
                           "The provided value for the input parameter 'device_code' is not valid."),
    _UnsupportedGrant: ("unsupported_grant_type", 70003,
                        "The app requested an unsupported grant type '{grant_type}'."),
}


def _entra_time(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _entra_error(error: str, aadsts: int, text: str, correlation_id: str, wall: float,
                 extra: dict[str, str] | None = None) -> dict[str, Any]:
    """Entra's error body: the AADSTS code leads the description, ids and timestamp follow."""
    ts = _entra_time(wall)
    trace_id = str(uuid.uuid4())
    body: dict[str, Any] = {
        "error": error,
        "error_description": (f"AADSTS{aadsts}: {text} Trace ID: {trace_id} "
                              f"Correlation ID: {correlation_id} Timestamp: {ts}"),
        "error_codes": [aadsts],
        "timestamp": ts,
        "trace_id": trace_id,
        "correlation_id": correlation_id,
        "error_uri": f"https://login.microsoftonline.com/error?code={aadsts}",
    }
    body.update(extra or {})
    return body


def _honoured(requested: str | None) -> dict[str, Any]:
    """The access-token claims a claims challenge asks for (``{"access_token": {"acrs":
    {"essential": true, "value": "c1"}}}`` gives ``acrs: "c1"``). Time claims are the token's
    own: a token issued now meets Entra CAE's "issued after" (``nbf``) challenge."""
    try:
        wanted = json.loads(requested or "{}").get("access_token") or {}
    except (ValueError, AttributeError):
        return {}
    out: dict[str, Any] = {}
    for name, spec in wanted.items() if isinstance(wanted, dict) else ():
        if name in ("nbf", "iat", "exp", "aud", "iss"):
            continue
        spec = spec if isinstance(spec, dict) else {}
        out[name] = spec.get("values") or spec.get("value") or True
    return out


def _norm(user_code: str) -> str:
    """Codes typed by people: ignore case, spaces and dashes."""
    return "".join(ch for ch in user_code.upper() if ch.isalnum())


class _IdpHandler(JsonHandler):
    idp: SimIdp   # bound per server by SimIdp.start()

    _pending: tuple[float, str, str | None] | None = None

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        url = urlsplit(self.path)
        self._pending = (self.idp.clock(), url.path, None)
        status = self._route_get(url.path, parse_qs(url.query))
        self._record(status)

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        url = urlsplit(self.path)
        raw = self.read_body().decode("utf-8", "replace")
        form = {k: v[0] for k, v in parse_qs(raw, keep_blank_values=True).items()}
        grant = form.get("grant_type") if url.path.endswith("/token") else None
        self._pending = (self.idp.clock(), url.path, grant)
        status = self._route_post(url.path, form)
        self._record(status)

    def send_response(self, code: int, message: str | None = None) -> None:
        # Recorded before the reply leaves: a client that reacts to the reply (a test reading
        # idp.requests) must already find the request on record.
        self._record(code)
        super().send_response(code, message)

    def _record(self, status: int) -> None:
        """Record the pending request once (stamped on arrival) with the status it got."""
        if self._pending is None:
            return
        arrived, path, grant_type = self._pending
        self._pending = None
        with self.idp._lock:
            self.idp.requests.append(RequestRecord(arrived, path, grant_type, status))
            if len(self.idp.requests) > MAX_REQUEST_RECORDS:   # `sim idp` may run for days
                del self.idp.requests[: MAX_REQUEST_RECORDS // 2]

    # -- routing
    def _tenant_path(self, path: str) -> tuple[str, str] | None:
        parts = path.split("/", 2)
        if len(parts) < 3:
            return None
        return parts[1], "/" + parts[2]

    def _route_get(self, path: str, query: dict[str, list[str]]) -> int:
        idp = self.idp
        if path in ("/devicelogin", "/devicelogin/"):
            return self._page(200, _enter_code_page(query.get("otc", [""])[0]
                                                    if idp.switches.verification_uri_complete else ""))
        split = self._tenant_path(path)
        if split is None:
            return self._not_found()
        tenant, rest = split
        if rest == "/v2.0/.well-known/openid-configuration":
            with idp._lock:
                if idp.switches.fail_discovery_next > 0:
                    idp.switches.fail_discovery_next -= 1
                    return self._server_error()
            if tenant != idp.tenant:
                return self._oauth_error(OAuthError(90002, tenant=tenant))
            return self._json(200, idp.discovery())
        if rest == "/discovery/v2.0/keys" and tenant == idp.tenant:
            return self._json(200, idp.public_jwks())
        return self._not_found()

    def _route_post(self, path: str, form: dict[str, str]) -> int:
        idp = self.idp
        if path == "/devicelogin":
            return self._post_code(form)
        if path == "/devicelogin/confirm":
            return self._post_confirm(form)
        split = self._tenant_path(path)
        if split is None:
            return self._not_found()
        tenant, rest = split
        if rest not in ("/oauth2/v2.0/devicecode", "/oauth2/v2.0/token"):
            return self._not_found()
        is_token = rest.endswith("/token")
        sw = idp.switches
        with idp._lock:
            fail_attr = "fail_token_next" if is_token else "fail_devicecode_next"
            bad_attr = "malformed_token_next" if is_token else "malformed_devicecode_next"
            if getattr(sw, fail_attr) > 0:
                setattr(sw, fail_attr, getattr(sw, fail_attr) - 1)
                return self._server_error()
            malformed = getattr(sw, bad_attr) > 0
            if malformed:
                setattr(sw, bad_attr, getattr(sw, bad_attr) - 1)
        if tenant != idp.tenant:
            return self._oauth_error(OAuthError(90002, tenant=tenant))
        if malformed:
            return self._malformed(is_token)
        try:
            body = idp.token(form) if is_token else idp.devicecode(form)
        except OAuthError as err:
            return self._oauth_error(err)
        return self._json(200, body)

    # -- answers
    def _json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> int:
        self.send_json(status, body, headers)
        return status

    def _page(self, status: int, page: str) -> int:
        self.send_raw(status, page.encode(), "text/html; charset=utf-8")
        return status

    def _not_found(self) -> int:
        return self._page(404, _PAGE.format(title="Not found", body="<p>Not found.</p>"))

    def _correlation_id(self) -> str:
        return self.headers.get("client-request-id") or str(uuid.uuid4())

    def _oauth_error(self, err: OAuthError) -> int:
        idp = self.idp
        flow = _FLOW_ERRORS.get(type(err))
        if flow is not None:
            error, code, text = flow
            body = _entra_error(error, code, text.format(**err.fmt), self._correlation_id(),
                                idp.wall_clock())
        else:
            body = idp.error_body(err, self._correlation_id())
        return self._json(err.status, body)

    def _server_error(self) -> int:
        sw = self.idp.switches
        status = sw.fail_status
        # 503 (or a 400, as some providers send it) is temporarily_unavailable; 500 server_error.
        error = "server_error" if status == 500 else "temporarily_unavailable"
        body = _entra_error(error, 90100 if status == 500 else 90033,
                            "A transient error has occurred. Please try again.",
                            self._correlation_id(), self.idp.wall_clock())
        headers = {"Retry-After": str(sw.retry_after_s)} if sw.retry_after_s is not None else None
        return self._json(status, body, headers)

    def _malformed(self, is_token: bool) -> int:
        if self.idp.switches.malformed_kind == "missing_fields":
            body = ({"token_type": "Bearer", "expires_in": 3600} if is_token
                    else {"verification_uri": self.idp.devicelogin_url, "expires_in": 900})
            return self._json(200, body)
        # What a captive portal or a misrouted proxy hands back: 200, HTML.
        self.send_raw(200, b"<html><body>Service temporarily unavailable</body></html>",
                      "text/html; charset=utf-8")
        return 200

    # -- the sign-in page
    def _post_code(self, form: dict[str, str]) -> int:
        idp = self.idp
        otc = form.get("otc", "")
        with idp._lock:
            code = idp._by_user_code.get(_norm(otc))
            problem = None
            if code is None:
                problem = "That code didn't work. Check the code and try again."
            elif code.status != "pending":
                problem = "That code has already been used. Request a new code on your device."
            elif idp.clock() >= code.expires_at:
                problem = "That code has expired. Request a new code on your device."
        if problem is not None or code is None:
            return self._page(200, _enter_code_page(otc, problem))
        return self._page(200, _confirm_page(code.user_code, idp.client_name))

    def _post_confirm(self, form: dict[str, str]) -> int:
        idp = self.idp
        otc, action = form.get("otc", ""), form.get("action", "")
        user = form.get("user", "").strip() or DEFAULT_USER
        try:
            if action == "continue":
                idp.approve(otc, user)
                body = (f"<p id=\"result\">You have signed in to {html.escape(idp.client_name)} "
                        "on your device. You may now close this window.</p>")
                return self._page(200, _PAGE.format(title=idp.client_name, body=body))
            if action == "decline":
                idp.decline(otc)
                body = ("<p id=\"result\">Sign-in declined. You have declined to sign in to "
                        f"{html.escape(idp.client_name)} on the other device. "
                        "You may now close this window.</p>")
                return self._page(200, _PAGE.format(title="Declined", body=body))
        except (KeyError, ValueError) as err:
            return self._page(200, _enter_code_page(otc, str(err).strip("'\"")))
        return self._page(400, _enter_code_page(otc, "Choose Continue or Decline."))


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:sans-serif;max-width:28em;margin:3em auto;padding:0 1em}}
input,button{{font-size:1.1em;padding:.4em;margin:.3em 0}}.error{{color:#a4262c}}</style>
</head><body><h1>Simulated sign-in</h1>{body}</body></html>
"""


def _enter_code_page(otc: str = "", error: str | None = None) -> str:
    err = f'<p id="error" class="error">{html.escape(error)}</p>' if error else ""
    body = (f"<h2>Enter code</h2>{err}"
            "<p>Enter the code displayed on your device to allow access.</p>"
            '<form method="post" action="/devicelogin">'
            f'<input id="otc" name="otc" autocomplete="off" value="{html.escape(otc, quote=True)}" '
            'placeholder="Code" aria-label="Code"> '
            '<button id="next" type="submit">Next</button></form>')
    return _PAGE.format(title="Enter code", body=body)


def _confirm_page(user_code: str, client_name: str) -> str:
    name = html.escape(client_name)
    body = (f"<h2 id=\"question\">Are you trying to sign in to {name}?</h2>"
            "<p>Only continue if you downloaded the app from a store or website that you trust.</p>"
            '<form method="post" action="/devicelogin/confirm">'
            f'<input type="hidden" name="otc" value="{html.escape(user_code, quote=True)}">'
            f'<label>Account <input id="user" name="user" value="{DEFAULT_USER}"></label><br>'
            '<button id="decline" type="submit" name="action" value="decline">Decline</button> '
            '<button id="continue" type="submit" name="action" value="continue">Continue</button>'
            "</form>")
    return _PAGE.format(title="Are you trying to sign in?", body=body)


# ---- `device-agent sim idp` ------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """``device-agent sim idp``: run the simulated IdP until SIGINT/SIGTERM."""
    parser = Parser(prog="device-agent sim idp",
                    description="Simulated Entra ID (device code flow) on loopback HTTPS.")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=port, default=0, help="port (default: any free port)")
    parser.add_argument("--tls-dir", default=None,
                        help="directory for the CA and server cert (created or reused; default: temp dir)")
    parser.add_argument("--auto-approve", type=float, default=None, metavar="S",
                        help="approve every code S seconds after it was issued")
    parser.add_argument("--tenant", default="simtenant")
    parser.add_argument("--client-id", default=None, help="accept only this client id (default: any)")
    parser.add_argument("--certificate", action="append", default=[], metavar="PEM",
                        help="register this certificate on the app (auth.flow = \"client_certificate\"); "
                             "repeatable")
    parser.add_argument("--block-device-code", action="store_true",
                        help="answer every device code request with AADSTS53003 (Conditional Access)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if not is_loopback_host(args.host):
        sys.stderr.write(f"sim idp: refusing to listen on {args.host!r}: the simulated IdP issues "
                         "tokens without passwords and binds to loopback only (127.0.0.1, ::1, localhost)\n")
        return EXIT_CONFIG
    if not logging.getLogger().handlers:
        from agent import logs

        logs.setup("info")
    tls_dir = Path(args.tls_dir) if args.tls_dir else Path(tempfile.mkdtemp(prefix="device-agent-idp-"))
    tls = make_tls(tls_dir)
    idp = SimIdp(tls, host=args.host, port=args.port, tenant=args.tenant, client_id=args.client_id)
    idp.auto_approve_after_s = args.auto_approve
    idp.set(device_code_blocked=args.block_device_code)
    for pem in args.certificate:
        try:
            idp.register_certificate(Path(pem).read_bytes(), args.client_id)
        except (OSError, ValueError) as err:
            sys.stderr.write(f"sim idp: --certificate {pem}: {getattr(err, 'strerror', None) or err}\n")
            return EXIT_CONFIG
    try:
        idp.start()
    except OSError as err:
        sys.stderr.write(f"sim idp: cannot listen on {args.host}:{args.port}: {err}\n")
        return 1
    stop = threading.Event()

    restore = relay_signals((signal.SIGINT, signal.SIGTERM), lambda _signum: stop.set())
    try:
        sys.stdout.write(_banner(idp, tls, args.client_id))
        sys.stdout.flush()
        while not stop.wait(0.5):
            pass
    finally:
        restore()
        idp.stop()
    return 0


def _banner(idp: SimIdp, tls: TlsFiles, client_id: str | None) -> str:
    approve = (f"every code is approved {idp.auto_approve_after_s:g} s after issue"
               if idp.auto_approve_after_s is not None
               else "open it in a browser that trusts the CA file below to approve codes")
    return (
        "Simulated Entra ID — loopback only, for testing; it signs anyone in without a password.\n"
        f"  authority:  {idp.authority}\n"
        f"  issuer:     {idp.issuer}\n"
        f"  sign-in:    {idp.devicelogin_url}  ({approve})\n"
        f"  CA file:    {tls.ca_file}\n"
        "Config snippet:\n"
        "  [auth]\n"
        f'  client_id = "{client_id or "sim-device-agent"}"\n'
        f'  authority = "{idp.authority}"\n'
        '  scopes = ["api://telemetry/Readings.Write"]\n'
        "  instance_discovery = false\n"
        f'  ca_file = "{tls.ca_file}"\n'
        "Press Ctrl-C to stop.\n"
    )
