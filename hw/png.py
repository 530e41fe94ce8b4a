"""A display that is a PNG file: the panel image, rewritten atomically whenever it changes.

For a box without a panel, a laptop, and `device-agent demo`: open the file in an image viewer
that reloads. Lit pixel = white. Readers never see a half-written file (temp file + os.replace).
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import threading
from pathlib import Path

from PIL import Image

from hw.errors import HardwareError, HardwareUnavailable

log = logging.getLogger(__name__)


class PngDisplay:
    """Writes each shown image to ``path``; ``power(False)`` writes an all-dark image."""

    mode = "1"

    def __init__(self, path: str | os.PathLike[str], size: tuple[int, int] = (128, 64)) -> None:
        self.path = Path(path)
        self.size = size
        self._lock = threading.Lock()
        self._image = Image.new("1", size, 0)
        self._on = True
        self._last_bytes: bytes | None = None
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except PermissionError as err:
            raise HardwareUnavailable(f"{self.path.parent}: permission denied; set display.path to a "
                                      f"writable place (e.g. under $RUNTIME_DIRECTORY)") from err
        except OSError as err:
            raise HardwareUnavailable(f"{self.path.parent}: {err.strerror}") from err

    def show(self, image: Image.Image) -> None:
        if image.size != self.size or image.mode != self.mode:
            raise HardwareError(f"display wants a {self.size} mode {self.mode!r} image, "
                                f"got {image.size} mode {image.mode!r}")
        with self._lock:
            self._image = image.copy()
            self._write()

    def power(self, on: bool) -> None:
        with self._lock:
            self._on = on
            self._write()

    def close(self) -> None:
        with self._lock:
            self._closed = True

    @property
    def image(self) -> Image.Image:
        """What the file shows (dark when powered off)."""
        with self._lock:
            return self._image.copy() if self._on else Image.new("1", self.size, 0)

    def _write(self) -> None:
        if self._closed:
            raise HardwareError("display is closed")
        img = self._image if self._on else Image.new("1", self.size, 0)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        data = buf.getvalue()
        if data == self._last_bytes and self.path.exists():
            return
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)      # a picture of the panel: no secrets, viewers may read it
            os.replace(tmp, self.path)
        except OSError as err:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise HardwareError(f"cannot write {self.path}: {err.strerror}") from err
        self._last_bytes = data


def open_png(path: str | os.PathLike[str]) -> PngDisplay:
    return PngDisplay(path)
