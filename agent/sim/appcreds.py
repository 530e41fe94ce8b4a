"""Entra ID's client-credentials grant with a certificate (``private_key_jwt``, RFC 7523), simulated.

The simulated IdP (``agent.sim.idp``) hands ``grant_type=client_credentials`` requests here. The
``client_assertion`` JWT is checked the way Entra checks it: RS256 or PS256; an ``x5t`` (SHA-1)
or ``x5t#S256`` (SHA-256) header naming a certificate registered on the app (or, with an ``x5c``
chain, a subject + issuer the app trusts: Entra's "SNI" registrations); the signature; ``aud`` =
the token endpoint; ``iss`` = ``sub`` = the client id; ``exp`` in the future and at most 10
minutes ahead; a ``jti`` not seen before. Failures answer with Entra's AADSTS codes and texts.

On replays the simulation is stricter than Entra by default (``reject_replays``): Entra accepts
one assertion again while it is valid (msal-python and older msal4j reuse theirs for 9-10
minutes), but OpenID Connect Core §9 says a ``jti`` is single-use and certified providers (npm
oidc-provider) refuse a replay, so the agent is tested against the strict kind.

Which scopes: a client-credentials request must ask for ``<resource>/.default`` (AADSTS1002012
otherwise); the access token then carries the application permissions an admin consented to as
``roles`` (no ``scp``), and no refresh token, id token or client_info, as Entra does.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MAX_ASSERTION_AHEAD_S = 600       # Entra: an assertion may be valid for 10 minutes at most
CLOCK_SKEW_S = 30                 # tolerance for the device's and the IdP's clocks
ALGORITHMS = ("RS256", "PS256")
_DOC = "Review the documentation at https://learn.microsoft.com/entra/identity-platform/certificate-credentials ."

# AADSTS code -> (OAuth error, extra fields, description template), merged into the IdP's table.
# Texts follow what Entra answers (seen in public bug reports). Entra does not refuse replays
# (see the module docstring), so the generic "error validating credentials" code stands in.
ASSERTION_ERRORS: dict[int, tuple[str, dict[str, str], str]] = {
    700027: ("invalid_client", {},
             "Client assertion contains an invalid signature. [Reason - {reason}, Thumbprint of key "
             "used by client: '{thumbprint}'{found}, Please visit the Azure Portal, Graph Explorer or "
             "directly use MS Graph to see configured keys for app Id '{client}'.]"),
    700024: ("invalid_client", {},
             "Client assertion is not within its valid time range. Current time: {now}, assertion "
             "valid from {valid_from}, expiry time of assertion {expiry}. " + _DOC),
    700023: ("invalid_client", {},
             "Client assertion audience claim does not match Realm issuer. " + _DOC),
    700021: ("invalid_client", {},
             "Client assertion application identifier doesn't match 'client_id' parameter. " + _DOC),
    7000215: ("invalid_client", {},
              "Invalid client secret provided. Ensure the secret being sent in the request is the "
              "client secret value, not the client secret ID, for a secret added to app '{client}'."),
    5002738: ("invalid_client", {},
              "Invalid JWT token. '{alg}' is not a supported signature algorithm. Supported signing "
              "algorithms are: 'RS256, PS256'"),
    50027: ("invalid_client", {}, "JWT token is invalid or malformed. {why}"),
    70002: ("invalid_client", {},
            "Error validating credentials. The client assertion with jti '{jti}' was already used."),
    1002012: ("invalid_scope", {},
              "The provided value for scope {scope} is not valid. Client credential flows must have "
              "a scope value with /.default suffixed to the resource identifier (application ID URI)."),
}


class AssertionRecord(NamedTuple):
    """One client assertion the IdP examined (tests count them: a restart must not send one)."""

    jti: str | None
    alg: str | None
    thumbprint_header: str | None    # "x5t" | "x5t#S256" | None
    x5c: bool
    accepted: bool
    aadsts: int | None


@dataclass(frozen=True)
class RegisteredCertificate:
    """A certificate uploaded to an app registration ("Certificates & secrets")."""

    client_id: str
    certificate: x509.Certificate
    sha1: bytes
    sha256: bytes

    @property
    def thumbprint(self) -> str:
        """What the Entra portal shows: the SHA-1 thumbprint in upper-case hex."""
        return self.sha1.hex().upper()


@dataclass(frozen=True)
class TrustedSubject:
    """An SNI registration: any certificate with this subject issued by this CA (sent as x5c)."""

    client_id: str
    subject: str                      # RFC 4514, e.g. "CN=greenhouse-01"
    issuer: x509.Certificate


class AssertionRefused(Exception):  # noqa: N818 - an Entra refusal, not a bug
    """Raised by :meth:`AppCredentials.check`; the IdP turns it into an Entra error answer."""

    def __init__(self, aadsts: int, **fmt: str) -> None:
        super().__init__(aadsts)
        self.aadsts, self.fmt = aadsts, fmt


@dataclass
class AppCredentials:
    """The certificates the tenant knows per app, and the assertion checks."""

    token_url: Callable[[], str]
    wall_clock: Callable[[], float] = time.time
    certificates: list[RegisteredCertificate] = field(default_factory=list)
    trusted_subjects: list[TrustedSubject] = field(default_factory=list)
    app_roles: dict[str, tuple[str, ...]] = field(default_factory=dict)  # client id -> consented roles
    assertions: list[AssertionRecord] = field(default_factory=list)
    reject_replays: bool = True       # a jti seen before is refused (False: as Entra does)
    _seen_jti: dict[str, float] = field(default_factory=dict)            # jti -> its exp
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def register(self, client_id: str, certificate_pem: bytes | str) -> RegisteredCertificate:
        """Upload the first certificate of ``certificate_pem`` to ``client_id``'s registration."""
        data = certificate_pem.encode() if isinstance(certificate_pem, str) else certificate_pem
        cert = x509.load_pem_x509_certificate(data)
        reg = RegisteredCertificate(client_id, cert, cert.fingerprint(hashes.SHA1()),  # noqa: S303 - x5t is SHA-1 by definition
                                    cert.fingerprint(hashes.SHA256()))
        with self._lock:
            self.certificates.append(reg)
        return reg

    def accepted_assertions(self) -> int:
        with self._lock:
            return sum(1 for a in self.assertions if a.accepted)

    def check(self, form: dict[str, str], client_id: str) -> None:
        """Verify the request's client authentication; records every assertion examined.

        Raises:
            AssertionRefused: with Entra's AADSTS code for what is wrong.
        """
        if form.get("client_secret"):
            raise AssertionRefused(7000215, client=client_id)
        assertion = form.get("client_assertion", "")
        if not assertion:
            raise AssertionRefused(7000218)
        if form.get("client_assertion_type") != CLIENT_ASSERTION_TYPE:
            raise AssertionRefused(50027, why="client_assertion_type must be " + CLIENT_ASSERTION_TYPE)
        record: dict[str, Any] = {"jti": None, "alg": None, "thumbprint_header": None, "x5c": False}
        try:
            self._check_assertion(assertion, client_id, record)
        except AssertionRefused as err:
            self._record(record, False, err.aadsts)
            raise
        self._record(record, True, None)

    def roles_for(self, client_id: str) -> tuple[str, ...]:
        return self.app_roles.get(client_id, ())

    # ---- internals ---------------------------------------------------------------------------

    def _record(self, record: dict[str, Any], accepted: bool, aadsts: int | None) -> None:
        with self._lock:
            self.assertions.append(AssertionRecord(accepted=accepted, aadsts=aadsts, **record))
            if len(self.assertions) > 10000:
                del self.assertions[:5000]

    def _check_assertion(self, assertion: str, client_id: str, record: dict[str, Any]) -> None:
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError as err:
            raise AssertionRefused(50027, why=f"({type(err).__name__})") from err
        alg = str(header.get("alg") or "")
        record["alg"] = alg
        record["x5c"] = bool(header.get("x5c"))
        if alg not in ALGORITHMS:
            raise AssertionRefused(5002738, alg=alg[:20])
        if header.get("x5t#S256"):
            record["thumbprint_header"] = "x5t#S256"
            digest, want = _b64decode(header["x5t#S256"]), "sha256"
        elif header.get("x5t"):
            record["thumbprint_header"] = "x5t"
            digest, want = _b64decode(header["x5t"]), "sha1"
        else:
            raise AssertionRefused(50027, why="No certificate thumbprint specified in token header.")
        shown = digest.hex().upper() if digest else str(header.get("x5t#S256") or header.get("x5t"))[:64]
        cert = self._find_certificate(client_id, digest, want, header.get("x5c"), shown)
        now = self.wall_clock()
        not_before = cert.not_valid_before_utc.timestamp()
        not_after = cert.not_valid_after_utc.timestamp()
        if not not_before <= now <= not_after:
            found = f", Found key 'Start={_us_time(not_before)}, End={_us_time(not_after)}'"
            raise AssertionRefused(700027, reason="The key used is expired.", thumbprint=shown,
                                  found=found, client=client_id)
        try:
            claims = jwt.decode(assertion, cert.public_key(), algorithms=[alg],   # type: ignore[arg-type]
                                options={"verify_exp": False, "verify_aud": False, "verify_iat": False,
                                         "verify_nbf": False})
        except jwt.InvalidSignatureError as err:
            raise AssertionRefused(700027, reason="The provided signature value did not match the "
                                  "expected signature value.", thumbprint=shown, found="",
                                  client=client_id) from err
        except jwt.PyJWTError as err:
            raise AssertionRefused(50027, why=f"({type(err).__name__})") from err
        record["jti"] = str(claims.get("jti")) if claims.get("jti") else None
        if claims.get("aud") != self.token_url():
            raise AssertionRefused(700023)
        if claims.get("iss") != client_id or claims.get("sub") != client_id:
            raise AssertionRefused(700021)
        exp, nbf = claims.get("exp"), claims.get("nbf", claims.get("iat"))
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise AssertionRefused(50027, why="The assertion has no exp claim.")
        start = nbf if isinstance(nbf, int | float) and not isinstance(nbf, bool) else 0
        if (now > exp + CLOCK_SKEW_S or exp - now > MAX_ASSERTION_AHEAD_S + CLOCK_SKEW_S
                or start - now > CLOCK_SKEW_S):
            raise AssertionRefused(700024, now=_iso7(now), valid_from=_iso7(start), expiry=_iso7(exp))
        jti = record["jti"]
        if not jti:
            raise AssertionRefused(50027, why="The assertion has no jti claim.")
        with self._lock:
            for old in [j for j, e in self._seen_jti.items() if e + CLOCK_SKEW_S < now]:
                del self._seen_jti[old]
            if jti in self._seen_jti and self.reject_replays:
                raise AssertionRefused(70002, jti=jti[:64])
            self._seen_jti[jti] = float(exp)

    def _find_certificate(self, client_id: str, digest: bytes, kind: str, x5c: Any,
                          shown: str) -> x509.Certificate:
        with self._lock:
            for reg in self.certificates:
                if reg.client_id == client_id and digest == (reg.sha256 if kind == "sha256" else reg.sha1):
                    return reg.certificate
            subjects = [t for t in self.trusted_subjects if t.client_id == client_id]
        if subjects and isinstance(x5c, list) and x5c:
            leaf = _leaf(x5c)
            if leaf is not None:
                fingerprint = leaf.fingerprint(hashes.SHA256() if kind == "sha256" else hashes.SHA1())  # noqa: S303
                for trusted in subjects:
                    if (fingerprint == digest and leaf.subject.rfc4514_string() == trusted.subject
                            and _issued_by(leaf, trusted.issuer)):
                        return leaf
        raise AssertionRefused(700027, reason="The key was not found.", thumbprint=shown, found="",
                              client=client_id)


