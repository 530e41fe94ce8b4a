"""Where batches go: the user's HTTPS API or Microsoft Graph (list items / Excel rows).

A sink turns one batch of outbox rows into HTTP calls and reports, per seq, what happened.
It never decides *when* to retry; the uploader does, from ``SendResult`` / ``UploadError``.

Every sink uses one ``agent.net.https.HttpsSession`` (``verify=`` from ``ca_file`` plus the
system store and a timeout on every call, the environment's CA variables never override it,
redirects not followed) and reads ``Retry-After`` with ``agent.net.retry.retry_after_s``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit, urlunsplit

from agent.errors import UploadError
from agent.net.retry import OutageLog, retry_after_s

if TYPE_CHECKING:
    import requests

    from agent.config import UploadSettings
    from agent.telemetry.outbox import Row

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
TOO_LARGE = 413
WRONG_ENDPOINT = frozenset({404, 405, 410})     # the URL is wrong, not the data: keep everything

# A query string (``?code=<function key>``) after a URL or after requests' "url: /path".
_QUERY_IN_TEXT = re.compile(r"((?:https?://|\burl: )[^\s?'\"]*)\?[^\s'\")]*")
_USERINFO_IN_TEXT = re.compile(r"(https?://)[^\s/@'\"]*@")


def redact_url(url: str) -> str:
    """``url`` fit for logs and dead-letter reasons: no query string, fragment or userinfo.

    Azure Functions and similar put the API key in the query (``?code=...``); it must never
    reach a log line, the journal or a dead-letter reason.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def redact_text(text: str) -> str:
    """``text`` (e.g. a requests exception, which quotes the URL) without query strings or userinfo."""
    return _USERINFO_IN_TEXT.sub(r"\1", _QUERY_IN_TEXT.sub(r"\1", text))


@dataclass
class SendResult:
    """What the far side said about each seq of a batch.

    ``error``: the call that stopped the batch part-way (the rows not yet answered are in
    ``retry``); the uploader handles it exactly as if it had been raised.
    """

    acked: list[int] = field(default_factory=list)
    dead: dict[int, str] = field(default_factory=dict)      # seq -> reason
    retry: list[int] = field(default_factory=list)
    retry_after_s: float | None = None
    error: UploadError | None = None


class Sink(Protocol):
    """One destination. ``send`` raises UploadError when the whole batch failed."""

    name: str

    def send(self, batch: list[Row], token: str) -> SendResult: ...
    def close(self) -> None: ...


def make_sink(settings: UploadSettings, device_id: str) -> Sink:
    """The sink named by ``settings.sink`` (config.py has validated its keys)."""
    if settings.sink == "http":
        from agent.telemetry.sinks.http import HttpSink

        return HttpSink(settings, device_id)
    if settings.sink == "graph_list":
        from agent.telemetry.sinks.graph_list import GraphListSink

        return GraphListSink(settings, device_id)
    if settings.sink == "graph_excel":
        from agent.telemetry.sinks.graph_excel import GraphExcelSink

        return GraphExcelSink(settings, device_id)
    raise ValueError(f"unknown sink {settings.sink!r}")


def status_error(resp: requests.Response, what: str, *,
                 also_retryable: frozenset[int] = frozenset()) -> UploadError:
    """An UploadError for a non-2xx answer: retryable or not, with Retry-After.

    ``also_retryable``: statuses that are temporary for this sink only (Excel answers 409/423
    while the workbook is open or locked). Non-retryable means "these readings are refused"
    (400, 422, other 4xx): the caller isolates them by splitting the batch.
    """
    status = resp.status_code
    detail = _short_body(resp)
    retry_after = retry_after_s(resp)
    endpoint = redact_url(str(getattr(resp, "url", "") or ""))
    if status == 401:
        return UploadError(f"{what}: the token was rejected (401)", retryable=True, status=401,
                           claims=claims_challenge(resp.headers.get("WWW-Authenticate")))
    if status == 403:
        return UploadError(f"{what}: the API refused the token (403): check the scopes",
                           retryable=True, status=403, retry_after_s=retry_after)
    if 300 <= status < 400:
        # Following it would turn the POST into a GET (and drop the token on another host);
        # the readings stay queued until someone fixes the URL.
        target = redact_url(resp.headers.get("Location", "?"))
        return UploadError(f"{what}: HTTP {status} redirect to {target}: set the final URL in the config",
                           retryable=True, status=status, retry_after_s=retry_after, endpoint=endpoint)
    if status in WRONG_ENDPOINT:
        return UploadError(f"{what}: HTTP {status}: no such endpoint, check the URL in the config",
                           retryable=True, status=status, retry_after_s=retry_after, endpoint=endpoint)
    if status in RETRYABLE_STATUS or status in also_retryable or status >= 500:
        return UploadError(f"{what}: HTTP {status} {detail}".rstrip(), retryable=True,
                           retry_after_s=retry_after, status=status)
    return UploadError(f"{what}: HTTP {status} {detail}".rstrip(), retryable=False, status=status)


