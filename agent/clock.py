"""Clock trust on a box without a real-time clock: is the wall clock right, and if not, what is.

A Raspberry Pi boots at whatever time ``fake-hwclock`` saved (or 1970) and jumps when NTP syncs,
if NTP is reachable at all. Two witnesses say what the time really is:

- the kernel's own verdict, ``adjtimex(2)`` read-only (``modes = 0``): it returns ``TIME_ERROR``
  (5) while the clock is unsynchronized; chrony and systemd-timesyncd both clear that;
- the ``Date`` header of every HTTPS answer the agent already gets (IdP, API, Graph). Each one is
  kept as an *anchor*: the server's time minus ``time.monotonic()`` when it was seen, with the boot
  id. Monotonic time never steps, so an anchor stays valid across NTP steps and ``date -s``: the
  true time of anything stamped with a monotonic time in the same boot is ``base + monotonic``.

Rules (docs/INTERFACE.md "Time"): an offset under ``NOISE_S`` is noise (a ``Date`` header has
whole seconds) and is never applied; an offset over ``OVERRIDE_S`` seen consistently in two
answers outweighs the kernel's "synchronized" (a stale flag, a manual ``date -s``); a reading of
another boot is never shifted by this boot's anchors (their monotonic clocks are unrelated).

The wall clock stays a label: every timer, deadline and back-off in the agent is monotonic.
"""

from __future__ import annotations

import email.utils
import logging
import threading
import time
from array import array
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from hw.records import record

log = logging.getLogger(__name__)

Quality = Literal["synced", "corrected", "unsynced"]

TIME_ERROR = 5            # adjtimex(2): the clock is not synchronized
NOISE_S = 2.0             # |offset| below this is the Date header's resolution plus latency
OVERRIDE_S = 60.0         # |offset| above this, twice alike, beats the kernel's "synchronized"
AGREE_S = 5.0             # two anchors "agree" when their bases differ by less than this
KEEP_ANCHORS = 16         # recent anchors kept (their median is the base applied)
KEEP_LABELS = 20_000      # labels remembered by seq, so a retried batch gets the same times
QUALITIES: tuple[Quality, ...] = ("synced", "corrected", "unsynced")
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")


@record
class Stamp:
    """When a reading was sampled: wall and monotonic time, boot, and the clock's trust then."""

    wall: float          # time.time()
    mono: float          # time.monotonic()
    boot: str
    synced: bool         # the clock was trusted (kernel synchronized, not outweighed)


@record
class Anchor:
    """One server ``Date`` header: true time at monotonic ``m`` is ``base + m`` (same boot)."""

    seen_mono: float
    base: float
    offset_s: float      # server minus local wall clock when it was seen
    source: str


_libc: Any = None
_Timex: Any = None


def load_libc() -> Any:
    """The C library through ctypes (errno kept), for adjtimex here and inotify
    (agent/telemetry/filewatch.py): the one loader, without ldconfig on glibc."""
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        import ctypes.util  # runs ldconfig: only where glibc's soname is not libc.so.6

        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _timex_type() -> Any:
    import ctypes

    class _Timex(ctypes.Structure):
        # struct timex of <sys/timex.h> (Linux); "long" matches the plain adjtimex symbol's ABI.
        _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                    ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
                    ("constant", ctypes.c_long), ("precision", ctypes.c_long),
                    ("tolerance", ctypes.c_long), ("time_sec", ctypes.c_long),
                    ("time_usec", ctypes.c_long), ("tick", ctypes.c_long), ("ppsfreq", ctypes.c_long),
                    ("jitter", ctypes.c_long), ("shift", ctypes.c_int), ("stabil", ctypes.c_long),
                    ("jitcnt", ctypes.c_long), ("calcnt", ctypes.c_long), ("errcnt", ctypes.c_long),
                    ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int), ("_pad", ctypes.c_int * 11)]

    return _Timex


