"""One suite for every GPIO backend: FakeGpio, the real RpiGpio over a fake RPi.GPIO module, and
the real RpiGpio on a Pi (DEVICE_AGENT_TEST_HW=1, with a jumper wire between the two pins).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from hw.base import Gpio
from hw.errors import HardwareError, HardwareUnavailable
from hw.fake import FakeGpio, FakePinBank, FakeRpiGpioModule
from hw.rpi import RpiGpio
from tests.fixtures.clock import FakeClock
from tests.fixtures.hardware import ON_PI

IN_PIN = int(os.environ.get("DEVICE_AGENT_TEST_IN_PIN", "17"))     # on a Pi: wired to OUT_PIN
OUT_PIN = int(os.environ.get("DEVICE_AGENT_TEST_OUT_PIN", "27"))


@dataclass
class Rig:
    gpio: Gpio
    press: Callable[[], None]       # pull IN_PIN low from outside
    release: Callable[[], None]
    advance: Callable[[float], None]
    outside_level: Callable[[int], bool]


def _fake_rig(gpio: Gpio, bank: FakePinBank, clock: FakeClock) -> Rig:
    return Rig(gpio, lambda: bank.press(IN_PIN), lambda: bank.release(IN_PIN), clock.advance,
               bank.level)


@pytest.fixture(params=["fake", "rpi-on-fake-module",
                        pytest.param("rpi", marks=pytest.mark.skipif(not ON_PI, reason="needs a Pi"))])
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    clock = FakeClock()
    bank = FakePinBank(clock=clock)
    if request.param == "fake":
        gpio: Gpio = FakeGpio(bank)
        r = _fake_rig(gpio, bank, clock)
    elif request.param == "rpi-on-fake-module":
        gpio = RpiGpio(FakeRpiGpioModule(bank))
        r = _fake_rig(gpio, bank, clock)
    else:
        gpio = RpiGpio()
        driver = RpiGpio()          # a second user of the bus drives the jumper wire
        driver.setup_output(OUT_PIN, initial=True)

        def outside(pin: int) -> bool:
            return gpio.read(pin)

        r = Rig(gpio, lambda: driver.write(OUT_PIN, False), lambda: driver.write(OUT_PIN, True),
                time.sleep, outside)
    yield r
    gpio.close()


def test_input_pull_up_reads_high_until_pressed(rig: Rig) -> None:
    rig.gpio.setup_input(IN_PIN, pull="up")
    assert rig.gpio.read(IN_PIN) is True
    rig.press()
    assert rig.gpio.read(IN_PIN) is False
    rig.release()
    assert rig.gpio.read(IN_PIN) is True


def test_output_initial_and_write(rig: Rig) -> None:
    if ON_PI and not isinstance(rig.gpio, FakeGpio):
        pytest.skip("the Pi rig's OUT_PIN belongs to the jumper driver")
    rig.gpio.setup_output(OUT_PIN, initial=True)
    assert rig.outside_level(OUT_PIN) is True
    rig.gpio.write(OUT_PIN, False)
    assert rig.outside_level(OUT_PIN) is False


def test_write_to_input_raises(rig: Rig) -> None:
    rig.gpio.setup_input(IN_PIN)
    with pytest.raises(HardwareError):
        rig.gpio.write(IN_PIN, True)


def test_read_of_unconfigured_pin_raises(rig: Rig) -> None:
    with pytest.raises(HardwareError, match="not set up"):
        rig.gpio.read(5)


def test_edges_reach_the_callback_with_the_level(rig: Rig) -> None:
    seen: list[tuple[int, bool]] = []
    got = threading.Event()

    def on_edge(pin: int, level: bool) -> None:
        seen.append((pin, level))
        got.set()

    rig.gpio.setup_input(IN_PIN, pull="up", on_edge=on_edge, edge="both")
    rig.press()
    assert got.wait(1.0)
    got.clear()
    rig.advance(0.1)
    rig.release()
    assert got.wait(1.0)
    assert seen == [(IN_PIN, False), (IN_PIN, True)]


def test_falling_only(rig: Rig) -> None:
    seen: list[bool] = []
    rig.gpio.setup_input(IN_PIN, on_edge=lambda p, level: seen.append(level), edge="falling")
    for _ in range(3):
        rig.press()
        rig.advance(0.05)
        rig.release()
        rig.advance(0.05)
    rig.advance(0.1)
    assert seen == [False, False, False]


def test_bounce_time_drops_chatter(rig: Rig) -> None:
    seen: list[bool] = []
    rig.gpio.setup_input(IN_PIN, on_edge=lambda p, level: seen.append(level), edge="falling",
                         bounce_ms=50)
    rig.press()
    for _ in range(4):            # contact chatter 2 ms apart
        rig.advance(0.002)
        rig.release()
        rig.advance(0.002)
        rig.press()
    rig.advance(0.2)
    rig.release()
    rig.advance(0.2)
    rig.press()                   # a real second press, well after the bounce window
    rig.advance(0.1)
    assert seen == [False, False]


def test_close_releases_only_our_pins(rig: Rig) -> None:
    if not isinstance(rig.gpio, FakeGpio) and ON_PI:
        pytest.skip("checked on fakes: the pin bank shows who owns what")
    rig.gpio.setup_input(IN_PIN)
    rig.gpio.close()
    with pytest.raises(HardwareError, match="closed"):
        rig.gpio.read(IN_PIN)
    rig.gpio.close()              # idempotent


def test_close_leaves_other_users_pins_alone() -> None:
    bank = FakePinBank()
    module = FakeRpiGpioModule(bank)
    module.setmode(module.BCM)
    module.setup(22, module.OUT, initial=module.HIGH)     # someone else's pin (e.g. a fan)
    ours = RpiGpio(module)
    ours.setup_output(OUT_PIN)
    ours.close()
    assert bank.mode(22) == "out" and bank.level(22) is True
    assert bank.mode(OUT_PIN) is None


def test_fake_gpio_records_writes_with_time(fake_gpio: FakeGpio, fake_clock: FakeClock) -> None:
    fake_gpio.setup_output(OUT_PIN)
    fake_clock.advance(1.5)
    fake_gpio.write(OUT_PIN, True)
    assert [(w.at, w.value) for w in fake_gpio.history(OUT_PIN)] == [(1000.0, False), (1001.5, True)]


def test_fake_module_pwm() -> None:
    bank = FakePinBank()
    module = FakeRpiGpioModule(bank)
    module.setmode(module.BCM)
    module.setup(OUT_PIN, module.OUT)
    pwm = module.PWM(OUT_PIN, 1000)
    pwm.start(25)
    assert bank.duty(OUT_PIN) == 25.0
    pwm.stop()
    assert bank.duty(OUT_PIN) is None


def test_fake_module_matches_rpi_gpio_errors() -> None:
    module = FakeRpiGpioModule()
    with pytest.raises(RuntimeError, match="setmode"):
        module.setup(4, module.IN)
    module.setmode(module.BCM)
    with pytest.raises(RuntimeError, match="setup"):
        module.input(4)
    module.setup(4, module.IN, pull_up_down=module.PUD_UP)
    module.add_event_detect(4, module.FALLING)
    with pytest.raises(RuntimeError, match="Conflicting edge detection"):
        module.add_event_detect(4, module.FALLING)


def test_missing_rpi_gpio_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "RPi", None)        # import RPi -> ImportError
    monkeypatch.setitem(sys.modules, "RPi.GPIO", None)
    with pytest.raises(HardwareUnavailable, match=r"pip install 'device-agent\[pi\]'"):
        RpiGpio()
