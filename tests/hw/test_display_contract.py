"""One suite for every display backend: what is shown is what a person would see."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

from hw.console import ConsoleDisplay, render_text
from hw.errors import HardwareError
from hw.fakebus import FakeI2CBus
from hw.registry import open_display
from tests.fixtures.hardware import ON_PI, pixel_diff


class Seen:
    """A display plus a way to look at what it shows now."""

    def __init__(self, display: Any, look: Callable[[], Image.Image]) -> None:
        self.display, self.look = display, look


def _console_look(stream: io.StringIO) -> Callable[[], Image.Image]:
    def look() -> Image.Image:
        frame = stream.getvalue().split("\u250c")[-1].splitlines()[1:-1]
        img = Image.new("1", (128, 64))
        px = img.load()
        for row, line in enumerate(frame):
            for x, ch in enumerate(line[1:-1]):
                px[x, 2 * row] = ch in "\u2580\u2588"
                px[x, 2 * row + 1] = ch in "\u2584\u2588"
        return img
    return look


@pytest.fixture(params=["ssd1306", "sh1106", "png", "console",
                        pytest.param("real", marks=pytest.mark.skipif(not ON_PI, reason="needs a Pi "
                                                                      "with a panel"))])
def seen(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Seen]:
    kind = request.param
    if kind in ("ssd1306", "sh1106"):
        bus = FakeI2CBus(kind)
        display = open_display(kind, bus=bus)
        yield Seen(display, lambda: bus.image)
    elif kind == "png":
        path = tmp_path / "screen.png"
        display = open_display("png", path=str(path))
        yield Seen(display, lambda: Image.open(path).convert("1"))
    elif kind == "console":
        stream = io.StringIO()
        display = ConsoleDisplay(stream)
        yield Seen(display, _console_look(stream))
    else:
        driver = os.environ.get("DEVICE_AGENT_TEST_DISPLAY", "ssd1306")
        display = open_display(driver)
        yield Seen(display, lambda: pytest.skip("a real panel cannot be read back"))
    assert display is not None
    display.close()


def picture() -> Image.Image:
    img = Image.new("1", (128, 64))
    d = ImageDraw.Draw(img)
    d.rectangle((0, 0, 127, 63), outline=1)
    d.text((4, 4), "Hello 123", fill=1)
    d.point((127, 63), fill=0)
    d.point((126, 62), fill=1)
    return img


def test_shows_exactly_the_image(seen: Seen) -> None:
    img = picture()
    seen.display.show(img)
    assert pixel_diff(seen.look(), img) is None


def test_power_off_is_dark_and_on_restores(seen: Seen) -> None:
    img = picture()
    seen.display.show(img)
    seen.display.power(False)
    assert seen.look().getbbox() is None
    seen.display.power(True)
    assert pixel_diff(seen.look(), img) is None


def test_size_and_mode(seen: Seen) -> None:
    assert seen.display.size == (128, 64) and seen.display.mode == "1"
    with pytest.raises(HardwareError):
        seen.display.show(Image.new("1", (64, 32)))


def test_none_driver_is_none() -> None:
    assert open_display("none") is None


def test_png_is_written_atomically_and_readable(tmp_path: Path) -> None:
    path = tmp_path / "run" / "screen.png"
    display = open_display("png", path=str(path))
    assert display is not None
    display.show(picture())
    display.close()
    assert path.exists() and oct(path.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in path.parent.iterdir()] == ["screen.png"]   # no temp files left
    with Image.open(path) as im:
        assert im.size == (128, 64)
        assert im.convert("L").getpixel((0, 0)) == 255        # lit pixel = white
        assert im.convert("L").getpixel((127, 63)) == 0


def test_png_unwritable_dir_is_unavailable(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: directory permissions do not apply")
        with pytest.raises(HardwareError, match="permission denied"):
            open_display("png", path=str(ro / "sub" / "screen.png"))
    finally:
        ro.chmod(0o700)


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_console_redraws_in_place_on_a_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wide terminal: half blocks; the panel stays on top and the log scrolls below it."""
    monkeypatch.setattr("shutil.get_terminal_size", lambda *a, **k: os.terminal_size((140, 60)))
    out = Tty()
    display = ConsoleDisplay(out)
    display.show(picture())
    display.show(Image.new("1", (128, 64)))
    text = out.getvalue()
    assert text.startswith("\x1b[2J\x1b[35;60r\x1b[35;1H")   # 34 frame lines, log region below
    assert text.count("\x1b7\x1b[H") == 2 and text.count("\x1b8") == 2
    assert "\u2580" in text or "\u2584" in text or "\u2588" in text
    display.close()
    assert out.getvalue().endswith("\x1b[r\x1b[60;1H\n")


def test_console_small_tty_uses_braille(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.get_terminal_size", lambda *a, **k: os.terminal_size((80, 24)))
    out = Tty()
    display = ConsoleDisplay(out)
    display.show(picture())
    display.close()
    text = out.getvalue()
    assert text.startswith("\x1b[2J\x1b[19;24r")
    frame = text.split("\x1b[H", 1)[1].split("\x1b8")[0]
    lines = frame.rstrip("\n").split("\n")
    assert len(lines) == 18 and all(len(line) == 66 for line in lines)


def test_braille_maps_each_pixel() -> None:
    from hw.console import render_braille

    # Unicode braille: dots 1-3 left column, 4-6 right column, 7 and 8 the bottom row.
    expected = {(0, 0): 0x01, (0, 1): 0x02, (0, 2): 0x04, (1, 0): 0x08, (1, 1): 0x10, (1, 2): 0x20,
                (0, 3): 0x40, (1, 3): 0x80}
    for (x, y), bits in expected.items():
        img = Image.new("1", (2, 4))
        img.putpixel((x, y), 1)
        assert render_braille(img).split("\n")[1][1] == chr(0x2800 + bits)


def test_console_pipe_prints_only_changed_frames() -> None:
    out = io.StringIO()
    display = ConsoleDisplay(out)
    for _ in range(3):
        display.show(picture())
    assert out.getvalue().count("\u250c") == 1 and "\x1b" not in out.getvalue()
    display.show(Image.new("1", (128, 64)))
    display.close()
    assert out.getvalue().count("\u250c") == 2


def test_half_blocks() -> None:
    img = Image.new("1", (2, 2))
    img.putpixel((0, 0), 1)
    img.putpixel((1, 0), 1)
    img.putpixel((1, 1), 1)
    assert render_text(img).splitlines()[1] == "\u2502\u2580\u2588\u2502"


def test_pixel_diff_sees_one_pixel() -> None:
    a = picture()
    b = a.copy()
    b.putpixel((64, 32), 0 if a.getpixel((64, 32)) else 1)
    assert pixel_diff(a, b) == (64, 32, 65, 33)
    assert pixel_diff(a, Image.new("1", (64, 32))) is not None


@pytest.mark.parametrize("size", [(128, 64), (64, 128), (13, 7)])
def test_png_encoder_round_trips_every_pixel(size: tuple[int, int]) -> None:
    """hw.png writes mode "1" PNGs itself (no Pillow plugins at start): Pillow and zlib read them
    back pixel for pixel, odd widths (padded rows) included."""
    import io
    import random

    from hw.png import encode_png

    rng = random.Random(size[0])
    img = Image.new("1", size, 0)
    for _ in range(size[0] * size[1] // 3):
        img.putpixel((rng.randrange(size[0]), rng.randrange(size[1])), 1)
    with Image.open(io.BytesIO(encode_png(img))) as back:
        back.load()
        assert back.size == size
        assert back.convert("1").tobytes() == img.tobytes()
