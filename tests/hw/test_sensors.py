"""Sensors against fake sysfs trees and a fake BME280 built from datasheet values."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from hw.errors import HardwareError, HardwareUnavailable
from hw.fake import (
    BME280_DATASHEET_TRIM,
    FakeBme280Bus,
    FakeGpio,
    dallas_crc8,
    fake_sysfs,
    w1_slave_text,
)
from hw.registry import open_sensor
from hw.sensors.bme280 import Bme280, Trim, compensate
from tests.fixtures.clock import FakeClock


def test_cpu_temperature_from_thermal_zone(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path, cpu_millideg=47250)
    sensor = open_sensor("cpu_temperature", {"path": str(root / "class/thermal/thermal_zone0/temp")}, None)
    [m] = sensor.read()
    assert (m.value, m.unit) == (47.25, "°C")


def test_cpu_temperature_missing_or_garbage(tmp_path: Path) -> None:
    sensor = open_sensor("cpu_temperature", {"path": str(tmp_path / "nope")}, None)
    with pytest.raises(HardwareError, match="nope"):
        sensor.read()
    (tmp_path / "bad").write_text("hot\n")
    with pytest.raises(HardwareError, match="millidegrees"):
        open_sensor("cpu_temperature", {"path": str(tmp_path / "bad")}, None).read()


def test_dallas_crc_of_datasheet_rom() -> None:
    # Maxim AN27 example ROM: family 02, serial 1C B8 01 00 00 00, CRC A2
    assert dallas_crc8([0x02, 0x1C, 0xB8, 0x01, 0x00, 0x00, 0x00]) == 0xA2


def w1_tree(tmp_path: Path, text: str, dev: str = "28-0316a279c2ff") -> Path:
    return fake_sysfs(tmp_path, cpu_millideg=None, w1={dev: text}) / "bus/w1/devices"


def test_ds18b20_reads_t_when_crc_is_yes(tmp_path: Path) -> None:
    base = w1_tree(tmp_path, w1_slave_text(21625))
    [m] = open_sensor("ds18b20", {"device": "28-0316a279c2ff", "path": str(base)}, None).read()
    assert (m.value, m.unit) == (21.625, "°C")


def test_ds18b20_finds_the_only_device(tmp_path: Path) -> None:
    base = w1_tree(tmp_path, w1_slave_text(-10125))
    [m] = open_sensor("ds18b20", {"path": str(base)}, None).read()
    assert m.value == -10.125


def test_ds18b20_crc_failure(tmp_path: Path) -> None:
    base = w1_tree(tmp_path, w1_slave_text(21625, crc_ok=False))
    with pytest.raises(HardwareError, match="CRC"):
        open_sensor("ds18b20", {"path": str(base)}, None).read()


def test_ds18b20_power_on_value_is_an_error(tmp_path: Path) -> None:
    base = w1_tree(tmp_path, w1_slave_text(85000))
    with pytest.raises(HardwareError, match="85 °C power-on"):
        open_sensor("ds18b20", {"path": str(base)}, None).read()


def test_ds18b20_absent(tmp_path: Path) -> None:
    (tmp_path / "devices").mkdir()
    with pytest.raises(HardwareUnavailable, match="w1-gpio"):
        open_sensor("ds18b20", {"path": str(tmp_path / "devices")}, None)


def test_bme280_datasheet_example() -> None:
    """Datasheet §8.1 example: adc_T 519888 -> 25.08 °C; adc_P 415148 -> 100653.27 Pa."""
    [t, p, h] = open_sensor("bme280", {"bus": FakeBme280Bus()}, None).read()
    assert (t.quantity, t.unit, t.value) == ("temperature", "°C", 25.08)
    assert (p.quantity, p.unit) == ("pressure", "hPa") and p.value == pytest.approx(1006.53, abs=0.01)
    assert (h.quantity, h.unit) == ("humidity", "%") and 0 < h.value < 100


def _humidity_integer(adc_h: int, t_fine: int, d: dict[str, int]) -> float:
    """The datasheet's 32-bit integer humidity formula, as an independent oracle."""
    v = t_fine - 76800
    v = (((((adc_h << 14) - (d["dig_H4"] << 20) - (d["dig_H5"] * v)) + 16384) >> 15)
         * (((((((v * d["dig_H6"]) >> 10) * (((v * d["dig_H3"]) >> 11) + 32768)) >> 10) + 2097152)
             * d["dig_H2"] + 8192) >> 14))
    v = v - (((((v >> 15) * (v >> 15)) >> 7) * d["dig_H1"]) >> 4)
    v = max(0, min(v, 419430400))
    return (v >> 12) / 1024.0


