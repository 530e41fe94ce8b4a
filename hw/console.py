"""A display drawn in the terminal with Unicode half blocks: two panel rows per text line.

On a TTY the panel keeps the top of the terminal and everything else printed there (the log)
scrolls below it, in a scroll region; a terminal too small for that gets braille cells
(2x4 pixels a character). Otherwise (a pipe, the journal) a frame is printed only when it differs
from the last one printed.
"""

from __future__ import annotations

import shutil
import sys
from typing import Any, TextIO

from PIL import Image

from hw import handles
from hw.base import DisplayOptions
from hw.imagedisplay import ImageDisplay

_BLOCKS = {(False, False): " ", (True, False): "\u2580", (False, True): "\u2584", (True, True): "\u2588"}
HOME = "\x1b[H"
CLEAR = "\x1b[2J"


# Braille cells are 2x4 dots: (dx, dy) -> bit, per the Unicode braille pattern layout.
_BRAILLE_BITS = {(0, 0): 0, (0, 1): 1, (0, 2): 2, (1, 0): 3, (1, 1): 4, (1, 2): 5, (0, 3): 6, (1, 3): 7}


def render_braille(image: Image.Image) -> str:
    """The image at 2x4 pixels a character (66x18: fits an 80x24 terminal), framed by a border."""
    img = image.convert("1")
    w, h = img.size
    px = img.load()
    assert px is not None
    lines = ["\u250c" + "\u2500" * ((w + 1) // 2) + "\u2510"]
    for y in range(0, h, 4):
        row = []
        for x in range(0, w, 2):
            bits = sum(1 << bit for (dx, dy), bit in _BRAILLE_BITS.items()
                       if x + dx < w and y + dy < h and px[x + dx, y + dy])
            row.append(chr(0x2800 + bits))
        lines.append("\u2502" + "".join(row) + "\u2502")
    lines.append("\u2514" + "\u2500" * ((w + 1) // 2) + "\u2518")
    return "\n".join(lines) + "\n"


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


class ConsoleDisplay(ImageDisplay):
    def __init__(self, stream: TextIO | None = None, size: tuple[int, int] = (128, 64)) -> None:
        super().__init__(size)
        self._stream = stream if stream is not None else sys.stdout
        self._tty = bool(getattr(self._stream, "isatty", lambda: False)())
        self._last: str | None = None
        self._cleared = False
        handles.register(self, "console display")

    def close(self) -> None:
        handles.release(self)
        with self._lock:
            if self._tty and self._cleared:
                rows = shutil.get_terminal_size().lines
                self._stream.write(f"\x1b[r\x1b[{rows};1H\n")  # give the whole terminal back
            self._stream.flush()

    def _output(self, image: Image.Image) -> None:
        cols, rows = shutil.get_terminal_size()
        # Half blocks need 130x38; smaller terminals get braille (2x4 pixels a character).
        small = self._tty and (cols < self.size[0] + 2 or rows < self.size[1] // 2 + 6)
        text = render_braille(image) if small else render_text(image)
        if text == self._last:
            return
        self._last = text
        height = text.count("\n")
        if self._tty and rows >= height + 4:
            if not self._cleared:
                # Panel on top; the rows below become a scroll region for the log.
                self._stream.write(f"{CLEAR}\x1b[{height + 1};{rows}r\x1b[{height + 1};1H")
                self._cleared = True
            self._stream.write("\x1b7" + HOME + text + "\x1b8")   # save cursor, draw, restore
        else:
            self._stream.write(text)
        self._stream.flush()


def open_console(stream: TextIO | None = None) -> ConsoleDisplay:
    return ConsoleDisplay(stream)


def open_display(driver: str, options: DisplayOptions, bus: Any) -> ConsoleDisplay:
    """The registry's factory (driver "console"): draws on stdout, ignores the wiring options."""
    return open_console()
