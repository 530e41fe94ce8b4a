"""Sign-in with the real msal over HTTPS against the simulated Entra ID (agent/sim/idp.py).

A real Authenticator runs in its thread; the tests act as the person at the sign-in page
(``idp.approve`` / ``idp.decline``) and as the IdP's bad days (switches), and watch what
people would see: AgentState snapshots, the journal (log records) and the token cache file.
msal's poll loop sleeps whole seconds, so the IdP is set to ``interval_s=1`` and short expiries.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import trustme

from agent.config import AuthSettings
from agent.signin.aadsts import AADSTS
from agent.signin.authenticator import Authenticator, Timing
from agent.signin.token_cache import _check
from agent.sim.idp import DEFAULT_USER, SimIdp
from agent.sim.tls import TlsFiles
from agent.state import AgentState, Snapshot
from tests.waiting import wait_until

YEAR_S = 365 * 24 * 3600.0

# Short back-offs so failure tests take fractions of a second; production values are minutes.
FAST = Timing(backoff_initial_s=0.1, backoff_max_s=0.8, config_backoff_initial_s=0.4,
              config_backoff_max_s=1.6, refresh_every_s=12 * 3600.0, refresh_margin_max_s=300.0,
              wait_slice_s=0.05)


class Harness:
    """An Authenticator thread plus a timeline of snapshots ``(monotonic, Snapshot)``."""

    def __init__(self, settings: AuthSettings, cache_path: Path, *, timing: Timing = FAST,
                 **kw: Any) -> None:
        self.state = AgentState()
        self.timeline: list[tuple[float, Snapshot]] = []
        self._cond = threading.Condition()
        self.state.subscribe(self._observe)
        self.auth = Authenticator(settings, cache_path, self.state, device_id="dev-1", timing=timing, **kw)
        self.cache_path = cache_path
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.auth.run, args=(self.stop_event,), name="auth-test",
                                       daemon=True)

    def _observe(self, snap: Snapshot) -> None:
        with self._cond:
            self.timeline.append((time.monotonic(), snap))
            self._cond.notify_all()

    def start(self) -> Harness:
        self.thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> float:
        """Stop the thread; returns how long run() took to return."""
        t0 = time.monotonic()
        self.stop_event.set()
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            raise AssertionError(f"Authenticator.run did not return within {timeout_s} s of stop")
        return time.monotonic() - t0

    @property
    def snap(self) -> Snapshot:
        return self.state.snapshot

    def wait_for(self, pred: Callable[[Snapshot], bool], timeout_s: float = 10.0,
                 what: str = "condition") -> Snapshot:
        """The first snapshot from now on (including the current one) that satisfies ``pred``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                snap = self.state.snapshot
                if pred(snap):
                    return snap
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; "
                                         f"last snapshot: {describe(snap)}")
                self._cond.wait(left)

    def wait_signed_in(self, timeout_s: float = 10.0) -> Snapshot:
        return self.wait_for(lambda s: s.phase == "signed_in", timeout_s, "signed_in")

    def wait_code(self, other_than: str | None = None, timeout_s: float = 10.0) -> Snapshot:
        return self.wait_for(lambda s: s.code is not None and s.code.user_code != other_than,
                             timeout_s, f"a code other than {other_than}")

    def first_time(self, pred: Callable[[Snapshot], bool], after: float = 0.0) -> float | None:
        with self._cond:
            for t, s in self.timeline:
                if t >= after and pred(s):
                    return t
        return None

    def codes_seen(self) -> list[str]:
        out: list[str] = []
        with self._cond:
            for _, s in self.timeline:
                if s.code is not None and (not out or out[-1] != s.code.user_code):
                    out.append(s.code.user_code)
        return out


def describe(snap: Snapshot) -> str:
    d = dataclasses.asdict(snap)
    if snap.code is not None:
        d["code"] = snap.code.user_code
    return repr({k: d[k] for k in ("phase", "account", "code", "error", "notice", "renewals_exhausted",
                                   "links")})


def cache_secrets(cache_path: Path) -> dict[str, list[str]]:
    """The token strings in an MSAL cache file, by kind (tests search logs for them)."""
    data = json.loads(cache_path.read_text())
    out: dict[str, list[str]] = {}
    for section in ("AccessToken", "RefreshToken", "IdToken"):
        out[section] = [e["secret"] for e in data.get(section, {}).values() if e.get("secret")]
    return out


def token_posts(idp: Any, grant_suffix: str) -> list[Any]:
    """Token-endpoint requests whose grant type ends with ``grant_suffix`` (e.g. 'device_code')."""
    return [r for r in list(idp.requests)
            if r.path.endswith("/token") and (r.grant_type or "").endswith(grant_suffix)]


def devicecode_posts(idp: Any) -> list[Any]:
    return [r for r in list(idp.requests) if r.path.endswith("/devicecode")]




# ---- fixtures ------------------------------------------------------------------------------------

@pytest.fixture
def cache_path(state_dir: Path) -> Path:
    return state_dir / "token_cache.json"


