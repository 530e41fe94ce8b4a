"""The uploader's journal over long outages (agent.net.retry.OutageLog): one line when a failure
starts, at most one every 10 min after that with a count, one when it ends; never a line per
retry. Real HTTP sink, the simulated API over HTTPS, a fake monotonic clock: hours pass in
seconds."""

from __future__ import annotations

import logging
import re
import time

import pytest

from agent.config import UploadSettings
from agent.net.retry import REPEAT_WARNING_S
from agent.sim.api import SimApi
from agent.sim.jwks import SimKeys
from agent.state import AgentState, OutboxCounts
from agent.telemetry.outbox import Outbox
from agent.telemetry.sinks import SplitJournal
from agent.telemetry.sinks.http import HttpSink
from agent.telemetry.uploader import CRASH_RETRY_S, NO_TOKEN_POLL_S, Uploader
from tests.fixtures.api import DEVICE, FakeTokens, reading
from tests.fixtures.clock import FakeClock

LOGGER = "agent.telemetry.uploader"


def journal(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == level]


def messages(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records]


def run_for(up: Uploader, clock: FakeClock, seconds: float) -> int:
    """Drive ``guarded_step`` (what run() calls) for ``seconds`` of fake time; returns steps."""
    end, steps = clock.now + seconds, 0
    while clock.now < end:
        clock.now += up.guarded_step()
        steps += 1
    return steps


def assert_outage_lines(lines: list[str], duration_s: float, start: str) -> None:
    """One line at the start, then a repeat with a count no more often than every 10 min."""
    assert lines, "the outage was never reported"
    assert lines[0].startswith(start) and "repeats are counted and reported every 10 min" in lines[0]
    assert len(lines) <= 1 + duration_s // REPEAT_WARNING_S, lines
    assert len(lines) >= duration_s // REPEAT_WARNING_S // 2, "the outage goes on: repeats say so"
    for line in lines[1:]:
        assert line.startswith(start) and re.search(r"still failing: \d+ failed attempts in the last "
                                                    r"1\d min", line), line


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(5000.0)


def fill(outbox: Outbox, n: int) -> None:
    outbox.put([reading(i) for i in range(n)])


@pytest.mark.parametrize("fault", ["503", "connection reset"])
def test_two_hours_of_failed_uploads_are_a_dozen_lines_not_one_per_retry(
        outbox: Outbox, sim_api: SimApi, tokens: FakeTokens, api_settings: UploadSettings,
        clock: FakeClock, caplog: pytest.LogCaptureFixture, fault: str) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    fill(outbox, 5)
    if fault == "503":
        sim_api.fail(503, count=10_000)
    else:
        sim_api.reset(count=10_000)
    sink = HttpSink(api_settings, DEVICE)
    up = Uploader(outbox, sink, tokens, AgentState(), api_settings, clock=clock, rng=lambda: 0.5)
    try:
        run_for(up, clock, 2 * 3600)
        attempts = len(sim_api.requests)
        warnings = messages(journal(caplog, logging.WARNING))
        assert attempts >= 30
        assert_outage_lines(warnings, 2 * 3600, "upload failed (")
        assert len(warnings) < attempts / 2
        sim_api.clear_faults()
        clock.now += up.guarded_step()
    finally:
        sink.close()
    assert outbox.counts() == OutboxCounts(0, 0, 0) and sim_api.seqs(DEVICE) == set(range(1, 6))
    assert messages(journal(caplog, logging.INFO))[-1].startswith(
        f"uploads work again (after {attempts} failed attempts in 12")


