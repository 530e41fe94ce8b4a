"""Uploader against the real HTTP sink and the simulated API over HTTPS; a fake clock decides
when the next step may run (``step()`` returns the wait), so nothing sleeps unless marked slow."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator

import pytest

from agent.config import UploadSettings
from agent.sim.api import SimApi
from agent.sim.jwks import SimKeys
from agent.state import AgentState, OutboxCounts
from agent.telemetry.outbox import Outbox
from agent.telemetry.sinks.http import HttpSink
from agent.telemetry.uploader import (
    BACKOFF_CAP_S,
    FORBIDDEN_CAP_S,
    NO_TOKEN_POLL_S,
    REFUSED_ERROR,
    SCOPE_ERROR,
    Uploader,
)
from tests.fixtures.api import DEVICE, FakeTokens, reading
from tests.fixtures.clock import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(5000.0)


@pytest.fixture
def state() -> AgentState:
    return AgentState()


@pytest.fixture
def make(outbox: Outbox, tokens: FakeTokens, state: AgentState, api_settings: UploadSettings,
         clock: FakeClock) -> Iterator:
    sinks: list[HttpSink] = []

    def build(**overrides: object) -> Uploader:
        s = dataclasses.replace(api_settings, **overrides)  # type: ignore[arg-type]
        sink = HttpSink(s, DEVICE)
        sinks.append(sink)
        return Uploader(outbox, sink, tokens, state, s, clock=clock, rng=lambda: 0.5)

    yield build
    for s in sinks:
        s.close()


def fill(outbox: Outbox, n: int) -> None:
    for i in range(0, n, 100):
        outbox.put([reading(j) for j in range(i, min(n, i + 100))])


def statuses(api: SimApi) -> list[int | None]:
    return [r.status for r in api.requests]


def test_backlog_drains_in_batches_back_to_back_then_idles(make, outbox: Outbox, sim_api: SimApi,
                                                           state: AgentState) -> None:
    fill(outbox, 1200)
    up = make(batch_max=500)
    assert [up.step(), up.step(), up.step()] == [0.0, 0.0, 10.0]
    assert sim_api.seqs(DEVICE) == set(range(1, 1201))
    assert [r.idempotency_key for r in sim_api.requests] == [f"{DEVICE}:1-500", f"{DEVICE}:501-1000",
                                                             f"{DEVICE}:1001-1200"]
    assert outbox.counts() == OutboxCounts(0, 0, 0)
    snap = state.snapshot
    assert snap.links["api"] == "up" and snap.last_upload is not None and snap.outbox.pending == 0
    assert up.step() == 10.0 and len(sim_api.requests) == 3, "idle: nothing sent"


@pytest.mark.parametrize("http_date", [False, True])
def test_503_retry_after_is_a_minimum_wait(make, outbox: Outbox, sim_api: SimApi, clock: FakeClock,
                                           state: AgentState, http_date: bool) -> None:
    fill(outbox, 10)
    sim_api.fail(503, count=2, retry_after=20, http_date=http_date)
    up = make()
    wait = up.step()
    assert 18.0 <= wait <= 20.0 if http_date else wait == 20.0
    assert state.snapshot.links["api"] == "down"
    clock.now += wait - 1
    assert up.step() == pytest.approx(1.0) and len(sim_api.requests) == 1, "no request before Retry-After"
    clock.now += 1
    assert up.step() >= 18.0 and len(sim_api.requests) == 2
    clock.now += 20
    up.step()
    assert statuses(sim_api) == [503, 503, 200]
    assert sim_api.seqs(DEVICE) == set(range(1, 11)) and state.snapshot.links["api"] == "up"


@pytest.mark.parametrize(("value", "expected"), [
    ("inf", 0.75), ("nan", 0.75), ("²", 0.75), ("-5", 0.75), ("soon", 0.75),   # garbage: own back-off
    ("99999999999", 3600.0), ("1e9", 0.75), ("7200", 3600.0),                   # huge: capped at 1 h
    ("Fri, 31 Dec 9999 23:59:59 GMT", 3600.0)])
def test_retry_after_garbage_or_huge_neither_crashes_nor_silences_uploads(
        make, outbox: Outbox, sim_api: SimApi, clock: FakeClock, value: str, expected: float) -> None:
    fill(outbox, 3)
    sim_api.fail(503, retry_after=value)
    up = make()
    assert up.step() == expected
    clock.now += expected
    assert up.step() == 10.0 and sim_api.seqs(DEVICE) == {1, 2, 3}


def test_http_date_retry_after_is_measured_against_the_servers_date_not_a_pi_clock_at_1970(
        make, outbox: Outbox, sim_api: SimApi, clock: FakeClock) -> None:
    """A Pi without RTC believes it is 1970: to it, every server date lies ~57 years ahead. The
    same as a server clock 57 years ahead of ours, which the simulated API can do."""
    fill(outbox, 3)
    sim_api.clock_offset_s = 57 * 365.25 * 86400
    sim_api.fail(429, retry_after=20, http_date=True)
    up = make()
    wait = up.step()
    assert 19.0 <= wait <= 20.0
    clock.now += wait
    up.step()
    assert sim_api.seqs(DEVICE) == {1, 2, 3}


def test_flush_cuts_a_retry_after_wait_short(make, outbox: Outbox, sim_api: SimApi) -> None:
    fill(outbox, 3)
    sim_api.fail(503, retry_after=3600)
    up = make()
    assert up.step() == 3600.0
    assert up.step() == 3600.0 and len(sim_api.requests) == 1, "the wait holds without a flush"
    up.flush()
    assert up.step() == 10.0, "flush: sent at once"
    assert statuses(sim_api) == [503, 200] and sim_api.seqs(DEVICE) == {1, 2, 3}


def test_retry_after_zero_does_not_spin(make, outbox: Outbox, sim_api: SimApi, clock: FakeClock) -> None:
    fill(outbox, 3)
    sim_api.fail(503, count=4, retry_after=0)
    up = make()
    waits = []
    for _ in range(4):
        waits.append(up.step())
        clock.now += waits[-1]
    assert waits == [0.375, 0.75, 1.5, 3.0]


def test_exponential_backoff_with_jitter_capped_then_reset(make, outbox: Outbox, sim_api: SimApi,
                                                           clock: FakeClock) -> None:
    fill(outbox, 3)
    sim_api.fail(500, count=12)
    up = make()
    waits = []
    for _ in range(12):
        waits.append(up.step())
        clock.now += waits[-1]
    # rng = 0.5: equal jitter gives 0.75 x the doubled base, up to the 5 min cap.
    assert waits[:4] == [0.75, 1.5, 3.0, 6.0]
    assert max(waits) == 0.75 * BACKOFF_CAP_S
    assert up.step() == 10.0 and sim_api.seqs(DEVICE) == {1, 2, 3}
    sim_api.fail(500)
    fill(outbox, 1)
    assert up.step() == 0.75, "success resets the back-off"


def test_a_refused_reading_costs_that_reading_only(make, outbox: Outbox, sim_api: SimApi,
                                                    state: AgentState) -> None:
    """A strict receiver refuses the whole request (422) for one bad reading: the batch is halved
    until the two poisoned readings are isolated; the other 498 arrive."""
    fill(outbox, 500)
    sim_api.poison(seqs={137, 400})
    up = make(batch_max=500)
    assert up.step() == 10.0
    assert sim_api.seqs(DEVICE) == set(range(1, 501)) - {137, 400}
    assert outbox.counts() == OutboxCounts(pending=0, dead=2, dropped=0)
    dead = outbox.dead_rows()
    assert [s for s, _, _ in dead] == [137, 400]
    assert "HTTP 422" in dead[0][1] and "seq 137" in dead[0][1], "status and the start of the answer"
    assert dead[0][2]["id"] == f"{DEVICE}:137"
    # Bisection cost: about 2 log2(500) requests per poisoned reading, not one per reading.
    assert len(sim_api.requests) <= 4 * 9 + 1
    assert state.snapshot.links["api"] == "up"


def test_a_400_that_does_not_come_back_dead_letters_nothing(make, outbox: Outbox, sim_api: SimApi) -> None:
    fill(outbox, 30)
    sim_api.fail(400)                     # once, for the whole batch: the halves are accepted
    up = make(batch_max=10)
    for _ in range(3):
        up.step()
    assert sim_api.seqs(DEVICE) == set(range(1, 31))
    assert outbox.counts() == OutboxCounts(pending=0, dead=0, dropped=0)
    assert statuses(sim_api)[:3] == [400, 200, 200]


def test_a_wrong_endpoint_keeps_everything_backs_off_and_says_where(make, outbox: Outbox, sim_api: SimApi,
                                                                    clock: FakeClock, state: AgentState) -> None:
    fill(outbox, 20)
    up = make(url=f"{sim_api.base_url}/v1/readngs?code=s3cret", batch_max=10)
    waits = []
    for _ in range(6):
        waits.append(up.step())
        clock.now += waits[-1]
    assert waits == [30.0, 60.0, 120.0, 240.0, 480.0, FORBIDDEN_CAP_S]
    assert set(statuses(sim_api)) == {404} and len(sim_api.requests) == 6
    assert outbox.counts() == OutboxCounts(pending=20, dead=0, dropped=0)
    error = state.snapshot.error or ""
    assert "404" in error and f"{sim_api.base_url}/v1/readngs" in error and "s3cret" not in error
    up.url = up.sink.url = sim_api.url             # fixed (a config reload would do the same)
    clock.now += up.step()
    up.step()
    assert sim_api.seqs(DEVICE) == set(range(1, 21)) and state.snapshot.error is None


def test_401_refreshes_once_and_retries_with_the_new_token(make, outbox: Outbox, sim_api: SimApi,
                                                           tokens: FakeTokens, sim_keys: SimKeys) -> None:
    fill(outbox, 5)
    tokens.token = sim_keys.mint({"exp": int(time.time()) - 600})      # expired
    up = make()
    assert up.step() == 10.0
    assert tokens.rejections == 1
    assert statuses(sim_api) == [401, 200] and sim_api.seqs(DEVICE) == set(range(1, 6))


def test_401_then_no_token_waits_for_sign_in_while_readings_queue(make, outbox: Outbox, sim_api: SimApi,
                                                                  tokens: FakeTokens, sim_keys: SimKeys,
                                                                  clock: FakeClock) -> None:
    fill(outbox, 5)
    tokens.token = sim_keys.mint({"exp": int(time.time()) - 600})
    tokens.on_reject = lambda: None                                     # refresh failed: code flow
    up = make()
    for _ in range(5):
        clock.now += up.step()
        fill(outbox, 1)
    assert tokens.rejections == 1 and statuses(sim_api) == [401]
    assert outbox.counts().pending == 10
    tokens.token = sim_keys.mint()                                      # signed in again
    clock.now += up.step()
    assert sim_api.seqs(DEVICE) == set(range(1, 11))


class _RefreshFailsOnce(FakeTokens):
    """Like agent.signin.authenticator on a transient IdP failure: token_rejected() gives None but the source
    keeps its token; the next refresh works."""

    def __init__(self, keys: SimKeys) -> None:
        super().__init__(keys)
        self.fail_next = True

    def token_rejected(self) -> str | None:
        self.rejections += 1
        if self.fail_next:
            self.fail_next = False
            return None
        self.token = self.keys.mint()
        return self.token


def test_401_with_a_failed_refresh_tries_again_after_the_poll_not_an_hour_later(
        outbox: Outbox, sim_api: SimApi, sim_keys: SimKeys, api_settings: UploadSettings, clock: FakeClock,
        state: AgentState) -> None:
    fill(outbox, 5)
    tokens = _RefreshFailsOnce(sim_keys)
    tokens.token = sim_keys.mint({"exp": int(time.time()) - 600})     # the API refuses it
    sink = HttpSink(api_settings, DEVICE)
    up = Uploader(outbox, sink, tokens, state, api_settings, clock=clock, rng=lambda: 0.5)
    try:
        wait = up.step()
        assert wait == NO_TOKEN_POLL_S and statuses(sim_api) == [401] and tokens.rejections == 1
        clock.now += wait
        up.step()          # same token again -> 401 -> this time the refresh works -> delivered
    finally:
        sink.close()
    assert statuses(sim_api) == [401, 401, 200] and tokens.rejections == 2
    assert sim_api.seqs(DEVICE) == set(range(1, 6)) and outbox.counts().pending == 0


def test_401_again_with_the_fresh_token_keeps_readings_backs_off_and_never_signs_in_again(
        make, outbox: Outbox, sim_api: SimApi, tokens: FakeTokens, sim_keys: SimKeys, clock: FakeClock,
        state: AgentState) -> None:
    fill(outbox, 5)
    wrong = sim_keys.mint({"aud": "api://someone-else"})
    tokens.token = wrong
    tokens.on_reject = lambda: wrong                  # the "refreshed" token is refused as well
    up = make()
    waits = []
    for _ in range(6):
        waits.append(up.step())
        clock.now += waits[-1]
    assert waits == [30.0, 60.0, 120.0, 240.0, 480.0, FORBIDDEN_CAP_S]
    # One refresh, then the refused fresh token is retried rarely, never reported again (a second
    # report is what would send the device back to the code flow).
    assert tokens.rejections == 1 and statuses(sim_api) == [401] * 7
    assert state.snapshot.error == REFUSED_ERROR == "the API refuses fresh tokens (401): check its audience and issuer"
    assert outbox.counts() == OutboxCounts(pending=5, dead=0, dropped=0)   # nothing dead-lettered, nothing lost
    tokens.token = sim_keys.mint()                    # the API's audience was fixed / a new token
    up.step()
    assert statuses(sim_api)[-1] == 200 and outbox.counts().pending == 0
    assert state.snapshot.error is None


def test_401_with_a_claims_challenge_asks_for_a_token_with_those_claims(
        make, outbox: Outbox, sim_api: SimApi, tokens: FakeTokens) -> None:
    fill(outbox, 5)
    claims = '{"access_token":{"nbf":{"essential":true,"value":"1700000000"}}}'
    sim_api.challenge(claims)
    up = make()
    assert up.step() == 10.0
    assert tokens.claims == [claims] and statuses(sim_api) == [401, 200]
    assert sim_api.seqs(DEVICE) == set(range(1, 6))


def test_a_token_source_without_the_claims_parameter_still_works(
        outbox: Outbox, sim_api: SimApi, sim_keys: SimKeys, api_settings: UploadSettings,
        state: AgentState, clock: FakeClock) -> None:
    class OldTokens:
        def __init__(self) -> None:
            self.token = sim_keys.mint()
            self.calls = 0

        def access_token(self) -> str | None:
            return self.token

        def token_rejected(self) -> str | None:
            self.calls += 1
            self.token = sim_keys.mint()
            return self.token

    fill(outbox, 3)
    old = OldTokens()
    sim_api.challenge('{"access_token":{}}')
    sink = HttpSink(api_settings, DEVICE)
    try:
        Uploader(outbox, sink, old, state, api_settings, clock=clock).step()
    finally:
        sink.close()
    assert old.calls == 1 and sim_api.seqs(DEVICE) == {1, 2, 3}


def test_403_keeps_readings_backs_off_and_says_check_the_scopes(make, outbox: Outbox, sim_api: SimApi,
                                                                tokens: FakeTokens, sim_keys: SimKeys,
                                                                clock: FakeClock, state: AgentState) -> None:
    fill(outbox, 5)
    tokens.token = sim_keys.mint({"scp": "User.Read"})
    up = make()
    waits = []
    for _ in range(7):
        waits.append(up.step())
        clock.now += waits[-1]
    assert waits == [30.0, 60.0, 120.0, 240.0, 480.0, FORBIDDEN_CAP_S, FORBIDDEN_CAP_S]
    assert set(statuses(sim_api)) == {403} and tokens.rejections == 0
    assert outbox.counts() == OutboxCounts(pending=5, dead=0, dropped=0)
    assert state.snapshot.error == SCOPE_ERROR
    tokens.token = sim_keys.mint()
    up.step()
    assert outbox.counts().pending == 0 and state.snapshot.error is None


def test_overflow_while_signed_out_is_counted_in_state(tmp_path, tokens: FakeTokens, state: AgentState,
                                                       api_settings: UploadSettings, sim_api: SimApi,
                                                       clock: FakeClock) -> None:
    box = Outbox(tmp_path / "small.sqlite3", DEVICE, max_rows=10, max_bytes=10**7)
    tokens.token = None
    sink = HttpSink(api_settings, DEVICE)
    up = Uploader(box, sink, tokens, state, api_settings, clock=clock)
    fill(box, 25)
    up.step()
    assert box.counts() == OutboxCounts(pending=10, dead=0, dropped=15)
    tokens.token = tokens.keys.mint()
    up.step()
    assert sim_api.seqs(DEVICE) == set(range(16, 26))
    assert state.snapshot.outbox == OutboxCounts(pending=0, dead=0, dropped=15)
    sink.close()
    box.close()


def test_connection_reset_is_retried_and_delivered_once(make, outbox: Outbox, sim_api: SimApi,
                                                        clock: FakeClock, state: AgentState) -> None:
    fill(outbox, 8)
    up = make()
    sim_api.reset(count=2)
    waits = []
    for _ in range(3):
        waits.append(up.step())
        clock.now += waits[-1]
    assert waits[:2] == [0.75, 1.5] and waits[2] == 10.0
    assert statuses(sim_api) == [None, None, 200]
    assert sim_api.seqs(DEVICE) == set(range(1, 9)) and outbox.counts().pending == 0
    assert state.snapshot.links["api"] == "up"


@pytest.mark.slow
def test_timeout_is_retried_and_the_repeat_deduplicated(make, outbox: Outbox, sim_api: SimApi,
                                                        clock: FakeClock) -> None:
    fill(outbox, 8)
    up = make(timeout_s=1.0)
    sim_api.latency_s = 1.3                       # the API stores the batch, the answer comes too late
    clock.now += up.step()
    deadline = time.monotonic() + 5
    while len(sim_api.requests) < 1 and time.monotonic() < deadline:
        time.sleep(0.02)                          # let the slow request finish on the server
    sim_api.latency_s = 0.0
    assert up.step() == 10.0
    assert statuses(sim_api) == [200, 200]
    assert sim_api.seqs(DEVICE) == set(range(1, 9))
    assert sim_api.duplicates == 8, "the retry after the timeout was de-duplicated by id"
    assert outbox.counts().pending == 0


def test_flush_ends_the_idle_wait_and_stop_ends_run(make, outbox: Outbox, sim_api: SimApi) -> None:
    up = make(interval_s=3600.0)
    up.clock = time.monotonic
    stop = threading.Event()
    t = threading.Thread(target=up.run, args=(stop,))
    t.start()
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and up.heartbeat < time.monotonic() - 0.2:
            time.sleep(0.01)
        fill(outbox, 3)
        up.flush()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(sim_api.seqs(DEVICE)) < 3:
            time.sleep(0.02)
        assert sim_api.seqs(DEVICE) == {1, 2, 3}
    finally:
        t0 = time.monotonic()
        stop.set()
        t.join(timeout=5)
    assert not t.is_alive() and time.monotonic() - t0 < 1.0


@pytest.mark.slow
def test_outage_with_retry_after_in_real_time(make, outbox: Outbox, sim_api: SimApi) -> None:
    """Real clocks end to end: no request arrives earlier than the Retry-After the previous one got."""
    fill(outbox, 1500)
    sim_api.fail(503, count=3, retry_after=1)
    sim_api.fail(429, count=1, retry_after=2, http_date=True)
    up = make(batch_max=500)
    up.clock = time.monotonic
    stop = threading.Event()
    t = threading.Thread(target=up.run, args=(stop,))
    t.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and outbox.counts().pending:
            time.sleep(0.05)
    finally:
        stop.set()
        t.join(timeout=5)
    reqs = sim_api.requests
    assert [r.status for r in reqs] == [503, 503, 503, 429, 200, 200, 200]
    gaps = [b.t - a.t for a, b in zip(reqs, reqs[1:], strict=False)]
    assert all(g >= 1.0 for g in gaps[:3]), gaps
    # HTTP dates have whole-second resolution: "2 s from now" may mean as little as 1.0 s.
    assert gaps[3] >= 1.0, gaps
    assert all(g < 1.0 for g in gaps[4:]), "backlog batches follow each other without waiting"
    assert sim_api.seqs(DEVICE) == set(range(1, 1501))


class _Thermometer:
    kind = "simulated"

    def read(self) -> list:
        from hw.base import Measurement

        return [Measurement(21.5, "°C")]

    def close(self) -> None:
        pass


def test_sampler_and_uploader_threads_deliver_every_reading_once(make, outbox: Outbox, sim_api: SimApi,
                                                                 state: AgentState) -> None:
    """The two threads together, real clocks, a brief outage in the middle: contiguous seqs arrive."""
    from agent.config import SensorSettings
    from agent.telemetry.sampler import Sampler

    up = make(interval_s=0.05)
    sampler = Sampler([(SensorSettings(name="t", type="simulated", interval_s=0.02), _Thermometer())],
                      outbox, state, on_queued=up.readings_queued)
    up.clock = time.monotonic
    sim_api.fail(503, count=1, retry_after=0)
    stop = threading.Event()
    threads = [threading.Thread(target=sampler.run, args=(stop,)),
               threading.Thread(target=up.run, args=(stop,))]
    for t in threads:
        t.start()
    time.sleep(0.8)
    stop.set()
    for t in threads:
        t.join(timeout=5)
    up.step()       # what was queued after the uploader's last look
    delivered = sim_api.seqs(DEVICE)
    assert len(delivered) >= 10
    assert delivered == set(range(1, max(delivered) + 1)) and outbox.counts().pending == 0
    assert [r.status for r in sim_api.requests][:2] == [503, 200]
