"""Outside peers for the interop tests: oidc-provider under Node, and an HTTP client that trusts
only the test CA.

Nothing here installs anything: `.ci/setup` runs `npm ci` in tests/interop. The fixtures in
conftest.py decide whether a missing node / node_modules is a skip (locally) or a failure (CI).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import requests

from agent.sim.tls import TlsFiles

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
PROVIDER_SCRIPT = HERE / "provider.mjs"
NODE_MODULES = HERE / "node_modules"
START_TIMEOUT_S = 20.0


class CaSession(requests.Session):
    """A requests session that verifies with one CA file and always has a timeout.

    Why not ``session.verify = ca``: requests merges REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE from
    the environment per request and they win over the session attribute
    (docs/DESIGN.md#what-the-libraries-and-peers-do).
    Passing ``verify=`` on every request is what actually pins the CA.
    """

    def __init__(self, ca_file: Path | str, timeout_s: float = 10.0) -> None:
        super().__init__()
        self._ca_file = str(ca_file)
        self._timeout_s = timeout_s

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs["verify"] = self._ca_file
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self._timeout_s
        return super().request(method, url, *args, **kwargs)  # type: ignore[arg-type]


def installed_oidc_provider_version() -> str | None:
    """Version of oidc-provider in tests/interop/node_modules, None when `npm ci` has not run."""
    manifest = NODE_MODULES / "oidc-provider" / "package.json"
    try:
        return str(json.loads(manifest.read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None


@dataclass
class OidcProvider:
    """A running `node provider.mjs`: the issuer and the admin knobs tests need."""

    issuer: str
    client_id: str
    scope: str
    resource: str
    ca_file: Path
    node_version: str
    version: str
    process: subprocess.Popen[bytes]
    stderr_path: Path
    _stdout_lines: list[str] = field(default_factory=list)

    @property
    def jwks_url(self) -> str:
        return f"{self.issuer}/jwks"

    @property
    def base_url(self) -> str:
        return self.issuer.rsplit("/oidc", 1)[0]

    @property
    def device_authorization_endpoint(self) -> str:
        return f"{self.issuer}/device/auth"

    @property
    def token_endpoint(self) -> str:
        return f"{self.issuer}/token"

    def http(self) -> CaSession:
        return CaSession(self.ca_file)

    def revoke_all(self) -> int:
        """Destroy every grant with its tokens, as an administrator revoking the device would."""
        with self.http() as s:
            r = s.post(f"{self.base_url}/admin/revoke-all")
        r.raise_for_status()
        return int(r.json()["revoked"])

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """What the provider did (event name, grant id, error code; never token values)."""
        with self.http() as s:
            r = s.get(f"{self.base_url}/admin/events")
        r.raise_for_status()
        items: list[dict[str, Any]] = r.json()["events"]
        return [e for e in items if name is None or e["event"] == name]

    def stderr_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def _pump(stream: IO[bytes], lines: queue.Queue[str], keep: list[str]) -> None:
    """Drain node's stdout (it prints notices there) so the pipe never fills."""
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace").rstrip("\n")
        keep.append(line)
        lines.put(line)
    stream.close()


def start_oidc_provider(tls: TlsFiles, workdir: Path, *, node: str = "node",
                        access_ttl_s: int = 3600, device_ttl_s: int = 600,
                        client_id: str = "device-agent-interop", app_jwks: Path | None = None) -> OidcProvider:
    """Start provider.mjs on a free loopback port and wait until discovery answers.

    Raises:
        RuntimeError: node exited or discovery did not answer within START_TIMEOUT_S.
    """
    stderr_path = workdir / "oidc-provider.stderr"
    cmd = [node, str(PROVIDER_SCRIPT), "--port", "0", "--cert", str(tls.cert_file),
           "--key", str(tls.key_file), "--client-id", client_id,
           "--access-ttl", str(access_ttl_s), "--device-ttl", str(device_ttl_s)]
    if app_jwks is not None:      # the certificate flow's client "<client_id>-app"
        cmd += ["--app-jwks", str(app_jwks)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("NODE_")}
    with stderr_path.open("wb") as err:
        proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=err, env=env)
    lines: queue.Queue[str] = queue.Queue()
    keep: list[str] = []
    assert proc.stdout is not None
    threading.Thread(target=_pump, args=(proc.stdout, lines, keep), daemon=True,
                     name="oidc-provider-stdout").start()
    deadline = time.monotonic() + START_TIMEOUT_S

    def fail(why: str) -> RuntimeError:
        proc.kill()
        proc.wait(timeout=5)
        tail = stderr_path.read_text(errors="replace")[-2000:]
        return RuntimeError(f"oidc-provider did not start: {why}\n{tail}")

    info: dict[str, Any] | None = None
    while info is None:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            raise fail(f"exit code {proc.poll()}" if proc.poll() is not None else "no listening line")
        try:
            line = lines.get(timeout=min(left, 0.5))
        except queue.Empty:
            continue
        if line.startswith("{"):
            info = json.loads(line)
    provider = OidcProvider(issuer=info["issuer"], client_id=info["client_id"], scope=info["scope"],
                            resource=info["resource"], ca_file=Path(tls.ca_file), node_version=info["node"],
                            version=installed_oidc_provider_version() or "?", process=proc,
                            stderr_path=stderr_path, _stdout_lines=keep)
    discovery = f"{provider.issuer}/.well-known/openid-configuration"
    with provider.http() as s:
        while True:
            try:
                r = s.get(discovery, timeout=2)
                if r.status_code == 200 and r.json().get("issuer") == provider.issuer:
                    break
            except requests.RequestException as err:
                log.debug("discovery not ready: %s", err)
            if time.monotonic() > deadline or proc.poll() is not None:
                raise fail("discovery did not answer")
            time.sleep(0.05)
    log.info("oidc-provider %s on node %s at %s", provider.version, provider.node_version, provider.issuer)
    return provider
