"""agent.net.retry: the one Retry-After parser and the one back-off (pure; no network, no sleep)."""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
import requests

from agent.net.retry import REPEAT_WARNING_S, RETRY_AFTER_CAP_S, Backoff, OutageLog, retry_after_s
from tests.fixtures.clock import FakeClock

NOW = datetime(2026, 11, 25, 14, 0, 0, tzinfo=UTC)


def http_date(when: datetime) -> str:
    return format_datetime(when, usegmt=True)


def response(headers: dict[str, str]) -> requests.Response:
    r = requests.Response()
    r.status_code = 429
    r.headers.update(headers)
    return r


@pytest.mark.parametrize(("value", "expected"), [
    ("0", 0.0), ("7", 7.0), (" 42 ", 42.0), ("1.5", 1.5), ("3600", 3600.0),
])
def test_seconds(value: str, expected: float) -> None:
    assert retry_after_s(response({"Retry-After": value})) == expected
    assert retry_after_s({"retry-after": value}) == expected, "a plain dict is looked up case-insensitively"


def test_date_is_measured_against_the_responses_own_date_header() -> None:
    headers = {"Date": http_date(NOW), "Retry-After": http_date(NOW + timedelta(seconds=90))}
    assert retry_after_s(response(headers)) == 90.0
    assert retry_after_s({"date": headers["Date"], "RETRY-AFTER": headers["Retry-After"]}) == 90.0


def test_a_local_clock_far_from_the_servers_has_no_effect() -> None:
    # The box may believe it is 1970 (no RTC, no NTP yet) or any other time: only the two
    # headers count. 1970 and 2030 are both far from the test machine's clock.
    for server_now in (datetime(1970, 1, 1, 0, 5, tzinfo=UTC), datetime(2030, 6, 1, 12, 0, tzinfo=UTC)):
        headers = {"Date": http_date(server_now),
                   "Retry-After": http_date(server_now + timedelta(seconds=120))}
        assert retry_after_s(response(headers)) == 120.0


def test_date_without_a_date_header_is_ignored_unless_one_is_given() -> None:
    later = http_date(datetime.now(UTC) + timedelta(seconds=60))
    assert retry_after_s(response({"Retry-After": later})) is None
    # a Graph $batch answer has no Date of its own: the outer response's is passed in
    assert retry_after_s({"retry-after": http_date(NOW + timedelta(seconds=30))},
                         date=http_date(NOW)) == 30.0
    # the headers' own Date wins over the fallback
    assert retry_after_s({"Retry-After": http_date(NOW + timedelta(seconds=30)), "Date": http_date(NOW)},
                         date=http_date(NOW - timedelta(hours=1))) == 30.0


def test_a_date_in_the_past_means_now() -> None:
    headers = {"Date": http_date(NOW), "Retry-After": http_date(NOW - timedelta(seconds=90))}
    assert retry_after_s(response(headers)) == 0.0


@pytest.mark.parametrize("value", [
    "99999999999", "9" * 400, "100000.5",
])
def test_huge_seconds_are_capped(value: str) -> None:
    assert retry_after_s({"Retry-After": value}) == RETRY_AFTER_CAP_S


def test_far_dates_are_capped_and_the_cap_is_adjustable() -> None:
    headers = {"Date": http_date(NOW), "Retry-After": http_date(NOW + timedelta(days=30))}
    assert retry_after_s(headers) == RETRY_AFTER_CAP_S == 3600.0
    assert retry_after_s({"Retry-After": "500"}, cap_s=60.0) == 60.0


@pytest.mark.parametrize("value", [
    "", "   ", "soon", "-3", "+5", "-0.5", "inf", "-inf", "Infinity", "nan", "NaN", "1e3", "0x10",
    "²", "٣", "１２", "5 s", "1_000", "..", "1.", ".5",
    "Wed, 99 Foo 2026 25:61:61 GMT", "Mon, 30 Feb 2026 10:00:00 GMT", "Fri, 31 Dec 99999 23:59:59 GMT",
    "x" * 10_000,
])
def test_garbage_is_ignored(value: str) -> None:
    got = retry_after_s({"Retry-After": value, "Date": http_date(NOW)})
    assert got is None


@pytest.mark.parametrize("headers", [
    {"Retry-After": http_date(NOW + timedelta(seconds=5)), "Date": "yesterday"},
    {"Retry-After": http_date(NOW + timedelta(seconds=5)), "Date": ""},
    {"Retry-After": None},
    {"Retry-After": 5},
    {},
])
def test_odd_headers_never_raise(headers: dict[str, object]) -> None:
    assert retry_after_s(headers) is None


def test_no_source() -> None:
    assert retry_after_s(None) is None
    assert retry_after_s(response({})) is None