@pytest.fixture
def fast_idp(idp: SimIdp) -> SimIdp:
    """The sim IdP with a 1 s poll interval (msal sleeps the interval between polls)."""
    idp.set(interval_s=1)
    return idp


@pytest.fixture
def harness(idp_settings: AuthSettings, cache_path: Path) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(settings: AuthSettings | None = None, *, start: bool = True, **kw: Any) -> Harness:
        h = Harness(settings or idp_settings, cache_path, **kw)
        made.append(h)
        return h.start() if start else h

    yield make
    for h in made:
        if h.thread.is_alive():
            h.stop()


def sign_in(h: Harness, idp: SimIdp) -> Snapshot:
    """Approve whatever code the agent shows and wait for the signed-in snapshot."""
    snap = h.wait_code()
    assert snap.code is not None
    idp.approve(snap.code.user_code)
    return h.wait_signed_in()


# ---- first sign-in, restart, refresh ------------------------------------------------------------

def test_the_first_poll_leaves_the_code_a_moment_to_be_drawn(
        fast_idp: SimIdp, harness: Callable[..., Harness]) -> None:
    # Nobody can have typed the code within a fifth of a second; a token request then would
    # only take the CPU from drawing it (FIRST_POLL_AFTER_S; docs/PERFORMANCE.md "Sign-in").
    h = harness()
    h.wait_code()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(r.grant_type for r in list(fast_idp.requests)):
        time.sleep(0.02)
    requests_ = list(fast_idp.requests)
    issued = next(r.time for r in requests_ if r.path.endswith("/devicecode"))
    polled = next(r.time for r in requests_ if r.grant_type)
    assert polled - issued >= 0.2



