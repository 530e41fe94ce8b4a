"""Bosch BME280 (temperature, pressure, humidity) on I2C through smbus2.

Compensation is the floating-point version from the BME280 datasheet (BST-BME280-DS002, §8.1);
with the datasheet's example trimming it gives 25.08 °C and 1006.53 hPa.
"""

from __future__ import annotations

import errno
import struct
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hw.base import Gpio, Measurement, Option
from hw.errors import HardwareError, HardwareUnavailable

CHIP_ID = 0x60
BMP280_IDS = (0x56, 0x57, 0x58)
REG_ID, REG_CTRL_HUM, REG_STATUS, REG_CTRL_MEAS, REG_DATA = 0xD0, 0xF2, 0xF3, 0xF4, 0xF7
SKIPPED_TP = 0x80000          # what T/P read when their measurement is switched off
SKIPPED_H = 0x8000
DEFAULT_ADDRESS, DEFAULT_PORT = 0x76, 1     # SDO to GND; /dev/i2c-1 on the 40-pin header
# The readings' names: the sampler reports each as "<sensor name>.<quantity>" (config checks
# that no other sensor's name is one of them).
QUANTITIES = ("temperature", "pressure", "humidity")
OPTIONS = {"address": Option("integer", DEFAULT_ADDRESS, minimum=0x03, maximum=0x77),
           "port": Option("integer", DEFAULT_PORT, minimum=0, maximum=255)}


@dataclass(frozen=True)
class Trim:
    T1: int
    T2: int
    T3: int
    P1: int
    P2: int
    P3: int
    P4: int
    P5: int
    P6: int
    P7: int
    P8: int
    P9: int
    H1: int
    H2: int
    H3: int
    H4: int
    H5: int
    H6: int

    @classmethod
    def parse(cls, tp: bytes, h1: int, h: bytes) -> Trim:
        """From registers 0x88..0x9F (24 bytes), 0xA1, 0xE1..0xE7 (7 bytes)."""
        t_p = struct.unpack("<HhhHhhhhhhhh", tp)
        h2 = struct.unpack("<h", h[0:2])[0]
        h3 = h[2]
        h4 = (_s8(h[3]) << 4) | (h[4] & 0x0F)
        h5 = (_s8(h[5]) << 4) | (h[4] >> 4)
        h6 = _s8(h[6])
        (t1, t2, t3, p1, p2, p3, p4, p5, p6, p7, p8, p9) = t_p
        return cls(t1, t2, t3, p1, p2, p3, p4, p5, p6, p7, p8, p9, h1, h2, h3, h4, h5, h6)


def _s8(b: int) -> int:
    return b - 256 if b > 127 else b


def compensate(trim: Trim, adc_t: int, adc_p: int, adc_h: int) -> tuple[float, float, float]:
    """Datasheet double-precision formulas → (°C, hPa, %RH)."""
    t = trim
    var1 = (adc_t / 16384.0 - t.T1 / 1024.0) * t.T2
    var2 = (adc_t / 131072.0 - t.T1 / 8192.0) ** 2 * t.T3
    t_fine = int(var1 + var2)
    temp_c = (var1 + var2) / 5120.0

    var1 = t_fine / 2.0 - 64000.0
    var2 = var1 * var1 * t.P6 / 32768.0
    var2 = var2 + var1 * t.P5 * 2.0
    var2 = var2 / 4.0 + t.P4 * 65536.0
    var1 = (t.P3 * var1 * var1 / 524288.0 + t.P2 * var1) / 524288.0
    var1 = (1.0 + var1 / 32768.0) * t.P1
    if var1 == 0:
        raise HardwareError("BME280 pressure compensation divides by zero (bad trimming data)")
    p = 1048576.0 - adc_p
    p = (p - var2 / 4096.0) * 6250.0 / var1
    var1 = t.P9 * p * p / 2147483648.0
    var2 = p * t.P8 / 32768.0
    pressure_pa = p + (var1 + var2 + t.P7) / 16.0

    h = t_fine - 76800.0
    h = (adc_h - (t.H4 * 64.0 + t.H5 / 16384.0 * h)) * (
        t.H2 / 65536.0 * (1.0 + t.H6 / 67108864.0 * h * (1.0 + t.H3 / 67108864.0 * h)))
    h = h * (1.0 - t.H1 * h / 524288.0)
    humidity = min(100.0, max(0.0, h))
    return temp_c, pressure_pa / 100.0, humidity


