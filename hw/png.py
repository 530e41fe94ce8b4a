"""A display that is a PNG file: the panel image, rewritten atomically whenever it changes.

For a box without a panel, a laptop, and `device-agent demo`: open the file in an image viewer
that reloads. Lit pixel = white. Readers never see a half-written file (temp file + os.replace).
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image

from hw.base import DisplayOptions
from hw.errors import HardwareError, HardwareUnavailable
from hw.imagedisplay import ImageDisplay

log = logging.getLogger(__name__)


class PngDisplay(ImageDisplay):
    """Writes each shown image to ``path``; ``power(False)`` writes an all-dark image."""

    def __init__(self, path: str | os.PathLike[str], size: tuple[int, int] = (128, 64)) -> None:
        super().__init__(size)
        self.path = Path(path)
        self._last_bytes: bytes | None = None
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except PermissionError as err:
            raise HardwareUnavailable(f"{self.path.parent}: permission denied; set display.path to a "
                                      f"writable place (e.g. under $RUNTIME_DIRECTORY)") from err
        except OSError as err:
            raise HardwareUnavailable(f"{self.path.parent}: {err.strerror}") from err

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def _output(self, img: Image.Image) -> None:
        if self._closed:
            raise HardwareError("display is closed")
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


def open_display(driver: str, options: DisplayOptions, bus: Any) -> PngDisplay:
    """The registry's factory (driver "png"): only ``options.path`` matters."""
    return open_png(options.path)
