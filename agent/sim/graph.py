"""A Microsoft Graph stand-in for the two sinks: SharePoint list items, JSON ``$batch`` and Excel
table rows, with Graph's response shapes and throttling behaviour (429/503/504 + Retry-After,
per item inside ``$batch`` too), any status on demand (``fail``: e.g. 409/423 for a workbook
open in Excel) and a request size limit (``max_body_bytes``: 413 payloadTooLarge).

Routes under ``{base_url}/v1.0`` (= ``graph_url``):
``POST /$batch`` (max 20 requests, else 400 ``invalidRequest``),
``POST /sites/{site}/lists/{list}/items`` (Title unique: a repeat is 409 ``nameAlreadyExists``,
as a list whose Title column enforces unique values answers),
``POST {item_path}/workbook/tables/{table}/rows/add``,
``GET {item_path}/workbook/tables/{table}/rows?$top=&$skip=``,
``GET {item_path}/workbook/tables/{table}/dataBodyRange``.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from agent.sim.jwks import TokenVerifier
from agent.sim.server import JsonHandler, LoopbackHTTPSServer
from agent.sim.tls import TlsFiles

VERSION = "/v1.0"
BATCH_MAX = 20
_ITEMS = re.compile(r"^/sites/(?P<site>[^/]+)/lists/(?P<list>[^/]+)/items$")
_TABLE = re.compile(r"^(?P<item>/.+)/workbook/tables/(?P<table>[^/]+)/(?P<op>rows/add|rows|dataBodyRange)$")

Answer = tuple[int, dict[str, str], Any]


@dataclass(frozen=True)
class GraphRequest:
    t: float
    method: str
    path: str
    status: int
    items: int = 0        # sub-requests in a $batch, rows in rows/add


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Answer:
    return status, headers or {}, {"error": {"code": code, "message": message,
                                             "innerError": {"request-id": str(uuid.uuid4()),
                                                            "date": datetime.now(UTC).isoformat()}}}


class SimGraph:
    """``SimGraph(tls).start()``; ``graph_url`` for ``upload.graph_url``; switches and inspection."""

    def __init__(self, tls: TlsFiles, *, verifier: TokenVerifier | None = None,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self.verifier = verifier
        self._lock = threading.Lock()
        self.lists: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.tables: dict[tuple[str, str], list[list[Any]]] = {}
        self.requests: list[GraphRequest] = []
        self.batch_sizes: list[int] = []
        # switches
        self.item_throttle_every = 0        # every Nth list item inside $batch: 429
        self.item_retry_after_s = 1
        self.lost_answers = 0               # next N rows/add: append, then answer 504 (lost answer)
        self.reject_titles: set[str] = set()  # list items with these Titles: 400 (e.g. a bad column)
        self.max_body_bytes: int | None = None  # larger request bodies: 413 payloadTooLarge
        self._faults: deque[tuple[int, str | None] | None] = deque()
        self._item_counter = 0
        graph = self

        class Handler(JsonHandler):
            def do_GET(self) -> None:  # noqa: N802
                graph._handle(self, "GET")

            def do_POST(self) -> None:  # noqa: N802
                graph._handle(self, "POST")

        self.server = LoopbackHTTPSServer(host, port, Handler, tls)

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def graph_url(self) -> str:
        return self.server.base_url + VERSION

    def start(self) -> SimGraph:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def fail(self, status: int, *, count: int = 1, retry_after: float | None = None, after: int = 0) -> None:
        """After ``after`` untouched requests, the next ``count`` top-level requests get ``status``
        (429/503/504…) and nothing is applied."""
        with self._lock:
            self._faults.extend([None] * after)
            for _ in range(count):
                self._faults.append((status, None if retry_after is None else str(int(retry_after))))

    def list_items(self, site: str, list_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(i["fields"]) for i in self.lists.get((site, list_id), [])]

    def table_rows(self, item_path: str, table: str) -> list[list[Any]]:
        with self._lock:
            return [list(r) for r in self.tables.get((item_path, table), [])]

    # ------------------------------------------------------------------ dispatch

    def _handle(self, h: JsonHandler, method: str) -> None:
        t = time.monotonic()
        raw = h.read_body()
        parts = urlsplit(h.path)
        path = unquote(parts.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        items = 0
        with self._lock:
            fault = self._faults.popleft() if self._faults else None
        if fault is not None:
            status, ra = fault
            # 409/423: what Excel answers while the workbook is open or locked in the desktop app.
            code = {429: "tooManyRequests", 503: "serviceNotAvailable", 504: "gatewayTimeout",
                    409: "conflict", 423: "resourceLocked", 413: "payloadTooLarge"}.get(
                status, "generalException")
            answer = _error(status, code, "simulated", {"Retry-After": ra} if ra else None)
        elif self.max_body_bytes is not None and len(raw) > self.max_body_bytes:
            answer = _error(413, "payloadTooLarge", "The request size exceeds the maximum limit.")
            items = _count_values(raw)
        elif not self._authorized(h.headers.get("Authorization")):
            answer = _error(401, "InvalidAuthenticationToken", "Access token validation failure.")
        elif not path.startswith(VERSION + "/"):
            answer = _error(404, "itemNotFound", f"unknown version segment in {path}")
        else:
            path = path[len(VERSION):]
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
                answer = _error(400, "invalidRequest", "Unable to read JSON request payload.")
            else:
                if method == "POST" and path == "/$batch":
                    answer, items = self._batch(body)
                else:
                    answer = self._route(method, path, query, body, top_level=True)
                    if isinstance(body, dict) and isinstance(body.get("values"), list):
                        items = len(body["values"])
        status, headers, payload = answer
        with self._lock:
            self.requests.append(GraphRequest(t, method, h.path, status, items))
        h.send_json(status, payload, headers or None)

    def _authorized(self, authorization: str | None) -> bool:
        if self.verifier is not None:
            return self.verifier.check(authorization).status == 0
        return bool(authorization and authorization.startswith("Bearer ") and authorization[7:].strip())

    def _batch(self, body: Any) -> tuple[Answer, int]:
        reqs = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(reqs, list) or not reqs:
            return _error(400, "invalidRequest", "Invalid batch payload format."), 0
        if len(reqs) > BATCH_MAX:
            return _error(400, "invalidRequest",
                          f"Number of batch request steps exceeds the maximum of {BATCH_MAX}."), len(reqs)
        with self._lock:
            self.batch_sizes.append(len(reqs))
        ids = [r.get("id") if isinstance(r, dict) else None for r in reqs]
        if any(not isinstance(i, str) or not i for i in ids) or len(set(ids)) != len(ids):
            return _error(400, "invalidRequest", "Each request needs a unique string id."), len(reqs)
        responses = []
        for r in reqs:
            url = r.get("url", "")
            if not isinstance(url, str) or not url.startswith("/"):
                st, hd, bd = _error(400, "invalidRequest", "Relative URL expected (e.g. /me).")
            elif r.get("body") is not None and "content-type" not in {
                    k.lower() for k in (r.get("headers") or {})}:
                st, hd, bd = _error(400, "invalidRequest", "Content-Type header required with a body.")
            else:
                parts = urlsplit(url)
                query = {k: v[0] for k, v in parse_qs(parts.query).items()}
                st, hd, bd = self._route(str(r.get("method", "GET")).upper(), unquote(parts.path),
                                         query, r.get("body"), top_level=False)
            entry: dict[str, Any] = {"id": r["id"], "status": st,
                                     "headers": {"Content-Type": "application/json", **hd}}
            if bd is not None:
                entry["body"] = bd
            responses.append(entry)
        return (200, {}, {"responses": responses}), len(reqs)

    def _route(self, method: str, path: str, query: dict[str, str], body: Any, *, top_level: bool) -> Answer:
        m = _ITEMS.match(path)
        if m and method == "POST":
            return self._create_item(m["site"], m["list"], body, throttle=not top_level)
        m = _TABLE.match(path)
        if m:
            key = (m["item"], m["table"])
            if m["op"] == "rows/add" and method == "POST":
                return self._add_rows(key, body)
            if m["op"] == "rows" and method == "GET":
                return self._list_rows(key, query)
            if m["op"] == "dataBodyRange" and method == "GET":
                with self._lock:
                    n = len(self.tables.get(key, []))
                return 200, {}, {"address": f"Sheet1!A2:H{n + 1}", "rowCount": n, "columnCount": 8}
        return _error(404 if method in ("GET", "POST") else 405, "itemNotFound",
                      f"Resource not found for the segment in {path}")

    def _create_item(self, site: str, list_id: str, body: Any, *, throttle: bool) -> Answer:
        fields = body.get("fields") if isinstance(body, dict) else None
        if not isinstance(fields, dict) or not fields.get("Title"):
            return _error(400, "invalidRequest", "fields with a Title are required")
        with self._lock:
            self._item_counter += 1
            if throttle and self.item_throttle_every and self._item_counter % self.item_throttle_every == 0:
                return _error(429, "tooManyRequests", "Too many requests",
                              {"Retry-After": str(self.item_retry_after_s)})
            if fields["Title"] in self.reject_titles:
                return _error(400, "invalidRequest", "Field 'Value' is not recognized as a number")
            items = self.lists.setdefault((site, list_id), [])
            if any(i["fields"]["Title"] == fields["Title"] for i in items):
                return _error(409, "nameAlreadyExists", "The specified value is already used in column Title")
            item_id = str(len(items) + 1)
            now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            item = {"@odata.context": f"{self.graph_url}/$metadata#sites('{site}')/lists('{list_id}')"
                                      f"/items/$entity",
                    "id": item_id, "createdDateTime": now, "lastModifiedDateTime": now,
                    "fields": {"@odata.etag": f'"{uuid.uuid4()},1"', "id": item_id, **fields}}
            items.append(item)
        return 201, {"Location": f"{self.graph_url}/sites/{site}/lists/{list_id}/items/{item_id}"}, item

    def _add_rows(self, key: tuple[str, str], body: Any) -> Answer:
        values = body.get("values") if isinstance(body, dict) else None
        if not isinstance(values, list) or not values or not all(isinstance(v, list) for v in values):
            return _error(400, "InvalidArgument",
                          "The argument is invalid or missing or has an incorrect format.")
        widths = {len(v) for v in values}
        with self._lock:
            rows = self.tables.setdefault(key, [])
            if len(widths) != 1 or (rows and widths != {len(rows[0])}):
                return _error(400, "InvalidArgument", "The number of columns does not match the table.")
            index = len(rows)
            rows.extend(list(v) for v in values)
            if self.lost_answers > 0:
                self.lost_answers -= 1
                return _error(504, "UnknownError", "Gateway timeout (the rows were added)")
        return 201, {}, {"@odata.context": f"{self.graph_url}/$metadata#workbookTableRow",
                         "index": index, "values": values}

    def _list_rows(self, key: tuple[str, str], query: dict[str, str]) -> Answer:
        try:
            top = int(query.get("$top", "100"))
            skip = int(query.get("$skip", "0"))
        except ValueError:
            return _error(400, "invalidRequest", "$top and $skip must be integers")
        with self._lock:
            rows = self.tables.get(key, [])
            page = [{"index": i, "values": [list(rows[i])]} for i in range(skip, min(len(rows), skip + top))]
        return 200, {}, {"@odata.context": f"{self.graph_url}/$metadata#Collection(workbookTableRow)",
                         "value": page}


def _count_values(raw: bytes) -> int:
    """Rows in a rows/add body (for the request log), 0 if it is not one."""
    try:
        values = json.loads(raw).get("values")
    except (ValueError, AttributeError):
        return 0
    return len(values) if isinstance(values, list) else 0
