"""TLS trust for every client of the agent (IdP, sinks, MQTT): one rule, two shapes.

``ca_file`` is trusted in addition to the system store, never instead. requests gets it as a
``verify=`` path (``ca_bundle``; ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` never override it:
requests merges those per request unless ``verify`` is an explicit path, so
``agent.net.https`` always passes the path this module returns); paho gets an
``ssl.SSLContext`` (``client_context``).

The ``verify=`` path is a *directory* in OpenSSL's hashed layout (``<subject hash>.<n>``), not one big PEM
file: urllib3 builds a new SSL context for every connection and loads ``verify`` into it, and
parsing the ~140 certificates of the system bundle costs ~45 ms of CPU each time (x86; several
times that on a Pi Zero), while a directory is looked up lazily, one file per chain link. With
``ca_file`` the directory is built in memory (``/dev/shm``: 140 symlinks cost ~30 ms on ext4 and
would wear the SD card at every start, <1 ms on tmpfs). Where the system store has no hashed
directory, or the hashes cannot be computed, it falls back to the combined PEM file.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import ssl
import tempfile
import threading

_bundles: dict[str, str] = {}
_bundles_lock = threading.Lock()
_PREFIX = "device-agent-ca-"
_SHM = "/dev/shm"  # noqa: S108 - mkdtemp: a fresh 0700 directory, never a guessable name
_HASHED = re.compile(r"^[0-9a-f]{8}\.[0-9]+$")
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL)


def ca_bundle(ca_file: str) -> str:
    """What ``verify=`` gets: the system CAs plus ``ca_file`` (when set).

    Without ``ca_file`` it is the system store itself (not certifi's copy, so an admin's
    update-ca-certificates applies). With it, a private temp directory (0700) of links to the
    system certificates plus the certificates of ``ca_file``, removed at exit.
    """
    system_dir = _system_dir()
    if not ca_file:
        return system_dir or _system_bundle()
    with _bundles_lock:
        key = f"{system_dir}\0{ca_file}\0{_mtime(ca_file)}"
        if key in _bundles and os.path.exists(_bundles[key]):
            return _bundles[key]
        path = (_hashed_dir(system_dir, ca_file) if system_dir else None) or _combined_file(ca_file)
        _bundles[key] = path
        return path


def _system_dir() -> str | None:
    """The system store as a hashed directory, if it is one (Debian: /etc/ssl/certs)."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.capath, paths.openssl_capath, "/etc/ssl/certs"):
        if candidate and os.path.isdir(candidate):
            try:
                if any(_HASHED.match(name) for name in os.listdir(candidate)):
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


def _hashed_dir(system_dir: str, ca_file: str) -> str | None:
    """A temp directory: the system store's hash links, then ``ca_file``'s certificates under
    the next free ``<hash>.<n>``. None when a hash cannot be computed (use the PEM file)."""
    with open(ca_file, "rb") as f:
        certs = _PEM_CERT.findall(f.read())
    try:
        hashes = [subject_hash(pem) for pem in certs]
    except (OSError, ValueError, AttributeError):
        return None
    if not certs:
        return None
    where = _SHM if os.path.isdir(_SHM) and os.access(_SHM, os.W_OK) else None
    _remove_stale(where or tempfile.gettempdir())
    path = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=where)
    atexit.register(shutil.rmtree, path, True)
    taken: set[str] = set()
    for name in os.listdir(system_dir):
        if _HASHED.match(name):
            os.symlink(os.path.join(system_dir, name), os.path.join(path, name))
            taken.add(name)
    for h, pem in zip(hashes, certs, strict=True):
        n = 0
        while f"{h}.{n}" in taken:
            n += 1
        taken.add(f"{h}.{n}")
        with open(os.path.join(path, f"{h}.{n}"), "wb") as f:
            f.write(pem + b"\n")
    return path


def _remove_stale(parent: str) -> None:
    """Directories left by agents that were killed (no atexit): ours, of processes now gone."""
    try:
        names = [n for n in os.listdir(parent) if n.startswith(_PREFIX)]
    except OSError:
        return
    for name in names:
        pid = name[len(_PREFIX):].split("-", 1)[0]
        path = os.path.join(parent, name)
        try:
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}") and os.lstat(path).st_uid == os.geteuid():
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _combined_file(ca_file: str) -> str:
    """The system bundle and ``ca_file`` in one PEM file (0600, removed at exit)."""
    with open(_system_bundle(), "rb") as f:
        data = f.read()
    with open(ca_file, "rb") as f:
        data += b"\n" + f.read()
    fd, path = tempfile.mkstemp(prefix="device-agent-ca-", suffix=".pem")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    atexit.register(_unlink, path)
    return path


def subject_hash(pem: bytes) -> str:
    """OpenSSL's subject name hash of a PEM certificate (what ``openssl x509 -hash`` prints),
    from the libcrypto this Python's ssl module uses, so the lookup agrees with it exactly.

    Raises:
        OSError: libcrypto not found. ValueError: not a certificate.
    """
    import ctypes

    lib = _libcrypto()
    lib.BIO_new_mem_buf.restype = ctypes.c_void_p
    lib.BIO_new_mem_buf.argtypes = [ctypes.c_char_p, ctypes.c_int]
    lib.PEM_read_bio_X509.restype = ctypes.c_void_p
    lib.PEM_read_bio_X509.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.X509_subject_name_hash.restype = ctypes.c_ulong
    lib.X509_subject_name_hash.argtypes = [ctypes.c_void_p]
    lib.X509_free.argtypes = [ctypes.c_void_p]
    lib.BIO_free.argtypes = [ctypes.c_void_p]
    bio = lib.BIO_new_mem_buf(pem, len(pem))
    if not bio:
        raise ValueError("out of memory")
    try:
        cert = lib.PEM_read_bio_X509(bio, None, None, None)
        if not cert:
            raise ValueError("not a PEM certificate")
        try:
            return f"{lib.X509_subject_name_hash(cert) & 0xFFFFFFFF:08x}"
        finally:
            lib.X509_free(cert)
    finally:
        lib.BIO_free(bio)


def _libcrypto():  # type: ignore[no-untyped-def]
    """The libcrypto mapped into this process by the ssl module (never another copy)."""
    import ctypes

    with open("/proc/self/maps") as f:
        for line in f:
            path = line.rsplit(None, 1)[-1] if "/" in line else ""
            if "/libcrypto.so" in path:
                return ctypes.CDLL(path)
    raise OSError("libcrypto is not loaded")


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
