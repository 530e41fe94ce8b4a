"""The observers' one thread (agent/observerloop.py): what a person acts on is served at once, a
burst of figures (a reading, its upload, the health ages) is served once, a failing step does not
stop the others, and stop returns. Real threads and the real components where they matter (the
status file, the panel on the png display)."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.observerloop import ObserverLoop
from agent.panel.observer import Panel
from agent.state import AgentState, DeviceCode, LastReading, OutboxCounts
from agent.statusfile import StatusWriter
from hw.png import PngDisplay
from tests.fixtures.waiting import wait_for

SOON_S = 2.0


@pytest.fixture
def state() -> AgentState:
    return AgentState()


@pytest.fixture
def loop(state: AgentState) -> Iterator[ObserverLoop]:
    lp = ObserverLoop(state, settle_s=0.3)
    yield lp
    lp.stop()


def counting(calls: list[float]) -> Callable[[], float]:
    def step() -> float:
        calls.append(time.monotonic())
        return float("inf")
    return step


def test_a_burst_of_figures_is_served_once_and_a_code_at_once(loop: ObserverLoop, state: AgentState) -> None:
    calls: list[float] = []
    loop.add("count", counting(calls))
    loop.start()
    wait_for(lambda: calls, SOON_S, "the first pass")
    calls.clear()
    # A reading, its upload, the health figures after each: four changes within a few ms.
    state.update(last_reading=LastReading("t", 21.5, "°C"), outbox=OutboxCounts(pending=1))
    state.update(oldest_pending_mono=time.monotonic())
    state.update(outbox=OutboxCounts(pending=0), last_upload=datetime.now(UTC))
    state.update(oldest_pending_mono=None)
    wait_for(lambda: calls, SOON_S, "the burst served")
    time.sleep(0.5)
    assert len(calls) == 1, f"{len(calls)} passes for one burst of figures"

    calls.clear()
    t0 = time.monotonic()
    state.code_issued(DeviceCode("ABCD-EFGH", "https://login.example/device", time.monotonic() + 900,
                                 datetime.now(UTC), 5.0))
    wait_for(lambda: calls, SOON_S, "a code served")
    assert calls[0] - t0 < 0.3, "a code is not held back like the figures"


def test_a_step_that_raises_is_retried_and_the_others_still_run(loop: ObserverLoop, state: AgentState) -> None:
    good: list[float] = []
    bad: list[int] = []

    def broken() -> float:
        bad.append(1)
        raise RuntimeError("a drawing bug")

    loop.add("broken", broken)
    loop.add("good", counting(good))
    loop.start()
    wait_for(lambda: len(bad) >= 2, 3 * SOON_S, "the broken step tried again")
    state.update(notice="hello")
    wait_for(lambda: len(good) >= 2, SOON_S, "the other step served the change")


def test_stop_ends_the_thread_at_once(loop: ObserverLoop) -> None:
    loop.add("count", counting([]))
    loop.start()
    time.sleep(0.05)
    t0 = time.monotonic()
    loop.stop()
    assert loop._thread is not None and not loop._thread.is_alive()
    assert time.monotonic() - t0 < 1.0


def test_status_file_and_panel_follow_a_reading_through_the_loop(tmp_path: Path, state: AgentState,
                                                                 loop: ObserverLoop) -> None:
    """What the service wires: the status file and the panel as steps of the loop."""
    status = StatusWriter(tmp_path / "status.json", state, "dev-1", fallbacks=[])
    status.start(thread=False)
    display = PngDisplay(tmp_path / "screen.png")
    panel = Panel(display, state, sleep_after_s=0, wakeup=loop.news)
    panel.start(thread=False)
    loop.add("status file", status.serve)
    loop.add("panel", panel.serve)
    loop.start()
    try:
        state.signed_in("someone@example.com")
        wait_for(lambda: (tmp_path / "status.json").exists(), SOON_S, "status.json written")
        frames = panel.frames_shown
        state.update(last_reading=LastReading("t", 21.5, "°C"), outbox=OutboxCounts(pending=3))
        wait_for(lambda: json.loads((tmp_path / "status.json").read_text())["outbox"]["pending"] == 3,
                 SOON_S, "status.json shows the reading's outbox count")
        wait_for(lambda: panel.frames_shown > frames, SOON_S, "the panel drew the reading")
    finally:
        loop.stop()
        panel.stop()
        status.stop()
        display.close()


def test_the_panel_countdown_still_ticks_in_the_loop(tmp_path: Path, state: AgentState,
                                                     loop: ObserverLoop) -> None:
    display = PngDisplay(tmp_path / "screen.png")
    panel = Panel(display, state, sleep_after_s=0, wakeup=loop.news)
    panel.start(thread=False)
    loop.add("panel", panel.serve)
    loop.start()
    try:
        state.code_issued(DeviceCode("ABCD-EFGH", "https://login.example/device", time.monotonic() + 900,
                                     datetime.now(UTC), 5.0))
        wait_for(lambda: panel.frames_shown >= 1, SOON_S, "the code drawn")
        frames = panel.frames_shown
        wait_for(lambda: panel.frames_shown >= frames + 2, 3.5, "the countdown redrawn each second")
    finally:
        loop.stop()
        panel.stop()
        display.close()


def test_button_wake_reaches_the_loop_at_once(tmp_path: Path, state: AgentState, loop: ObserverLoop) -> None:
    calls: list[float] = []
    loop.add("count", counting(calls))
    loop.start()
    wait_for(lambda: calls, SOON_S, "first pass")
    calls.clear()
    threading.Timer(0.05, loop.news.set).start()       # what Panel.wake / a GPIO edge does
    wait_for(lambda: calls, SOON_S, "served")


def test_a_long_wait_with_slack_rides_on_another_steps_wake(loop: ObserverLoop,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The panel's burn-in shift (slack) due just before another step's timer: one wake-up for
    both, not two (scaled down: waits of 0.4 s and 0.5 s instead of a minute)."""
    from agent import observerloop

    monkeypatch.setattr(observerloop, "SLACK_FROM_S", 0.2)
    seen: dict[str, list[int]] = {"shift": [], "timer": []}

    def step(name: str, delay: float) -> Callable[[], float]:
        def run() -> float:
            seen[name].append(loop.wakes)
            return delay if len(seen[name]) == 1 else float("inf")
        return run

    loop.add("shift", step("shift", 0.4), slack=0.5)    # may be 0.2 s late
    loop.add("timer", step("timer", 0.5))
    loop.start()
    wait_for(lambda: len(seen["timer"]) >= 2, SOON_S, "the timer's wake")
    assert len(seen["shift"]) == 2 and seen["shift"][1] == seen["timer"][1], seen


