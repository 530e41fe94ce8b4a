"""TOML configuration -> frozen dataclasses. The only reader of the config file and environment.

Every key is checked here so that the rest of the agent can trust its settings; a mistake
becomes one ``ConfigError`` line naming the file and the dotted key (docs/INTERFACE.md#configuration).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import field, fields
from pathlib import Path
from typing import Any, Literal, NoReturn, cast, get_args
from urllib.parse import urlsplit

from agent.errors import ConfigError
from agent.net.hosts import is_loopback_host
from hw import registry
from hw.base import DisplayOptions, Option
from hw.records import record

DEFAULT_PATH = Path("/etc/device-agent/config.toml")
DEFAULT_STATE_DIR = Path("/var/lib/device-agent")

AUTH_FLOWS = ("device_code", "client_certificate")
_DEVICE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_SENSOR_NAME = re.compile(r"^[a-z0-9_.-]{1,64}$")
_TOPIC_PREFIX = re.compile(r"^[^#+\x00]{1,128}$")


def is_topic_prefix(prefix: str) -> bool:
    """A prefix topics can be built on: no MQTT wildcard (+ #), no NUL, no leading/trailing /."""
    return bool(_TOPIC_PREFIX.match(prefix)) and not prefix.startswith("/") and not prefix.endswith("/")

# Backend names (display drivers, GPIO backends, sensor types and their options) come from
# hw/registry.py; sinks are the agent's own.
SINKS = ("http", "graph_list", "graph_excel")
OnStop = Literal["stopped", "blank"]
# OIDC scopes msal adds to every request itself and refuses to be given in auth.scopes.
RESERVED_SCOPES = ("openid", "profile", "offline_access")


@record
class DeviceSettings:
    id: str
    state_dir: Path


@record
class AuthSettings:
    client_id: str
    scopes: tuple[str, ...]
    authority: str | None = None
    oidc_authority: str | None = None
    instance_discovery: bool = True
    ca_file: str = ""
    timeout_s: float = 30.0
    auto_renew_codes: int = 3
    flow: str = "device_code"            # device_code | client_certificate (app-only)
    certificate_file: str = ""           # client_certificate: PEM certificate (+ chain)
    private_key_file: str = ""           # client_certificate: PEM key, 0600/0400, service user or root
    send_certificate_chain: bool = False  # client_certificate: x5c for subject-name/issuer registrations
    dropped_scopes: tuple[str, ...] = ()     # reserved OIDC scopes taken out of auth.scopes
    refresh_lifetime_days: float = 90.0   # the IdP's refresh-token inactivity lifetime

    @property
    def authority_url(self) -> str:
        """Whichever of ``authority``/``oidc_authority`` is set (exactly one is)."""
        return self.authority or self.oidc_authority or ""


@record
class DisplaySettings(DisplayOptions):
    """[display]: the wiring keys (interface, port, address, rotate, contrast, path) are hw's."""

    driver: str = registry.NO_DISPLAY
    sleep_after_s: float = 300.0
    on_stop: OnStop = "stopped"   # what the panel shows after the service stops


@record
class GpioSettings:
    backend: str = "rpi"
    button: int | None = None
    led: int | None = None


@record
class MqttSettings:
    url: str
    username: str = ""
    password_file: str = ""
    ca_file: str = ""
    client_cert: str = ""
    client_key: str = ""
    topic_prefix: str = "device-agent"
    allow_insecure: bool = False
    keepalive_s: int = 30
    homeassistant: bool = False                 # publish Home Assistant device discovery
    homeassistant_prefix: str = "homeassistant"


@record
class SensorSettings:
    name: str
    type: str
    interval_s: float = 60.0
    # The type's own keys, defaults filled in; declared by its module (hw/sensors/<type>.py OPTIONS).
    options: Mapping[str, Any] = field(default_factory=dict)


@record
class UploadSettings:
    sink: str = "http"
    url: str = ""
    ca_file: str = ""
    batch_max: int = 500
    interval_s: float = 10.0
    timeout_s: float = 30.0
    outbox_max_rows: int = 1_000_000
    outbox_max_bytes: int = 256 * 1024 * 1024
    graph_url: str = "https://graph.microsoft.com/v1.0"
    site_id: str = ""
    list_id: str = ""
    item_path: str = ""
    table: str = ""
    compress: str = "gzip"       # http sink: "gzip" | "none"


@record
class LogSettings:
    level: str = "info"


@record
class Settings:
    path: Path
    device: DeviceSettings
    auth: AuthSettings
    display: DisplaySettings = field(default_factory=DisplaySettings)
    gpio: GpioSettings = field(default_factory=GpioSettings)
    mqtt: MqttSettings | None = None
    sensors: tuple[SensorSettings, ...] = ()
    upload: UploadSettings = field(default_factory=UploadSettings)
    log: LogSettings = field(default_factory=LogSettings)

    @property
    def token_cache_path(self) -> Path:
        return self.device.state_dir / "token_cache.json"

    @property
    def outbox_path(self) -> Path:
        return self.device.state_dir / "outbox.sqlite3"


def config_path(cli_value: str | None, environ: Mapping[str, str] | None = None) -> Path:
    """``--config``, else ``$DEVICE_AGENT_CONFIG``, else /etc/device-agent/config.toml."""
    env = os.environ if environ is None else environ
    if cli_value:
        return Path(cli_value)
    if env.get("DEVICE_AGENT_CONFIG"):
        return Path(env["DEVICE_AGENT_CONFIG"])
    return DEFAULT_PATH


def load(path: Path, environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate ``path``.

    Raises:
        ConfigError: one line, ``FILE: KEY: what is wrong and what is allowed``.
    """
    env = os.environ if environ is None else environ
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
        raw = tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found (pass --config PATH or set DEVICE_AGENT_CONFIG)") from None
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 (byte 0x{data[err.start]:02x}); "
                          "save the file as UTF-8") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: {_toml_position(err, text)}: TOML syntax error: "
                          f"{_toml_reason(err)}") from err
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror or err}") from err
    return parse(raw, path, env)


def parse(raw: Mapping[str, Any], path: Path, environ: Mapping[str, str] | None = None) -> Settings:
    """Validate an already-parsed TOML document (tests and the demo build dicts directly)."""
    env = os.environ if environ is None else environ
    c = _Checker(path)
    c.unknown(raw, {"device", "auth", "display", "gpio", "mqtt", "sensors", "upload", "log"}, "")

    dev = c.table(raw, "device")
    c.unknown(dev, {"id", "state_dir"}, "device")
    device_id = c.string(dev, "id", "device", default=_default_device_id())
    if not _DEVICE_ID.match(device_id):
        c.fail("device.id", f"{device_id!r} is not allowed; use 1-64 of A-Z a-z 0-9 . _ -")
    state_dir = c.string(dev, "state_dir", "device",
                         default=env.get("STATE_DIRECTORY", "").split(":")[0] or str(DEFAULT_STATE_DIR))
    if not state_dir:
        c.fail("device.state_dir", "must not be empty")
    problem = _state_dir_problem(Path(state_dir))
    if problem:
        c.fail("device.state_dir", problem)
    device = DeviceSettings(id=device_id, state_dir=Path(state_dir))

    auth = _auth(c, c.table(raw, "auth", required=True))
    display = _display(c, c.table(raw, "display"))
    gpio = _gpio(c, c.table(raw, "gpio"))
    mqtt = _mqtt(c, c.table(raw, "mqtt")) if "mqtt" in raw else None
    sensors = _sensors(c, raw.get("sensors", []), gpio)
    upload = _upload(c, c.table(raw, "upload"))

    log_t = c.table(raw, "log")
    c.unknown(log_t, {"level"}, "log")
    level = c.choice(log_t, "level", "log", ("debug", "info", "warning", "error"),
                     default=_defaults(LogSettings)["level"])

    return Settings(path=path, device=device, auth=auth, display=display, gpio=gpio, mqtt=mqtt,
                    sensors=sensors, upload=upload, log=LogSettings(level=level))


def _auth(c: _Checker, t: Mapping[str, Any]) -> AuthSettings:
    c.unknown(t, {f.name for f in fields(AuthSettings)} - {"dropped_scopes"}, "auth")
    d = _defaults(AuthSettings)
    client_id = c.string(t, "client_id", "auth", required=True)
    if not client_id.strip():
        c.fail("auth.client_id", "must not be empty")
    authority = c.string(t, "authority", "auth", default="") or None
    oidc = c.string(t, "oidc_authority", "auth", default="") or None
    if authority and oidc:
        c.fail("auth.authority, auth.oidc_authority", "set exactly one of them, not both")
    if not authority and not oidc:
        c.fail("auth.authority", "required (or auth.oidc_authority for a generic OIDC provider)")
    key = "auth.authority" if authority else "auth.oidc_authority"
    url = authority or oidc or ""
    c.https(url, key)
    parts = urlsplit(url)
    if not parts.path.strip("/"):
        c.fail(key, f"{url!r} needs a path segment (tenant or realm), e.g. https://host/tenant")
    scopes_raw = t.get("scopes")
    if scopes_raw is None:
        c.fail("auth.scopes", "required: a non-empty list of scope strings")
    if not isinstance(scopes_raw, list) or not scopes_raw:
        c.fail("auth.scopes", "must be a non-empty list of strings")
    for i, s in enumerate(scopes_raw):
        if not isinstance(s, str) or not s.strip():
            c.fail(f"auth.scopes[{i}]", "must be a non-empty string")
    scopes = tuple(s for s in scopes_raw if s not in RESERVED_SCOPES)
    dropped = tuple(dict.fromkeys(s for s in scopes_raw if s in RESERVED_SCOPES))
    if not scopes:
        c.fail("auth.scopes", "holds only OIDC scopes that msal requests by itself "
                              f"({', '.join(RESERVED_SCOPES)}): add the API's scope, e.g. "
                              "api://telemetry/Readings.Write")
    timeout_s = c.number(t, "timeout_s", "auth", default=d["timeout_s"], minimum=0.1, maximum=600)
    renew = c.integer(t, "auto_renew_codes", "auth", default=d["auto_renew_codes"], minimum=0, maximum=1000)
    lifetime = c.number(t, "refresh_lifetime_days", "auth", default=d["refresh_lifetime_days"],
                        minimum=1, maximum=3650)
    ca_file = c.ca_file(t, "ca_file", "auth")
    flow = c.choice(t, "flow", "auth", AUTH_FLOWS, default=d["flow"])
    cert_file = c.file(t, "certificate_file", "auth")
    key_file = c.file(t, "private_key_file", "auth")
    send_chain = c.boolean(t, "send_certificate_chain", "auth", default=d["send_certificate_chain"])
    if flow == "client_certificate":
        _certificate_flow(c, scopes, cert_file, key_file, entra=authority is not None)
    elif cert_file or key_file or send_chain:
        used = "auth.certificate_file" if cert_file else ("auth.private_key_file" if key_file
                                                           else "auth.send_certificate_chain")
        c.fail(f"auth.flow, {used}", f"{used} is used only with auth.flow = \"client_certificate\"; "
                                     "set that, or remove it")
    return AuthSettings(client_id=client_id, scopes=scopes, dropped_scopes=dropped, authority=authority,
                        oidc_authority=oidc,
                        instance_discovery=c.boolean(t, "instance_discovery", "auth",
                                                     default=d["instance_discovery"]),
                        ca_file=ca_file, timeout_s=timeout_s, auto_renew_codes=renew,
                        flow=flow, certificate_file=cert_file, private_key_file=key_file,
                        send_certificate_chain=send_chain, refresh_lifetime_days=lifetime)


def _certificate_flow(c: _Checker, scopes: tuple[str, ...], cert_file: str, key_file: str, *,
                      entra: bool = True) -> None:
    """auth.flow = "client_certificate": app-only tokens, so (Entra, ``auth.authority``) one
    ``<resource>/.default`` scope: Entra answers AADSTS1002012 to anything else; a generic OIDC
    provider (``auth.oidc_authority``) names its own scopes. A certificate, and a private key
    file that nobody but the service (or root) can read."""
    if entra and (len(scopes) != 1 or not scopes[0].endswith("/.default")):
        delegated = next((s for s in scopes if not s.endswith("/.default")), scopes[0])
        resource = delegated.rsplit("/", 1)[0] if "/" in delegated else "api://<resource>"
        c.fail("auth.scopes", f"auth.flow = \"client_certificate\" gets app-only tokens: use one "
                              f"\"<resource>/.default\" scope, e.g. [\"{resource}/.default\"], not "
                              f"{', '.join(repr(s) for s in scopes)} (delegated scopes need a person)")
    if not cert_file:
        c.fail("auth.certificate_file", "required for auth.flow = \"client_certificate\" (PEM certificate)")
    if not key_file:
        c.fail("auth.private_key_file", "required for auth.flow = \"client_certificate\" (PEM private key)")
    problem = private_file_problem(Path(key_file))
    if problem:
        c.fail("auth.private_key_file", problem)


def _state_dir_problem(path: Path) -> str | None:
    """Why ``path`` cannot be the state directory, or None (it need not exist yet: the agent
    creates it). Checked here so that a file in the way is a config error, not a crash in ``run``."""
    if not path.is_absolute():
        return f"{str(path)!r} must be an absolute path, e.g. {str(DEFAULT_STATE_DIR)!r}"
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                what = "is" if p == path else f"is under {str(p)!r}, which is"
                return f"{str(path)!r} {what} a file, not a directory; name a directory"
            return None
    return None


def private_file_problem(path: Path, uid: int | None = None) -> str | None:
    """Why ``path`` is not a private key file nobody else can read, or None when it is.

    The key must be mode 0600 or 0400 and owned by the user running the agent (``uid``, default:
    this process) or by root; anything wider lets another account on the box act as the device.
    """
    try:
        st = path.stat()
    except OSError as err:
        return f"cannot read {str(path)!r}: {err.strerror or err}"
    me = os.geteuid() if uid is None else uid
    mode = st.st_mode & 0o7777
    if mode not in (0o600, 0o400):
        return (f"{str(path)!r} has mode {mode:04o}; a private key must be 0600 or 0400 "
                f"(chmod 600 {path})")
    if st.st_uid not in (me, 0):
        return (f"{str(path)!r} belongs to uid {st.st_uid}; it must belong to the service user "
                f"(uid {me}) or root (chown)")
    return None


def _display(c: _Checker, t: Mapping[str, Any]) -> DisplaySettings:
    c.unknown(t, {f.name for f in fields(DisplaySettings)}, "display")
    d = _defaults(DisplaySettings)
    driver = c.choice(t, "driver", "display", registry.DISPLAY_DRIVERS, default=d["driver"])
    path = c.string(t, "path", "display", default=d["path"])
    if driver == "png" and (not path or path.endswith("/")):
        c.fail("display.path", f"{path!r} must name the PNG file to write for driver = \"png\"")
    return DisplaySettings(
        driver=driver,
        interface=c.choice(t, "interface", "display", ("i2c", "spi"), default=d["interface"]),
        port=c.integer(t, "port", "display", default=d["port"], minimum=0, maximum=255),
        address=c.integer(t, "address", "display", default=d["address"], minimum=0x03, maximum=0x77),
        rotate=c.integer(t, "rotate", "display", default=d["rotate"], minimum=0, maximum=3),
        contrast=c.integer(t, "contrast", "display", default=d["contrast"], minimum=0, maximum=255),
        path=path,
        sleep_after_s=c.number(t, "sleep_after_s", "display", default=d["sleep_after_s"], minimum=0),
        on_stop=cast(OnStop, c.choice(t, "on_stop", "display", get_args(OnStop), default=d["on_stop"])),
    )


def _gpio(c: _Checker, t: Mapping[str, Any]) -> GpioSettings:
    c.unknown(t, {f.name for f in fields(GpioSettings)}, "gpio")
    button = c.integer(t, "button", "gpio", default=None, minimum=0, maximum=53)
    led = c.integer(t, "led", "gpio", default=None, minimum=0, maximum=53)
    if button is not None and button == led:
        c.fail("gpio.button, gpio.led", f"both use BCM pin {button}; give each its own pin")
    backend = c.choice(t, "backend", "gpio", tuple(registry.GPIO_BACKENDS),
                       default=_defaults(GpioSettings)["backend"])
    return GpioSettings(backend=backend, button=button, led=led)


def _mqtt(c: _Checker, t: Mapping[str, Any]) -> MqttSettings:
    c.unknown(t, {f.name for f in fields(MqttSettings)}, "mqtt")
    d = _defaults(MqttSettings)
    url = c.string(t, "url", "mqtt", required=True)
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        c.fail("mqtt.url", f"{url!r} must look like mqtts://host[:port] or mqtt://host[:port]")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        c.fail("mqtt.url", f"{url!r} has an invalid port")
    allow_insecure = c.boolean(t, "allow_insecure", "mqtt", default=d["allow_insecure"])
    if parts.scheme == "mqtt" and not is_loopback_host(parts.hostname or "") and not allow_insecure:
        c.fail("mqtt.url", "mqtt:// (no TLS) is refused for a non-loopback host because the sign-in "
                           "code would travel in clear (loopback is an IP in 127.0.0.0/8, ::1 or localhost); "
                           "use mqtts:// or set mqtt.allow_insecure = true")
    cert = c.file(t, "client_cert", "mqtt")
    key = c.file(t, "client_key", "mqtt")
    if bool(cert) != bool(key):
        c.fail("mqtt.client_cert, mqtt.client_key", "set both or neither")
    prefix = c.string(t, "topic_prefix", "mqtt", default=d["topic_prefix"])
    if not _TOPIC_PREFIX.match(prefix) or prefix.startswith("/") or prefix.endswith("/"):
        c.fail("mqtt.topic_prefix", f"{prefix!r} must be a topic without + or # and no leading/trailing /")
    ha_prefix = c.string(t, "homeassistant_prefix", "mqtt", default=d["homeassistant_prefix"])
    if not _TOPIC_PREFIX.match(ha_prefix) or ha_prefix.startswith("/") or ha_prefix.endswith("/"):
        c.fail("mqtt.homeassistant_prefix",
               f"{ha_prefix!r} must be a topic without + or # and no leading/trailing /")
    return MqttSettings(url=url, username=c.string(t, "username", "mqtt", default=d["username"]),
                        password_file=c.file(t, "password_file", "mqtt"),
                        ca_file=c.ca_file(t, "ca_file", "mqtt"), client_cert=cert, client_key=key,
                        topic_prefix=prefix, allow_insecure=allow_insecure,
                        keepalive_s=c.integer(t, "keepalive_s", "mqtt", default=d["keepalive_s"],
                                              minimum=5, maximum=3600),
                        homeassistant=c.boolean(t, "homeassistant", "mqtt", default=d["homeassistant"]),
                        homeassistant_prefix=ha_prefix)


_SENSOR_COMMON = ("name", "type", "interval_s")


def _sensors(c: _Checker, raw: Any, gpio: GpioSettings) -> tuple[SensorSettings, ...]:
    """[[sensors]]: the common keys here, each type's own keys as its hw module declares them."""
    if not isinstance(raw, list):
        c.fail("sensors", "must be an array of tables: [[sensors]]")
    out: list[SensorSettings] = []
    seen: dict[str, int] = {}
    readings: dict[str, tuple[int, str]] = {}      # reading name -> (sensor index, sensor name)
    interval_default = _defaults(SensorSettings)["interval_s"]
    for i, t in enumerate(raw):
        where = f"sensors[{i}]"
        if not isinstance(t, dict):
            c.fail(where, "must be a table")
        kind = c.choice(t, "type", where, tuple(registry.SENSORS), required=True)
        declared = registry.sensor_options(kind)
        c.unknown(t, {*_SENSOR_COMMON, *declared}, where)
        name = c.string(t, "name", where, required=True)
        if not _SENSOR_NAME.match(name):
            c.fail(f"{where}.name", f"{name!r} is not allowed; use 1-64 of a-z 0-9 _ . -")
        if name in seen:
            c.fail(f"sensors[{seen[name]}].name, {where}.name", f"duplicate sensor name {name!r}")
        seen[name] = i
        # Readings carry "<name>" or, for a multi-value type (bme280), "<name>.<quantity>":
        # two sensors must never report under one reading name.
        for reading in [f"{name}.{q}" for q in registry.sensor_quantities(kind)] or [name]:
            if reading in readings:
                j, other = readings[reading]
                c.fail(f"sensors[{j}].name, {where}.name",
                       f"both sensors report readings named {reading!r} ({other} and {name!r}); "
                       "rename one")
            readings[reading] = (i, repr(name))
        interval = c.number(t, "interval_s", where, default=interval_default, minimum=0.01)
        options = {key: c.option(t, key, where, opt, kind) for key, opt in declared.items()}
        pin = options.get("pin")
        if pin is not None and pin in (gpio.button, gpio.led):
            c.fail(f"{where}.pin", f"BCM pin {pin} is already used by [gpio]")
        out.append(SensorSettings(name=name, type=kind, interval_s=interval,
                                  options={k: v for k, v in options.items() if v is not None}))
    return tuple(out)


def _upload(c: _Checker, t: Mapping[str, Any]) -> UploadSettings:
    c.unknown(t, {f.name for f in fields(UploadSettings)}, "upload")
    d = _defaults(UploadSettings)
    sink = c.choice(t, "sink", "upload", SINKS, default=d["sink"])
    url = c.string(t, "url", "upload", default=d["url"])
    graph_url = c.string(t, "graph_url", "upload", default=d["graph_url"])
    site_id = c.string(t, "site_id", "upload", default=d["site_id"])
    list_id = c.string(t, "list_id", "upload", default=d["list_id"])
    item_path = c.string(t, "item_path", "upload", default=d["item_path"])
    table = c.string(t, "table", "upload", default=d["table"])
    if sink == "http":
        if not url:
            c.fail("upload.url", "required for sink = \"http\"")
        c.https(url, "upload.url")
    else:
        c.https(graph_url, "upload.graph_url")
        needed = ("site_id", "list_id") if sink == "graph_list" else ("item_path", "table")
        values = {"site_id": site_id, "list_id": list_id, "item_path": item_path, "table": table}
        for k in needed:
            if not values[k]:
                c.fail(f"upload.{k}", f"required for sink = \"{sink}\"")
        if sink == "graph_excel" and not item_path.startswith("/"):
            c.fail("upload.item_path", "must start with / (e.g. \"/me/drive/root:/sensors.xlsx:\")")
    return UploadSettings(
        sink=sink, url=url, ca_file=c.ca_file(t, "ca_file", "upload"),
        batch_max=c.integer(t, "batch_max", "upload", default=d["batch_max"], minimum=1, maximum=10000),
        interval_s=c.number(t, "interval_s", "upload", default=d["interval_s"], minimum=0.001),
        timeout_s=c.number(t, "timeout_s", "upload", default=d["timeout_s"], minimum=0.1, maximum=600),
        outbox_max_rows=c.integer(t, "outbox_max_rows", "upload", default=d["outbox_max_rows"], minimum=10),
        outbox_max_bytes=c.integer(t, "outbox_max_bytes", "upload", default=d["outbox_max_bytes"],
                                   minimum=64 * 1024),
        graph_url=graph_url, site_id=site_id, list_id=list_id, item_path=item_path, table=table,
        compress=c.choice(t, "compress", "upload", ("gzip", "none"), default=d["compress"]),
    )


def masked(settings: Settings) -> dict[str, Any]:
    """The effective config as plain data, secrets masked (for ``check-config``)."""
    data: dict[str, Any] = _plain(dataclasses.asdict(settings))   # _plain keeps a dict a dict
    for sensor in data["sensors"]:
        sensor.update(sensor.pop("options"))      # shown as written: one flat table per sensor
    if not data["auth"].get("dropped_scopes"):
        data["auth"].pop("dropped_scopes", None)
    if data.get("mqtt") and data["mqtt"].get("password_file"):
        data["mqtt"]["password_file"] = data["mqtt"]["password_file"] + " (contents not shown)"
    return data


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _defaults(cls: type) -> dict[str, Any]:
    """A settings dataclass's field defaults: each default is written once, on the dataclass."""
    out: dict[str, Any] = {}
    for f in fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _default_device_id() -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64]
    return name or "device"


def _toml_position(err: tomllib.TOMLDecodeError, text: str = "") -> str:
    m = re.search(r"line (\d+)", str(err))
    if m:
        return f"line {m.group(1)}"
    if "end of document" in str(err) and text:
        return f"line {len(text.rstrip(chr(10)).splitlines()) or 1}"
    return "syntax"


def _toml_reason(err: tomllib.TOMLDecodeError) -> str:
    return re.sub(r"\s*\(at (?:line \d+, column \d+|end of document)\)", "", str(err)) or "invalid TOML"


class _Checker:
    """Type/range checks that raise ConfigError naming ``file: dotted.key``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._loadable_ca: set[str] = set()      # CA files already loaded (auth's is often upload's)

    def fail(self, key: str, message: str) -> NoReturn:
        raise ConfigError(f"{self.path}: {key}: {message}")

    def _key(self, section: str, name: str) -> str:
        return f"{section}.{name}" if section else name

    def unknown(self, table: Mapping[str, Any], allowed: set[str], section: str) -> None:
        extra = sorted(set(table) - allowed)
        if extra:
            self.fail(self._key(section, extra[0]),
                      f"unknown key; allowed here: {', '.join(sorted(allowed))}")

    def table(self, raw: Mapping[str, Any], name: str, required: bool = False) -> Mapping[str, Any]:
        if name not in raw:
            if required:
                self.fail(name, f"required table [{name}] is missing")
            return {}
        t = raw[name]
        if not isinstance(t, dict):
            self.fail(name, f"must be a table [{name}], not {_typename(t)}")
        return t

    def string(self, t: Mapping[str, Any], name: str, section: str, *, required: bool = False,
               default: str = "") -> str:
        if name not in t:
            if required:
                self.fail(self._key(section, name), "required key is missing")
            return default
        v = t[name]
        if not isinstance(v, str):
            self.fail(self._key(section, name), f"must be a string, not {_typename(v)}")
        return v

    def file(self, t: Mapping[str, Any], name: str, section: str) -> str:
        """A path that, when set, must name a readable file (checked now, not at 3 a.m.)."""
        v = self.string(t, name, section, default="")
        if v and not os.path.isfile(v):
            self.fail(self._key(section, name), f"{v!r} is not a readable file")
        return v

    def ca_file(self, t: Mapping[str, Any], name: str, section: str) -> str:
        """A CA bundle that, when set, must hold at least one PEM certificate ssl can load: a wrong
        file (/etc/hostname) would otherwise pass here and make every TLS handshake fail later."""
        v = self.file(t, name, section)
        if not v or v in self._loadable_ca:
            return v
        key = self._key(section, name)
        try:
            text = Path(v).read_bytes()
        except OSError as err:
            self.fail(key, f"cannot read {v!r}: {err.strerror or err}")
        if b"-----BEGIN CERTIFICATE-----" not in text:
            self.fail(key, f"{v!r} holds no PEM certificate (-----BEGIN CERTIFICATE-----); name the CA "
                           "bundle in PEM form")
        import ssl  # only when a CA file is set: config loading stays cheap otherwise

        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=v)
        except (ssl.SSLError, ValueError) as err:
            why = getattr(err, "reason", None) or "not a valid certificate"
            self.fail(key, f"{v!r}: its PEM certificate cannot be loaded ({why}); name a CA bundle "
                           "in PEM form")
        self._loadable_ca.add(v)
        return v

    def boolean(self, t: Mapping[str, Any], name: str, section: str, *, default: bool) -> bool:
        v = t.get(name, default)
        if not isinstance(v, bool):
            self.fail(self._key(section, name), f"must be true or false, not {_typename(v)}")
        return v

    def integer(self, t: Mapping[str, Any], name: str, section: str, *, default: Any,
                minimum: float | None = None, maximum: float | None = None) -> Any:
        return self._numeric(t, name, section, default, minimum, maximum, integer=True)

    def number(self, t: Mapping[str, Any], name: str, section: str, *, default: float,
               minimum: float | None = None, maximum: float | None = None) -> float:
        return float(self._numeric(t, name, section, default, minimum, maximum, integer=False))

    def _numeric(self, t: Mapping[str, Any], name: str, section: str, default: Any,
                 lo: float | None, hi: float | None, *, integer: bool) -> Any:
        if name not in t:
            return default
        v = t[name]
        fits = isinstance(v, int) if integer else isinstance(v, int | float)
        if isinstance(v, bool) or not fits:
            self.fail(self._key(section, name),
                      f"must be {'an integer' if integer else 'a number'}, not {_typename(v)}")
        if isinstance(v, float) and not math.isfinite(v):      # TOML allows inf and nan
            allowed = f" ({_bounds(lo, hi)})" if lo is not None or hi is not None else ""
            self.fail(self._key(section, name), f"must be a finite number{allowed}, not {v}")
        self._range(v, section, name, lo, hi)
        return v

    def choice(self, t: Mapping[str, Any], name: str, section: str, allowed: tuple[str, ...], *,
               default: str = "", required: bool = False) -> str:
        v = self.string(t, name, section, default=default, required=required)
        if v not in allowed:
            self.fail(self._key(section, name), f"{v!r} is not one of: {', '.join(allowed)}")
        return v

    def option(self, t: Mapping[str, Any], name: str, section: str, opt: Option, kind: str) -> Any:
        """A backend-declared key (hw.base.Option): its type, bounds, choices and default."""
        v: Any
        if name not in t:
            v = opt.default
        elif opt.kind == "integer":
            v = self.integer(t, name, section, default=None, minimum=opt.minimum, maximum=opt.maximum)
        elif opt.kind == "number":
            v = self.number(t, name, section, default=0.0, minimum=opt.minimum, maximum=opt.maximum)
        elif opt.choices:
            v = self.choice(t, name, section, opt.choices)
        else:
            v = self.string(t, name, section)
        if opt.required and (v is None or v == ""):
            self.fail(self._key(section, name), f"required for type {kind} ({opt.required})")
        return v

    def https(self, url: str, key: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            self.fail(key, f"{url!r} must be an https:// URL")

    def _range(self, v: float, section: str, name: str, lo: float | None, hi: float | None) -> None:
        if lo is not None and v < lo or hi is not None and v > hi:
            self.fail(self._key(section, name), f"{v} is out of range; allowed {_bounds(lo, hi)}")


def _bounds(lo: float | None, hi: float | None) -> str:
    return f"{lo}..{hi}" if lo is not None and hi is not None else f">= {lo}" if lo is not None else f"<= {hi}"


def _typename(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(v), type(v).__name__)