def test_first_sign_in_publishes_code_logs_it_and_signs_in(
        fast_idp: SimIdp, harness: Callable[..., Harness], cache_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent.signin.authenticator")
    h = harness()
    issued = fast_idp.wait_for_code(5)
    t_issued = time.monotonic()
    snap = h.wait_code()
    # Published to the state (screen, MQTT) within 1 s, exactly as the IdP sent it.
    assert snap.code is not None and snap.code.user_code == issued
    assert h.first_time(lambda s: s.code is not None) is not None
    assert (h.first_time(lambda s: s.code is not None) or 0) - t_issued < 1.0
    assert snap.phase == "signing_in"
    assert snap.code.verification_uri == fast_idp.devicelogin_url
    assert snap.code.interval_s == 1
    assert 890 < snap.code.seconds_left() <= 900
    # The journal announcer: code and URI at INFO.
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert (f"To sign in, open {fast_idp.devicelogin_url} and enter the code {issued} "
            f"(expires in 15 min); the code is for device dev-1") in lines

    fast_idp.approve(issued, user="grace@contoso.example")
    snap = h.wait_signed_in(5)
    assert snap.account == "grace@contoso.example"
    assert snap.code is None and snap.error is None
    assert snap.links.get("idp") == "up"

    token = h.auth.access_token()
    assert token is not None
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["aud"] == "api://telemetry" and claims["preferred_username"] == "grace@contoso.example"
    # Persisted at once, private, with the refresh token.
    assert stat.S_IMODE(cache_path.stat().st_mode) == 0o600
    secrets = cache_secrets(cache_path)
    assert secrets["RefreshToken"] and token in secrets["AccessToken"]
    assert h.auth.request_new_code() is False   # nothing to renew while signed in


def test_restart_with_cache_signs_in_without_a_code(
        fast_idp: SimIdp, harness: Callable[..., Harness]) -> None:
    fast_idp.auto_approve_after_s = 0
    first = harness()
    first.wait_signed_in()
    first.stop()
    codes_before = len(devicecode_posts(fast_idp))

    refreshes_before = len(token_posts(fast_idp, "refresh_token"))

    second = harness()          # a new process would build exactly this: same cache file
    snap = second.wait_signed_in(5)
    assert snap.account == DEFAULT_USER
    assert second.codes_seen() == []
    assert len(devicecode_posts(fast_idp)) == codes_before
    assert second.auth.access_token() is not None
    # The cached access token was enough to sign in, but the refresh token is exercised at
    # once: a box rebooted daily would otherwise never use it and lose it after 90 idle days.
    wait_until(lambda: len(token_posts(fast_idp, "refresh_token")) > refreshes_before,
               what="a refresh after the restart")


def test_access_token_refreshes_at_half_life_and_persists_rotated_refresh_token(
        fast_idp: SimIdp, harness: Callable[..., Harness], cache_path: Path) -> None:
    # A 200 s token is refreshed from the IdP once half its life is gone (monotonic), not before.
    fast_idp.auto_approve_after_s = 0
    fast_idp.set(access_token_lifetime_s=200)
    shift = [0.0]
    h = harness(clock=lambda: time.monotonic() + shift[0])
    h.wait_signed_in()
    first = h.auth.access_token()
    rt_before = cache_secrets(cache_path)["RefreshToken"]
    refreshes = len(token_posts(fast_idp, "refresh_token"))
    assert h.auth.access_token() == first
    assert len(token_posts(fast_idp, "refresh_token")) == refreshes
    shift[0] = 101.0
    second = h.auth.access_token()
    assert second is not None and second != first
    wait_until(lambda: len(token_posts(fast_idp, "refresh_token")) > refreshes, what="a refresh on record")
    rt_after = cache_secrets(cache_path)["RefreshToken"]
    assert rt_after and rt_after != rt_before     # the rotated token reached the disk


def test_proactive_refresh_keeps_idle_refresh_token_alive(
        fast_idp: SimIdp, harness: Callable[..., Harness], cache_path: Path) -> None:
    fast_idp.auto_approve_after_s = 0
    h = harness(timing=dataclasses.replace(FAST, refresh_every_s=0.5))
    h.wait_signed_in()
    rt0 = cache_secrets(cache_path)["RefreshToken"]
    beat0 = h.auth.heartbeat
    deadline = time.monotonic() + 5
    while len(token_posts(fast_idp, "refresh_token")) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    # Nobody asked for a token, yet the grant was exercised (twice) and the rotation saved.
    assert len(token_posts(fast_idp, "refresh_token")) >= 2
    assert cache_secrets(cache_path)["RefreshToken"] != rt0
    assert h.snap.phase == "signed_in"
    assert h.auth.heartbeat > beat0


def test_oidc_authority_signs_in_and_refreshes(
        fast_idp: SimIdp, idp_settings: AuthSettings, harness: Callable[..., Harness]) -> None:
    # The sim's v2.0 issuer serves <issuer>/.well-known/openid-configuration like any OIDC provider.
    settings = dataclasses.replace(idp_settings, authority=None, oidc_authority=fast_idp.issuer)
    fast_idp.set(access_token_lifetime_s=200)
    h = harness(settings)
    snap = sign_in(h, fast_idp)
    assert snap.account == DEFAULT_USER
    assert h.auth.access_token() is not None
    assert h.auth.token_rejected() is not None
    wait_until(lambda: bool(token_posts(fast_idp, "refresh_token")), what="a refresh on record")


# ---- poll pacing ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_slow_down_adds_five_seconds_between_polls(fast_idp: SimIdp, harness: Callable[..., Harness]) -> None:
    fast_idp.set(slow_down_polls=1)
    h = harness()
    code = h.wait_code().code
    assert code is not None
    deadline = time.monotonic() + 15
    while len(token_posts(fast_idp, "device_code")) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    polls = token_posts(fast_idp, "device_code")[:3]
    assert len(polls) == 3
    gaps = [b.time - a.time for a, b in zip(polls, polls[1:], strict=False)]
    # poll 1 answered slow_down: interval 1 s + 5 s; then stays at 6 s (RFC 8628 §3.5).
    assert gaps[0] >= 6 - 0.1, gaps
    assert gaps[1] >= 6 - 0.1, gaps


@pytest.mark.slow  # msal sleeps whole seconds between polls
def test_zero_interval_is_clamped_to_one_second(idp: SimIdp, harness: Callable[..., Harness]) -> None:
    idp.set(interval_s=0)
    h = harness()
    snap = h.wait_code()
    assert snap.code is not None and snap.code.interval_s == 1
    time.sleep(2.2)
    polls = token_posts(idp, "device_code")
    assert 2 <= len(polls) <= 4, f"{len(polls)} polls in 2.2 s: busy loop?"


@pytest.mark.slow  # msal sleeps whole seconds between polls
def test_missing_interval_means_five_seconds(idp: SimIdp, harness: Callable[..., Harness]) -> None:
    idp.set(include_interval=False, include_message=False)
    h = harness()
    snap = h.wait_code()
    assert snap.code is not None and snap.code.interval_s == 5
    assert snap.code.message == ""
    time.sleep(1.5)
    assert len(token_posts(idp, "device_code")) == 1


# ---- codes that are not used ----------------------------------------------------------------------

@pytest.mark.slow  # msal sleeps whole seconds between polls
def test_expired_code_is_replaced_by_a_new_one(fast_idp: SimIdp, harness: Callable[..., Harness]) -> None:
    fast_idp.set(code_expires_in_s=2)
    h = harness()
    first = h.wait_code().code
    assert first is not None
    snap = h.wait_code(other_than=first.user_code, timeout_s=5)
    assert snap.code is not None
    cleared = [s for _, s in h.timeline if s.code is None and s.notice == "code expired"]
    assert cleared, "the old code was not cleared with a notice"
    assert not snap.renewals_exhausted
    fast_idp.approve(snap.code.user_code)
    h.wait_signed_in(5)


def test_declined_code_is_replaced_by_a_new_one(fast_idp: SimIdp, harness: Callable[..., Harness]) -> None:
    h = harness()
    first = h.wait_code().code
    assert first is not None
    fast_idp.decline(first.user_code)
    snap = h.wait_code(other_than=first.user_code, timeout_s=5)
    assert any(s.notice == "sign-in declined" and s.code is None for _, s in h.timeline)
    assert snap.code is not None
    fast_idp.approve(snap.code.user_code)
    assert h.wait_signed_in(5).account == DEFAULT_USER


def test_renewals_run_out_then_wait_for_request_and_counter_resets(
        fast_idp: SimIdp, idp_settings: AuthSettings, harness: Callable[..., Harness]) -> None:
    fast_idp.set(decline_all=True)
    h = harness(dataclasses.replace(idp_settings, auto_renew_codes=1))
    snap = h.wait_for(lambda s: s.renewals_exhausted, 8, "renewals_exhausted")
    assert len(h.codes_seen()) == 2          # the first code plus one automatic renewal
    assert snap.phase == "error" and snap.code is None
    assert snap.error is not None
    for words in ("button", "renew_code", "restart"):
        assert words in snap.error
    time.sleep(0.2)                          # let the last request land in idp.requests
    n = len(devicecode_posts(fast_idp))
    time.sleep(1.0)
    assert len(devicecode_posts(fast_idp)) == n, "asked for codes although renewals ran out"

    fast_idp.set(decline_all=False)
    t0 = time.monotonic()
    assert h.auth.request_new_code() is True
    snap = h.wait_code(other_than=h.codes_seen()[-1], timeout_s=3)
    assert time.monotonic() - t0 < 1.5
    assert not snap.renewals_exhausted and snap.error is None
    assert snap.code is not None
    fast_idp.approve(snap.code.user_code)
    h.wait_signed_in(5)

    # After a sign-in the counter starts again: one automatic renewal before waiting.
    fast_idp.set(decline_all=True)
    seen = len(h.codes_seen())
    h.auth.sign_out()
    h.wait_for(lambda s: s.renewals_exhausted, 8, "renewals_exhausted again")
    assert len(h.codes_seen()) - seen == 2


def test_request_new_code_cancels_the_shown_code_within_1_5_s(
        idp: SimIdp, harness: Callable[..., Harness]) -> None:
    idp.set(interval_s=5)            # msal would sleep 5 s between polls
    h = harness()
    first = h.wait_code().code
    assert first is not None
    time.sleep(0.3)                  # msal is now in its between-polls sleep
    t0 = time.monotonic()
    assert h.auth.request_new_code() is True
    snap = h.wait_code(other_than=first.user_code, timeout_s=3)
    latency = time.monotonic() - t0
    assert latency < 1.5, f"new code after {latency:.2f} s"
    assert any(s.notice == "new code requested" for _, s in h.timeline)
    assert snap.code is not None
    assert idp.code_status(first.user_code) == "pending"   # nothing was sent to cancel it


def test_stop_ends_polling_within_1_5_s(idp: SimIdp, harness: Callable[..., Harness]) -> None:
    idp.set(interval_s=5)
    h = harness()
    h.wait_code()
    time.sleep(0.3)
    took = h.stop()
    assert took < 1.5, f"run() returned {took:.2f} s after stop"
    assert h.snap.code is None


@pytest.mark.slow  # msal sleeps whole seconds between polls
@pytest.mark.parametrize("jump_s", [YEAR_S, -YEAR_S], ids=["forward-1y", "back-1y"])
def test_wall_clock_jump_neither_ends_nor_extends_the_code(
        fast_idp: SimIdp, harness: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch,
        jump_s: float) -> None:
    fast_idp.set(code_expires_in_s=3)
    h = harness()
    snap = h.wait_code()
    assert snap.code is not None
    t_issue = h.first_time(lambda s: s.code is not None)
    assert t_issue is not None
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + jump_s)   # NTP sync, RTC-less box
    new = h.wait_code(other_than=snap.code.user_code, timeout_s=6)
    monkeypatch.undo()
    t_expired = h.first_time(lambda s: s.code is None and s.notice == "code expired", after=t_issue)
    assert t_expired is not None
    life = t_expired - t_issue
    assert 2.5 <= life <= 4.5, f"code lived {life:.2f} s instead of ~3 s"
    assert new.code is not None


