"""SSD1306 / SH1106 OLED panels through luma.oled, on I2C or SPI.

Only hw.registry imports this module, and only when such a driver is configured, so a box
without luma (or a laptop) never pays for it.
"""

from __future__ import annotations

import errno
import logging
import threading
from typing import Any

import luma.core.error
from luma.core.interface.serial import i2c, spi
from luma.oled.device import sh1106, ssd1306
from PIL import Image

from hw import handles
from hw.base import DisplayOptions
from hw.errors import HardwareError, HardwareUnavailable

log = logging.getLogger(__name__)

DRIVERS = {"ssd1306": ssd1306, "sh1106": sh1106}


def _no_answer(address: int, port: int) -> str:
    return (f"no display answers at 0x{address:02X} on /dev/i2c-{port}: "
            f"check wiring and `i2cdetect -y {port}`")


class OledDisplay:
    """A luma device behind the small ``hw.base.Display`` protocol.

    luma registers an atexit hook that blanks the panel (``device.cleanup``). We set
    ``persist = True`` so whatever the agent chose to leave on the panel at stop ("stopped" or
    blank, see agent.panel.observer) stays; blanking is done explicitly through ``power(False)``.
    """

    mode = "1"

    def __init__(self, device: Any, *, address: int = 0x3C, port: int = 1) -> None:
        self._device = device
        self._device.persist = True
        self._address = address
        self._port = port
        self._lock = threading.Lock()
        self._closed = False
        self.size: tuple[int, int] = (int(device.width), int(device.height))
        handles.register(self, f"{type(device).__name__} display at 0x{address:02X} on bus {port}")

    def show(self, image: Image.Image) -> None:
        """Send ``image`` (``size``, mode "1") to the panel. Raises HardwareError on bus failure."""
        if image.size != self.size or image.mode != self.mode:
            raise HardwareError(f"display wants a {self.size} mode {self.mode!r} image, "
                                f"got {image.size} mode {image.mode!r}")
        with self._lock:
            self._check_open()
            self._io(self._device.display, image)

    def power(self, on: bool) -> None:
        """Panel on (0xAF) or off (0xAE, RAM kept: the same picture returns on wake)."""
        with self._lock:
            self._check_open()
            self._io(self._device.show if on else self._device.hide)

    def set_contrast(self, level: int) -> None:
        with self._lock:
            self._check_open()
            self._io(self._device.contrast, max(0, min(255, int(level))))

    def close(self) -> None:
        """Release the bus; the panel keeps its last picture (persist)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            handles.release(self)
            try:
                self._device.cleanup()
            except (OSError, luma.core.error.Error) as err:
                log.debug("display cleanup failed: %s", err)

    def _check_open(self) -> None:
        if self._closed:
            raise HardwareError("display is closed")

    def _io(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except luma.core.error.DeviceNotFoundError as err:
            raise HardwareError(_no_answer(self._address, self._port)) from err
        except OSError as err:
            if err.errno in (errno.EREMOTEIO, errno.EIO, errno.ENXIO):
                raise HardwareError(_no_answer(self._address, self._port)) from err
            raise HardwareError(f"display write failed: {err}") from err


def open_oled(driver: str, *, interface: str = "i2c", port: int = 1, address: int = 0x3C,
              rotate: int = 0, contrast: int = 255, bus: Any = None,
              spi_device: int = 0, gpio_dc: int = 24, gpio_rst: int = 25) -> OledDisplay:
    """Open an SSD1306/SH1106 panel; ``bus`` injects an smbus-like object (tests: FakeI2CBus).

    Raises:
        HardwareUnavailable: no device node, no permission, or nothing answers at ``address``.
    """
    if driver not in DRIVERS:
        raise HardwareError(f"unknown OLED driver {driver!r}; expected one of {sorted(DRIVERS)}")
    if rotate not in (0, 1, 2, 3):
        raise HardwareError(f"rotate must be 0..3 quarter turns, got {rotate!r}")
    try:
        if interface == "i2c":
            serial = i2c(bus=bus, port=port, address=address)
        elif interface == "spi":
            serial = spi(port=port, device=spi_device, gpio_DC=gpio_dc, gpio_RST=gpio_rst)
        else:
            raise HardwareError(f"display interface must be 'i2c' or 'spi', got {interface!r}")
    except luma.core.error.DevicePermissionError as err:
        group = "spi" if interface == "spi" else "i2c"
        raise HardwareUnavailable(f"{_node(interface, port, spi_device)}: permission denied; "
                                  f"add the service user to group '{group}'") from err
    except luma.core.error.DeviceNotFoundError as err:
        hint = ("enable SPI (raspi-config nonint do_spi 0)" if interface == "spi"
                else "enable I2C (raspi-config nonint do_i2c 0)")
        raise HardwareUnavailable(f"{_node(interface, port, spi_device)} not found; {hint}") from err
    except PermissionError as err:
        raise HardwareUnavailable(f"{_node(interface, port, spi_device)}: permission denied; "
                                  f"add the service user to group '{interface}'") from err
    except (ImportError, RuntimeError) as err:
        # luma's spi needs RPi.GPIO for DC/RST; off a Pi it is missing or refuses to load.
        raise HardwareUnavailable(f"SPI display needs RPi.GPIO: pip install 'device-agent[pi]' "
                                  f"({err})") from err
    try:
        device = DRIVERS[driver](serial, width=128, height=64, rotate=rotate)
        device.contrast(max(0, min(255, int(contrast))))
    except luma.core.error.DeviceNotFoundError as err:
        raise HardwareUnavailable(_no_answer(address, port)) from err
    except OSError as err:
        if err.errno in (errno.EREMOTEIO, errno.EIO, errno.ENXIO):
            raise HardwareUnavailable(_no_answer(address, port)) from err
        raise HardwareError(f"display init failed: {err}") from err
    log.info("display %s on %s ready (rotate %d)", driver, _node(interface, port, spi_device), rotate)
    return OledDisplay(device, address=address, port=port)


def _node(interface: str, port: int, spi_device: int) -> str:
    return f"/dev/spidev{port}.{spi_device}" if interface == "spi" else f"/dev/i2c-{port}"


def open_display(driver: str, options: DisplayOptions, bus: Any) -> OledDisplay:
    """The registry's factory (drivers "ssd1306", "sh1106")."""
    o = options
    return open_oled(driver, interface=o.interface, port=o.port, address=o.address, rotate=o.rotate,
                     contrast=o.contrast, bus=bus)