def adjtimex_state() -> int | None:
    """``adjtimex(2)`` with ``modes = 0`` (read-only, needs no privilege): the clock state
    (0 TIME_OK .. 5 TIME_ERROR), or None where there is no such call."""
    global _libc, _Timex
    import ctypes  # here, not at import: ~4 ms of the start (docs/PERFORMANCE.md "Sign-in")

    try:
        if _libc is None:
            _libc, _Timex = load_libc(), _timex_type()
        tx = _Timex()
        tx.modes = 0
        ret = int(_libc.adjtimex(ctypes.byref(tx)))
    except (OSError, AttributeError):
        return None
    return None if ret < 0 else ret


def kernel_synchronized() -> bool | None:
    """The kernel's verdict: True synchronized, False not, None unknown (treated as not)."""
    state = adjtimex_state()
    return None if state is None else state != TIME_ERROR


def read_boot_id(path: Path = BOOT_ID_PATH) -> str:
    """This boot's id; a fixed placeholder where the kernel has none (then every row is "this boot"
    only within one process, see ``ClockTrust.boot_id``)."""
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def parse_http_date(value: str | None) -> float | None:
    """An RFC 9110 ``Date`` header as epoch seconds, None if absent or garbage."""
    if not value:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def describe_offset(offset_s: float) -> str:
    """``~3 d``, ``~5 h``, ``~12 min``, ``~40 s``: how far off, for people."""
    a = abs(offset_s)
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if a >= size * 0.95:
            return f"~{max(1, round(a / size))} {unit}"
    return f"~{max(1, round(a))} s"