# ---- sign-out, revocation, 401 ---------------------------------------------------------------------

def test_revoked_refresh_token_returns_to_code_flow_by_itself(
        fast_idp: SimIdp, harness: Callable[..., Harness], cache_path: Path) -> None:
    fast_idp.auto_approve_after_s = 0
    h = harness(timing=dataclasses.replace(FAST, refresh_every_s=1.0))
    h.wait_signed_in()
    fast_idp.auto_approve_after_s = None
    fast_idp.revoke_refresh_tokens()
    snap = h.wait_code(timeout_s=5)           # the proactive refresh found out
    assert snap.phase == "signing_in" and snap.account is None
    assert any(s.error == AADSTS[50173][1] for _, s in h.timeline)
    assert snap.notice == AADSTS[50173][1]
    assert json.loads(cache_path.read_text()).get("Account", {}) == {}
    assert h.auth.access_token() is None
    assert snap.code is not None
    fast_idp.approve(snap.code.user_code)
    h.wait_signed_in(5)


def test_token_rejected_refreshes_from_the_idp_and_never_gives_up_the_sign_in(
        fast_idp: SimIdp, harness: Callable[..., Harness], cache_path: Path) -> None:
    fast_idp.auto_approve_after_s = 0
    h = harness()
    h.wait_signed_in()
    fast_idp.auto_approve_after_s = None
    codes = h.codes_seen()
    t1 = h.auth.access_token()
    t2 = h.auth.token_rejected()
    assert t2 is not None and t2 != t1
    assert h.auth.access_token() == t2
    # The fresh token is refused too: the API's problem (audience, issuer), not the sign-in's.
    # Only the IdP refusing the refresh token may end the sign-in.
    t3 = h.auth.token_rejected()
    assert t3 is not None and t3 not in (t1, t2)
    assert h.snap.phase == "signed_in" and h.codes_seen() == codes
    assert cache_secrets(cache_path)["RefreshToken"]


