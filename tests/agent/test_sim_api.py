"""The simulated API itself: token checks, strict body validation, de-duplication, switches,
the JWKS fetched over HTTPS (from the simulated IdP), and the standalone command."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest
import requests

from agent.sim.api import SimApi
from agent.sim.idp import SimIdp
from agent.sim.jwks import SimKeys
from agent.sim.tls import TlsFiles
from tests.fixtures.api import SIM_AUDIENCE

DEV = "dev-1"


def body(seqs: list[int], device: str = DEV, **override: Any) -> dict[str, Any]:
    readings = [{"id": f"{device}:{s}", "seq": s, "sensor": "cpu", "type": "cpu_temperature", "value": 40.5,
                 "unit": "°C", "time": "2026-11-25T14:39:32.123Z"} for s in seqs]
    for r in readings:
        r.update(override)
    return {"device_id": device, "readings": readings}


def post(api: SimApi, tls: TlsFiles, payload: Any, token: str | None,
         key: str | None = "auto") -> requests.Response:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if key == "auto" and isinstance(payload, dict) and payload.get("readings"):
        rs = payload["readings"]
        key = f"{payload['device_id']}:{rs[0]['seq']}-{rs[-1]['seq']}"
    if key and key != "auto":
        headers["Idempotency-Key"] = key
    return requests.post(api.url, data=json.dumps(payload), headers=headers, verify=str(tls.ca_file),
                         timeout=5)


def test_accepts_and_deduplicates(sim_api: SimApi, tls: TlsFiles, sim_keys: SimKeys) -> None:
    token = sim_keys.mint()
    r1 = post(sim_api, tls, body([1, 2, 3]), token)
    r2 = post(sim_api, tls, body([2, 3, 4]), token)
    assert r1.status_code == r2.status_code == 200
    assert r2.json() == {"accepted": 3, "duplicates": 2}
    assert sim_api.seqs(DEV) == {1, 2, 3, 4}
    assert [r["seq"] for r in sim_api.readings(DEV)] == [1, 2, 3, 4]
    assert [(q.status, q.count, q.new) for q in sim_api.requests] == [(200, 3, 3), (200, 3, 1)]


@pytest.mark.parametrize("case", ["missing", "expired", "other_key", "wrong_audience", "garbage"])
def test_bad_tokens_get_401_invalid_token(sim_api: SimApi, tls: TlsFiles, sim_keys: SimKeys,
                                          case: str) -> None:
    token = {"missing": None, "expired": sim_keys.mint({"exp": int(time.time()) - 60}),
             "other_key": SimKeys(issuer=sim_keys.issuer).mint(), "garbage": "abc.def.ghi",
             "wrong_audience": sim_keys.mint({"aud": "api://other"})}[case]
    r = post(sim_api, tls, body([1]), token)
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
    assert sim_api.seqs(DEV) == set()


def test_missing_scope_gets_403(sim_api: SimApi, tls: TlsFiles, sim_keys: SimKeys) -> None:
    r = post(sim_api, tls, body([1]), sim_keys.mint({"scp": "User.Read"}))
    assert r.status_code == 403 and "insufficient_scope" in r.headers["WWW-Authenticate"]


@pytest.mark.parametrize(("payload", "key", "fragment"), [
    ("not json", "auto", "not JSON"),
    ({"readings": []}, "auto", "device_id"),
    (body([1, 3, 2]), "auto", "not ascending"),
    (body([1], device="dev-2") | {"device_id": DEV}, "auto", "does not match device_id"),
    (body([1], value="hot"), "auto", "value"),
    (body([1], time="2026-11-25 14:39"), "auto", "time"),
    ({"device_id": DEV, "readings": [{"id": f"{DEV}:1", "seq": 1}]}, "auto", "sensor"),
    (body([1, 2]), f"{DEV}:1-3", "Idempotency-Key"),
    (body([1, 2]), None, "Idempotency-Key"),
])
def test_malformed_batches_get_400_with_a_json_reason(sim_api: SimApi, tls: TlsFiles, sim_keys: SimKeys,
                                                      payload: Any, key: str | None, fragment: str) -> None:
    headers = {"Authorization": f"Bearer {sim_keys.mint()}", "Content-Type": "application/json"}
    idem = _auto(payload) if key == "auto" else key
    if idem:
        headers["Idempotency-Key"] = idem
    data = payload if isinstance(payload, str) else json.dumps(payload)
    r = requests.post(sim_api.url, data=data, headers=headers, verify=str(tls.ca_file), timeout=5)
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_request" and fragment in r.json()["message"]
    assert sim_api.seqs(DEV) == set()


def _auto(payload: Any) -> str | None:
    try:
        rs = payload["readings"]
        return f"{payload['device_id']}:{rs[0]['seq']}-{rs[-1]['seq']}"
    except (TypeError, KeyError, IndexError):
        return None


def test_switches_fail_then_recover(sim_api: SimApi, tls: TlsFiles, sim_keys: SimKeys) -> None:
    token = sim_keys.mint()
    sim_api.fail(503, count=2, retry_after=3)
    sim_api.fail(429, retry_after=4, http_date=True)
    sim_api.reset()
    statuses = []
    for _ in range(4):
        try:
            r = post(sim_api, tls, body([1]), token)
            statuses.append((r.status_code, r.headers.get("Retry-After")))
        except requests.ConnectionError:
            statuses.append((None, None))
    assert statuses[:2] == [(503, "3"), (503, "3")]
    assert statuses[2][0] == 429 and statuses[2][1].endswith("GMT")
    assert statuses[3] == (None, None)
    assert post(sim_api, tls, body([1]), token).status_code == 200
    assert [q.status for q in sim_api.requests] == [503, 503, 429, None, 200]


def test_body_over_the_size_limit_gets_413_before_auth(sim_api: SimApi, tls: TlsFiles,
                                                      sim_keys: SimKeys) -> None:
    sim_api.max_body_bytes = 1000
    big = post(sim_api, tls, body(list(range(1, 21))), None)          # no token: size is checked first
    small = post(sim_api, tls, body([1, 2]), sim_keys.mint())
    assert big.status_code == 413 and big.json()["error"] == "payload_too_large"
    assert small.status_code == 200
    assert [(q.status, q.count) for q in sim_api.requests] == [(413, 20), (200, 2)]
    assert sim_api.seqs(DEV) == {1, 2}


def test_verifies_against_the_simulated_idps_jwks_over_https(tls: TlsFiles) -> None:
    idp = SimIdp(tls, tenant="simtenant").start()
    api = SimApi(tls, jwks_url=idp.jwks_url, issuer=idp.issuer, audience=SIM_AUDIENCE,
                 ca_file=str(tls.ca_file), required_scope="Readings.Write").start()
    try:
        assert post(api, tls, body([1]), idp.mint_access_token()).status_code == 200
        assert post(api, tls, body([2]), SimKeys(issuer=idp.issuer).mint()).status_code == 401
        assert post(api, tls, body([3]), idp.mint_access_token(iss="https://evil/v2.0")).status_code == 401
    finally:
        api.stop()
        idp.stop()


def test_standalone_command_prints_a_loopback_banner(tmp_path, sim_keys: SimKeys) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(sim_keys.jwks()))
    proc = subprocess.Popen([sys.executable, "-m", "agent", "sim", "api", "--port", "0", "--tls-dir",
                             str(tmp_path / "tls"), "--jwks-file", str(jwks)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "loopback only" in line and "https://127.0.0.1:" in line
        assert line.rstrip().endswith("/v1/readings")
        url = line.split()[-1]
        headers = {"Authorization": f"Bearer {sim_keys.mint()}", "Idempotency-Key": f"{DEV}:1-1"}
        r = requests.post(url, json=body([1]), verify=str(tmp_path / "tls" / "ca.pem"), timeout=5,
                          headers=headers)
        assert r.status_code == 200
    finally:
        proc.terminate()
        assert proc.wait(timeout=5) == 0
        if proc.stdout:
            proc.stdout.close()


def test_refuses_non_loopback(tls: TlsFiles, sim_keys: SimKeys) -> None:
    with pytest.raises(ValueError, match="loopback"):
        SimApi(tls, jwks=sim_keys.jwks(), host="0.0.0.0")


def test_poisoned_readings_get_the_whole_request_refused_with_422(sim_api: SimApi, tls: TlsFiles,
                                                                 sim_keys: SimKeys) -> None:
    token = sim_keys.mint()
    sim_api.poison(seqs={3}, values={99.5})
    refused = post(sim_api, tls, body([1, 2, 3]), token)
    assert refused.status_code == 422 and "seq 3" in refused.json()["message"]
    poisoned_value = body([4, 5])
    poisoned_value["readings"][1]["value"] = 99.5
    assert post(sim_api, tls, poisoned_value, token).status_code == 422
    assert post(sim_api, tls, body([1, 2, 4]), token).status_code == 200
    assert sim_api.seqs(DEV) == {1, 2, 4}, "nothing of a refused request is stored"


def test_claims_challenge_is_a_401_with_the_claims_base64_encoded(sim_api: SimApi, tls: TlsFiles,
                                                                  sim_keys: SimKeys) -> None:
    import base64

    claims = '{"access_token":{"nbf":{"essential":true,"value":"1700000000"}}}'
    sim_api.challenge(claims)
    first = post(sim_api, tls, body([1]), sim_keys.mint())
    assert first.status_code == 401
    header = first.headers["WWW-Authenticate"]
    assert 'error="insufficient_claims"' in header
    assert base64.b64decode(header.split('claims="')[1].split('"')[0]).decode() == claims
    assert post(sim_api, tls, body([1]), sim_keys.mint()).status_code == 200, "one challenge only"
