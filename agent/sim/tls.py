"""A throwaway CA and a loopback server certificate for the simulated services."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class TlsFiles:
    """PEM files on disk: ``ca_file`` is what clients trust (config ``ca_file``)."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
        return ctx

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


def make_tls(directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")) -> TlsFiles:
    """Create (or reuse, if present) a CA and a server cert for ``hosts`` under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    if all(p.exists() for p in (files.ca_file, files.cert_file, files.key_file)):
        return files
    ca = trustme.CA(organization_name="device-agent simulated CA")
    leaf = ca.issue_cert(*hosts)
    ca.cert_pem.write_to_path(str(files.ca_file))
    leaf.cert_chain_pems[0].write_to_path(str(files.cert_file))
    for extra in leaf.cert_chain_pems[1:]:
        with files.cert_file.open("ab") as f:
            f.write(extra.bytes())
    leaf.private_key_pem.write_to_path(str(files.key_file))
    files.key_file.chmod(0o600)
    return files