def test_sign_out_forgets_tokens_and_shows_a_new_code(
        fast_idp: SimIdp, harness: Callable[..., Harness], cache_path: Path) -> None:
    fast_idp.auto_approve_after_s = 0
    h = harness()
    h.wait_signed_in()
    fast_idp.auto_approve_after_s = None
    h.auth.sign_out()
    assert h.auth.access_token() is None
    assert cache_secrets(cache_path) == {"AccessToken": [], "RefreshToken": [], "IdToken": []}
    snap = h.wait_code(timeout_s=5)
    assert snap.account is None and snap.phase == "signing_in"


def test_sign_out_while_a_code_is_shown_keeps_the_code(
        fast_idp: SimIdp, harness: Callable[..., Harness]) -> None:
    h = harness()
    code = h.wait_code().code
    assert code is not None
    h.auth.sign_out()                 # a long button press by someone who is not signed in
    time.sleep(0.3)
    assert h.snap.code is not None and h.snap.code.user_code == code.user_code
    fast_idp.approve(code.user_code)
    h.wait_signed_in(5)


# ---- the IdP's bad days --------------------------------------------------------------------------

def test_5xx_while_polling_keeps_the_same_code(fast_idp: SimIdp, harness: Callable[..., Harness]) -> None:
    h = harness()
    code = h.wait_code().code
    assert code is not None
    fast_idp.set(fail_token_next=3, fail_status=500)
    fast_idp.approve(code.user_code)
    snap = h.wait_signed_in(8)
    assert h.codes_seen() == [code.user_code]
    assert any(s.links.get("idp") == "down" for _, s in h.timeline)
    assert snap.links.get("idp") == "up"
    wait_until(lambda: len([r for r in token_posts(fast_idp, "device_code") if r.status == 500]) == 3,
               what="3 failed polls on record")


def test_5xx_on_devicecode_backs_off_exponentially(idp: SimIdp, harness: Callable[..., Harness]) -> None:
    idp.set(fail_devicecode_next=4, fail_status=503)
    h = harness()
    snap = h.wait_code(timeout_s=8)
    assert snap.code is not None
    wait_until(lambda: len(devicecode_posts(idp)) >= 5, what="5 devicecode requests")
    posts = devicecode_posts(idp)
    assert [r.status for r in posts] == [503, 503, 503, 503, 200]
    gaps = [b.time - a.time for a, b in zip(posts, posts[1:], strict=False)]
    # FAST: 0.1 s doubling to a 0.8 s cap, with jitter in [d/2, d].
    for gap, nominal in zip(gaps, (0.1, 0.2, 0.4, 0.8), strict=True):
        assert gap >= nominal / 2 - 0.02, gaps
    assert gaps[3] > gaps[0]
    errors = [s.error for _, s in h.timeline if s.error]
    assert errors and all("HTTP 503" in e for e in errors)


def test_retry_after_is_a_minimum_wait(idp: SimIdp, harness: Callable[..., Harness]) -> None:
    idp.set(fail_devicecode_next=1, fail_status=503, retry_after_s=1)
    h = harness()
    h.wait_code(timeout_s=5)
    wait_until(lambda: len(devicecode_posts(idp)) >= 2, what="2 devicecode requests")
    posts = devicecode_posts(idp)
    assert posts[1].time - posts[0].time >= 0.95


@pytest.mark.parametrize("kind", ["not_json", "missing_fields"])
def test_malformed_replies_are_survived(idp: SimIdp, harness: Callable[..., Harness], kind: str) -> None:
    idp.set(interval_s=1, malformed_devicecode_next=2, malformed_kind=kind)
    h = harness()
    snap = h.wait_code(timeout_s=5)
    assert snap.code is not None
    assert any(s.phase == "error" and s.error for _, s in h.timeline)
    idp.set(malformed_token_next=1)
    idp.approve(snap.code.user_code)
    h.wait_signed_in(8)
    assert h.codes_seen() == [snap.code.user_code]


