"""auth.flow = "client_certificate": the real msal confidential client against the simulated
Entra ID over HTTPS (agent/sim/idp.py checks every client assertion as Entra does).

What people notice: the box signs in as an app without any code, the API accepts the token,
a restart costs no new sign-in, a 401 gets a fresh token, a wrong certificate is an error that
says which, a key file others can read is refused, and an expiring certificate warns.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests

from agent import config
from agent.clock import ClockTrust
from agent.config import AuthSettings, private_file_problem
from agent.errors import ConfigError
from agent.signin.authenticator import Timing
from agent.signin.certificate import (
    CertificateAuthenticator,
    CredentialError,
    load_credential,
    make_assertion,
)
from agent.sim.appcreds import (
    CLIENT_ASSERTION_TYPE,
    CertificateFiles,
    TrustedSubject,
    make_ca,
    make_certificate,
)
from agent.sim.idp import SimIdp
from agent.sim.jwks import TokenVerifier
from agent.sim.tls import TlsFiles
from agent.state import AgentState
from tests.waiting import wait_until

CLIENT = "sim-device-agent"
APP_SCOPE = "api://telemetry/.default"
FAST = Timing(backoff_initial_s=0.1, backoff_max_s=0.8, config_backoff_initial_s=0.3,
              config_backoff_max_s=1.2, wait_slice_s=0.05)


@pytest.fixture
def cert(tmp_path: Path) -> CertificateFiles:
    return make_certificate(tmp_path / "cert", "greenhouse-01")


@pytest.fixture
def registered(idp: SimIdp, cert: CertificateFiles) -> CertificateFiles:
    """The certificate uploaded to the app registration, Readings.Write granted (admin consent)."""
    idp.register_certificate(cert.pem, CLIENT, roles=("Readings.Write",))
    return cert


def app_settings(idp: SimIdp, tls: TlsFiles, cert: CertificateFiles, **kw: Any) -> AuthSettings:
    base = AuthSettings(client_id=CLIENT, scopes=(APP_SCOPE,), authority=idp.authority,
                        instance_discovery=False, ca_file=str(tls.ca_file), timeout_s=10.0,
                        flow="client_certificate", certificate_file=str(cert.certificate_file),
                        private_key_file=str(cert.private_key_file))
    return dataclasses.replace(base, **kw)


class Running:
    """A CertificateAuthenticator in its thread."""

    def __init__(self, settings: AuthSettings, cache: Path, **kw: Any) -> None:
        self.state = AgentState()
        self.auth = CertificateAuthenticator(settings, cache, self.state, device_id="greenhouse-01",
                                             timing=FAST, **kw)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.auth.run, args=(self.stop_event,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(5)
        assert not self.thread.is_alive(), "run() must return on stop"


@pytest.fixture
def running() -> Iterator[Any]:
    started: list[Running] = []

    def start(settings: AuthSettings, cache: Path, **kw: Any) -> Running:
        r = Running(settings, cache, **kw)
        started.append(r)
        return r

    yield start
    for r in started:
        r.stop()


def SYNCED() -> ClockTrust:  # noqa: N802 - reads as a constant at the call sites
    """The box's clock is synchronized (the kernel says so): expiry is judged here."""
    return ClockTrust(kernel=lambda: True, boot_id="b")


def accepted(idp: SimIdp) -> int:
    return idp.app_credentials.accepted_assertions()


# ---- sign-in -------------------------------------------------------------------------------------

def test_signs_in_as_the_app_without_any_code(idp: SimIdp, tls: TlsFiles, registered: CertificateFiles,
                                                tmp_path: Path, running: Any) -> None:
    r = running(app_settings(idp, tls, registered), tmp_path / "cache.json")
    snap = wait_until(lambda: r.state.snapshot.phase == "signed_in" and r.state.snapshot, 10, "sign-in")
    assert snap.account == f"app {CLIENT}" and snap.code is None and snap.error is None
    assert not [q for q in idp.requests if q.path.endswith("/devicecode")], "no device code asked"
    # Entra's modern shape: PS256, SHA-256 thumbprint, no chain unless asked.
    (record,) = idp.app_credentials.assertions
    assert (record.alg, record.thumbprint_header, record.x5c, record.accepted) == ("PS256", "x5t#S256",
                                                                                   False, True)
    token = r.auth.access_token()
    assert token is not None
    # What the API sees: an app-only token with the application permission as a role.
    verdict = TokenVerifier(jwks=idp.public_jwks(), issuer=idp.issuer, audience="api://telemetry",
                            required_scope="Readings.Write").check(f"Bearer {token}")
    assert verdict.status == 0, verdict
    assert verdict.claims["idtyp"] == "app" and verdict.claims["roles"] == ["Readings.Write"]
    assert "scp" not in verdict.claims
    assert r.auth.request_new_code() is False


