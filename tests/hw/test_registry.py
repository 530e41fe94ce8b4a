"""Backends load only when selected and fail with one actionable line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hw.errors import HardwareError, HardwareUnavailable
from hw.fake import FakeGpio
from hw.registry import open_display, open_gpio


def test_importing_the_registry_loads_no_backend() -> None:
    code = ("import sys, hw.registry; "
            "print(sorted(m for m in sys.modules if m.startswith(('luma', 'RPi', 'smbus2', 'hw.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['hw.base', 'hw.errors', 'hw.lazymodule', 'hw.records', 'hw.registry']"


def test_fake_gpio_by_name() -> None:
    gpio = open_gpio("fake")
    assert isinstance(gpio, FakeGpio)
    gpio.close()


def test_unknown_names() -> None:
    with pytest.raises(HardwareError, match="unknown gpio backend 'pigpio'"):
        open_gpio("pigpio")
    with pytest.raises(HardwareError, match="unknown display driver 'ili9341'"):
        open_display("ili9341")


def test_rpi_backend_off_a_pi_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "RPi", None)
    monkeypatch.setitem(sys.modules, "RPi.GPIO", None)
    with pytest.raises(HardwareUnavailable, match=r"pip install 'device-agent\[pi\]'") as info:
        open_gpio("rpi")
    assert "\n" not in str(info.value)


def test_missing_luma_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "hw.oled", raising=False)
    monkeypatch.setitem(sys.modules, "luma.oled.device", None)
    with pytest.raises(HardwareUnavailable, match="pip install luma.oled"):
        open_display("ssd1306")


def test_missing_i2c_device_node() -> None:
    with pytest.raises(HardwareUnavailable, match=r"/dev/i2c-9 not found; enable I2C"):
        open_display("ssd1306", port=9)
