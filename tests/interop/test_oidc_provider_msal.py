"""msal against a certified OpenID provider (oidc-provider), with a person signing in in Chromium.

These pin down what the outside world sends and which msal behaviours bite, so the agent's
adaptations (docs/INTEROP.md) rest on observed facts rather than on our own simulator.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import msal
import pytest

from agent.sim.server import JsonHandler, LoopbackHTTPSServer
from agent.sim.tls import TlsFiles, make_tls
from tests.interop.browser import Browser, SignInFailed
from tests.interop.flows import (
    jwt_header,
    msal_app,
    refresh_token_of,
    sign_in_while_polling,
    verify_access_token,
)
from tests.interop.peers import OidcProvider

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def test_provider_device_authorization_sends_complete_uri_but_no_interval_or_message(
        oidc_provider: OidcProvider) -> None:
    with oidc_provider.http() as http:
        r = http.post(oidc_provider.device_authorization_endpoint,
                      data={"client_id": oidc_provider.client_id,
                            "scope": f"openid offline_access {oidc_provider.scope}"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"device_code", "user_code", "verification_uri", "verification_uri_complete",
                         "expires_in"}
    assert body["verification_uri"] == f"{oidc_provider.issuer}/device"
    query = parse_qs(urlsplit(body["verification_uri_complete"]).query)
    assert query == {"user_code": [body["user_code"]]}
    assert body["expires_in"] == 600
    # msal fills the gap with its own default of 5 s; "message" stays absent.
    flow = msal_app(oidc_provider).initiate_device_flow(scopes=[oidc_provider.scope])
    assert flow["interval"] == 5 and "message" not in flow and "user_code" in flow


def test_msal_signs_in_through_browser_with_verification_uri_complete(
        oidc_provider: OidcProvider, browser: Browser) -> None:
    cache = msal.SerializableTokenCache()
    app = msal_app(oidc_provider, cache=cache)
    flow = app.initiate_device_flow(scopes=[oidc_provider.scope])
    assert "user_code" in flow, flow
    blocked_before = len(browser.blocked)

    result = sign_in_while_polling(app, flow, lambda: browser.sign_in_oidc(
        flow["verification_uri_complete"], user_code=flow["user_code"], login="ada"))

    assert "access_token" in result, result.get("error_description")
    assert result["scope"] == oidc_provider.scope
    assert jwt_header(result["access_token"])["alg"] == "RS256"
    assert jwt_header(result["access_token"])["typ"] == "at+jwt"
    claims = verify_access_token(oidc_provider, result["access_token"])
    assert claims["sub"] == "ada" and claims["scope"] == oidc_provider.scope
    assert claims["client_id"] == oidc_provider.client_id
    assert result["id_token_claims"]["sub"] == "ada"
    [account] = app.get_accounts()
    assert account["home_account_id"] == "ada"
    # The provider's pages pull a web font from the internet: the browser must not reach it.
    assert any("fonts.googleapis.com" in url for url in browser.blocked[blocked_before:])


def test_msal_signs_in_with_a_typed_code(oidc_provider: OidcProvider, browser: Browser) -> None:
    app = msal_app(oidc_provider)
    flow = app.initiate_device_flow(scopes=[oidc_provider.scope])

    result = sign_in_while_polling(app, flow, lambda: browser.sign_in_oidc(
        verification_uri=flow["verification_uri"], user_code=flow["user_code"].lower(), login="grace"))

    assert "access_token" in result, result.get("error_description")
    assert verify_access_token(oidc_provider, result["access_token"])["sub"] == "grace"


def test_person_aborting_on_the_confirm_page_ends_polling_with_access_denied(
        oidc_provider: OidcProvider, browser: Browser) -> None:
    app = msal_app(oidc_provider)
    flow = app.initiate_device_flow(scopes=[oidc_provider.scope])
    seen: list[str] = []

    result = sign_in_while_polling(app, flow, lambda: seen.append(browser.sign_in_oidc(
        flow["verification_uri_complete"], user_code=flow["user_code"], abort=True)))

    assert result.get("error") == "access_denied"
    assert "access_token" not in result
    assert seen == ["The Sign-in request was interrupted"]


def test_confirm_page_showing_another_code_is_refused_by_the_person(
        oidc_provider: OidcProvider, browser: Browser) -> None:
    app = msal_app(oidc_provider)
    flow = app.initiate_device_flow(scopes=[oidc_provider.scope])
    with pytest.raises(SignInFailed, match="page shows code"):
        browser.sign_in_oidc(flow["verification_uri_complete"], user_code="WRONG-CODE")


def _signed_in_cache(provider: OidcProvider, browser: Browser) -> msal.SerializableTokenCache:
    cache = msal.SerializableTokenCache()
    app = msal_app(provider, cache=cache)
    flow = app.initiate_device_flow(scopes=[provider.scope])
    result = sign_in_while_polling(app, flow, lambda: browser.sign_in_oidc(
        flow["verification_uri_complete"], user_code=flow["user_code"]))
    assert "access_token" in result, result.get("error_description")
    return cache


def _copy(cache: msal.SerializableTokenCache) -> msal.SerializableTokenCache:
    clone = msal.SerializableTokenCache()
    clone.deserialize(cache.serialize())
    return clone


def test_refresh_needs_exclude_profile_and_rotates_the_refresh_token(
        oidc_provider: OidcProvider, browser: Browser) -> None:
    cache = _signed_in_cache(oidc_provider, browser)
    first_rt = refresh_token_of(cache)

    # msal adds "profile" to every request; this provider does not know it, so the refresh
    # asks for a scope the grant never had.
    plain = msal_app(oidc_provider, exclude_profile=False, cache=_copy(cache))
    [account] = plain.get_accounts()
    refused = plain.acquire_token_silent_with_error([oidc_provider.scope], account, force_refresh=True)
    assert refused is not None and refused["error"] == "invalid_scope"

    app = msal_app(oidc_provider, cache=cache)
    [account] = app.get_accounts()
    consumed_before = len(oidc_provider.events("refresh_token.consumed"))
    refreshed = app.acquire_token_silent_with_error([oidc_provider.scope], account, force_refresh=True)

    assert refreshed is not None and "access_token" in refreshed, refreshed
    assert verify_access_token(oidc_provider, refreshed["access_token"])["sub"] == "ada"
    assert refresh_token_of(cache) != first_rt  # rotated on use
    assert len(oidc_provider.events("refresh_token.consumed")) == consumed_before + 1


def test_replaying_a_rotated_refresh_token_revokes_the_whole_grant(
        oidc_provider: OidcProvider, browser: Browser) -> None:
    """Why the agent must persist its cache right after every refresh."""
    cache = _signed_in_cache(oidc_provider, browser)
    stale = _copy(cache)  # what a device that did not save after refreshing would still hold
    app = msal_app(oidc_provider, cache=cache)
    [account] = app.get_accounts()
    assert "access_token" in (app.acquire_token_silent_with_error(
        [oidc_provider.scope], account, force_refresh=True) or {})

    old = msal_app(oidc_provider, cache=stale)
    replay = old.acquire_token_silent_with_error([oidc_provider.scope], old.get_accounts()[0],
                                                 force_refresh=True)
    assert replay is not None and replay["error"] == "invalid_grant"

    # The replay also killed the good token: only a new device code helps now.
    fresh = msal_app(oidc_provider, cache=cache)
    after = fresh.acquire_token_silent_with_error([oidc_provider.scope], fresh.get_accounts()[0],
                                                  force_refresh=True)
    assert after is not None and after["error"] == "invalid_grant"
    assert oidc_provider.events("grant.revoked")


def test_admin_revoke_all_forces_a_new_sign_in(oidc_provider: OidcProvider, browser: Browser) -> None:
    cache = _signed_in_cache(oidc_provider, browser)
    assert oidc_provider.revoke_all() >= 1
    app = msal_app(oidc_provider, cache=cache)
    refused = app.acquire_token_silent_with_error([oidc_provider.scope], app.get_accounts()[0],
                                                  force_refresh=True)
    assert refused is not None and refused["error"] == "invalid_grant"


class _Hello(JsonHandler):
    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self.send_raw(200, b"<title>hello</title>", "text/html")


def test_browser_verifies_certificates_other_than_the_test_one(
        browser: Browser, tmp_path: Path, tls: TlsFiles) -> None:
    """The pin is for the test certificate only: a browser that ignored TLS errors would pass
    every sign-in test while hiding a real certificate problem."""
    trusted = LoopbackHTTPSServer("127.0.0.1", 0, _Hello, tls).start()
    stranger = LoopbackHTTPSServer("127.0.0.1", 0, _Hello, make_tls(tmp_path / "other")).start()
    try:
        with browser.page() as page:
            page.goto(trusted.base_url + "/")
            assert page.title() == "hello"
            with pytest.raises(Exception, match="ERR_CERT"):
                page.goto(stranger.base_url + "/")
    finally:
        trusted.stop()
        stranger.stop()

