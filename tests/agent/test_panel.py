"""The panel: what appears on the (fake-bus) glass, and when."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import zxingcpp

from agent.panel import screens
from agent.panel.observer import Panel
from agent.state import AgentState, DeviceCode, Snapshot
from hw.fakebus import FakeI2CBus
from hw.registry import open_display
from tests.fixtures.clock import FakeClock
from tests.fixtures.hardware import lit, pixel_diff

WALL = datetime(2026, 11, 25, 14, 54, 32, tzinfo=UTC)


def make_code(now: float, user_code: str = "WDJB-MJHT", lifetime_s: float = 900) -> DeviceCode:
    return DeviceCode(user_code, "https://microsoft.com/devicelogin", now + lifetime_s, WALL, 5)


def qr_text(bus: FakeI2CBus) -> list[str]:
    return [r.text for r in zxingcpp.read_barcodes(lit(bus.image), try_invert=False)]


@pytest.fixture
def rig(fake_clock: FakeClock) -> Iterator[tuple[Panel, FakeI2CBus, AgentState]]:
    bus = FakeI2CBus("ssd1306")
    display = open_display("ssd1306", bus=bus)
    assert display is not None
    state = AgentState()
    panel = Panel(display, state, sleep_after_s=300, clock=fake_clock, shift_every_s=60).start(thread=False)
    yield panel, bus, state
    display.close()


def test_starting_screen_first(rig: tuple[Panel, FakeI2CBus, AgentState]) -> None:
    panel, bus, _ = rig
    panel.step()
    assert pixel_diff(bus.image, screens.render_starting(Snapshot())) is None


@pytest.fixture
def graced(fake_clock: FakeClock) -> Iterator[tuple[Panel, FakeI2CBus, AgentState]]:
    """The service's panel: the starting screen waits 0.5 s for a code (or a sign-in)."""
    bus = FakeI2CBus("ssd1306")
    display = open_display("ssd1306", bus=bus)
    assert display is not None
    state = AgentState()
    panel = Panel(display, state, sleep_after_s=300, clock=fake_clock, shift_every_s=60,
                  starting_after_s=0.5).start(thread=False)
    yield panel, bus, state
    display.close()


def test_a_code_within_the_grace_is_the_first_frame(graced: tuple[Panel, FakeI2CBus, AgentState],
                                                    fake_clock: FakeClock) -> None:
    panel, bus, state = graced
    delay = panel.step()
    assert panel.frames_shown == 0 and 0.45 <= delay <= 0.5     # asks to be served at the grace's end
    state.update(phase="signing_in")
    fake_clock.advance(0.2)
    panel.step()
    assert panel.frames_shown == 0
    state.code_issued(make_code(fake_clock()))
    panel.step()
    assert panel.frames_shown == 1 and qr_text(bus) == ["https://microsoft.com/devicelogin"]


def test_without_news_the_starting_screen_comes_at_the_graces_end(
        graced: tuple[Panel, FakeI2CBus, AgentState], fake_clock: FakeClock) -> None:
    panel, bus, state = graced
    state.update(phase="signing_in")            # asking an IdP that does not answer
    panel.step()
    fake_clock.advance(0.49)
    panel.step()
    assert panel.frames_shown == 0
    fake_clock.advance(0.01)
    panel.step()
    assert panel.frames_shown == 1
    assert pixel_diff(bus.image, screens.render_starting(Snapshot(phase="signing_in"))) is None


def test_a_restored_sign_in_within_the_grace_draws_the_status_first(
        graced: tuple[Panel, FakeI2CBus, AgentState], fake_clock: FakeClock) -> None:
    panel, bus, state = graced
    panel.step()
    fake_clock.advance(0.1)
    state.signed_in("ada@contoso.example")
    panel.step()
    assert panel.frames_shown == 1
    assert pixel_diff(bus.image, screens.render(state.snapshot, fake_clock())) is None


def test_code_shows_then_clears(rig: tuple[Panel, FakeI2CBus, AgentState], fake_clock: FakeClock) -> None:
    panel, bus, state = rig
    panel.step()
    state.code_issued(make_code(fake_clock()))
    panel.step()
    assert qr_text(bus) == ["https://microsoft.com/devicelogin"]
    state.code_cleared()
    panel.step()
    assert qr_text(bus) == []
    assert pixel_diff(bus.image, screens.render_starting(Snapshot(phase="signing_in"))) is None


def test_pages_alternate_and_countdown_ticks(rig: tuple[Panel, FakeI2CBus, AgentState],
                                            fake_clock: FakeClock) -> None:
    panel, bus, state = rig
    state.code_issued(make_code(fake_clock()))
    delay = panel.step()
    assert delay <= 1.01                          # redraw at least once a second for the countdown
    first = bus.image
    fake_clock.advance(1.0)
    panel.step()
    assert pixel_diff(bus.image, first) is not None and qr_text(bus)     # time moved, still QR page
    fake_clock.advance(screens.PAGE_S)
    panel.step()
    assert qr_text(bus) == []                     # URL text page
    fake_clock.advance(screens.PAGE_S)
    panel.step()
    assert qr_text(bus) == ["https://microsoft.com/devicelogin"]


