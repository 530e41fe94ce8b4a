"""agent.net.tls / agent.net.https: every HTTPS connection trusts the system store plus ``ca_file``,
through one context built once.

Real OpenSSL, real requests, a real HTTPS server on loopback; the "system store" is a second
test CA laid out the way Debian's /etc/ssl/certs is (hash-named links), so both halves of the
trust are proven by a handshake, not by reading files.
"""

from __future__ import annotations

import http.server
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from agent.net import tls as net_tls
from agent.net.https import https_session
from agent.sim.tls import TlsFiles, make_tls
from tests.fixtures.require import need_binary


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def _serve(files: TlsFiles) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    server.socket = files.server_context().wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def own_ca_url(tls: TlsFiles) -> Iterator[str]:
    """A server whose certificate comes from the CA given as ``ca_file``."""
    yield from _serve(tls)


@pytest.fixture
def system_ca(tmp_path: Path) -> TlsFiles:
    return make_tls(tmp_path / "public-ca")


@pytest.fixture
def system_ca_url(system_ca: TlsFiles) -> Iterator[str]:
    """A server whose certificate comes from a CA only the (fake) system store holds."""
    yield from _serve(system_ca)


@pytest.fixture
def system_dir(tmp_path: Path, system_ca: TlsFiles, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A system store like Debian's: certificates reached through ``<hash>.0`` links."""
    need_binary("openssl", "apt-get install openssl")
    d = tmp_path / "etc-ssl-certs"
    d.mkdir()
    pem = d / "Public_Test_CA.pem"
    pem.write_bytes(system_ca.ca_file.read_bytes())
    (d / f"{_subject_hash(pem)}.0").symlink_to(pem)
    monkeypatch.setattr(net_tls, "_system_dir", lambda: str(d))
    monkeypatch.setattr(net_tls, "_shared", {})
    return d


def _subject_hash(pem: Path) -> str:
    return subprocess.run(["openssl", "x509", "-hash", "-noout", "-in", str(pem)],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_sessions_trust_ca_file_and_the_system_store(
        system_dir: Path, tls: TlsFiles, own_ca_url: str, system_ca_url: str) -> None:
    with https_session(str(tls.ca_file), 5) as s:
        assert s.get(own_ca_url).text == "ok"
        assert s.get(system_ca_url).text == "ok"
    # and nothing else: a server of a CA in neither place is refused, whatever verify says
    with https_session("", 5) as s, pytest.raises(requests.exceptions.SSLError):
        s.get(own_ca_url, verify=False)


def test_every_connection_shares_one_context(
        system_dir: Path, tls: TlsFiles, own_ca_url: str, system_ca_url: str) -> None:
    ctx = net_tls.shared_context(str(tls.ca_file))
    with https_session(str(tls.ca_file), 5) as a, https_session(str(tls.ca_file), 5) as b:
        for s in (a, b):
            for url in (own_ca_url, system_ca_url):
                assert s.get(url, headers={"Connection": "close"}).text == "ok"
            manager = s.get_adapter(own_ca_url).poolmanager
            pools = [manager.pools[key] for key in manager.pools.keys()]
            assert len(pools) == 2
            for pool in pools:
                assert pool.conn_kw["ssl_context"] is ctx
                assert not pool.ca_certs and not pool.ca_cert_dir   # nothing loaded per connection


def test_the_context_follows_a_changed_ca_file(
        system_dir: Path, tls: TlsFiles, tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(tls.ca_file.read_bytes())
    first = net_tls.shared_context(str(ca))
    assert net_tls.shared_context(str(ca)) is first
    other = make_tls(tmp_path / "other")
    ca.write_bytes(other.ca_file.read_bytes())
    os.utime(ca, (time.time() + 5, time.time() + 5))
    assert net_tls.shared_context(str(ca)) is not first
    with _served(other) as url, https_session(str(ca), 5) as s:
        assert s.get(url).text == "ok"


def _served(files: TlsFiles):  # type: ignore[no-untyped-def]
    import contextlib

    return contextlib.contextmanager(_serve)(files)


def test_a_bad_ca_file_is_an_error_at_session_start(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises((OSError, ValueError)):
        https_session(str(bad), 5)


def test_the_real_system_store_is_found() -> None:
    # What the fake store above stands for: this machine's, as the agent finds it.
    found = net_tls._system_dir()
    if found is None:
        assert net_tls.client_context().cert_store_stats()["x509_ca"] > 10, "the bundle, parsed"
    else:
        assert len([n for n in os.listdir(found) if net_tls._HASHED.match(n)]) > 10