def issue_app_token(sign: Callable[[dict[str, Any]], str], *, issuer: str, tenant_id: str,
                    client_id: str, scopes: Sequence[str], roles: Sequence[str], lifetime_s: int,
                    wall_clock: Callable[[], float] = time.time) -> dict[str, Any]:
    """The token answer of a client-credentials grant: an app-only access token and nothing else.

    Raises:
        AssertionRefused: AADSTS1002012 unless exactly one ``<resource>/.default`` scope is asked.
    """
    resource_scopes = [s for s in scopes if s not in ("openid", "profile", "offline_access", "email")]
    if len(resource_scopes) != 1 or not resource_scopes[0].endswith("/.default"):
        raise AssertionRefused(1002012, scope=" ".join(scopes)[:200])
    aud = resource_scopes[0][: -len("/.default")]
    now = int(wall_clock())
    oid = hashlib.sha256(f"sp:{tenant_id}:{client_id}".encode()).hexdigest()
    claims: dict[str, Any] = {
        "aud": aud, "iss": issuer, "iat": now, "nbf": now, "exp": now + lifetime_s,
        "azp": client_id, "azpacr": "2",     # 2 = certificate (1 = secret)
        "idtyp": "app", "oid": f"{oid[:8]}-{oid[8:12]}-{oid[12:16]}-{oid[16:20]}-{oid[20:32]}",
        "sub": client_id, "tid": tenant_id, "uti": secrets.token_urlsafe(16), "ver": "2.0",
    }
    if roles:
        claims["roles"] = list(roles)
    return {"token_type": "Bearer", "expires_in": lifetime_s, "ext_expires_in": lifetime_s,
            "access_token": sign(claims)}


