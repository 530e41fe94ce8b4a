"""``sink = "graph_excel"``: readings appended as rows of an Excel table through Microsoft Graph.

``POST {graph_url}{item_path}/workbook/tables/{table}/rows/add`` with
``{"values": [[id, device, seq, sensor, type, value, unit, time], ...]}``: many rows per call,
one call at a time per workbook (Excel serialises writes; parallel calls only get 409/429).

Repeats: Excel has no idempotency. The reading id is the first column, so after an *ambiguous*
failure (timeout, connection reset, 5xx such as 504 — the rows may have been appended before
the answer was lost), and on the first send after start (the previous process may have died
mid-append), the next send first reads the table's row count
(``GET …/tables/{table}/dataBodyRange?$select=rowCount``) and its last rows
(``GET …/tables/{table}/rows?$top=N&$skip=rowCount-N``), acks the readings whose ids are
already there and appends only the rest. A clean 429/503 with no body is not ambiguous.

409/423 (workbook open or locked in Excel) are retried with back-off, not dead-lettered.
413 (payload too large): the batch is halved until accepted; a single row that still gets 413
is dead-lettered.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

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
    import requests

    from agent.config import UploadSettings
    from agent.telemetry.outbox import Row

log = logging.getLogger(__name__)

# Excel answers 409 (conflict) / 423 (locked) while the workbook is open or locked in Excel:
# temporary, so retried with back-off (Retry-After honoured), never dead-lettered.
EXCEL_RETRYABLE = frozenset({409, 423})

_workbook_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def excel_row(reading: dict[str, Any], device_id: str) -> list[Any]:
    """Columns: id, device, seq, sensor, type, value, unit, time."""
    return [reading["id"], device_id, reading["seq"], reading["sensor"], reading["type"],
            reading["value"], reading["unit"], reading["time"]]


class GraphExcelSink:
    name = "graph_excel"

    def __init__(self, settings: UploadSettings, device_id: str) -> None:
        base = settings.graph_url.rstrip("/") + settings.item_path
        self.table_url = f"{base}/workbook/tables/{quote(settings.table, safe='')}"
        self.device_id = device_id
        self.client = https_session(settings.ca_file, settings.timeout_s, follow_redirects=False)
        # The last rows/add may have been applied without us seeing the answer. True at start:
        # the previous process may have died mid-append (power cut), so check once.
        self.unsure = True
        self.splits = SplitJournal()
        with _locks_guard:
            self._lock = _workbook_locks.setdefault(base, threading.Lock())

    def send(self, batch: list[Row], token: str) -> SendResult:
        """Append ``batch``; after an ambiguous failure, skip rows the table already has.

        Raises:
            UploadError: as the http sink (401/403, retryable with Retry-After, other 4xx).
        """
        if not batch:
            return SendResult()
        with self._lock:
            already: list[int] = []
            if self.unsure:
                present = self._present_ids(batch, token)
                already = [r.seq for r in batch if r.reading["id"] in present]
                if already:
                    log.info("Excel table already holds %d of %d readings after a lost answer; "
                             "not appending them again", len(already), len(batch))
                self.unsure = False
                batch = [r for r in batch if r.reading["id"] not in present]
                if not batch:
                    return SendResult(acked=already)
            try:
                result = send_splitting(batch, lambda part: self._append(part, token), self.splits)
            except UploadError as err:
                if already:
                    return SendResult(acked=already, retry=[r.seq for r in batch], error=err)
                raise
            result.acked[:0] = already
            return result

    def _append(self, batch: list[Row], token: str) -> None:
        import requests

        url = f"{self.table_url}/rows/add"
        what = f"POST {redact_url(url)} (seq {batch[0].seq}..{batch[-1].seq})"
        body = {"values": [excel_row(r.reading, self.device_id) for r in batch]}
        try:
            resp = self.client.request("POST", url, data=json.dumps(body, ensure_ascii=False).encode(),
                                       headers=self._headers(token))
        except requests.ConnectTimeout as err:
            raise network_error(err, what) from err      # never reached the server: not ambiguous
        except requests.RequestException as err:
            self.unsure = True
            raise network_error(err, what) from err
        with resp:
            if 200 <= resp.status_code < 300:
                return
            if resp.status_code >= 500 or resp.status_code == 408:
                self.unsure = True
            raise status_error(resp, what, also_retryable=EXCEL_RETRYABLE)

    def _present_ids(self, batch: list[Row], token: str) -> set[str]:
        """Ids in the last ``len(batch)`` rows of the table (where a lost append would be)."""
        count = self._get(f"{self.table_url}/dataBodyRange?$select=rowCount", token).get("rowCount", 0)
        n = len(batch)
        skip = max(0, int(count) - n)
        data = self._get(f"{self.table_url}/rows?$top={n}&$skip={skip}", token)
        ids: set[str] = set()
        for row in data.get("value", []):
            for values in row.get("values", []):
                if values:
                    ids.add(str(values[0]))
        return ids

    def _get(self, url: str, token: str) -> dict[str, Any]:
        import requests

        what = f"GET {redact_url(url)}"
        try:
            resp = self.client.request("GET", url, headers=self._headers(token))
        except requests.RequestException as err:
            raise network_error(err, what) from err
        with resp:
            if not 200 <= resp.status_code < 300:
                raise status_error(resp, what, also_retryable=EXCEL_RETRYABLE)
            return _json(resp)

    def _headers(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def close(self) -> None:
        self.client.close()


def _json(resp: requests.Response) -> dict[str, Any]:
    try:
        data = resp.json()
    except ValueError as err:
        raise UploadError(f"malformed JSON from {redact_url(resp.url)}", retryable=True,
                          status=resp.status_code) from err
    return data if isinstance(data, dict) else {}
