"""TLS trust for every client of the agent (IdP, sinks, MQTT): one rule, one shape.

``ca_file`` is trusted in addition to the system store, never instead. Every client gets an
``ssl.SSLContext``: paho a fresh one (``client_context``), the HTTPS sessions one shared context
per ``ca_file`` (``shared_context``) that ``agent.net.https`` hands to urllib3 for every connection,
so ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` / ``verify=`` never replace it.

Built once, not per connection: loading the ~140 certificates of the system bundle into a
context costs ~45 ms of CPU (x86; several times that on a Pi Zero), which urllib3 would pay for
every new connection given a ``verify=`` path. Where the system store is a hashed directory
(Debian's /etc/ssl/certs) it is given as ``capath`` and looked up lazily, one file per chain
link; ``ca_file`` (a few certificates) is parsed into the same context.
"""

from __future__ import annotations

import os
import re
import ssl
import threading

_shared: dict[tuple[str, float], ssl.SSLContext] = {}
_shared_lock = threading.Lock()
_HASHED = re.compile(r"^[0-9a-f]{8}\.[0-9]+$")


def shared_context(ca_file: str = "") -> ssl.SSLContext:
    """The process's one context for ``ca_file`` (rebuilt when the file changes).

    Raises:
        OSError, ssl.SSLError: as ``client_context``.
    """
    key = (ca_file, _mtime(ca_file) if ca_file else 0.0)
    with _shared_lock:
        ctx = _shared.get(key)
        if ctx is None:
            ctx = _shared[key] = client_context(ca_file)
        return ctx


def _system_dir() -> str | None:
    """The system store as a hashed directory, if it is one (Debian: /etc/ssl/certs)."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.capath, paths.openssl_capath, "/etc/ssl/certs"):
        if candidate and os.path.isdir(candidate):
            try:
                with os.scandir(candidate) as entries:
                    if any(_HASHED.match(e.name) for e in entries):
                        return candidate
            except OSError:
                continue
    return None


def client_context(ca_file: str = "") -> ssl.SSLContext:
    """A verifying client context (hostname checked) trusting the system store plus ``ca_file``.

    Raises:
        OSError, ssl.SSLError: ``ca_file`` is missing, unreadable or holds no PEM certificate;
            callers turn that into their own error naming the config key.
    """
    system_dir = _system_dir()
    if system_dir:
        # Looked up lazily (see the module docstring); the default paths parse the whole bundle.
        ctx = ssl.create_default_context(capath=system_dir)
    else:
        ctx = ssl.create_default_context()
        if ctx.cert_store_stats()["x509_ca"] == 0:
            # No CA in OpenSSL's default paths (some minimal images): the bundle requests would use.
            ctx.load_verify_locations(cafile=_system_bundle())
    if ca_file:
        ctx.load_verify_locations(cafile=ca_file)
    return ctx


def _system_bundle() -> str:
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile, "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and os.path.isfile(candidate):
            return candidate
    import certifi  # requests' own dependency

    return str(certifi.where())


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0
