"""TLS trust for every client of the agent (IdP, sinks, MQTT): one rule, two shapes.

``ca_file`` is trusted in addition to the system store, never instead. requests gets it as a
``verify=`` path (``ca_bundle``; ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` never override it:
requests merges those per request unless ``verify`` is an explicit path, so
``agent.net.https`` always passes the path this module returns); paho gets an
``ssl.SSLContext`` (``client_context``).
"""

from __future__ import annotations

import atexit
import os
import ssl
import tempfile
import threading

_bundles: dict[str, str] = {}
_bundles_lock = threading.Lock()


def ca_bundle(ca_file: str) -> str:
    """A PEM file holding the system CAs plus ``ca_file`` (when set): what ``verify=`` gets.

    Without ``ca_file`` it is the system bundle itself (not certifi's copy, so an admin's
    update-ca-certificates applies). The combined file lives in the temp dir, 0600, removed at exit.
    """
    system = _system_bundle()
    if not ca_file:
        return system
    with _bundles_lock:
        key = f"{system}\0{ca_file}\0{_mtime(ca_file)}"
        if key in _bundles and os.path.exists(_bundles[key]):
            return _bundles[key]
        with open(system, "rb") as f:
            data = f.read()
        with open(ca_file, "rb") as f:
            data += b"\n" + f.read()
        fd, path = tempfile.mkstemp(prefix="device-agent-ca-", suffix=".pem")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        atexit.register(_unlink, path)
        _bundles[key] = path
        return path


def client_context(ca_file: str = "") -> ssl.SSLContext:
    """A verifying client context (hostname checked) trusting the system store plus ``ca_file``.

    Raises:
        OSError, ssl.SSLError: ``ca_file`` is missing, unreadable or holds no PEM certificate;
            callers turn that into their own error naming the config key.
    """
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


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
