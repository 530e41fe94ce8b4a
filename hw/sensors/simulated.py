"""A deterministic waveform from monotonic time, for demos and tests without sensors."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from hw.base import Gpio, Measurement, Option
from hw.errors import HardwareError

WAVEFORMS = ("sine", "square", "sawtooth", "constant", "ramp")
OPTIONS = {"waveform": Option("string", "sine", choices=WAVEFORMS),
           "period_s": Option("number", 60.0, minimum=0.001),
           "amplitude": Option("number", 5.0),
           "offset": Option("number", 20.0),
           "unit": Option("string", "°C")}


class Simulated:
    kind = "simulated"

    def __init__(self, *, waveform: str, period_s: float, amplitude: float, offset: float, unit: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if waveform not in WAVEFORMS:
            raise HardwareError(f"waveform must be one of {', '.join(WAVEFORMS)}, got {waveform!r}")
        if period_s <= 0:
            raise HardwareError(f"period_s must be > 0, got {period_s!r}")
        self.waveform, self.period_s = waveform, float(period_s)
        self.amplitude, self.offset, self.unit = float(amplitude), float(offset), unit
        self._clock = clock
        self._t0 = clock()

    def value_at(self, t_s: float) -> float:
        """The value ``t_s`` seconds after the sensor was opened."""
        phase = (t_s / self.period_s) % 1.0
        a, o = self.amplitude, self.offset
        if self.waveform == "sine":
            v = o + a * math.sin(2 * math.pi * phase)
        elif self.waveform == "square":
            v = o + (a if phase < 0.5 else -a)
        elif self.waveform == "sawtooth":
            v = o + a * (2 * phase - 1)
        elif self.waveform == "ramp":
            v = o + a * (t_s / self.period_s)
        else:
            v = o
        return round(v, 6)

    def read(self) -> list[Measurement]:
        return [Measurement(self.value_at(self._clock() - self._t0), self.unit)]

    def close(self) -> None:
        """Nothing to release."""


def open_sensor(options: Mapping[str, Any], gpio: Gpio | None) -> Simulated:
    kwargs: dict[str, Any] = {key: options[key] for key in OPTIONS}
    if options.get("clock") is not None:
        kwargs["clock"] = options["clock"]      # tests: a fake clock
    return Simulated(**kwargs)
