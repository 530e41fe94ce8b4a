"""The uploader with the real sign-in: msal (Authenticator) against the simulated IdP, the HTTP
sink against the simulated API over HTTPS. What a refused token does to the whole chain."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import AuthSettings, UploadSettings
from agent.sim.api import SimApi
from agent.sim.idp import SimIdp
from agent.sim.tls import TlsFiles
from agent.telemetry.outbox import Outbox
from agent.telemetry.sinks.http import HttpSink
from agent.telemetry.uploader import FORBIDDEN_CAP_S, REFUSED_ERROR, Uploader
from tests.agent.test_auth import Harness, devicecode_posts, token_posts
from tests.fixtures.api import reading

DEVICE = "dev-1"


@pytest.fixture
def api(idp: SimIdp, tls: TlsFiles) -> Iterator[SimApi]:
    server = SimApi(tls, jwks_url=idp.jwks_url, issuer=idp.issuer, audience="api://telemetry",
                    ca_file=str(tls.ca_file)).start()
    yield server
    server.stop()


@pytest.fixture
def signed_in(idp: SimIdp, idp_settings: AuthSettings, state_dir: Path) -> Iterator[Harness]:
    idp.auto_approve_after_s = 0
    h = Harness(idp_settings, state_dir / "token_cache.json").start()
    h.wait_signed_in()
    idp.auto_approve_after_s = None
    yield h
    h.stop()


def uploader(h: Harness, api: SimApi, tls: TlsFiles, tmp_path: Path, clock: list[float]) -> Uploader:
    settings = UploadSettings(sink="http", url=api.url, ca_file=str(tls.ca_file), interval_s=10.0, timeout_s=5.0)
    box = Outbox(tmp_path / "outbox.sqlite3", DEVICE, max_rows=1000, max_bytes=10**7)
    box.put([reading(i) for i in range(5)])
    return Uploader(box, HttpSink(settings, DEVICE), h.auth, h.state, settings, clock=lambda: clock[0],
                    rng=lambda: 0.5)


def test_an_api_that_refuses_fresh_tokens_costs_one_refresh_never_a_new_sign_in(
        signed_in: Harness, idp: SimIdp, api: SimApi, tls: TlsFiles, tmp_path: Path) -> None:
    api.verifier.audience = "api://someone-else"           # the API's audience is misconfigured
    clock = [1000.0]
    up = uploader(signed_in, api, tls, tmp_path, clock)
    refreshes, codes = len(token_posts(idp, "refresh_token")), len(devicecode_posts(idp))
    waits = []
    for _ in range(4):
        waits.append(up.step())
        clock[0] += waits[-1]
    assert waits == [30.0, 60.0, 120.0, 240.0]
    assert len(token_posts(idp, "refresh_token")) == refreshes + 1, "one refresh from the IdP, not one per try"
    snap = signed_in.snap
    assert snap.phase == "signed_in" and snap.code is None and snap.error == REFUSED_ERROR
    assert len(devicecode_posts(idp)) == codes, "no new sign-in"
    assert up.outbox.counts().pending == 5 and [r.status for r in api.requests] == [401] * 5
    api.verifier.audience = "api://telemetry"               # fixed at the API
    clock[0] += FORBIDDEN_CAP_S
    up.step()
    assert api.seqs(DEVICE) == set(range(1, 6)) and signed_in.snap.error is None
    up.sink.close()
    up.outbox.close()


def test_a_claims_challenge_gets_a_token_for_those_claims(
        signed_in: Harness, idp: SimIdp, api: SimApi, tls: TlsFiles, tmp_path: Path) -> None:
    claims = json.dumps({"access_token": {"nbf": {"essential": True, "value": "1700000000"}}})
    api.challenge(claims)
    up = uploader(signed_in, api, tls, tmp_path, [1000.0])
    assert up.step() == 10.0
    assert [r.status for r in api.requests] == [401, 200] and api.seqs(DEVICE) == set(range(1, 6))
    asked: Any = idp.claims_requests
    assert asked and json.loads(asked[-1]).get("access_token", {}).get("nbf"), asked
    assert signed_in.snap.phase == "signed_in"
    up.sink.close()
    up.outbox.close()
