"""What the panel shows: pure functions from a Snapshot (+ monotonic now, page) to a PIL image.

128x64 mode "1", lit pixel = 1. A person reads these at arm's length, so the user code is drawn
as large as fits and the QR uses whole 2-px modules with a lit quiet zone (normal polarity:
dark modules on light, what every phone camera expects). Portrait sizes (rotate 1/3) get a
stacked layout. Burn-in care (blanking, pixel shift) is the panel's job, not these functions'.

``python -m agent.panel.screens --out DIR`` writes every screen as a PNG (for the README, for eyes).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from agent.state import DeviceCode, LastReading, OutboxCounts, Snapshot
from hw.lazymodule import defer

# The operator line for AADSTS53003 (agent.signin.aadsts), for the example screens only: panel
# must not import signin (tests/test_layout.py); keep the two in step.
DEVICE_CODE_BLOCKED = ('device code sign-in is blocked by your tenant\'s policy: use '
                       'auth.flow = "client_certificate" (README)')
DEVICE_CODE_BLOCKED_PANEL = "Device code blocked by tenant policy: use client_certificate"

SIZE = (128, 64)
PAGE_S = 4.0                       # each page of an alternating screen stays this long (>= 3 s)
DEFAULT_CODE_LIFETIME_S = 900.0    # bar scale when the panel did not see the code arrive
HOLD_PREFIX = "Keep holding"       # agent.panel.controls writes this notice while the button is held
EXHAUSTED_TEXT = "New code: press button, send renew_code or restart"

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
MAX_WRAP_CHARS = 240      # 128x64 shows ~4 lines of ~25 characters
QR_MASK = 2               # see _qr_rows
QR_MAX_BYTES = 321        # version 11 at ECC L (63 px with its quiet zone): the most a 64 px panel holds


@functools.lru_cache(maxsize=32)
def font(size: int) -> Font:
    """Pillow's bundled scalable font (Aileron); readable down to 9-10 px on an OLED."""
    return ImageFont.load_default(size=size)


def hold_notice(seconds_left: float) -> str:
    """The notice agent.panel.controls shows while the button is held towards a sign-out."""
    return f"{HOLD_PREFIX} to sign out: {max(0, math.ceil(seconds_left))} s"


def is_hold_notice(notice: str | None) -> bool:
    return bool(notice) and notice.startswith(HOLD_PREFIX)  # type: ignore[union-attr]


# -- dispatch ---------------------------------------------------------------------------------------

def screen_name(snap: Snapshot) -> str:
    """Which screen ``snap`` calls for, in priority order (the panel uses it for wake/sleep)."""
    if snap.phase == "stopped":
        return "stopped"
    if is_hold_notice(snap.notice):
        return "hold"              # the person is holding the button: feedback beats everything
    if snap.code is not None:
        return "code"
    if snap.renewals_exhausted:
        return "exhausted"
    if snap.phase == "error" and snap.error:
        return "error"
    if snap.notice:
        return "notice"
    if snap.phase == "signed_in":
        return "status"
    return "starting"


def page_count(snap: Snapshot) -> int:
    """Code: QR / URL text. Signed in: status, then "signed in as app <client_id>" for an app
    identity (auth.flow = "client_certificate"), then a warning if there is one."""
    if screen_name(snap) == "code":
        return 2
    return len(_status_pages(snap)) if screen_name(snap) == "status" else 1


def _status_pages(snap: Snapshot) -> list[str]:
    pages = ["status"]
    if is_app_account(snap.account):
        pages.append("app")
    if snap.warning:
        pages.append("warning")
    return pages


def is_app_account(account: str | None) -> bool:
    """An app-only identity: the certificate flow signs in as "app <client_id>"."""
    return bool(account) and account.startswith("app ")  # type: ignore[union-attr]


def render(snap: Snapshot, now_monotonic: float, page: int = 0, *,
           size: tuple[int, int] = SIZE, code_lifetime_s: float | None = None) -> Image.Image:
    """The screen for ``snap``. ``page`` alternates multi-page screens (code: QR / URL text)."""
    name = screen_name(snap)
    if name == "stopped":
        return render_stopped(size)
    if name == "hold":
        return render_notice(snap.notice or "", size, title="Sign out?")
    if name == "code":
        assert snap.code is not None
        return render_code(snap.code, now_monotonic, page, size=size, lifetime_s=code_lifetime_s,
                           device_id=snap.device_id)
    if name == "exhausted":
        return render_exhausted(size, snap.notice)
    if name == "error":
        return render_error(snap.error_panel or snap.error or "", size)
    if name == "notice":
        return render_notice(snap.notice or "", size)
    if name == "status":
        pages = _status_pages(snap)
        which = pages[page % len(pages)]
        if which == "app":
            return _message_screen("Signed in", f"as app {(snap.account or '')[4:]}", size, max_size=12)
        if which == "warning":
            return render_notice(snap.warning or "", size, title="Warning")
        return render_status(snap, size, now_monotonic=now_monotonic)
    return render_starting(snap, size)


