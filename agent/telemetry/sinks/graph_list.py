"""``sink = "graph_list"``: readings as SharePoint list items, sent in Graph JSON ``$batch``es.

Each reading becomes ``POST /sites/{site_id}/lists/{list_id}/items`` with
``{"fields": {"Title": id, "DeviceId", "Seq", "Sensor", "Type", "Value", "Unit", "Time"}}``
(create those columns in the list; make *Title* "Enforce unique values" so a repeat after a
lost answer is refused with 409, which this sink counts as delivered). Up to 20 items go in one
``POST {graph_url}/$batch`` (Graph's limit); every item's own status is honoured:
201 delivered, 409 duplicate = delivered, 429/5xx retried (its ``Retry-After`` is the minimum
wait), 401/403 stop the batch (token), other 4xx dead-lettered.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from agent.errors import UploadError
from agent.net.https import https_session
from agent.net.retry import retry_after_s
from agent.telemetry.sinks import (
    RETRYABLE_STATUS,
    SendResult,
    chunks,
    headers_of,
    network_error,
    redact_url,
    status_error,
)

if TYPE_CHECKING:
    from agent.config import UploadSettings
    from agent.telemetry.outbox import Row

log = logging.getLogger(__name__)

GRAPH_BATCH_MAX = 20


def list_fields(reading: dict[str, Any], device_id: str) -> dict[str, Any]:
    """The list item's columns for one reading."""
    return {
        "Title": reading["id"], "DeviceId": device_id, "Seq": reading["seq"],
        "Sensor": reading["sensor"], "Type": reading["type"], "Value": reading["value"],
        "Unit": reading["unit"], "Time": reading["time"],
    }


class GraphListSink:
    name = "graph_list"

    def __init__(self, settings: UploadSettings, device_id: str) -> None:
        self.graph_url = settings.graph_url.rstrip("/")
        self.items_path = f"/sites/{settings.site_id}/lists/{settings.list_id}/items"
        self.device_id = device_id
        self.client = https_session(settings.ca_file, settings.timeout_s, follow_redirects=False)

    def send(self, batch: list[Row], token: str) -> SendResult:
        """Send ``batch`` as $batch requests of <= 20 items, one after the other.

        Stops at the first throttled item or failed request: what was not answered is in
        ``retry``. Raises UploadError only when nothing at all was answered.
        """
        result = SendResult()
        parts = chunks(batch, GRAPH_BATCH_MAX)
        for n, part in enumerate(parts):
            err = self._send_part(part, token, result)
            if err is not None or result.retry:
                rest = [r.seq for p in parts[n + 1:] for r in p]
                result.retry.extend(rest)
                if err is not None:
                    if not result.acked and not result.dead and n == 0:
                        raise err
                    result.error = err
                break
        return result

    def _send_part(self, part: list[Row], token: str, result: SendResult) -> UploadError | None:
        import requests

        body = {"requests": [
            {"id": str(r.seq), "method": "POST", "url": self.items_path,
             "headers": {"Content-Type": "application/json"},
             "body": {"fields": list_fields(r.reading, self.device_id)}}
            for r in part]}
        url = f"{self.graph_url}/$batch"
        what = f"POST {redact_url(url)} (seq {part[0].seq}..{part[-1].seq})"
        try:
            resp = self.client.request(
                "POST", url, data=json.dumps(body, ensure_ascii=False).encode(),
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        except requests.RequestException as err:
            result.retry.extend(r.seq for r in part)
            return network_error(err, what)
        with resp:
            if not 200 <= resp.status_code < 300:
                result.retry.extend(r.seq for r in part)
                return status_error(resp, what)
            try:
                answers = {str(a["id"]): a for a in resp.json()["responses"]}
            except (ValueError, KeyError, TypeError) as err:
                result.retry.extend(r.seq for r in part)
                return UploadError(f"{what}: malformed $batch response: {err}", retryable=True,
                                   status=resp.status_code)
        token_error: UploadError | None = None
        for row in part:
            answer = answers.get(str(row.seq))
            status = int(answer.get("status", 0)) if answer else 0
            if status in (200, 201, 409):
                result.acked.append(row.seq)
            elif status in (401, 403):
                result.retry.append(row.seq)
                msg = ("the token was rejected (401)" if status == 401
                       else "the API refused the token (403): check the scopes")
                token_error = UploadError(f"{what}: {msg}", retryable=True, status=status)
            elif status == 0 or status in RETRYABLE_STATUS or status >= 500:
                result.retry.append(row.seq)
                wait = retry_after_s(headers_of(answer.get("headers") if answer else None),
                                     date=resp.headers.get("Date"))
                if wait is not None:
                    result.retry_after_s = max(result.retry_after_s or 0.0, wait)
            else:
                result.dead[row.seq] = f"Graph list item: HTTP {status} {_error_text(answer)}".rstrip()
        if result.retry and token_error is None:
            log.warning("Graph throttled %d of %d items; retrying after %.1f s",
                        len(result.retry), len(part), result.retry_after_s or 0.0)
        return token_error

    def close(self) -> None:
        self.client.close()


def _error_text(answer: dict[str, Any] | None) -> str:
    try:
        err = (answer or {})["body"]["error"]
        return f"{err.get('code', '')}: {err.get('message', '')}"[:200]
    except (KeyError, TypeError, AttributeError):
        return ""
