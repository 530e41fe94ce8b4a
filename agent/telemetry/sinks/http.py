"""``sink = "http"``: JSON batches to the user's API, as docs/INTERFACE.md "HTTP: your API" says.

``upload.compress = "gzip"`` (the default) sends the body gzip-compressed with
``Content-Encoding: gzip``: readings are repetitive JSON, so a metered link carries a fraction of
the bytes (bench/bench_drain.py). The body is compressed while it is serialised, reading by
reading, so a large batch never exists twice in memory. An API that answers 415 (Unsupported
Media Type) to a compressed body gets the same batch again uncompressed, and identity from then
on until the agent restarts (logged once).
"""

from __future__ import annotations

import json
import logging
import zlib
from typing import TYPE_CHECKING

from agent.errors import UploadError
from agent.net.https import https_session
from agent.telemetry.sinks import (
    SendResult,
    SplitJournal,
    network_error,
    redact_url,
    send_splitting,
    status_error,
)

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
        self.gzip = settings.compress == "gzip"
        self.bytes_sent = 0          # body bytes on the wire (the bench reads it)
        self.splits = SplitJournal()

    def send(self, batch: list[Row], token: str) -> SendResult:
        """Deliver ``batch`` (ascending seq) in one request; on 413 in halves (see
        ``send_splitting``), each half with its own Idempotency-Key.

        Raises:
            UploadError: status 401/403 (token), retryable (408/429/5xx/network, with
                ``retry_after_s``) or not (other 4xx: dead-letter the batch).
        """
        if not batch:
            return SendResult()
        return send_splitting(batch, lambda part: self._post(part, token), self.splits)

    def _post(self, batch: list[Row], token: str) -> None:
        import requests

        first, last = batch[0].seq, batch[-1].seq
        what = f"POST {redact_url(self.url)} (seq {first}..{last})"
        while True:
            gzipped = self.gzip
            headers = {
                "Authorization": f"Bearer {token}",
                "Content-Type": "application/json",
                "Idempotency-Key": f"{self.device_id}:{first}-{last}",
            }
            if gzipped:
                headers["Content-Encoding"] = "gzip"
            body = encode_body(self.device_id, batch, gzipped=gzipped)
            try:
                resp = self.client.request("POST", self.url, data=body, headers=headers)
            except requests.RequestException as err:
                raise network_error(err, what) from err
            self.bytes_sent += len(body)
            with resp:
                if 200 <= resp.status_code < 300:
                    return
                if resp.status_code == 415 and gzipped:
                    log.warning("%s: the API does not accept gzip (415); sending uncompressed "
                                "from now on (set upload.compress = \"none\" to skip the try)", what)
                    self.gzip = False
                    continue
                raise status_error(resp, what)

    def close(self) -> None:
        self.client.close()


def encode_body(device_id: str, batch: list[Row], *, gzipped: bool) -> bytes:
    """The request body for ``batch``: JSON, gzip-compressed while serialised when ``gzipped``."""
    head = json.dumps({"device_id": device_id}, ensure_ascii=False, separators=(",", ":"))[:-1]
    parts = [head.encode() + b',"readings":[']
    for i, row in enumerate(batch):
        item = json.dumps(row.reading, ensure_ascii=False, separators=(",", ":")).encode()
        parts.append(b"," + item if i else item)
    parts.append(b"]}")
    if not gzipped:
        return b"".join(parts)
    # wbits 16+13: the gzip container (RFC 1952) with an 8 KiB window, memLevel 5: ~48 KiB of
    # compressor state instead of zlib's default 256 KiB (a Pi Zero's RSS, docs/PERFORMANCE.md
    # "Memory"); readings repeat within a few hundred bytes, so a 500-reading body compresses as
    # well (0.086 of the JSON against 0.088). Level 6, zlib's default: on readings it is within a
    # few percent of level 9 at half the CPU. Any gzip reader takes a smaller window.
    z = zlib.compressobj(6, zlib.DEFLATED, 16 + 13, 5)
    out = [z.compress(p) for p in parts]
    out.append(z.flush())
    return b"".join(out)


__all__ = ["HttpSink", "UploadError", "encode_body"]
