"""Where batches go: the user's HTTPS API or Microsoft Graph (list items / Excel rows).

A sink turns one batch of outbox rows into HTTP calls and reports, per seq, what happened.
It never decides *when* to retry; the uploader does, from ``SendResult`` / ``UploadError``.

Every sink uses one ``requests.Session`` and passes ``verify=`` and ``timeout=`` on every call:
requests merges ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` from the environment into each request
when ``verify`` is left at True, which would silently replace the configured ``ca_file``
(CONTRACT.md: the environment never overrides it).
"""

from __future__ import annotations

import email.utils
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

from agent.errors import UploadError
from agent.tlsutil import ca_bundle

if TYPE_CHECKING:
    import requests

    from agent.config import UploadSettings
    from agent.outbox import Row

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


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
        from agent.sinks.http import HttpSink

        return HttpSink(settings, device_id)
    if settings.sink == "graph_list":
        from agent.sinks.graph_list import GraphListSink

        return GraphListSink(settings, device_id)
    if settings.sink == "graph_excel":
        from agent.sinks.graph_excel import GraphExcelSink

        return GraphExcelSink(settings, device_id)
    raise ValueError(f"unknown sink {settings.sink!r}")


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date (RFC 9110 §10.2.3).

    The date form is wall-clock by nature; it is converted to a delay once, here, and the
    uploader then waits on the monotonic clock.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        try:
            return max(0.0, float(value))
        except ValueError:
            return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = now or datetime.now(UTC)
    return max(0.0, (when - current).total_seconds())


def status_error(resp: requests.Response, what: str) -> UploadError:
    """An UploadError for a non-2xx answer: retryable or not, with Retry-After."""
    status = resp.status_code
    detail = _short_body(resp)
    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
    if status == 401:
        return UploadError(f"{what}: the token was rejected (401)", retryable=True, status=401)
    if status == 403:
        return UploadError(f"{what}: the API refused the token (403): check the scopes",
                           retryable=True, status=403, retry_after_s=retry_after)
    if 300 <= status < 400:
        # Following it would turn the POST into a GET (and drop the token on another host);
        # the readings stay queued until someone fixes the URL.
        target = resp.headers.get("Location", "?")
        return UploadError(f"{what}: HTTP {status} redirect to {target}: set the final URL in the config",
                           retryable=True, status=status, retry_after_s=retry_after)
    if status in RETRYABLE_STATUS or status >= 500:
        return UploadError(f"{what}: HTTP {status} {detail}".rstrip(), retryable=True,
                           retry_after_s=retry_after, status=status)
    return UploadError(f"{what}: HTTP {status} {detail}".rstrip(), retryable=False, status=status)


def network_error(err: Exception, what: str) -> UploadError:
    return UploadError(f"{what}: {type(err).__name__}: {err}"[:300], retryable=True)


def _short_body(resp: requests.Response) -> str:
    try:
        text = resp.text
    except Exception:  # noqa: BLE001 - a body we cannot decode is no detail
        return ""
    return " ".join(text.split())[:200]


class HttpsClient:
    """One requests.Session with an explicit CA bundle and timeout on every call."""

    def __init__(self, ca_file: str, timeout_s: float) -> None:
        import requests  # lazily: ~80 ms on x86, more on a Pi

        self.session = requests.Session()
        self.verify = ca_bundle(ca_file)
        self.timeout_s = timeout_s

    def request(self, method: str, url: str, **kwargs: object) -> requests.Response:
        return self.session.request(method, url, verify=self.verify, timeout=self.timeout_s,
                                    allow_redirects=False, **kwargs)  # type: ignore[arg-type]

    def close(self) -> None:
        self.session.close()


def chunks(items: list[Row], size: int) -> list[list[Row]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def headers_of(obj: Mapping[str, object] | None) -> dict[str, str]:
    """Case-insensitive lookups on a Graph ``$batch`` response's ``headers`` object."""
    return {str(k).lower(): str(v) for k, v in (obj or {}).items()}