def test_discovery_failure_at_start_is_retried(idp: SimIdp, harness: Callable[..., Harness]) -> None:
    idp.set(fail_discovery_next=2)
    h = harness()
    h.wait_code(timeout_s=5)
    assert any(s.links.get("idp") == "down" for _, s in h.timeline)


def test_idp_down_then_back(tls: TlsFiles, idp_settings: AuthSettings,
                            harness: Callable[..., Harness]) -> None:
    # Reserve a port, leave it closed (connection refused), later start the IdP on it.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = dataclasses.replace(idp_settings, authority=f"https://127.0.0.1:{port}/simtenant")
    h = harness(settings)
    snap = h.wait_for(lambda s: s.phase == "error", 5, "an error")
    assert snap.error is not None and "Cannot reach the sign-in service" in snap.error
    assert snap.links.get("idp") == "down"
    time.sleep(0.5)
    late = SimIdp(tls, port=port, client_id=idp_settings.client_id).start()
    try:
        late.set(interval_s=1)
        snap = h.wait_code(timeout_s=5)
        assert snap.links.get("idp") == "up" and snap.error is None
    finally:
        h.stop()
        late.stop()


def test_timeout_is_honoured_against_a_silent_server(
        idp_settings: AuthSettings, harness: Callable[..., Harness]) -> None:
    # Accepts TCP and never says a word (not even the TLS handshake).
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        srv.settimeout(0.1)
        while not done.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    threading.Thread(target=accept, daemon=True).start()
    try:
        settings = dataclasses.replace(idp_settings, timeout_s=0.5,
                                       authority=f"https://127.0.0.1:{srv.getsockname()[1]}/simtenant")
        t0 = time.monotonic()
        h = harness(settings)
        snap = h.wait_for(lambda s: s.phase == "error", 5, "a timeout error")
        took = time.monotonic() - t0
        assert snap.error is not None and "did not answer within 0.5 s" in snap.error
        assert 0.4 <= took < 2.0, took
        assert held, "the agent never connected"
        h.stop()
    finally:
        done.set()
        srv.close()
        for c in held:
            c.close()


# ---- trust ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("var", ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"])
def test_ca_file_wins_over_ca_environment_variables(
        fast_idp: SimIdp, harness: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path, var: str) -> None:
    bogus = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(bogus))      # a CA that never signed the IdP
    monkeypatch.setenv(var, str(bogus))
    fast_idp.auto_approve_after_s = 0
    h = harness()
    assert h.wait_signed_in(5).links.get("idp") == "up"


def test_without_ca_file_a_bogus_bundle_fails_with_a_tls_message(
        fast_idp: SimIdp, idp_settings: AuthSettings, harness: Callable[..., Harness],
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The control for the test above: without ca_file the test CA is not trusted, whatever
    # the environment says (the system store is passed explicitly).
    bogus = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(bogus))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bogus))
    h = harness(dataclasses.replace(idp_settings, ca_file=""))
    snap = h.wait_for(lambda s: s.phase == "error", 5, "a TLS error")
    assert snap.error is not None and "TLS" in snap.error and "auth.ca_file" in snap.error


# ---- AADSTS errors end to end ----------------------------------------------------------------------

@pytest.mark.parametrize("code", [50059, 90133, 9001023, 7000218, 700016, 90002, 70011])
def test_config_errors_at_devicecode_are_shown_and_retried_with_backoff(
        idp: SimIdp, harness: Callable[..., Harness], code: int) -> None:
    idp.set(interval_s=1, devicecode_error=code)
    h = harness()
    snap = h.wait_for(lambda s: s.phase == "error", 5, "the error")
    assert snap.error == AADSTS[code][1]
    time.sleep(1.0)
    # FAST config back-off: 0.4 s, then up to 0.8 s: at most 3 attempts in the first ~1 s.
    assert 1 <= len(devicecode_posts(idp)) <= 3
    idp.set(devicecode_error=None)
    h.auth.request_new_code()          # the operator fixed it and pressed the button
    assert h.wait_code(timeout_s=3).error is None


@pytest.mark.parametrize("code", [53003, 65001])
def test_config_errors_while_polling(fast_idp: SimIdp, harness: Callable[..., Harness], code: int) -> None:
    fast_idp.set(token_error=code)
    h = harness()
    snap = h.wait_for(lambda s: s.phase == "error", 5, "the error")
    assert snap.error == AADSTS[code][1]
    assert snap.code is None


@pytest.mark.parametrize("code", [70019, 70020])
def test_expired_code_errors_bring_a_new_code(fast_idp: SimIdp, harness: Callable[..., Harness],
                                              code: int) -> None:
    fast_idp.set(token_error=code)
    h = harness()
    first = h.wait_code().code
    assert first is not None
    h.wait_code(other_than=first.user_code, timeout_s=5)
    assert any(s.notice == "code expired" for _, s in h.timeline)


