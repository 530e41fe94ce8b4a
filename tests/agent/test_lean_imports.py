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
