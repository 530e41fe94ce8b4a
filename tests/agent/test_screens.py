"""Screens: golden images, and QR codes decoded from what the real luma drivers put on the glass."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import zxingcpp
from PIL import Image, ImageOps

from agent.panel import screens
from agent.state import DeviceCode, LastReading, Snapshot
from hw.fakebus import FakeI2CBus
from hw.registry import open_display
from tests.fixtures.hardware import lit, pixel_diff

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
NOW = 1000.0
WALL = datetime(2026, 11, 25, 14, 54, 32, tzinfo=UTC)

ENTRA = DeviceCode("F7KQ2XLPD", "https://microsoft.com/devicelogin", NOW + 754, WALL, 5)
COMPLETE = DeviceCode("WDJB-MJHT", "https://127.0.0.1:8443/oidc/device", NOW + 300, WALL, 5,
                      verification_uri_complete="https://127.0.0.1:8443/oidc/device?user_code=WDJB-MJHT")
LONG = DeviceCode("QWERTY-ASDFG", "https://login.example-identity-provider.com/realms/iot/device",
                  NOW + 600, WALL, 5,
                  verification_uri_complete="https://login.example-identity-provider.com/realms/iot/"
                                            "device?user_code=QWERTY-ASDFG&client_id=greenhouse-01")


def decode(img: Image.Image) -> list[str]:
    """What a phone would read: normal polarity only (try_invert off hides polarity bugs)."""
    return [r.text for r in zxingcpp.read_barcodes(lit(img), try_invert=False)]


@pytest.mark.parametrize("name", sorted(screens.examples()))
def test_golden(name: str, request: pytest.FixtureRequest) -> None:
    img = screens.examples()[name]
    path = GOLDEN / f"{name}.png"
    if request.config.getoption("--update-golden"):
        GOLDEN.mkdir(exist_ok=True)
        img.save(path)
    assert path.exists(), f"no golden for {name}: run pytest --update-golden and look at it"
    with Image.open(path) as golden:
        assert pixel_diff(img, golden) is None, f"{name} differs from {path}"


@pytest.mark.parametrize("controller", ["ssd1306", "sh1106"])
@pytest.mark.parametrize("code", [ENTRA, COMPLETE, LONG], ids=["plain-uri", "complete-uri", "long-uri"])
@pytest.mark.parametrize("rotate", [0, 2, 1])
def test_qr_from_the_rebuilt_frame_holds_the_exact_uri(controller: str, code: DeviceCode,
                                                       rotate: int) -> None:
    bus = FakeI2CBus(controller)
    display = open_display(controller, bus=bus, rotate=rotate)
    assert display is not None
    img = screens.render(Snapshot(phase="signing_in", code=code), NOW, 0, size=display.size)
    display.show(img)
    display.close()
    # What a person in front of the mounted panel sees: the glass, turned back by the mounting.
    seen = bus.image.rotate(90 * rotate, expand=True)
    assert pixel_diff(seen, img) is None
    assert decode(seen) == [code.verification_uri_complete or code.verification_uri]


def test_qr_polarity_is_normal() -> None:
    """Inverted (lit modules on dark) would only decode with try_invert: make sure we are not that."""
    img = screens.render(Snapshot(phase="signing_in", code=ENTRA), NOW, 0)
    assert decode(img) == [ENTRA.verification_uri]
    assert decode(ImageOps.invert(lit(img))) == []          # the check can fail


@pytest.mark.parametrize(("uri", "scale"), [("https://microsoft.com/devicelogin", 2),
                                            ("https://idp.example.com/device?user_code=ABCD-EFGH", 2),
                                            (LONG.verification_uri_complete, 1)])
def test_qr_uses_2px_modules_where_they_fit(uri: str, scale: int) -> None:
    rows, got = screens.qr_matrix(uri, 64)
    assert got == scale and len(rows) * got <= 64
    assert not any(rows[0]) and not any(r[0] for r in rows)      # lit quiet zone, 1 module


def test_plain_uri_is_version_3() -> None:
    rows, _ = screens.qr_matrix("https://microsoft.com/devicelogin", 64)
    assert len(rows) == 29 + 2


def lit_count(img: Image.Image, box: tuple[int, int, int, int]) -> int:
    return sum(1 for v in lit(img.crop(box)).getdata() if v)


def test_countdown_bar_shrinks() -> None:
    snap = Snapshot(phase="signing_in", code=ENTRA)
    bar = (40, 59, 128, 64)
    full = lit_count(screens.render(snap, NOW - 146, 0, code_lifetime_s=900), bar)
    half = lit_count(screens.render(snap, NOW + 304, 0, code_lifetime_s=900), bar)
    gone = lit_count(screens.render(snap, NOW + 800, 0, code_lifetime_s=900), bar)
    assert full > half > gone > 0          # the outline stays


def test_url_page_alternates_with_qr_page() -> None:
    snap = Snapshot(phase="signing_in", code=ENTRA)
    assert screens.page_count(snap) == 2
    assert decode(screens.render(snap, NOW, 1)) == []
    assert decode(screens.render(snap, NOW, 2)) == [ENTRA.verification_uri]


@pytest.mark.parametrize(("snap", "name"), [
    (Snapshot(), "starting"),
    (Snapshot(phase="signing_in"), "starting"),
    (Snapshot(phase="signing_in", code=ENTRA), "code"),
    (Snapshot(phase="signing_in", code=ENTRA, notice="Code declined"), "code"),
    (Snapshot(phase="signing_in", code=ENTRA, notice=screens.hold_notice(2)), "hold"),
    (Snapshot(phase="signing_in", renewals_exhausted=True), "exhausted"),
    (Snapshot(phase="error", error="Check the client_id"), "error"),
    (Snapshot(phase="signing_in", notice="Code declined"), "notice"),
    (Snapshot(phase="signed_in", account="a@b"), "status"),
    (Snapshot(phase="stopped", code=ENTRA), "stopped"),
])
def test_screen_priority(snap: Snapshot, name: str) -> None:
    assert screens.screen_name(snap) == name


def test_every_screen_is_128x64_mode_1() -> None:
    for name, img in screens.examples().items():
        assert img.mode == "1", name
        assert img.size == ((64, 128) if name == "code_portrait" else (128, 64)), name


def test_long_texts_do_not_crash_and_stay_on_panel() -> None:
    long = "Sign-in is blocked by a Conditional Access policy (AADSTS53003): ask your admin " * 3
    img = screens.render(Snapshot(phase="error", error=long), NOW)
    assert img.getbbox() is not None
    snap = Snapshot(phase="signed_in", account="x" * 80,
                    last_reading=LastReading("a_very_long_sensor_name.temperature", -1234.5678, "hPa"))
    assert screens.render(snap, NOW).size == (128, 64)


@pytest.mark.parametrize(("code", "parts"), [("ABCD-EFGH", ["ABCD", "EFGH"]),
                                             ("F7KQ2XLPD", ["F7KQ2", "XLPD"]),
                                             ("BCDFGHJK", ["BCDF", "GHJK"])])
def test_split_code(code: str, parts: list[str]) -> None:
    assert screens.split_code(code) == parts


def test_cli_writes_every_screen(tmp_path: Path) -> None:
    assert screens.main(["--out", str(tmp_path)]) == 0
    assert {p.stem for p in tmp_path.glob("*.png")} == set(screens.examples())


def test_absurd_verification_uri_still_gives_a_screen_quickly() -> None:
    """A malformed IdP reply (a huge URI) must neither freeze the panel nor hide the code."""
    import time as _time

    from agent.panel.screens import render_code
    from agent.state import DeviceCode

    for n in (300, 3000):
        uri = "https://idp.example.com/device?x=" + "a" * n
        code = DeviceCode("ABCD-EFGH", uri, 900.0, datetime.now(UTC), 5.0)
        t0 = _time.perf_counter()
        pages = [render_code(code, 0.0, page) for page in (0, 1)]
        assert _time.perf_counter() - t0 < 2.0
        assert all(p.size == (128, 64) for p in pages)


def test_status_screen_says_when_storage_is_full_or_read_only() -> None:
    base = Snapshot(phase="signed_in", account="ada@contoso.example",
                    last_reading=LastReading("cpu", 47.2, "°C"), links={"api": "up"})
    ok = screens.render_status(base)
    full = screens.render_status(Snapshot(**{**base.__dict__, "storage": "full"}))
    read_only = screens.render_status(Snapshot(**{**base.__dict__, "storage": "read_only"}))
    changed = pixel_diff(ok, full)
    assert changed is not None and pixel_diff(full, read_only) is not None
    # Only the queue line changes: the account, the reading and the links stay as they were.
    top, bottom = changed[1], changed[3]
    assert top > 30 and bottom < 56, changed


def test_error_screen_shows_the_short_panel_line_and_drops_it_with_its_error() -> None:
    """AADSTS53003's sentence filled 5 lines of tiny text; the panel shows its short line, in
    larger type than the sentence got, and a later error without one shows that error's words."""
    from agent.state import AgentState

    state = AgentState()
    state.failed(screens.DEVICE_CODE_BLOCKED, screens.DEVICE_CODE_BLOCKED_PANEL)
    snap = state.snapshot
    assert snap.error == screens.DEVICE_CODE_BLOCKED                       # status / MQTT
    short = screens.render(snap, 0.0)
    assert pixel_diff(short, screens.render_error(screens.DEVICE_CODE_BLOCKED_PANEL)) is None
    assert pixel_diff(short, screens.render_error(screens.DEVICE_CODE_BLOCKED)) is not None
    state.failed("Something else went wrong: see the journal")
    assert state.snapshot.error_panel is None
    assert pixel_diff(screens.render(state.snapshot, 0.0),
                      screens.render_error("Something else went wrong: see the journal")) is None
    state.update(phase="signed_in", error=None)
    assert state.snapshot.error_panel is None


