"""The simulated Entra ID over real HTTPS: shapes, flow, tokens, switches, sign-in page, CLI.

Plain `requests` with the test CA (msal is exercised against this IdP by the auth tests).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests

from agent.sim.idp import DEVICE_CODE_GRANT, USER_CODE_ALPHABET, SimIdp, main
from agent.sim.tls import TlsFiles
from tests.fixtures.clock import FakeClock

CLIENT = "sim-device-agent"
SCOPE = "api://telemetry/Readings.Write openid profile offline_access"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cidp(tls: TlsFiles, clock: FakeClock) -> Iterator[SimIdp]:
    """A SimIdp on a hand-moved clock (code expiry, idle refresh tokens, auto-approve)."""
    server = SimIdp(tls, client_id=CLIENT, clock=clock).start()
    yield server
    server.stop()


# One keep-alive session for the module (TLS handshakes dominate otherwise); verify= is passed
# per request and trust_env is off: REQUESTS_CA_BUNDLE would override a session-level verify.
_HTTP = requests.Session()
_HTTP.trust_env = False


def _post(idp: SimIdp, tls: TlsFiles, path: str, data: dict[str, str],
          headers: dict[str, str] | None = None) -> requests.Response:
    return _HTTP.post(idp.base_url + path, data=data, headers=headers, verify=str(tls.ca_file),
                         timeout=5)


def _get(idp: SimIdp, tls: TlsFiles, path: str) -> requests.Response:
    return _HTTP.get(idp.base_url + path, verify=str(tls.ca_file), timeout=5)


def _devicecode(idp: SimIdp, tls: TlsFiles, scope: str = SCOPE) -> requests.Response:
    return _post(idp, tls, "/simtenant/oauth2/v2.0/devicecode", {"client_id": CLIENT, "scope": scope})


def _poll(idp: SimIdp, tls: TlsFiles, device_code: str, **headers: str) -> requests.Response:
    return _post(idp, tls, "/simtenant/oauth2/v2.0/token",
                 {"grant_type": DEVICE_CODE_GRANT, "client_id": CLIENT, "device_code": device_code,
                  "client_info": "1"}, headers)


def _refresh(idp: SimIdp, tls: TlsFiles, rt: str) -> requests.Response:
    return _post(idp, tls, "/simtenant/oauth2/v2.0/token",
                 {"grant_type": "refresh_token", "client_id": CLIENT, "refresh_token": rt,
                  "scope": SCOPE, "client_info": "1"})


def _signed_in(idp: SimIdp, tls: TlsFiles) -> dict[str, Any]:
    flow = _devicecode(idp, tls).json()
    idp.approve(flow["user_code"])
    resp = _poll(idp, tls, flow["device_code"])
    assert resp.status_code == 200, resp.text
    return resp.json()


def _assert_entra_error(resp: requests.Response, status: int, error: str, aadsts: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"] == error
    assert body["error_description"].startswith(f"AADSTS{aadsts}:")
    assert body["error_codes"] == [aadsts]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ", body["timestamp"])
    assert body["trace_id"] and body["correlation_id"]
    return body


# ---- discovery and shapes ----------------------------------------------------------------------
def test_discovery_document_points_at_this_tenant(idp: SimIdp, tls: TlsFiles) -> None:
    doc = _get(idp, tls, "/simtenant/v2.0/.well-known/openid-configuration").json()
    assert doc["issuer"] == idp.issuer == f"{idp.base_url}/simtenant/v2.0"
    assert doc["token_endpoint"] == f"{idp.authority}/oauth2/v2.0/token"
    assert doc["device_authorization_endpoint"] == f"{idp.authority}/oauth2/v2.0/devicecode"
    assert doc["authorization_endpoint"] == f"{idp.authority}/oauth2/v2.0/authorize"
    assert doc["jwks_uri"] == idp.jwks_url
    assert "RS256" in doc["id_token_signing_alg_values_supported"]


def test_discovery_for_unknown_tenant_is_a_400(idp: SimIdp, tls: TlsFiles) -> None:
    resp = _get(idp, tls, "/othertenant/v2.0/.well-known/openid-configuration")
    body = _assert_entra_error(resp, 400, "invalid_tenant", 90002)
    assert "othertenant" in body["error_description"]


def test_devicecode_has_entra_shape_without_complete_uri(idp: SimIdp, tls: TlsFiles) -> None:
    resp = _devicecode(idp, tls)
    assert resp.status_code == 200
    flow = resp.json()
    code = flow["user_code"]
    assert len(code) == 9 and set(code) <= set(USER_CODE_ALPHABET)
    assert flow["verification_uri"] == idp.devicelogin_url
    assert flow["expires_in"] == 900 and flow["interval"] == 5
    assert flow["message"] == (f"To sign in, use a web browser to open the page {idp.devicelogin_url} "
                               f"and enter the code {code} to authenticate.")
    assert "verification_uri_complete" not in flow
    assert flow["device_code"] and code not in flow["device_code"]
    assert idp.wait_for_code(1) == code
    assert idp.pending_codes() == [code]


def test_devicecode_rejects_missing_and_unknown_client(idp: SimIdp, tls: TlsFiles) -> None:
    resp = _post(idp, tls, "/simtenant/oauth2/v2.0/devicecode", {"scope": SCOPE})
    _assert_entra_error(resp, 400, "invalid_request", 900144)
    resp = _post(idp, tls, "/simtenant/oauth2/v2.0/devicecode", {"client_id": "nope", "scope": SCOPE})
    _assert_entra_error(resp, 400, "unauthorized_client", 700016)
    assert idp.pending_codes() == []


def test_wait_for_code_times_out_when_none_issued(idp: SimIdp) -> None:
    with pytest.raises(TimeoutError):
        idp.wait_for_code(timeout_s=0.05)


# ---- the flow ----------------------------------------------------------------------------------
def test_pending_then_approve_then_tokens(idp: SimIdp, tls: TlsFiles) -> None:
    flow = _devicecode(idp, tls).json()
    resp = _poll(idp, tls, flow["device_code"], **{"client-request-id": "corr-123"})
    body = _assert_entra_error(resp, 400, "authorization_pending", 70016)
    assert body["correlation_id"] == "corr-123"   # Entra echoes msal's client-request-id

    idp.approve(flow["user_code"], user="grace@contoso.example")
    resp = _poll(idp, tls, flow["device_code"])
    assert resp.status_code == 200, resp.text
    tok = resp.json()
    assert tok["token_type"] == "Bearer"
    assert tok["scope"] == "api://telemetry/Readings.Write"
    assert tok["expires_in"] == 3600 and tok["ext_expires_in"] == 3600
    assert tok["refresh_token"] and tok["access_token"] and tok["id_token"]
    info = json.loads(base64.urlsafe_b64decode(tok["client_info"] + "=="))
    assert info == {"uid": jwt.decode(tok["id_token"], options={"verify_signature": False})["oid"],
                    "utid": idp.tenant_id}
    assert idp.pending_codes() == []
    assert idp.code_status(flow["user_code"]) == "redeemed"
    # A device code is good for one set of tokens.
    _assert_entra_error(_poll(idp, tls, flow["device_code"]), 400, "invalid_grant", 70000)


def test_unknown_device_code_is_bad_verification_code(idp: SimIdp, tls: TlsFiles) -> None:
    _assert_entra_error(_poll(idp, tls, "not-a-code"), 400, "bad_verification_code", 70000)


def test_decline_ends_the_flow(idp: SimIdp, tls: TlsFiles) -> None:
    flow = _devicecode(idp, tls).json()
    idp.decline(flow["user_code"])
    _assert_entra_error(_poll(idp, tls, flow["device_code"]), 400, "authorization_declined", 70000)
    with pytest.raises(ValueError, match="declined"):
        idp.approve(flow["user_code"])


def test_tokens_verify_against_the_jwks(idp: SimIdp, tls: TlsFiles) -> None:
    tok = _signed_in(idp, tls)
    jwks = jwt.PyJWKSet.from_dict(_HTTP.get(idp.jwks_url, verify=str(tls.ca_file), timeout=5).json())
    kid = jwt.get_unverified_header(tok["access_token"])["kid"]
    key = next(k for k in jwks.keys if k.key_id == kid)
    access = jwt.decode(tok["access_token"], key.key, algorithms=["RS256"], audience="api://telemetry",
                        issuer=idp.issuer)
    assert access["scp"] == "Readings.Write"
    assert access["tid"] == idp.tenant_id and access["azp"] == CLIENT
    assert access["exp"] - access["iat"] == 3600 and access["nbf"] <= access["iat"]
    assert access["sub"] and access["oid"]
    ident = jwt.decode(tok["id_token"], key.key, algorithms=["RS256"], audience=CLIENT, issuer=idp.issuer)
    assert ident["preferred_username"] == "ada@contoso.example" and ident["name"] == "Ada"
    assert ident["oid"] == access["oid"]
    # A token from another key does not verify: the JWKS really is this IdP's key.
    with SimIdp(tls) as stranger:
        other = stranger.mint_access_token()
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(other, key.key, algorithms=["RS256"], audience="api://telemetry")


def test_mint_access_token_for_api_tests(idp: SimIdp, tls: TlsFiles) -> None:
    jwks = jwt.PyJWKSet.from_dict(idp.public_jwks())
    tok = idp.mint_access_token(lifetime_s=60, scp="Other.Read")
    claims = jwt.decode(tok, jwks.keys[0].key, algorithms=["RS256"], audience="api://telemetry",
                        issuer=idp.issuer)
    assert claims["scp"] == "Other.Read" and claims["exp"] - claims["iat"] == 60
    expired = idp.mint_access_token(lifetime_s=-120)
    with pytest.raises(jwt.ExpiredSignatureError):
        jwt.decode(expired, jwks.keys[0].key, algorithms=["RS256"], audience="api://telemetry")


# ---- refresh tokens ----------------------------------------------------------------------------
def test_refresh_rotates_and_old_token_dies(idp: SimIdp, tls: TlsFiles) -> None:
    rt1 = _signed_in(idp, tls)["refresh_token"]
    resp = _refresh(idp, tls, rt1)
    assert resp.status_code == 200, resp.text
    rt2 = resp.json()["refresh_token"]
    assert rt2 != rt1 and resp.json()["access_token"]
    _assert_entra_error(_refresh(idp, tls, rt1), 400, "invalid_grant", 9002313)
    assert _refresh(idp, tls, rt2).status_code == 200


def test_refresh_without_rotation_keeps_the_token(idp: SimIdp, tls: TlsFiles) -> None:
    idp.set(rotate_refresh_tokens=False)
    rt = _signed_in(idp, tls)["refresh_token"]
    for _ in range(2):
        resp = _refresh(idp, tls, rt)
        assert resp.status_code == 200 and resp.json()["refresh_token"] == rt


def test_revoked_refresh_tokens_fail_until_next_sign_in(idp: SimIdp, tls: TlsFiles) -> None:
    rt = _signed_in(idp, tls)["refresh_token"]
    idp.revoke_refresh_tokens()
    _assert_entra_error(_refresh(idp, tls, rt), 400, "invalid_grant", 50173)
    fresh = _signed_in(idp, tls)["refresh_token"]
    assert _refresh(idp, tls, fresh).status_code == 200


def test_refresh_token_expires_after_90_days_idle(cidp: SimIdp, tls: TlsFiles, clock: FakeClock) -> None:
    rt = _signed_in(cidp, tls)["refresh_token"]
    clock.now += 89 * 86400
    rt = _refresh(cidp, tls, rt).json()["refresh_token"]     # use renews the idle window
    clock.now += 91 * 86400
    _assert_entra_error(_refresh(cidp, tls, rt), 400, "invalid_grant", 700082)


def test_refresh_error_switch_mfa_is_interaction_required(idp: SimIdp, tls: TlsFiles) -> None:
    rt = _signed_in(idp, tls)["refresh_token"]
    idp.set(refresh_error=50076)
    body = _assert_entra_error(_refresh(idp, tls, rt), 400, "interaction_required", 50076)
    assert body["suberror"] == "basic_action" and "capolids" in json.loads(body["claims"])["access_token"]
    # Device flow still works: the switch is about refreshes only.
    assert "access_token" in _signed_in(idp, tls)
    idp.set(refresh_error=None)
    assert _refresh(idp, tls, rt).status_code == 200


# ---- switches ----------------------------------------------------------------------------------
def test_unknown_switch_is_refused(idp: SimIdp) -> None:
    with pytest.raises(TypeError, match="slow_dwn"):
        idp.set(slow_dwn=1)


def test_slow_down_for_next_n_polls(idp: SimIdp, tls: TlsFiles) -> None:
    flow = _devicecode(idp, tls).json()
    idp.approve(flow["user_code"])
    idp.set(slow_down_polls=2)
    for _ in range(2):
        assert _poll(idp, tls, flow["device_code"]).json()["error"] == "slow_down"
    assert _poll(idp, tls, flow["device_code"]).status_code == 200


def test_enforce_interval_answers_slow_down_to_fast_polls(cidp: SimIdp, tls: TlsFiles,
                                                          clock: FakeClock) -> None:
    cidp.set(enforce_interval=True, interval_s=5)
    flow = _devicecode(cidp, tls).json()
    assert _poll(cidp, tls, flow["device_code"]).json()["error"] == "authorization_pending"
    clock.now += 2
    assert _poll(cidp, tls, flow["device_code"]).json()["error"] == "slow_down"
    clock.now += 5
    assert _poll(cidp, tls, flow["device_code"]).json()["error"] == "authorization_pending"


def test_interval_and_expiry_and_complete_uri_switches(idp: SimIdp, tls: TlsFiles) -> None:
    idp.set(interval_s=0, code_expires_in_s=30, verification_uri_complete=True)
    flow = _devicecode(idp, tls).json()
    assert flow["interval"] == 0 and flow["expires_in"] == 30
    assert flow["verification_uri_complete"] == f"{idp.devicelogin_url}?otc={flow['user_code']}"
    idp.set(include_interval=False, include_message=False)
    flow = _devicecode(idp, tls).json()
    assert "interval" not in flow and "message" not in flow


def test_code_expires_on_the_injected_clock(cidp: SimIdp, tls: TlsFiles, clock: FakeClock) -> None:
    flow = _devicecode(cidp, tls).json()
    clock.now += 899
    assert _poll(cidp, tls, flow["device_code"]).json()["error"] == "authorization_pending"
    clock.now += 1
    _assert_entra_error(_poll(cidp, tls, flow["device_code"]), 400, "expired_token", 70020)
    assert cidp.pending_codes() == [] and cidp.code_status(flow["user_code"]) == "expired"
    with pytest.raises(ValueError, match="expired"):
        cidp.approve(flow["user_code"])
    cidp.set(expired_code_aadsts=70019)
    _assert_entra_error(_poll(cidp, tls, flow["device_code"]), 400, "expired_token", 70019)


def test_auto_approve_after_s(cidp: SimIdp, tls: TlsFiles, clock: FakeClock) -> None:
    cidp.auto_approve_after_s = 3
    flow = _devicecode(cidp, tls).json()
    clock.now += 2.9
    assert _poll(cidp, tls, flow["device_code"]).status_code == 400
    assert cidp.pending_codes() == [flow["user_code"]]
    clock.now += 0.2
    assert cidp.pending_codes() == [] and cidp.code_status(flow["user_code"]) == "approved"
    assert _poll(cidp, tls, flow["device_code"]).status_code == 200


def test_expire_codes_now(idp: SimIdp, tls: TlsFiles) -> None:
    flow = _devicecode(idp, tls).json()
    idp.expire_codes()
    assert idp.pending_codes() == []
    assert _poll(idp, tls, flow["device_code"]).json()["error"] == "expired_token"


def test_decline_all_switch(idp: SimIdp, tls: TlsFiles) -> None:
    idp.set(decline_all=True)
    flow = _devicecode(idp, tls).json()
    assert _poll(idp, tls, flow["device_code"]).json()["error"] == "authorization_declined"
    assert idp.code_status(flow["user_code"]) == "declined"


@pytest.mark.parametrize(("status", "error"), [(503, "temporarily_unavailable"), (500, "server_error"),
                                             (400, "temporarily_unavailable")])
def test_next_n_requests_fail_with_5xx(idp: SimIdp, tls: TlsFiles, status: int, error: str) -> None:
    idp.set(fail_devicecode_next=2, fail_status=status, retry_after_s=7)
    for _ in range(2):
        resp = _devicecode(idp, tls)
        assert resp.status_code == status and resp.json()["error"] == error
        assert resp.headers["Retry-After"] == "7"
    flow = _devicecode(idp, tls).json()
    idp.set(fail_token_next=1)
    assert _poll(idp, tls, flow["device_code"]).status_code == status
    assert _poll(idp, tls, flow["device_code"]).json()["error"] == "authorization_pending"
    idp.set(fail_discovery_next=1)
    assert _get(idp, tls, "/simtenant/v2.0/.well-known/openid-configuration").status_code == status
    assert _get(idp, tls, "/simtenant/v2.0/.well-known/openid-configuration").status_code == 200


def test_malformed_answers(idp: SimIdp, tls: TlsFiles) -> None:
    idp.set(malformed_devicecode_next=1)
    resp = _devicecode(idp, tls)
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/html")
    with pytest.raises(ValueError):
        resp.json()
    idp.set(malformed_devicecode_next=1, malformed_kind="missing_fields")
    body = _devicecode(idp, tls).json()
    assert "user_code" not in body and "device_code" not in body
    flow = _devicecode(idp, tls).json()
    idp.approve(flow["user_code"])
    idp.set(malformed_token_next=1)
    body = _poll(idp, tls, flow["device_code"]).json()
    assert "access_token" not in body
    assert "access_token" in _poll(idp, tls, flow["device_code"]).json()


AADSTS_SWITCHES = [
    (50059, "invalid_request"), (90133, "invalid_request"), (9001023, "invalid_request"),
    (7000218, "invalid_client"), (53003, "invalid_grant"), (50076, "interaction_required"),
    (700082, "invalid_grant"), (50173, "invalid_grant"), (65001, "invalid_grant"),
]


@pytest.mark.parametrize(("aadsts", "error"), AADSTS_SWITCHES)
def test_aadsts_switch_on_devicecode(idp: SimIdp, tls: TlsFiles, aadsts: int, error: str) -> None:
    idp.set(devicecode_error=aadsts)
    _assert_entra_error(_devicecode(idp, tls), 400, error, aadsts)
    assert idp.pending_codes() == []


@pytest.mark.parametrize(("aadsts", "error"), AADSTS_SWITCHES)
def test_aadsts_switch_on_token(idp: SimIdp, tls: TlsFiles, aadsts: int, error: str) -> None:
    flow = _devicecode(idp, tls).json()
    idp.approve(flow["user_code"])
    idp.set(token_error=aadsts)
    body = _assert_entra_error(_poll(idp, tls, flow["device_code"]), 400, error, aadsts)
    if aadsts == 65001:
        assert body["suberror"] == "consent_required"
    idp.set(token_error=None)
    assert _poll(idp, tls, flow["device_code"]).status_code == 200


def test_requests_are_recorded_for_poll_spacing(cidp: SimIdp, tls: TlsFiles, clock: FakeClock) -> None:
    flow = _devicecode(cidp, tls).json()
    for _ in range(3):
        _poll(cidp, tls, flow["device_code"])
        clock.now += 5
    polls = [r for r in cidp.requests if r.grant_type == DEVICE_CODE_GRANT]
    spacing = [(t, status) for t, _path, _grant, status in polls]
    assert spacing == [(1000.0, 400), (1005.0, 400), (1010.0, 400)]
    assert cidp.requests[0].path == "/simtenant/oauth2/v2.0/devicecode"


def test_tokens_never_logged(idp: SimIdp, tls: TlsFiles, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="agent.sim.idp")
    tok = _signed_in(idp, tls)
    _refresh(idp, tls, tok["refresh_token"])
    text = caplog.text
    assert idp.requests and "issued device code" in text and "approved" in text
    for secret in (tok["access_token"], tok["refresh_token"], tok["id_token"]):
        assert secret[:40] not in text
    assert "eyJ" not in text


# ---- the sign-in page --------------------------------------------------------------------------
def test_page_wrong_code_then_approve(idp: SimIdp, tls: TlsFiles) -> None:
    page = _get(idp, tls, "/devicelogin")
    assert page.status_code == 200 and 'id="otc"' in page.text and 'name="otc"' in page.text
    flow = _devicecode(idp, tls).json()
    wrong = _post(idp, tls, "/devicelogin", {"otc": "WRONGCODE"})
    assert "didn&#x27;t work" in wrong.text and 'id="error"' in wrong.text
    confirm = _post(idp, tls, "/devicelogin", {"otc": flow["user_code"].lower()})
    assert "Are you trying to sign in to device-agent?" in confirm.text
    assert 'id="continue"' in confirm.text and 'id="decline"' in confirm.text
    assert idp.code_status(flow["user_code"]) == "pending"
    done = _post(idp, tls, "/devicelogin/confirm",
                 {"otc": flow["user_code"], "user": "ada@contoso.example", "action": "continue"})
    assert "You have signed in to device-agent on your device. You may now close this window." in done.text
    assert _poll(idp, tls, flow["device_code"]).status_code == 200
    again = _post(idp, tls, "/devicelogin", {"otc": flow["user_code"]})
    assert "already been used" in again.text


def test_page_decline(idp: SimIdp, tls: TlsFiles) -> None:
    flow = _devicecode(idp, tls).json()
    done = _post(idp, tls, "/devicelogin/confirm", {"otc": flow["user_code"], "action": "decline"})
    assert "declined" in done.text
    assert _poll(idp, tls, flow["device_code"]).json()["error"] == "authorization_declined"


def test_page_prefills_code_from_complete_uri(idp: SimIdp, tls: TlsFiles) -> None:
    idp.set(verification_uri_complete=True)
    flow = _devicecode(idp, tls).json()
    page = _HTTP.get(flow["verification_uri_complete"], verify=str(tls.ca_file), timeout=5)
    assert f'value="{flow["user_code"]}"' in page.text


# ---- `device-agent sim idp` --------------------------------------------------------------------
def test_main_refuses_non_loopback_host(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--host", "0.0.0.0"]) == 78
    assert "loopback only" in capsys.readouterr().err


def test_main_runs_until_sigterm(tmp_path: Path, tls: TlsFiles) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "agent", "sim", "idp", "--tls-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        while not any(line.startswith("Press Ctrl-C") for line in lines):
            line = proc.stdout.readline()   # type: ignore[union-attr]
            assert line, proc.stderr.read()  # type: ignore[union-attr]
            lines.append(line)
        banner = "".join(lines)
        assert "loopback only" in banner and "instance_discovery = false" in banner
        authority = re.search(r'authority = "(\S+)"', banner).group(1)  # type: ignore[union-attr]
        assert f'ca_file = "{tmp_path / "ca.pem"}"' in banner
        doc = requests.get(authority + "/v2.0/.well-known/openid-configuration",
                           verify=str(tmp_path / "ca.pem"), timeout=5).json()
        assert doc["issuer"] == authority + "/v2.0"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=3) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
