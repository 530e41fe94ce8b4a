"""The fake I2C bus must rebuild exactly what the real luma drivers put on the glass."""

from __future__ import annotations

import random

import pytest
from luma.core.device import dummy
from luma.core.interface.serial import i2c
from luma.oled.device import sh1106, ssd1306
from PIL import Image, ImageDraw

from hw.errors import HardwareError, HardwareUnavailable
from hw.fakebus import FakeI2CBus
from hw.registry import open_display
from tests.fixtures.hardware import pixel_diff


def noise(seed: int, size: tuple[int, int] = (128, 64)) -> Image.Image:
    rnd = random.Random(seed)
    img = Image.new("1", size)
    img.putdata([rnd.getrandbits(1) for _ in range(size[0] * size[1])])
    return img


def same(a: Image.Image, b: Image.Image) -> bool:
    return pixel_diff(a, b) is None


@pytest.mark.parametrize("rotate", [0, 1, 2, 3])
def test_rebuilt_frame_matches_luma_dummy(oled_bus: FakeI2CBus, rotate: int) -> None:
    driver = {"ssd1306": ssd1306, "sh1106": sh1106}[oled_bus.controller]
    device = driver(i2c(bus=oled_bus, address=0x3C), rotate=rotate)
    reference = dummy(width=128, height=64, rotate=rotate, mode="1")
    for seed in range(3):
        img = noise(seed, device.size)
        device.display(img)
        reference.display(img)
        assert same(oled_bus.image, reference.image), f"seed {seed}"


def test_blank_until_first_frame_then_on(oled_bus: FakeI2CBus) -> None:
    display = open_display(oled_bus.controller, bus=oled_bus)
    assert display is not None
    assert oled_bus.display_on                         # luma's init ends with 0xAF
    assert oled_bus.image.getbbox() is None
    img = Image.new("1", (128, 64))
    ImageDraw.Draw(img).rectangle((10, 20, 30, 40), fill=1)
    display.show(img)
    assert oled_bus.image.getbbox() == (10, 20, 31, 41)
    display.power(False)
    assert not oled_bus.display_on and oled_bus.image.getbbox() is None
    display.power(True)
    assert oled_bus.image.getbbox() == (10, 20, 31, 41)   # RAM kept while off
    display.close()


def test_contrast_reaches_the_controller(oled_bus: FakeI2CBus) -> None:
    display = open_display(oled_bus.controller, bus=oled_bus, contrast=42)
    assert oled_bus.contrast == 42
    assert display is not None
    display.close()


def test_sh1106_column_offset_matters() -> None:
    """A driver that forgot the SH1106's 2-column offset would show a shifted picture: we see it."""
    bus = FakeI2CBus("sh1106")
    device = sh1106(i2c(bus=bus, address=0x3C), page_address_offset=0)
    img = Image.new("1", (128, 64))
    ImageDraw.Draw(img).line((0, 0, 0, 63), fill=1)
    device.display(img)
    assert not same(bus.image, img)
    assert bus.image.getbbox() is None or bus.image.getbbox()[0] != 0


def test_sh1106_bare_memory_mode_byte_is_not_swallowing_the_next_command() -> None:
    bus = FakeI2CBus("sh1106")
    # luma's SH1106 init: AE 20 10 B0 C8 ... If 0x20 took an argument, 0x10 would vanish and
    # 0xB0 would become the "argument", leaving COM scan (0xC8) as parsed but page state wrong.
    bus.write_i2c_block_data(0x3C, 0x00, [0xAE, 0x20, 0xC8, 0xA1, 0xAF])
    assert bus.com_remap and bus.seg_remap and bus.display_on


def test_ssd1306_page_addressing_mode() -> None:
    bus = FakeI2CBus("ssd1306")
    # page mode (20 02), page 3, column 5, one byte: bits 0..7 = rows 24..31 at x=5
    bus.write_i2c_block_data(0x3C, 0x00, [0x20, 0x02, 0xA1, 0xC8, 0xB3, 0x05, 0x10, 0xAF])
    bus.write_i2c_block_data(0x3C, 0x40, [0b0000_0101])
    px = bus.image.load()
    assert px[5, 24] and not px[5, 25] and px[5, 26]


def test_missing_display_says_what_to_check() -> None:
    bus = FakeI2CBus("ssd1306", present=False)
    with pytest.raises(HardwareUnavailable, match=r"no display answers at 0x3C on /dev/i2c-1: "
                                                   r"check wiring and `i2cdetect -y 1`"):
        open_display("ssd1306", bus=bus)


def test_display_unplugged_later_raises_hardware_error(oled_bus: FakeI2CBus) -> None:
    display = open_display(oled_bus.controller, bus=oled_bus)
    assert display is not None
    oled_bus.unplug()
    with pytest.raises(HardwareError, match="no display answers at 0x3C"):
        display.show(Image.new("1", (128, 64)))
    with pytest.raises(HardwareError, match="no display answers"):
        display.power(False)
    display.close()


def test_wrong_image_is_refused(oled_bus: FakeI2CBus) -> None:
    display = open_display(oled_bus.controller, bus=oled_bus)
    assert display is not None
    with pytest.raises(HardwareError, match="128, 64"):
        display.show(Image.new("RGB", (128, 64)))
    display.close()


def test_persist_keeps_last_frame_at_cleanup(oled_bus: FakeI2CBus) -> None:
    """luma's atexit cleanup would blank the panel; ours leaves what the agent chose."""
    display = open_display(oled_bus.controller, bus=oled_bus)
    assert display is not None
    img = Image.new("1", (128, 64))
    ImageDraw.Draw(img).text((5, 5), "bye", fill=1)
    display.show(img)
    display.close()
    assert oled_bus.display_on and same(oled_bus.image, img)
