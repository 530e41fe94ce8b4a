"""Backend name -> module and factory, imported only when selected. The one list of names.

Config validation reads the names (and each sensor type's options) from here, so a new backend
is one module plus one line in a table below. A missing library, device node or permission
becomes ``HardwareUnavailable`` with one line that says what to install or which group to join.
Never falls back to a fake on its own. Importing this module loads no backend.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from hw.base import Display, DisplayOptions, Gpio, Option, Sensor
from hw.errors import HardwareError, HardwareUnavailable

log = logging.getLogger(__name__)

# name -> (module, factory). Factories: gpio ``f()``; display ``f(driver, DisplayOptions, bus)``.
GPIO_BACKENDS = {"rpi": ("hw.rpi", "open_rpi"), "fake": ("hw.fake", "open_fake")}
DISPLAYS = {
    "ssd1306": ("hw.oled", "open_display"),
    "sh1106": ("hw.oled", "open_display"),
    "png": ("hw.png", "open_display"),
    "console": ("hw.console", "open_display"),
}
NO_DISPLAY = "none"
DISPLAY_DRIVERS = (*DISPLAYS, NO_DISPLAY)
# type -> module with OPTIONS and open_sensor(options, gpio) (see hw/sensors/__init__.py).
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


def open_display(driver: str, options: DisplayOptions | None = None, *, bus: Any = None,
                 **overrides: Any) -> Display | None:
    """The configured display, or None for driver "none".

    ``options`` (or ``DisplayOptions()``) with ``overrides`` (its field names) applied. ``bus``
    injects an smbus-like object for ssd1306/sh1106 on I2C (tests: hw.fakebus.FakeI2CBus).

    Raises:
        HardwareError: unknown driver. HardwareUnavailable: library/device/permission missing.
    """
    if driver == NO_DISPLAY:
        return None
    try:
        module_name, factory = DISPLAYS[driver]
    except KeyError:
        raise HardwareError(f"unknown display driver {driver!r}; expected one of "
                            f"{', '.join(DISPLAY_DRIVERS)}") from None
    opts = dataclasses.replace(options or DisplayOptions(), **overrides)
    display: Display = getattr(_load(module_name, f"display driver {driver!r}"), factory)(driver, opts, bus)
    return display


def _sensor_module(kind: str) -> ModuleType:
    try:
        module_name = SENSORS[kind]
    except KeyError:
        raise HardwareError(f"unknown sensor type {kind!r}; expected one of {sorted(SENSORS)}") from None
    return _load(module_name, f"sensor {kind!r}")


def sensor_options(kind: str) -> Mapping[str, Option]:
    """The keys sensor type ``kind`` accepts besides name/type/interval_s (imports its module only).

    Raises:
        HardwareError: unknown kind.
    """
    options: Mapping[str, Option] = _sensor_module(kind).OPTIONS
    return options


def sensor_quantities(kind: str) -> tuple[str, ...]:
    """The quantities a multi-value sensor type reports (its readings are ``<name>.<quantity>``);
    empty for a single-value type, whose one reading is ``<name>``."""
    return tuple(getattr(_sensor_module(kind), "QUANTITIES", ()))


def sensor_uses_gpio(kind: str) -> bool:
    """Whether sensor type ``kind`` needs a GPIO backend opened for it."""
    return bool(getattr(_sensor_module(kind), "USES_GPIO", False))


def open_sensor(kind: str, options: Mapping[str, Any], gpio: Gpio | None) -> Sensor:
    """A sensor of ``kind`` configured by ``options`` (the [[sensors]] table's keys).

    Options left out get the module's declared defaults.

    Raises:
        HardwareError: unknown kind or bad options. HardwareUnavailable: device/library missing.
    """
    module = _sensor_module(kind)
    declared: Mapping[str, Option] = module.OPTIONS
    full = {**{k: o.default for k, o in declared.items() if o.default is not None}, **options}
    sensor: Sensor = module.open_sensor(full, gpio)
    return sensor