def _ink_runs(img: Image.Image) -> list[tuple[int, int]]:
    """(first, last) x of each run of columns holding ink: one per glyph when none touch."""
    cols = [any(img.getpixel((x, y)) for y in range(img.height)) for x in range(img.width)]
    runs: list[tuple[int, int]] = []
    for x, inked in enumerate(cols):
        if inked and runs and runs[-1][1] == x - 1:
            runs[-1] = (runs[-1][0], x)
        elif inked:
            runs.append((x, x))
    return runs


def _ink_rows(img: Image.Image, run: tuple[int, int]) -> list[int]:
    return [y for y in range(img.height) for x in range(run[0], run[1] + 1) if img.getpixel((x, y))]


@pytest.mark.parametrize("size,bold", [(9, False), (10, False), (11, False), (14, True), (18, True)])
def test_a_decimal_point_stands_clear_of_both_digits(size: int, bold: bool) -> None:
    """The bundled font's 1-px point touches the digit before it in mode "1" ("24.0" read as
    "240" on the glass, seen in the demo): every point between digits is a blot of its own, a
    blank column on each side, on the digits' baseline."""
    from PIL import ImageDraw

    f = screens.font(size)
    for text in ("24.0", "21.4", "7.75", "1.5", "v2.1"):
        img = Image.new("1", (90, 30))
        draw = ImageDraw.Draw(img)
        draw.fontmode = "1"
        screens._ink_text(draw, (2, 2), text, f, bold=bold)
        runs = _ink_runs(img)
        points = [r for r in runs if max(_ink_rows(img, r)) - min(_ink_rows(img, r)) < 3]  # <= 3 px high
        assert len(points) == 1, (text, size, runs)
        digit = runs[0] if text[0].isdigit() else runs[1]
        assert max(_ink_rows(img, points[0])) == max(_ink_rows(img, digit)), f"{text} at {size}: on the baseline"
    width = [screens._text_size(draw, t, f) for t in ("24.0", "240")]
    assert width[0][2] - width[0][0] > width[1][2] - width[1][0], "the point takes room of its own"


def test_an_ellipsized_line_fits_its_width_even_when_the_cut_makes_a_decimal_number() -> None:
    """The ellipsis is wider than the letter it replaces, and a cut like "x77.3." -> "x77.3…"
    makes "77.3" a decimal number with a wider point: the line is shortened until it fits."""
    import random

    from PIL import ImageDraw

    draw = ImageDraw.Draw(Image.new("1", screens.SIZE))
    draw.fontmode = "1"
    rnd = random.Random(7)
    f = screens.font(9)
    names = ["greenhouse.bench.x77.3.temperature.sensor"] + [
        "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz0123456789._-WM") for _ in range(rnd.randint(20, 60)))
        for _ in range(300)]
    for name in names:
        line = screens._ellipsized(draw, name, f, 126)
        left, _, right, _ = screens._text_size(draw, line, f)
        assert right - left <= 126, (name, line, right - left)
