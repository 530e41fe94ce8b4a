"""The local faults follow the same journal rule as the network paths (agent.net.retry.OutageLog):
a display that stops answering, a panel step that keeps crashing, a status file that cannot be
written, a component thread that keeps crashing. One line when it starts, at most one every
10 min with a count, one when it ends.
Fake I2C bus and a real filesystem; a fake monotonic clock makes an hour pass in a second."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.net.retry import REPEAT_WARNING_S
from agent.panel import screens
from agent.panel.observer import Panel
from agent.service import Supervised
from agent.state import AgentState
from agent.statusfile import StatusWriter
from hw.fakebus import FakeI2CBus
from hw.registry import open_display
from tests.fixtures.clock import FakeClock

HOUR_S = 3600.0


def lines(caplog: pytest.LogCaptureFixture, logger: str, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == logger and r.levelno == level]


def assert_counted(records: list[logging.LogRecord], start: str) -> None:
    messages = [r.getMessage() for r in records]
    assert len(messages) == HOUR_S // REPEAT_WARNING_S, messages     # at 0, 10, 20, 30, 40, 50 min
    assert messages[0].startswith(start) and "repeats are counted and reported every 10 min" in messages[0]
    assert all(m.startswith(start) and re.search(r"still failing: \d+ failed attempts in the last 10 min", m)
               for m in messages[1:]), messages


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def panel_rig(clock: FakeClock) -> Iterator[tuple[Panel, FakeI2CBus, AgentState]]:
    bus = FakeI2CBus("sh1106")
    display = open_display("sh1106", bus=bus)
    assert display is not None
    state = AgentState()
    yield Panel(display, state, sleep_after_s=0, clock=clock).start(thread=False), bus, state
    display.close()


def test_an_unplugged_display_for_an_hour_is_six_warnings_and_one_line_when_it_answers(
        caplog: pytest.LogCaptureFixture, clock: FakeClock,
        panel_rig: tuple[Panel, FakeI2CBus, AgentState]) -> None:
    caplog.set_level(logging.DEBUG, logger="agent.panel.observer")
    panel, bus, state = panel_rig
    bus.unplug()
    for i in range(int(HOUR_S)):                 # a try every second (the panel's retry)
        state.update(error=f"e{i}")              # something new to draw each time
        panel.step()
        clock.advance(1.0)
    warnings = lines(caplog, "agent.panel.observer", logging.WARNING)
    assert_counted(warnings, "display: no display answers at 0x3C")
    bus.plug()
    state.update(error=None)
    panel.step()
    info = [r.getMessage() for r in lines(caplog, "agent.panel.observer", logging.INFO)]
    assert info[-1] == f"display answers again (after {int(HOUR_S)} failed attempts in 60 min)"


def test_a_panel_step_that_keeps_crashing_logs_its_traceback_once_then_counts(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, clock: FakeClock,
        panel_rig: tuple[Panel, FakeI2CBus, AgentState]) -> None:
    caplog.set_level(logging.DEBUG, logger="agent.panel.observer")
    panel, _, state = panel_rig
    broken = {"on": True}
    real = screens.render

    def render(*args, **kwargs):  # type: ignore[no-untyped-def]
        if broken["on"]:
            raise ValueError("drawing bug")
        return real(*args, **kwargs)

    monkeypatch.setattr(screens, "render", render)
    for i in range(int(HOUR_S)):
        state.update(error=f"e{i}")
        clock.advance(panel._guarded_step())
    errors = lines(caplog, "agent.panel.observer", logging.ERROR)
    assert_counted(errors, "panel step failed")
    assert errors[0].exc_info is not None and "drawing bug" in str(errors[0].exc_info[1])
    assert all(r.exc_info is None for r in errors[1:]), "one traceback per streak, not one a second"
    broken["on"] = False
    state.update(error=None)
    panel._guarded_step()
    info = [r.getMessage() for r in lines(caplog, "agent.panel.observer", logging.INFO)]
    assert info[-1].startswith(f"panel steps work again (after {int(HOUR_S)} failed attempts in 60 min")


def test_a_status_file_that_cannot_be_written_for_an_hour_is_six_warnings(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, clock: FakeClock) -> None:
    caplog.set_level(logging.DEBUG, logger="agent.statusfile")
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state directory should be\n")   # ENOTDIR on every write
    state = AgentState()
    writer = StatusWriter(blocker / "status.json", state, "dev-1", clock=clock)
    for _ in range(int(HOUR_S)):                 # a rewrite a second (the writer's rate limit)
        writer.write(state.snapshot)
        clock.advance(1.0)
    warnings = lines(caplog, "agent.statusfile", logging.WARNING)
    assert_counted(warnings, f"cannot write {blocker / 'status.json'}: ")
    blocker.unlink()
    blocker.mkdir()
    writer.write(state.snapshot)
    assert (blocker / "status.json").exists()
    info = [r.getMessage() for r in lines(caplog, "agent.statusfile", logging.INFO)]
    assert info[-1] == f"writing {blocker / 'status.json'} again (after {int(HOUR_S)} failed attempts in 60 min)"


def test_a_component_crashing_for_an_hour_logs_its_traceback_once_then_counts(
        caplog: pytest.LogCaptureFixture, clock: FakeClock) -> None:
    caplog.set_level(logging.DEBUG, logger="agent.service")
    stop = threading.Event()
    healthy_for = {"s": 0.0}

    def component(ev: threading.Event) -> None:
        clock.advance(healthy_for["s"])
        raise RuntimeError("driver bug")

    sup = Supervised("sampler", component, stop, clock=clock)
    sup.start()
    end = clock.now + HOUR_S
    while clock.now < end:                        # the supervisor's loop, in fake time
        assert sup.thread is not None
        sup.thread.join(2)
        clock.now = max(clock.now, sup.restart_at)
        sup.check(clock.now)
    sup.thread.join(2)
    errors = lines(caplog, "agent.service", logging.ERROR)
    assert sup.crashes >= 60, "restarted about once a minute (the back-off's cap)"
    messages = [r.getMessage() for r in errors]
    assert 5 <= len(messages) <= HOUR_S // REPEAT_WARNING_S, messages   # restarts ~1 min apart
    assert messages[0] == ("sampler crashed: RuntimeError: driver bug; restarting in 1 s (repeats are "
                           "counted and reported every 10 min)")
    assert all(re.search(r"still failing: \d+ failed attempts in the last 1\d min", m) for m in messages[1:])
    assert errors[0].exc_info is not None and all(r.exc_info is None for r in errors[1:])
    healthy_for["s"] = 900.0                      # restarted, ran 15 min, then a new crash
    clock.now = max(clock.now, sup.restart_at)
    sup.check(clock.now)
    sup.thread.join(2)
    info = [r.getMessage() for r in lines(caplog, "agent.service", logging.INFO)]
    assert info[-1].startswith("sampler ran 900 s before crashing again (after ")
    last = lines(caplog, "agent.service", logging.ERROR)[-1]
    assert last.exc_info is not None and "repeats are counted" in last.getMessage(), "a new streak"
    assert sup.restart_at - clock.now <= 1.2, "and a fresh back-off"
