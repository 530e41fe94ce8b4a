"""agent.net.https and agent.net.tls against a real HTTPS server on loopback (the test CA)."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import certifi
import pytest
import requests

from agent.net.https import HttpsSession, https_session, observe_responses
from agent.net.tls import client_context
from agent.sim.server import JsonHandler, LoopbackHTTPSServer
from agent.sim.tls import TlsFiles


class _Handler(JsonHandler):
    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        if self.path == "/slow":
            time.sleep(1.0)       # longer than the client waits; it has gone, answer nothing
            self.close_connection = True
            return
        if self.path == "/moved":
            self.send_raw(302, b"", "text/plain", {"Location": "/ok"})
            return
        self.send_json(200, {"path": self.path}, {"Retry-After": "7"})


@pytest.fixture
def server(tls: TlsFiles) -> Iterator[LoopbackHTTPSServer]:
    srv = LoopbackHTTPSServer("127.0.0.1", 0, _Handler, tls).start()
    yield srv
    srv.stop()


def test_every_response_reaches_the_sessions_and_the_process_observers(
        server: LoopbackHTTPSServer, tls: TlsFiles) -> None:
    seen: list[tuple[str, int, str | None]] = []
    everywhere: list[str | None] = []
    remove = observe_responses(lambda r: everywhere.append(r.headers.get("Date")))
    try:
        with https_session(str(tls.ca_file), 5.0) as session:
            session.on_response.append(lambda r: seen.append((r.url, r.status_code, r.headers.get("Date"))))
            session.get(f"{server.base_url}/a")
            session.get(f"{server.base_url}/b")
            assert session.sent == 2 and session.last_status == 200
    finally:
        remove()
    assert [(u.rsplit("/", 1)[1], s) for u, s, _ in seen] == [("a", 200), ("b", 200)]
    assert all(d for _, _, d in seen), "the server's Date header is what observers read"
    assert len(everywhere) == 2 and all(everywhere)
    with https_session(str(tls.ca_file), 5.0) as session:
        session.get(f"{server.base_url}/c")
    assert len(everywhere) == 2, "removed observers are not called again"


def test_a_failing_observer_never_breaks_a_request(server: LoopbackHTTPSServer, tls: TlsFiles) -> None:
    def broken(resp: requests.Response) -> None:
        raise RuntimeError("observer bug")

    with https_session(str(tls.ca_file), 5.0) as session:
        session.on_response.append(broken)
        assert session.get(f"{server.base_url}/x").json() == {"path": "/x"}


def test_environment_ca_variables_never_override_ca_file(
        server: LoopbackHTTPSServer, tls: TlsFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    # certifi's bundle does not hold the test CA: if the environment won, verification would fail.
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"):
        monkeypatch.setenv(var, certifi.where())
    with https_session(str(tls.ca_file), 5.0) as session:
        session.verify = certifi.where()      # nor does a session-level setting
        assert session.get(f"{server.base_url}/env").status_code == 200


def test_without_ca_file_the_test_ca_is_not_trusted(server: LoopbackHTTPSServer) -> None:
    failures: list[Exception] = []
    with https_session("", 5.0) as session:
        session.on_failure.append(failures.append)
        with pytest.raises(requests.exceptions.SSLError):
            session.get(f"{server.base_url}/x")
        assert session.last_status is None and session.sent == 1
    assert len(failures) == 1


def test_every_request_has_the_timeout(server: LoopbackHTTPSServer, tls: TlsFiles) -> None:
    with HttpsSession(str(tls.ca_file), 0.3) as session:
        started = time.monotonic()
        with pytest.raises(requests.exceptions.Timeout):
            session.get(f"{server.base_url}/slow", timeout=None)   # msal passes none
        assert time.monotonic() - started < 0.9


def test_sinks_do_not_follow_redirects(server: LoopbackHTTPSServer, tls: TlsFiles) -> None:
    with https_session(str(tls.ca_file), 5.0, follow_redirects=False) as sink:
        assert sink.get(f"{server.base_url}/moved").status_code == 302
    with https_session(str(tls.ca_file), 5.0) as idp:
        assert idp.get(f"{server.base_url}/moved").json() == {"path": "/ok"}


def _handshake(ctx: ssl.SSLContext, server: LoopbackHTTPSServer) -> None:
    host, port = server.server_address[:2]
    with socket.create_connection((str(host), int(port)), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=str(host)):
        pass


def test_mqtt_context_trusts_ca_file(
        server: LoopbackHTTPSServer, tls: TlsFiles) -> None:
    ctx = client_context(str(tls.ca_file))
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    _handshake(ctx, server)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(client_context(), server)


def test_mqtt_context_refuses_a_file_without_certificates(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-ca.pem"
    bad.write_text("hello\n")
    with pytest.raises(ssl.SSLError):
        client_context(str(bad))
    with pytest.raises(OSError):
        client_context(str(bad) + ".missing")


def test_sessions_are_safe_to_share_between_threads(server: LoopbackHTTPSServer, tls: TlsFiles) -> None:
    # the IdP session is used by the sign-in thread and the uploader's token refresh at once
    statuses: list[int] = []
    with https_session(str(tls.ca_file), 5.0) as session:
        session.on_response.append(lambda r: statuses.append(r.status_code))
        threads = [threading.Thread(target=session.get, args=(f"{server.base_url}/t{i}",)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert session.sent == 4
    assert statuses == [200] * 4

