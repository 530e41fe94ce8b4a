"""A display that is a PNG file: the panel image, rewritten atomically whenever it changes.

For a box without a panel, a laptop, and `device-agent demo`: open the file in an image viewer
that reloads. Lit pixel = white. Readers never see a half-written file (temp file + os.replace).
"""

from __future__ import annotations

import io
import logging
import os
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any

from PIL import Image

from hw import handles
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
        handles.register(self, f"png display {self.path}")

    def close(self) -> None:
        with self._lock:
            self._closed = True
        handles.release(self)

    def _output(self, img: Image.Image) -> None:
        if self._closed:
            raise HardwareError("display is closed")
        data = encode_png(img)
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


def encode_png(img: Image.Image) -> bytes:
    """``img`` as PNG bytes. Mode "1" (the panel) is written here, 1-bit greyscale where a set
    bit is white, which is exactly Pillow's packing of mode "1": ~20 lines instead of Pillow's
    save(), whose first call imports five image plugins (~10 ms at start, x86)."""
    if img.mode != "1":
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()
    w, h = img.size
    packed = img.tobytes()
    stride = (w + 7) // 8
    raw = b"".join(b"\x00" + packed[y * stride:(y + 1) * stride] for y in range(h))   # filter: none

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def open_png(path: str | os.PathLike[str]) -> PngDisplay:
    return PngDisplay(path)


def open_display(driver: str, options: DisplayOptions, bus: Any) -> PngDisplay:
    """The registry's factory (driver "png"): only ``options.path`` matters."""
    return open_png(options.path)
