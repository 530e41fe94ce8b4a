"""A display drawn in the terminal with Unicode half blocks: two panel rows per text line.

On a TTY each frame redraws in place (cursor home); otherwise (a pipe, the journal) a frame is
printed only when it differs from the last one printed.
"""

from __future__ import annotations

import sys
import threading
from typing import TextIO

from PIL import Image

from hw.errors import HardwareError

_BLOCKS = {(False, False): " ", (True, False): "\u2580", (False, True): "\u2584", (True, True): "\u2588"}
HOME = "\x1b[H"
CLEAR = "\x1b[2J"


def render_text(image: Image.Image) -> str:
    """The image as lines of half blocks (upper pixel, lower pixel), framed by a border."""
    img = image.convert("1")
    w, h = img.size
    px = img.load()
    assert px is not None
    lines = ["\u250c" + "\u2500" * w + "\u2510"]
    for y in range(0, h, 2):
        row = []
        for x in range(w):
            top = bool(px[x, y])
            bottom = bool(px[x, y + 1]) if y + 1 < h else False
            row.append(_BLOCKS[(top, bottom)])
        lines.append("\u2502" + "".join(row) + "\u2502")
    lines.append("\u2514" + "\u2500" * w + "\u2518")
    return "\n".join(lines) + "\n"


class ConsoleDisplay:
    mode = "1"

    def __init__(self, stream: TextIO | None = None, size: tuple[int, int] = (128, 64)) -> None:
        self.size = size
        self._stream = stream if stream is not None else sys.stdout
        self._tty = bool(getattr(self._stream, "isatty", lambda: False)())
        self._lock = threading.Lock()
        self._image = Image.new("1", size, 0)
        self._on = True
        self._last: str | None = None
        self._cleared = False

    def show(self, image: Image.Image) -> None:
        if image.size != self.size or image.mode != self.mode:
            raise HardwareError(f"display wants a {self.size} mode {self.mode!r} image, "
                                f"got {image.size} mode {image.mode!r}")
        with self._lock:
            self._image = image.copy()
            self._draw()

    def power(self, on: bool) -> None:
        with self._lock:
            self._on = on
            self._draw()

    def close(self) -> None:
        with self._lock:
            self._stream.flush()

    def _draw(self) -> None:
        text = render_text(self._image if self._on else Image.new("1", self.size, 0))
        if text == self._last:
            return
        self._last = text
        if self._tty:
            prefix = HOME if self._cleared else CLEAR + HOME
            self._cleared = True
            self._stream.write(prefix + text)
        else:
            self._stream.write(text)
        self._stream.flush()


def open_console(stream: TextIO | None = None) -> ConsoleDisplay:
    return ConsoleDisplay(stream)
