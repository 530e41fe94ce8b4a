"""Pure parts of agent.signin.authenticator: back-off arithmetic and Retry-After parsing (no network, no sleep)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
import requests

from agent.signin.authenticator import Backoff, _retry_after


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


def response_with(retry_after: str | None) -> requests.Response:
    r = requests.Response()
    r.status_code = 503
    if retry_after is not None:
        r.headers["Retry-After"] = retry_after
    return r


@pytest.mark.parametrize(("value", "expected"), [
    ("7", 7.0), ("0", 0.0), ("-3", 0.0), ("99999", 3600.0), ("soon", None), (None, None),
])
def test_retry_after_seconds(value: str | None, expected: float | None) -> None:
    assert _retry_after(response_with(value)) == expected


def test_retry_after_http_date() -> None:
    when = datetime.now(UTC) + timedelta(seconds=120)
    got = _retry_after(response_with(format_datetime(when, usegmt=True)))
    assert got is not None and 115 <= got <= 120