class ClockTrust:
    """The agent's one opinion about the time. Thread-safe; every input is injectable.

    ``wall``/``monotonic``: the clocks (epoch seconds / seconds); ``kernel``: the adjtimex verdict;
    ``boot_id``: this boot (default: read from /proc).
    """

    def __init__(self, *, wall: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 kernel: Callable[[], bool | None] = kernel_synchronized,
                 boot_id: str | None = None) -> None:
        self.wall = wall
        self.monotonic = monotonic
        self.kernel = kernel
        self.boot_id = boot_id if boot_id is not None else read_boot_id()
        self._lock = threading.Lock()
        self._anchors: deque[Anchor] = deque(maxlen=KEEP_ANCHORS)
        self._floors: dict[tuple[str, str], tuple[int, float]] = {}   # (boot, sensor) -> (seq, time)
        self._given = Labels(KEEP_LABELS)      # seq -> the label given
        self._logged: str | None = None
        # Called with status() when a server answer changes the verdict or the correction (by a
        # second or more), so a code published right after the IdP's answer already has true
        # times; the service sets it to update AgentState.
        self.on_change: Callable[[Mapping[str, Any]], object] | None = None
        self._reported: Mapping[str, Any] | None = None

    # ---------------------------------------------------------------- inputs

    def observe_response(self, resp: Any) -> None:
        """An HTTPS answer arrived (an observer for the session factory): learn from its ``Date``."""
        headers = getattr(resp, "headers", None)
        date = headers.get("Date") if headers is not None else None
        url = str(getattr(resp, "url", "") or "")
        self.observe_date(date, source=url.split("/")[2] if url.count("/") >= 2 else "")

    def observe_date(self, value: str | None, *, source: str = "",
                     seen_mono: float | None = None, seen_wall: float | None = None) -> Anchor | None:
        """Record one ``Date`` header. Returns the anchor, None for a missing or garbage header."""
        server = parse_http_date(value)
        if server is None:
            return None
        mono = self.monotonic() if seen_mono is None else seen_mono
        wall = self.wall() if seen_wall is None else seen_wall
        # The header truncates to whole seconds: the server's clock was, on average, half a
        # second further on when it wrote it.
        server += 0.5
        anchor = Anchor(seen_mono=mono, base=server - mono, offset_s=server - wall, source=source)
        with self._lock:
            self._anchors.append(anchor)
        self._log_change()
        if self.on_change is not None:
            now = self.status()
            old = self._reported
            if (old is None or old["clock"] != now["clock"] or old["clock_note"] != now["clock_note"]
                    or abs(old["clock_offset_s"] - now["clock_offset_s"]) >= 1.0):
                self._reported = now
                self.on_change(now)
        return anchor

    # ---------------------------------------------------------------- the verdict

    def trusted(self) -> bool:
        """The wall clock may be used as it is: the kernel says synchronized and no two server
        answers say it is more than a minute off."""
        return bool(self.kernel()) and not self._outweighed()

    def offset_s(self) -> float | None:
        """True time minus the wall clock now (from this boot's anchors), None if none seen."""
        base = self._base()
        return None if base is None else base + self.monotonic() - self.wall()

    def quality(self) -> Quality:
        """What applies now: ``synced``, ``corrected`` (an anchor of this boot), ``unsynced``."""
        if self.trusted():
            return "synced"
        return "corrected" if self._base() is not None else "unsynced"

    def correction_s(self) -> float:
        """What to add to the wall clock now to get true time (0 when trusted, unknown or noise)."""
        if self.trusted():
            return 0.0
        off = self.offset_s()
        return 0.0 if off is None or abs(off) < NOISE_S else off

    def note(self) -> str | None:
        """``clock not synchronized (off by ~3 d)`` while the clock is not trusted, else None."""
        if self.trusted():
            return None
        off = self.offset_s()
        if off is None or abs(off) < NOISE_S:
            return "clock not synchronized"
        return f"clock not synchronized (off by {describe_offset(off)})"

    def now(self) -> float:
        """Best true time now, epoch seconds."""
        return self.wall() + self.correction_s()

    def now_utc(self) -> datetime:
        """``now()`` as an aware UTC datetime (last_upload, status times)."""
        return datetime.fromtimestamp(self.now(), UTC)

    def stamp(self) -> Stamp:
        """Stamp a reading being sampled now."""
        return Stamp(wall=self.wall(), mono=self.monotonic(), boot=self.boot_id, synced=self.trusted())

    # ---------------------------------------------------------------- correction

    def true_time(self, stamp: Stamp) -> tuple[float, Quality]:
        """A stamp's true time and its ``time_quality``.

        Sampled trusted: its wall time (unless two answers since prove the wall clock was over a
        minute off then too). Untrusted: shifted onto this boot's anchors. Another boot: as it
        was, ``synced`` or ``unsynced`` — this boot's monotonic clock says nothing about it.
        """
        fallback: Quality = "synced" if stamp.synced else "unsynced"
        if stamp.boot != self.boot_id:
            return stamp.wall, fallback
        base = self._base()
        if base is None:
            return stamp.wall, fallback
        true = base + stamp.mono
        diff = true - stamp.wall
        if stamp.synced:
            if abs(diff) > OVERRIDE_S and self._outweighed():
                return true, "corrected"
            return stamp.wall, "synced"
        return (stamp.wall if abs(diff) < NOISE_S else true), "corrected"

    def label(self, readings: Iterable[tuple[int, dict[str, Any], Stamp | None]]) -> None:
        """Set ``time`` and ``time_quality`` of each (seq, reading, stamp) in place, ascending seq.

        A sensor's readings never go backwards in time within a boot: a reading is never labelled
        earlier than one of its sensor with a smaller seq (where a synced reading meets a
        corrected one, the two witnesses may disagree by a second). A reading labelled before
        (a retried batch) gets the same time again, unless its quality has changed since.
        """
        with self._lock:
            for seq, reading, stamp in readings:
                if stamp is None:
                    # Queued by an agent that did not stamp readings: its wall time, best effort.
                    reading.setdefault("time_quality", "unsynced")
                    continue
                t, quality = self.true_time(stamp)
                given = self._given.get(seq)
                if given is not None and given[1] == quality:
                    t = given[0]
                else:
                    key = (stamp.boot, str(reading.get("sensor", "")))
                    floor = self._floors.get(key)
                    if floor is not None and seq > floor[0] and t < floor[1]:
                        t = floor[1]
                    if floor is None or seq > floor[0]:
                        self._floors[key] = (seq, t)
                    self._given.put(seq, t, quality)
                reading["time"] = iso_epoch(t)
                reading["time_quality"] = quality

    # ---------------------------------------------------------------- status

    def status(self) -> Mapping[str, Any]:
        """``clock``, the correction and the note, for AgentState. The correction is taken
        against the system clock (``time.time()``, what ``datetime.now`` reads), so the snapshot's
        ``true_now()`` is right whatever wall clock this object was given."""
        self._log_change()
        return {"clock": self.quality(), "clock_offset_s": round(self.now() - time.time(), 1),
                "clock_note": self.note()}

    # ---------------------------------------------------------------- internals

    def _base(self) -> float | None:
        # Called without the lock by the public readers too: a deque snapshot is enough.
        anchors = list(self._anchors)
        if not anchors:
            return None
        return _median([a.base for a in anchors[-5:]])

    def _outweighed(self) -> bool:
        anchors = list(self._anchors)
        if len(anchors) < 2:
            return False
        a, b = anchors[-2], anchors[-1]
        return (abs(a.offset_s) > OVERRIDE_S and abs(b.offset_s) > OVERRIDE_S
                and abs(a.base - b.base) < AGREE_S)

    def _log_change(self) -> None:
        note = self.note()
        if note != self._logged:
            self._logged = note
            off = self.offset_s()
            if note is None:
                log.info("clock: synchronized")
            elif off is not None and abs(off) < NOISE_S:
                # The kernel has no sync, but the servers agree: nothing a person must do yet.
                log.info("%s by the kernel, but within %.0f s of the servers' Date headers", note, NOISE_S)
            else:
                how = ("reading times are corrected from the servers' Date headers"
                       if off is not None else "no server time seen yet")
                log.warning("%s; %s", note, how)


