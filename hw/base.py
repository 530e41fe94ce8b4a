"""The small protocols the agent programs against. Real backends and fakes both implement them.

Also the option tables backends declare (``Option``, ``DisplayOptions``): config validation reads
names, types, bounds and defaults from here, so each is written once. Cheap to import (no PIL at
run time): the config loader imports it on every start.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from hw.records import record

if TYPE_CHECKING:
    from PIL import Image

Pull = Literal["up", "down", "off"]
Edge = Literal["rising", "falling", "both"]


@runtime_checkable
class Gpio(Protocol):
    """Digital pins, BCM numbering. Implemented by RpiGpio and FakeGpio."""

    def setup_input(self, pin: int, *, pull: Pull = "up",
                    on_edge: Callable[[int, bool], None] | None = None,
                    edge: Edge = "both", bounce_ms: int = 0) -> None: ...
    def setup_output(self, pin: int, *, initial: bool = False) -> None: ...
    def read(self, pin: int) -> bool: ...
    def write(self, pin: int, value: bool) -> None: ...
    def close(self) -> None: ...


@runtime_checkable
class Display(Protocol):
    """A panel that shows a PIL image of exactly ``size`` in ``mode`` ("1" for OLEDs)."""

    size: tuple[int, int]
    mode: str

    def show(self, image: Image.Image) -> None: ...
    def power(self, on: bool) -> None: ...
    def close(self) -> None: ...


@record
class Measurement:
    """One value read from a sensor, in ``unit``.

    ``quantity`` is empty for single-value sensors; multi-value ones (BME280) name each value
    ("temperature", "humidity", "pressure") and the sampler reports it as ``<sensor>.<quantity>``.
    """

    value: float
    unit: str
    quantity: str = ""


@runtime_checkable
class Sensor(Protocol):
    """Something that can be read. ``read`` raises HardwareError when it cannot."""

    kind: str

    def read(self) -> list[Measurement]: ...
    def close(self) -> None: ...


@record
class Option:
    """One key a sensor type accepts in its ``[[sensors]]`` table (a module's ``OPTIONS``).

    ``default`` None means "optional, no value". A non-empty ``required`` makes the key mandatory
    and non-empty, and is the hint the config error gives ("required for type T (hint)").
    """

    kind: Literal["string", "integer", "number"]
    default: str | int | float | None = None
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    required: str = ""


@record
class DisplayOptions:
    """How a display is wired: the ``[display]`` keys the drivers read (each uses some)."""

    interface: str = "i2c"       # ssd1306/sh1106: "i2c" | "spi"
    port: int = 1                # /dev/i2c-N or SPI bus N
    address: int = 0x3C          # I2C address
    rotate: int = 0              # quarter turns
    contrast: int = 255
    path: str = "/run/device-agent/screen.png"   # png: the file written
