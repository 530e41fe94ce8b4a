"""Fake hardware that is a real backend: `[gpio] backend = "fake"` runs the agent on a laptop.

    FakePinBank         the electrical side: pins, pulls, what a test presses, edges, bounce
    FakeGpio            hw.base.Gpio over a FakePinBank (what the agent gets with backend=fake)
    FakeRpiGpioModule   the RPi.GPIO module API over a FakePinBank, so hw.rpi.RpiGpio itself runs
                        in tests (gpiozero's MockFactory idea: fake the lowest layer only)
    FakeI2CBus          (hw.fakebus) an SSD1306/SH1106 the real luma driver writes to
    FakeBme280Bus       an smbus2-like BME280 with datasheet calibration registers
    fake_sysfs(...)     thermal zone and 1-wire trees for the sysfs sensors

Edge callbacks run synchronously in the thread that changed the level (a test calling
``press``), so tests stay deterministic; RPi.GPIO runs them on its own thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from hw import handles
from hw.base import Edge, Pull
from hw.errors import HardwareError
from hw.fakebus import FakeI2CBus

__all__ = ["FakePinBank", "FakeGpio", "FakeRpiGpioModule", "FakeI2CBus", "FakeBme280Bus",
           "fake_sysfs", "open_fake"]

Clock = Callable[[], float]
EdgeListener = Callable[[int, bool], None]


@dataclass
class _Pin:
    mode: str | None = None            # None (unclaimed) | "in" | "out"
    pull: Pull = "off"
    external: bool | None = None       # level forced from outside (button, sensor); None = open
    out_value: bool = False
    edge: Edge | None = None
    bounce_s: float = 0.0
    listener: EdgeListener | None = None
    last_edge_at: float | None = None
    owner: object | None = None
    pwm_duty: float | None = None


@dataclass(frozen=True)
class Write:
    at: float
    pin: int
    value: bool


@dataclass
class FakePinBank:
    """The board: 0..27 BCM pins. Tests drive it (``press``/``release``/``drive``) and read it."""

    clock: Clock = time.monotonic
    pins: dict[int, _Pin] = field(default_factory=lambda: {n: _Pin() for n in range(28)})
    writes: list[Write] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.RLock()

    # -- what a test does to the outside world --------------------------------------------------

    def press(self, pin: int) -> None:
        """A button between ``pin`` and ground closes."""
        self.drive(pin, False)

    def release(self, pin: int) -> None:
        """The button opens: the pull resistor decides the level again."""
        self.drive(pin, None)

    def drive(self, pin: int, level: bool | None) -> None:
        """Force ``pin`` high/low from outside, or ``None`` to let it float on its pull."""
        listener, new = None, False
        with self._lock:
            p = self._pin(pin)
            old = self._level(p)
            p.external = level
            new = self._level(p)
            if p.mode == "in" and old != new and p.listener is not None and p.edge is not None:
                wanted = p.edge == "both" or (p.edge == "rising") == new
                now = self.clock()
                # RPi.GPIO's bouncetime: edges within bounce of the last *reported* one are dropped.
                if wanted and (p.last_edge_at is None or now - p.last_edge_at >= p.bounce_s):
                    p.last_edge_at = now
                    listener = p.listener
        if listener is not None:
            listener(pin, new)

    def level(self, pin: int) -> bool:
        """The electrical level of ``pin`` now (an output's value, or input side)."""
        with self._lock:
            return self._level(self._pin(pin))

    def history(self, pin: int) -> list[Write]:
        with self._lock:
            return [w for w in self.writes if w.pin == pin]

    # -- what a driver does -----------------------------------------------------------------------

    def claim_input(self, owner: object, pin: int, pull: Pull) -> None:
        with self._lock:
            p = self._pin(pin)
            p.mode, p.pull, p.owner = "in", pull, owner
            p.listener, p.edge, p.last_edge_at = None, None, None

    def claim_output(self, owner: object, pin: int, initial: bool) -> None:
        with self._lock:
            p = self._pin(pin)
            p.mode, p.owner, p.pull = "out", owner, "off"
            p.listener, p.edge = None, None
            self._set_output(pin, p, initial)

    def set_listener(self, pin: int, listener: EdgeListener | None, edge: Edge | None,
                     bounce_s: float) -> None:
        with self._lock:
            p = self._pin(pin)
            p.listener, p.edge, p.bounce_s, p.last_edge_at = listener, edge, bounce_s, None

    def write(self, pin: int, value: bool) -> None:
        with self._lock:
            p = self._pin(pin)
            if p.mode != "out":
                raise HardwareError(f"GPIO{pin} is not set up as an output")
            self._set_output(pin, p, value)

    def set_duty(self, pin: int, duty: float | None) -> None:
        with self._lock:
            self._pin(pin).pwm_duty = duty

    def duty(self, pin: int) -> float | None:
        with self._lock:
            return self._pin(pin).pwm_duty

    def mode(self, pin: int) -> str | None:
        with self._lock:
            return self._pin(pin).mode

    def free(self, pin: int) -> None:
        with self._lock:
            p = self._pin(pin)
            p.mode, p.owner, p.listener, p.edge, p.pwm_duty = None, None, None, None, None

    def _set_output(self, pin: int, p: _Pin, value: bool) -> None:
        p.out_value = bool(value)
        self.writes.append(Write(self.clock(), pin, bool(value)))

    def _pin(self, pin: int) -> _Pin:
        try:
            return self.pins[pin]
        except KeyError:
            raise HardwareError(f"GPIO{pin}: no such pin (BCM 0..27)") from None

    @staticmethod
    def _level(p: _Pin) -> bool:
        if p.mode == "out":
            return p.out_value
        if p.external is not None:
            return p.external
        return p.pull == "up"            # a floating pin reads low here; real ones read noise


class FakeGpio:
    """``hw.base.Gpio`` on a FakePinBank; ``press``/``release``/``level``/``history`` for tests."""

    def __init__(self, bank: FakePinBank | None = None, *, clock: Clock = time.monotonic) -> None:
        self.bank = bank if bank is not None else FakePinBank(clock=clock)
        self._mine: set[int] = set()
        self._closed = False
        handles.register(self, "FakeGpio")

    def setup_input(self, pin: int, *, pull: Pull = "up",
                    on_edge: Callable[[int, bool], None] | None = None,
                    edge: Edge = "both", bounce_ms: int = 0) -> None:
        self._check_open()
        if pull not in ("up", "down", "off"):
            raise HardwareError(f"pull must be up/down/off, got {pull!r}")
        self.bank.claim_input(self, pin, pull)
        self._mine.add(pin)
        if on_edge is not None:
            self.bank.set_listener(pin, on_edge, edge, bounce_ms / 1000.0)

    def setup_output(self, pin: int, *, initial: bool = False) -> None:
        self._check_open()
        self.bank.claim_output(self, pin, initial)
        self._mine.add(pin)

    def read(self, pin: int) -> bool:
        self._check_open()
        if pin not in self._mine:
            raise HardwareError(f"GPIO{pin} is not set up; call setup_input/setup_output first")
        return self.bank.level(pin)

    def write(self, pin: int, value: bool) -> None:
        self._check_open()
        if pin not in self._mine:
            raise HardwareError(f"GPIO{pin} is not set up as an output")
        self.bank.write(pin, value)

    def close(self) -> None:
        """Free only the pins this instance set up (like RPi.GPIO.cleanup(our_pins))."""
        if self._closed:
            return
        self._closed = True
        handles.release(self)
        for pin in sorted(self._mine):
            self.bank.free(pin)
        self._mine.clear()

    @property
    def closed(self) -> bool:
        return self._closed

    # test conveniences
    def press(self, pin: int) -> None:
        self.bank.press(pin)

    def release(self, pin: int) -> None:
        self.bank.release(pin)

    def level(self, pin: int) -> bool:
        return self.bank.level(pin)

    def history(self, pin: int) -> list[Write]:
        return self.bank.history(pin)

    def _check_open(self) -> None:
        if self._closed:
            raise HardwareError("GPIO backend is closed")


def open_fake() -> FakeGpio:
    return FakeGpio()


class _FakePwm:
    def __init__(self, module: FakeRpiGpioModule, channel: int, frequency: float) -> None:
        if module._bank.mode(channel) != "out":
            raise RuntimeError("You must setup() the GPIO channel as an output first")
        self._m, self._ch, self.frequency = module, channel, frequency

    def start(self, dutycycle: float) -> None:
        self._m._bank.set_duty(self._ch, float(dutycycle))

    def ChangeDutyCycle(self, dutycycle: float) -> None:  # noqa: N802 - RPi.GPIO's name
        self._m._bank.set_duty(self._ch, float(dutycycle))

    def ChangeFrequency(self, frequency: float) -> None:  # noqa: N802
        self.frequency = frequency

    def stop(self) -> None:
        self._m._bank.set_duty(self._ch, None)


class FakeRpiGpioModule:
    """Stands in for the ``RPi.GPIO`` module (same names, values and RuntimeErrors)."""

    BOARD, BCM = 10, 11
    OUT, IN = 0, 1
    LOW, HIGH = 0, 1
    PUD_OFF, PUD_DOWN, PUD_UP = 20, 21, 22
    RISING, FALLING, BOTH = 31, 32, 33
    VERSION = "0.7.1-fake"

    def __init__(self, bank: FakePinBank | None = None) -> None:
        self._bank = bank if bank is not None else FakePinBank()
        self._mode: int | None = None
        self._setup: set[int] = set()
        self._detect: dict[int, list[Callable[[int], None]]] = {}
        self._warnings = True
        self.PWM = lambda channel, frequency: _FakePwm(self, channel, frequency)

    def setwarnings(self, flag: bool) -> None:
        self._warnings = bool(flag)

    def setmode(self, mode: int) -> None:
        if mode not in (self.BCM, self.BOARD):
            raise ValueError("An invalid mode was passed to setmode()")
        if self._mode is not None and self._mode != mode:
            raise ValueError("A different mode has already been set!")
        self._mode = mode

    def getmode(self) -> int | None:
        return self._mode

    def setup(self, channel: int | Iterable[int], direction: int, pull_up_down: int = 20,
              initial: int = -1) -> None:
        for ch in self._channels(channel):
            self._need_mode()
            if direction == self.OUT:
                if pull_up_down != self.PUD_OFF:
                    raise ValueError("pull_up_down parameter is not valid for outputs")
                self._bank.claim_output(self, ch, bool(initial) if initial != -1 else False)
            elif direction == self.IN:
                pull: Pull = {self.PUD_UP: "up", self.PUD_DOWN: "down"}.get(pull_up_down, "off")  # type: ignore[assignment]
                self._bank.claim_input(self, ch, pull)
            else:
                raise ValueError("An invalid direction was passed to setup()")
            self._setup.add(ch)

    def input(self, channel: int) -> int:
        self._need_mode()
        if channel not in self._setup:
            raise RuntimeError("You must setup() the GPIO channel first")
        return self.HIGH if self._bank.level(channel) else self.LOW

    def output(self, channel: int, value: int | bool) -> None:
        self._need_mode()
        if channel not in self._setup:
            raise RuntimeError("The GPIO channel has not been set up as an OUTPUT")
        if self._bank.mode(channel) != "out":
            raise RuntimeError("The GPIO channel has not been set up as an OUTPUT")
        self._bank.write(channel, bool(value))

    def add_event_detect(self, channel: int, edge: int, callback: Callable[[int], None] | None = None,
                         bouncetime: int | None = None) -> None:
        self._need_mode()
        if channel not in self._setup or self._bank.mode(channel) != "in":
            raise RuntimeError("You must setup() the GPIO channel as an input first")
        if channel in self._detect:
            raise RuntimeError("Conflicting edge detection already enabled for this GPIO channel")
        if edge not in (self.RISING, self.FALLING, self.BOTH):
            raise ValueError("The edge must be set to RISING, FALLING or BOTH")
        if bouncetime is not None and bouncetime <= 0:
            raise ValueError("Bouncetime must be greater than 0")
        names: dict[int, Edge] = {self.RISING: "rising", self.FALLING: "falling", self.BOTH: "both"}
        self._detect[channel] = [callback] if callback is not None else []

        def fire(pin: int, _level: bool) -> None:
            for cb in list(self._detect.get(pin, [])):
                cb(pin)

        self._bank.set_listener(channel, fire, names[edge], (bouncetime or 0) / 1000.0)

    def add_event_callback(self, channel: int, callback: Callable[[int], None]) -> None:
        if channel not in self._detect:
            raise RuntimeError("Add event detection using add_event_detect first before adding a callback")
        self._detect[channel].append(callback)

    def remove_event_detect(self, channel: int) -> None:
        self._detect.pop(channel, None)
        if channel in self._setup:
            self._bank.set_listener(channel, None, None, 0.0)

    def cleanup(self, channel: int | Iterable[int] | None = None) -> None:
        chans = set(self._setup) if channel is None else set(self._channels(channel))
        for ch in chans:
            if ch in self._setup:
                self._detect.pop(ch, None)
                self._bank.free(ch)
                self._setup.discard(ch)
        if not self._setup:
            self._mode = None

    def _need_mode(self) -> None:
        if self._mode is None:
            raise RuntimeError("Please set pin numbering mode using GPIO.setmode(GPIO.BOARD) "
                               "or GPIO.setmode(GPIO.BCM)")

    @staticmethod
    def _channels(channel: int | Iterable[int]) -> list[int]:
        return [channel] if isinstance(channel, int) else list(channel)


# -- sensors ----------------------------------------------------------------------------------------

# BME280 datasheet (BST-BME280-DS002) §8.1 example trimming values and raw ADC readings.
BME280_DATASHEET_TRIM: dict[str, int] = {
    "dig_T1": 27504, "dig_T2": 26435, "dig_T3": -1000,
    "dig_P1": 36477, "dig_P2": -10685, "dig_P3": 3024, "dig_P4": 2855, "dig_P5": 140,
    "dig_P6": -7, "dig_P7": 15500, "dig_P8": -14600, "dig_P9": 6000,
    # Humidity trimming from a real part (the datasheet gives no humidity example).
    "dig_H1": 75, "dig_H2": 362, "dig_H3": 0, "dig_H4": 313, "dig_H5": 50, "dig_H6": 30,
}
BME280_DATASHEET_ADC = {"adc_T": 519888, "adc_P": 415148, "adc_H": 30000}


class FakeBme280Bus:
    """An smbus2-like bus with a BME280 at ``address``: chip id, trimming and ADC registers.

    ``read_byte_data``/``read_i2c_block_data``/``write_byte_data`` as smbus2 has them; ``present``
    False raises OSError(EREMOTEIO) like an unplugged sensor.
    """

    def __init__(self, *, address: int = 0x76, chip_id: int = 0x60,
                 trim: dict[str, int] | None = None, adc: dict[str, int] | None = None) -> None:
        self.address = address
        self.present = True
        self.regs = bytearray(256)
        self.regs[0xD0] = chip_id
        self.writes: list[tuple[int, int]] = []
        self.set_trim(trim or BME280_DATASHEET_TRIM)
        self.set_adc(**(adc or BME280_DATASHEET_ADC))
        self.closed = False

    def set_trim(self, t: dict[str, int]) -> None:
        import struct

        self.regs[0x88:0x88 + 24] = struct.pack(
            "<HhhHhhhhhhhh", t["dig_T1"], t["dig_T2"], t["dig_T3"], t["dig_P1"], t["dig_P2"],
            t["dig_P3"], t["dig_P4"], t["dig_P5"], t["dig_P6"], t["dig_P7"], t["dig_P8"], t["dig_P9"])
        self.regs[0xA1] = t["dig_H1"] & 0xFF
        self.regs[0xE1:0xE3] = struct.pack("<h", t["dig_H2"])
        self.regs[0xE3] = t["dig_H3"] & 0xFF
        h4, h5 = t["dig_H4"], t["dig_H5"]
        self.regs[0xE4] = (h4 >> 4) & 0xFF
        self.regs[0xE5] = (h4 & 0x0F) | ((h5 & 0x0F) << 4)
        self.regs[0xE6] = (h5 >> 4) & 0xFF
        self.regs[0xE7] = t["dig_H6"] & 0xFF

    def set_adc(self, adc_T: int, adc_P: int, adc_H: int) -> None:  # noqa: N803 - datasheet names
        self.regs[0xF7] = (adc_P >> 12) & 0xFF
        self.regs[0xF8] = (adc_P >> 4) & 0xFF
        self.regs[0xF9] = (adc_P & 0x0F) << 4
        self.regs[0xFA] = (adc_T >> 12) & 0xFF
        self.regs[0xFB] = (adc_T >> 4) & 0xFF
        self.regs[0xFC] = (adc_T & 0x0F) << 4
        self.regs[0xFD] = (adc_H >> 8) & 0xFF
        self.regs[0xFE] = adc_H & 0xFF

    def _check(self, addr: int) -> None:
        import errno

        if not self.present or addr != self.address:
            raise OSError(errno.EREMOTEIO, "Remote I/O error")

    def read_byte_data(self, i2c_addr: int, register: int) -> int:
        self._check(i2c_addr)
        return int(self.regs[register])

    def read_i2c_block_data(self, i2c_addr: int, register: int, length: int) -> list[int]:
        self._check(i2c_addr)
        return list(self.regs[register:register + length])

    def write_byte_data(self, i2c_addr: int, register: int, value: int) -> None:
        self._check(i2c_addr)
        self.writes.append((register, value))
        if register == 0xF4 and value & 0x03 == 0x01:
            pass   # forced mode: the fake's ADC registers already hold a finished conversion
        if register not in (0xF7, 0xF8, 0xF9, 0xFA, 0xFB, 0xFC, 0xFD, 0xFE, 0xD0):
            self.regs[register] = value & 0xFF

    def close(self) -> None:
        self.closed = True


def fake_sysfs(root: Path, *, cpu_millideg: int | None = 47200,
               w1: dict[str, str] | None = None) -> Path:
    """Create a sysfs-like tree under ``root``: thermal_zone0/temp and 1-wire w1_slave files.

    ``w1`` maps a DS18B20 id (``28-...``) to its w1_slave text (see ``w1_slave_text``).
    """
    if cpu_millideg is not None:
        tz = root / "class" / "thermal" / "thermal_zone0"
        tz.mkdir(parents=True, exist_ok=True)
        (tz / "type").write_text("cpu-thermal\n")
        (tz / "temp").write_text(f"{cpu_millideg}\n")
    for dev, text in (w1 or {}).items():
        d = root / "bus" / "w1" / "devices" / dev
        d.mkdir(parents=True, exist_ok=True)
        (d / "w1_slave").write_text(text)
    return root


def w1_slave_text(millideg: int, *, crc_ok: bool = True) -> str:
    """What the w1_therm driver prints for a DS18B20 reading ``millideg``.

    Scratchpad bytes are built from the temperature (1/16 °C, little endian) with the real Dallas
    CRC-8, so the "crc=xx YES" line is what the kernel would print.
    """
    raw = round(millideg * 16 / 1000) & 0xFFFF
    pad = [raw & 0xFF, raw >> 8, 0x4B, 0x46, 0x7F, 0xFF, 0x0C, 0x10]
    crc = dallas_crc8(pad)
    if not crc_ok:
        crc ^= 0x5A
    hexes = " ".join(f"{b:02x}" for b in pad + [crc])
    status = "YES" if crc_ok else "NO"
    return f"{hexes} : crc={crc:02x} {status}\n{hexes} t={millideg}\n"


def dallas_crc8(data: Iterable[int]) -> int:
    crc = 0
    for byte in data:
        for _ in range(8):
            mix = (crc ^ byte) & 0x01
            crc >>= 1
            if mix:
                crc ^= 0x8C
            byte >>= 1
    return crc