class Labels:
    """The labels given, by seq: the newest ``keep`` at least, at most a quarter more.

    At 2,000 readings a second the clock meets 20,000 seqs in ten seconds; a dict of tuples of
    floats costs ~230 bytes a label (~4.5 MiB), these three flat arrays sorted by seq 17 (~0.4
    MiB). Seqs mostly come in ascending (the outbox hands out the oldest first), so a new label
    is an append; a lower seq (a row held back, then claimed) is inserted in its place. The
    lowest seqs go first when the arrays are full: they are the oldest labels, long delivered.
    Not thread-safe (``ClockTrust`` holds its lock).
    """

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._seqs = array("q")
        self._times = array("d")
        self._qualities = bytearray()     # index into QUALITIES

    def __len__(self) -> int:
        return len(self._seqs)

    def get(self, seq: int) -> tuple[float, Quality] | None:
        seqs = self._seqs
        if not seqs or seq > seqs[-1] or seq < seqs[0]:
            return None
        i = bisect_left(seqs, seq)
        if seqs[i] != seq:
            return None
        return self._times[i], QUALITIES[self._qualities[i]]

    def put(self, seq: int, t: float, quality: Quality) -> None:
        seqs, code = self._seqs, QUALITIES.index(quality)
        if not seqs or seq > seqs[-1]:
            seqs.append(seq)
            self._times.append(t)
            self._qualities.append(code)
        else:
            i = bisect_left(seqs, seq)
            if seqs[i] == seq:
                self._times[i] = t
                self._qualities[i] = code
            else:
                seqs.insert(i, seq)
                self._times.insert(i, t)
                self._qualities.insert(i, code)
        if len(seqs) > self.keep + self.keep // 4:
            # In one cut, not one per label: each cut moves the whole array down.
            cut = len(seqs) - self.keep
            del seqs[:cut], self._times[:cut], self._qualities[:cut]


def iso_epoch(t: float) -> str:
    """Epoch seconds as UTC ISO-8601 with milliseconds and Z (the readings' ``time``)."""
    when = datetime.fromtimestamp(t, UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def _median(values: list[float]) -> float:
    """statistics.median without importing statistics (fractions, decimal: ~5 ms at start)."""
    v = sorted(values)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2
