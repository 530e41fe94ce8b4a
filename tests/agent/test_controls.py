"""Button and LED on the fake pin bank with an injected clock: no sleeping."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from agent.panel import screens
from agent.panel.controls import Controls
from agent.state import AgentState, DeviceCode
from hw.fake import FakeGpio, FakePinBank, FakeRpiGpioModule
from hw.rpi import RpiGpio
from tests.fixtures.clock import FakeClock

BUTTON, LED = 17, 27


class Rig:
    def __init__(self, gpio: FakeGpio | RpiGpio, bank: FakePinBank, clock: FakeClock) -> None:
        self.bank, self.clock = bank, clock
        self.state = AgentState()
        self.events: list[str] = []
        self.controls = Controls(gpio, self.state, button_pin=BUTTON, led_pin=LED,
                                 on_short_press=lambda: self.events.append("short"),
                                 on_long_press=lambda: self.events.append("long"),
                                 clock=clock).start(thread=False)

    def run(self, seconds: float, step_s: float = 0.01) -> None:
        end = self.clock() + seconds
        while self.clock() < end - 1e-9:
            self.clock.advance(step_s)
            self.controls.step()

    def bouncy_press(self) -> None:
        self.bank.press(BUTTON)
        for _ in range(3):
            self.clock.advance(0.003)
            self.controls.step()
            self.bank.release(BUTTON)
            self.clock.advance(0.002)
            self.controls.step()
            self.bank.press(BUTTON)

    def bouncy_release(self) -> None:
        self.bank.release(BUTTON)
        for _ in range(3):
            self.clock.advance(0.002)
            self.controls.step()
            self.bank.press(BUTTON)
            self.clock.advance(0.003)
            self.controls.step()
            self.bank.release(BUTTON)


@pytest.fixture(params=["fake", "rpi-on-fake-module"])
def rig(request: pytest.FixtureRequest, fake_clock: FakeClock) -> Iterator[Rig]:
    bank = FakePinBank(clock=fake_clock)
    gpio = FakeGpio(bank) if request.param == "fake" else RpiGpio(FakeRpiGpioModule(bank))
    yield Rig(gpio, bank, fake_clock)
    gpio.close()


def code(now: float) -> DeviceCode:
    return DeviceCode("WDJB-MJHT", "https://microsoft.com/devicelogin", now + 900,
                      datetime(2026, 11, 25, tzinfo=UTC), 5)


def test_bouncy_short_press_counts_once(rig: Rig) -> None:
    rig.bouncy_press()
    rig.run(0.2)
    rig.bouncy_release()
    rig.run(0.1)
    assert rig.events == ["short"]


def test_chatter_shorter_than_debounce_is_ignored(rig: Rig) -> None:
    rig.bank.press(BUTTON)
    rig.clock.advance(0.01)
    rig.controls.step()
    rig.bank.release(BUTTON)
    rig.run(0.2)
    assert rig.events == []


def test_long_press_fires_while_still_held_with_progress(rig: Rig) -> None:
    notices: list[str | None] = []
    rig.state.subscribe(lambda s: notices.append(s.notice))
    rig.bouncy_press()
    rig.run(4.9)
    assert rig.events == []
    assert screens.is_hold_notice(rig.state.snapshot.notice)
    assert rig.state.snapshot.notice == screens.hold_notice(0.1)       # "... 1 s"
    rig.run(0.2)
    assert rig.events == ["long"]                                     # before release
    assert rig.state.snapshot.notice is None
    assert screens.hold_notice(4) in notices and screens.hold_notice(1) in notices
    rig.run(3)
    rig.bouncy_release()
    rig.run(0.2)
    assert rig.events == ["long"]                                     # release adds no short press


def test_released_early_clears_progress_and_is_a_short_press(rig: Rig) -> None:
    rig.bouncy_press()
    rig.run(2.5)
    assert screens.is_hold_notice(rig.state.snapshot.notice)
    rig.bouncy_release()
    rig.run(0.1)
    assert rig.events == ["short"] and rig.state.snapshot.notice is None


def test_led_blinks_while_code_shown_on_when_signed_in(rig: Rig) -> None:
    rig.controls.step()
    assert rig.bank.level(LED) is False
    t0 = rig.clock()
    rig.state.code_issued(code(t0))
    rig.run(2.1, step_s=0.01)
    changes = [(round(w.at - t0, 2), w.value) for w in rig.bank.history(LED)][1:]
    assert [v for _, v in changes] == [True, False, True, False, True]
    gaps = [round(b[0] - a[0], 2) for a, b in zip(changes, changes[1:], strict=False)]
    assert all(abs(g - 0.5) <= 0.011 for g in gaps), gaps
    rig.state.signed_in("pi@example.org")
    rig.run(1.0, step_s=0.05)
    assert rig.bank.level(LED) is True and rig.bank.history(LED)[-1].value is True
    rig.state.signed_out()
    rig.controls.step()
    assert rig.bank.level(LED) is False


def test_action_exception_does_not_stop_the_button(fake_clock: FakeClock) -> None:
    bank = FakePinBank(clock=fake_clock)
    state = AgentState()
    calls: list[int] = []

    def boom() -> None:
        calls.append(1)
        raise RuntimeError("auth is down")

    gpio = FakeGpio(bank)
    controls = Controls(gpio, state, button_pin=BUTTON, led_pin=None, on_short_press=boom,
                        on_long_press=boom, clock=fake_clock).start(thread=False)
    for _ in range(2):
        bank.press(BUTTON)
        for _ in range(10):
            fake_clock.advance(0.01)
            controls.step()
        bank.release(BUTTON)
        for _ in range(10):
            fake_clock.advance(0.01)
            controls.step()
    gpio.close()
    assert calls == [1, 1]


def test_thread_reacts_and_stops_within_a_second() -> None:
    bank = FakePinBank()
    state = AgentState()
    pressed: list[float] = []
    gpio = FakeGpio(bank)
    controls = Controls(gpio, state, button_pin=BUTTON, led_pin=LED,
                        on_short_press=lambda: pressed.append(time.monotonic()),
                        on_long_press=lambda: None).start()
    try:
        bank.press(BUTTON)
        time.sleep(0.08)
        bank.release(BUTTON)
        deadline = time.monotonic() + 1
        while not pressed and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pressed
        state.signed_in("x")
        deadline = time.monotonic() + 1
        while not bank.level(LED) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert bank.level(LED)
    finally:
        t0 = time.monotonic()
        controls.stop()
        assert time.monotonic() - t0 < 1.0
        gpio.close()
    assert bank.level(LED) is False


def test_a_tap_over_before_the_level_was_sampled_still_counts(rig: Rig) -> None:
    """The observer loop was busy drawing while the person tapped: the edges saw the press."""
    rig.controls.step()
    rig.bank.press(BUTTON)
    rig.clock.advance(0.12)
    rig.bank.release(BUTTON)
    rig.clock.advance(0.3)               # the first step after the tap
    rig.controls.step()
    rig.run(0.1)
    assert rig.events == ["short"]
    rig.bank.press(BUTTON)               # a glitch shorter than the debounce is still nothing
    rig.clock.advance(0.005)
    rig.bank.release(BUTTON)
    rig.clock.advance(0.3)
    rig.run(0.1)
    assert rig.events == ["short"]