def test_restart_reuses_the_cached_token_without_a_new_assertion(idp: SimIdp, tls: TlsFiles,
                                                                  registered: CertificateFiles,
                                                                  tmp_path: Path, running: Any) -> None:
    settings = app_settings(idp, tls, registered)
    cache = tmp_path / "state" / "token_cache.json"
    cache.parent.mkdir(mode=0o700)
    first = running(settings, cache)
    wait_until(lambda: first.state.snapshot.phase == "signed_in", 10, "first sign-in")
    token = first.auth.access_token()
    first.stop()
    assert accepted(idp) == 1
    assert oct(cache.stat().st_mode & 0o777) == "0o600"
    assert token is not None and '"AccessToken"' in cache.read_text()

    again = running(settings, cache)       # the box restarted
    wait_until(lambda: again.state.snapshot.phase == "signed_in", 10, "signed in after restart")
    assert again.auth.access_token() == token
    assert accepted(idp) == 1, "a cached token must not cost a new assertion"
    assert again.auth.assertions_signed == 0

    # Only when needed: the API refused it -> one new assertion, a new token.
    fresh = again.auth.token_rejected()
    assert fresh is not None and fresh != token
    assert accepted(idp) == 2


def test_401_gets_a_fresh_token_each_time_never_a_replayed_assertion(idp: SimIdp, tls: TlsFiles,
                                                                       registered: CertificateFiles,
                                                                       tmp_path: Path) -> None:
    """msal's own certificate credential reuses one assertion for 9 minutes; an IdP that refuses
    replays would reject the second refresh. Each request here carries a new jti."""
    auth = CertificateAuthenticator(app_settings(idp, tls, registered), tmp_path / "c.json", AgentState(),
                                    device_id="d", timing=FAST)
    first = auth.access_token()
    second = auth.token_rejected()
    auth._forced_token = None          # a later, unrelated 401 (not "fresh token refused")
    third = auth.token_rejected()
    assert None not in (first, second, third) and len({first, second, third}) == 3
    records = idp.app_credentials.assertions
    assert [a.accepted for a in records] == [True, True, True]
    assert len({a.jti for a in records}) == 3


def test_a_fresh_token_refused_too_says_so_and_backs_off(idp: SimIdp, tls: TlsFiles,
                                                          registered: CertificateFiles, tmp_path: Path) -> None:
    state = AgentState()
    auth = CertificateAuthenticator(app_settings(idp, tls, registered), tmp_path / "c.json", state,
                                    device_id="d", timing=FAST)
    auth.access_token()
    fresh = auth.token_rejected()
    assert fresh is not None
    assert auth.token_rejected() is None          # the fresh one was refused as well
    assert accepted(idp) == 2, "no hammering: the next try is backed off"
    assert auth.access_token() == fresh           # the uploader knows it is refused and waits
    wait_until(lambda: auth.access_token() not in (None, fresh), 5, "a new token after the back-off")
    assert accepted(idp) == 3


def test_send_certificate_chain_for_a_subject_name_issuer_registration(idp: SimIdp, tls: TlsFiles,
                                                                        tmp_path: Path) -> None:
    ca = make_ca()
    files = make_certificate(tmp_path / "sni", "greenhouse-01", issuer=ca)
    idp.app_credentials.trusted_subjects.append(TrustedSubject(CLIENT, "CN=greenhouse-01", ca[0]))
    idp.app_credentials.app_roles[CLIENT] = ("Readings.Write",)
    without = CertificateAuthenticator(app_settings(idp, tls, files), tmp_path / "a.json", AgentState(),
                                       device_id="d", timing=FAST)
    assert without.access_token() is None          # the thumbprint alone is unknown to the app
    assert idp.app_credentials.assertions[-1].aadsts == 700027
    with_chain = CertificateAuthenticator(app_settings(idp, tls, files, send_certificate_chain=True),
                                          tmp_path / "b.json", AgentState(), device_id="d", timing=FAST)
    assert with_chain.access_token() is not None
    assert idp.app_credentials.assertions[-1].x5c is True


# ---- errors that say which -----------------------------------------------------------------------

def sign_in_error(settings: AuthSettings, cache: Path, running: Any, **kw: Any) -> str:
    r = running(settings, cache, **kw)
    snap = wait_until(lambda: r.state.snapshot.error and r.state.snapshot, 10, "an error")
    assert snap.phase == "error" and snap.account is None
    return str(snap.error)


def test_certificate_unknown_to_the_app_registration(idp: SimIdp, tls: TlsFiles, cert: CertificateFiles,
                                                     tmp_path: Path, running: Any) -> None:
    error = sign_in_error(app_settings(idp, tls, cert), tmp_path / "c.json", running)
    assert error == ("The app registration does not know this certificate (AADSTS700027): upload "
                     "auth.certificate_file to it (README)")


def test_certificate_expired_at_the_idp(tls: TlsFiles, cert: CertificateFiles, tmp_path: Path,
                                        running: Any) -> None:
    """The IdP's clock is past the certificate's end (the box's clock is behind)."""
    later = SimIdp(tls, client_id=CLIENT, wall_clock=lambda: time.time() + 400 * 86400).start()
    try:
        later.register_certificate(cert.pem, CLIENT)
        error = sign_in_error(app_settings(later, tls, cert), tmp_path / "c.json", running)
    finally:
        later.stop()
    assert error.startswith("The IdP says the registered certificate expired (AADSTS700027)")
    from agent.signin.aadsts import explain

    assert explain("invalid_client", "AADSTS700027: [Reason - The key used is expired.]", [700027],
                   flow="client_certificate").panel == "Certificate expired (IdP): renew it (README)"


