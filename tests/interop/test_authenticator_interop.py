"""The agent's sign-in component (agent.signin.authenticator.Authenticator) against outside peers, with a person
in Chromium: a certified OpenID provider (oidc-provider) and our simulated Entra ID's page.

What a user would notice: the code on the device works in a browser, a restart does not ask for
a new code, a refresh keeps working when the provider rotates refresh tokens, and revoking the
device at the provider (or declining) makes the device show a fresh code by itself.
"""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path
from typing import Any

import pytest

from agent.config import AuthSettings
from agent.signin.authenticator import Authenticator, Timing
from agent.sim.idp import SimIdp
from agent.sim.tls import TlsFiles
from agent.state import AgentState
from tests.fixtures.idp import SIM_SCOPES
from tests.interop.browser import Browser
from tests.interop.flows import StateLog, running, verify_access_token
from tests.interop.peers import OidcProvider

pytestmark = [pytest.mark.slow, pytest.mark.browser]

# Short back-offs so a transient hiccup costs the test a second, not minutes.
FAST = Timing(backoff_initial_s=0.5, backoff_max_s=2.0, config_backoff_initial_s=1.0,
              config_backoff_max_s=2.0, wait_slice_s=0.05)


def oidc_settings(provider: OidcProvider, **over: Any) -> AuthSettings:
    """[auth] as a user would write it for a generic OIDC provider."""
    values: dict[str, Any] = dict(client_id=provider.client_id, scopes=(provider.scope,),
                                  oidc_authority=provider.issuer, ca_file=str(provider.ca_file),
                                  timeout_s=10.0)
    values.update(over)
    return AuthSettings(**values)


def cached_refresh_tokens(cache_path: Path) -> list[str]:
    data = json.loads(cache_path.read_text())
    return [rt["secret"] for rt in data.get("RefreshToken", {}).values()]


def new_agent(settings: AuthSettings, cache_path: Path,
              timing: Timing = FAST) -> tuple[Authenticator, StateLog]:
    state = AgentState()
    return Authenticator(settings, cache_path, state, device_id="interop-01", timing=timing), StateLog(state)


def test_sign_in_restart_and_forced_refresh_with_rotating_refresh_tokens(
        oidc_provider: OidcProvider, browser: Browser, state_dir: Path) -> None:
    settings = oidc_settings(oidc_provider)
    cache_path = state_dir / "token_cache.json"

    auth, states = new_agent(settings, cache_path)
    with running(auth):
        code = states.wait_for(lambda s: s.code is not None, "a device code").code
        assert code is not None
        # oidc-provider sends the complete URI (the QR holds it), no interval, no message.
        assert code.verification_uri_complete == f"{code.verification_uri}?user_code={code.user_code}"
        assert code.qr_uri == code.verification_uri_complete
        assert code.interval_s == 5.0   # RFC 8628's default, since the provider sent none
        assert code.user_code in code.public("interop-01")["message"]
        browser.sign_in_oidc(code.verification_uri_complete, user_code=code.user_code, login="ada")
        states.wait_for(lambda s: s.phase == "signed_in", "signed in")
        first = auth.access_token()
    assert first is not None
    assert verify_access_token(oidc_provider, first)["sub"] == "ada"
    assert stat.S_IMODE(cache_path.stat().st_mode) == 0o600
    [rt_signed_in] = cached_refresh_tokens(cache_path)

    # Restart: the cache is enough, no code is shown and none is requested from the provider.
    issued_before = len(oidc_provider.events("device_authorization.success"))
    revoked_before = len(oidc_provider.events("grant.revoked"))
    auth, states = new_agent(settings, cache_path)
    with running(auth):
        states.wait_for(lambda s: s.phase == "signed_in", "signed in from the cache")
        # The API answered 401: one forced refresh, which rotates the refresh token.
        second = auth.token_rejected()
        assert second is not None and second != first
        assert verify_access_token(oidc_provider, second)["sub"] == "ada"
    assert states.codes() == []
    [rt_rotated] = cached_refresh_tokens(cache_path)
    assert rt_rotated != rt_signed_in   # the rotated token reached the file

    # A third start refreshes with what the file holds. Had the agent kept the old refresh
    # token, this replay would make the provider revoke the whole grant.
    auth, states = new_agent(settings, cache_path)
    with running(auth):
        states.wait_for(lambda s: s.phase == "signed_in", "signed in from the rotated cache")
        third = auth.token_rejected()
        assert third is not None
    assert states.codes() == []
    assert len(oidc_provider.events("device_authorization.success")) == issued_before
    assert len(oidc_provider.events("grant.revoked")) == revoked_before


def test_revoked_grant_makes_the_device_show_a_new_code_by_itself(
        oidc_provider: OidcProvider, browser: Browser, state_dir: Path) -> None:
    timing = Timing(backoff_initial_s=0.5, backoff_max_s=2.0, config_backoff_initial_s=1.0,
                    config_backoff_max_s=2.0, wait_slice_s=0.05, refresh_every_s=1.0)
    auth, states = new_agent(oidc_settings(oidc_provider), state_dir / "token_cache.json", timing)
    with running(auth):
        first = states.wait_for(lambda s: s.code is not None, "a device code").code
        assert first is not None
        browser.sign_in_oidc(first.verification_uri_complete, user_code=first.user_code)
        states.wait_for(lambda s: s.phase == "signed_in", "signed in")
        mark = states.mark()

        assert oidc_provider.revoke_all() >= 1   # an admin removes the device's access

        renewed = states.wait_for(lambda s: s.code is not None and s.code.user_code != first.user_code,
                                  "a new code after the revocation", timeout_s=20).code
        assert renewed is not None
        assert auth.access_token() is None
        assert any(s.phase != "signed_in" for s in states.since(mark))
        # ...and the new code signs the device in again.
        browser.sign_in_oidc(renewed.verification_uri_complete, user_code=renewed.user_code, login="ada")
        shown_at = renewed_version(states, renewed.user_code)
        states.wait_for(lambda s: s.phase == "signed_in" and s.version > shown_at, "signed in again")
        token = auth.access_token()
    assert token is not None and verify_access_token(oidc_provider, token)["sub"] == "ada"


