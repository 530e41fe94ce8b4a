"""Outbox -> sink, one batch at a time, with the status handling of docs/INTERFACE.md "HTTP: your API".

- 2xx: ack; while a backlog remains the next batch goes at once. With nothing pending the
  uploader sleeps until there is news (``readings_queued()`` from the sampler, ``flush()``,
  stop); a new reading goes out at once, or ``interval_s`` after the previous batch if that was
  sooner, so readings are still batched by the interval but an idle box does not wake every
  ``interval_s`` to find the outbox empty.
- 401: ``tokens.token_rejected(claims)`` once (one refresh from the IdP; ``claims`` is the JSON
  of a CAE challenge, ``WWW-Authenticate: Bearer error="insufficient_claims", claims=…``) and
  retry with the new token. If it returns None (the refresh failed, e.g. the IdP is unreachable),
  wait ``NO_TOKEN_POLL_S`` and try again with whatever ``access_token()`` then gives. Not signed
  in at all, ``run`` sleeps until ``flush()`` (the service calls it at sign-in) instead. If the
  fresh token is refused too: keep the readings, state error ``REFUSED_ERROR``, back off
  (30 s doubling to 10 min) and never report that token again (that would start a new sign-in;
  only the IdP refusing the refresh token may).
- 403: keep the readings, back off (30 s doubling to 10 min), state error
  "the API refused the token (403): check the scopes".
- 404/405/410 and 3xx: the endpoint is wrong, not the data: keep everything, back off the same
  way, state error naming the endpoint (without its query string).
- 408/429/5xx/network: retry; ``Retry-After`` (``agent.net.retry``: seconds, or an HTTP date
  measured against the response's own ``Date``; capped at 1 h, garbage ignored) is a minimum wait
  (at least half the current back-off, so ``Retry-After: 0`` cannot cause a tight loop),
  otherwise exponential back-off with equal jitter (1 s doubling to 5 min).
- other 4xx (400, 422, ...): the sink splits the batch until the refused readings are isolated;
  only those are dead-lettered, the rest delivered.
- storage full / read-only (the outbox's state): uploads go on; an ack the disk cannot take is
  held by the outbox and the batch is not handed out again. Every step asks the outbox whether
  its file is still the one at its path, and so does a change inotify reports on that file
  (agent/telemetry/filewatch.py: deleted or replaced, noticed at once, without polling); where
  inotify is missing, every ``interval_s`` during a long wait.

The journal follows ``agent.net.retry.OutageLog`` on every path here: a line when a failure
starts, then at most one every 10 min with a count, and one when it ends; never one per retry.

All waits are on the monotonic clock. ``step()`` does one unit of work and returns how long to
wait before the next, so tests drive it with a fake clock and never sleep.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

from agent.errors import UploadError
from agent.net.retry import Backoff, OutageLog
from agent.telemetry.filewatch import FileWatch
from agent.telemetry.sinks import WRONG_ENDPOINT, SendResult
from agent.wakeup import Signal, wait_any

if TYPE_CHECKING:
    from agent.config import UploadSettings
    from agent.state import AgentState
    from agent.telemetry.outbox import Outbox, Row
    from agent.telemetry.sinks import Sink

log = logging.getLogger(__name__)

SCOPE_ERROR = "the API refused the token (403): check the scopes"
REFUSED_ERROR = "the API refuses fresh tokens (401): check its audience and issuer"
BACKOFF_FIRST_S = 1.0
BACKOFF_CAP_S = 300.0
FORBIDDEN_FIRST_S = 30.0
FORBIDDEN_CAP_S = 600.0
CRASH_RETRY_S = 5.0            # a step that raised (a bug) is tried again after this
NO_TOKEN_POLL_S = 2.0          # how often to look for a token while signed out (cheap, local)
TICK_S = 0.25                  # run(): longest single wait under an injected clock (tests)


class TokenSource(Protocol):
    """What the uploader needs from sign-in (agent/signin/authenticator.py's Authenticator)."""

    def access_token(self) -> str | None: ...
    def token_rejected(self, claims_challenge: str | None = None) -> str | None: ...


class Uploader:
    """Moves readings from the outbox to the sink. ``run(stop)`` in its own thread."""

    def __init__(self, outbox: Outbox, sink: Sink, tokens: TokenSource, state: AgentState,
                 settings: UploadSettings, *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], datetime] = lambda: datetime.now(UTC),
                 rng: Callable[[], float] = random.random) -> None:
        self.outbox = outbox
        self.sink = sink
        self.tokens = tokens
        self.state = state
        self.settings = settings
        self.clock = clock
        self.wall = wall
        self.heartbeat = clock()
        self._wake = Signal()           # flush(), the outbox file changed: step now
        self._news = Signal()           # readings_queued(): step when the interval allows
        self._idle = False              # the last step found nothing to send
        self._no_token = False          # the last step had no token to send with
        self._last_batch = -math.inf    # monotonic time the last batch was claimed
        self._file_changed = False      # the watch saw the outbox file change
        self._not_before = 0.0          # monotonic; server-imposed (Retry-After, 403) minimum
        self._backoff_until = 0.0       # monotonic; our own back-off (flush() may cut it short)
        self._retry = Backoff(BACKOFF_FIRST_S, BACKOFF_CAP_S, rng)           # equal jitter
        self._forbidden = Backoff(FORBIDDEN_FIRST_S, FORBIDDEN_CAP_S, jitter=(1.0, 1.0))
        self._refused_token: str | None = None   # digest of a token the API refused twice
        self._waiting_for_token = False
        # One journal rule per kind of trouble (agent.net.retry.OutageLog).
        self._down = OutageLog(log, clock=clock)                       # 408/429/5xx/network
        self._held_log = OutageLog(log, level=logging.ERROR, clock=clock)  # 401/403/404 held
        self._no_refresh = OutageLog(log, clock=clock)                 # 401, refresh gave nothing
        self._crashed = OutageLog(log, level=logging.ERROR, clock=clock)   # step() raised
        self._held: str | None = None            # the error shown while a _hold() lasts
        try:
            self._takes_claims = bool(inspect.signature(tokens.token_rejected).parameters)
        except (TypeError, ValueError):
            self._takes_claims = False

    # ---------------------------------------------------------------- thread API

    def run(self, stop: threading.Event) -> None:
        """Upload until ``stop`` is set (returns at once when it is an agent.wakeup.Signal)."""
        log.info("uploader started (sink %s, batch_max %d)", self.sink.name, self.settings.batch_max)
        path = getattr(self.outbox, "path", None)
        watch = FileWatch(path, self._outbox_file_changed) if path is not None else None
        watching = watch is not None and watch.start()
        try:
            while not stop.is_set():
                self.heartbeat = self.clock()
                delay = self.guarded_step()
                if watch is not None and watching and self._file_changed:
                    self._file_changed = False
                    watch.rearm()             # the file the path names now (reopened by the step)
                self._sleep(stop, delay, poll_file=not watching)
        finally:
            if watch is not None:
                watch.stop()
        log.info("uploader stopped")

    def _sleep(self, stop: threading.Event, delay: float, *, poll_file: bool) -> None:
        """Event-driven: asleep until ``delay`` passed, ``flush()``, the outbox file changed, or
        stop; when idle (nothing was pending), until a reading is queued, then until the
        interval since the last batch allows. ``poll_file``: no inotify here, so look at the
        outbox file at least once an interval (docs/INTERFACE.md: noticed within one interval)."""
        idle = self._idle
        deadline = math.inf if idle else self.clock() + delay
        if self._no_token and self.state.snapshot.phase != "signed_in":
            # No sign-in: nothing to look for every NO_TOKEN_POLL_S; the service flushes the
            # moment one exists (its state observer). Signed in without a token (the IdP down
            # while the token ran out) the look stays: the sign-in's back-off decides.
            deadline = math.inf
        checked = self.clock()
        while not stop.is_set():
            now = self.clock()
            if idle and self._news.is_set():
                self._news.clear()
                idle = False          # a reading: send when the interval since the last batch allows
                deadline = min(deadline, max(now, self._last_batch + self.settings.interval_s))
            left = deadline - now
            if left <= 0:
                return
            wait = left
            if poll_file:
                wait = min(wait, max(0.0, checked + self.settings.interval_s - now))
            if self.clock is not time.monotonic:
                wait = min(wait, TICK_S)     # an injected clock moves without waking us
            if wait_any(wait, stop, self._wake, *((self._news,) if idle else ())):
                if self._wake.is_set():
                    self._wake.clear()
                    return
                continue
            self.heartbeat = self.clock()
            if poll_file and self.heartbeat - checked >= self.settings.interval_s:
                checked = self.heartbeat
                self._check_outbox_file()

    def readings_queued(self) -> None:
        """The sampler stored readings (any thread): an idle uploader sends them."""
        self._news.set()

    def _outbox_file_changed(self) -> None:
        """The watch's thread: the outbox file was deleted, renamed or replaced."""
        self._file_changed = True
        self._wake.set()

    def flush(self) -> None:
        """Upload now (the MQTT ``flush`` command): ends the idle wait, our own back-off and a
        server's ``Retry-After`` (an operator asking outranks a proxy's advice; a wrong one must
        never keep a box silent until it is capped)."""
        self._backoff_until = 0.0
        self._not_before = 0.0
        self._wake.set()

    # ---------------------------------------------------------------- one step

    def guarded_step(self) -> float:
        """``step()`` that never raises: a bug must not stop delivery for good (the watchdog
        sees the heartbeat). Its traceback is logged once per streak, then counted."""
        try:
            delay = self.step()
        except Exception:
            self._crashed.failed("uploader step failed", f"retrying in {CRASH_RETRY_S:.0f} s",
                                 exc_info=True)
            return CRASH_RETRY_S
        self._crashed.ended("uploader steps work again")
        return delay

    def step(self) -> float:
        """Send at most one batch. Returns seconds to wait before the next step (0 = at once)."""
        now = self.clock()
        self._idle = self._no_token = False
        self._check_outbox_file()
        hold = max(self._not_before, self._backoff_until) - now
        if hold > 0:
            return hold
        token = self.tokens.access_token()
        if token is None:
            if not self._waiting_for_token:
                log.info("uploader: waiting for sign-in; readings keep queuing (%d pending)",
                         self.outbox.counts().pending)
                self._waiting_for_token = True
            self._no_token = True
            return NO_TOKEN_POLL_S
        if self._waiting_for_token:
            log.info("uploader: have a token, uploading")
            self._waiting_for_token = False
        batch = self.outbox.claim(self.settings.batch_max)
        self._idle = not batch
        if not batch:
            return self.settings.interval_s     # run() sleeps until news instead (_idle)
        self._last_batch = now
        result = self._send(batch, token)
        if result is None:
            self._no_token = True
            return NO_TOKEN_POLL_S
        return self._apply(batch, result)

    def _send(self, batch: list[Row], token: str) -> SendResult | None:
        """``sink.send`` with the 401 dance: one refresh from the IdP (for the claims of a CAE
        challenge, if any), one retry. None: no token now, wait for sign-in."""
        result = self._call(batch, token)
        if _status(result) != 401:
            self._no_refresh.ended("uploader: the API accepts the token again")
            return result
        if _digest(token) == self._refused_token:
            # This very token came back from a forced refresh and was refused: asking again
            # would only start a new sign-in. Keep it, back off (in _apply).
            return result
        claims = result.error.claims if result.error is not None else None
        # While refreshes keep failing this repeats every poll: the outage below counts it.
        log.log(logging.DEBUG if self._no_refresh.ongoing else logging.WARNING,
                "API answered 401 for seq %d..%d%s; refreshing the token once",
                batch[0].seq, batch[-1].seq, " with a claims challenge" if claims else "")
        fresh = self._token_rejected(claims)
        if fresh is None:
            # The refresh failed (IdP unreachable) or sign-in starts over. The token is NOT
            # recorded as refused: the sign-in side refreshes a rejected token itself, so after
            # the poll interval whatever access_token() then hands out is tried again.
            self._apply_partial(result)
            self._no_refresh.failed("uploader: no fresh token after the API's 401",
                                    f"trying again in {NO_TOKEN_POLL_S:.0f} s")
            return None
        self._no_refresh.ended("uploader: got a fresh token after the API's 401")
        pending = [r for r in batch if r.seq not in set(result.acked) | set(result.dead)]
        retry = self._call(pending, fresh)
        retry.acked.extend(result.acked)
        retry.dead.update(result.dead)
        if _status(retry) == 401:
            self._refused_token = _digest(fresh)
        return retry

    def _token_rejected(self, claims: str | None) -> str | None:
        """``tokens.token_rejected(claims_challenge)``; sources without the parameter get the
        plain call (a claims challenge then is an ordinary refresh)."""
        if self._takes_claims:
            return self.tokens.token_rejected(claims)
        return self.tokens.token_rejected()

    def _check_outbox_file(self) -> None:
        check = getattr(self.outbox, "check_file", None)
        if check is not None and check():
            self._publish_counts()

    def _call(self, batch: list[Row], token: str) -> SendResult:
        try:
            return self.sink.send(batch, token)
        except UploadError as err:
            return SendResult(retry=[r.seq for r in batch], error=err)

    def _apply_partial(self, result: SendResult) -> None:
        if result.acked:
            self.outbox.ack(result.acked)
        by_reason: dict[str, list[int]] = {}          # in seq order, so the table reads oldest first
        for seq, reason in sorted(result.dead.items()):
            by_reason.setdefault(reason, []).append(seq)
        for reason, seqs in by_reason.items():
            self.outbox.dead_letter(seqs, reason)

    def _apply(self, batch: list[Row], result: SendResult) -> float:
        self._apply_partial(result)
        err = result.error
        now = self.clock()
        if err is not None and not err.retryable:
            self.outbox.dead_letter(result.retry, str(err))
            self._delivered(bool(result.acked))
            return 0.0
        held = _held_error(err)
        if err is not None and held is not None:
            # Nothing we resend fixes these (a refused token, the wrong URL): keep the readings,
            # say what to fix, try again rarely in case someone fixed it at the far side.
            wait = self._forbidden.next_delay(err.retry_after_s)
            self._not_before = now + wait
            self._held_log.failed(f"{held}; keeping {len(result.retry)} readings",
                                  f"next try in {wait:.0f} s")
            self._held = held
            self.state.update(error=held)
            self.state.set_link("api", "down")
            self._publish_counts()
            return wait
        if err is not None or result.retry:
            backoff = self._retry.next_delay()
            server = err.retry_after_s if err is not None else result.retry_after_s
            if server is not None:
                # A minimum: never earlier than asked, and "Retry-After: 0" from a struggling
                # server does not turn into a tight retry loop.
                wait = max(server, backoff / 2)
                self._not_before = now + wait
            else:
                self._backoff_until = now + backoff
                wait = backoff
            what = str(err) if err is not None else f"{len(result.retry)} readings throttled"
            self._down.failed(f"upload failed ({what})", f"retrying in {wait:.1f} s"
                              + (" (Retry-After)" if server is not None else ""))
            if err is not None:
                self.state.set_link("api", "down")
            if result.acked:
                self._delivered(True, throttled=True)
            else:
                self._publish_counts()
            return wait
        self._delivered(bool(result.acked))
        if self.outbox.counts().pending > 0:
            return 0.0
        self._idle = True                   # all sent: asleep until the next reading
        return self.settings.interval_s

    def _delivered(self, any_acked: bool, *, throttled: bool = False) -> None:
        if not throttled:          # part of a batch throttled: the outage's count goes on
            self._down.ended("uploads work again")
        self._held_log.ended("the API accepts uploads again")
        self._retry.reset()
        self._forbidden.reset()
        self.state.set_link("api", "up")
        changes: dict[str, object] = {"outbox": self.outbox.counts()}
        if any_acked:
            changes["last_upload"] = self.wall()
        if self._held is not None and self.state.snapshot.error == self._held:
            changes["error"] = None
        self._held = None
        self._refused_token = None
        self.state.update(**changes)

    def _publish_counts(self) -> None:
        self.state.update(outbox=self.outbox.counts())


def _held_error(err: UploadError | None) -> str | None:
    """The operator line for answers that resending cannot fix; None for the others."""
    if err is None or err.status is None:
        return None
    if err.status == 401:
        return REFUSED_ERROR
    if err.status == 403:
        return SCOPE_ERROR
    if err.status in WRONG_ENDPOINT or 300 <= err.status < 400:
        where = err.endpoint or "the configured URL"
        what = "redirects" if err.status < 400 else "does not exist"
        return f"the API endpoint {what} (HTTP {err.status} from {where}): check upload.url"
    return None


def _status(result: SendResult) -> int | None:
    return result.error.status if result.error is not None else None


def _digest(token: str) -> str:
    # Remember which token was refused without keeping the token itself around.
    return hashlib.sha256(token.encode()).hexdigest()
