"""`device-agent watch --serve HOST:PORT`: the fleet as one live web page, from the standard library.

Sign-in codes are as good as a password for a few minutes, so the page is careful:

* loopback only unless ``--serve-password-file`` is given (HTTP basic auth; put it behind the
  admin's own TLS front or an SSH tunnel, basic auth alone is clear text on the wire);
* on loopback without a password, the ``Host`` header must name the loopback address, so a web
  page elsewhere cannot DNS-rebind its way to the codes;
* a strict Content-Security-Policy: our own static script and style only, no inline code, no
  third-party assets (it works offline); QR codes are rendered here (segno) as SVG data URIs.

The page asks ``/api/fleet`` for one page of rows (100, "needs attention" first, optional
filter) and listens to ``/api/events`` (server-sent events) to know when to ask again, so 10,000
devices never become 10,000 DOM rows.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import threading
import time
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from agent.errors import ConfigError
from agent.mqtt.connection import read_password
from agent.mqtt.fleet import Fleet
from agent.net.hosts import is_loopback_host

log = logging.getLogger(__name__)

PAGE_ROWS_MAX = 500
EVENTS_MIN_INTERVAL_S = 0.2      # at most 5 "changed" events a second per browser
EVENTS_KEEPALIVE_S = 15.0
QR_CACHE = 512             # ~5 pages of codes; each SVG data URI is a few KiB
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
STATIC = {"/": ("watch.html", "text/html; charset=utf-8"),
          "/watch.js": ("watch.js", "text/javascript; charset=utf-8"),
          "/watch.css": ("watch.css", "text/css; charset=utf-8")}


def parse_listen(spec: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[v6]:PORT`` -> (host, port).

    Raises:
        ConfigError: not HOST:PORT, or a port outside 0..65535.
    """
    host, sep, port = spec.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--serve: {spec!r} must look like 127.0.0.1:8080")
    return host, int(port)


def prepare(spec: str, password_file: str, fleet: Fleet) -> WatchServer:
    """Check ``--serve`` and the password file; the socket is bound by ``WatchServer.start``.

    Raises:
        ConfigError: a bad address, or a non-loopback address without a password file.
        NotifyError: the password file cannot be read.
    """
    host, port = parse_listen(spec)
    password = read_password(password_file, what="--serve-password-file") if password_file else None
    if password is not None and not password:
        raise ConfigError(f"--serve-password-file {password_file!r} is empty")
    if password is None and not is_loopback_host(host):
        raise ConfigError(f"--serve {spec}: sign-in codes would be open to the network; serve on "
                          f"127.0.0.1 (reach it over an SSH tunnel) or give --serve-password-file "
                          f"(and put a TLS front before it)")
    return WatchServer(host, port, password, fleet)