def test_certificate_expired_here_is_not_even_sent(idp: SimIdp, tls: TlsFiles, tmp_path: Path,
                                                   running: Any) -> None:
    old = make_certificate(tmp_path / "old", "greenhouse-01", valid_days=30,
                           not_before=datetime.now(UTC) - timedelta(days=40))
    idp.register_certificate(old.pem, CLIENT)
    error = sign_in_error(app_settings(idp, tls, old), tmp_path / "c.json", running, trust=SYNCED())
    day = (datetime.now(UTC) - timedelta(days=10)).strftime("%Y-%m-%d")
    assert error == (f"The certificate in auth.certificate_file expired on {day}: create a new one "
                     "and upload it to the app registration (README)")
    assert idp.app_credentials.assertions == [], "an expired certificate is not offered to the IdP"


def test_certificate_expired_with_an_unsynchronized_clock_says_expired_on_its_date(
        idp: SimIdp, tls: TlsFiles, tmp_path: Path, running: Any) -> None:
    """A Pi without RTC: this box cannot judge the certificate, so it asks the IdP, which
    refuses it (AADSTS700027, key expired); its answer's Date tells the time, and the error the
    panel, status and MQTT show says the certificate expired, and on which day."""
    old = make_certificate(tmp_path / "old", "greenhouse-01", valid_days=30,
                           not_before=datetime.now(UTC) - timedelta(days=40))
    idp.register_certificate(old.pem, CLIENT)
    unsynced = ClockTrust(kernel=lambda: False, boot_id="b")
    r = running(app_settings(idp, tls, old), tmp_path / "c.json", trust=unsynced)
    snap = wait_until(lambda: r.state.snapshot.error and r.state.snapshot, 10, "an error")
    day = (datetime.now(UTC) - timedelta(days=10)).strftime("%Y-%m-%d")
    assert snap.error == (f"The certificate in auth.certificate_file expired on {day}: create a new one "
                          "and upload it to the app registration (README)")
    assert snap.status_payload("1")["error"] == snap.error and snap.phase == "error"
    assert snap.error_panel == f"Certificate expired on {day}: renew it (README)"     # fits 128x64
    assert [a.aadsts for a in idp.app_credentials.assertions] == [700027], "asked the IdP once, refused"


def test_assertion_outside_its_time_means_the_clock(tls: TlsFiles, tmp_path: Path, running: Any) -> None:
    """An IdP whose checks run an hour ahead of the time its Date headers tell: nothing the box
    can correct, so the refusal stays, and says where to look."""
    ahead = SimIdp(tls, client_id=CLIENT, wall_clock=lambda: time.time() + 3600).start()
    try:
        files = make_certificate(tmp_path / "c", "greenhouse-01")
        ahead.register_certificate(files.pem, CLIENT)
        error = sign_in_error(app_settings(ahead, tls, files), tmp_path / "c.json", running)
    finally:
        ahead.stop()
    assert error == ("The IdP says the client assertion is outside its valid time (AADSTS700024): "
                     "check the device clock (NTP): retrying")


def test_a_box_clock_hours_behind_is_corrected_by_the_idps_date(idp: SimIdp, tls: TlsFiles, tmp_path: Path,
                                                                running: Any) -> None:
    """No RTC, no NTP yet: the clock says 3 h ago. The discovery answer's Date header gives the
    time before the first assertion is signed, so the first one is accepted."""
    files = make_certificate(tmp_path / "c", "greenhouse-01")
    idp.register_certificate(files.pem, CLIENT)
    trust = ClockTrust(wall=lambda: time.time() - 3 * 3600, kernel=lambda: False, boot_id="b")
    r = running(app_settings(idp, tls, files), tmp_path / "c.json", trust=trust)
    wait_until(lambda: r.state.snapshot.phase == "signed_in", 10, "sign-in with a corrected clock")
    assert [a.accepted for a in idp.app_credentials.assertions] == [True]


def test_a_stale_synchronized_flag_costs_one_refused_assertion(idp: SimIdp, tls: TlsFiles, tmp_path: Path,
                                                               running: Any) -> None:
    """The kernel says synchronized but the clock is an hour off: two servers' answers outweigh
    it (agent/clock.py), so the retry after the first refusal is signed with the right time."""
    files = make_certificate(tmp_path / "c", "greenhouse-01", not_before=datetime.now(UTC) - timedelta(days=1))
    idp.register_certificate(files.pem, CLIENT)
    trust = ClockTrust(wall=lambda: time.time() - 3600, kernel=lambda: True, boot_id="b")
    r = running(app_settings(idp, tls, files), tmp_path / "c.json", trust=trust)
    wait_until(lambda: r.state.snapshot.phase == "signed_in", 10, "signed in after one refusal")
    assert [a.aadsts for a in idp.app_credentials.assertions] == [700024, None]


