"""HTTPS-on-loopback plumbing shared by the simulated IdP, API and Graph."""

from __future__ import annotations

import json
import socket
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

from agent.sim.tls import TlsFiles

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class LoopbackHTTPSServer(ThreadingHTTPServer):
    """A threading HTTPS server that refuses to bind anywhere but loopback."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str, port: int, handler: type[BaseHTTPRequestHandler], tls: TlsFiles) -> None:
        if host not in LOOPBACK and not host.startswith("127."):
            raise ValueError(f"simulated services listen on loopback only, not {host!r}")
        super().__init__((host, port), handler)
        self.socket = tls.server_context().wrap_socket(self.socket, server_side=True)
        self._thread: threading.Thread | None = None

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that vanished mid-request (killed, timed out, reset) is routine for the
        sims; anything else is printed as socketserver does."""
        if isinstance(sys.exc_info()[1], ConnectionError | ssl.SSLError | TimeoutError):
            return
        super().handle_error(request, client_address)

    @property
    def base_url(self) -> str:
        # getsockname() of an AF_INET socket: host is a str (the stubs allow bytes for binding)
        host, port = cast(tuple[str, int], self.server_address[:2])
        return f"https://{host}:{port}"

    def start(self) -> LoopbackHTTPSServer:
        """Serve in a daemon thread; returns self for chaining."""
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.02},
                                        name=type(self).__name__, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread:
            self._thread.join(timeout=5)


class JsonHandler(BaseHTTPRequestHandler):
    """Request helpers: JSON and form bodies in, JSON out, quiet logging."""

    protocol_version = "HTTP/1.1"
    server_version = "device-agent-sim/1"

    def setup(self) -> None:
        super().setup()
        # Headers and body leave in two writes; with Nagle on, the body waits for the client's
        # delayed ACK (~40 ms per request on Linux).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # the sims are noisy enough through their own loggers

    def read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_raw(status, data, "application/json; charset=utf-8", headers)

    def send_raw(self, status: int, data: bytes, content_type: str,
                 headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
