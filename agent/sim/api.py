"""The simulated telemetry API: docs/INTERFACE.md "HTTP: your API" on loopback HTTPS, with failure switches.

It checks bearer JWTs (RS256) against a JWKS, validates each batch strictly (so agent bugs show
up as 400s in tests), de-duplicates by reading id, stores readings in SQLite and keeps a request
log. Switches make it fail the way real APIs do: 503/429 with ``Retry-After`` (seconds or an
HTTP date), 400, connection resets, slowness, a body size limit (``max_body_bytes``: 413,
as a front door such as nginx's ``client_max_body_size`` answers), poisoned readings (``poison``:
a strict receiver refusing the whole request with 422 when it holds one of them) and claims
challenges (``challenge``: a 401 with ``WWW-Authenticate: Bearer error="insufficient_claims"``).
Bodies may come with ``Content-Encoding: gzip`` (``refuse_gzip(count)`` answers 415 to the next
ones, as an API without gzip support does); any other encoding gets 415.
"""

from __future__ import annotations

import base64
import email.utils
import gzip
import json
import logging
import re
import signal
import socket
import sqlite3
import struct
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jwt.exceptions import PyJWTError

from agent.cmdline import EXIT_CONFIG, Parser, port
from agent.signal_relay import relay_signals
from agent.sim.jwks import TokenVerifier
from agent.sim.server import JsonHandler, LoopbackHTTPSServer
from agent.sim.tls import TlsFiles, make_tls

log = logging.getLogger(__name__)

READINGS_PATH = "/v1/readings"
_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


@dataclass(frozen=True)
class ApiRequest:
    """One request as the API saw it. ``status`` None: the connection was reset, no answer."""

    t: float                 # time.monotonic() when the request arrived
    status: int | None
    count: int               # readings in the body (0 if unreadable)
    idempotency_key: str | None
    new: int = 0             # readings stored for the first time
    encoding: str = ""       # Content-Encoding as sent ("" = identity)
    wire_bytes: int = 0      # body bytes as they came over the wire


@dataclass
class Fault:
    status: int | None                 # None = reset the connection
    retry_after_s: float | str | None = None   # a str is sent as it is ("inf", "²", ...)
    http_date: bool = False            # Retry-After as an HTTP date, computed when answering

    def retry_after(self, clock_offset_s: float = 0.0) -> str | None:
        if self.retry_after_s is None:
            return None
        if isinstance(self.retry_after_s, str):
            return self.retry_after_s
        if self.http_date:
            return email.utils.formatdate(time.time() + clock_offset_s + self.retry_after_s, usegmt=True)
        return str(int(self.retry_after_s))