@pytest.mark.parametrize("adc_h", [20000, 30000, 35000])
def test_bme280_humidity_matches_integer_formula(adc_h: int) -> None:
    d = BME280_DATASHEET_TRIM
    bus = FakeBme280Bus(adc={"adc_T": 519888, "adc_P": 415148, "adc_H": adc_h})
    sensor = Bme280(bus=bus)
    [_, _, h] = sensor.read()
    assert h.value == pytest.approx(_humidity_integer(adc_h, 128422, d), abs=0.05)


def test_bme280_trim_parsing_roundtrip() -> None:
    sensor = Bme280(bus=FakeBme280Bus())
    assert sensor.trim == Trim(**{k.replace("dig_", ""): v for k, v in BME280_DATASHEET_TRIM.items()})


def test_bme280_starts_a_forced_conversion() -> None:
    bus = FakeBme280Bus()
    Bme280(bus=bus).read()
    assert bus.writes == [(0xF2, 0x01), (0xF4, 0x25)]    # ctrl_hum before ctrl_meas


def test_bme280_wrong_chip() -> None:
    with pytest.raises(HardwareUnavailable, match="BMP280"):
        Bme280(bus=FakeBme280Bus(chip_id=0x58))
    with pytest.raises(HardwareUnavailable, match="chip id 0x12"):
        Bme280(bus=FakeBme280Bus(chip_id=0x12))


def test_bme280_absent_and_unplugged() -> None:
    with pytest.raises(HardwareUnavailable,
                       match=r"no BME280 answers at 0x77 on /dev/i2c-1: check wiring and `i2cdetect -y 1`"):
        Bme280(bus=FakeBme280Bus(), address=0x77)
    bus = FakeBme280Bus()
    sensor = Bme280(bus=bus)
    bus.present = False
    with pytest.raises(HardwareError, match="no BME280 answers at 0x76"):
        sensor.read()


def test_bme280_skipped_value() -> None:
    bus = FakeBme280Bus(adc={"adc_T": 0x80000, "adc_P": 415148, "adc_H": 30000})
    with pytest.raises(HardwareError, match="skipped"):
        Bme280(bus=bus).read()


def test_compensate_is_monotonic_in_temperature() -> None:
    trim = Bme280(bus=FakeBme280Bus()).trim
    temps = [compensate(trim, adc, 415148, 30000)[0] for adc in range(500000, 540000, 5000)]
    assert temps == sorted(temps)


def test_gpio_counter_counts_falling_edges_per_interval(fake_gpio: FakeGpio, fake_clock: FakeClock) -> None:
    sensor = open_sensor("gpio_counter", {"pin": 6}, fake_gpio)
    for _ in range(7):
        fake_gpio.press(6)
        fake_clock.advance(0.02)
        fake_gpio.release(6)
        fake_clock.advance(0.02)
    [m] = sensor.read()
    assert (m.value, m.unit) == (7.0, "pulses")
    assert sensor.read()[0].value == 0.0


def test_gpio_counter_needs_gpio_and_pin(fake_gpio: FakeGpio) -> None:
    with pytest.raises(HardwareError, match="GPIO backend"):
        open_sensor("gpio_counter", {"pin": 6}, None)
    with pytest.raises(HardwareError, match="pin"):
        open_sensor("gpio_counter", {}, fake_gpio)


@pytest.mark.parametrize(("waveform", "t", "expected"), [
    ("sine", 0.0, 20.0), ("sine", 15.0, 25.0), ("sine", 45.0, 15.0),
    ("square", 10.0, 25.0), ("square", 40.0, 15.0),
    ("sawtooth", 0.0, 15.0), ("sawtooth", 30.0, 20.0),
    ("constant", 123.0, 20.0), ("ramp", 120.0, 30.0),
])
def test_simulated_waveforms(fake_clock: FakeClock, waveform: str, t: float, expected: float) -> None:
    sensor = open_sensor("simulated", {"waveform": waveform, "period_s": 60.0, "amplitude": 5.0,
                                       "offset": 20.0, "clock": fake_clock}, None)
    fake_clock.advance(t)
    [m] = sensor.read()
    assert math.isclose(m.value, expected, abs_tol=1e-6) and m.unit == "°C"


def test_simulated_rejects_unknown_waveform() -> None:
    with pytest.raises(HardwareError, match="waveform"):
        open_sensor("simulated", {"waveform": "noise"}, None)


def test_unknown_sensor_kind() -> None:
    with pytest.raises(HardwareError, match="unknown sensor type 'lidar'"):
        open_sensor("lidar", {}, None)