def test_blank_after_idle_and_wake(rig: tuple[Panel, FakeI2CBus, AgentState], fake_clock: FakeClock) -> None:
    panel, bus, state = rig
    state.signed_in("pi@example.org")
    panel.step()
    assert bus.display_on
    fake_clock.advance(299)
    state.update(outbox=state.snapshot.outbox.__class__(pending=5))   # counts changing is not activity
    panel.step()
    assert bus.display_on
    fake_clock.advance(2)
    panel.step()
    assert not bus.display_on and panel.asleep
    panel.wake()
    panel.step()
    assert bus.display_on and bus.image.getbbox() is not None


def test_never_blank_while_a_code_shows(rig: tuple[Panel, FakeI2CBus, AgentState],
                                        fake_clock: FakeClock) -> None:
    panel, bus, state = rig
    state.code_issued(make_code(fake_clock(), lifetime_s=3600))
    for _ in range(20):
        fake_clock.advance(60)
        panel.step()
    assert bus.display_on and not panel.asleep
    assert bus.image.getbbox() is not None


def test_new_code_wakes_a_sleeping_panel(rig: tuple[Panel, FakeI2CBus, AgentState],
                                         fake_clock: FakeClock) -> None:
    panel, bus, state = rig
    state.signed_in("pi@example.org")
    panel.step()
    fake_clock.advance(400)
    panel.step()
    assert not bus.display_on
    state.code_issued(make_code(fake_clock()))
    panel.step()
    assert bus.display_on and qr_text(bus) == ["https://microsoft.com/devicelogin"]


def test_status_screen_shifts_against_burn_in(rig: tuple[Panel, FakeI2CBus, AgentState],
                                              fake_clock: FakeClock) -> None:
    panel, bus, state = rig
    state.signed_in("pi@example.org")
    panel.step()
    before = bus.image.getbbox()
    fake_clock.advance(60)
    panel.wake()
    panel.step()
    after = bus.image.getbbox()
    assert before is not None and after is not None and after != before


def test_stop_leaves_stopped_or_blank(fake_clock: FakeClock) -> None:
    for final in ("stopped", "blank"):
        bus = FakeI2CBus("sh1106")
        display = open_display("sh1106", bus=bus)
        assert display is not None
        state = AgentState()
        panel = Panel(display, state, clock=fake_clock).start()
        t0 = time.monotonic()
        panel.stop(final=final)   # type: ignore[arg-type]
        assert time.monotonic() - t0 < 1.0
        if final == "blank":
            assert not bus.display_on
        else:
            assert bus.display_on and pixel_diff(bus.image, screens.render_stopped()) is None
        display.close()


def test_display_failure_is_survived(rig: tuple[Panel, FakeI2CBus, AgentState], fake_clock: FakeClock,
                                     caplog: pytest.LogCaptureFixture) -> None:
    panel, bus, state = rig
    bus.unplug()
    panel.step()
    fake_clock.advance(1)
    panel.step()
    assert [r.message.startswith("display: no display answers at 0x3C on /dev/i2c-1: check wiring and "
                                 "`i2cdetect -y 1`") for r in caplog.records].count(True) == 1
    bus.plug()
    state.code_issued(make_code(fake_clock()))
    panel.step()
    assert qr_text(bus) == ["https://microsoft.com/devicelogin"]


def test_code_reaches_the_glass_within_100ms() -> None:
    """Real threads, real clock: state.code_issued -> rebuilt frame with the code's QR."""
    bus = FakeI2CBus("ssd1306")
    display = open_display("ssd1306", bus=bus)
    assert display is not None
    state = AgentState()
    panel = Panel(display, state).start()
    try:
        assert panel.warmed_up.wait(2)                 # starting screen up, fonts loaded
        frames_before = bus.frames
        done = threading.Event()
        t0 = time.monotonic()
        state.code_issued(make_code(time.monotonic()))
        while time.monotonic() - t0 < 1.0:
            if bus.frames > frames_before and qr_text(bus):
                done.set()
                break
            time.sleep(0.002)
        elapsed = time.monotonic() - t0
        assert done.is_set(), "code never reached the panel"
        assert elapsed < 0.1, f"code took {elapsed * 1000:.0f} ms to reach the panel"
    finally:
        panel.stop()
        display.close()


def test_an_idle_status_screen_sleeps_until_what_it_shows_changes(
        rig: tuple[Panel, FakeI2CBus, AgentState], fake_clock: FakeClock) -> None:
    """No ticking: the panel's next wake is the next change on the glass (the age of the oldest
    queued reading turning a minute, here before the burn-in shift), and at that wake the
    frame does change."""
    from agent.state import OutboxCounts

    panel, bus, state = rig
    panel.shift_every_s = 3600.0
    state.update(phase="signed_in", account="pi@example.org", outbox=OutboxCounts(pending=3),
                 oldest_pending_mono=fake_clock() - 61.0)
    delay = panel.step()
    assert 58.9 < delay < 59.1                 # "queued 3 (1 min)" becomes "(2 min)" then
    before = bus.image
    fake_clock.advance(delay)
    panel.step()
    assert pixel_diff(bus.image, before) is not None
