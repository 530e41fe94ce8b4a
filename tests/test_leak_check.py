"""The autouse leak check (tests/fixtures/leaks.py) fails a test that leaves a backend open.

Run on a small suite of its own in a subprocess: one test leaks a fake GPIO, one a PNG display,
one closes both, and one leans on a module-scoped GPIO opened before it ran.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SUITE = '''
import pytest
from hw.fake import FakeGpio
from hw.registry import open_display

@pytest.fixture(scope="module")
def shared_gpio():
    gpio = FakeGpio()
    yield gpio
    gpio.close()

def test_leaks_gpio():
    FakeGpio().setup_output(5)

def test_leaks_png(tmp_path):
    open_display("png", path=str(tmp_path / "s.png"))

def test_tidy(tmp_path):
    gpio = FakeGpio()
    display = open_display("png", path=str(tmp_path / "s.png"))
    display.close()
    gpio.close()

def test_uses_module_fixture(shared_gpio):
    shared_gpio.setup_output(6)

def test_after_a_leak_the_pin_is_free_again():
    gpio = FakeGpio()
    gpio.setup_output(5)
    gpio.close()
'''


def test_leak_check_fails_exactly_the_tests_that_leave_something_open(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["tests.fixtures.leaks"]\n')
    (tmp_path / "test_suite.py").write_text(textwrap.dedent(SUITE))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    inner = tmp_path / "inner"
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore",
                          f"--basetemp={inner}", str(tmp_path / "test_suite.py")],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    lines = out.stdout.splitlines()
    failed = [line.strip("_ ").removeprefix("ERROR at teardown of ") for line in lines
              if "ERROR at teardown of" in line]
    reports = [line for line in lines if line.startswith("left open by this test")]
    assert failed == ["test_leaks_gpio", "test_leaks_png"], out.stdout
    assert reports == ["left open by this test (close it, or use the fixture that does): FakeGpio",
                       "left open by this test (close it, or use the fixture that does): png display "
                       f"{inner}/test_leaks_png0/s.png"], out.stdout
    assert lines[-1].startswith("5 passed, 2 errors"), out.stdout