def test_delegated_scope_refused_by_the_idp_says_default(idp: SimIdp, tls: TlsFiles,
                                                         registered: CertificateFiles, tmp_path: Path,
                                                         running: Any) -> None:
    settings = app_settings(idp, tls, registered, scopes=("api://telemetry/Readings.Write",))
    error = sign_in_error(settings, tmp_path / "c.json", running)
    assert error.startswith('App-only sign-in needs a scope "<resource>/.default" (AADSTS1002012)')


def test_conditional_access_on_the_app(idp: SimIdp, tls: TlsFiles, registered: CertificateFiles,
                                       tmp_path: Path, running: Any) -> None:
    idp.set(token_error=53003)
    error = sign_in_error(app_settings(idp, tls, registered), tmp_path / "c.json", running)
    assert "Conditional Access blocked the app's sign-in (AADSTS53003)" in error


# ---- the simulated IdP's checks, with hand-made assertions -----------------------------------------

def post_assertion(idp: SimIdp, tls: TlsFiles, assertion: str, scope: str = APP_SCOPE) -> dict[str, Any]:
    resp = requests.post(idp.token_url, data={
        "client_id": CLIENT, "grant_type": "client_credentials", "scope": scope,
        "client_assertion_type": CLIENT_ASSERTION_TYPE, "client_assertion": assertion,
    }, verify=str(tls.ca_file), timeout=10)
    return {"status": resp.status_code, **resp.json()}


def test_the_idp_refuses_each_broken_assertion_as_entra_does(idp: SimIdp, tls: TlsFiles,
                                                              registered: CertificateFiles,
                                                              tmp_path: Path) -> None:
    cred = load_credential(str(registered.certificate_file), str(registered.private_key_file))
    good = make_assertion(cred, client_id=CLIENT, token_endpoint=idp.token_url, send_chain=False)
    assert "access_token" in post_assertion(idp, tls, good)
    replay = post_assertion(idp, tls, good)
    assert replay["error_codes"] == [70002] and replay["error"] == "invalid_client"
    idp.app_credentials.reject_replays = False      # Entra itself takes it again while valid
    assert "access_token" in post_assertion(idp, tls, good)
    idp.app_credentials.reject_replays = True

    def claims_of(**override: Any) -> str:
        now = int(time.time())
        claims = {"aud": idp.token_url, "iss": CLIENT, "sub": CLIENT, "jti": os.urandom(8).hex(),
                  "nbf": now, "exp": now + 600, **override}
        header = jwt.get_unverified_header(good)
        return jwt.encode(claims, cred.private_key, algorithm="RS256",
                          headers={k: v for k, v in header.items() if k not in ("alg",)})

    now = int(time.time())
    cases = {
        700023: claims_of(aud="https://login.microsoftonline.com/other/oauth2/v2.0/token"),
        700021: claims_of(iss="someone-else"),
        700024: claims_of(exp=now - 3600),
    }
    too_long = claims_of(exp=now + 3600)
    for code, assertion in cases.items():
        body = post_assertion(idp, tls, assertion)
        assert (body["status"], body["error_codes"]) == (400, [code]), body
    assert post_assertion(idp, tls, too_long)["error_codes"] == [700024], "exp more than 10 min ahead"
    # RS256 with the SHA-1 thumbprint (x5t), as msal's PEM credential sends it, is accepted too.
    sha1 = jwt.encode({"aud": idp.token_url, "iss": CLIENT, "sub": CLIENT, "jti": "x1", "exp": now + 600},
                      cred.private_key, algorithm="RS256", headers={"x5t": _b64(bytes.fromhex(cred.thumbprint))})
    assert "access_token" in post_assertion(idp, tls, sha1)
    # Signed by another key under the registered thumbprint.
    other = make_certificate(tmp_path / "other", "intruder")
    forged_key = load_credential(str(other.certificate_file), str(other.private_key_file)).private_key
    forged = jwt.encode({"aud": idp.token_url, "iss": CLIENT, "sub": CLIENT, "jti": "x2", "exp": now + 600},
                        forged_key, algorithm="PS256", headers=jwt.get_unverified_header(good))
    body = post_assertion(idp, tls, forged)
    assert body["error_codes"] == [700027] and "signature value did not match" in body["error_description"]
    hs = jwt.encode({"aud": idp.token_url, "iss": CLIENT, "sub": CLIENT, "jti": "x3", "exp": now + 600},
                    "secret-secret-secret-secret-secret", algorithm="HS256")
    assert post_assertion(idp, tls, hs)["error_codes"] == [5002738]
    fresh = make_assertion(cred, client_id=CLIENT, token_endpoint=idp.token_url, send_chain=False)
    assert post_assertion(idp, tls, fresh, scope="api://telemetry/Readings.Write")["error_codes"] == [1002012]
    secret = requests.post(idp.token_url, data={"client_id": CLIENT, "grant_type": "client_credentials",
                                                "scope": APP_SCOPE, "client_secret": "guess"},
                           verify=str(tls.ca_file), timeout=10).json()
    assert secret["error_codes"] == [7000215]


