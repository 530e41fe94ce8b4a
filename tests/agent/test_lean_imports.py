"""What the agent keeps out of its process to stay small (docs/PERFORMANCE.md "Memory")."""

from __future__ import annotations

import subprocess
import sys
import textwrap

PROBE = textwrap.dedent("""
    import http.server, json, sys, threading
    import agent.signin.authenticator, agent.telemetry.sinks.http   # msal and requests with them
    import requests

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"name": "Zürich"}, ensure_ascii=False).encode()
            self.send_response(200)
            if self.path == "/json":
                self.send_header("Content-Type", "application/json")     # no charset
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    loaded = sorted(m for m in ("charset_normalizer", "chardet") if sys.modules.get(m) is not None)
    print(json.dumps({"loaded": loaded, "json": requests.get(base + "/json").json()["name"],
                      "bare": json.loads(requests.get(base + "/bare").text)["name"]}))
    server.shutdown()
    server.server_close()
""")


def test_requests_runs_without_charset_guessing_and_reads_utf8_answers() -> None:
    res = subprocess.run([sys.executable, "-W", "always", "-c", PROBE], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    import json

    out = json.loads(res.stdout)
    assert out["loaded"] == [], "charset_normalizer/chardet stay out of the process"
    assert out["json"] == "Zürich" and out["bare"] == "Zürich", "JSON with or without a charset is UTF-8"
    assert "Warning" not in res.stderr, res.stderr


SIGN_IN_PROBE = textwrap.dedent("""
    import json, sys, tempfile, threading, time
    from pathlib import Path
    from agent.config import AuthSettings
    from agent.signin.authenticator import Authenticator
    from agent.sim.idp import SimIdp
    from agent.sim.tls import make_tls
    from agent.state import AgentState
    from hw.lazymodule import is_deferred

    tmp = Path(tempfile.mkdtemp())
    tls = make_tls(tmp / "tls")
    stop = threading.Event()
    with SimIdp(tls, tenant="simtenant", client_id="sim-device-agent") as idp:
        settings = AuthSettings(client_id="sim-device-agent", scopes=("api://telemetry/Readings.Write",),
                                authority=idp.authority, instance_discovery=False,
                                ca_file=str(tls.ca_file), timeout_s=10.0)
        state = AgentState()
        auth = Authenticator(settings, tmp / "token_cache.json", state, device_id="dev-1")
        threading.Thread(target=auth.run, args=(stop,), daemon=True).start()
        idp.approve(idp.wait_for_code())
        deadline = time.monotonic() + 20
        while state.snapshot.phase != "signed_in" and time.monotonic() < deadline:
            time.sleep(0.05)
        phase = state.snapshot.phase
        stop.set()
    def deferred(name):
        return "absent" if name not in sys.modules else is_deferred(sys.modules[name])
    before = {m: deferred(m) for m in ("xml.etree.ElementTree", "xml.etree.cElementTree", "pyexpat",
                                       "msal.oauth2cli.authcode", "urllib3.http2", "importlib.metadata")}
    import msal.mex
    text = msal.mex.ET.fromstring("<a><b>ok</b></a>").find("b").text
    import xml.etree.ElementTree as ET
    import http.server
    import msal.oauth2cli
    receiver = msal.oauth2cli.AuthCodeReceiver(port=0)     # what msal's browser flow constructs
    listening = [type(receiver).__module__, receiver.get_port() > 0,
                 isinstance(receiver._server, http.server.HTTPServer)]
    receiver.close()
    import urllib3.http2
    h2 = [callable(urllib3.http2.inject_into_urllib3), "importlib.metadata" in sys.modules]
    after = [deferred(m) for m in ("xml.etree.ElementTree", "msal.oauth2cli.authcode", "urllib3.http2")]
    print(json.dumps({"phase": phase, "before": before, "text": text,
                      "works": ET.tostring(ET.Element("x")).decode(), "listening": listening, "h2": h2,
                      "after": after, "wsl": msal.application.is_wsl() in (True, False)}))
""")


def test_msal_signs_in_without_running_what_other_flows_need_which_works_on_first_use() -> None:
    """msal imports xml.etree for ADFS and http.server (msal.oauth2cli.authcode) for the browser
    flow, urllib3 importlib.metadata for opting in to HTTP/2 (agent/signin/__init__.py): a
    device-code sign-in runs none of it, and the first use gets the real module."""
    res = subprocess.run([sys.executable, "-c", SIGN_IN_PROBE], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    import json

    out = json.loads(res.stdout)
    assert out["phase"] == "signed_in"
    assert out["before"] == {"xml.etree.ElementTree": "absent", "xml.etree.cElementTree": True,
                             "pyexpat": "absent", "msal.oauth2cli.authcode": True, "urllib3.http2": True,
                             "importlib.metadata": "absent"}, "imported, not run"
    assert out["text"] == "ok" and out["works"] == "<x />"
    assert out["listening"] == ["msal.oauth2cli.authcode", True, True], "the real receiver, on a port"
    assert out["h2"] == [True, True]
    assert out["after"] == [False, False, False], "each ran on its first use"
    assert out["wsl"] is True


CERTIFI_PROBE = textwrap.dedent("""
    import json, sys
    import agent.signin.authenticator, agent.telemetry.sinks.http   # msal and requests with them
    import certifi, requests.utils
    from hw.lazymodule import is_deferred
    out = {"where": certifi.where(), "requests": requests.utils.DEFAULT_CA_BUNDLE_PATH,
           "resources": "importlib.resources" in sys.modules, "deferred": is_deferred(sys.modules["certifi.core"])}
    out["contents"] = certifi.contents().count("BEGIN CERTIFICATE") > 100
    out["after"] = [certifi.where(), is_deferred(sys.modules["certifi.core"])]
    print(json.dumps(out))
""")


def test_certifi_answers_its_path_without_importlib_resources_and_runs_on_other_use() -> None:
    """requests asks certifi.where() at its import; the agent answers it with the bundle's path
    (agent/signin/__init__.py) instead of running importlib.resources (~0.3 MiB, ~10 ms): the
    same path the real certifi gives, and certifi itself once anything else is asked."""
    res = subprocess.run([sys.executable, "-c", CERTIFI_PROBE], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    real = subprocess.run([sys.executable, "-c", "import certifi; print(certifi.where())"], capture_output=True,
                          text=True, timeout=60, check=True).stdout.strip()
    import json

    out = json.loads(res.stdout)
    assert out["where"] == out["requests"] == real
    assert out["resources"] is False and out["deferred"] is True
    assert out["contents"] is True and out["after"] == [real, False]


STDLIB_PROBE = textwrap.dedent("""
    import json, os, sys
    import agent.fsutil, agent.signin.authenticator, agent.telemetry.sinks.http, hw.png
    import requests.utils, tempfile
    from hw.lazymodule import is_deferred
    out = {"before": [is_deferred(sys.modules[m]) for m in ("shutil", "zipfile")]}
    with tempfile.TemporaryDirectory() as d:          # its cleanup is shutil.rmtree
        os.makedirs(os.path.join(d, "a", "b"))
        agent.fsutil.atomic_write(__import__("pathlib").Path(d, "a", "b", "f"), b"x")
    out["cleaned"] = not os.path.exists(d)
    fd, archive = tempfile.mkstemp(suffix=".zip")
    os.close(fd)
    import zipfile
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("certs/ca.pem", "PEM")
    inside = requests.utils.extract_zipped_paths(os.path.join(archive, "certs", "ca.pem"))
    out["extracted"] = [inside != os.path.join(archive, "certs", "ca.pem"), open(inside).read()]
    os.unlink(archive)
    out["after"] = [is_deferred(sys.modules[m]) for m in ("shutil", "zipfile")]
    print(json.dumps(out))
""")


def test_shutil_and_zipfile_wait_for_their_first_use_and_then_work() -> None:
    """tempfile and requests import them at their top (hw/__init__.py, agent/signin/__init__.py):
    nothing runs them until a temporary directory is cleaned up or requests opens a CA bundle
    inside a zip archive, each through the real module."""
    res = subprocess.run([sys.executable, "-c", STDLIB_PROBE], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    import json

    out = json.loads(res.stdout)
    assert out["before"] == [True, sys.version_info < (3, 12)], "imported, not run (zipfile: while one module)"
    assert out["cleaned"] is True, "TemporaryDirectory removed its tree (shutil.rmtree)"
    assert out["extracted"] == [True, "PEM"], "requests read the member out of the archive"
    assert out["after"] == [False, False]