class WatchServer:
    """The threaded HTTP server of the page; ``start`` binds and serves in a daemon thread."""

    def __init__(self, host: str, port: int, password: str | None, fleet: Fleet) -> None:
        self.host, self.port = host, port
        self.password = password
        self.fleet = fleet
        self.stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._qr: OrderedDict[str, str] = OrderedDict()
        self._qr_lock = threading.Lock()
        self._header: tuple[tuple[int, int], dict[str, Any]] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> WatchServer:
        server = self

        class Handler(_Handler):
            owner = server

        family_v6 = ":" in self.host
        cls = _V6Server if family_v6 else ThreadingHTTPServer
        self._httpd = cls((self.host, self.port), Handler)
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        threading.Thread(target=self._httpd.serve_forever, name="watch-web", daemon=True).start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def allowed_hosts(self) -> set[str]:
        hosts = {f"{h}:{self.port}" for h in ("127.0.0.1", "localhost", "[::1]")}
        hosts.add(urlsplit(self.url).netloc)
        return hosts

    def qr(self, uri: str) -> str:
        """An SVG data URI of the QR holding exactly ``uri`` (cached: rows repeat every refresh)."""
        with self._qr_lock:
            hit = self._qr.get(uri)
            if hit is not None:
                self._qr.move_to_end(uri)
                return hit
        import segno

        data = str(segno.make(uri, error="m").svg_data_uri(scale=3, border=2))
        with self._qr_lock:
            self._qr[uri] = data
            while len(self._qr) > QR_CACHE:
                self._qr.popitem(last=False)
        return data

    def fleet_json(self, query: dict[str, list[str]]) -> dict[str, Any]:
        q = query.get("q", [""])[0][:200]
        offset = _int(query.get("offset", ["0"])[0], 0, 0, 10**9)
        limit = _int(query.get("limit", ["100"])[0], 100, 1, PAGE_ROWS_MAX)
        version = self.fleet.version
        matched, rows = self.fleet.rows(q, offset, limit)
        for row in rows:
            if row["code"] and row["code"].get("uri"):
                row["code"]["qr"] = self.qr(str(row["code"]["uri"]))
        return {"version": version, **self.header(), "matched": matched, "offset": offset, "rows": rows}

    def header(self) -> dict[str, Any]:
        """Fleet size and counts; computed once per fleet change and second, not per browser."""
        key = (self.fleet.version, int(time.monotonic()))
        with self._qr_lock:
            if self._header is not None and self._header[0] == key:
                return self._header[1]
        value = {"total": len(self.fleet), "counts": self.fleet.counts(),
                 "attention": len(self.fleet.needs_attention())}
        with self._qr_lock:
            self._header = (key, value)
        return value


class _V6Server(ThreadingHTTPServer):
    import socket as _socket

    address_family = _socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    owner: WatchServer
    protocol_version = "HTTP/1.1"
    server_version = "device-agent-watch"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - BaseHTTPRequestHandler's name
        log.debug("watch web: " + format, *args)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if not self._allowed():
            return
        parts = urlsplit(self.path)
        if parts.path in STATIC:
            name, ctype = STATIC[parts.path]
            body = resources.files("agent.mqtt").joinpath("static", name).read_bytes()
            self._send(200, ctype, body)
        elif parts.path == "/api/fleet":
            body = json.dumps(self.owner.fleet_json(parse_qs(parts.query)), separators=(",", ":")).encode()
            self._send(200, "application/json", body)
        elif parts.path == "/api/events":
            self._events()
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found\n")

    def _allowed(self) -> bool:
        owner = self.owner
        if owner.password is None:
            if self.headers.get("Host", "") not in owner.allowed_hosts():
                self._send(421, "text/plain; charset=utf-8", b"wrong Host header\n")
                return False
            return True
        given = ""
        kind, _, value = self.headers.get("Authorization", "").partition(" ")
        if kind.lower() == "basic":
            try:
                given = base64.b64decode(value, validate=True).decode("utf-8").partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                given = ""
        if given and hmac.compare_digest(given.encode(), owner.password.encode()):
            return True
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="device-agent watch", charset="UTF-8"')
        self._common_headers()
        self.send_header("Content-Length", "0")
        self.end_headers()
        return False

    def _common_headers(self) -> None:
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Cache-Control", "no-store")

    def _send(self, status: int, ctype: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self._common_headers()
        self.end_headers()
        self.wfile.write(body)

    def _events(self) -> None:
        """Server-sent events: one ``fleet`` event (header figures and version) per change."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self._common_headers()
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        fleet, owner = self.owner.fleet, self.owner
        seen = -1
        try:
            while not owner.stopping.is_set():
                version = fleet.version
                if version != seen:
                    seen = version
                    data = json.dumps({"version": version, **owner.header()}, separators=(",", ":"))
                    self.wfile.write(f"event: fleet\ndata: {data}\n\n".encode())
                    self.wfile.flush()
                    owner.stopping.wait(EVENTS_MIN_INTERVAL_S)
                    continue
                if fleet.wait_changed(seen, EVENTS_KEEPALIVE_S) == seen:
                    self.wfile.write(b": keep-alive\n\n")
                    self.wfile.flush()
        except OSError:
            return   # the browser went away


def _int(text: str, default: int, low: int, high: int) -> int:
    try:
        return min(high, max(low, int(text)))
    except ValueError:
        return default
