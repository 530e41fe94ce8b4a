"""When to try again: the one ``Retry-After`` parser, the one exponential back-off, and the one
rule for telling the journal about a failure that goes on (:class:`OutageLog`).

Every retry in the agent (sign-in, uploads, component restarts) waits on the monotonic clock;
a server's ``Retry-After`` only ever raises the wait (a floor), and is sanitised here, once:
whatever a server or a proxy sends, the result is a finite number of seconds within
``RETRY_AFTER_CAP_S``, or None ("no advice, use your own back-off").
"""

from __future__ import annotations

import logging
import math
import random
import re
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Protocol

RETRY_AFTER_CAP_S = 3600.0
# A failure that goes on is reported once when it starts, then at most this often, with a count.
REPEAT_WARNING_S = 600.0
# RFC 9110 §10.2.3 delay-seconds is 1*DIGIT; decimals are accepted too. ASCII only: str.isdigit()
# and float() would take "²" or Arabic-Indic digits.
_SECONDS = re.compile(r"([0-9]+)(?:\.[0-9]+)?", re.ASCII)
_MAX_DATE_LEN = 64


class _HasHeaders(Protocol):
    @property
    def headers(self) -> Mapping[str, str]: ...


def retry_after_s(source: _HasHeaders | Mapping[str, object] | None, *, date: str | None = None,
                  cap_s: float = RETRY_AFTER_CAP_S) -> float | None:
    """A response's ``Retry-After`` in seconds, or None when it has none worth obeying.

    ``source`` is a ``requests.Response`` or a headers mapping (looked up case-insensitively,
    e.g. one answer inside a Graph ``$batch``). Delay-seconds are taken as they are; an HTTP
    date is measured against the response's own ``Date`` header (failing that ``date``, e.g. the
    outer ``$batch`` response's), never the local clock: a Pi without an RTC may believe it is 1970,
    which would turn any date into an hour's wait. A date without a ``Date`` to measure it
    against is ignored. A date in the past means "now" (0.0). Values above ``cap_s`` are
    capped; negatives, ``inf``/``nan``, non-ASCII digits and unparsable text give None.
    Never raises.
    """
    headers = _headers(source)
    raw = _get(headers, "retry-after")
    if raw is None:
        return None
    value = raw.strip()
    if not value:
        return None
    seconds = _SECONDS.fullmatch(value)
    if seconds:
        if len(seconds.group(1)) > 15:      # beyond any cap; float() of 10k digits costs time
            return _capped(math.inf, cap_s)
        return _capped(float(value), cap_s)
    when = _http_date(value)
    if when is None:
        return None
    reference = _http_date(_get(headers, "date") or date or "")
    if reference is None:
        return None
    return _capped(max(0.0, (when - reference).total_seconds()), cap_s)