def test_figures_ride_on_a_wake_already_planned(loop: ObserverLoop, state: AgentState) -> None:
    """A wake is planned (the service plans one just after each reading is due): figures that
    change before it are served by it, with no wake-up of their own to set a timer."""
    timer: list[int] = []

    def step() -> float:
        timer.append(loop.wakes)
        return 0.25 if len(timer) == 1 else float("inf")

    loop.add("timer", step)
    loop.start()
    wait_for(lambda: timer, SOON_S, "the first pass")
    wakes, passes = loop.wakes, loop.passes
    time.sleep(0.05)
    state.update(last_reading=LastReading("t", 21.5, "°C"), outbox=OutboxCounts(pending=1))
    state.update(outbox=OutboxCounts(pending=0), last_upload=datetime.now(UTC))
    wait_for(lambda: len(timer) >= 2, SOON_S, "the planned wake")
    time.sleep(0.5)                          # past the settle the figures would have had
    assert (loop.wakes - wakes, loop.passes - passes) == (1, 1)


def test_a_new_code_is_drawn_although_a_slow_observer_runs_before_the_panels(state: AgentState,
                                                                             loop: ObserverLoop) -> None:
    """The loop is told of a change before the panel is (it subscribes first); an observer in
    between that lets other threads run (the service's sd_notify) must not leave the panel
    drawing the snapshot before the change until its next pass, seconds later."""
    import zxingcpp

    from hw.fakebus import FakeI2CBus
    from hw.registry import open_display
    from tests.fixtures.hardware import lit

    bus = FakeI2CBus("ssd1306")
    display = open_display("ssd1306", bus=bus)
    assert display is not None
    loop.start()

    def slow(snap: object) -> None:
        time.sleep(0.2)          # sendto: the GIL goes to the loop's thread meanwhile
    state.subscribe(slow)
    panel = Panel(display, state, sleep_after_s=0, wakeup=loop.news)
    panel.start(thread=False)
    loop.add("panel", panel.serve)
    try:
        wait_for(lambda: panel.frames_shown >= 1, SOON_S, "the starting screen")
        time.sleep(0.1)
        done = threading.Thread(target=state.code_issued, daemon=True, args=(
            DeviceCode("ABCD-EFGH", "https://login.example/device", time.monotonic() + 900,
                       datetime.now(UTC), 5.0),))
        done.start()
        wait_for(lambda: [r.text for r in zxingcpp.read_barcodes(lit(bus.image), try_invert=False)]
                 == ["https://login.example/device"], 1.0, "the code on the glass")
    finally:
        loop.stop()
        panel.stop()
        display.close()


