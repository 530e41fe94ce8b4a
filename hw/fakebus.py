"""A fake I2C bus with an SSD1306 or SH1106 panel on it.

The real luma driver writes to it (``luma.core.interface.serial.i2c(bus=FakeI2CBus(...))``) and
the bus rebuilds the panel's framebuffer from the command/data byte stream the way the controller
would. Tests then look at what the panel would show (``.image``), not at the image we meant to
send, so addressing, rotation, column-offset and power bugs in the driver path all show up.

Only what luma sends is modelled, following the SSD1306 and SH1106 datasheets: memory addressing
modes (SSD1306), column/page address commands, display on/off, contrast, inverse, entire-display-
on, segment remap and COM scan direction (as mirroring), and the SH1106's 132-column RAM of which
columns 2..129 are visible on the usual 128x64 module.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Sequence
from typing import Literal

from PIL import Image

Controller = Literal["ssd1306", "sh1106"]

WIDTH = 128
HEIGHT = 64
PAGES = HEIGHT // 8
CTRL_COMMAND = 0x00
CTRL_DATA = 0x40

# Argument byte counts of multi-byte commands, per controller. Anything not listed takes none.
_SSD1306_ARGS = {
    0x20: 1, 0x21: 2, 0x22: 2, 0x81: 1, 0x8D: 1, 0xA3: 2, 0xA8: 1, 0xD3: 1, 0xD5: 1,
    0xD9: 1, 0xDA: 1, 0xDB: 1, 0x26: 6, 0x27: 6, 0x29: 5, 0x2A: 5,
}
# SH1106 has no memory-mode command: luma's bare 0x20 is a no-op byte there. 0x8D (charge pump on
# SSD1306) is not an SH1106 command either, so its 0x14 argument lands as "column high nibble = 4";
# every frame re-sets the column, so the effect is invisible, exactly as on a real module.
_SH1106_ARGS = {0x81: 1, 0xA8: 1, 0xAD: 1, 0xD3: 1, 0xD5: 1, 0xD9: 1, 0xDA: 1, 0xDB: 1}


class FakeI2CBus:
    """An smbus-like object holding one simulated OLED controller at ``address``.

    ``present=False`` (or ``unplug()``) makes every write raise ``OSError(EREMOTEIO)``, which is
    what the kernel returns when nothing ACKs the address.
    """

    def __init__(self, controller: Controller = "ssd1306", *, address: int = 0x3C,
                 present: bool = True, port: int = 1) -> None:
        if controller not in ("ssd1306", "sh1106"):
            raise ValueError(f"unknown controller {controller!r}")
        self.controller: Controller = controller
        self.address = address
        self.port = port
        self.present = present
        self._lock = threading.Lock()
        self._ram_cols = 132 if controller == "sh1106" else WIDTH
        self._visible_col0 = 2 if controller == "sh1106" else 0
        self._ram = [bytearray(self._ram_cols) for _ in range(PAGES)]
        self._args = _SH1106_ARGS if controller == "sh1106" else _SSD1306_ARGS
        self._pending: list[int] = []          # a command waiting for its argument bytes
        self._need = 0
        # Power-on reset state (datasheets): display off, page addressing, contrast 0x7F/0x80.
        self.display_on = False
        self.contrast = 0x7F if controller == "ssd1306" else 0x80
        self.inverse = False
        self.all_on = False
        self.seg_remap = False
        self.com_remap = False
        self.memory_mode = 2                   # 0 horizontal, 1 vertical, 2 page
        self._col = 0
        self._page = 0
        self._col_start, self._col_end = 0, WIDTH - 1
        self._page_start, self._page_end = 0, PAGES - 1
        self.frames = 0                        # data writes that completed a full frame's worth
        self._data_bytes = 0
        self.writes: int = 0

    # -- the smbus surface luma uses ------------------------------------------------------------

    def write_i2c_block_data(self, i2c_addr: int, register: int, data: Sequence[int]) -> None:
        """One I2C transaction: control byte ``register`` then ``data`` (at most 32 bytes)."""
        if not self.present or i2c_addr != self.address:
            raise OSError(errno.EREMOTEIO, "Remote I/O error")
        if len(data) > 32:
            raise OSError(errno.EINVAL, "SMBus block larger than 32 bytes")
        with self._lock:
            self.writes += 1
            if register == CTRL_COMMAND:
                for byte in data:
                    self._command_byte(byte & 0xFF)
            elif register == CTRL_DATA:
                for byte in data:
                    self._data_byte(byte & 0xFF)
            else:
                raise OSError(errno.EIO, f"unexpected control byte 0x{register:02X}")

    def close(self) -> None:
        """smbus2 compatibility; nothing to release."""

    # -- test helpers ---------------------------------------------------------------------------

    def unplug(self) -> None:
        self.present = False

    def plug(self) -> None:
        self.present = True

    @property
    def image(self) -> Image.Image:
        """What the panel shows now: 128x64 mode "1", lit pixel = 1. All dark when off."""
        with self._lock:
            img = Image.new("1", (WIDTH, HEIGHT), 0)
            if not self.display_on:
                return img
            px = img.load()
            assert px is not None
            for y in range(HEIGHT):
                page, bit = divmod(y, 8)
                row = self._ram[page]
                # COM remap (0xC8) and segment remap (0xA1) are how the usual module is wired to
                # show RAM upright; without them the picture is mirrored.
                out_y = y if self.com_remap else HEIGHT - 1 - y
                for x in range(WIDTH):
                    lit = bool(row[x + self._visible_col0] >> bit & 1)
                    if self.all_on:
                        lit = True
                    elif self.inverse:
                        lit = not lit
                    out_x = x if self.seg_remap else WIDTH - 1 - x
                    if lit:
                        px[out_x, out_y] = 1
            return img

    # -- controller model -----------------------------------------------------------------------

    def _command_byte(self, byte: int) -> None:
        if self._need:
            self._pending.append(byte)
            self._need -= 1
            if self._need == 0:
                self._execute(self._pending)
                self._pending = []
            return
        n = self._args.get(byte, 0)
        if n:
            self._pending = [byte]
            self._need = n
        else:
            self._execute([byte])

    def _execute(self, cmd: list[int]) -> None:
        op = cmd[0]
        if op == 0xAE:
            self.display_on = False
        elif op == 0xAF:
            self.display_on = True
        elif op == 0x81:
            self.contrast = cmd[1]
        elif op in (0xA6, 0xA7):
            self.inverse = op == 0xA7
        elif op in (0xA4, 0xA5):
            self.all_on = op == 0xA5
        elif op in (0xA0, 0xA1):
            self.seg_remap = op == 0xA1
        elif op in (0xC0, 0xC8):
            self.com_remap = op == 0xC8
        elif 0xB0 <= op <= 0xB7:
            self._page = op & 0x07
        elif op <= 0x0F:
            self._col = (self._col & 0xF0) | op
        elif 0x10 <= op <= 0x1F:
            self._col = ((op & 0x0F) << 4) | (self._col & 0x0F)
        elif self.controller == "ssd1306":
            if op == 0x20:
                self.memory_mode = cmd[1] & 0x03
            elif op == 0x21:
                self._col_start, self._col_end = cmd[1] & 0x7F, cmd[2] & 0x7F
                self._col = self._col_start
            elif op == 0x22:
                self._page_start, self._page_end = cmd[1] & 0x07, cmd[2] & 0x07
                self._page = self._page_start
        # Everything else (clock, multiplex, pump, precharge, start line...) does not change
        # what pixels are shown on a correctly initialised 128x64 module.

    def _data_byte(self, byte: int) -> None:
        if 0 <= self._col < self._ram_cols:
            self._ram[self._page][self._col] = byte
        self._data_bytes += 1
        if self._data_bytes % (WIDTH * PAGES) == 0:
            self.frames += 1
        if self.controller == "sh1106":
            # SH1106: column pointer increments up to 131 and stays on the page.
            if self._col < self._ram_cols - 1:
                self._col += 1
            return
        if self.memory_mode == 0:                      # horizontal
            if self._col >= self._col_end:
                self._col = self._col_start
                self._page = self._page_start if self._page >= self._page_end else self._page + 1
            else:
                self._col += 1
        elif self.memory_mode == 1:                    # vertical
            if self._page >= self._page_end:
                self._page = self._page_start
                self._col = self._col_start if self._col >= self._col_end else self._col + 1
            else:
                self._page += 1
        else:                                          # page addressing: wrap within the page
            self._col = 0 if self._col >= WIDTH - 1 else self._col + 1