# -- drawing helpers ----------------------------------------------------------------------------------

def _canvas(size: tuple[int, int]) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("1", size, 0)
    return img, ImageDraw.Draw(img)


def _text_size(draw: ImageDraw.ImageDraw, text: str, f: Font) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the ink of ``text`` drawn at (0, 0)."""
    return _ink_box(text, f, draw.fontmode)


@functools.lru_cache(maxsize=512)
def _ink_box(text: str, f: Font, fontmode: str) -> tuple[int, int, int, int]:
    # Cached: a layout costs ~0.1 ms, the code screen's font-size bisections measure the same
    # texts at the same sizes again and again, and the countdown redraws them every second.
    # The box depends on the text, the font and the draw's font mode, never on the image.
    probe = ImageDraw.Draw(Image.new("1", (1, 1)))
    probe.fontmode = fontmode
    box = probe.textbbox((0, 0), _shown(text, f, fontmode, True)[0], font=f)   # points inside
    return int(box[0]), int(box[1]), int(box[2]), int(box[3])


# A decimal point between digits: the bundled font draws it 1 px wide, touching the digit before
# it ("24.0" read as "240" on the glass). Such a point becomes a gap of spaces, and the point is
# drawn by hand in it: a square on the digit's baseline, clear of both digits. Decimal numbers
# only: dotted runs (an IP address in a sign-in URL, a version) keep the font's dots, and the
# code screen pays nothing for this at start.
_DECIMAL = re.compile(r"(?<![\d.])\d+\.\d+(?![\d.])")


def _decimal_points(text: str) -> list[int]:
    """Where the point of each decimal number in ``text`` is."""
    return [m.start() + m.group().index(".") for m in _DECIMAL.finditer(text)]


def _drawn(text: str, f: Font, fontmode: str, bold: bool) -> Image.Image:
    """``text`` drawn at (0, 0), twice 1 px apart when ``bold``, on an image just large enough."""
    probe = ImageDraw.Draw(Image.new("1", (1, 1)))
    probe.fontmode = fontmode
    _, _, right, bottom = probe.textbbox((0, 0), text, font=f)
    img = Image.new("1", (max(1, int(right) + 3), max(1, int(bottom) + 2)))
    draw = ImageDraw.Draw(img)
    draw.fontmode = fontmode
    for dx in (0, 1) if bold else (0,):
        draw.text((dx, 0), text, font=f, fill=1)
    return img


@functools.lru_cache(maxsize=512)
def _gap_between(before: str, after: str, f: Font, fontmode: str, bold: bool) -> tuple[int, int]:
    """(spaces, dx) for a point between the digits ``before`` and ``after``: the fewest spaces
    that leave it a blank column on each side, and its x from the end of ``before``'s advance.
    Measured on the ink of the three characters alone: a digit's ink sits the same way on its
    advance wherever it is drawn (mode "1" advances are whole pixels), while this font's glyphs
    overhang their advances, so advances alone would put the point on a digit."""
    probe = ImageDraw.Draw(Image.new("1", (1, 1)))
    probe.fontmode = fontmode
    size = max(1, round(getattr(f, "size", 9) / 9))
    wide = size + (1 if bold else 0)
    right = (_drawn(before, f, fontmode, bold).getbbox() or (0, 0, 1, 0))[2] - 1   # the digit's last column
    for spaces in (1, 2, 3):
        img = _drawn(before + " " * spaces + after, f, fontmode, bold)
        rest = img.crop((right + 1, 0, img.width, img.height)).getbbox()
        gap = rest[0] if rest else wide + 2
        if gap >= wide + 2 or spaces == 3:
            return spaces, right + 1 + (gap - wide) // 2 - math.floor(probe.textlength(before, font=f))
    raise AssertionError("unreachable")


@functools.lru_cache(maxsize=256)
def _shown(text: str, f: Font, fontmode: str, bold: bool) -> tuple[str, tuple[tuple[int, int, int], ...]]:
    """``text`` as drawn (decimal points as gaps) and (x, bottom, size) of each point, drawn at
    (0, 0), the point ``size`` px high and as wide once drawn (bold draws it twice). The gaps
    come from ``_gap_between``; the bottom from the text drawn whole, the digit's lowest row
    (Pillow moves a string a pixel up or down depending on what it holds). Bold may need a space
    more: ``_ink_box`` measures the bold layout, the wider one."""
    found = _decimal_points(text)
    if not found:
        return text, ()
    probe = ImageDraw.Draw(Image.new("1", (1, 1)))
    probe.fontmode = fontmode
    size = max(1, round(getattr(f, "size", 9) / 9))
    shown, places = "", []
    last = 0
    for at in found:
        spaces, dx = _gap_between(text[at - 1], text[at + 1], f, fontmode, bold)
        shown += text[last:at]
        places.append((len(shown), dx))
        shown += " " * spaces
        last = at + 1
    shown += text[last:]
    img = _drawn(shown, f, fontmode, bold)
    points = []
    for gap_at, dx in places:
        start = math.floor(probe.textlength(shown[:gap_at], font=f))
        digit_from = math.floor(probe.textlength(shown[:gap_at - 1], font=f))
        box = img.crop((digit_from, 0, start + 1, img.height)).getbbox()
        points.append((start + dx, box[3] if box else img.height - 1, size))
    return shown, tuple(points)


def _draw_text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, f: Font, fill: int,
               bold: bool = False) -> None:
    """The one place the panel draws text (at Pillow's origin for ``xy``, like ``draw.text``),
    decimal points as _shown places them; ``bold``: 1-px strokes of the bundled font are thin
    on an OLED, so everything is drawn twice, 1 px apart sideways."""
    shown, points = _shown(text, f, draw.fontmode, bold)
    for dx in (0, 1) if bold else (0,):
        x, y = xy[0] + dx, xy[1]
        draw.text((x, y), shown, font=f, fill=fill)
        for px, bottom, size in points:     # (x, bottom) measured with this pass's shift in
            draw.rectangle((x + px, y + bottom - size, x + px + size - 1, y + bottom - 1), fill=fill)


def _ink_text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, f: Font,
              fill: int = 1, bold: bool = False) -> None:
    """Draw ``text`` so its ink's top-left lands on ``xy`` (fonts carry blank space above caps)."""
    left, top, _, _ = _text_size(draw, text, f)
    _draw_text(draw, (xy[0] - left, xy[1] - top), text, f, fill, bold)


def _fit_size(draw: ImageDraw.ImageDraw, lines: Sequence[str], width: int, height: int,
              gap: int, *, bold: bool, max_size: int = 40, min_size: int = 9) -> int:
    """The largest font size at which ``lines`` (stacked, ``gap`` apart) fit in width x height.

    A bisection: text grows with the font size, and every size tried is a FreeType face to
    load, which is most of the first code screen's cost at start (5 faces instead of ~20)."""

    def fits(size: int) -> bool:
        f = font(size)
        widths, heights = [], []
        for line in lines:
            left, top, right, bottom = _text_size(draw, line, f)
            widths.append(right - left + (1 if bold else 0))
            heights.append(bottom - top)
        cap = _text_size(draw, "H", f)
        line_h = max([cap[3] - cap[1], *heights])
        total = line_h * len(lines) + gap * (len(lines) - 1)
        return max(widths) <= width and total <= height

    lo, hi = min_size, max_size          # invariant: everything above hi is known not to fit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _wrap_pixels(draw: ImageDraw.ImageDraw, text: str, f: Font, width: int,
                 *, break_anywhere: bool = False) -> list[str]:
    """Greedy word wrap by measured width; long words (URLs) are split where they must be.

    Text beyond what any panel could show is cut first (a malformed reply must not cost seconds).
    """
    text = text[:MAX_WRAP_CHARS]
    if break_anywhere:      # URLs, ids: prefer breaking after / ? & = . - then anywhere
        words = [t for t in re.findall(r"[^/?&=.-]*[/?&=.-]?", text) if t]
        sep = ""
    else:
        words, sep = text.split(), " "
    lines: list[str] = []
    cur = ""
    for word in words:
        candidate = f"{cur}{sep}{word}" if cur else word
        if _width(draw, candidate, f) <= width:
            cur = candidate
            continue
        if cur:
            lines.append(cur)
        cur = word
        while _width(draw, cur, f) > width and len(cur) > 1:   # a single over-long word
            lo, hi = 1, len(cur)      # the longest prefix that fits, by bisection
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if _width(draw, cur[:mid], f) <= width:
                    lo = mid
                else:
                    hi = mid - 1
            lines.append(cur[:lo])
            cur = cur[lo:]
    if cur:
        lines.append(cur)
    return lines


