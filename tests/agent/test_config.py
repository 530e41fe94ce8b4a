"""`device-agent check-config`: every mistake is one line naming file and dotted key, exit 78.

Each bad config goes through the real command line (``agent.cli.main``), as an admin would run
it, and the test reads stderr/stdout the way a person would.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent import cli
from agent.sim.tls import TlsFiles

AUTHORITY = "https://login.microsoftonline.com/contoso.onmicrosoft.com"

DEFAULT_SECTIONS = {
    "device": 'id = "greenhouse-01"\nstate_dir = "{state}"',
    "auth": f'client_id = "11111111-2222-3333-4444-555555555555"\nauthority = "{AUTHORITY}"\n'
            'scopes = ["api://telemetry/Readings.Write"]',
    "upload": 'url = "https://api.example.com/v1/readings"',
}


def make_config(tmp_path: Path, extra: str = "", **sections: str | None) -> Path:
    """A config file: the default sections, overridden (None drops one), plus ``extra`` TOML.

    ``extra`` lines before a blank line that start with a bare key go above every table
    (top-level keys); the rest goes after the sections.
    """
    merged: dict[str, str | None] = {**DEFAULT_SECTIONS, **sections}
    parts = [f"[{name}]\n{body}\n" for name, body in merged.items() if body is not None]
    top = ""
    if extra and not extra.lstrip().startswith("["):
        top, extra = extra, ""
    text = top + "\n".join(parts) + ("\n" + extra if extra else "")
    (tmp_path / "c.pem").write_text("client certificate")
    (tmp_path / "bad-ca.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n"
                                         "-----END CERTIFICATE-----\n")
    path = tmp_path / "config.toml"
    path.write_text(text.replace("{state}", str(tmp_path / "state")).replace("{tmp}", str(tmp_path)))
    return path


def run_check(path: Path | None, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    argv = ["check-config"] + (["--config", str(path)] if path is not None else [])
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def auth(**changes: str | None) -> str:
    """The default [auth] body with keys replaced (value is raw TOML) or removed (None)."""
    keys = {"client_id": '"11111111-2222-3333-4444-555555555555"', "authority": f'"{AUTHORITY}"',
            "scopes": '["api://telemetry/Readings.Write"]'}
    keys.update(changes)
    return "\n".join(f"{k} = {v}" for k, v in keys.items() if v is not None)


SENSOR = '[[sensors]]\nname = "cpu"\ntype = "cpu_temperature"\n'

# (id, sections override, extra TOML, dotted key the message must name)
BAD: list[tuple[str, dict[str, str | None], str, str]] = [
    ("unknown-table", {}, "[colour]\nx = 1\n", "colour"),
    ("png-without-path", {"display": 'driver = "png"\npath = ""'}, "", "display.path"),
    ("unknown-auth-key", {"auth": auth(colour='"blue"')}, "", "auth.colour"),
    ("auth-missing", {"auth": None}, "", "auth"),
    ("client-id-missing", {"auth": auth(client_id=None)}, "", "auth.client_id"),
    ("client-id-empty", {"auth": auth(client_id='"  "')}, "", "auth.client_id"),
    ("authority-and-oidc", {"auth": auth(oidc_authority='"https://idp.example.com/realms/iot"')}, "",
     "auth.authority, auth.oidc_authority"),
    ("no-authority", {"auth": auth(authority=None)}, "", "auth.authority"),
    ("authority-http", {"auth": auth(authority='"http://login.example.com/contoso"')}, "",
     "auth.authority"),
    ("oidc-authority-http", {"auth": auth(authority=None, oidc_authority='"http://idp.example.com/iot"')},
     "", "auth.oidc_authority"),
    ("authority-no-tenant", {"auth": auth(authority='"https://login.microsoftonline.com/"')}, "",
     "auth.authority"),
    ("scopes-missing", {"auth": auth(scopes=None)}, "", "auth.scopes"),
    ("scopes-empty", {"auth": auth(scopes="[]")}, "", "auth.scopes"),
    ("scopes-string", {"auth": auth(scopes='"api://telemetry/Readings.Write"')}, "", "auth.scopes"),
    ("scope-blank", {"auth": auth(scopes='["api://x/y", ""]')}, "", "auth.scopes[1]"),
    ("timeout-zero", {"auth": auth(timeout_s="0")}, "", "auth.timeout_s"),
    ("timeout-string", {"auth": auth(timeout_s='"30"')}, "", "auth.timeout_s"),
    ("renew-negative", {"auth": auth(auto_renew_codes="-1")}, "", "auth.auto_renew_codes"),
    ("renew-float", {"auth": auth(auto_renew_codes="2.5")}, "", "auth.auto_renew_codes"),
    ("instance-discovery-string", {"auth": auth(instance_discovery='"no"')}, "", "auth.instance_discovery"),
    ("ca-file-missing", {"auth": auth(ca_file='"/nonexistent/ca.pem"')}, "", "auth.ca_file"),
    # A CA file must hold a PEM certificate ssl can load (else every handshake fails in run).
    ("ca-file-not-pem", {"auth": auth(ca_file='"{tmp}/c.pem"')}, "", "auth.ca_file"),
    ("ca-file-bad-pem", {"auth": auth(ca_file='"{tmp}/bad-ca.pem"')}, "", "auth.ca_file"),
    ("upload-ca-file-not-pem", {"upload": 'url = "https://api.example.com/r"\nca_file = "{tmp}/c.pem"'}, "",
     "upload.ca_file"),
    ("mqtt-ca-file-not-pem", {}, '[mqtt]\nurl = "mqtts://b.example.com"\nca_file = "{tmp}/c.pem"\n',
     "mqtt.ca_file"),
    ("mqtt-ca-file-dir", {}, '[mqtt]\nurl = "mqtts://b.example.com"\nca_file = "{tmp}"\n', "mqtt.ca_file"),
    ("device-id-bad", {"device": 'id = "green house!"'}, "", "device.id"),
    ("device-id-too-long", {"device": f'id = "{"x" * 65}"'}, "", "device.id"),
    ("state-dir-empty", {"device": 'state_dir = ""'}, "", "device.state_dir"),
    ("device-not-table", {"device": None}, 'device = "x"\n', "device"),
    ("display-driver", {}, '[display]\ndriver = "lcd"\n', "display.driver"),
    ("display-rotate", {}, "[display]\nrotate = 4\n", "display.rotate"),
    ("display-address", {}, "[display]\naddress = 0x100\n", "display.address"),
    ("gpio-same-pin", {}, "[gpio]\nbutton = 17\nled = 17\n", "gpio.button, gpio.led"),
    ("gpio-backend", {}, '[gpio]\nbackend = "wiringpi"\n', "gpio.backend"),
    ("mqtt-scheme", {}, '[mqtt]\nurl = "http://broker.example.com"\n', "mqtt.url"),
    ("mqtt-insecure-remote", {}, '[mqtt]\nurl = "mqtt://broker.example.com:1883"\n', "mqtt.url"),
    ("mqtt-url-missing", {}, '[mqtt]\nusername = "dev"\n', "mqtt.url"),
    ("mqtt-cert-without-key", {}, '[mqtt]\nurl = "mqtts://b.example.com"\nclient_cert = "{tmp}/c.pem"\n',
     "mqtt.client_cert, mqtt.client_key"),
    ("mqtt-prefix-wildcard", {}, '[mqtt]\nurl = "mqtts://b.example.com"\ntopic_prefix = "a/#"\n',
     "mqtt.topic_prefix"),
    ("mqtt-bad-port", {}, '[mqtt]\nurl = "mqtts://b.example.com:99999"\n', "mqtt.url"),
    ("sensors-duplicate", {}, SENSOR + SENSOR, "sensors[0].name, sensors[1].name"),
    # Reading names collide: a bme280 named env reports env.temperature/.pressure/.humidity.
    ("sensor-reading-collides", {},
     '[[sensors]]\nname = "env"\ntype = "bme280"\n[[sensors]]\nname = "env.temperature"\ntype = "cpu_temperature"\n',
     "sensors[0].name, sensors[1].name"),
    ("sensor-reading-collides-before", {},
     '[[sensors]]\nname = "env.humidity"\ntype = "simulated"\n[[sensors]]\nname = "x"\ntype = "cpu_temperature"\n'
     '[[sensors]]\nname = "env"\ntype = "bme280"\n',
     "sensors[0].name, sensors[2].name"),
    ("sensor-type", {}, '[[sensors]]\nname = "t"\ntype = "thermo"\n', "sensors[0].type"),
    ("sensor-interval-zero", {}, SENSOR + "interval_s = 0\n", "sensors[0].interval_s"),
    ("sensor-name-upper", {}, '[[sensors]]\nname = "CPU"\ntype = "cpu_temperature"\n', "sensors[0].name"),
    ("sensor-unknown-key", {}, SENSOR + "colour = 1\n", "sensors[0].colour"),
    ("counter-without-pin", {}, '[[sensors]]\nname = "rain"\ntype = "gpio_counter"\n', "sensors[0].pin"),
    ("ds18b20-without-device", {}, '[[sensors]]\nname = "soil"\ntype = "ds18b20"\n', "sensors[0].device"),
    ("sensor-pin-taken", {},
     '[gpio]\nbutton = 5\n[[sensors]]\nname = "rain"\ntype = "gpio_counter"\npin = 5\n', "sensors[0].pin"),
    ("second-sensor-bad", {}, SENSOR + '[[sensors]]\nname = "x"\ntype = "simulated"\nwaveform = "zigzag"\n',
     "sensors[1].waveform"),
    ("sensors-not-array", {}, "sensors = 5\n", "sensors"),
    ("batch-max-zero", {"upload": 'url = "https://api.example.com/r"\nbatch_max = 0'}, "",
     "upload.batch_max"),
    ("batch-max-huge", {"upload": 'url = "https://api.example.com/r"\nbatch_max = 10001'}, "",
     "upload.batch_max"),
    ("upload-url-http", {"upload": 'url = "http://api.example.com/r"'}, "", "upload.url"),
    ("upload-compress-unknown", {"upload": 'url = "https://api.example.com/r"\ncompress = "brotli"'}, "",
     "upload.compress"),
    ("refresh-lifetime-zero", {"auth": auth(refresh_lifetime_days="0")}, "", "auth.refresh_lifetime_days"),
    ("upload-url-missing", {"upload": "batch_max = 5"}, "", "upload.url"),
    ("upload-sink", {"upload": 'sink = "ftp"'}, "", "upload.sink"),
    ("upload-interval-zero", {"upload": 'url = "https://api.example.com/r"\ninterval_s = 0'}, "",
     "upload.interval_s"),
    ("graph-list-site", {"upload": 'sink = "graph_list"\nlist_id = "l"'}, "", "upload.site_id"),
    ("graph-excel-path", {"upload": 'sink = "graph_excel"\nitem_path = "me/drive"\ntable = "T"'}, "",
     "upload.item_path"),
    ("graph-url-http", {"upload": 'sink = "graph_list"\ngraph_url = "http://graph.example.com"\n'
                                  'site_id = "s"\nlist_id = "l"'}, "", "upload.graph_url"),
    ("log-level", {}, '[log]\nlevel = "verbose"\n', "log.level"),
    # Plain mqtt:// only to a loopback IP literal or exactly localhost: names that merely start
    # with 127. resolve wherever their owner likes.
    ("mqtt-insecure-127-name", {}, '[mqtt]\nurl = "mqtt://127.evil.com:1883"\n', "mqtt.url"),
    ("mqtt-insecure-nip-io", {}, '[mqtt]\nurl = "mqtt://127.0.0.1.nip.io"\n', "mqtt.url"),
    ("mqtt-insecure-localhost-suffix", {}, '[mqtt]\nurl = "mqtt://localhost.evil.com"\n', "mqtt.url"),
    # Non-finite numbers: TOML has inf and nan; no timer may be infinite.
    ("upload-interval-inf", {"upload": 'url = "https://api.example.com/r"\ninterval_s = inf'}, "",
     "upload.interval_s"),
    ("sensor-interval-inf", {}, SENSOR + "interval_s = inf\n", "sensors[0].interval_s"),
    ("display-sleep-inf", {}, "[display]\nsleep_after_s = inf\n", "display.sleep_after_s"),
    ("auth-timeout-nan", {"auth": auth(timeout_s="nan")}, "", "auth.timeout_s"),
    ("sim-period-inf", {}, '[[sensors]]\nname = "w"\ntype = "simulated"\nperiod_s = inf\n',
     "sensors[0].period_s"),
    # device.state_dir: absolute, and not a file (nor under one).
    ("state-dir-relative", {"device": 'state_dir = "var/lib/device-agent"'}, "", "device.state_dir"),
    ("state-dir-is-file", {"device": 'state_dir = "{tmp}/c.pem"'}, "", "device.state_dir"),
    ("state-dir-under-file", {"device": 'state_dir = "{tmp}/c.pem/state"'}, "", "device.state_dir"),
]


@pytest.mark.parametrize(("sections", "extra", "key"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config_names_the_key_and_exits_78(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               sections: dict[str, str | None], extra: str, key: str) -> None:
    path = make_config(tmp_path, extra, **sections)
    code, out, err = run_check(path, capsys)
    assert code == 78
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"config error: {path}: {key}: "), lines[0]
    assert len(lines[0]) > len(f"config error: {path}: {key}: ") + 5, "says what is wrong"
    assert "Traceback" not in err


def test_there_are_at_least_25_distinct_bad_configs() -> None:
    assert len({b[0] for b in BAD}) >= 25
    assert len({(repr(b[1]), b[2]) for b in BAD}) == len(BAD)


@pytest.mark.parametrize("bad_line", ["level = = 'info'", "level = 'info", 'level = "info'])
def test_toml_syntax_error_names_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          bad_line: str) -> None:
    path = make_config(tmp_path, f"[log]\n{bad_line}\n")
    code, _, err = run_check(path, capsys)
    lines = err.splitlines()
    assert code == 78 and len(lines) == 1, err
    n = path.read_text().splitlines().index(bad_line) + 1
    assert lines[0].startswith(f"config error: {path}: line {n}: TOML syntax error"), lines[0]


def test_file_that_is_not_utf8_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = make_config(tmp_path, '[[sensors]]\nname = "t"\ntype = "simulated"\nunit = "C"\n')
    path.write_bytes(path.read_bytes().replace(b'unit = "C"', b'unit = "\xb0C"'))   # latin-1 degree sign
    code, _, err = run_check(path, capsys)
    assert code == 78
    n = path.read_bytes().split(b"\n").index(b'unit = "\xb0C"') + 1
    assert err.splitlines() == [
        f"config error: {path}: line {n}: not UTF-8 (byte 0xb0); save the file as UTF-8"]


def test_missing_file_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_check(tmp_path / "nope.toml", capsys)
    assert code == 78
    assert err.startswith(f"config error: {tmp_path / 'nope.toml'}: file not found")
    assert len(err.splitlines()) == 1


def test_minimal_config_prints_effective_defaults(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = make_config(tmp_path)
    code, out, err = run_check(path, capsys)
    assert code == 0, err
    assert err.strip() == f"{path}: OK"
    data = json.loads(out)
    assert data["device"] == {"id": "greenhouse-01", "state_dir": str(tmp_path / "state")}
    assert data["auth"]["timeout_s"] == 30 and data["auth"]["auto_renew_codes"] == 3
    assert data["auth"]["instance_discovery"] is True
    assert data["display"]["driver"] == "none"
    assert data["upload"]["sink"] == "http" and data["upload"]["batch_max"] == 500
    assert data["log"]["level"] == "info"
    assert "mqtt" not in data and data["sensors"] == []


def test_device_id_defaults_to_the_hostname(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    monkeypatch.setattr(socket, "gethostname", lambda: "pi 4/b")
    path = make_config(tmp_path, device='state_dir = "{state}"')
    code, out, _ = run_check(path, capsys)
    assert code == 0
    assert json.loads(out)["device"]["id"] == "pi-4-b"


def test_config_path_from_environment(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_config(tmp_path)
    monkeypatch.setenv("DEVICE_AGENT_CONFIG", str(path))
    code, out, err = run_check(None, capsys)
    assert code == 0, err
    assert json.loads(out)["device"]["id"] == "greenhouse-01"
    # --config wins over the environment.
    monkeypatch.setenv("DEVICE_AGENT_CONFIG", str(tmp_path / "missing.toml"))
    assert run_check(path, capsys)[0] == 0


def test_default_path_is_etc(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                             tmp_path: Path) -> None:
    from agent import config

    assert config.config_path(None, {}) == Path("/etc/device-agent/config.toml")
    # Without --config or the variable the CLI reads the default path (pointed somewhere empty
    # here, so that a real /etc/device-agent on this machine cannot change the outcome).
    monkeypatch.delenv("DEVICE_AGENT_CONFIG", raising=False)
    missing = tmp_path / "etc" / "config.toml"
    monkeypatch.setattr(config, "DEFAULT_PATH", missing)
    code, _, err = run_check(None, capsys)
    assert code == 78
    assert err.startswith(f"config error: {missing}: file not found")


@pytest.mark.parametrize(("env", "expected"), [
    ("/var/lib/private/device-agent", "/var/lib/private/device-agent"),
    ("/var/lib/a:/var/lib/b", "/var/lib/a"),           # systemd lists several with ':'
    (None, "/var/lib/device-agent"),
])
def test_state_dir_from_state_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch, env: str | None,
                                        expected: str) -> None:
    if env is None:
        monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    else:
        monkeypatch.setenv("STATE_DIRECTORY", env)
    path = make_config(tmp_path, device='id = "d1"')
    code, out, _ = run_check(path, capsys)
    assert code == 0
    assert json.loads(out)["device"]["state_dir"] == expected


def test_config_state_dir_wins_over_state_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/other")
    code, out, _ = run_check(make_config(tmp_path), capsys)
    assert code == 0
    assert json.loads(out)["device"]["state_dir"] == str(tmp_path / "state")


def test_full_contract_example_is_accepted(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          tls: TlsFiles) -> None:
    (tmp_path / "ca.pem").write_bytes(tls.ca_file.read_bytes())
    (tmp_path / "mqtt.pass").write_text("hunter2-secret\n")
    (tmp_path / "c.pem").write_text("cert")
    (tmp_path / "c.key").write_text("-----BEGIN PRIVATE KEY-----\nkey-material-secret\n")
    path = make_config(
        tmp_path,
        '[display]\ndriver = "png"\ninterface = "i2c"\nport = 1\naddress = 0x3C\nrotate = 2\n'
        'path = "{tmp}/screen.png"\nsleep_after_s = 0\n'
        '[gpio]\nbackend = "fake"\nbutton = 17\nled = 27\n'
        '[mqtt]\nurl = "mqtts://broker.example.com:8883"\nusername = "dev"\n'
        'password_file = "{tmp}/mqtt.pass"\nca_file = "{tmp}/ca.pem"\nclient_cert = "{tmp}/c.pem"\n'
        'client_key = "{tmp}/c.key"\ntopic_prefix = "site/a"\n'
        '[[sensors]]\nname = "cpu"\ntype = "cpu_temperature"\ninterval_s = 60\n'
        '[[sensors]]\nname = "soil"\ntype = "ds18b20"\ndevice = "28-0316a2793fff"\n'
        '[[sensors]]\nname = "rain"\ntype = "gpio_counter"\npin = 22\ninterval_s = 0.5\n'
        '[[sensors]]\nname = "sim.wave"\ntype = "simulated"\nwaveform = "square"\nperiod_s = 10\n'
        '[log]\nlevel = "debug"\n',
        auth=auth(ca_file='"{tmp}/ca.pem"', timeout_s="12.5", auto_renew_codes="0",
                  instance_discovery="false"),
        upload='sink = "graph_excel"\nitem_path = "/me/drive/root:/sensors.xlsx:"\ntable = "Readings"\n'
               'batch_max = 10000',
    )
    code, out, err = run_check(path, capsys)
    assert code == 0, err
    data = json.loads(out)
    assert [s["name"] for s in data["sensors"]] == ["cpu", "soil", "rain", "sim.wave"]
    assert data["auth"]["auto_renew_codes"] == 0 and data["auth"]["timeout_s"] == 12.5
    assert data["mqtt"]["topic_prefix"] == "site/a"
    # Masking: secrets' paths may show, their contents never.
    assert "hunter2-secret" not in out and "key-material-secret" not in out
    assert data["mqtt"]["password_file"].endswith("(contents not shown)")


def test_loopback_mqtt_without_tls_is_allowed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = make_config(tmp_path, '[mqtt]\nurl = "mqtt://127.0.0.1:1883"\n')
    code, _, err = run_check(path, capsys)
    assert code == 0, err


def test_oidc_authority_alone_is_accepted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = make_config(tmp_path, auth=auth(authority=None,
                                           oidc_authority='"https://idp.example.com/realms/iot"'))
    code, out, err = run_check(path, capsys)
    assert code == 0, err
    assert json.loads(out)["auth"]["oidc_authority"] == "https://idp.example.com/realms/iot"


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_number_says_finite(tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str) -> None:
    path = make_config(tmp_path, upload=f'url = "https://api.example.com/r"\ninterval_s = {value}')
    code, _, err = run_check(path, capsys)
    assert code == 78
    assert "upload.interval_s: must be a finite number (>= 0.001), not " in err, err
    assert "not a number, not" not in err


def test_state_dir_that_is_a_file_is_a_config_error_for_run_too(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = make_config(tmp_path, device='state_dir = "{tmp}/c.pem"')
    code = cli.main(["run", "--config", str(path)])
    _, err = capsys.readouterr()
    assert code == 78
    assert err.splitlines() == [err.strip()] and err.startswith(f"config error: {path}: device.state_dir: "), err
    assert "not a directory" in err


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.255.0.9", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("127.evil.com", False), ("127.0.0.1.nip.io", False), ("localhost.evil.com", False),
    ("128.0.0.1", False), ("::2", False), ("0.0.0.0", False), ("", False), ("127.1", False),
])
def test_is_loopback_host_is_exact(host: str, loopback: bool) -> None:
    from agent.net.hosts import is_loopback_host
    assert is_loopback_host(host) is loopback


def test_ca_file_with_a_certificate_is_accepted_everywhere(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          tls: TlsFiles) -> None:
    ca = f'"{tls.ca_file}"'
    path = make_config(tmp_path, f'[mqtt]\nurl = "mqtts://b.example.com"\nca_file = {ca}\n',
                       auth=auth(ca_file=ca), upload=f'url = "https://api.example.com/r"\nca_file = {ca}')
    code, out, err = run_check(path, capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["auth"]["ca_file"] == data["upload"]["ca_file"] == data["mqtt"]["ca_file"] == str(tls.ca_file)


def test_ca_file_without_certificate_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = make_config(tmp_path, auth=auth(ca_file='"/etc/hostname"'))
    code, _, err = run_check(path, capsys)
    assert code == 78
    assert err == (f"config error: {path}: auth.ca_file: '/etc/hostname' holds no PEM certificate "
                   "(-----BEGIN CERTIFICATE-----); name the CA bundle in PEM form\n")


def test_sensor_reading_collision_names_the_reading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = make_config(tmp_path, '[[sensors]]\nname = "env"\ntype = "bme280"\n'
                                 '[[sensors]]\nname = "env.temperature"\ntype = "cpu_temperature"\n')
    code, _, err = run_check(path, capsys)
    assert code == 78
    assert err == (f"config error: {path}: sensors[0].name, sensors[1].name: both sensors report readings "
                   "named 'env.temperature' ('env' and 'env.temperature'); rename one\n")


def test_bme280_readings_are_the_declared_quantities() -> None:
    """What config checks against is what the driver reports."""
    from hw import registry
    from hw.fake import FakeBme280Bus

    read = registry.open_sensor("bme280", {"bus": FakeBme280Bus()}, None).read()
    assert sorted(m.quantity for m in read) == sorted(registry.sensor_quantities("bme280"))
    assert set(registry.sensor_quantities("bme280")) == {"temperature", "pressure", "humidity"}
    assert registry.sensor_quantities("cpu_temperature") == ()
