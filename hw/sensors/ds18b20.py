"""DS18B20 1-wire thermometer through the kernel's w1_therm driver (sysfs ``w1_slave``).

The file has two lines: the scratchpad with "crc=xx YES|NO", then the same bytes and "t=<milli°C>".
85000 is the value the chip holds after power-on before any conversion: almost always a wiring
or power problem, never a real 85 °C, so it is reported as an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hw.base import Gpio, Measurement, Option
from hw.errors import HardwareError, HardwareUnavailable

W1_DEVICES = "/sys/bus/w1/devices"
POWER_ON_RESET_MILLIDEG = 85000
# Config requires `device` (the class can pick the only one present, config does not guess).
OPTIONS = {"device": Option("string", "", required="e.g. '28-0316a2793fff'"),
           "path": Option("string", W1_DEVICES)}


class Ds18b20:
    kind = "ds18b20"

    def __init__(self, device: str = "", base: str | Path = W1_DEVICES) -> None:
        self.base = Path(base)
        self.device = device or self._only_device()
        self.path = self.base / self.device / "w1_slave"

    def _only_device(self) -> str:
        found = sorted(p.name for p in self.base.glob("28-*"))
        if len(found) == 1:
            return found[0]
        if not found:
            raise HardwareUnavailable(f"no DS18B20 under {self.base}: enable 1-wire "
                                      "(dtoverlay=w1-gpio in config.txt) and check wiring")
        raise HardwareError(f"several DS18B20 under {self.base} ({', '.join(found)}): set `device`")

    def read(self) -> list[Measurement]:
        """Raises HardwareError on a missing file, CRC failure, or the 85 °C power-on value."""
        try:
            lines = self.path.read_text().splitlines()
        except OSError as err:
            raise HardwareError(f"{self.path}: {err.strerror or err} (sensor unplugged?)") from err
        if len(lines) < 2 or "crc=" not in lines[0]:
            raise HardwareError(f"{self.path}: unexpected content")
        if not lines[0].rstrip().endswith("YES"):
            raise HardwareError(f"{self.device}: CRC check failed (noisy 1-wire line?)")
        _, sep, value = lines[1].rpartition("t=")
        if not sep:
            raise HardwareError(f"{self.path}: no t= value")
        try:
            millideg = int(value.strip())
        except ValueError:
            raise HardwareError(f"{self.path}: bad t= value {value.strip()[:12]!r}") from None
        if millideg == POWER_ON_RESET_MILLIDEG:
            raise HardwareError(f"{self.device}: read the 85 °C power-on value; check the sensor's "
                                "power and pull-up")
        return [Measurement(millideg / 1000.0, "°C")]

    def close(self) -> None:
        """Nothing held open."""


def open_sensor(options: Mapping[str, Any], gpio: Gpio | None) -> Ds18b20:
    return Ds18b20(str(options["device"]), str(options["path"]))
