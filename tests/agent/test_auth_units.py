"""Back-off arithmetic and Retry-After parsing as sign-in uses them (agent.net.retry; no network, no sleep)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
import requests

from agent.net.retry import Backoff, retry_after_s


def test_backoff_doubles_to_the_cap_with_equal_jitter() -> None:
    low = Backoff(1.0, 8.0, rng=lambda: 0.0)
    high = Backoff(1.0, 8.0, rng=lambda: 0.999999)
    lows = [low.next_delay() for _ in range(6)]
    highs = [high.next_delay() for _ in range(6)]
    assert lows == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert highs == pytest.approx([1.0, 2.0, 4.0, 8.0, 8.0, 8.0], rel=1e-5)


def test_backoff_floor_is_the_servers_retry_after_and_reset_starts_over() -> None:
    b = Backoff(1.0, 8.0, rng=lambda: 0.0)
    assert b.next_delay(floor_s=30.0) == 30.0
    b.next_delay()
    b.reset()
    assert b.next_delay() == 0.5


def test_backoff_survives_many_attempts() -> None:
    b = Backoff(60.0, 1800.0, rng=lambda: 1.0)
    for _ in range(200):
        d = b.next_delay()
    assert d == 1800.0


def response_with(retry_after: str | None, date: datetime | None = None) -> requests.Response:
    r = requests.Response()
    r.status_code = 503
    if date is not None:
        r.headers["Date"] = format_datetime(date, usegmt=True)
    if retry_after is not None:
        r.headers["Retry-After"] = retry_after
    return r


@pytest.mark.parametrize(("value", "expected"), [
    ("7", 7.0), ("0", 0.0), ("-3", None), ("99999", 3600.0), ("soon", None), (None, None),
])
def test_retry_after_seconds(value: str | None, expected: float | None) -> None:
    assert retry_after_s(response_with(value)) == expected


def test_retry_after_http_date() -> None:
    now = datetime.now(UTC)
    when = now + timedelta(seconds=120)
    got = retry_after_s(response_with(format_datetime(when, usegmt=True), date=now))
    assert got is not None and 119 <= got <= 120