class Backoff:
    """Exponential back-off with jitter: ``initial_s`` doubling to ``max_s``, then scaled by a
    random factor in ``jitter`` (default (0.5, 1.0), "equal jitter": half fixed, half random, so
    never ~0 and never in step with other boxes). ``rng`` is injectable for tests.

    The first ``next_delay()`` after construction or ``reset()`` is ``initial_s`` × factor.
    """

    def __init__(self, initial_s: float, max_s: float, rng: Callable[[], float] = random.random, *,
                 jitter: tuple[float, float] = (0.5, 1.0),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.initial_s, self.max_s, self._rng = initial_s, max_s, rng
        self.jitter = jitter
        self._clock = clock
        self.attempts = 0

    def next_delay(self, floor_s: float | None = 0.0) -> float:
        """The next wait in seconds; never below ``floor_s`` (a server's Retry-After, which may
        exceed ``max_s``: the server's word wins). A non-finite or negative floor is ignored."""
        ceiling = min(self.max_s, self.initial_s * 2.0 ** min(self.attempts, 60))
        self.attempts += 1
        low, high = self.jitter
        delay = ceiling * (low + (high - low) * self._rng())
        if floor_s is not None and math.isfinite(floor_s) and floor_s > delay:
            return float(floor_s)
        return delay

    def next_deadline(self, floor_s: float | None = 0.0) -> float:
        """``next_delay`` as a deadline on the (monotonic) clock."""
        return self._clock() + self.next_delay(floor_s)

    def reset(self) -> None:
        """Success: the next failure starts from ``initial_s`` again."""
        self.attempts = 0


class OutageLog:
    """The journal's side of a failure that goes on, the same on every network path: one line
    when it starts, then at most one every ``repeat_s`` with a count of the failed attempts,
    and one INFO line when it ends. Never a line per retry (those go to DEBUG): a box retries
    for as long as it runs. ``logger`` names the component (records keep its name); ``clock``
    is monotonic. Thread-safe.
    """

    def __init__(self, logger: logging.Logger, *, level: int = logging.WARNING,
                 repeat_s: float = REPEAT_WARNING_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log, self._level, self.repeat_s, self._clock = logger, level, repeat_s, clock
        self._lock = threading.Lock()
        self._started: float | None = None    # monotonic: the first failure of this outage
        self.failures = 0                     # failed attempts in this outage
        self._reported_at = 0.0
        self._reported_failures = 0

    @property
    def ongoing(self) -> bool:
        return self._started is not None

    def failed(self, message: str, then: str = "", *, exc_info: bool = False) -> bool:
        """Count a failed attempt (``then``: what happens next, e.g. "retrying in 2.0 s");
        logs it only when the outage starts or ``repeat_s`` after the last line. ``exc_info``:
        the outage's first line carries the exception being handled (a bug's traceback once,
        not once per retry). Returns whether it logged."""
        tail = f"; {then}" if then else ""
        with self._lock:
            now = self._clock()
            self.failures += 1
            if self._started is None:
                self._started = self._reported_at = now
                self._reported_failures = 1
                self._log.log(self._level, "%s%s (repeats are counted and reported every %.0f min)",
                              message, tail, self.repeat_s / 60, exc_info=exc_info or None)
                return True
            if now - self._reported_at < self.repeat_s:
                self._log.debug("%s%s (failed attempt %d)", message, tail, self.failures)
                return False
            self._log.log(self._level, "%s; still failing: %d failed attempts in the last %.0f min "
                          "(%d since %.0f min ago)%s", message,
                          self.failures - self._reported_failures, (now - self._reported_at) / 60,
                          self.failures, (now - self._started) / 60, tail)
            self._reported_at, self._reported_failures = now, self.failures
            return True

    def ended(self, message: str) -> bool:
        """It works again: logs ``message`` with the outage's count and length (INFO) if one
        was going on, and forgets it. Returns whether one was."""
        with self._lock:
            if self._started is None:
                return False
            self._log.info("%s (after %d failed attempts in %.0f min)", message, self.failures,
                           (self._clock() - self._started) / 60)
            self._started = None
            self.failures = 0
            return True


def _headers(source: object) -> Mapping[str, object]:
    if source is None:
        return {}
    if isinstance(source, Mapping):
        return source
    headers = getattr(source, "headers", None)
    return headers if isinstance(headers, Mapping) else {}


def _get(headers: Mapping[str, object], name: str) -> str | None:
    """Case-insensitive lookup that also works on a plain dict (a JSON ``headers`` object)."""
    try:
        value = headers.get(name)
    except Exception:  # noqa: BLE001 - an odd mapping is no Retry-After
        value = None
    if value is None:
        for key, candidate in headers.items():
            if isinstance(key, str) and key.lower() == name:
                value = candidate
                break
    return value if isinstance(value, str) else None


def _http_date(value: str) -> datetime | None:
    value = value.strip()
    if not value or len(value) > _MAX_DATE_LEN or not value.isascii():
        return None
    try:
        when = parsedate_to_datetime(value)
    except Exception:  # noqa: BLE001 - TypeError/ValueError/IndexError/OverflowError by version
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when


def _capped(seconds: float, cap_s: float) -> float | None:
    if math.isnan(seconds) or seconds < 0:
        return None
    return min(cap_s, seconds)
