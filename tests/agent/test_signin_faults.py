"""Sign-in faults a box meets in the field (issue 11), through the real msal against the
simulated Entra ID over HTTPS on loopback.

Each test is one thing a person would notice otherwise: a device hammering its IdP (and the
journal) during an outage, a working refresh token thrown away after a clock jump, a code that
vanishes from the screen while it is still valid, a refresh on every upload, a warning blamed
on the IdP for a configuration matter. Where hours pass, the Authenticator gets a shifted
monotonic clock (``Shift``); msal and the sim keep the real wall clock unless a test moves it.
"""

# ruff: noqa: F811 - the sign-in fixtures of test_auth.py are imported and then requested by name

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import jwt
import pytest

from agent.config import AuthSettings
from agent.signin.authenticator import REPEAT_WARNING_S, Timing, claims_json
from agent.sim.idp import SimIdp
from agent.state import AgentState
from tests.agent.test_auth import (  # noqa: F401 - fixtures are found by name
    FAST,
    YEAR_S,
    Harness,
    cache_path,
    cache_secrets,
    fast_idp,
    harness,
    signed_in_cache,
    token_posts,
    write_cache,
)
from tests.agent.test_config import auth, make_config, run_check
from tests.waiting import wait_until


class Shift:
    """A monotonic clock that runs and that tests move forward: ``time.monotonic() + offset``.
    (tests/fixtures/clock.py's FakeClock stands still, but the sign-in thread's pacing and
    msal's poll loop need time to pass while a test waits on the real IdP.)"""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


def claims_of(token: str) -> dict[str, object]:
    return jwt.decode(token, options={"verify_signature": False})


def failed_refreshes(idp: SimIdp) -> list[object]:
    return [r for r in token_posts(idp, "refresh_token") if r.status >= 500]


def refresh_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name.startswith("agent.signin") and r.levelno == logging.WARNING
            and "token refresh failed" in r.getMessage()]


# ---- 1. a new-code request while a saved sign-in is restored ----------------------------------

@pytest.mark.slow   # real back-off seconds: the bug was a 1 s retry loop
def test_new_code_requests_while_restoring_a_saved_sign_in_never_shorten_the_back_off(
        fast_idp: SimIdp, harness: Callable[..., Harness], cache_path: Path) -> None:
    data = signed_in_cache(fast_idp, harness, cache_path)
    data["AccessToken"] = {}                  # the restore must ask the IdP
    write_cache(cache_path, data)
    fast_idp.set(fail_token_next=10**6, fail_status=503)   # Wi-Fi up, IdP down, at boot
    h = harness(timing=dataclasses.replace(FAST, backoff_initial_s=3.0, backoff_max_s=6.0))
    first = wait_until(lambda: failed_refreshes(fast_idp), what="the first restore attempt")[0]
    # Someone presses the button, impatiently: there is no code flow to shorten.
    assert [h.auth.request_new_code() for _ in range(5)] == [False] * 5
    time.sleep(max(0.0, first.time + 1.4 - time.monotonic()))   # the back-off is >= 1.5 s
    assert len(failed_refreshes(fast_idp)) == 1, "a new-code request cut the back-off short"
    assert h.codes_seen() == []

    fast_idp.set(fail_token_next=0)           # the IdP is back: restored, no code needed
    h.wait_signed_in(timeout_s=10)
    assert h.codes_seen() == []

    # A later outage: nothing left over from the presses makes its waits return at once.
    fast_idp.set(fail_token_next=10**6)
    n = len(token_posts(fast_idp, "refresh_token"))
    assert h.auth.token_rejected() is None
    t_fail = time.monotonic()
    while time.monotonic() < t_fail + 1.2:
        assert h.auth.access_token() is None  # the refused token is not handed out again
        time.sleep(0.01)
    assert len(token_posts(fast_idp, "refresh_token")) == n + 1


@pytest.mark.slow   # real back-off seconds
def test_a_new_code_request_while_the_idp_is_down_costs_one_attempt_not_a_loop(
        idp: SimIdp, harness: Callable[..., Harness]) -> None:
    idp.set(fail_discovery_next=10**6)         # no code yet: the code flow is what waits

    def discoveries() -> list[object]:
        return [r for r in list(idp.requests) if r.path.endswith("/openid-configuration")]

    h = harness(timing=dataclasses.replace(FAST, backoff_initial_s=3.0, backoff_max_s=6.0))
    wait_until(discoveries, what="the first attempt")
    time.sleep(0.3)
    assert h.auth.request_new_code() is True   # "try now": honoured at once...
    second = wait_until(lambda: len(discoveries()) >= 2 and discoveries()[1], timeout_s=1.5,
                        what="the attempt the request asked for")
    time.sleep(max(0.0, second.time + 1.4 - time.monotonic()))
    assert len(discoveries()) == 2, "...but it must not leave the waits cut short"


