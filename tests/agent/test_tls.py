"""agent.net.tls: the ``verify=`` path trusts the system store plus ``ca_file``, cheaply.

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
    d = tmp_path / "etc-ssl-certs"
    d.mkdir()
    pem = d / "Public_Test_CA.pem"
    pem.write_bytes(system_ca.ca_file.read_bytes())
    (d / f"{net_tls.subject_hash(pem.read_bytes())}.0").symlink_to(pem)
    monkeypatch.setattr(net_tls, "_system_dir", lambda: str(d))
    monkeypatch.setattr(net_tls, "_bundles", {})
    return d


def test_subject_hash_is_openssls(tls: TlsFiles) -> None:
    need_binary("openssl", "apt-get install openssl")
    out = subprocess.run(["openssl", "x509", "-hash", "-noout", "-in", str(tls.ca_file)],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert tls_hash(tls) == out


def tls_hash(files: TlsFiles) -> str:
    return net_tls.subject_hash(files.ca_file.read_bytes())


def test_verify_path_trusts_ca_file_and_the_system_store(
        system_dir: Path, tls: TlsFiles, own_ca_url: str, system_ca_url: str) -> None:
    verify = net_tls.ca_bundle(str(tls.ca_file))
    assert os.path.isdir(verify), "a hashed directory: looked up lazily, not parsed per connection"
    assert os.stat(verify).st_mode & 0o077 == 0
    with requests.Session() as s:
        assert s.get(own_ca_url, verify=verify, timeout=5).text == "ok"
        assert s.get(system_ca_url, verify=verify, timeout=5).text == "ok"
    # and nothing else: a server of a CA in neither place is refused
    with requests.Session() as s, pytest.raises(requests.exceptions.SSLError):
        s.get(own_ca_url, verify=net_tls.ca_bundle(""), timeout=5)


def test_the_directory_is_reused_and_follows_a_changed_ca_file(
        system_dir: Path, tls: TlsFiles, tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(tls.ca_file.read_bytes())
    first = net_tls.ca_bundle(str(ca))
    assert net_tls.ca_bundle(str(ca)) == first
    other = make_tls(tmp_path / "other")
    ca.write_bytes(other.ca_file.read_bytes())
    os.utime(ca, (time.time() + 5, time.time() + 5))
    second = net_tls.ca_bundle(str(ca))
    assert second != first
    assert f"{tls_hash(other)}.0" in os.listdir(second)


def test_unhashable_ca_file_falls_back_to_one_pem_file(
        system_dir: Path, tls: TlsFiles, own_ca_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(pem: bytes) -> str:
        raise OSError("libcrypto is not loaded")

    monkeypatch.setattr(net_tls, "subject_hash", broken)
    monkeypatch.setattr(net_tls, "_system_bundle", lambda: str(next(system_dir.glob("*.pem"))))
    verify = net_tls.ca_bundle(str(tls.ca_file))
    assert os.path.isfile(verify)
    assert tls.ca_file.read_bytes().strip() in Path(verify).read_bytes()
    with requests.Session() as s:
        assert s.get(own_ca_url, verify=verify, timeout=5).text == "ok"


def test_directories_of_killed_agents_are_removed(tmp_path: Path) -> None:
    stale = tmp_path / f"{net_tls._PREFIX}999999999-abc"
    stale.mkdir()
    live = tmp_path / f"{net_tls._PREFIX}{os.getpid()}-abc"
    live.mkdir()
    net_tls._remove_stale(str(tmp_path))
    assert not stale.exists() and live.exists()