def renewed_version(states: StateLog, user_code: str) -> int:
    """Version of the first snapshot that showed ``user_code``."""
    return next(s.version for s in states.history if s.code is not None and s.code.user_code == user_code)


def test_aborting_at_the_provider_counts_as_declined_and_a_new_code_follows(
        oidc_provider: OidcProvider, browser: Browser, state_dir: Path) -> None:
    auth, states = new_agent(oidc_settings(oidc_provider), state_dir / "token_cache.json")
    with running(auth):
        first = states.wait_for(lambda s: s.code is not None, "a device code").code
        assert first is not None
        browser.sign_in_oidc(first.verification_uri_complete, user_code=first.user_code, abort=True)
        states.wait_for(lambda s: s.code is not None and s.code.user_code != first.user_code,
                        "a new code after the abort", timeout_s=20)
    assert any(s.notice == "sign-in declined" for s in states.history)
    assert all(s.phase != "signed_in" for s in states.history)


def test_unknown_client_id_at_the_provider_is_one_clear_config_error_and_no_code(
        oidc_provider: OidcProvider, state_dir: Path) -> None:
    """oidc-provider answers 401 invalid_client: the device must say what to fix, not show a code."""
    settings = oidc_settings(oidc_provider, client_id="not-registered")
    auth, states = new_agent(settings, state_dir / "token_cache.json")
    with running(auth):
        failed = states.wait_for(lambda s: s.phase == "error", "a configuration error", timeout_s=10)
    assert failed.error is not None and "auth.client_id" in failed.error
    assert states.codes() == []


def test_the_scopes_oidc_guides_suggest_work_against_the_provider(
        oidc_provider: OidcProvider, browser: Browser, state_dir: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """scopes = ["openid", "offline_access", <api>]: msal refuses reserved scopes before any
    request, so the agent drops them (one warning naming auth.scopes) instead of blaming the IdP."""
    caplog.set_level(logging.WARNING, logger="agent")
    settings = oidc_settings(oidc_provider, scopes=("openid", "offline_access", oidc_provider.scope))
    auth, states = new_agent(settings, state_dir / "token_cache.json")
    with running(auth):
        code = states.wait_for(lambda s: s.code is not None, "a device code").code
        assert code is not None and code.verification_uri_complete is not None
        browser.sign_in_oidc(code.verification_uri_complete, user_code=code.user_code, login="ada")
        states.wait_for(lambda s: s.phase == "signed_in", "signed in")
        token = auth.token_rejected()            # a refresh works with the effective scopes too
    assert token is not None and verify_access_token(oidc_provider, token)["sub"] == "ada"
    assert all(s.phase != "error" for s in states.history), [s.error for s in states.history]
    warnings = [r.getMessage() for r in caplog.records if "auth.scopes" in r.getMessage()]
    assert len(warnings) == 1 and "openid" in warnings[0] and "offline_access" in warnings[0]


# ---- our simulated Entra ID, through its /devicelogin page ---------------------------------------

def _sim_settings(idp: SimIdp, tls: TlsFiles) -> AuthSettings:
    return AuthSettings(client_id=idp.client_id or "sim-device-agent", scopes=SIM_SCOPES,
                        authority=idp.authority, instance_discovery=False, ca_file=str(tls.ca_file),
                        timeout_s=10.0)


def test_entra_sim_person_types_the_code_and_the_device_signs_in(
        idp: SimIdp, tls: TlsFiles, browser: Browser, state_dir: Path) -> None:
    idp.set(interval_s=1)   # Entra says 5; 1 keeps the test short without changing the flow
    auth, states = new_agent(_sim_settings(idp, tls), state_dir / "token_cache.json")
    with running(auth):
        code = states.wait_for(lambda s: s.code is not None, "a device code").code
        assert code is not None
        assert code.verification_uri_complete is None and code.qr_uri == idp.devicelogin_url
        outcome = browser.sign_in_entra_sim(idp.devicelogin_url, code.user_code, account="ada")
        assert "You have signed in" in outcome
        signed_in = states.wait_for(lambda s: s.phase == "signed_in", "signed in")
        assert signed_in.account == "ada"   # the account the person chose on the page
        token = auth.access_token()
    assert token is not None
    assert idp.code_status(code.user_code) == "redeemed"


def test_entra_sim_decline_button_gives_declined_then_a_new_code(
        idp: SimIdp, tls: TlsFiles, browser: Browser, state_dir: Path) -> None:
    idp.set(interval_s=1)
    auth, states = new_agent(_sim_settings(idp, tls), state_dir / "token_cache.json")
    with running(auth):
        first = states.wait_for(lambda s: s.code is not None, "a device code").code
        assert first is not None
        outcome = browser.sign_in_entra_sim(idp.devicelogin_url, first.user_code, decline=True)
        assert "declined" in outcome
        renewed = states.wait_for(lambda s: s.code is not None and s.code.user_code != first.user_code,
                                  "a new code after declining", timeout_s=20).code
        assert renewed is not None
    assert idp.code_status(first.user_code) == "declined"
    assert any(s.notice == "sign-in declined" for s in states.history)
    assert auth.access_token() is None