def _b64decode(value: Any) -> bytes:
    if not isinstance(value, str):
        return b""
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        return b""


def _leaf(x5c: list[Any]) -> x509.Certificate | None:
    try:
        return x509.load_der_x509_certificate(base64.b64decode(str(x5c[0])))
    except (ValueError, binascii.Error):
        return None


def _issued_by(leaf: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        leaf.verify_directly_issued_by(issuer)
    except Exception:  # noqa: BLE001 - InvalidSignature, ValueError, TypeError: not issued by it
        return False
    return True


def _iso7(wall: float) -> str:
    """Entra's timestamps in AADSTS700024: 2024-10-02T22:05:03.6755165Z."""
    dt = datetime.fromtimestamp(wall, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond:06d}0Z"


def _us_time(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).strftime("%m/%d/%Y %H:%M:%S")


class CertificateFiles(NamedTuple):
    certificate_file: Path
    private_key_file: Path
    pem: bytes          # the certificate, for SimIdp.register_certificate


def make_certificate(directory: Path, common_name: str, *, valid_days: float = 365,
                     not_before: datetime | None = None, name: str = "device",
                     issuer: tuple[x509.Certificate, rsa.RSAPrivateKey] | None = None) -> CertificateFiles:
    """A throwaway RSA certificate + key (what ``openssl req -x509`` in the README makes), for
    the demo and the tests. The key file is written 0600. ``issuer`` (cert, key) signs it
    instead of itself, and the chain file then holds the issuer too (SNI registrations)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    start = not_before or datetime.now(UTC) - timedelta(minutes=5)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    signer_name, signer_key = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(signer_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + timedelta(days=valid_days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(signer_key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    chain = pem + (issuer[0].public_bytes(serialization.Encoding.PEM) if issuer else b"")
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(chain)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    return CertificateFiles(cert_path, key_path, pem)


def make_ca(common_name: str = "device-agent fleet CA") -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """A throwaway issuing CA for SNI (subject name + issuer) tests."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = datetime.now(UTC) - timedelta(minutes=5)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(start + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key
