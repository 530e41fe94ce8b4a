"""``sink = "http"``: JSON batches to the user's API, exactly as CONTRACT.md "Custom API" says."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from agent.errors import UploadError
from agent.net.https import https_session
from agent.telemetry.sinks import SendResult, network_error, redact_url, send_splitting, status_error

if TYPE_CHECKING:
    from agent.config import UploadSettings
    from agent.telemetry.outbox import Row

log = logging.getLogger(__name__)


class HttpSink:
    """``POST {url}`` with Bearer token and an ``Idempotency-Key`` naming the seq range."""

    name = "http"

    def __init__(self, settings: UploadSettings, device_id: str) -> None:
        self.url = settings.url
        self.device_id = device_id
        self.client = https_session(settings.ca_file, settings.timeout_s, follow_redirects=False)

    def send(self, batch: list[Row], token: str) -> SendResult:
        """Deliver ``batch`` (ascending seq) in one request; on 413 in halves (see
        ``send_splitting``), each half with its own Idempotency-Key.

        Raises:
            UploadError: status 401/403 (token), retryable (408/429/5xx/network, with
                ``retry_after_s``) or not (other 4xx: dead-letter the batch).
        """
        if not batch:
            return SendResult()
        return send_splitting(batch, lambda part: self._post(part, token))

    def _post(self, batch: list[Row], token: str) -> None:
        import requests

        first, last = batch[0].seq, batch[-1].seq
        body = json.dumps({"device_id": self.device_id, "readings": [r.reading for r in batch]},
                          ensure_ascii=False, separators=(",", ":")).encode()
        headers = {
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
            "Idempotency-Key": f"{self.device_id}:{first}-{last}",
        }
        what = f"POST {redact_url(self.url)} (seq {first}..{last})"
        try:
            resp = self.client.request("POST", self.url, data=body, headers=headers)
        except requests.RequestException as err:
            raise network_error(err, what) from err
        with resp:
            if 200 <= resp.status_code < 300:
                return
            raise status_error(resp, what)

    def close(self) -> None:
        self.client.close()


__all__ = ["HttpSink", "UploadError"]