def _b64(raw: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


# ---- expiring certificate --------------------------------------------------------------------------

def test_expiring_certificate_warns_but_works(idp: SimIdp, tls: TlsFiles, tmp_path: Path, running: Any,
                                              caplog: pytest.LogCaptureFixture) -> None:
    soon = make_certificate(tmp_path / "soon", "greenhouse-01", valid_days=12)
    idp.register_certificate(soon.pem, CLIENT)
    caplog.set_level(logging.WARNING, logger="agent.signin.certificate")
    r = running(app_settings(idp, tls, soon), tmp_path / "c.json")
    snap = wait_until(lambda: r.state.snapshot.phase == "signed_in" and r.state.snapshot.warning
                      and r.state.snapshot, 10, "signed in with a warning")
    day = (datetime.now(UTC) + timedelta(days=12) - timedelta(minutes=5)).strftime("%Y-%m-%d")
    assert snap.warning == (f"The certificate in auth.certificate_file expires on {day} (in 11 days): "
                            "renew it (README)")
    assert snap.status_payload("1")["warning"] == snap.warning
    assert snap.warning in caplog.text
    from agent.panel import screens

    assert screens.page_count(snap) == 3           # status, "signed in as app", the warning


def test_no_warning_key_while_the_certificate_is_fine(idp: SimIdp, tls: TlsFiles, registered: CertificateFiles,
                                                      tmp_path: Path, running: Any) -> None:
    r = running(app_settings(idp, tls, registered), tmp_path / "c.json")
    snap = wait_until(lambda: r.state.snapshot.phase == "signed_in" and r.state.snapshot, 10, "sign-in")
    assert snap.warning is None and "warning" not in snap.status_payload("1")


# ---- the files -------------------------------------------------------------------------------------

def raw_config(cert: CertificateFiles, **auth: Any) -> dict[str, Any]:
    return {"auth": {"client_id": CLIENT, "authority": "https://login.example/tenant",
                     "scopes": [APP_SCOPE], "flow": "client_certificate",
                     "certificate_file": str(cert.certificate_file),
                     "private_key_file": str(cert.private_key_file), **auth},
            "upload": {"url": "https://api.example/v1"}}


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o660, 0o604, 0o700])
def test_key_file_others_could_read_is_refused(cert: CertificateFiles, mode: int) -> None:
    cert.private_key_file.chmod(mode)
    with pytest.raises(ConfigError) as err:
        config.parse(raw_config(cert), Path("/etc/device-agent/config.toml"))
    assert str(err.value) == (f"/etc/device-agent/config.toml: auth.private_key_file: "
                              f"'{cert.private_key_file}' has mode {mode:04o}; a private key must be 0600 "
                              f"or 0400 (chmod 600 {cert.private_key_file})")


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_key_file_0600_or_0400_is_accepted(cert: CertificateFiles, mode: int) -> None:
    cert.private_key_file.chmod(mode)
    settings = config.parse(raw_config(cert), Path("c.toml"))
    assert settings.auth.flow == "client_certificate" and settings.auth.send_certificate_chain is False


def test_key_file_of_another_user_is_refused(cert: CertificateFiles) -> None:
    me = os.geteuid()
    if me == 0:
        os.chown(cert.private_key_file, 4242, 4242)     # someone else's key, root running
        problem = private_file_problem(cert.private_key_file, uid=999)
        assert problem is not None and "belongs to uid 4242" in problem
        assert private_file_problem(cert.private_key_file, uid=4242) is None
        os.chown(cert.private_key_file, 0, 0)
        assert private_file_problem(cert.private_key_file, uid=999) is None, "root may own it"
    else:
        problem = private_file_problem(cert.private_key_file, uid=me + 1)
        assert problem is not None and f"belongs to uid {me}" in problem


def test_delegated_scope_is_a_config_error_that_says_default(cert: CertificateFiles) -> None:
    with pytest.raises(ConfigError) as err:
        config.parse(raw_config(cert, scopes=["api://telemetry/Readings.Write"]), Path("c.toml"))
    assert str(err.value).startswith('c.toml: auth.scopes: auth.flow = "client_certificate" gets app-only '
                                     'tokens: use one "<resource>/.default" scope, e.g. '
                                     '["api://telemetry/.default"]')


def test_missing_certificate_keys_are_config_errors(cert: CertificateFiles) -> None:
    raw = raw_config(cert)
    del raw["auth"]["certificate_file"]
    with pytest.raises(ConfigError, match="auth.certificate_file: required for auth.flow"):
        config.parse(raw, Path("c.toml"))


def test_key_of_another_certificate_is_refused(cert: CertificateFiles, tmp_path: Path) -> None:
    other = make_certificate(tmp_path / "other", "other")
    with pytest.raises(CredentialError, match="does not belong to auth.certificate_file"):
        load_credential(str(cert.certificate_file), str(other.private_key_file))
    with pytest.raises(CredentialError, match="holds no PEM certificate"):
        load_credential(str(cert.private_key_file), str(cert.private_key_file))


