"""auth.flow = "client_certificate" against a certified OpenID provider (npm oidc-provider),
not only against our own simulated Entra ID: client credentials with ``private_key_jwt``
(RFC 7523), the assertion signed by the agent and sent by the real msal confidential client.

oidc-provider refuses a client assertion whose ``jti`` it has seen (replay detection), which
is why the agent signs a fresh assertion per token request: msal 1.39's own certificate
credential reuses one for 9 minutes, and its second token request within that time is refused
(shown below, so the reason stays visible if msal changes).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import msal
import pytest
from jwt.algorithms import RSAAlgorithm

from agent.config import AuthSettings
from agent.signin.authenticator import Timing
from agent.signin.certificate import CertificateAuthenticator, load_credential
from agent.sim.appcreds import CertificateFiles, make_certificate
from agent.sim.jwks import TokenVerifier
from agent.sim.tls import TlsFiles
from agent.state import AgentState
from tests.interop.conftest import require_node
from tests.interop.peers import CaSession, OidcProvider, start_oidc_provider
from tests.waiting import wait_until

FAST = Timing(backoff_initial_s=0.1, backoff_max_s=0.8, config_backoff_initial_s=0.3,
              config_backoff_max_s=1.2, wait_slice_s=0.05)


@pytest.fixture(scope="module")
def app_cert(tmp_path_factory: pytest.TempPathFactory) -> CertificateFiles:
    return make_certificate(tmp_path_factory.mktemp("app-cert"), "greenhouse-01")


@pytest.fixture(scope="module")
def app_provider(tls: TlsFiles, app_cert: CertificateFiles,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    """oidc-provider knowing the app's public key (as an app registration knows its certificate)."""
    node = require_node()
    work = tmp_path_factory.mktemp("oidc-provider-app")
    cred = load_credential(str(app_cert.certificate_file), str(app_cert.private_key_file))
    jwk = json.loads(RSAAlgorithm.to_jwk(cred.private_key.public_key()))
    (work / "app-jwks.json").write_text(json.dumps({"keys": [jwk]}))
    provider = start_oidc_provider(tls, work, node=node, app_jwks=work / "app-jwks.json")
    try:
        yield provider
    finally:
        provider.stop()


def settings(provider: OidcProvider, tls: TlsFiles, cert: CertificateFiles) -> AuthSettings:
    return AuthSettings(client_id=f"{provider.client_id}-app", scopes=(provider.scope,),
                        oidc_authority=provider.issuer, ca_file=str(tls.ca_file), timeout_s=10.0,
                        flow="client_certificate", certificate_file=str(cert.certificate_file),
                        private_key_file=str(cert.private_key_file))


def test_signs_in_as_app_and_refreshes_on_401(app_provider: OidcProvider, tls: TlsFiles,
                                              app_cert: CertificateFiles, tmp_path: Path) -> None:
    state = AgentState()
    auth = CertificateAuthenticator(settings(app_provider, tls, app_cert), tmp_path / "cache.json", state,
                                    device_id="greenhouse-01", timing=FAST)
    stop = threading.Event()
    thread = threading.Thread(target=auth.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_until(lambda: state.snapshot.phase == "signed_in", 15,
                   f"app sign-in at oidc-provider ({state.snapshot.error})")
        token = auth.access_token()
        assert token is not None and state.snapshot.account == f"app {app_provider.client_id}-app"
        verdict = TokenVerifier(jwks_url=app_provider.jwks_url, issuer=app_provider.issuer,
                                audience=app_provider.resource, required_scope=app_provider.scope,
                                ca_file=str(tls.ca_file)).check(f"Bearer {token}")
        assert verdict.status == 0, verdict
        # Two 401s in a row within seconds: each refresh is a new assertion, none refused.
        second = auth.token_rejected()
        auth._forced_token = None
        third = auth.token_rejected()
        assert None not in (second, third) and len({token, second, third}) == 3
    finally:
        stop.set()
        thread.join(5)
    assert auth.assertions_signed == 3


def test_msal_own_certificate_credential_replays_its_assertion(app_provider: OidcProvider, tls: TlsFiles,
                                                               app_cert: CertificateFiles) -> None:
    """Why the agent signs its own: msal's {"private_key", "public_certificate"} credential sends
    the same assertion again on a second token request soon after the first."""
    app = msal.ConfidentialClientApplication(
        f"{app_provider.client_id}-app", oidc_authority=app_provider.issuer,
        client_credential={"private_key": app_cert.private_key_file.read_text(),
                           "public_certificate": app_cert.certificate_file.read_text()},
        http_client=CaSession(tls.ca_file))
    first = app.acquire_token_for_client([app_provider.scope])
    assert "access_token" in first, first
    app.remove_tokens_for_client()
    second = app.acquire_token_for_client([app_provider.scope])
    assert "access_token" not in second and second.get("error") == "invalid_client", second
    details = [e.get("error_detail", "") for e in app_provider.events("grant.error")]
    assert "client assertion tokens must only be used once" in details, details