def test_results_are_always_finite() -> None:
    for value in ("1" * 5000, "0.0000001", "3599.9999999999"):
        got = retry_after_s({"Retry-After": value})
        assert got is not None and math.isfinite(got) and 0 <= got <= RETRY_AFTER_CAP_S


# ---- Backoff


def test_backoff_grows_exponentially_to_the_cap() -> None:
    b = Backoff(1.0, 30.0, rng=lambda: 1.0)
    assert [b.next_delay() for _ in range(8)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


@pytest.mark.parametrize("jitter", [(0.5, 1.0), (0.8, 1.2), (1.0, 1.0)])
def test_jitter_stays_within_its_bounds(jitter: tuple[float, float]) -> None:
    low, high = jitter
    for r in (0.0, 0.25, 0.5, 0.999999):
        b = Backoff(4.0, 60.0, rng=lambda r=r: r, jitter=jitter)
        first, second = b.next_delay(), b.next_delay()
        assert 4.0 * low <= first <= 4.0 * high
        assert 8.0 * low <= second <= 8.0 * high


def test_jitter_spreads_boxes_apart() -> None:
    import random

    rng = random.Random(7)
    delays = {round(Backoff(10.0, 60.0, rng=rng.random).next_delay(), 3) for _ in range(50)}
    assert len(delays) > 40 and min(delays) >= 5.0 and max(delays) <= 10.0


def test_floor_is_a_servers_retry_after_and_may_exceed_the_cap() -> None:
    b = Backoff(1.0, 8.0, rng=lambda: 0.0)
    assert b.next_delay(floor_s=30.0) == 30.0
    assert b.next_delay(floor_s=0.1) == 1.0, "a small floor does not shorten the back-off"
    assert b.next_delay(floor_s=None) == 2.0


@pytest.mark.parametrize("floor", [math.inf, math.nan, -5.0])
def test_nonsense_floors_are_ignored(floor: float) -> None:
    assert Backoff(2.0, 8.0, rng=lambda: 0.0).next_delay(floor_s=floor) == 1.0


def test_reset_starts_over() -> None:
    b = Backoff(1.0, 8.0, rng=lambda: 1.0)
    for _ in range(5):
        b.next_delay()
    b.reset()
    assert b.next_delay() == 1.0


def test_many_attempts_do_not_overflow() -> None:
    b = Backoff(60.0, 1800.0, rng=lambda: 1.0)
    for _ in range(10_000):
        d = b.next_delay()
    assert d == 1800.0


def test_deadline_is_on_the_given_monotonic_clock() -> None:
    b = Backoff(2.0, 8.0, rng=lambda: 1.0, clock=lambda: 1000.0)
    assert b.next_deadline() == 1002.0
    assert b.next_deadline(floor_s=10.0) == 1010.0


# ---- OutageLog: the journal's one rule for a failure that goes on --------------------------------

def _lines(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "test.outage" and r.levelno >= level]


def test_an_hours_outage_is_a_line_at_its_start_then_one_every_10_min_with_a_count(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="test.outage")
    clock = FakeClock()
    outage = OutageLog(logging.getLogger("test.outage"), clock=clock)
    for _ in range(1800):                    # a retry every 2 s for an hour
        outage.failed("Cannot reach the API", "retrying in 2.0 s")
        clock.advance(2.0)
    lines = _lines(caplog)
    assert REPEAT_WARNING_S == 600.0
    assert len(lines) == 6, lines             # at 0, 10, 20, 30, 40 and 50 min
    assert lines[0] == ("Cannot reach the API; retrying in 2.0 s (repeats are counted and reported "
                        "every 10 min)")
    assert lines[1] == ("Cannot reach the API; still failing: 300 failed attempts in the last 10 min "
                        "(301 since 10 min ago); retrying in 2.0 s")
    assert outage.ongoing and outage.failures == 1800
    assert outage.ended("the API answers again")
    assert _lines(caplog, logging.INFO)[-1] == "the API answers again (after 1800 failed attempts in 60 min)"
    assert not outage.ongoing and not outage.ended("again")


def test_the_next_outage_starts_with_its_own_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="test.outage")
    clock = FakeClock()
    outage = OutageLog(logging.getLogger("test.outage"), level=logging.ERROR, clock=clock)
    assert outage.failed("refused") is True
    assert outage.failed("refused") is False
    outage.ended("accepted again")
    clock.advance(1.0)
    assert outage.failed("refused again") is True
    assert [r.levelno for r in caplog.records] == [logging.ERROR, logging.INFO, logging.ERROR]
    assert _lines(caplog)[-1] == "refused again (repeats are counted and reported every 10 min)"
