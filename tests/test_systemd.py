"""The unit file passes systemd's own checks and stays hardened (exposure <= 2.5)."""

from __future__ import annotations

import posixpath
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.require import need_binary

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "device-agent.service"
MAX_EXPOSURE = 2.5


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointed at this checkout's entry point (verify checks it exists)."""
    exe = Path(sys.executable).with_name("device-agent")
    text = UNIT.read_text().replace("/opt/device-agent/bin/device-agent", str(exe))
    out = tmp_path / "device-agent.service"
    out.write_text(text)
    return out


def test_unit_verifies(unit_copy: Path) -> None:
    analyze = need_binary("systemd-analyze", "apt-get install systemd")
    res = subprocess.run([analyze, "verify", str(unit_copy)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "device-agent.service" not in res.stderr, res.stderr


def test_security_exposure_at_most_2_5(unit_copy: Path) -> None:
    analyze = need_binary("systemd-analyze", "apt-get install systemd")
    res = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(unit_copy)],
                         capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", res.stdout)
    assert m, res.stdout[-2000:] + res.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE, res.stdout


def test_unit_promises() -> None:
    """What the service relies on: notify + watchdog, state dir, no restart loop on a bad config."""
    text = UNIT.read_text()
    for line in ("Type=notify", "StateDirectory=device-agent", "RuntimeDirectory=device-agent",
                 "ConfigurationDirectory=device-agent", "RestartPreventExitStatus=78",
                 "SupplementaryGroups=gpio i2c spi", "DevicePolicy=closed", "User=device-agent"):
        assert re.search(rf"^{re.escape(line)}$", text, re.M), line
    assert re.search(r"^WatchdogSec=\d+", text, re.M)
    assert "time-sync.target" in text and "time-wait-sync" not in text.split("[Service]")[0].replace(
        "systemd-time-wait-sync is deliberately not required", "")


ARENA_PROBE = """
import ctypes, threading
libc = ctypes.CDLL("libc.so.6")
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
libc.open_memstream.restype = ctypes.c_void_p
libc.malloc_info.argtypes = (ctypes.c_int, ctypes.c_void_p)
libc.fclose.argtypes = (ctypes.c_void_p,)
together = threading.Barrier(7)
counted = threading.Event()
def work():
    libc.free(libc.malloc(1000))
    together.wait()            # alive at once: a finished thread's arena would be reused
    counted.wait()
threads = [threading.Thread(target=work) for _ in range(6)]
for t in threads: t.start()
together.wait()
buf, size = ctypes.c_char_p(), ctypes.c_size_t()
stream = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
libc.malloc_info(0, stream)
libc.fclose(stream)
counted.set()
before = libc.mallinfo2().hblks
block = libc.malloc(100_000)
print(buf.value.decode().count("<heap nr="), libc.mallinfo2().hblks - before)
"""


def test_the_units_malloc_settings_take_effect() -> None:
    """The variable names are glibc's (a misspelt one is silently ignored): six threads that
    allocate share two arenas, and a 100 KB buffer is mapped on its own (returned on free)."""
    from tests.agentproc import unit_environment

    # glibc's variables alone: what else the unit sets (-OO, its bytecode prefix) moves the heap
    # around at start, and a 100 KB request may then be served from a free chunk without mmap.
    env = {k: v for k, v in unit_environment(compile_bytecode=False).items() if k.startswith("MALLOC_")}
    assert env.get("MALLOC_ARENA_MAX") == "2", env
    import os

    def probe(extra: dict[str, str]) -> tuple[int, int]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
        res = subprocess.run([sys.executable, "-c", ARENA_PROBE], env={**base, **extra},
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        arenas, mapped = res.stdout.split()
        return int(arenas), int(mapped)

    assert probe(env) == (2, 1)
    arenas, mapped = probe({})
    assert arenas > 2 and mapped == 0, "without the unit's settings: an arena per thread, the buffer in the heap"


README = UNIT.parents[1] / "README.md"


def unit_env(text: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in re.findall(r"^Environment=(.*)$", text, re.M):
        env.update(item.split("=", 1) for item in line.split())
    return env


def test_unit_runs_python_without_docstrings_from_its_bytecode_cache() -> None:
    """-OO from the unit, its bytecode in root's directory beside the venv, and the README's
    install step compiling exactly that (same level, same directory, what the bench and tests
    compile), as root."""
    from tests.agentproc import BYTECODE_DIR, BYTECODE_EXCLUDE

    text = UNIT.read_text()
    assert re.search(r"^CacheDirectory=device-agent$", text, re.M)    # still the regex cache's
    env = unit_env(text)
    assert env.get("PYTHONOPTIMIZE") == "2", env
    prefix = env.get("PYTHONPYCACHEPREFIX", "")
    assert prefix == BYTECODE_DIR, prefix
    readme = README.read_text().replace("\\\n", " ")
    install = re.search(r"^sudo env PYTHONPYCACHEPREFIX=(\S+) /opt/device-agent/bin/python -m compileall (.*)$",
                        readme, re.M)
    assert install, "README: the install step that compiles the unit's bytecode"
    assert install.group(1) == prefix
    args = install.group(2).split()
    assert args[args.index("-o") + 1] == env["PYTHONOPTIMIZE"]
    assert args[args.index("-x") + 1] == f"'{BYTECODE_EXCLUDE}'"
    assert "/opt/device-agent/lib" in args and 'sysconfig.get_path("stdlib")' in install.group(2)


UNIT_WRITABLE_ROOTS = {"StateDirectory": "/var/lib", "CacheDirectory": "/var/cache", "LogsDirectory": "/var/log",
                       "RuntimeDirectory": "/run"}
# Writable for every user under ProtectSystem=strict (private with PrivateTmp=, but the service's).
ALWAYS_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm")


def writable_for_the_service(text: str) -> list[str]:
    """What the unit lets the service write through ProtectSystem=strict: the directories systemd
    makes for it (owned by its user) and ReadWritePaths= (ConfigurationDirectory= stays read-only)."""
    paths = list(ALWAYS_WRITABLE)
    for key, value in re.findall(r"^(\w+)=(.*)$", text.split("[Service]", 1)[1], re.M):
        if key in UNIT_WRITABLE_ROOTS:
            paths += [f"{UNIT_WRITABLE_ROOTS[key]}/{name.split(':')[0]}" for name in value.split()]
        elif key == "ReadWritePaths":
            paths += [path.lstrip("-+") for path in value.split()]
    return [posixpath.normpath(path) for path in paths]


def test_the_bytecode_prefix_is_not_writable_by_the_service() -> None:
    """Root's compileall (the README's install and upgrade step) loads its own modules from the
    unit's PYTHONPYCACHEPREFIX, and Python does not check who owns a .pyc: in (or above) a
    directory the service may write, a compromised service could plant bytecode that root runs."""
    text = UNIT.read_text()
    assert re.search(r"^ProtectSystem=strict$", text, re.M)      # the rest of the tree read-only
    prefix = posixpath.normpath(unit_env(text)["PYTHONPYCACHEPREFIX"])
    assert posixpath.isabs(prefix), prefix
    writable = writable_for_the_service(text)
    assert {"/var/lib/device-agent", "/var/cache/device-agent", "/run/device-agent"} <= set(writable), writable
    for path in writable:
        assert not (prefix == path or prefix.startswith(path + "/") or path.startswith(prefix + "/")), (
            f"PYTHONPYCACHEPREFIX={prefix}: the service can write {path}")


LIBRARIES_PROBE = 'assert False, "asserts run: not -OO"'

LIBRARIES_WORK = """
import sys, tempfile
from pathlib import Path
import luma.oled.device, segno, paho.mqtt.client as mqtt, msal, requests, cryptography.x509
print(sys.flags.optimize, msal.__doc__, requests.Session.__doc__)
from PIL import Image, ImageDraw, ImageFont
from hw.fakebus import FakeI2CBus
from hw.registry import open_display
from agent.panel import screens
from agent.sim.appcreds import make_certificate
from agent.signin.certificate import load_credential, make_assertion
bus = FakeI2CBus()
display = open_display("ssd1306", bus=bus)
image = Image.new("1", display.size)
ImageDraw.Draw(image).text((0, 0), "ABCD-EFGH", font=ImageFont.load_default(size=10), fill=1)
display.show(image)
display.close()
qr = segno.make("https://microsoft.com/devicelogin", micro=False, boost_error=False)
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="probe", protocol=mqtt.MQTTv5)
files = make_certificate(Path(tempfile.mkdtemp()), "probe")
cred = load_credential(str(files.certificate_file), str(files.private_key_file))
jwt = make_assertion(cred, client_id="c", token_endpoint="https://127.0.0.1/t", send_chain=True)
print(bus.image.getbbox() is not None, qr.version, jwt.count("."))
"""


@pytest.mark.slow
def test_the_libraries_work_under_the_units_flags(tmp_path: Path) -> None:
    """Under -OO (asserts and docstrings gone) luma.oled, Pillow, segno, paho, msal, requests and
    cryptography still do what the agent asks of them: a library that formats its own __doc__
    at import, or checks with assert, would fail here."""
    from tests.agentproc import service_environment

    env = service_environment()
    probe = subprocess.run([sys.executable, "-c", LIBRARIES_PROBE], env=env, capture_output=True, text=True,
                           timeout=60)
    assert probe.returncode == 0, probe.stderr            # the assert did not run
    res = subprocess.run([sys.executable, "-c", LIBRARIES_WORK], env=env, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    flags, results = res.stdout.splitlines()
    assert flags == "2 None None"                             # no docstrings
    assert results == "True 3 2"    # pixels on the panel, a version 3 QR code, a signed JWT


@pytest.mark.slow
def test_the_agent_runs_under_the_units_flags_from_the_installed_bytecode(
        tmp_path: Path, idp: Any, idp_api: Any, tls: Any, mosquitto: Any) -> None:
    """`device-agent run` with the unit's environment (-OO, its bytecode prefix, glibc's settings):
    it signs in, delivers readings and stops cleanly, and every module it imports came from the
    bytecode the install step compiled (a module it had to compile itself would appear in the
    prefix: the install step missed it, and every box would compile it in memory at every start)."""
    from tests.agentproc import AgentProcess, service_environment, write_config

    env = service_environment()
    # The test's prefix is writable (a box's is not: it would compile the module at every start),
    # so a module the agent compiles shows up there.
    env["PYTHONDONTWRITEBYTECODE"] = ""
    prefix = Path(env["PYTHONPYCACHEPREFIX"])
    before = set(prefix.rglob("*.pyc"))
    idp.auto_approve_after_s = 0.0
    config = write_config(tmp_path / "config.toml", {
        "device": {"id": "unit-flags-01", "state_dir": str(tmp_path / "state")},
        "auth": {"client_id": "sim-device-agent", "authority": idp.authority, "instance_discovery": False,
                 "scopes": ["api://telemetry/Readings.Write"], "ca_file": str(tls.ca_file)},
        "display": {"driver": "png", "path": str(tmp_path / "screen.png"), "sleep_after_s": 0},
        "gpio": {"backend": "fake", "button": 17, "led": 27},
        "mqtt": {"url": mosquitto.url, "homeassistant": True},
        "sensors": [{"name": "t", "type": "simulated", "interval_s": 0.1}],
        "upload": {"sink": "http", "url": idp_api.url, "ca_file": str(tls.ca_file), "interval_s": 0.5},
    })
    agent = AgentProcess(config, env=env)
    try:
        deadline = time.monotonic() + 30
        while len(idp_api.seqs("unit-flags-01")) < 5:
            assert agent.proc.poll() is None and time.monotonic() < deadline, agent.output[-3000:]
            time.sleep(0.1)
        rc, _ = agent.terminate()
        assert rc == 0, agent.output[-3000:]
    finally:
        agent.close()
    compiled = sorted(str(p.relative_to(prefix)) for p in set(prefix.rglob("*.pyc")) - before)
    assert not compiled, f"compiled at start, not by the install step: {compiled}"