class Bme280:
    """One forced-mode conversion per ``read`` (x1 oversampling: ~10 ms, lowest self-heating)."""

    kind = "bme280"

    def __init__(self, *, address: int = DEFAULT_ADDRESS, port: int = DEFAULT_PORT, bus: Any = None,
                 sleep: Any = time.sleep) -> None:
        self.address, self.port = address, port
        self._sleep = sleep
        self._lock = threading.Lock()
        self._own_bus = bus is None
        self._bus = bus if bus is not None else _open_smbus(port)
        try:
            chip = self._bus.read_byte_data(address, REG_ID)
            if chip in BMP280_IDS:
                raise HardwareUnavailable(f"0x{address:02X} on /dev/i2c-{port} is a BMP280 (no humidity),"
                                          " not a BME280")
            if chip != CHIP_ID:
                raise HardwareUnavailable(f"0x{address:02X} on /dev/i2c-{port} has chip id 0x{chip:02X}, "
                                          f"not a BME280 (0x60)")
            tp = bytes(self._bus.read_i2c_block_data(address, 0x88, 24))
            h1 = self._bus.read_byte_data(address, 0xA1)
            h = bytes(self._bus.read_i2c_block_data(address, 0xE1, 7))
        except OSError as err:
            self.close()
            raise HardwareUnavailable(_no_answer(address, port, err)) from err
        except HardwareError:
            self.close()
            raise
        self.trim = Trim.parse(tp, h1, h)

    def read(self) -> list[Measurement]:
        """Raises HardwareError when the sensor stops answering or reports a skipped value."""
        with self._lock:
            try:
                # ctrl_hum only takes effect after a write to ctrl_meas (datasheet §5.4.3).
                self._bus.write_byte_data(self.address, REG_CTRL_HUM, 0x01)
                self._bus.write_byte_data(self.address, REG_CTRL_MEAS, 0b001_001_01)
                deadline = time.monotonic() + 0.1
                while self._bus.read_byte_data(self.address, REG_STATUS) & 0x08:
                    if time.monotonic() > deadline:
                        raise HardwareError("BME280 conversion did not finish within 100 ms")
                    self._sleep(0.002)
                d = self._bus.read_i2c_block_data(self.address, REG_DATA, 8)
            except OSError as err:
                raise HardwareError(_no_answer(self.address, self.port, err)) from err
        adc_p = (d[0] << 12) | (d[1] << 4) | (d[2] >> 4)
        adc_t = (d[3] << 12) | (d[4] << 4) | (d[5] >> 4)
        adc_h = (d[6] << 8) | d[7]
        if adc_t == SKIPPED_TP or adc_p == SKIPPED_TP or adc_h == SKIPPED_H:
            raise HardwareError("BME280 returned a skipped measurement (reset during conversion?)")
        temp_c, hpa, rh = compensate(self.trim, adc_t, adc_p, adc_h)
        temperature, pressure, humidity = QUANTITIES
        return [Measurement(round(temp_c, 2), "°C", temperature),
                Measurement(round(hpa, 2), "hPa", pressure),
                Measurement(round(rh, 2), "%", humidity)]

    def close(self) -> None:
        if self._own_bus and self._bus is not None:
            try:
                self._bus.close()
            except OSError:
                pass


def _no_answer(address: int, port: int, err: OSError) -> str:
    if err.errno in (errno.EREMOTEIO, errno.EIO, errno.ENXIO):
        return (f"no BME280 answers at 0x{address:02X} on /dev/i2c-{port}: check wiring and "
                f"`i2cdetect -y {port}` (0x76 or 0x77)")
    return f"BME280 at 0x{address:02X} on /dev/i2c-{port}: {err.strerror or err}"


def _open_smbus(port: int) -> Any:
    try:
        import smbus2
    except ImportError as err:
        raise HardwareUnavailable("bme280 needs smbus2: pip install smbus2") from err
    try:
        return smbus2.SMBus(port)
    except FileNotFoundError as err:
        raise HardwareUnavailable(f"/dev/i2c-{port} not found; enable I2C "
                                  "(raspi-config nonint do_i2c 0)") from err
    except PermissionError as err:
        raise HardwareUnavailable(f"/dev/i2c-{port}: permission denied; add the service user to "
                                  "group 'i2c'") from err


def open_sensor(options: Mapping[str, Any], gpio: Gpio | None) -> Bme280:
    return Bme280(address=int(options["address"]), port=int(options["port"]), bus=options.get("bus"))
