"""Sensors -> outbox, each sensor on its own interval, in every sign-in state.

Schedule: monotonic, slot k of a sensor is due at ``start + k * interval`` (computed, not
accumulated, so there is no drift). A tick that runs late still keeps the grid; after a stall
longer than an interval the missed slots are skipped (logged), not caught up in a burst.

One ``outbox.put`` per tick holds every reading due at that tick: one SQLite transaction, one
fsync, however many sensors fire together.

A failed read (HardwareError or any other exception, or a non-finite value) queues nothing:
the readings sent keep docs/INTERFACE.md's shape (``value`` is always a number) so a strict receiver
never rejects a whole batch because one sensor broke. The failure is counted per sensor
(``errors``), shown in ``state.last_reading`` (``LastReading.error``) and logged at WARNING when
a sensor starts failing and at INFO when it recovers. The gap in the sensor's readings is the
far side's signal.

A failed ``outbox.put`` (disk full, read-only filesystem, I/O error, side-file write error) loses
that tick's readings: there is nowhere else to keep them (while storage is full or read-only the
outbox refuses at once, see agent/telemetry/storage.py). They are counted as dropped
(``Outbox.count_lost``, so ``state.outbox.dropped`` as seen by status/MQTT/screen includes them),
logged once with the exception at ERROR, then at most once a minute as a one-line summary, and
at INFO when ``put`` works again.

Reading times are wall-clock UTC (``agent.state.iso``) — the only use of wall time here. With a
``ClockTrust`` (agent/clock.py) each reading is also stamped with its monotonic time, boot id
and the clock's trust, so the outbox can correct its time before upload.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from agent.clock import iso_epoch
from agent.net.retry import OutageLog
from agent.state import LastReading, iso
from agent.telemetry.storage import StorageUnavailable

if TYPE_CHECKING:
    from agent.clock import ClockTrust, Stamp
    from agent.config import SensorSettings
    from agent.state import AgentState
    from agent.telemetry.outbox import Outbox
    from hw.base import Sensor

log = logging.getLogger(__name__)

MAX_WAIT_S = 1.0          # longest single wait under an injected clock (tests)
NO_SENSOR_WAIT_S = 3600.0 # no sensors configured: nothing is ever due
STATE_EVERY_S = 1.0       # last_reading / outbox depth published at most this often


@dataclass
class _Slot:
    settings: SensorSettings
    sensor: Sensor
    start: float = 0.0
    started: bool = False
    k: int = 0
    failing: str | None = None
    skipped: int = 0
    last_reading: LastReading | None = field(default=None)

    def due(self) -> float:
        return self.start + self.k * self.settings.interval_s


class Sampler:
    """Reads sensors on schedule into the outbox. ``run(stop)`` in its own thread."""

    def __init__(self, pairs: Sequence[tuple[SensorSettings, Sensor]], outbox: Outbox, state: AgentState,
                 *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], datetime] = lambda: datetime.now(UTC),
                 trust: ClockTrust | None = None, on_queued: Callable[[], None] | None = None) -> None:
        self.slots = [_Slot(s, sensor) for s, sensor in pairs]
        self.outbox = outbox
        self.state = state
        self.clock = clock
        self.wall = wall
        self.trust = trust
        self.on_queued = on_queued        # the uploader's readings_queued: it sleeps until then
        self.heartbeat = clock()
        self.beat_due = self.heartbeat    # monotonic time by which the loop passes again
        self.errors: dict[str, int] = {s.name: 0 for s, _ in pairs}
        self.readings_queued = 0
        self.put_failures = 0
        self.readings_lost = 0            # readings whose put failed (counted as dropped too)
        self._put_lost_run = 0            # lost since put started failing
        # outbox.put failing goes on (disk full): the one journal rule, agent.net.retry.OutageLog
        self._put_outage = OutageLog(log, level=logging.ERROR, clock=clock)
        self._sensor_outages = {s.settings.name: OutageLog(log, clock=clock) for s in self.slots}
        self._last_state = -math.inf
        self._latest: LastReading | None = None

    def run(self, stop: threading.Event) -> None:
        """Sample until ``stop`` is set."""
        log.info("sampler started: %s", ", ".join(f"{s.settings.name} every {s.settings.interval_s:g} s"
                                                   for s in self.slots) or "no sensors")
        while not stop.is_set():
            next_due = self.tick()
            self.heartbeat = self.clock()
            # Asleep until the next reading is due (stop wakes the wait): the watchdog reads
            # ``beat_due``, so a long interval is not mistaken for a stuck sensor.
            self.beat_due = next_due
            wait = max(0.0, next_due - self.clock())
            if self.clock is not time.monotonic:
                wait = min(wait, MAX_WAIT_S)        # an injected clock moves without waking us
            stop.wait(wait)
        log.info("sampler stopped")

    def tick(self) -> float:
        """Read every sensor that is due, queue them in one transaction. Returns the next due time."""
        now = self.clock()
        readings: list[dict[str, Any]] = []
        stamps: list[Stamp | None] = []
        queued = False
        for slot in self.slots:
            if not slot.started:
                slot.start, slot.started = now, True
            if slot.due() > now:
                continue
            readings.extend(self._read(slot, stamps))
            slot.k += 1
            if slot.due() <= now:
                # Stalled for more than an interval: jump to the next slot in the future.
                interval = slot.settings.interval_s
                k_next = math.floor((now - slot.start) / interval) + 1
                missed = k_next - slot.k
                slot.skipped += missed
                slot.k = k_next
                log.warning("sampler: %s skipped %d missed readings after a %.1f s stall",
                            slot.settings.name, missed, (missed + 1) * interval)
        if readings:
            try:
                if self.trust is not None:
                    self.outbox.put(readings, stamps)
                else:
                    self.outbox.put(readings)
            except Exception as err:  # disk full, I/O error...: never kill the sampler
                self._put_failed(err, len(readings))
            else:
                self.readings_queued += len(readings)
                queued = True
                self._put_outage.ended(f"sampler: queuing readings again; {self._put_lost_run} "
                                       "readings were lost")
        self._publish(now)
        if queued and self.on_queued is not None:
            # Last, so the uploader it wakes does not wait for this thread's GIL.
            self.on_queued()
        return min((s.due() for s in self.slots), default=now + NO_SENSOR_WAIT_S)

    def _put_failed(self, err: Exception, n: int) -> None:
        """Count the lost readings where status shows them; log without flooding the journal."""
        self.put_failures += 1
        self.readings_lost += n
        self._put_lost_run = n if not self._put_outage.ongoing else self._put_lost_run + n
        self.outbox.count_lost(n)
        # Storage full / read-only is a state (status "storage"), not a bug: no traceback. A
        # bug's traceback comes with the outage's first line only.
        expected = isinstance(err, StorageUnavailable)
        self._put_outage.failed(
            f"sampler: could not queue readings, they are lost (counted as dropped): "
            f"{type(err).__name__}: {err}"[:300],
            f"{self._put_lost_run} readings lost so far", exc_info=not expected)
        self._last_state = -math.inf          # show the new dropped count at once

    def _read(self, slot: _Slot, stamps: list[Stamp | None]) -> list[dict[str, Any]]:
        name = slot.settings.name
        try:
            measurements = slot.sensor.read()
            for m in measurements:
                if not isinstance(m.value, int | float) or not math.isfinite(m.value):
                    raise ValueError(f"non-finite value {m.value!r}")
        except Exception as err:  # HardwareError or a driver bug: never kill the sampler
            self.errors[name] = self.errors.get(name, 0) + 1
            text = f"{type(err).__name__}: {err}"[:200]
            self._sensor_outages[name].failed(f"sensor {name}: read failed: {text}", "no reading queued")
            slot.failing = text
            self._latest = LastReading(sensor=name, value=None, unit="", error=text)
            return []
        if slot.failing is not None:
            self._sensor_outages[name].ended(f"sensor {name}: reading again after {slot.failing}")
            slot.failing = None
        stamp = self.trust.stamp() if self.trust is not None else None
        when = iso(self.wall()) if stamp is None else iso_epoch(stamp.wall)
        out = []
        for m in measurements:
            sensor = f"{name}.{m.quantity}" if m.quantity else name
            value = float(m.value)
            log.debug("reading %s = %s %s", sensor, value, m.unit)
            out.append({"sensor": sensor, "type": slot.settings.type, "value": value,
                        "unit": m.unit, "time": when})
            self._latest = LastReading(sensor=sensor, value=value, unit=m.unit)
            stamps.append(stamp)
        return out

    def _publish(self, now: float) -> None:
        if now - self._last_state < STATE_EVERY_S or self._latest is None:
            return
        self._last_state = now
        self.state.update(last_reading=self._latest, outbox=self.outbox.counts())