def test_check_config_exits_78_with_one_line_for_a_readable_key(cert: CertificateFiles, tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.agentproc import write_config

    cert.private_key_file.chmod(0o644)
    path = write_config(tmp_path / "config.toml", raw_config(cert))
    proc = subprocess.run([sys.executable, "-m", "agent", "check-config", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 78
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"config error: {path}: "
                                                                   "auth.private_key_file: ")
    cert.private_key_file.chmod(0o600)
    other = make_certificate(tmp_path / "other", "other")
    path = write_config(tmp_path / "config.toml", raw_config(cert, private_key_file=str(other.private_key_file)))
    proc = subprocess.run([sys.executable, "-m", "agent", "check-config", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 78 and "does not belong to auth.certificate_file" in proc.stderr
    assert "Traceback" not in proc.stderr
    soon = make_certificate(tmp_path / "soon", "greenhouse-01", valid_days=12)
    path = write_config(tmp_path / "config.toml", raw_config(soon))
    proc = subprocess.run([sys.executable, "-m", "agent", "check-config", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    thumbprint = load_credential(str(soon.certificate_file), str(soon.private_key_file)).thumbprint
    assert proc.returncode == 0, proc.stderr
    assert f"certificate {thumbprint} (SHA-1, as the Entra portal lists it), valid until" in proc.stderr
    assert "warning: The certificate in auth.certificate_file expires on" in proc.stderr


def _check_config(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from agent import cli

    code = cli.main(["check-config", "--config", str(path)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("not_before_days", "valid_days", "says"), [
    (-40, 30, "the certificate expired on {end} UTC (local clock)"),
    (3, 30, "the certificate is not valid before {start} UTC (local clock)"),
])
def test_check_config_refuses_a_certificate_not_valid_now(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch, not_before_days: int,
                                                         valid_days: int, says: str) -> None:
    """With a synchronized clock, expired / not yet valid is a config error (exit 78, one line)."""
    from agent import clock
    from tests.agentproc import write_config

    monkeypatch.setattr(clock, "kernel_synchronized", lambda: True)
    files = make_certificate(tmp_path / "c", "greenhouse-01", valid_days=valid_days,
                             not_before=datetime.now(UTC) + timedelta(days=not_before_days))
    cred = load_credential(str(files.certificate_file), str(files.private_key_file))
    path = write_config(tmp_path / "config.toml", raw_config(files))
    code, err = _check_config(path, capsys)
    assert code == 78
    expected = says.format(end=f"{cred.not_after:%Y-%m-%d %H:%M}", start=f"{cred.not_before:%Y-%m-%d %H:%M}")
    assert err.splitlines() == [err.strip()], err
    assert err.startswith(f"config error: {path}: auth.certificate_file: {expected}"), err


def test_check_config_only_warns_about_validity_while_the_clock_is_unsynchronized(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A Pi without an RTC may boot years behind: the local verdict may be wrong, so it warns."""
    from agent import clock
    from tests.agentproc import write_config

    monkeypatch.setattr(clock, "kernel_synchronized", lambda: False)
    files = make_certificate(tmp_path / "c", "greenhouse-01", valid_days=30,
                             not_before=datetime.now(UTC) - timedelta(days=40))
    path = write_config(tmp_path / "config.toml", raw_config(files))
    code, err = _check_config(path, capsys)
    assert code == 0, err
    assert f"warning: {path}: auth.certificate_file: the certificate expired on" in err
    assert "the clock is not synchronized" in err
    assert err.rstrip().endswith(f"{path}: OK")
    assert "error:" not in err


def test_sim_idp_command_refuses_an_unreadable_certificate(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from agent.sim.idp import main

    # A command-line mistake: exit 78, one line (agent.cmdline).
    assert main(["--tls-dir", str(tmp_path / "tls"), "--certificate", str(tmp_path / "missing.pem")]) == 78
    assert "--certificate" in capsys.readouterr().err


def test_a_renewed_certificate_is_used_without_a_restart(idp: SimIdp, tls: TlsFiles, tmp_path: Path,
                                                         running: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.signin import certificate

    monkeypatch.setattr(certificate, "FILES_CHECK_S", 0.05)
    old = make_certificate(tmp_path / "c", "greenhouse-01", valid_days=30,
                           not_before=datetime.now(UTC) - timedelta(days=31))
    r = running(app_settings(idp, tls, old), tmp_path / "cache.json", trust=SYNCED())
    wait_until(lambda: r.state.snapshot.phase == "error", 10, "the expired certificate's error")
    assert "expired on" in str(r.state.snapshot.error)
    new = make_certificate(tmp_path / "new", "greenhouse-01")
    idp.register_certificate(new.pem, CLIENT)
    old.private_key_file.write_bytes(new.private_key_file.read_bytes())   # key first, as cp would
    os.utime(old.private_key_file, (time.time() - 10, time.time() - 10))
    old.certificate_file.write_bytes(new.certificate_file.read_bytes())
    snap = wait_until(lambda: r.state.snapshot.phase == "signed_in" and r.state.snapshot, 5,
                      "signed in with the renewed certificate (config backoff is longer than this)")
    assert snap.error is None and accepted(idp) == 1


def test_certificate_keys_without_the_certificate_flow_are_an_error(cert: CertificateFiles) -> None:
    raw = raw_config(cert)
    del raw["auth"]["flow"]
    raw["auth"]["scopes"] = ["api://telemetry/Readings.Write"]
    with pytest.raises(ConfigError) as err:
        config.parse(raw, Path("c.toml"))
    assert str(err.value) == ('c.toml: auth.flow, auth.certificate_file: auth.certificate_file is used only '
                              'with auth.flow = "client_certificate"; set that, or remove it')


def test_an_unsynchronized_clock_lets_the_idp_judge_the_certificate(idp: SimIdp, tls: TlsFiles,
                                                                    tmp_path: Path, running: Any) -> None:
    """Booted at 1970 (no RTC, no NTP): "not valid yet" here says nothing; the IdP's answer does."""
    files = make_certificate(tmp_path / "c", "greenhouse-01")
    idp.register_certificate(files.pem, CLIENT)
    trust = ClockTrust(wall=lambda: 86400.0 + time.monotonic(), kernel=lambda: False, boot_id="b")
    r = running(app_settings(idp, tls, files), tmp_path / "c.json", trust=trust)
    wait_until(lambda: r.state.snapshot.phase == "signed_in", 10, "signed in despite a 1970 clock")


def test_a_lasting_refusal_is_one_journal_line_not_one_per_retry(idp: SimIdp, tls: TlsFiles, cert: CertificateFiles,
                                                                  tmp_path: Path, running: Any,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent.signin.certificate")
    r = running(app_settings(idp, tls, cert), tmp_path / "c.json")     # not registered: refused each time
    wait_until(lambda: idp.app_credentials.assertions, 10, "a first refusal")
    for _ in range(50):          # the uploader asking for a token meanwhile costs the IdP nothing
        assert r.auth.access_token() is None
    assert len(idp.app_credentials.assertions) <= 2
    wait_until(lambda: len(idp.app_credentials.assertions) >= 4, 15, "several retries")
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "agent.signin.certificate"]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert "does not know this certificate" in errors[0].getMessage()


class Shift:
    """A monotonic clock that runs and that a test moves forward (the sign-in thread's waits
    need time to pass while the test waits on the real IdP)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


# 503: msal itself holds a 5xx back for 60 s (by the wall clock); 400 temporarily_unavailable:
# nothing in msal does, every call would reach the IdP but for the agent's own back-off.
@pytest.mark.parametrize("status", [503, 400])
def test_an_hour_of_uploads_with_the_idp_down_costs_a_few_attempts_and_warnings(
        idp: SimIdp, tls: TlsFiles, registered: CertificateFiles, tmp_path: Path,
        caplog: pytest.LogCaptureFixture, status: int) -> None:
    """Issue 11 item 2 for the certificate flow: the token nears its end, the IdP is down, and
    the uploader asks for a token every 2 s for an hour. The sign-in thread and the uploader's
    calls share one back-off, and the journal gets the one rule, not a line per call."""
    caplog.set_level(logging.INFO, logger="agent.signin")
    clock = Shift()
    state = AgentState()
    auth = CertificateAuthenticator(app_settings(idp, tls, registered), tmp_path / "c.json", state,
                                    device_id="d", timing=dataclasses.replace(Timing(), wait_slice_s=0.05),
                                    clock=clock)                       # production back-off
    stop = threading.Event()
    thread = threading.Thread(target=auth.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_until(lambda: state.snapshot.phase == "signed_in", 10, "sign-in")
        token = auth.access_token()
        assert token is not None
        idp.set(fail_token_next=10**9, fail_status=status)

        def failed_posts() -> int:
            return len([q for q in list(idp.requests) if q.path.endswith("/token") and q.status == status])

        # The token lives 3600 s and is due for a refresh 300 s before its end: while it is
        # still valid it is handed out, then nothing; one uploader step every 2 s.
        due_at = 3600.0 - 300.0
        for step in range(1800):
            clock.offset = due_at + 2.0 * step
            got = auth.access_token()
            if clock.offset < 3599.0:
                assert got == token, "a still-valid token is handed out while the IdP is down"
            elif clock.offset > 3601.0:
                assert got is None
        attempts = failed_posts()
        assert 5 <= attempts <= 40, f"{attempts} token requests in an hour of 1,800 calls"
        warnings = [r.getMessage() for r in caplog.records
                    if r.name == "agent.signin.certificate" and r.levelno >= logging.WARNING]
        assert 1 + 3 <= len(warnings) <= 1 + 6, warnings
        assert "repeats are counted" in warnings[0]
        assert all("failed attempts" in w for w in warnings[1:]), warnings

        # The IdP is back: the next attempt the back-off allows gets a token, the journal says so.
        idp.set(fail_token_next=0)
        clock.offset += 301.0                   # beyond the longest back-off
        fresh = wait_until(lambda: auth.access_token(), 5, "a token once the IdP answers")
        assert fresh != token
        assert any("answers again" in r.getMessage() for r in caplog.records)
        assert state.snapshot.phase == "signed_in"
    finally:
        stop.set()
        thread.join(5)


def test_a_401_with_the_idp_down_costs_one_request_until_the_back_off_is_over(
        idp: SimIdp, tls: TlsFiles, registered: CertificateFiles, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent.signin")
    clock = Shift()
    auth = CertificateAuthenticator(app_settings(idp, tls, registered), tmp_path / "c.json", AgentState(),
                                    device_id="d", timing=Timing(), clock=clock)
    token = auth.access_token()
    assert token is not None
    idp.set(fail_token_next=10**6, fail_status=400)       # temporarily_unavailable: msal keeps no copy

    def token_posts() -> int:
        return len([q for q in list(idp.requests) if q.path.endswith("/token") and q.status == 400])

    assert auth.token_rejected() is None
    for _ in range(100):                    # the uploader's 401s and polls meanwhile
        assert auth.token_rejected() is None
        assert auth.access_token() is None, "the refused token is not handed out again"
    assert token_posts() == 1
    warnings = [r for r in caplog.records if r.name == "agent.signin.certificate" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]

    idp.set(fail_token_next=0)
    clock.offset += 10.0                    # the first back-off is 1-2 s
    fresh = auth.access_token()
    assert fresh not in (None, token)
    assert token_posts() == 1


def test_status_of_a_stopped_box_names_the_app(idp: SimIdp, tls: TlsFiles, registered: CertificateFiles,
                                               tmp_path: Path) -> None:
    from agent.statusfile import read_status

    raw = raw_config(registered, authority=idp.authority, instance_discovery=False, ca_file=str(tls.ca_file))
    raw["device"] = {"id": "greenhouse-01", "state_dir": str(tmp_path / "state")}
    settings = config.parse(raw, Path("c.toml"))
    assert read_status(settings)["account"] is None
    (tmp_path / "state").mkdir(mode=0o700)
    CertificateAuthenticator(settings.auth, settings.token_cache_path, AgentState(), device_id="d",
                             timing=FAST).access_token()
    assert read_status(settings)["account"] == f"app {CLIENT}"


def test_watch_shows_the_app_account_and_the_certificate_warning() -> None:
    from agent.mqtt.watch import WatchEvent, format_event

    ev = WatchEvent("greenhouse-01", "device-agent/greenhouse-01/status", "status",
                    {"state": "signed_in", "account": f"app {CLIENT}", "error": None,
                     "warning": "The certificate in auth.certificate_file expires on 2026-12-20 (in 19 days): "
                                "renew it (README)"}, datetime.now(UTC))
    assert format_event(ev) == (f"greenhouse-01  signed_in  app {CLIENT}  warning: The certificate in "
                                "auth.certificate_file expires on 2026-12-20 (in 19 days): renew it (README)")


def test_device_code_blocked_by_conditional_access_names_the_way_out(idp: SimIdp, idp_settings: AuthSettings,
                                                                     tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """The device code path with the real msal public client: AADSTS53003 on the code request."""
    from agent.signin.aadsts import DEVICE_CODE_BLOCKED
    from agent.signin.authenticator import Authenticator

    idp.set(device_code_blocked=True)
    state = AgentState()
    auth = Authenticator(idp_settings, tmp_path / "c.json", state, device_id="greenhouse-01", timing=FAST)
    stop = threading.Event()
    thread = threading.Thread(target=auth.run, args=(stop,), daemon=True)
    caplog.set_level(logging.INFO)
    thread.start()
    try:
        snap = wait_until(lambda: state.snapshot.error and state.snapshot, 10, "the error")
    finally:
        stop.set()
        thread.join(5)
    assert snap.error == DEVICE_CODE_BLOCKED and snap.code is None
    # The panel gets one short line; status, MQTT and the journal the whole sentence.
    assert snap.error_panel == "Device code blocked by tenant policy: use client_certificate"
    assert snap.status_payload("1")["error"] == DEVICE_CODE_BLOCKED          # what MQTT carries
    assert any(DEVICE_CODE_BLOCKED in r.getMessage() and r.levelno >= logging.ERROR for r in caplog.records)
    # The journal line: the sentence, then the retry as its own clause; no internals.
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert lines and all(re.match(re.escape(DEVICE_CODE_BLOCKED) + r"; retrying in \d+\.\d s( |$)", m)
                         for m in lines), lines
    assert not any("request_new_code" in r.getMessage() for r in caplog.records)
    assert DEVICE_CODE_BLOCKED == ('device code sign-in is blocked by your tenant\'s policy: use '
                                   'auth.flow = "client_certificate" (README)')


def test_the_example_screen_shows_the_words_the_agent_says() -> None:
    from agent.panel import screens
    from agent.signin import aadsts

    assert screens.DEVICE_CODE_BLOCKED == aadsts.DEVICE_CODE_BLOCKED
    assert screens.DEVICE_CODE_BLOCKED_PANEL == aadsts.DEVICE_CODE_BLOCKED_PANEL


def test_a_generic_oidc_provider_names_its_own_app_scopes(cert: CertificateFiles) -> None:
    """/.default is Entra's rule; with auth.oidc_authority the provider's scopes are taken as given."""
    raw = raw_config(cert, scopes=["Readings.Write"])
    del raw["auth"]["authority"]
    raw["auth"]["oidc_authority"] = "https://idp.example.com/realms/iot"
    assert config.parse(raw, Path("c.toml")).auth.scopes == ("Readings.Write",)