@pytest.mark.parametrize("code", [50076, 700082, 50173])
def test_refresh_errors_return_to_code_flow(fast_idp: SimIdp, harness: Callable[..., Harness],
                                            code: int) -> None:
    fast_idp.auto_approve_after_s = 0
    h = harness()
    h.wait_signed_in()
    fast_idp.auto_approve_after_s = None
    fast_idp.set(refresh_error=code)
    assert h.auth.token_rejected() is None
    snap = h.wait_code(timeout_s=5)
    assert snap.notice == AADSTS[code][1]
    assert any(s.error == AADSTS[code][1] for _, s in h.timeline)


@pytest.mark.slow  # msal sleeps whole seconds between polls
def test_config_backoff_grows_to_its_cap(idp: SimIdp, harness: Callable[..., Harness]) -> None:
    idp.set(devicecode_error=7000218)
    h = harness()
    time.sleep(3.5)
    posts = devicecode_posts(idp)
    gaps = [b.time - a.time for a, b in zip(posts, posts[1:], strict=False)]
    # 0.4, 0.8, 1.6 (cap) nominal, each at least half of that
    assert len(posts) <= 6, gaps
    assert all(g >= 0.19 for g in gaps), gaps
    assert h.snap.error == AADSTS[7000218][1]


# ---- secrets ------------------------------------------------------------------------------------

def test_no_token_ever_reaches_logs_state_or_other_files(
        fast_idp: SimIdp, harness: Callable[..., Harness], cache_path: Path, state_dir: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fast_idp.set(access_token_lifetime_s=200)
    h = harness()
    sign_in(h, fast_idp)
    collected: dict[str, set[str]] = {"AccessToken": set(), "RefreshToken": set(), "IdToken": set()}

    def harvest() -> None:
        for k, v in cache_secrets(cache_path).items():
            collected[k].update(v)

    harvest()
    h.auth.access_token()          # refresh (200 s tokens count as expired)
    harvest()
    h.auth.token_rejected()        # forced refresh
    harvest()
    h.stop()
    assert all(collected.values()), collected.keys()
    text = caplog.text + "".join(repr(s) for _, s in h.timeline)
    text += "".join(json.dumps(s.status_payload("t")) for _, s in h.timeline)
    others = [p for p in state_dir.iterdir() if p.is_file() and p != cache_path]
    for p in others:
        text += p.read_text(errors="replace")
    for kind, values in collected.items():
        for secret in values:
            assert secret not in text, f"a {kind} leaked"
            assert secret[-24:] not in text, f"the tail of a {kind} leaked"


# ==== recovery: a damaged token cache, a loop that must not spin, a refused token ==============


def signed_in_cache(idp: SimIdp, harness: Callable[..., Harness], cache_path: Path) -> dict[str, Any]:
    """Sign in once (auto-approved), stop, and return the cache file's JSON."""
    idp.auto_approve_after_s = 0
    first = harness()
    first.wait_signed_in()
    first.stop()
    idp.auto_approve_after_s = None
    return json.loads(cache_path.read_text())


def write_cache(cache_path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data)
    assert _check(text) is None, "the damaged cache must still look like an MSAL cache"
    cache_path.write_text(text)
    cache_path.chmod(0o600)


def agent_records(caplog: pytest.LogCaptureFixture, since: float) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("agent.") and r.created >= since]


def set_aside_files(cache_path: Path) -> list[Path]:
    return sorted(cache_path.parent.glob(cache_path.name + ".corrupt-*"))


# ---- 1. an account msal can neither use nor remove ----------------------------------------------

