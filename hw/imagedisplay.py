"""The part every software panel shares: keep the last image, honour power, check the shape."""

from __future__ import annotations

import threading

from PIL import Image

from hw.errors import HardwareError


class ImageDisplay:
    """A Display whose output is produced by ``_output(image)`` (a file, a terminal).

    Subclasses implement ``_output``; it is called under the lock with the image the panel
    shows now (all dark while powered off).
    """

    mode = "1"

    def __init__(self, size: tuple[int, int] = (128, 64)) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._image = Image.new("1", size, 0)
        self._on = True

    def show(self, image: Image.Image) -> None:
        if image.size != self.size or image.mode != self.mode:
            raise HardwareError(f"display wants a {self.size} mode {self.mode!r} image, "
                                f"got {image.size} mode {image.mode!r}")
        with self._lock:
            self._image = image.copy()
            self._output(self._visible())

    def power(self, on: bool) -> None:
        with self._lock:
            self._on = on
            self._output(self._visible())

    @property
    def image(self) -> Image.Image:
        """What the panel shows (dark when powered off)."""
        with self._lock:
            return self._visible().copy()

    def _visible(self) -> Image.Image:
        return self._image if self._on else Image.new("1", self.size, 0)

    def _output(self, image: Image.Image) -> None:
        """Put ``image`` where people see it; subclasses override this."""
