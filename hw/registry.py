"""Backend name -> module and factory, imported only when selected.

A missing library, device node or permission becomes ``HardwareUnavailable`` with one line that
says what to install or which group to join. Never falls back to a fake on its own.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from hw.base import Display, Gpio, Sensor
from hw.errors import HardwareError, HardwareUnavailable

log = logging.getLogger(__name__)

GPIO_BACKENDS = {"rpi": ("hw.rpi", "open_rpi"), "fake": ("hw.fake", "open_fake")}
DISPLAY_DRIVERS = ("ssd1306", "sh1106", "png", "console", "none")
SENSORS = {
    "cpu_temperature": "hw.sensors.cpu_temperature",
    "ds18b20": "hw.sensors.ds18b20",
    "bme280": "hw.sensors.bme280",
    "gpio_counter": "hw.sensors.gpio_counter",
    "simulated": "hw.sensors.simulated",
}
# Which pip/apt package provides a missing top-level module.
_INSTALL = {
    "luma": "pip install luma.oled",
    "PIL": "pip install pillow",
    "smbus2": "pip install smbus2",
    "RPi": "pip install 'device-agent[pi]'",
}


def _load(module_name: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ImportError as err:
        top = (err.name or "").split(".")[0]
        hint = _INSTALL.get(top, "pip install 'device-agent[pi]'")
        raise HardwareUnavailable(f"{what} needs the Python module {err.name!r}: {hint}") from err


def open_gpio(backend: str) -> Gpio:
    """The configured GPIO backend ("rpi" | "fake").

    Raises:
        HardwareError: unknown name. HardwareUnavailable: library/device/permission missing.
    """
    try:
        module_name, factory = GPIO_BACKENDS[backend]
    except KeyError:
        raise HardwareError(f"unknown gpio backend {backend!r}; expected one of "
                            f"{sorted(GPIO_BACKENDS)}") from None
    gpio: Gpio = getattr(_load(module_name, f"gpio backend {backend!r}"), factory)()
    return gpio


def open_display(driver: str, *, interface: str = "i2c", port: int = 1, address: int = 0x3C,
                 rotate: int = 0, contrast: int = 255, path: str = "/run/device-agent/screen.png",
                 bus: Any = None) -> Display | None:
    """The configured display, or None for driver "none".

    ``bus`` injects an smbus-like object for ssd1306/sh1106 on I2C (tests: hw.fakebus.FakeI2CBus).

    Raises:
        HardwareError: unknown driver. HardwareUnavailable: library/device/permission missing.
    """
    if driver == "none":
        return None
    if driver in ("ssd1306", "sh1106"):
        oled = _load("hw.oled", f"display driver {driver!r}")
        display: Display = oled.open_oled(driver, interface=interface, port=port, address=address,
                                          rotate=rotate, contrast=contrast, bus=bus)
        return display
    if driver == "png":
        return _load("hw.png", "display driver 'png'").open_png(path)  # type: ignore[no-any-return]
    if driver == "console":
        return _load("hw.console", "display driver 'console'").open_console()  # type: ignore[no-any-return]
    raise HardwareError(f"unknown display driver {driver!r}; expected one of {', '.join(DISPLAY_DRIVERS)}")


def open_sensor(kind: str, options: Mapping[str, Any], gpio: Gpio | None) -> Sensor:
    """A sensor of ``kind`` configured by ``options`` (the [[sensors]] table's keys).

    Raises:
        HardwareError: unknown kind or bad options. HardwareUnavailable: device/library missing.
    """
    try:
        module_name = SENSORS[kind]
    except KeyError:
        raise HardwareError(f"unknown sensor type {kind!r}; expected one of {sorted(SENSORS)}") from None
    sensor: Sensor = _load(module_name, f"sensor {kind!r}").open_sensor(options, gpio)
    return sensor