def test_a_wrong_endpoint_for_five_hours_is_counted_errors_not_one_per_try(
        outbox: Outbox, sim_api: SimApi, tokens: FakeTokens, api_settings: UploadSettings,
        clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    import dataclasses

    caplog.set_level(logging.DEBUG, logger=LOGGER)
    fill(outbox, 5)
    wrong = dataclasses.replace(api_settings, url=f"{sim_api.base_url}/v1/readngs")
    sink = HttpSink(wrong, DEVICE)
    up = Uploader(outbox, sink, tokens, AgentState(), wrong, clock=clock, rng=lambda: 0.5)
    try:
        run_for(up, clock, 5 * 3600)
        errors = messages(journal(caplog, logging.ERROR))
        assert_outage_lines(errors, 5 * 3600, "the API endpoint does not exist (HTTP 404")
        first = errors[1]
        assert "keeping 5 readings" in first and "failed attempts" in first
        attempts = len(sim_api.requests)
        up.url = sink.url = sim_api.url               # fixed
        clock.now += up.guarded_step()
    finally:
        sink.close()
    assert sim_api.seqs(DEVICE) == set(range(1, 6))
    assert messages(journal(caplog, logging.INFO))[-1].startswith(
        f"the API accepts uploads again (after {attempts} failed attempts in ")


class _RefreshKeepsFailing(FakeTokens):
    """The authenticator while the IdP is down: the token the API refuses stays, refreshes give
    nothing (until ``idp_up``)."""

    def __init__(self, keys: SimKeys) -> None:
        super().__init__(keys)
        self.idp_up = False

    def token_rejected(self, claims_challenge: str | None = None) -> str | None:
        self.rejections += 1
        if not self.idp_up:
            return None
        self.token = self.keys.mint()
        return self.token


def test_401s_while_the_idp_is_down_are_a_few_warnings_not_one_per_poll(
        outbox: Outbox, sim_api: SimApi, sim_keys: SimKeys, api_settings: UploadSettings,
        clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    fill(outbox, 5)
    tokens = _RefreshKeepsFailing(sim_keys)
    tokens.token = sim_keys.mint({"exp": int(time.time()) - 600})      # the API refuses it
    sink = HttpSink(api_settings, DEVICE)
    up = Uploader(outbox, sink, tokens, AgentState(), api_settings, clock=clock, rng=lambda: 0.5)
    duration = 25 * 60
    try:
        run_for(up, clock, duration)
        polls = tokens.rejections
        assert polls >= duration / NO_TOKEN_POLL_S * 0.9, "the uploader keeps trying every poll"
        warnings = messages(journal(caplog, logging.WARNING))
        assert warnings[0].startswith("API answered 401 for seq 1..5"), "the first 401 is said once"
        assert_outage_lines(warnings[1:], duration, "uploader: no fresh token after the API's 401")
        assert len(warnings) == 1 + 3                  # at 0, 10 and 20 min
        tokens.idp_up = True
        clock.now += up.guarded_step()
    finally:
        sink.close()
    assert sim_api.seqs(DEVICE) == set(range(1, 6))
    assert messages(journal(caplog, logging.INFO))[-1].startswith(
        f"uploader: got a fresh token after the API's 401 (after {polls} failed attempts in 2")


class _BrokenTokens(FakeTokens):
    """A bug on the far side of access_token(): it raises until ``fixed``."""

    def __init__(self, keys: SimKeys) -> None:
        super().__init__(keys)
        self.fixed = False

    def access_token(self) -> str | None:
        if not self.fixed:
            raise RuntimeError("token cache went wrong")
        return self.token


def test_a_step_that_keeps_crashing_logs_its_traceback_once_then_counts(
        outbox: Outbox, sim_api: SimApi, sim_keys: SimKeys, api_settings: UploadSettings,
        clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    fill(outbox, 3)
    tokens = _BrokenTokens(sim_keys)
    sink = HttpSink(api_settings, DEVICE)
    up = Uploader(outbox, sink, tokens, AgentState(), api_settings, clock=clock)
    try:
        steps = run_for(up, clock, 3600)
        assert steps == 3600 / CRASH_RETRY_S
        errors = journal(caplog, logging.ERROR)
        assert_outage_lines(messages(errors), 3600, "uploader step failed")
        assert len(errors) == 6
        assert errors[0].exc_info is not None and "token cache went wrong" in str(errors[0].exc_info[1])
        assert all(r.exc_info is None for r in errors[1:]), "one traceback per streak, not per retry"
        tokens.fixed = True
        clock.now += up.guarded_step()
    finally:
        sink.close()
    assert sim_api.seqs(DEVICE) == {1, 2, 3}
    assert messages(journal(caplog, logging.INFO))[-1].startswith(
        f"uploader steps work again (after {steps} failed attempts in 6")


def test_a_receiver_refusing_a_reading_in_every_batch_is_one_split_line_per_10_min(
        outbox: Outbox, sim_api: SimApi, tokens: FakeTokens, api_settings: UploadSettings,
        clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="agent.telemetry.sinks")
    sim_api.poison(seqs=range(10, 601, 10))            # one bad reading in each batch of 10
    sink = HttpSink(api_settings, DEVICE)
    sink.splits = SplitJournal(clock=clock)
    up = Uploader(outbox, sink, tokens, AgentState(), api_settings, clock=clock, rng=lambda: 0.5)
    try:
        for minute in range(60):                       # an hour, a batch a minute
            outbox.put([reading(minute * 10 + i) for i in range(10)])
            up.guarded_step()
            clock.now += 60.0
    finally:
        sink.close()
    assert outbox.counts() == OutboxCounts(pending=0, dead=60, dropped=0)
    splits = [r for r in caplog.records if r.name == "agent.telemetry.sinks"]
    warnings = messages([r for r in splits if r.levelno == logging.WARNING])
    assert len(splits) >= 3 * 60, "every batch was halved a few times"
    assert warnings[0].startswith("HTTP 422 for 10 readings (seq 1..10): sending them in two halves")
    assert len(warnings) == 6, warnings             # at 0, 10, ... 50 min
    assert all("still failing: " in w and "failed attempts in the last 10 min" in w for w in warnings[1:])