_AUTH_PARAM = re.compile(r'([A-Za-z_][\w-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]+))')


def claims_challenge(header: str | None) -> str | None:
    """The claims JSON of a CAE challenge (``Bearer error="insufficient_claims", claims="…"``),
    decoded from base64 as Entra sends it (raw JSON is accepted too). None when there is no
    such challenge or it is not readable: then the 401 is an ordinary one."""
    if not header or not header.lstrip().lower().startswith("bearer"):
        return None
    params: dict[str, str] = {}
    for m in _AUTH_PARAM.finditer(header):
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
    raw = params.get("claims")
    if params.get("error") != "insufficient_claims" or not raw:
        return None
    candidates = [raw]
    try:
        padded = raw + "=" * (-len(raw) % 4)
        candidates.insert(0, base64.b64decode(padded.replace("-", "+").replace("_", "/"),
                                              validate=True).decode())
    except (binascii.Error, ValueError, UnicodeDecodeError):
        pass
    for text in candidates:
        try:
            if isinstance(json.loads(text), dict):
                return text
        except ValueError:
            continue
    return None


def network_error(err: Exception, what: str) -> UploadError:
    """A retryable UploadError; the exception text is scrubbed of query strings (requests quotes
    the whole URL in it)."""
    return UploadError(redact_text(f"{what}: {type(err).__name__}: {err}")[:300], retryable=True)


def _short_body(resp: requests.Response) -> str:
    """The first 200 bytes of the answer, on one line (for logs and dead-letter reasons)."""
    try:
        text = resp.content[:200].decode("utf-8", errors="replace")
    except Exception:  # noqa: BLE001 - a body we cannot read is no detail
        return ""
    return redact_text(" ".join(text.split()))


def chunks(items: list[Row], size: int) -> list[list[Row]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def headers_of(obj: Mapping[str, object] | None) -> dict[str, str]:
    """Case-insensitive lookups on a Graph ``$batch`` response's ``headers`` object."""
    return {str(k).lower(): str(v) for k, v in (obj or {}).items()}


class SplitJournal:
    """A sink's journal lines for halving batches, per kind ("413", "refused"), by the one rule
    for trouble that goes on (``agent.net.retry.OutageLog``): the first a WARNING, then at most
    one every 10 min with a count; the halvings in between go to DEBUG. One per sink."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._logs = {kind: OutageLog(log, clock=clock) for kind in ("413", "refused")}

    def split(self, err: UploadError, part: list[Row]) -> None:
        kind = "413" if err.status == TOO_LARGE else "refused"
        advice = ("a smaller upload.batch_max avoids the extra requests" if kind == "413"
                  else "finding the readings it refuses; only those are dead-lettered")
        self._logs[kind].failed(f"HTTP {err.status} for {len(part)} readings (seq {part[0].seq}.."
                                f"{part[-1].seq}): sending them in two halves ({advice})")


def send_splitting(batch: list[Row], send_part: Callable[[list[Row]], None],
                   journal: SplitJournal | None = None) -> SendResult:
    """``send_part(batch)``, halving any part the far side refuses until what it refuses is
    isolated: 413 (payload too large) and the "refused data" answers (400, 422, other 4xx, i.e.
    non-retryable ``UploadError``). Only a single reading still refused is dead-lettered, with
    the status and the start of the answer; every good reading of the batch is delivered.

    ``send_part`` raises UploadError. A retryable answer stops here (the rest go to ``retry``).
    A one-reading batch refused outright raises, as an unsplit send would. ``journal``: the
    sink's ``SplitJournal`` (without one, each call starts its own).
    """
    journal = journal if journal is not None else SplitJournal()
    result = SendResult()
    todo: list[list[Row]] = [batch]
    while todo:
        part = todo.pop(0)
        try:
            send_part(part)
        except UploadError as err:
            if (err.status == TOO_LARGE or not err.retryable) and len(part) > 1:
                journal.split(err, part)
                half = len(part) // 2
                todo[:0] = [part[:half], part[half:]]
                continue
            if not (result.acked or result.dead) and (err.retryable or not todo):
                raise
            if not err.retryable:
                result.dead.update((r.seq, str(err)) for r in part)
                continue
            result.retry = [r.seq for p in (part, *todo) for r in p]
            result.error = err
            return result
        result.acked.extend(r.seq for r in part)
    return result

