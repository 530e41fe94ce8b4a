"""GPIO through the ``RPi.GPIO`` API (RPi.GPIO itself, or rpi-lgpio on a Pi 5). BCM numbering.

The module is imported when the backend is opened, not at import time: off a Pi RPi.GPIO raises
RuntimeError on import. Tests inject ``hw.fake.FakeRpiGpioModule`` so this very code runs there.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from hw.base import Edge, Pull
from hw.errors import HardwareError, HardwareUnavailable

log = logging.getLogger(__name__)


def import_rpi_gpio() -> Any:
    """Import RPi.GPIO, turning each way it fails into one actionable line.

    Raises:
        HardwareUnavailable: library missing, not a Pi, or no access to the GPIO device.
    """
    try:
        import RPi.GPIO as gpio_module  # noqa: N813 - the library's own name
    except ImportError as err:
        raise HardwareUnavailable("gpio backend 'rpi' needs RPi.GPIO: pip install 'device-agent[pi]' "
                                  "(on a Pi 5: pip install rpi-lgpio)") from err
    except RuntimeError as err:
        msg = str(err)
        if "root" in msg or "/dev/" in msg or "ermission" in msg:
            raise HardwareUnavailable(f"no access to GPIO ({msg}); add the service user to group "
                                      "'gpio'") from err
        raise HardwareUnavailable(f"RPi.GPIO refuses to load here ({msg}); use [gpio] backend = "
                                  "\"fake\" off a Raspberry Pi") from err
    return gpio_module


class RpiGpio:
    """``hw.base.Gpio`` on an RPi.GPIO-compatible module; cleans up only the pins it set up."""

    def __init__(self, gpio_module: Any = None) -> None:
        self._g = gpio_module if gpio_module is not None else import_rpi_gpio()
        self._lock = threading.Lock()
        self._mine: set[int] = set()
        self._detecting: set[int] = set()
        self._closed = False
        try:
            self._g.setwarnings(False)
            self._g.setmode(self._g.BCM)
        except (RuntimeError, ValueError) as err:
            raise HardwareUnavailable(f"cannot use GPIO in BCM mode: {err}") from err

    def setup_input(self, pin: int, *, pull: Pull = "up",
                    on_edge: Callable[[int, bool], None] | None = None,
                    edge: Edge = "both", bounce_ms: int = 0) -> None:
        g = self._g
        pud = {"up": g.PUD_UP, "down": g.PUD_DOWN, "off": g.PUD_OFF}.get(pull)
        if pud is None:
            raise HardwareError(f"pull must be up/down/off, got {pull!r}")
        edges = {"rising": g.RISING, "falling": g.FALLING, "both": g.BOTH}
        if edge not in edges:
            raise HardwareError(f"edge must be rising/falling/both, got {edge!r}")
        with self._lock:
            self._check_open()
            if pin in self._detecting:
                self._call(g.remove_event_detect, pin)
                self._detecting.discard(pin)
            self._call(g.setup, pin, g.IN, pull_up_down=pud)
            self._mine.add(pin)
            if on_edge is not None:
                def callback(channel: int) -> None:
                    # RPi.GPIO passes only the channel; read the level now (after the edge).
                    try:
                        level = bool(g.input(channel))
                    except RuntimeError:
                        return          # pin released while the callback was queued
                    on_edge(channel, level)

                kwargs: dict[str, Any] = {"callback": callback}
                if bounce_ms > 0:
                    kwargs["bouncetime"] = int(bounce_ms)
                self._call(g.add_event_detect, pin, edges[edge], **kwargs)
                self._detecting.add(pin)

    def setup_output(self, pin: int, *, initial: bool = False) -> None:
        g = self._g
        with self._lock:
            self._check_open()
            if pin in self._detecting:
                self._call(g.remove_event_detect, pin)
                self._detecting.discard(pin)
            self._call(g.setup, pin, g.OUT, initial=g.HIGH if initial else g.LOW)
            self._mine.add(pin)

    def read(self, pin: int) -> bool:
        self._check_open()
        if pin not in self._mine:
            raise HardwareError(f"GPIO{pin} is not set up; call setup_input/setup_output first")
        return bool(self._call(self._g.input, pin))

    def write(self, pin: int, value: bool) -> None:
        self._check_open()
        if pin not in self._mine:
            raise HardwareError(f"GPIO{pin} is not set up as an output")
        self._call(self._g.output, pin, self._g.HIGH if value else self._g.LOW)

    def close(self) -> None:
        """Stop edge detection and release our pins only; other users' pins stay as they are."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for pin in sorted(self._detecting):
                try:
                    self._g.remove_event_detect(pin)
                except RuntimeError as err:
                    log.debug("remove_event_detect(%d): %s", pin, err)
            if self._mine:
                try:
                    self._g.cleanup(sorted(self._mine))
                except RuntimeError as err:
                    log.warning("GPIO cleanup failed: %s", err)
            self._mine.clear()
            self._detecting.clear()

    def _check_open(self) -> None:
        if self._closed:
            raise HardwareError("GPIO backend is closed")

    @staticmethod
    def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, ValueError) as err:
            raise HardwareError(f"GPIO: {err}") from err


def open_rpi() -> RpiGpio:
    return RpiGpio()
