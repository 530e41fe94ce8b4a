"""Signing keys for the simulated world: an RSA key, its JWKS, ``mint(claims)``, and the verifier
the simulated API and Graph use for bearer tokens (real RS256 checks with PyJWT).

The simulated IdP (agent/sim/idp.py) is the usual issuer; ``SimKeys`` lets the API be tested
without a sign-in, and ``TokenVerifier`` accepts either a JWKS URL (fetched over HTTPS with the
test CA) or a static JWKS document.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from agent.sim.server import JsonHandler, LoopbackHTTPSServer
from agent.sim.tls import TlsFiles


class SimKeys:
    """One RSA signing key with a ``kid``; ``jwks()`` is the public half."""

    def __init__(self, *, issuer: str = "https://127.0.0.1/simtenant/v2.0",
                 audience: str = "api://telemetry", scope: str = "Readings.Write") -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = uuid.uuid4().hex[:16]
        self.issuer = issuer
        self.audience = audience
        self.scope = scope

    def jwks(self) -> dict[str, Any]:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        jwk.update({"kid": self.kid, "use": "sig", "alg": "RS256"})
        return {"keys": [jwk]}

    def mint(self, claims: dict[str, Any] | None = None, *, ttl_s: float = 3600) -> str:
        """An RS256 access token; ``claims`` override the defaults (iss, aud, scp, sub, exp…)."""
        now = int(time.time())
        body: dict[str, Any] = {"iss": self.issuer, "aud": self.audience, "scp": self.scope,
                                "sub": "sim-user", "iat": now, "nbf": now, "exp": now + int(ttl_s),
                                "jti": uuid.uuid4().hex}
        body.update(claims or {})
        return jwt.encode(body, self.key, algorithm="RS256", headers={"kid": self.kid})

    def serve(self, tls: TlsFiles) -> JwksServer:
        """Serve ``jwks()`` at ``/jwks`` over HTTPS on loopback (a stand-in for the IdP's)."""
        return JwksServer(self, tls).start()


class JwksServer:
    def __init__(self, keys: SimKeys, tls: TlsFiles) -> None:
        doc = keys.jwks()

        class Handler(JsonHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server naming
                if self.path.split("?")[0] == "/jwks":
                    self.send_json(200, doc)
                else:
                    self.send_json(404, {"error": "not_found"})

        self.server = LoopbackHTTPSServer("127.0.0.1", 0, Handler, tls)

    @property
    def url(self) -> str:
        return self.server.base_url + "/jwks"

    def start(self) -> JwksServer:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()


@dataclass(frozen=True)
class Verdict:
    """``status`` 0 = valid; 401 / 403 with the ``WWW-Authenticate`` value and a reason."""

    status: int
    reason: str = ""
    claims: dict[str, Any] | None = None

    @property
    def www_authenticate(self) -> str:
        if self.status == 401:
            return f'Bearer error="invalid_token", error_description="{self.reason}"'
        if self.status == 403:
            return f'Bearer error="insufficient_scope", error_description="{self.reason}"'
        return ""


class TokenVerifier:
    """RS256 bearer-token checks against a JWKS URL (fetched lazily, refetched on an unknown kid)
    or a static JWKS document."""

    def __init__(self, *, jwks_url: str | None = None, jwks: dict[str, Any] | None = None,
                 issuer: str | None = None, audience: str | None = None,
                 required_scope: str | None = None, ca_file: str | None = None) -> None:
        if not jwks_url and not jwks:
            raise ValueError("TokenVerifier needs jwks_url or jwks")
        self.issuer = issuer
        self.audience = audience
        self.required_scope = required_scope
        self._lock = threading.Lock()
        self._static = jwt.PyJWKSet.from_dict(jwks) if jwks else None
        self._client = None
        if jwks_url:
            ctx = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
            self._client = jwt.PyJWKClient(jwks_url, cache_keys=True, ssl_context=ctx, timeout=10)

    def check(self, authorization: str | None) -> Verdict:
        if not authorization or not authorization.startswith("Bearer "):
            return Verdict(401, "missing bearer token")
        token = authorization[len("Bearer "):].strip()
        try:
            key = self._key(token)
            options: Any = {"require": ["exp"], "verify_aud": self.audience is not None}
            claims = jwt.decode(token, key, algorithms=["RS256"], audience=self.audience,
                                issuer=self.issuer, options=options, leeway=5)
        except jwt.ExpiredSignatureError:
            return Verdict(401, "the token has expired")
        except (jwt.PyJWTError, KeyError, ValueError) as err:
            return Verdict(401, f"invalid token: {type(err).__name__}")
        if self.required_scope:
            granted = str(claims.get("scp") or claims.get("scope") or "").split()
            roles = claims.get("roles")     # app-only tokens carry application permissions here
            granted += [str(r) for r in roles] if isinstance(roles, list) else []
            if not any(g == self.required_scope or g.endswith("/" + self.required_scope) for g in granted):
                return Verdict(403, f"the token lacks scope {self.required_scope}", claims)
        return Verdict(0, "", claims)

    def _key(self, token: str) -> Any:
        if self._static is not None:
            kid = jwt.get_unverified_header(token).get("kid")
            for k in self._static.keys:
                if kid is None or k.key_id == kid:
                    return k.key
            raise KeyError("unknown kid")
        if self._client is None:
            raise KeyError("no JWKS")
        with self._lock:
            return self._client.get_signing_key_from_jwt(token).key
