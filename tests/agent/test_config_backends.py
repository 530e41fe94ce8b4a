"""Config takes backend names, options and defaults from hw.registry: nothing is copied.

A new sensor type is one module plus one registry line; these tests add one and watch
``check-config`` accept its keys, fill in its defaults and refuse keys it did not declare.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hw import registry
from tests.agent.test_config import make_config, run_check


@pytest.fixture
def new_sensor_type(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A sensor module written now and registered with one line, as a contributor would."""
    pkg = tmp_path / "extra_sensors"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "anemometer.py").write_text(textwrap.dedent('''
        from hw.base import Measurement, Option
        OPTIONS = {"radius_m": Option("number", 0.07, minimum=0.01),
                   "mode": Option("string", "cup", choices=("cup", "sonic")),
                   "channel": Option("integer", minimum=0, maximum=7, required="ADC channel 0-7")}
        class Anemometer:
            kind = "anemometer"
            def __init__(self, options):
                self.options = dict(options)
            def read(self):
                return [Measurement(self.options["radius_m"], "m")]
            def close(self):
                pass
        def open_sensor(options, gpio):
            return Anemometer(options)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry.SENSORS, "anemometer", "extra_sensors.anemometer")
    return "anemometer"


def test_a_registered_sensor_type_gets_its_declared_keys_and_defaults(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], new_sensor_type: str) -> None:
    path = make_config(tmp_path, f'[[sensors]]\nname = "wind"\ntype = "{new_sensor_type}"\nchannel = 3\n')
    code, out, err = run_check(path, capsys)
    assert code == 0, err
    [wind] = json.loads(out)["sensors"]
    assert wind == {"name": "wind", "type": "anemometer", "interval_s": 60.0, "radius_m": 0.07,
                    "mode": "cup", "channel": 3}
    sensor = registry.open_sensor("anemometer", {"channel": 1}, None)
    assert sensor.read()[0].value == 0.07, "the module's default reaches the sensor"


@pytest.mark.parametrize(("body", "key", "says"), [
    ('channel = 3\ncolour = "red"\n', "colour", "unknown key; allowed here: channel, interval_s, mode, "
                                                 "name, radius_m, type"),
    ("", "channel", "required for type anemometer (ADC channel 0-7)"),
    ("channel = 9\n", "channel", "9 is out of range; allowed 0..7"),
    ('channel = 1\nmode = "hot-wire"\n', "mode", "'hot-wire' is not one of: cup, sonic"),
    ('channel = 1\nradius_m = "big"\n', "radius_m", "must be a number, not a string"),
])
def test_a_registered_sensor_type_is_checked_like_the_built_in_ones(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], new_sensor_type: str,
        body: str, key: str, says: str) -> None:
    path = make_config(tmp_path, f'[[sensors]]\nname = "wind"\ntype = "{new_sensor_type}"\n{body}')
    code, out, err = run_check(path, capsys)
    assert (code, out) == (78, "")
    assert err.splitlines() == [f"config error: {path}: sensors[0].{key}: {says}"]


def test_a_key_of_another_sensor_type_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = make_config(tmp_path, '[[sensors]]\nname = "cpu"\ntype = "cpu_temperature"\nwaveform = "sine"\n')
    code, _, err = run_check(path, capsys)
    assert code == 78
    assert err.splitlines() == [f"config error: {path}: sensors[0].waveform: unknown key; allowed here: "
                                "interval_s, name, path, type"]


def test_built_in_defaults_are_shown_by_check_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = make_config(tmp_path, '[[sensors]]\nname = "air"\ntype = "bme280"\n'
                                 '[[sensors]]\nname = "sim"\ntype = "simulated"\n')
    code, out, err = run_check(path, capsys)
    assert code == 0, err
    air, sim = json.loads(out)["sensors"]
    assert (air["address"], air["port"]) == (0x76, 1)
    assert (sim["waveform"], sim["period_s"], sim["unit"]) == ("sine", 60.0, "°C")


def test_display_and_gpio_names_come_from_the_registry(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_config(tmp_path, '[display]\ndriver = "epaper"\n[gpio]\nbackend = "fake"\n')
    assert run_check(path, capsys)[2].endswith(
        "display.driver: 'epaper' is not one of: ssd1306, sh1106, png, console, none\n")
    monkeypatch.setitem(registry.DISPLAYS, "epaper", ("hw.png", "open_display"))
    monkeypatch.setattr(registry, "DISPLAY_DRIVERS", (*registry.DISPLAYS, registry.NO_DISPLAY))
    code, out, err = run_check(path, capsys)
    assert code == 0, err
    assert json.loads(out)["display"]["driver"] == "epaper"


def test_loading_config_imports_no_driver_library(tmp_path: Path) -> None:
    """Startup cost: validating a config with every sensor type loads no Pillow imaging, luma, RPi
    or smbus2. (The bare ``PIL`` package, its version string, is imported by ``hw`` so that the
    tag tables it defers hang from it: hw/lazymodule.py.)"""
    path = make_config(tmp_path, "".join(
        f'[[sensors]]\nname = "s{i}"\ntype = "{kind}"\n' + {"ds18b20": 'device = "28-1"\n',
                                                           "gpio_counter": "pin = 5\n"}.get(kind, "")
        for i, kind in enumerate(registry.SENSORS)) + '[display]\ndriver = "ssd1306"\n')
    code = ("import sys; from pathlib import Path; from agent import config; "
            f"config.load(Path({str(path)!r})); "
            "from hw.lazymodule import is_deferred; "
            "print(sorted({m.split('.')[0] for m, mod in list(sys.modules.items()) if mod is not None "
            "and m != 'PIL' and not m.startswith('PIL._') and not is_deferred(mod)} "
            "& {'PIL', 'luma', 'RPi', 'smbus2'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
