"""CPU temperature from the kernel's thermal zone (millidegrees Celsius in a sysfs file)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hw.base import Gpio, Measurement, Option
from hw.errors import HardwareError

DEFAULT_PATH = "/sys/class/thermal/thermal_zone0/temp"
OPTIONS = {"path": Option("string", DEFAULT_PATH)}


class CpuTemperature:
    kind = "cpu_temperature"

    def __init__(self, path: str | Path = DEFAULT_PATH) -> None:
        self.path = Path(path)

    def read(self) -> list[Measurement]:
        """Raises HardwareError when the file is missing or does not hold an integer."""
        try:
            text = self.path.read_text().strip()
        except OSError as err:
            raise HardwareError(f"{self.path}: {err.strerror or err}") from err
        try:
            millideg = int(text)
        except ValueError:
            raise HardwareError(f"{self.path}: expected millidegrees, got {text[:20]!r}") from None
        return [Measurement(round(millideg / 1000.0, 3), "°C")]

    def close(self) -> None:
        """Nothing held open: the file is reopened on every read (sysfs regenerates it)."""


def open_sensor(options: Mapping[str, Any], gpio: Gpio | None) -> CpuTemperature:
    return CpuTemperature(str(options["path"]))
