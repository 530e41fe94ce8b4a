"""`status.json`, the single-instance lock, and the `status` / `sign-out` / `dead-letter` commands.

The running service rewrites ``status.json`` atomically (0600, no secrets) whenever its state
changes, so ``device-agent status`` never has to open the live token cache or the outbox (which
the service holds exclusively). ``sign-out`` and ``dead-letter`` ask a running service to do it
(``ask_service``: a request file with a nonce, a signal, the answer echoing the nonce), because
only the process that owns the token cache and the outbox may write them; with no service
running the command does it itself.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import signal
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from agent import __version__
from agent.config import Settings
from agent.errors import AgentError
from agent.fsutil import atomic_write
from agent.net.retry import OutageLog
from agent.state import AgentState, Snapshot, iso
from agent.wakeup import name_os_thread

if TYPE_CHECKING:
    from agent.telemetry.outbox import Outbox

log = logging.getLogger(__name__)

STATUS_NAME = "status.json"
LOCK_NAME = "agent.lock"
SIGN_OUT = "sign-out"                   # requests: <name>.<key>.<nonce>.request, answered in .done
SIGN_OUT_SIGNAL = signal.SIGUSR1
DEAD_LETTER = "dead-letter"
DEAD_LETTER_SIGNAL = signal.SIGUSR2
DEAD_LETTER_WAIT_S = 20.0               # the service's outbox lock is held for milliseconds; a long
                                        # retry of thousands of rows is a few seconds on a Pi
RUNTIME_DIR = Path("/run/device-agent")   # systemd's RuntimeDirectory= (systemd/device-agent.service)


def status_path(settings: Settings) -> Path:
    """state_dir/status.json: where a stopped service leaves its last word (``StatusWriter``
    writes to ``runtime_status_path`` while it runs, when there is one)."""
    return settings.device.state_dir / STATUS_NAME


def runtime_status_path(state_dir: Path) -> Path | None:
    """Where the running service keeps status.json when a runtime directory is there: the first
    of ``$RUNTIME_DIRECTORY`` (systemd's RuntimeDirectory=) and ``/run/device-agent`` that is a
    directory of ours nobody else can write. It is tmpfs: rewriting the status a few times per
    reading (a new file and inode each time, as atomic writes go) costs the SD card nothing."""
    owner = os.geteuid()
    for path in fallback_status_paths(state_dir)[:-1]:       # the runtime candidates, not /tmp
        if _trusted_dir(path.parent, owner):
            return path
    return None


def fallback_status_paths(state_dir: Path) -> list[Path]:
    """Where the service puts status.json when the state dir cannot take it (read-only or full),
    in order of preference, and where `status` looks for it: ``$RUNTIME_DIRECTORY`` (systemd
    sets it), ``/run/device-agent``, else a directory of our own under the system temp dir. The
    name is derived from the state dir, so services on different state dirs never mix."""
    key = hashlib.sha256(str(Path(os.path.abspath(state_dir))).encode()).hexdigest()[:16]
    dirs = [Path(d) for d in os.environ.get("RUNTIME_DIRECTORY", "").split(":") if d]
    dirs.append(RUNTIME_DIR)
    paths = list(dict.fromkeys(d / f"status-{key}.json" for d in dirs))
    paths.append(Path(tempfile.gettempdir()) / f"device-agent-{key}" / STATUS_NAME)
    return paths


def _trusted_dir(directory: Path, owner: int, *, create: bool = False) -> bool:
    """Whether ``directory`` may hold our status: a real directory of ``owner`` that nobody else
    can write (the temp dir is shared: a file planted there must not pass for the service's)."""
    if create:
        with contextlib.suppress(OSError):
            directory.mkdir(mode=0o700)
    try:
        st = directory.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == owner and not st.st_mode & 0o022


def newest_status(state_dir: Path) -> dict[str, Any] | None:
    """The newest status document among state_dir/status.json and its fallback copies."""
    try:
        owner = state_dir.stat().st_uid
    except OSError:
        owner = os.geteuid()
    best: tuple[float, dict[str, Any]] | None = None
    for i, path in enumerate([state_dir / STATUS_NAME, *fallback_status_paths(state_dir)]):
        if i and not _trusted_dir(path.parent, owner):
            continue
        try:
            mtime = path.stat().st_mtime
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and (best is None or mtime > best[0]):
            best = (mtime, doc)
    return None if best is None else best[1]


class InstanceLock:
    """An flock on ``state_dir/agent.lock`` holding our pid: one service per state dir."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        writable = True
        try:
            f = self.path.open("a+")
        except OSError as err:
            if err.errno != errno.EROFS or not self.path.exists():
                raise
            # A read-only state dir (an SD card gone read-only): still one service per state
            # dir (flock works on a read-only descriptor); the outbox reports storage read-only.
            f, writable = self.path.open("r"), False
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            f.close()
            if err.errno in (errno.EAGAIN, errno.EACCES):
                raise AgentError(f"another device-agent is already running on {self.path.parent} "
                                 f"(pid {running_pid(self.path.parent) or '?'})") from None
            raise
        if writable:
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
        self._file = f

    def release(self) -> None:
        if self._file:
            self._file.close()
            self._file = None


def running_pid(state_dir: Path) -> int | None:
    """Pid of the service holding the lock on ``state_dir``, or None if none runs."""
    path = state_dir / LOCK_NAME
    try:
        f = path.open("r")
    except FileNotFoundError:
        return None   # never ran here (a PermissionError propagates: "not running" would be a lie)
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            text = f.read().strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(f, fcntl.LOCK_UN)
        return None


class StatusWriter:
    """Observes the state and rewrites status.json at most every ``min_interval_s``."""

    def __init__(self, path: Path, state: AgentState, device_id: str, *, min_interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, fallbacks: list[Path] | None = None) -> None:
        # ``path`` is state_dir/status.json; while running, the runtime dir's copy is the one
        # rewritten (SD-card wear), and the state dir gets the final word at stop, so `status`
        # after a stop or a reboot still shows the last upload.
        self.home = path
        runtime = runtime_status_path(path.parent) if fallbacks is None else None
        self.path = runtime or path
        others = fallback_status_paths(path.parent) if fallbacks is None else fallbacks
        self._fallbacks = [p for p in ([path] if runtime else []) + others if p != self.path]
        self._written_elsewhere: Path | None = None
        self._state = state
        self._device_id = device_id
        self._min_interval_s = min_interval_s
        # A full or read-only state dir fails every rewrite: agent.net.retry.OutageLog's one rule.
        self._failing = OutageLog(log, clock=clock)
        self._dirty = threading.Event()
        self._written_version = -1        # Snapshot.version last written
        self._written = -math.inf         # monotonic time of the last write
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, *, thread: bool = True) -> None:
        if thread:
            self._thread = threading.Thread(target=self._loop, name="status-file", daemon=True)
        self._state.subscribe(self._on_change)
        if self._thread is not None:
            self._thread.start()

    def stop(self) -> None:
        self._state.unsubscribe(self._on_change)
        self._stop.set()
        self._dirty.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self.write(self._state.snapshot)  # the final word: "stopped"
        if self.path != self.home:        # ... also where it outlives the runtime dir (a reboot)
            data = self._document(self._state.snapshot)
            try:
                atomic_write(self.home, data, durable=False)
            except OSError as err:
                log.debug("status: cannot leave %s: %s", self.home, err)

    def _on_change(self, snap: Snapshot) -> None:
        self._dirty.set()                 # only our own thread waits on it

    def serve(self) -> float:
        """Write the newest snapshot if it changed and the rate limit allows; returns seconds
        until a write is due (``math.inf``: on the next change). Rate limit only a burst: a
        change after a quiet spell is written at once."""
        # The state's version, not a flag our observer sets: the observer loop may run this
        # before an earlier observer of the same change has let ours be told.
        snap = self._state.snapshot
        if self._stop.is_set() or snap.version == self._written_version:
            return math.inf
        left = self._written + self._min_interval_s - time.monotonic()
        if left > 0:
            return left
        self._written_version = snap.version
        self.write(snap)
        self._written = time.monotonic()
        return math.inf

    def _loop(self) -> None:
        name_os_thread()
        while not self._stop.is_set():
            delay = self.serve()
            if delay == math.inf:
                self._dirty.wait()
                self._dirty.clear()
            else:
                self._stop.wait(delay)    # the burst's rate limit: its other changes wake no one

    def _document(self, snap: Snapshot) -> bytes:
        return (json.dumps(snapshot_document(snap, self._device_id), indent=1) + "\n").encode()

    def write(self, snap: Snapshot) -> None:
        data = self._document(snap)
        try:
            atomic_write(self.path, data, durable=False)
        except OSError as err:
            # `status` must not show a stale file while MQTT and the panel tell the truth:
            # the same document goes to a fallback that `status` reads too (newest wins).
            where = self._write_fallback(data)
            self._failing.failed(f"cannot write {self.path}: {err}"
                                 + (f"; status goes to {where}" if where else ""))
        else:
            self._failing.ended(f"writing {self.path} again")
            if self._written_elsewhere is not None:
                with contextlib.suppress(OSError):
                    self._written_elsewhere.unlink()
                self._written_elsewhere = None

    def _write_fallback(self, data: bytes) -> Path | None:
        owner = os.geteuid()
        ordered = ([self._written_elsewhere] if self._written_elsewhere else []) + \
            [p for p in self._fallbacks if p != self._written_elsewhere]
        for path in ordered:
            if not _trusted_dir(path.parent, owner, create=path.parent.parent == Path(tempfile.gettempdir())):
                continue
            try:
                atomic_write(path, data, durable=False)
            except OSError:
                continue
            self._written_elsewhere = path
            return path
        return None


def snapshot_document(snap: Snapshot, device_id: str) -> dict[str, Any]:
    """What status.json and `status --json` hold: the MQTT status payload (docs/INTERFACE.md#mqtt) plus details."""
    doc = snap.status_payload(__version__)
    doc.update({
        "device_id": device_id,
        "pid": os.getpid(),
        "updated_at": iso(snap.true_now()),
        "monotonic_at": round(time.monotonic(), 3),   # lets `status` age the figures it reads
        "renewals_exhausted": snap.renewals_exhausted,
        "links": dict(snap.links),
        "code": snap.code.public(device_id, true_now=snap.true_now()) if snap.code else None,
        "last_reading": None if snap.last_reading is None else {
            "sensor": snap.last_reading.sensor, "value": snap.last_reading.value,
            "unit": snap.last_reading.unit, "error": snap.last_reading.error},
    })
    return doc


def previous_last_upload(path: Path) -> datetime | None:
    """``last_upload`` from the status file a previous run left (``path`` or, if newer, its
    fallback copy), if any and readable."""
    try:
        value = (newest_status(path.parent) or {}).get("last_upload")
        return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def read_status(settings: Settings) -> dict[str, Any]:
    """The service's view if it runs, else what can be read from the state dir without it."""
    state_dir = settings.device.state_dir
    pid = running_pid(state_dir)
    doc = newest_status(state_dir)
    # Only the running service's own document: between a start and its first write the newest
    # one is the previous run's (RuntimeDirectoryPreserve= keeps it in the runtime dir too).
    if pid is not None and doc is not None and (doc.get("pid") == pid or _holds_lock(doc.get("pid"), state_dir)):
        doc["running"] = True
        _age(doc)
        return doc
    # Not running (or not written its status yet): derive from the files, never writing them.
    from agent.clock import kernel_synchronized
    from agent.telemetry import readonly

    # A service that runs but has not written its status yet holds the outbox exclusively:
    # it is not opened then (that would wait for the lock), the figures follow once it writes.
    readable = pid is None and settings.outbox_path.exists()
    counts = readonly.read_counts(settings.outbox_path) if readable else None
    account = _cached_account(settings.token_cache_path)
    if account is None and settings.auth.flow == "client_certificate":
        # App-only tokens have no account; the identity is the app (as the running service says).
        account = f"app {settings.auth.client_id}" if _has_app_token(settings.token_cache_path) else None
    oldest = readonly.read_oldest_wall(settings.outbox_path) if counts and counts.pending else None
    refreshed = refresh_token_time(settings.token_cache_path)
    lapse = (None if refreshed is None else
             max(0.0, round((refreshed + settings.auth.refresh_lifetime_days * 86400.0 - time.time())
                            / 86400.0, 1)))
    return {
        "running": pid is not None,
        "device_id": settings.device.id,
        "state": "offline" if pid is None else "starting",
        "account": account,
        "error": None,
        "outbox": {"pending": counts.pending, "dead": counts.dead, "dropped": counts.dropped}
        if counts else {"pending": 0, "dead": 0, "dropped": 0},
        "oldest_pending_s": None if oldest is None else max(0, int(time.time() - oldest)),
        "last_upload": (doc or {}).get("last_upload"),
        # Without the service there are no server answers to compare with: the kernel's word.
        "clock": "synced" if kernel_synchronized() else "unsynced",
        "storage": storage_state(state_dir),
        "signin_lapses_in_days": lapse,
        "version": __version__,
    }


def _holds_lock(pid: object, state_dir: Path) -> bool:
    """Whether ``pid`` holds the instance lock, by the kernel's word (/proc/locks): on a
    read-only state dir the lock file still names the previous run (it cannot be rewritten)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        inode = (state_dir / LOCK_NAME).stat().st_ino
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[4] == str(pid) \
                and fields[5].rsplit(":", 1)[-1] == str(inode):
            return True
    return False


def storage_state(state_dir: Path) -> str:
    """The state dir's storage as the outbox would judge it (agent/telemetry/storage.py), read
    without writing: "read_only", "full" (less room than the outbox needs to store), else "ok"."""
    from agent.telemetry.storage import LOW_WATER, free_bytes, read_only

    if read_only(state_dir):
        return "read_only"
    free = free_bytes(state_dir)
    return "full" if free is not None and free < LOW_WATER else "ok"


def _age(doc: dict[str, Any]) -> None:
    """Bring the figures of a status.json written a while ago up to now (monotonic: same boot)."""
    at = doc.get("monotonic_at")
    if not isinstance(at, int | float) or not 0 <= time.monotonic() - at < 86400 * 365:
        return
    elapsed = time.monotonic() - at
    if isinstance(doc.get("oldest_pending_s"), int | float):
        doc["oldest_pending_s"] = int(doc["oldest_pending_s"] + elapsed)
    if isinstance(doc.get("signin_lapses_in_days"), int | float):
        doc["signin_lapses_in_days"] = max(0.0, round(doc["signin_lapses_in_days"] - elapsed / 86400, 1))


def refresh_token_time(cache_path: Path) -> float | None:
    """When the newest refresh token in the MSAL cache was issued (msal's
    ``last_modification_time``, wall clock then), read as data; None without one."""
    try:
        data = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        return None
    times = []
    for rt in (data.get("RefreshToken") or {}).values() if isinstance(data, dict) else ():
        try:
            times.append(float(rt.get("last_modification_time")))
        except (AttributeError, TypeError, ValueError):
            continue
    return max(times) if times else None


def _cached_account(cache_path: Path) -> str | None:
    """The username in the MSAL cache, read as data (no msal import, no tokens touched)."""
    try:
        data = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        return None
    accounts = data.get("Account") or {}
    for acc in accounts.values():
        if isinstance(acc, dict):
            return str(acc.get("username") or acc.get("home_account_id") or "") or None
    return None


def _has_app_token(cache_path: Path) -> bool:
    """Whether the cache holds an app-only access token (auth.flow = "client_certificate")."""
    try:
        data = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        return False
    tokens = data.get("AccessToken") or {}
    return any(isinstance(t, dict) and not t.get("home_account_id") for t in tokens.values())


def acknowledge_sign_out(state_dir: Path) -> None:
    """The service's half of `sign-out`: echo the CLI's nonce once the sign-out is done."""
    answer_request(state_dir, SIGN_OUT, lambda body: {})


def ask_service(state_dir: Path, name: str, body: dict[str, Any], *, signum: int,
                wait_s: float) -> dict[str, Any] | None:
    """Ask the service running on ``state_dir`` to do ``name``: write a request file of its own
    (``<name>.<key>.<nonce>.request``, in ``request_dir``: the runtime dir if it can take it),
    signal the service, wait for the matching ``.done``. Returns that answer, or None when no
    service runs (the caller does it itself). A request per nonce: two commands at once each get
    their own answer, and each request is run once (``answer_request``).

    A nonce, not the effect, says it happened: a device with someone at the sign-in page may be
    signed in again before we look, and a dead-letter list looks the same twice.

    Raises:
        AgentError: the service cannot be signalled (another user) or does not answer in time.
    """
    pid = running_pid(state_dir)
    if not pid or pid < 0:
        return None
    nonce = os.urandom(8).hex()
    where = request_dir(state_dir)
    request = where / f"{_request_stem(state_dir, name)}.{nonce}.request"
    done = request.with_suffix(".done")
    atomic_write(request, json.dumps({**body, "nonce": nonce}).encode(), durable=False)
    _give_to_owner(request, state_dir)
    try:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            return None
        except PermissionError as err:
            raise AgentError(f"cannot signal the running service (pid {pid}): {err.strerror}; "
                             "run as root or as the service user") from err
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            answer = _read_json(done)
            if answer.get("nonce") == nonce:
                return answer
            time.sleep(0.05)
        raise AgentError(f"the running service (pid {pid}) did not answer `{name}` within {wait_s:.0f} s")
    finally:
        for path in (request, done):
            with contextlib.suppress(OSError):
                path.unlink()


def request_dir(state_dir: Path) -> Path:
    """Where `sign-out` / `dead-letter` leave their request: the service's runtime dir (tmpfs,
    beside its status file) when there is one we may write, so a read-only or full state dir
    does not stop them and the SD card sees no write; else the state dir."""
    for path in _request_dirs(state_dir)[:-1]:
        if os.access(path, os.W_OK | os.X_OK):
            return path
    return state_dir


def _request_dirs(state_dir: Path) -> list[Path]:
    """Every directory a request for the service on ``state_dir`` may be in: the runtime dirs
    of the service's user that nobody else can write (a planted request must not run), then the
    state dir."""
    try:
        owner = state_dir.stat().st_uid
    except OSError:
        owner = os.geteuid()
    runtime = [p.parent for p in fallback_status_paths(state_dir)[:-1]]
    return [d for d in dict.fromkeys(runtime) if _trusted_dir(d, owner)] + [state_dir]


def _request_stem(state_dir: Path, name: str) -> str:
    """``<name>.<key>``: the runtime dir is shared by services on different state dirs."""
    return f"{name}.{fallback_status_paths(state_dir)[0].stem.removeprefix('status-')}"


_answering: dict[str, threading.Lock] = {}
_answering_guard = threading.Lock()
STALE_REQUEST_S = 600.0      # older than any command waits (DEAD_LETTER_WAIT_S): its asker is gone


def answer_request(state_dir: Path, name: str, handler: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
    """The service's half of ``ask_service``: run ``handler`` on every pending request's body,
    one request and one caller at a time (two signals start two threads: the second finds
    nothing left to do), write each answer beside its request, then remove the request.
    Requests and answers nobody has collected for ``STALE_REQUEST_S`` are removed. Returns how
    many requests were answered."""
    with _answering_guard:
        lock = _answering.setdefault(name, threading.Lock())
    answered = 0
    with lock:
        stem = _request_stem(state_dir, name)
        for where in _request_dirs(state_dir):
            for path in sorted(where.glob(f"{stem}.*.request")):
                nonce = path.name[len(stem) + 1:-len(".request")]
                done = path.with_suffix(".done")
                with contextlib.suppress(OSError):
                    if time.time() - path.stat().st_mtime > STALE_REQUEST_S:
                        path.unlink()
                        continue
                body = _read_json(path)
                if body.pop("nonce", None) != nonce or _read_json(done).get("nonce") == nonce:
                    continue
                try:
                    answer = handler(body)
                except Exception as err:   # the command must hear it, not wait 20 s for nothing
                    log.exception("`%s` failed", name)
                    answer = {"exit": 1, "error": f"the service failed: {type(err).__name__}: {err}"}
                try:
                    atomic_write(done, json.dumps({**answer, "nonce": nonce}).encode(), durable=False)
                except OSError as err:
                    log.warning("cannot answer `%s` in %s: %s", name, where, err)
                with contextlib.suppress(OSError):
                    path.unlink()
                answered += 1
            for path in where.glob(f"{stem}.*.done"):
                with contextlib.suppress(OSError):
                    if time.time() - path.stat().st_mtime > STALE_REQUEST_S:
                        path.unlink()
    return answered


def _give_to_owner(path: Path, state_dir: Path) -> None:
    """root asking the service: the request file must be readable by the service's user."""
    if os.geteuid() == 0:
        with contextlib.suppress(OSError):
            st = state_dir.stat()
            os.chown(path, st.st_uid, st.st_gid)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def show_status(settings: Settings, *, as_json: bool, out: IO[str] | None = None) -> int:
    out = out or sys.stdout
    doc = read_status(settings)
    if as_json:
        print(json.dumps(doc, ensure_ascii=False), file=out)
        return 0
    ob = doc.get("outbox") or {}
    lines = [
        f"device:      {doc.get('device_id')}",
        "service:     " + (f"running (pid {doc.get('pid')})" if doc.get("running") else "not running"),
        f"state:       {doc.get('state')}",
        f"account:     {doc.get('account') or '-'}",
        f"outbox:      {ob.get('pending', 0)} pending, {ob.get('dead', 0)} dead-lettered, "
        f"{ob.get('dropped', 0)} dropped",
        f"last upload: {doc.get('last_upload') or 'never'}",
        f"oldest:      {_age_text(doc.get('oldest_pending_s'))}",
        f"clock:       {doc.get('clock') or '?'}" + (f": {doc['clock_note']}" if doc.get("clock_note") else ""),
        "sign-in:     " + (f"lapses in {doc['signin_lapses_in_days']:g} days if the box stays offline"
                           if isinstance(doc.get("signin_lapses_in_days"), int | float) else "-"),
    ]
    if doc.get("storage"):
        lines.append(f"storage:     {doc['storage']}")
    if doc.get("code"):
        c = doc["code"]
        lines.append(f"sign in:     open {c.get('verification_uri')} and enter {c.get('user_code')} "
                     f"(expires {c.get('expires_at')})")
    if doc.get("error"):
        lines.append(f"error:       {doc['error']}")
    if doc.get("warning"):
        lines.append(f"warning:     {doc['warning']}")
    print("\n".join(lines), file=out)
    return 0


def _age_text(seconds: object) -> str:
    """The oldest unsent reading's age for people: nothing pending, or how long it waits."""
    if not isinstance(seconds, int | float):
        return "nothing pending"
    from agent.clock import describe_offset

    return f"{describe_offset(seconds)} (age of the oldest unsent reading)"


def sign_out(settings: Settings, *, wait_s: float = 5.0, out: IO[str] | None = None) -> int:
    out = out or sys.stdout
    if ask_service(settings.device.state_dir, SIGN_OUT, {}, signum=SIGN_OUT_SIGNAL, wait_s=wait_s) is not None:
        print("signed out; the running service will show a new sign-in code", file=out)
        return 0
    path = settings.token_cache_path
    if path.exists():
        path.unlink()
        print(f"signed out: removed {path}", file=out)
    else:
        print("not signed in", file=out)
    return 0


def dead_letter(settings: Settings, action: str, seqs: Sequence[str], *, all_: bool,
                out: IO[str] | None = None, err: IO[str] | None = None) -> int:
    """``device-agent dead-letter``: through the running service, which holds the outbox
    exclusively (agent/telemetry/outbox.py), else on the file itself. Returns the exit code.

    Raises:
        DeadLetterError: bad arguments (checked here, before asking anyone).
        AgentError: the service cannot be asked, or does not answer in time.
        sqlite3.Error: without a service, the outbox cannot be read or written.
    """
    from agent.telemetry import dead_letters

    out, err = out or sys.stdout, err or sys.stderr
    wanted = dead_letters.check_args(action, seqs, all_=all_)
    answer = ask_service(settings.device.state_dir, DEAD_LETTER,
                         {"action": action, "seqs": wanted, "all": all_},
                         signum=DEAD_LETTER_SIGNAL, wait_s=DEAD_LETTER_WAIT_S)
    if answer is None:
        return dead_letters.run(settings.outbox_path, settings.device.id, action, seqs, all_=all_, out=out)
    if answer.get("output"):
        out.write(str(answer["output"]))
    if answer.get("error"):
        raise dead_letters.DeadLetterError(str(answer["error"]), int(answer.get("exit", 1)))
    return int(answer.get("exit", 0))


def answer_dead_letter(state_dir: Path, outbox: Outbox | None, device_id: str,
                       requeued: Callable[[], None] | None = None) -> None:
    """The service's half of ``dead_letter`` (on DEAD_LETTER_SIGNAL), on its own outbox;
    ``requeued`` (the uploader's flush) once a retry has put readings back in the queue."""
    from agent.telemetry import dead_letters

    def handle(body: dict[str, Any]) -> dict[str, Any]:
        if outbox is None:
            return {"exit": 1, "error": "the service is starting: its outbox is not open yet; try again"}
        action = str(body.get("action"))
        answer = dead_letters.serve(outbox, device_id, action, [int(s) for s in body.get("seqs") or []],
                                    all_=bool(body.get("all")))
        if action == "retry" and answer.get("exit") == 0 and requeued is not None:
            requeued()
        return answer

    answer_request(state_dir, DEAD_LETTER, handle)