# ---- 2. refreshes for the uploader share the sign-in back-off -----------------------------------

def test_expired_token_with_idp_down_costs_a_few_attempts_and_warnings_an_hour(
        fast_idp: SimIdp, harness: Callable[..., Harness], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent.signin")
    fast_idp.auto_approve_after_s = 0
    clock = Shift()
    h = harness(timing=dataclasses.replace(Timing(), wait_slice_s=0.05), clock=clock)  # production back-off
    h.wait_signed_in()
    fast_idp.set(fail_token_next=10**9, fail_status=503)
    before = len(token_posts(fast_idp, "refresh_token"))
    # An hour of uploader steps, one every 2 s, all after the token expired (monotonic clock).
    for step in range(1800):
        clock.offset = 3600.0 + 2.0 * step
        assert h.auth.access_token() is None
    attempts = len(token_posts(fast_idp, "refresh_token")) - before
    assert 5 <= attempts <= 40, f"{attempts} refresh attempts in an hour (was ~1,800)"
    warnings = refresh_warnings(caplog)
    assert 1 + 3 <= len(warnings) <= 1 + 3600 / REPEAT_WARNING_S, warnings
    assert "repeats are counted" in warnings[0]
    assert all("failed attempts" in w for w in warnings[1:]), warnings

    # The IdP comes back: the next allowed attempt gets a token, and the journal says so.
    fast_idp.set(fail_token_next=0)
    clock.offset += 301.0                      # beyond the longest back-off
    assert h.auth.access_token() is not None
    assert any("answers again" in r.getMessage() for r in caplog.records)


def test_proactive_refresh_waits_for_the_back_off_the_uploader_met(
        fast_idp: SimIdp, harness: Callable[..., Harness]) -> None:
    fast_idp.auto_approve_after_s = 0
    clock = Shift()
    h = harness(timing=dataclasses.replace(FAST, backoff_initial_s=600.0, backoff_max_s=1200.0,
                                           refresh_every_s=30.0), clock=clock)
    h.wait_signed_in()
    fast_idp.set(fail_token_next=10**6, fail_status=503)
    assert h.auth.token_rejected() is None     # the outage starts: back-off >= 300 s
    n = len(token_posts(fast_idp, "refresh_token"))
    clock.offset = 40.0                        # the proactive refresh is due, the back-off is not over
    time.sleep(0.5)
    assert len(token_posts(fast_idp, "refresh_token")) == n


# ---- 4. wall-clock jumps and 401s ---------------------------------------------------------------

def test_wall_clock_jump_back_never_makes_an_expired_token_fresh(
        fast_idp: SimIdp, harness: Callable[..., Harness], cache_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    fast_idp.auto_approve_after_s = 0
    clock = Shift()
    h = harness(clock=clock)
    h.wait_signed_in()
    codes = h.codes_seen()
    forced = h.auth.token_rejected()           # a forced refresh
    assert forced is not None
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() - YEAR_S)   # NTP sets a wrong clock right
    clock.offset = 3601.0                      # an hour later: that token has expired
    # msal now believes its cached token is valid for a year; the agent asks the IdP.
    after = h.auth.access_token()
    assert after is not None and after != forced
    # The API refuses tokens (its clock disagrees): refreshes, never a lost sign-in.
    assert h.auth.token_rejected() not in (None, after)
    assert h.auth.token_rejected() is not None
    assert h.snap.phase == "signed_in" and h.codes_seen() == codes
    assert cache_secrets(cache_path)["RefreshToken"]


def test_cached_token_at_start_lives_no_longer_than_it_was_issued_for(
        fast_idp: SimIdp, harness: Callable[..., Harness], cache_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    signed_in_cache(fast_idp, harness, cache_path)
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() - YEAR_S)   # a Pi booting with an old clock
    fast_idp.set(fail_token_next=10**6, fail_status=503)              # and no IdP yet
    clock = Shift()
    h = harness(clock=clock)
    h.wait_signed_in()                         # from the cache
    assert h.auth.access_token() is not None
    clock.offset = 3601.0                      # its real life (1 h) is over
    assert h.auth.access_token() is None


# ---- 12. refresh at half life ------------------------------------------------------------------

def test_300_s_tokens_are_refreshed_about_every_150_s_not_on_every_call(
        fast_idp: SimIdp, harness: Callable[..., Harness]) -> None:
    fast_idp.auto_approve_after_s = 0
    fast_idp.set(access_token_lifetime_s=300)  # Keycloak's default
    clock = Shift()
    h = harness(clock=clock)
    h.wait_signed_in()
    before = len(token_posts(fast_idp, "refresh_token"))
    tokens = set()
    for step in range(150):                    # 25 min of uploads every 10 s
        clock.offset = 10.0 * step
        token = h.auth.access_token()
        assert token is not None
        tokens.add(token)
    refreshes = len(token_posts(fast_idp, "refresh_token")) - before
    assert 8 <= refreshes <= 11, f"{refreshes} refreshes in 1,500 s of 300 s tokens"
    assert len(tokens) == refreshes + 1


# ---- 9. polling after failures ------------------------------------------------------------------

@pytest.mark.slow   # msal sleeps whole seconds between polls
def test_polls_after_a_5xx_keep_the_interval_in_force_including_slow_down(
        fast_idp: SimIdp, harness: Callable[..., Harness]) -> None:
    fast_idp.set(slow_down_polls=1)            # interval 1 s, +5 s after slow_down (RFC 8628 §3.5)
    h = harness()
    code = h.wait_code().code
    assert code is not None
    wait_until(lambda: token_posts(fast_idp, "device_code"), what="the first poll")
    fast_idp.set(fail_token_next=1, fail_status=503)
    polls = wait_until(lambda: len(token_posts(fast_idp, "device_code")) >= 3 and
                       token_posts(fast_idp, "device_code"), timeout_s=20, what="3 polls")
    assert [p.status for p in polls[:3]] == [400, 503, 400]   # slow_down, outage, pending
    gaps = [b.time - a.time for a, b in zip(polls, polls[1:3], strict=False)]
    assert gaps[0] >= 6 - 0.1, gaps           # slow_down raised the interval to 6 s
    assert gaps[1] >= 6 - 0.1, gaps           # and the 503 did not bring it down to 0.1 s
    assert h.codes_seen() == [code.user_code]


def test_temporarily_unavailable_while_polling_keeps_the_code_on_show(
        fast_idp: SimIdp, harness: Callable[..., Harness]) -> None:
    h = harness()
    code = h.wait_code().code
    assert code is not None
    shown = h.snap.version
    fast_idp.set(fail_token_next=2, fail_status=400)   # an OAuth "temporarily_unavailable" answer
    wait_until(lambda: len([p for p in token_posts(fast_idp, "device_code") if p.status == 400]) >= 2,
               timeout_s=8, what="2 temporarily_unavailable polls")
    fast_idp.approve(code.user_code)
    h.wait_signed_in(8)
    assert h.codes_seen() == [code.user_code]
    with h._cond:
        between = [s for _, s in h.timeline if s.version >= shown and s.phase != "signed_in"]
    assert between and all(s.code is not None and s.code.user_code == code.user_code for s in between)


# ---- the token interface: claims challenges -----------------------------------------------------

ACRS = {"access_token": {"acrs": {"essential": True, "value": "c1"}}}


@pytest.mark.parametrize("encode", [lambda c: base64.b64encode(json.dumps(c).encode()).decode(),
                                    json.dumps], ids=["base64", "json"])
def test_a_claims_challenge_is_answered_with_a_token_for_those_claims(
        fast_idp: SimIdp, harness: Callable[..., Harness], encode: Callable[[object], str]) -> None:
    fast_idp.auto_approve_after_s = 0
    h = harness()
    h.wait_signed_in()
    plain = h.auth.access_token()
    assert plain is not None and "acrs" not in claims_of(plain)
    fresh = h.auth.token_rejected(encode(ACRS))
    assert fresh is not None and claims_of(fresh)["acrs"] == "c1"
    assert json.loads(fast_idp.claims_requests[-1]) == ACRS
    assert h.auth.access_token() == fresh
    # The claims were for that one refresh; the next asks for none.
    n = len(fast_idp.claims_requests)
    assert h.auth.token_rejected() is not None
    assert len(fast_idp.claims_requests) == n


def test_claims_that_need_a_person_bring_a_code_whose_sign_in_meets_them(
        fast_idp: SimIdp, harness: Callable[..., Harness]) -> None:
    fast_idp.auto_approve_after_s = 0
    h = harness()
    h.wait_signed_in()
    fast_idp.auto_approve_after_s = None
    fast_idp.set(claims_need_sign_in=True)     # e.g. MFA: the refresh token cannot answer them
    assert h.auth.token_rejected(json.dumps(ACRS)) is None
    snap = h.wait_code(timeout_s=5)
    assert snap.code is not None
    fast_idp.approve(snap.code.user_code)
    h.wait_signed_in(8)
    token = h.auth.access_token()
    assert token is not None and claims_of(token)["acrs"] == "c1"


@pytest.mark.parametrize(("challenge", "expected"), [
    (None, None), ("", None), ("not base64!", None), (base64.b64encode(b"[1]").decode(), None),
    ('{"access_token": {"nbf": {"essential": true, "value": "1604106651"}}}',
     '{"access_token":{"nbf":{"essential":true,"value":"1604106651"}}}'),
    ("eyJhY2Nlc3NfdG9rZW4iOnsibmJmIjp7ImVzc2VudGlhbCI6dHJ1ZSwidmFsdWUiOiIxNjA0MTA2NjUxIn19fQ",
     '{"access_token":{"nbf":{"essential":true,"value":"1604106651"}}}'),
])
def test_claims_json_reads_what_a_www_authenticate_header_carries(
        challenge: str | None, expected: str | None) -> None:
    assert claims_json(challenge) == expected


# ---- 11. reserved OIDC scopes --------------------------------------------------------------------

def test_reserved_oidc_scopes_are_dropped_with_one_warning_and_sign_in_works(
        fast_idp: SimIdp, idp_settings: AuthSettings, harness: Callable[..., Harness],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="agent")
    settings = dataclasses.replace(
        idp_settings, scopes=("openid", "offline_access", "api://telemetry/Readings.Write"))
    fast_idp.auto_approve_after_s = 0
    h = harness(settings)
    h.wait_signed_in()
    assert h.auth.token_rejected() is not None
    token = h.auth.access_token()
    assert token is not None and claims_of(token)["scp"] == "Readings.Write"
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("agent")]
    scope_lines = [m for m in lines if "auth.scopes" in m]
    assert len(scope_lines) == 1, lines
    assert "openid" in scope_lines[0] and "offline_access" in scope_lines[0]
    assert not any("unreadable reply" in m for m in lines), lines
    assert all(s.phase != "error" for _, s in h.timeline)