def test_the_panel_sleeps_on_time_although_its_step_has_slack(tmp_path: Path, state: AgentState,
                                                              loop: ObserverLoop,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """display.sleep_after_s is a configured timeout: the slack the burn-in shift gets must not
    stretch it (scaled down: sleep after 1 s, slack from 0.2 s, so 0.5x slack would be 1.5 s)."""
    from agent import observerloop

    monkeypatch.setattr(observerloop, "SLACK_FROM_S", 0.2)
    display = PngDisplay(tmp_path / "screen.png")
    panel = Panel(display, state, sleep_after_s=1.0, shift_every_s=0, wakeup=loop.news)
    panel.start(thread=False)
    loop.add("panel", panel.serve_split, slack=0.5)
    loop.start()
    try:
        wait_for(lambda: panel.frames_shown >= 1, SOON_S, "the starting screen")
        t0 = time.monotonic()
        state.signed_in("someone@example.com")
        wait_for(lambda: panel.asleep, 3, "the panel asleep")
        assert time.monotonic() - t0 < 1.3, f"slept after {time.monotonic() - t0:.2f} s, not 1 s"
    finally:
        loop.stop()
        panel.stop()
        display.close()


def test_stop_waits_for_the_step_in_progress(loop: ObserverLoop) -> None:
    """The service closes the panel and the status file after stop: no step may still run then."""
    inside = threading.Event()
    ended: list[float] = []

    def slow() -> float:
        inside.set()
        time.sleep(0.4)
        ended.append(time.monotonic())
        return 0.0
    loop.add("slow", slow)
    loop.start()
    assert inside.wait(SOON_S)
    assert loop.stop(timeout_s=2.0)
    stopped = time.monotonic()
    assert ended and ended[-1] <= stopped
    inside.clear()
    time.sleep(0.2)
    assert not inside.is_set(), "a step ran after stop"


def test_a_steps_strict_wait_takes_no_slack(loop: ObserverLoop, monkeypatch: pytest.MonkeyPatch) -> None:
    """The supervisor's restart back-off and watchdog come back as its strict wait: kept to time,
    though the step has slack for its health figures (scaled: 0.5 s, slack from 0.2 s)."""
    from agent import observerloop

    monkeypatch.setattr(observerloop, "SLACK_FROM_S", 0.2)
    runs: list[float] = []

    def supervisor() -> tuple[float, float]:
        runs.append(time.monotonic())
        return (0.5, 5.0) if len(runs) == 1 else (math.inf, math.inf)

    loop.add("supervisor", supervisor, slack=0.5)
    loop.start()
    wait_for(lambda: len(runs) >= 2, SOON_S, "the restart due")
    assert runs[1] - runs[0] < 0.65, f"{runs[1] - runs[0]:.2f} s for a 0.5 s back-off"
