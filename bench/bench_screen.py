"""Time from state.code_issued to the rebuilt frame on the fake I2C bus showing that code,
through the real luma ssd1306/sh1106 drivers and the Panel thread; and the display stack's
import time (fresh interpreters).

    .venv/bin/python bench/bench_screen.py [--runs 100] [--imports 10]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import zxingcpp

from agent.panel.observer import Panel
from agent.state import AgentState, DeviceCode
from hw.fakebus import FakeI2CBus
from hw.registry import open_display


class TimedBus(FakeI2CBus):
    """Notes the moment each full frame has landed in the controller's RAM."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.frame_done = threading.Event()
        self.frame_at = 0.0

    def write_i2c_block_data(self, i2c_addr: int, register: int, data: Sequence[int]) -> None:
        before = self.frames
        super().write_i2c_block_data(i2c_addr, register, data)
        if self.frames != before:
            self.frame_at = time.perf_counter()
            self.frame_done.set()


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def code_latency(controller: str, runs: int) -> list[float]:
    bus = TimedBus(controller)
    display = open_display(controller, bus=bus)
    assert display is not None
    state = AgentState()
    panel = Panel(display, state).start()
    panel.warmed_up.wait(5)                             # starting screen drawn, fonts loaded
    out: list[float] = []
    try:
        for i in range(runs):
            user_code = f"{i:04d}-WXYZ"
            uri = f"https://127.0.0.1:8443/oidc/device?user_code={user_code}"
            code = DeviceCode(user_code, "https://127.0.0.1:8443/oidc/device", time.monotonic() + 900,
                              datetime.now(UTC), 5, verification_uri_complete=uri)
            bus.frame_done.clear()
            t0 = time.perf_counter()
            state.code_issued(code)
            if not bus.frame_done.wait(2):
                raise SystemExit(f"{controller}: no frame within 2 s")
            out.append(bus.frame_at - t0)
            got = [r.text for r in zxingcpp.read_barcodes(bus.image.convert("L"), try_invert=False)]
            if got != [uri]:
                raise SystemExit(f"{controller}: frame holds {got}, wanted {uri}")
            bus.frame_done.clear()
            state.code_cleared()
            bus.frame_done.wait(2)
            time.sleep(0.005)
    finally:
        panel.stop(final="blank")
        display.close()
    return out


IMPORTS = {
    "luma.oled.device": "import luma.oled.device",
    "PIL (Image, ImageDraw, ImageFont)": "from PIL import Image, ImageDraw, ImageFont",
    "segno": "import segno",
    "agent.panel.screens + hw.oled (first screen; segno deferred)": "import agent.panel.screens, hw.oled",
    "everything for the code screen": "import agent.panel.screens, hw.oled, segno",
}


def import_time(stmt: str, n: int) -> float:
    code = f"import time; t = time.perf_counter(); {stmt}; print(time.perf_counter() - t)"
    samples = []
    for _ in range(n):
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        samples.append(float(res.stdout.strip()))
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--imports", type=int, default=10)
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}; code_issued -> rebuilt frame with the code, {args.runs} runs")
    for controller in ("ssd1306", "sh1106"):
        lat = code_latency(controller, args.runs)
        print(f"  {controller}: median {statistics.median(lat) * 1000:.1f} ms, "
              f"p90 {pct(lat, 90) * 1000:.1f} ms, max {max(lat) * 1000:.1f} ms")
    print(f"import time, fresh interpreter, median of {args.imports}")
    for label, stmt in IMPORTS.items():
        print(f"  {label}: {import_time(stmt, args.imports) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