class SimApi:
    """``SimApi(tls, jwks_url=...)`` or ``SimApi(tls, jwks={...})``; ``.start()``, ``.url``, ``.stop()``."""

    def __init__(self, tls: TlsFiles, *, jwks_url: str | None = None, jwks: dict[str, Any] | None = None,
                 issuer: str | None = None, audience: str | None = None, ca_file: str | None = None,
                 required_scope: str | None = None, db_path: Path | None = None,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self.verifier = TokenVerifier(jwks_url=jwks_url, jwks=jwks, issuer=issuer, audience=audience,
                                      required_scope=required_scope,
                                      ca_file=ca_file or str(tls.ca_file))
        self._db = sqlite3.connect(str(db_path) if db_path else ":memory:", check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS readings (device TEXT, seq INTEGER, id TEXT PRIMARY KEY,"
                         " body TEXT, received REAL)")
        self._lock = threading.Lock()
        self._faults: deque[Fault] = deque()
        self.latency_s = 0.0
        self.in_flight = 0              # requests being answered right now (bench: kill mid-upload)
        self.clock_offset_s = 0.0       # the server's clock (Date, Retry-After dates) runs this far ahead
        self.max_body_bytes: int | None = None      # larger bodies get 413, before auth
        self.poisoned_seqs: set[int] = set()        # a request holding one of these gets 422
        self.poisoned_values: set[float] = set()    # ... or a reading with one of these values
        self._challenges: deque[str] = deque()      # next 401s with a claims challenge
        self.requests: list[ApiRequest] = []
        self.duplicates = 0
        self._refuse_gzip = 0
        self._closed = False
        api = self

        class Handler(JsonHandler):
            def do_POST(self) -> None:  # noqa: N802
                api._handle(self)

            def date_time_string(self, timestamp: float | None = None) -> str:
                return email.utils.formatdate((timestamp or time.time()) + api.clock_offset_s, usegmt=True)

            def do_GET(self) -> None:  # noqa: N802
                if self.path.split("?")[0] == "/healthz":
                    self.send_json(200, {"ok": True})
                else:
                    self.send_json(404, {"error": "not_found"})

        self.server = LoopbackHTTPSServer(host, port, Handler, tls)

    # ------------------------------------------------------------ lifecycle

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def url(self) -> str:
        return self.server.base_url + READINGS_PATH

    def start(self) -> SimApi:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()
        with self._lock:
            self._closed = True
            self._db.close()

    # ------------------------------------------------------------ switches

    def fail(self, status: int, *, count: int = 1, retry_after: float | str | None = None,
             http_date: bool = False) -> None:
        """The next ``count`` requests get ``status`` (before auth, like a proxy or overload).

        ``retry_after`` adds a Retry-After header: seconds, or an HTTP date that far ahead (of
        the server's clock), or a string sent as it is.
        """
        with self._lock:
            self._faults.extend(Fault(status, retry_after, http_date) for _ in range(count))

    def reset(self, *, count: int = 1) -> None:
        """The next ``count`` requests are read, then the connection is closed with a TCP RST."""
        with self._lock:
            self._faults.extend(Fault(None) for _ in range(count))

    def refuse_gzip(self, *, count: int = 1) -> None:
        """The next ``count`` gzip-encoded requests get 415 Unsupported Media Type."""
        with self._lock:
            self._refuse_gzip += count

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def poison(self, *, seqs: Iterable[int] = (), values: Iterable[float] = ()) -> None:
        """Refuse (422, whole request) any batch holding a reading with one of these seqs or
        values, the way a strict receiver refuses a batch for one bad item."""
        with self._lock:
            self.poisoned_seqs.update(seqs)
            self.poisoned_values.update(values)

    def challenge(self, claims: str, *, count: int = 1) -> None:
        """The next ``count`` authenticated requests get 401 with a CAE claims challenge
        (``claims`` is the JSON; it is sent base64-encoded, as Entra does)."""
        with self._lock:
            self._challenges.extend([claims] * count)

    # ------------------------------------------------------------ inspection

    def seqs(self, device_id: str) -> set[int]:
        with self._lock:
            return {s for (s,) in self._db.execute("SELECT seq FROM readings WHERE device = ?", (device_id,))}

    def readings(self, device_id: str) -> list[dict[str, Any]]:
        with self._lock:
            cur = self._db.execute("SELECT body FROM readings WHERE device = ? ORDER BY seq", (device_id,))
            return [json.loads(b) for (b,) in cur]

    def arrivals(self, device_id: str) -> list[tuple[dict[str, Any], float]]:
        """(reading, time.time() it was first stored) by seq: how late a reading's time says it came."""
        with self._lock:
            cur = self._db.execute("SELECT body, received FROM readings WHERE device = ? ORDER BY seq",
                                   (device_id,))
            return [(json.loads(b), float(t)) for b, t in cur]

    def count(self, device_id: str) -> int:
        with self._lock:
            cur = self._db.execute("SELECT count(*) FROM readings WHERE device = ?", (device_id,))
            return int(cur.fetchone()[0])

    # ------------------------------------------------------------ handling

    def _log(self, t: float, status: int | None, count: int, key: str | None, new: int = 0,
             encoding: str = "", wire: int = 0) -> None:
        with self._lock:
            self.requests.append(ApiRequest(t, status, count, key, new, encoding, wire))

    def _handle(self, h: JsonHandler) -> None:
        with self._lock:
            self.in_flight += 1
        try:
            self._answer(h)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _answer(self, h: JsonHandler) -> None:
        t = time.monotonic()
        key = h.headers.get("Idempotency-Key")
        if self.latency_s:
            time.sleep(self.latency_s)
        wire = h.read_body()
        encoding = (h.headers.get("Content-Encoding") or "").strip().lower()
        raw = _decode(wire, encoding)
        count = _count(raw or b"")
        with self._lock:
            refuse = encoding == "gzip" and self._refuse_gzip > 0
            self._refuse_gzip -= refuse
        if raw is None or refuse:
            self._log(t, 415, count, key, encoding=encoding, wire=len(wire))
            h.send_json(415, {"error": "unsupported_media_type",
                              "message": f"Content-Encoding {encoding!r} not accepted; send identity"})
            return
        if h.path.split("?")[0] != READINGS_PATH:
            self._log(t, 404, count, key)
            h.send_json(404, {"error": "not_found", "message": f"POST {READINGS_PATH}"})
            return
        limit = self.max_body_bytes
        if limit is not None and len(wire) > limit:
            self._log(t, 413, count, key)
            h.send_json(413, {"error": "payload_too_large",
                              "message": f"request body over {limit} bytes"})
            return
        with self._lock:
            fault = self._faults.popleft() if self._faults else None
        if fault is not None:
            if fault.status is None:
                self._log(t, None, count, key)
                _reset(h)
                return
            self._log(t, fault.status, count, key)
            ra = fault.retry_after(self.clock_offset_s)
            headers = {"Retry-After": ra} if ra else None
            h.send_json(fault.status, {"error": "simulated", "status": fault.status}, headers)
            return
        verdict = self.verifier.check(h.headers.get("Authorization"))
        if verdict.status:
            self._log(t, verdict.status, count, key)
            h.send_json(verdict.status, {"error": "invalid_token" if verdict.status == 401
                                         else "insufficient_scope", "message": verdict.reason},
                        {"WWW-Authenticate": verdict.www_authenticate})
            return
        with self._lock:
            claims = self._challenges.popleft() if self._challenges else None
        if claims is not None:
            self._log(t, 401, count, key)
            encoded = base64.b64encode(claims.encode()).decode()
            h.send_json(401, {"error": "insufficient_claims", "message": "claims challenge"},
                        {"WWW-Authenticate": f'Bearer realm="", error="insufficient_claims", '
                                             f'error_description="claims required", claims="{encoded}"'})
            return
        if (h.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
            self._log(t, 415, count, key)
            h.send_json(415, {"error": "unsupported_media_type", "message": "send application/json"})
            return
        try:
            device, readings = _validate(raw, key)
        except ValueError as err:
            self._log(t, 400, count, key)
            h.send_json(400, {"error": "invalid_request", "message": str(err)})
            return
        refused = self._poisoned(readings)
        if refused:
            self._log(t, 422, count, key)
            h.send_json(422, {"error": "unprocessable", "message": f"readings refused: {refused}"})
            return
        now = time.time()
        with self._lock:
            if self._closed:      # a slow request still running while the test tears down
                return
            before = self._db.total_changes
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR IGNORE INTO readings VALUES (?, ?, ?, ?, ?)",
                [(device, r["seq"], r["id"], json.dumps(r, ensure_ascii=False), now) for r in readings])
            self._db.execute("COMMIT")
            new = self._db.total_changes - before
            self.duplicates += len(readings) - new
            self.requests.append(ApiRequest(t, 200, len(readings), key, new, encoding, len(wire)))
        h.send_json(200, {"accepted": len(readings), "duplicates": len(readings) - new})


    def _poisoned(self, readings: list[dict[str, Any]]) -> list[str]:
        with self._lock:
            seqs, values = set(self.poisoned_seqs), set(self.poisoned_values)
        return [f"seq {r['seq']}" for r in readings if r["seq"] in seqs or r["value"] in values]


def _decode(wire: bytes, encoding: str) -> bytes | None:
    """The body without its Content-Encoding; None for an encoding we do not take (415)."""
    if encoding in ("", "identity"):
        return wire
    if encoding != "gzip":
        return None
    try:
        return gzip.decompress(wire)
    except (OSError, EOFError, ValueError):
        return None


def _count(raw: bytes) -> int:
    try:
        return len(json.loads(raw).get("readings", []))
    except (ValueError, AttributeError, TypeError):
        return 0


def _validate(raw: bytes, key: str | None) -> tuple[str, list[dict[str, Any]]]:
    """docs/INTERFACE.md's body, strictly.

    Raises:
        ValueError: what is wrong, for the 400 body.
    """
    try:
        body = json.loads(raw)
    except ValueError as err:
        raise ValueError(f"body is not JSON: {err}") from None
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    device = body.get("device_id")
    if not isinstance(device, str) or not device:
        raise ValueError("device_id: required string")
    readings = body.get("readings")
    if not isinstance(readings, list) or not readings:
        raise ValueError("readings: required non-empty array")
    prev = 0
    for i, r in enumerate(readings):
        where = f"readings[{i}]"
        if not isinstance(r, dict):
            raise ValueError(f"{where}: must be an object")
        for field, kind in (("id", str), ("sensor", str), ("type", str), ("unit", str), ("time", str)):
            if not isinstance(r.get(field), kind):
                raise ValueError(f"{where}.{field}: required string")
        seq = r.get("seq")
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
            raise ValueError(f"{where}.seq: required integer >= 1")
        if seq <= prev:
            raise ValueError(f"{where}.seq: {seq} is not ascending (previous {prev})")
        prev = seq
        value = r.get("value")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where}.value: required number")
        if r["id"] != f"{device}:{seq}":
            raise ValueError(f"{where}.id: {r['id']!r} does not match device_id {device!r} and seq {seq}")
        if not _TIME.match(r["time"]):
            raise ValueError(f"{where}.time: {r['time']!r} is not UTC ISO-8601 ending in Z")
        if r.get("time_quality", "synced") not in ("synced", "corrected", "unsynced"):
            raise ValueError(f"{where}.time_quality: {r['time_quality']!r} is not synced, corrected "
                             "or unsynced")
    expected = f"{device}:{readings[0]['seq']}-{readings[-1]['seq']}"
    if key != expected:
        raise ValueError(f"Idempotency-Key: got {key!r}, expected {expected!r}")
    return device, readings


def _reset(h: JsonHandler) -> None:
    """Close with RST and no answer: the client cannot know whether the batch arrived."""
    h.close_connection = True
    sock = h.connection
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    raw = getattr(sock, "detach", None)
    try:
        fd = raw() if raw else None  # drop TLS without close_notify
        if fd is not None:
            socket.socket(fileno=fd).close()
        else:
            sock.close()
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    """``device-agent sim api``: run the simulated API standalone on loopback."""
    p = Parser(prog="device-agent sim api", description="Simulated telemetry API (loopback HTTPS only).")
    p.add_argument("--host", default="127.0.0.1", help="loopback address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=port, default=8443, help="port (0 = any free port; default 8443)")
    p.add_argument("--tls-dir", default=None,
                   help="directory for the CA and server cert (created or reused; default: temp dir)")
    p.add_argument("--jwks-url", default=None, help="JWKS of the issuer (e.g. the simulated IdP's)")
    p.add_argument("--jwks-file", default=None, help="a static JWKS JSON file instead of --jwks-url")
    p.add_argument("--issuer", default=None, help="required iss claim")
    p.add_argument("--audience", default=None, help="required aud claim (e.g. api://telemetry)")
    p.add_argument("--scope", default=None, help="required scope in scp/scope (e.g. Readings.Write)")
    p.add_argument("--ca-file", default=None, help="CA to trust when fetching --jwks-url")
    p.add_argument("--db", default=None, help="SQLite file for received readings (default: memory)")
    args = p.parse_args(argv)
    if not args.jwks_url and not args.jwks_file:
        p.error("give --jwks-url (e.g. from `device-agent sim idp`) or --jwks-file")
    tls_dir = Path(args.tls_dir) if args.tls_dir else Path(tempfile.mkdtemp(prefix="device-agent-api-"))
    tls = make_tls(tls_dir)
    try:
        jwks = json.loads(Path(args.jwks_file).read_text()) if args.jwks_file else None
    except (OSError, ValueError) as err:
        print(f"config error: command line: --jwks-file {args.jwks_file}: "  # noqa: T201
              f"{getattr(err, 'strerror', None) or err}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        api = SimApi(tls, jwks_url=args.jwks_url, jwks=jwks, issuer=args.issuer, audience=args.audience,
                     ca_file=args.ca_file, required_scope=args.scope,
                     db_path=Path(args.db) if args.db else None, host=args.host, port=args.port)
    except (ValueError, PyJWTError) as err:    # a host that is not loopback, a JWKS with no key
        print(f"config error: command line: {err}", file=sys.stderr)  # noqa: T201
        return EXIT_CONFIG
    try:
        api.start()
    except OSError as err:
        print(f"error: sim api: cannot listen on {args.host}:{args.port}: "  # noqa: T201
              f"{err.strerror or err}", file=sys.stderr)
        return 1
    stop = threading.Event()
    relay_signals((signal.SIGINT, signal.SIGTERM), lambda _signum: stop.set())
    print(f"simulated telemetry API (loopback only): {api.url}\n"  # noqa: T201
          f"  trust this CA: {tls.ca_file}\n  stop with Ctrl-C", flush=True)
    stop.wait()
    api.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
