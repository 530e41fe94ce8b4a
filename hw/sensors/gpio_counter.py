"""Pulses counted on a GPIO input (falling edges: open-collector meters, reed switches)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from hw.base import Gpio, Measurement, Option
from hw.errors import HardwareError

USES_GPIO = True
OPTIONS = {"pin": Option("integer", minimum=0, maximum=53, required="BCM pin number")}


class GpioCounter:
    """``read`` returns the pulses seen since the previous read (so: pulses per interval)."""

    kind = "gpio_counter"

    def __init__(self, gpio: Gpio, pin: int, *, bounce_ms: int = 5, pull: str = "up") -> None:
        self._gpio, self.pin = gpio, pin
        self._lock = threading.Lock()
        self._count = 0
        gpio.setup_input(pin, pull="up" if pull == "up" else "down", on_edge=self._edge,
                         edge="falling", bounce_ms=bounce_ms)

    def _edge(self, pin: int, level: bool) -> None:
        with self._lock:
            self._count += 1

    def read(self) -> list[Measurement]:
        with self._lock:
            count, self._count = self._count, 0
        return [Measurement(float(count), "pulses")]

    def close(self) -> None:
        """The pin is released with the Gpio backend (it owns cleanup)."""


def open_sensor(options: Mapping[str, Any], gpio: Gpio | None) -> GpioCounter:
    pin = options.get("pin")
    if gpio is None:
        raise HardwareError("gpio_counter needs a GPIO backend ([gpio] backend)")
    if not isinstance(pin, int):
        raise HardwareError("gpio_counter needs `pin` (BCM number)")
    return GpioCounter(gpio, pin)