def test_account_without_home_account_id_leads_to_a_code_without_spinning(
        fast_idp: SimIdp, harness: Callable[..., Harness], cache_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    data = signed_in_cache(fast_idp, harness, cache_path)
    secrets = cache_secrets(cache_path)
    for account in data["Account"].values():
        del account["home_account_id"]
    write_cache(cache_path, data)

    caplog.set_level(logging.DEBUG, logger="agent")
    t0 = time.time()
    h = harness()
    snap = h.wait_code(timeout_s=4)
    took = time.time() - t0
    lines = agent_records(caplog, t0)
    assert took < 4
    assert len(lines) < 20, f"{len(lines)} log lines before the code: a loop?"
    # The unusable cache was set aside without its secrets; the code flow then works.
    aside = set_aside_files(cache_path)
    assert aside
    text = aside[0].read_text()
    for values in secrets.values():
        for secret in values:
            assert secret not in text and secret[-24:] not in text
    assert snap.code is not None
    fast_idp.approve(snap.code.user_code)
    h.wait_signed_in(5)
    assert h.auth.access_token() is not None


def test_sign_in_loop_passes_are_paced_even_when_nothing_waits(
        fast_idp: SimIdp, harness: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch) -> None:
    # A future bug: a step that neither raises nor waits. The loop still runs at most ~1/s.
    h = harness(start=False)
    steps: list[float] = []
    monkeypatch.setattr(h.auth, "_step", lambda: steps.append(time.monotonic()))
    h.start()
    time.sleep(2.2)
    took = h.stop()
    assert 2 <= len(steps) <= 4, f"{len(steps)} passes in 2.2 s"
    assert took < 0.5, "the pacing wait must end at once on stop"


# ---- 2. damaged but valid-JSON caches --------------------------------------------------------------

def _no_rt_secret(data: dict[str, Any]) -> None:
    for rt in data["RefreshToken"].values():
        del rt["secret"]
    data["AccessToken"] = {}          # no cached token to fall back on: msal must use the RT


def _expires_on_soon(data: dict[str, Any]) -> None:
    for at in data["AccessToken"].values():
        at["expires_on"] = "soon"


def _integer_rt_secret(data: dict[str, Any]) -> None:
    for rt in data["RefreshToken"].values():
        rt["secret"] = 12345
    data["AccessToken"] = {}


@pytest.mark.parametrize("damage", [_no_rt_secret, _expires_on_soon, _integer_rt_secret],
                         ids=["rt-without-secret", "expires_on-soon", "integer-rt-secret"])
def test_damaged_cache_is_set_aside_and_a_code_shown(
        fast_idp: SimIdp, harness: Callable[..., Harness], cache_path: Path,
        caplog: pytest.LogCaptureFixture, damage: Callable[[dict[str, Any]], None]) -> None:
    data = signed_in_cache(fast_idp, harness, cache_path)
    damage(data)
    write_cache(cache_path, data)
    refreshes = len(token_posts(fast_idp, "refresh_token"))

    caplog.set_level(logging.INFO, logger="agent")
    t0 = time.time()
    h = harness()
    snap = h.wait_code(timeout_s=4)
    assert snap.code is not None
    # Not blamed on the IdP: no "unreadable reply", no IdP-down link, no back-off.
    assert not any(s.error and "sign-in service" in s.error for _, s in h.timeline), \
        [s.error for _, s in h.timeline]
    assert all(s.links.get("idp") != "down" for _, s in h.timeline)
    warnings = [r.getMessage() for r in agent_records(caplog, t0) if r.levelno == logging.WARNING]
    assert any("token cache" in w and "set it aside" in w for w in warnings), warnings
    assert not any("retrying in" in w for w in warnings), warnings
    assert set_aside_files(cache_path)
    assert len(token_posts(fast_idp, "refresh_token")) == refreshes
    fast_idp.approve(snap.code.user_code)
    h.wait_signed_in(5)
    assert cache_secrets(cache_path)["RefreshToken"]      # a fresh, usable cache


def test_unreadable_refresh_reply_is_still_an_idp_problem(
        fast_idp: SimIdp, harness: Callable[..., Harness], cache_path: Path) -> None:
    # The control for the test above: the same msal call failing on the IdP's reply is not the
    # cache's fault; the cache is kept and the refresh retried after a back-off.
    signed_in_cache(fast_idp, harness, cache_path)
    fast_idp.set(malformed_token_next=2, malformed_kind="not_json")
    h = harness()
    h.wait_signed_in(5)            # the cached access token is fine
    # Both unreadable replies (HTTP 200, HTML) are retried; the third refresh gets tokens.
    wait_until(lambda: len(token_posts(fast_idp, "refresh_token")) >= 3,
               what="the proactive refresh retried past the unreadable replies")
    assert not set_aside_files(cache_path)
    assert h.codes_seen() == []
    assert h.snap.phase == "signed_in"


# ---- 3. a refused token and a brief IdP outage -----------------------------------------------------

def test_refused_token_is_not_handed_out_again_and_is_replaced_after_the_outage(
        fast_idp: SimIdp, harness: Callable[..., Harness]) -> None:
    fast_idp.auto_approve_after_s = 0
    h = harness(timing=dataclasses.replace(FAST, backoff_initial_s=0.4, backoff_max_s=0.8))
    h.wait_signed_in()
    codes = h.codes_seen()
    refused = h.auth.access_token()
    assert refused is not None
    fast_idp.set(fail_token_next=2, fail_status=503)
    assert h.auth.token_rejected() is None          # the forced refresh hit the outage
    # The refused token is not handed out again, and the retries are backed off.
    n = len(token_posts(fast_idp, "refresh_token"))
    t_end = time.monotonic() + 0.15
    while time.monotonic() < t_end:
        assert h.auth.access_token() is None
        time.sleep(0.01)
    assert len(token_posts(fast_idp, "refresh_token")) <= n + 1
    # The IdP recovers (fail_token_next ran out): a new token, long before the old one expires.
    new: str | None = None
    deadline = time.monotonic() + 5
    while new is None and time.monotonic() < deadline:
        new = h.auth.access_token()
        time.sleep(0.02)
    assert new is not None and new != refused
    assert h.auth.access_token() == new
    assert h.snap.phase == "signed_in"
    # Refused again: one more refresh from the IdP; a refused fresh token is no reason for a code.
    again = h.auth.token_rejected()
    assert again is not None and again != new
    assert h.snap.phase == "signed_in" and h.codes_seen() == codes