def _width(draw: ImageDraw.ImageDraw, text: str, f: Font) -> int:
    left, _, right, _ = _text_size(draw, text, f)
    return right - left


def _line_height(draw: ImageDraw.ImageDraw, f: Font) -> int:
    """Height of a line with ascenders and descenders ("Hg"), so wrapped lines never touch."""
    _, top, _, bottom = _text_size(draw, "Hgjy", f)
    return bottom - top


def _text_block(draw: ImageDraw.ImageDraw, lines: Sequence[str], f: Font, x: int, y: int,
                width: int, *, center: bool = False, gap: int = 2) -> int:
    """Draw lines from ``y`` down; returns the y below the block."""
    lh = _line_height(draw, f)
    _, top_hg, _, _ = _text_size(draw, "Hgjy", f)
    for line in lines:
        left, _, right, _ = _text_size(draw, line, f)
        lx = x + (width - (right - left)) // 2 if center else x
        _draw_text(draw, (lx - left, y - top_hg), line, f, 1)
        y += lh + gap
    return y - gap


def _title(draw: ImageDraw.ImageDraw, text: str, width: int) -> int:
    """A title row in inverse video; returns the y below it."""
    f = font(11)
    h = _line_height(draw, f) + 3
    draw.rectangle((0, 0, width - 1, h - 1), fill=1)
    _, top, _, _ = _text_size(draw, "Hgjy", f)
    left, _, right, _ = _text_size(draw, text, f)
    _draw_text(draw, ((width - (right - left)) // 2 - left, 2 - top), text, f, 0)
    return h + 2


def _message_screen(title: str, body: str, size: tuple[int, int], *, max_size: int = 14) -> Image.Image:
    """A title bar and ``body`` wrapped as large as fits below it, centred."""
    img, draw = _canvas(size)
    w, h = size
    y0 = _title(draw, title, w)
    avail_h = h - y0 - 1
    chosen = None
    for fsize in range(max_size, 8, -1):
        f = font(fsize)
        lines = _wrap_pixels(draw, body, f, w - 4)
        block = len(lines) * (_line_height(draw, f) + 2) - 2
        if block <= avail_h:
            chosen = (f, lines, block)
            break
    if chosen is None:
        # Too long to fit below the title: all of it without the title beats a cut message.
        for fsize in range(max_size, 8, -1):
            f = font(fsize)
            lines = _wrap_pixels(draw, body, f, w - 4)
            block = len(lines) * (_line_height(draw, f) + 2) - 2
            if block <= h - 2:
                img, draw = _canvas(size)
                _text_block(draw, lines, f, 2, (h - block) // 2, w - 4, center=True)
                return img
    if chosen is None:
        f = font(9)
        lh = _line_height(draw, f) + 2
        lines = _wrap_pixels(draw, body, f, w - 4)[: max(1, (avail_h + 2) // lh)]
        chosen = (f, lines, len(lines) * lh - 2)
    f, lines, block = chosen
    _text_block(draw, lines, f, 2, y0 + (avail_h - block) // 2, w - 4, center=True)
    return img


# -- QR ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _qr_rows(uri: str) -> tuple[tuple[bool, ...], ...]:
    # Cached: the countdown redraws every second with the same URI. Imported here: the first
    # screen ("starting") does not need to wait for segno.
    segno = _segno()

    # A fixed mask: segno would try all eight and score each (~6 ms x86 per new URI, most of
    # the QR's cost). Any mask is valid (ISO 18004 §7.8); 2 scored best over device-login URLs
    # (within 3 % of the best of eight on average, 19 % at worst), and tests decode the frames.
    qr = segno.make(uri, error="l", boost_error=False, micro=False, mask=QR_MASK)
    return tuple(tuple(bool(v) for v in row) for row in qr.matrix_iter(scale=1, border=1))


def qr_matrix(uri: str, max_px: int) -> tuple[list[list[bool]], int]:
    """The QR for ``uri`` as rows of dark-module flags (with a 1-module quiet zone) and a scale.

    Smallest version at ECC L without boosting (segno otherwise raises ECC silently, which can
    push the symbol past what fits at 2 px/module); 2 px per module whenever that fits.
    """
    rows = [list(row) for row in _qr_rows(uri)]
    scale = max(1, min(2, max_px // len(rows)))
    return rows, scale


def draw_qr(img: Image.Image, uri: str, x: int, y: int, max_px: int) -> int:
    """Draw the QR with its top-left at (x, y) within ``max_px``; returns its side in px."""
    n = len(_qr_rows(uri))
    scale = max(1, min(2, max_px // n))
    if n * scale > max_px:
        raise ValueError(f"a QR code of {n} modules does not fit {max_px} px")
    img.paste(_qr_image(uri, scale), (x, y))
    return n * scale


@functools.lru_cache(maxsize=8)
def _qr_image(uri: str, scale: int) -> Image.Image:
    """The QR as a mode "1" image: lit background and quiet zone, dark modules unlit. One paste
    instead of a Python loop over ~4,000 pixels at every redraw of the countdown."""
    rows = _qr_rows(uri)
    n = len(rows)
    modules = Image.frombytes("L", (n, n), bytes(0 if dark else 255 for row in rows for dark in row))
    qr = modules.convert("1", dither=Image.Dither.NONE)
    return qr.resize((n * scale, n * scale), Image.Resampling.NEAREST) if scale > 1 else qr


# -- screens ----------------------------------------------------------------------------------------

def split_code(code: str) -> list[str]:
    """Break a user code into two halves for big type ("ABCD-EFGH" -> "ABCD", "EFGH")."""
    if "-" in code:
        a, _, b = code.partition("-")
        return [a, b]
    if " " in code:
        a, _, b = code.partition(" ")
        return [a, b]
    mid = (len(code) + 1) // 2
    return [code[:mid], code[mid:]]


def _time_left_text(seconds: float) -> str:
    s = int(math.ceil(seconds))
    return f"{s // 60}:{s % 60:02d} left" if s > 0 else "expired"


def _bar(draw: ImageDraw.ImageDraw, x: int, y: int, w: int, h: int, fraction: float) -> None:
    draw.rectangle((x, y, x + w - 1, y + h - 1), outline=1, fill=0)
    inner = int(round((w - 2) * max(0.0, min(1.0, fraction))))
    if inner > 0:
        draw.rectangle((x + 1, y + 1, x + inner, y + h - 2), fill=1)


def _qr_fits(uri: str, max_px: int) -> bool:
    """Whether the QR of ``uri`` fits; a URI too long for any panel QR gets the URL page only."""
    if len(uri.encode()) > QR_MAX_BYTES:
        return False
    try:
        rows, scale = qr_matrix(uri, max_px)
    except Exception:  # noqa: BLE001 - segno's DataOverflowError and friends: no QR, not no screen
        return False
    return len(rows) * scale <= max_px


def render_code(code: DeviceCode, now_monotonic: float, page: int = 0, *,
                size: tuple[int, int] = SIZE, lifetime_s: float | None = None,
                device_id: str = "") -> Image.Image:
    """Page 0: QR + big code + time bar. Page 1: which box (``device_id``), the URL to open,
    the code and the time bar: the person approving can check the code is for the box in front
    of them, not one a phisher sent."""
    img, draw = _canvas(size)
    w, h = size
    left_s = code.seconds_left(now_monotonic)
    total = lifetime_s if lifetime_s and lifetime_s > 0 else max(DEFAULT_CODE_LIFETIME_S, left_s)
    fraction = left_s / total
    if w < h:
        return _render_code_portrait(img, draw, code, left_s, fraction)
    small = font(9)
    if page % 2 == 0 and _qr_fits(code.qr_uri, h):
        rows, scale = qr_matrix(code.qr_uri, h)
        qr_side = len(rows) * scale
        draw_qr(img, code.qr_uri, 0, (h - qr_side) // 2, h)
        x0 = qr_side + 3
        rw = w - x0 - 1
        _ink_text(draw, (x0, 1), "Sign-in code", small)
        top = 1 + _line_height(draw, small) + 3
        bottom_area = _line_height(draw, small) + 9
        parts = split_code(code.user_code)
        one_line = _fit_size(draw, [code.user_code], rw, h - top - bottom_area, 0, bold=True, max_size=30)
        two_line = _fit_size(draw, parts, rw, h - top - bottom_area, 4, bold=True, max_size=30)
        lines = [code.user_code] if one_line >= two_line else parts
        f = font(max(one_line, two_line))
        cap = _text_size(draw, "H", f)
        lh = cap[3] - cap[1]
        block = lh * len(lines) + 4 * (len(lines) - 1)
        y = top + (h - top - bottom_area - block) // 2
        for line in lines:
            _ink_text(draw, (x0 + (rw - _width(draw, line, f) - 1) // 2, y), line, f, bold=True)
            y += lh + 4
        ty = h - bottom_area + 1
        _ink_text(draw, (x0, ty - 1), _time_left_text(left_s), font(10))
        _bar(draw, x0, h - 5, rw, 5, fraction)
        return img
    # page 1: whose box, where to go, in text
    x0, rw = 2, w - 4
    f = font(10)
    if device_id:
        y = _title(draw, _ellipsized(draw, f"Box {device_id}", font(11), w - 4), w) - 1
    else:
        _ink_text(draw, (x0, 1), "On a phone or PC, open", small)
        y = 1 + _line_height(draw, small) + 2
    url_lines = _wrap_pixels(draw, code.verification_uri, f, rw, break_anywhere=True)[:2 if device_id else 3]
    y = _text_block(draw, url_lines, f, x0, y, rw, gap=1) + 3
    label = "enter" if device_id else "and enter"
    _ink_text(draw, (x0, y), label, small)
    label_w = _width(draw, label, small) + 4
    avail_h = h - 7 - y
    csize = _fit_size(draw, [code.user_code], rw - label_w, avail_h, 0, bold=True, max_size=18)
    cf = font(csize)
    _ink_text(draw, (x0 + label_w, y), code.user_code, cf, bold=True)
    _bar(draw, x0, h - 5, rw, 5, fraction)
    return img


def _render_code_portrait(img: Image.Image, draw: ImageDraw.ImageDraw, code: DeviceCode,
                          left_s: float, fraction: float) -> Image.Image:
    w, h = img.size
    rows, scale = qr_matrix(code.qr_uri, w)
    side = len(rows) * scale
    draw_qr(img, code.qr_uri, (w - side) // 2, 0, w)
    parts = split_code(code.user_code)
    top = side + 4
    avail = h - top - 16
    f = font(_fit_size(draw, parts, w - 2, avail, 4, bold=True, max_size=24))
    cap = _text_size(draw, "H", f)
    y = top
    for line in parts:
        _ink_text(draw, ((w - _width(draw, line, f) - 1) // 2, y), line, f, bold=True)
        y += cap[3] - cap[1] + 4
    _ink_text(draw, (1, h - 17), _time_left_text(left_s), font(10))
    _bar(draw, 1, h - 5, w - 2, 5, fraction)
    return img


def render_starting(snap: Snapshot, size: tuple[int, int] = SIZE) -> Image.Image:
    """Before a code exists: starting up, or asking the IdP for a code."""
    if snap.phase == "starting":
        return _message_screen("device-agent", "Starting\u2026", size)
    return _message_screen("Sign-in", "Getting a sign-in code\u2026", size)


def render_exhausted(size: tuple[int, int] = SIZE, notice: str | None = None) -> Image.Image:
    """Codes ran out; the title says why (expired, declined, not accepted)."""
    title = notice[:1].upper() + notice[1:] if notice and len(notice) <= 20 else "No sign-in code"
    return _message_screen(title, EXHAUSTED_TEXT, size)


def render_error(message: str, size: tuple[int, int] = SIZE) -> Image.Image:
    return _message_screen("Problem", message or "Unknown error: see the journal", size, max_size=12)


def render_notice(notice: str, size: tuple[int, int] = SIZE, *, title: str = "Note") -> Image.Image:
    return _message_screen(title, notice, size)


def render_stopped(size: tuple[int, int] = SIZE) -> Image.Image:
    return _message_screen("device-agent", "Stopped", size, max_size=16)


def _fmt_value(value: float) -> str:
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.4g}" if abs(value) >= 1000 else f"{value:.1f}"


def _link_dot(draw: ImageDraw.ImageDraw, x: int, y: int, state: str) -> None:
    """Filled = up, hollow = down, dash = off/unknown (the font has no check marks)."""
    if state == "up":
        draw.ellipse((x, y, x + 5, y + 5), fill=1)
    elif state == "down":
        draw.ellipse((x, y, x + 5, y + 5), outline=1)
        draw.line((x, y, x + 5, y + 5), fill=1)
    else:
        draw.line((x, y + 3, x + 5, y + 3), fill=1)


LAPSE_SHOWN_DAYS = 14.0     # the panel names the sign-in lapse only when it is this close


def health_lines(snap: Snapshot, now_monotonic: float | None = None) -> list[str]:
    """What the signed-in screen adds when a figure needs a person's eye: the clock while it is
    not synchronized (two lines: "clock not synchronized" / "(off by ~3 d)"), else a sign-in
    that lapses within LAPSE_SHOWN_DAYS if the box stays offline."""
    if snap.clock_note:
        head, _, rest = snap.clock_note.partition(" (")
        return [head] + ([f"({rest}"] if rest else [])
    days = snap.signin_lapses_in_days(now_monotonic)
    if days is not None and days < LAPSE_SHOWN_DAYS:
        return [f"sign-in lapses in {days:g} d"]
    return []


def _age(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def render_status(snap: Snapshot, size: tuple[int, int] = SIZE, *,
                  now_monotonic: float | None = None) -> Image.Image:
    """Signed in: account, latest reading, outbox depth (and the oldest reading's age once it is
    a minute old), link states; the health lines when there are any (the reading then takes one
    small line)."""
    img, draw = _canvas(size)
    w, h = size
    small = font(9)
    lh = _line_height(draw, small)
    account = snap.account or "signed in"
    _ink_text(draw, (1, 0), _ellipsized(draw, account, small, w - 2), small)
    draw.line((0, lh + 1, w - 1, lh + 1), fill=1)
    links_y = h - lh
    queue_y = links_y - lh - 2
    y = lh + 4
    r: LastReading | None = snap.last_reading
    health = health_lines(snap, now_monotonic)
    if health:
        y = lh + 2
        if r is None:
            line = "no readings yet"
        else:
            value = f"{_fmt_value(r.value)} {r.unit}".strip() if r.value is not None else "read error"
            line = f"{value}  {r.sensor}"
        _ink_text(draw, (1, y), _ellipsized(draw, line, small, w - 2), small)
        for i, text in enumerate(health[:2]):
            _ink_text(draw, (1, y + (i + 1) * (lh - 1) + 1), _ellipsized(draw, text, small, w - 2), small)
    elif r is None:
        _ink_text(draw, (1, y + 2), "no readings yet", small)
    else:
        text = f"{_fmt_value(r.value)} {r.unit}".strip() if r.value is not None else "read error"
        name_h = lh + 1
        big_h = queue_y - y - name_h - 2
        big = font(_fit_size(draw, [text], w - 2, big_h, 0, bold=True, max_size=18))
        _ink_text(draw, (1, y), text, big, bold=True)
        _ink_text(draw, (1, queue_y - name_h - 1), _ellipsized(draw, r.sensor, small, w - 2), small)
    o: OutboxCounts = snap.outbox
    queue = f"queued {o.pending}"
    oldest = snap.oldest_pending_s(now_monotonic)
    if oldest is not None and oldest >= 60:      # falling behind: how long the oldest waits
        queue += f" ({_age(oldest)})"
    if o.dead:
        queue += f"  dead {o.dead}"
    if o.dropped:
        queue += f"  dropped {o.dropped}"
    queue = _ellipsized(draw, queue, small, w - 2)
    if snap.storage != "ok":      # new readings are being dropped: this outranks the counts
        queue = "not storing: disk full" if snap.storage == "full" else "not storing: read-only"
        queue = _ellipsized(draw, queue, small, w - 2)
    _ink_text(draw, (1, queue_y), queue, small)
    x = 1
    for name_ in ("idp", "api", "mqtt"):
        state = snap.links.get(name_, "off" if name_ == "mqtt" else "unknown")
        label_ = {"idp": "IdP", "api": "API", "mqtt": "MQTT"}[name_]
        _ink_text(draw, (x, links_y), label_, small)
        x += _width(draw, label_, small) + 3
        _link_dot(draw, x, links_y + 1, state)
        x += 12
    return img


def _segno() -> Any:
    """segno, without running its writers (SVG, PDF, ... with xml.sax and gzip, ~4 ms x86) until
    something saves a QR to a file: the panel only reads the matrix (hw.lazymodule)."""
    if "segno" not in sys.modules:
        defer("segno.writers")
    import segno

    return segno


def _ellipsized(draw: ImageDraw.ImageDraw, text: str, f: Font, width: int) -> str:
    """``text`` on one line of ``width`` px, cut with an ellipsis when it does not fit."""
    lines = _wrap_pixels(draw, text, f, width, break_anywhere=True)
    if len(lines) <= 1:
        return lines[0] if lines else ""
    cut = lines[0][:-1] + "\u2026"
    while _width(draw, cut, f) > width and len(cut) > 1:   # the ellipsis is wider than a letter
        cut = cut[:-2] + "\u2026"
    return cut


def warm_up(size: tuple[int, int] = SIZE) -> None:
    """Load what every code screen needs (the QR encoder, the small fonts), so the first real
    code draws fast. Draws nothing: at start a trial render is CPU the code itself waits for."""
    _segno()

    for px in (9, 10):
        font(px)


# -- every screen, for eyes and the README -----------------------------------------------------------

def examples(now: float = 1000.0) -> dict[str, Image.Image]:
    """A representative image of every screen, keyed by file stem."""
    wall = datetime(2026, 11, 25, 14, 54, 32, tzinfo=UTC)
    entra = DeviceCode("F7KQ2XLPD", "https://microsoft.com/devicelogin", now + 754, wall, 5)
    oidc = DeviceCode("WDJB-MJHT", "https://idp.example.com/oidc/device", now + 301, wall, 5,
                      verification_uri_complete="https://idp.example.com/oidc/device?user_code=WDJB-MJHT")
    signed = Snapshot(phase="signed_in", account="greenhouse@contoso.onmicrosoft.com",
                      last_reading=LastReading("greenhouse.temperature", 21.4, "°C"),
                      outbox=OutboxCounts(pending=12, dead=1, dropped=0),
                      links={"idp": "up", "api": "down", "mqtt": "up"})
    return {
        "starting": render(Snapshot(), now),
        "getting_code": render(Snapshot(phase="signing_in"), now),
        "code_entra_qr": render(Snapshot(phase="signing_in", code=entra), now, 0),
        "code_entra_url": render(Snapshot(phase="signing_in", code=entra), now, 1),
        "code_entra_url_device": render(Snapshot(phase="signing_in", code=entra,
                                                 device_id="greenhouse-01"), now, 1),
        "code_complete_qr": render(Snapshot(phase="signing_in", code=oidc), now, 0, code_lifetime_s=600),
        "code_complete_url": render(Snapshot(phase="signing_in", code=oidc), now, 1, code_lifetime_s=600),
        "code_portrait": render(Snapshot(phase="signing_in", code=oidc), now, 0, size=(64, 128)),
        "exhausted": render(Snapshot(phase="error", renewals_exhausted=True, notice="code expired"), now),
        "status": render(signed, now),
        "status_clock": render(dataclasses.replace(signed, clock="corrected",
                                                   clock_note="clock not synchronized (off by ~3 d)",
                                                   oldest_pending_mono=now - 330), now),
        "status_signin_lapse": render(dataclasses.replace(signed, signin_lapse_mono=now + 9.5 * 86400), now),
        "status_no_reading": render(Snapshot(phase="signed_in", account="pi@example.org"), now),
        "status_app": render(dataclasses.replace(signed, account="app 3f2b8c1e-5d4a-4f6e-9b7c-1a2d3e4f5a6b"),
                             now),
        "status_app_identity": render(dataclasses.replace(
            signed, account="app 3f2b8c1e-5d4a-4f6e-9b7c-1a2d3e4f5a6b"), now, 1),
        "status_app_warning": render(dataclasses.replace(
            signed, account="app device-agent-demo",
            warning="The certificate in auth.certificate_file expires on 2026-12-20 (in 19 days): "
                    "renew it (README)"), now, 2),
        "error_device_code_blocked": render(Snapshot(phase="error", error=DEVICE_CODE_BLOCKED,
                                                              error_panel=DEVICE_CODE_BLOCKED_PANEL), now),
        "error": render(Snapshot(phase="error",
                                 error="Device sign-in is disabled for this app: ask your admin to allow "
                                       "public client flows"), now),
        "notice": render(Snapshot(phase="signing_in", notice="Code declined. Getting a new one\u2026"), now),
        "hold": render(Snapshot(phase="signed_in", notice=hold_notice(3.2)), now),
        "stopped": render(Snapshot(phase="stopped"), now),
    }


def main(argv: Sequence[str] | None = None) -> int:
    import argparse  # here: the panel imports this module at every start

    parser = argparse.ArgumentParser(prog="python -m agent.panel.screens",
                                     description="write every panel screen as a PNG")
    parser.add_argument("--out", required=True, type=Path, help="directory for the PNGs")
    parser.add_argument("--scale", type=int, default=1, help="enlarge N times (nearest neighbour)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, img in examples().items():
        if args.scale > 1:
            img = img.resize((img.width * args.scale, img.height * args.scale), Image.Resampling.NEAREST)
        img.save(args.out / f"{name}.png")
        print(args.out / f"{name}.png")  # noqa: T201 - the CLI's output
    return 0



if __name__ == "__main__":
    raise SystemExit(main())