def test_check_config_shows_the_effective_scopes_and_warns_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = make_config(tmp_path, auth=auth(
        scopes='["openid", "offline_access", "api://telemetry/Readings.Write", "openid"]'))
    code, out, err = run_check(path, capsys)
    assert code == 0
    shown = json.loads(out)["auth"]
    assert shown["scopes"] == ["api://telemetry/Readings.Write"]
    assert shown["dropped_scopes"] == ["openid", "offline_access"]
    warnings = [line for line in err.splitlines() if "auth.scopes" in line]
    assert len(warnings) == 1 and "openid, offline_access" in warnings[0], err


def test_only_reserved_scopes_are_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = run_check(make_config(tmp_path, auth=auth(scopes='["openid", "profile"]')), capsys)
    assert code == 78
    assert err.startswith("config error: ") and ": auth.scopes: " in err and len(err.splitlines()) == 1


# ---- issue 10: named transitions, atomic state ------------------------------------------------

def test_a_refused_refresh_token_never_shows_a_transient_error_phase(
        fast_idp: SimIdp, harness: Callable[..., Harness]) -> None:
    fast_idp.auto_approve_after_s = 0
    h = harness()
    h.wait_signed_in()
    fast_idp.auto_approve_after_s = None
    mark = h.snap.version
    fast_idp.revoke_refresh_tokens()
    assert h.auth.token_rejected() is None     # the IdP refuses the refresh token: only now lost
    snap = h.wait_code(timeout_s=5)
    with h._cond:
        after = [s for _, s in h.timeline if s.version > mark]
    assert [s.phase for s in after if s.phase != "signing_in"] == [], [s.phase for s in after]
    assert snap.account is None and snap.notice is not None


def test_set_link_from_many_threads_loses_no_update() -> None:
    state = AgentState()
    names = [[f"t{t}-{i}" for i in range(300)] for t in range(6)]
    start = threading.Barrier(len(names))

    def worker(mine: list[str]) -> None:
        start.wait()
        for name in mine:
            state.set_link(name, "up")

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)               # hand the GIL over as often as possible
    try:
        threads = [threading.Thread(target=worker, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert len(state.snapshot.links) == 6 * 300
    assert state.snapshot.version == 6 * 300
