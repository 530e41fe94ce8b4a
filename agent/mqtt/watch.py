"""`device-agent watch`: the admin's view of every device's sign-in code and status.

Subscribes to ``P/+/auth/code`` and ``P/+/status`` and prints each event as it arrives (retained
messages first, so a late admin sees the current truth at once). ``WatchClient`` is the reusable
part (the latency bench uses it); ``run_watch`` adds printing, limits and exit codes.
"""

from __future__ import annotations

import json
import math
import queue
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import is_topic_prefix
from agent.errors import AgentError, ConfigError, NotifyError
from agent.mqtt.connection import (
    BrokerAddress,
    credentials_message,
    describe_connect_error,
    new_client,
    parse_broker_url,
    read_password,
    receive_maximum,
    shutdown_client,
    tls_context,
)
from agent.mqtt.fleet import BACKLOG_ATTENTION_S, STATES, Fleet
from agent.net.hosts import is_loopback_host
from agent.signal_relay import relay_signals

RESYNC_QUIET_S = 2.0     # after a reconnect, the retained burst is over once quiet this long
RESYNC_MAX_S = 30.0
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 78

Kind = Literal["code", "status", "code_cleared"]


class WatchError(AgentError):
    """Could not watch the broker (refused, TLS, credentials); the message is one line."""


@dataclass(frozen=True)
class WatchEvent:
    """One device event as received; ``expiry_s`` is the broker's remaining Message Expiry."""

    device_id: str
    topic: str
    kind: Kind
    payload: dict[str, Any] | None
    received_at: datetime
    expiry_s: int | None = None
    received_monotonic: float = field(default_factory=time.monotonic)

    def as_json(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "topic": self.topic, "kind": self.kind,
                "payload": self.payload,
                "received_at": self.received_at.strftime("%Y-%m-%dT%H:%M:%S.")
                + f"{self.received_at.microsecond // 1000:03d}Z"}


def classify(prefix: str, topic: str, payload: bytes, *, expiry_s: int | None = None,
             now: datetime | None = None) -> WatchEvent | str | None:
    """A message -> event; a string explains an unreadable payload; None: not ours / nothing new."""
    head = prefix + "/"
    if not topic.startswith(head):
        return None
    parts = topic[len(head):].split("/")
    received = now or datetime.now(UTC)
    if len(parts) == 3 and parts[1:] == ["auth", "code"]:
        kind: Kind = "code"
    elif len(parts) == 2 and parts[1] == "status":
        kind = "status"
    else:
        return None
    device = parts[0]
    if not payload:
        if kind == "code":
            return WatchEvent(device, topic, "code_cleared", None, received, None)
        return None   # a cleared status: the device was removed from the broker
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return f"{device}: ignoring an unreadable {kind} message on {topic}"
    if not isinstance(data, dict):
        return f"{device}: ignoring a {kind} message that is not a JSON object on {topic}"
    return WatchEvent(device, topic, kind, data, received, expiry_s)


def format_event(ev: WatchEvent, *, now: datetime | None = None) -> str:
    """The text line of one event (``--json`` prints ``as_json`` instead)."""
    p = ev.payload or {}
    if ev.kind == "code_cleared":
        return f"{ev.device_id}  code cleared"
    if ev.kind == "code":
        uri = p.get("verification_uri_complete") or p.get("verification_uri") or "?"
        return f"{ev.device_id}  CODE {p.get('user_code', '?')}  open {uri}  ({_left(ev, now)})"
    line = f"{ev.device_id}  {p.get('state', '?')}"
    if p.get("account"):
        line += f"  {p['account']}"
    box = p.get("outbox")
    if isinstance(box, dict):
        line += f"  outbox {box.get('pending', 0)} pending"
        for k in ("dead", "dropped"):
            if box.get(k):
                line += f", {box[k]} {k}"
    if p.get("error"):
        line += f"  error: {p['error']}"
    if p.get("warning"):        # e.g. the sign-in certificate expires soon
        line += f"  warning: {p['warning']}"
    return line


def _left(ev: WatchEvent, now: datetime | None) -> str:
    seconds: float | None = None
    if ev.expiry_s is not None:
        # The broker's own countdown: right even when this machine's clock is off.
        seconds = ev.expiry_s - int(max(0.0, time.monotonic() - ev.received_monotonic))
    else:
        try:
            expires = datetime.strptime(str((ev.payload or {})["expires_at"]), "%Y-%m-%dT%H:%M:%SZ")
            seconds = (expires.replace(tzinfo=UTC) - (now or datetime.now(UTC))).total_seconds()
        except (KeyError, ValueError):
            return "time left unknown"
    if seconds <= 0:
        return "expired"
    s = int(seconds)
    h, rest = divmod(s, 3600)
    return (f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}") + " left"


class WatchClient:
    """Connects like the device does (MQTT 5, else 3.1.1) and hands events to ``on_event``.

    ``on_event`` and ``on_problem`` run on paho's thread: keep them quick (queue the event).

    The whole fleet's retained state arrives as one burst right after SUBSCRIBE. At QoS 1 a
    default Mosquitto lets 20 messages be in flight and queues 1000 more, dropping the rest, so
    a 10,000-device fleet shows as ~1,020 messages. MQTT 5: QoS 1 with a Receive Maximum of
    65,535 (the broker may send all of it at once; we acknowledge as we read). 3.1.1 has no
    Receive Maximum: QoS 0, which Mosquitto writes straight out instead of queueing; a lost
    connection is followed by a fresh subscription, which delivers the retained truth again.
    ``legacy=True`` is the old QoS 1 subscription without the window (the bench's baseline).
    """

    def __init__(self, url: str, prefix: str, *, on_event: Callable[[WatchEvent], None],
                 on_problem: Callable[[str], None] | None = None, ca_file: str = "",
                 username: str = "", password_file: str = "", legacy: bool = False) -> None:
        """Raises: ConfigError for a malformed URL; NotifyError for unreadable files."""
        self._legacy = legacy
        self.address: BrokerAddress = parse_broker_url(url)
        self.prefix = prefix.rstrip("/")
        self._ctx = tls_context(ca_file, what="--ca-file") if self.address.tls else None
        self._username = username
        self._password = read_password(password_file, what="--password-file") if password_file else None
        self._on_event = on_event
        self._on_problem = on_problem or (lambda line: None)
        self._client: mqtt.Client | None = None
        self._protocol = mqtt.MQTTv5
        self._connack = threading.Event()
        self._subscribed = threading.Event()
        self._reason: ReasonCode | None = None
        self._closed_early = False           # the broker hung up before any CONNACK
        self.fatal: str | None = None        # set when the broker later refuses us for good
        self._last: dict[str, bytes] = {}
        self._last_lock = threading.Lock()
        self._had_subscription = False
        self._resync_seen: set[str] | None = None    # topics heard since a re-subscription
        self._resync_heard = 0.0

    @property
    def protocol(self) -> str:
        return "5" if self._protocol == mqtt.MQTTv5 else "3.1.1"

    def connect(self, timeout_s: float = 10.0) -> None:
        """Connect and subscribe; returns once the subscription is acknowledged.

        Raises:
            WatchError: connection refused, TLS failure, credentials refused, timeout.
        """
        for protocol in (mqtt.MQTTv5, mqtt.MQTTv311):
            self._protocol = protocol
            client = self._attempt(timeout_s)
            reason = self._reason
            if reason is not None and not reason.is_failure:
                if not self._subscribed.wait(timeout_s):
                    self.close()
                    raise WatchError(f"{self.address} did not acknowledge the subscription")
                return
            # paho may be in its 1 s back-off sleep after the refusal; its thread is a daemon
            # and leaves by itself, so an error is reported without that wait.
            shutdown_client(client, 0.1)
            self._client = None
            if reason is None and self._closed_early:
                if protocol == mqtt.MQTTv5:
                    continue        # a 3.1.1-only broker that hangs up on MQTT 5
                raise WatchError(f"{self.address} closed the connection without answering the MQTT "
                                 f"CONNECT: is it an MQTT broker (and mqtts:// vs mqtt:// right)?")
            if reason is None:
                raise WatchError(f"{self.address} did not answer the MQTT CONNECT within {timeout_s:g} s")
            if reason.value in (134, 135):
                raise WatchError(credentials_message(reason, "--username/--password-file"))
            if reason.value != 132:
                raise WatchError(f"{self.address} refused the connection ({reason.value} {reason.getName()})")
        raise WatchError(f"{self.address} refused both MQTT 5 and 3.1.1")

    def _attempt(self, timeout_s: float) -> mqtt.Client:
        self._connack.clear()
        self._subscribed.clear()
        self._reason = None
        self._closed_early = False
        client = new_client(self._protocol, "", self.address, self._ctx, self._username, self._password)
        client.connect_timeout = timeout_s
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        self._client = client
        window = receive_maximum() if self._protocol == mqtt.MQTTv5 and not self._legacy else None
        try:
            client.connect(self.address.host, self.address.port, keepalive=30, properties=window)
        except OSError as err:
            self._client = None
            raise WatchError(describe_connect_error(err, self.address, ca_hint="--ca-file")) from None
        client.loop_start()
        self._connack.wait(timeout_s)
        return client

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()

    # paho callbacks: never raise (it would kill paho's thread)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags,
                    reason: ReasonCode, properties: Properties | None) -> None:
        try:
            first = not self._connack.is_set()
            self._reason = reason
            self._connack.set()
            if reason.is_failure:
                if not first:
                    self.fatal = (credentials_message(reason, "--username/--password-file")
                                  if reason.value in (134, 135)
                                  else f"{self.address} refused the connection ({reason.getName()})")
                return
            qos = 1 if self._protocol == mqtt.MQTTv5 or self._legacy else 0
            client.subscribe([(f"{self.prefix}/+/auth/code", qos), (f"{self.prefix}/+/status", qos)])
        except Exception as err:  # noqa: BLE001
            self._problem(f"internal error in on_connect: {err}")

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: mqtt.DisconnectFlags,
                       reason: ReasonCode, properties: Properties | None) -> None:
        try:
            if client is self._client and not self._connack.is_set():
                self._closed_early = True
                self._connack.set()
                return
            if client is self._client and self._subscribed.is_set():
                self._problem(f"lost the connection to {self.address}; reconnecting")
        except Exception as err:  # noqa: BLE001
            self._problem(f"internal error in on_disconnect: {err}")

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[ReasonCode],
                      properties: Properties | None) -> None:
        try:
            refused = [r for r in reasons if r.is_failure]
            if refused:
                self.fatal = (f"{self.address} refused the subscription to {self.prefix}/+/...: "
                              f"{refused[0].getName()} (check the broker's ACL)")
            self._subscribed.set()
            if self._had_subscription and self._resync_seen is None:
                with self._last_lock:
                    self._resync_seen, self._resync_heard = set(), time.monotonic()
                threading.Thread(target=self._resync, name="watch-resync", daemon=True).start()
            self._had_subscription = True
        except Exception as err:  # noqa: BLE001
            self._problem(f"internal error in on_subscribe: {err}")

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            payload = bytes(msg.payload)
            with self._last_lock:
                if self._resync_seen is not None:
                    self._resync_seen.add(msg.topic)
                    self._resync_heard = time.monotonic()
                if self._last.get(msg.topic) == payload:
                    return   # the same retained truth again after a reconnect: nothing new
                self._last[msg.topic] = payload
            expiry = getattr(msg.properties, "MessageExpiryInterval", None) if msg.properties else None
            ev = classify(self.prefix, msg.topic, payload, expiry_s=expiry)
            if isinstance(ev, WatchEvent):
                self._on_event(ev)
            elif isinstance(ev, str):
                self._problem(ev)
        except Exception as err:  # noqa: BLE001
            self._problem(f"internal error handling {msg.topic}: {err}")

    def _resync(self) -> None:
        """After a reconnect: a code cleared while we were away is simply absent from the new
        retained burst (an empty retained message is not kept). Once the burst has gone quiet,
        every code we still show but did not hear again is reported cleared."""
        started = time.monotonic()
        while True:
            time.sleep(0.25)
            with self._last_lock:
                now = time.monotonic()
                if now - self._resync_heard < RESYNC_QUIET_S and now - started < RESYNC_MAX_S:
                    continue
                seen, self._resync_seen = self._resync_seen or set(), None
                gone = [t for t, p in self._last.items() if p and t.endswith("/auth/code") and t not in seen]
                for topic in gone:
                    self._last[topic] = b""
            for topic in gone:
                ev = classify(self.prefix, topic, b"")
                if isinstance(ev, WatchEvent):
                    try:
                        self._on_event(ev)
                    except Exception as err:  # noqa: BLE001
                        self._problem(f"internal error handling {topic}: {err}")
            return

    def _problem(self, line: str) -> None:
        try:
            self._on_problem(line)
        except Exception:  # noqa: BLE001, S110 - a printing failure must not kill paho's thread
            pass


def run_watch(*, url: str, prefix: str, ca_file: str, username: str, password_file: str,
              as_json: bool, count: int | None = None, timeout_s: float | None = None,
              out: TextIO | None = None, err: TextIO | None = None, summary: bool = False,
              serve: str | None = None, serve_password_file: str = "",
              backlog_s: float = BACKLOG_ATTENTION_S, legacy: bool = False,
              stop_event: threading.Event | None = None, allow_insecure: bool = False) -> int:
    """Print every device's code and status until SIGINT/SIGTERM, ``count`` events or ``timeout_s``.

    ``summary``: counts by state and the devices needing a person, redrawn in place on a
    terminal. ``serve``: HOST:PORT of the admin's web page (agent/mqtt/web.py).

    Returns 0, 1 (cannot connect / refused / TLS) or 78 (malformed URL or unreadable file).
    """
    out = out or sys.stdout
    err = err or sys.stderr
    problem = _option_problem(url, prefix, as_json=as_json, summary=summary, timeout_s=timeout_s,
                              allow_insecure=allow_insecure)
    if problem:
        print(f"config error: {problem}", file=err)
        return EXIT_CONFIG
    events: queue.Queue[WatchEvent | str] = queue.Queue()
    fleet = Fleet(backlog_s=backlog_s) if summary or serve else None
    server = None
    if serve is not None:
        from agent.mqtt import web

        try:
            server = web.prepare(serve, serve_password_file, fleet)   # type: ignore[arg-type]
        except (ConfigError, NotifyError) as e:
            print(f"config error: {e}", file=err)
            return EXIT_CONFIG
    try:
        client = WatchClient(url, prefix, ca_file=ca_file, username=username, password_file=password_file,
                             on_event=fleet.apply if fleet is not None else events.put,
                             on_problem=events.put, legacy=legacy)
    except ConfigError as e:
        print(f"config error: --url: {e}", file=err)
        return EXIT_CONFIG
    except NotifyError as e:
        print(f"config error: {e}", file=err)
        return EXIT_CONFIG
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    stop = stop_event or threading.Event()
    restore = _on_sigterm(stop)
    printed = 0
    screen = SummaryScreen(out) if summary and fleet is not None else None
    try:
        client.connect(timeout_s=10.0 if timeout_s is None else max(1.0, min(10.0, timeout_s)))
        if server is not None:
            server.start()
            print(f"watch: serving the fleet on {server.url}", file=err, flush=True)
        while not stop.is_set():
            if client.fatal:
                print(f"error: {client.fatal}", file=err)
                return EXIT_FAILURE
            if count is not None and printed >= count:
                break
            wait = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
            if wait <= 0:
                break
            if screen is not None:
                screen.refresh(fleet)   # type: ignore[arg-type]
            try:
                item = events.get(timeout=wait)
            except queue.Empty:
                continue
            if isinstance(item, str):
                print(f"warning: {item}", file=err, flush=True)
                continue
            line = json.dumps(item.as_json(), ensure_ascii=False) if as_json else format_event(item)
            print(line, file=out, flush=True)
            printed += 1
        if screen is not None:
            screen.refresh(fleet, force=True)   # type: ignore[arg-type]
        return EXIT_OK
    except WatchError as e:
        print(f"error: {e}", file=err)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        client.close()
        if server is not None:
            server.stop()
        restore()


# --------------------------------------------------------------------------- --summary

SUMMARY_EVERY_S = 1.0        # redraw at most this often (a burst of 10,000 is one redraw)
PLAIN_LIST_MAX = 50          # not a terminal: at most this many devices per printed summary


def summary_lines(fleet: Fleet, *, width: int = 100, limit: int = PLAIN_LIST_MAX,
                  now: datetime | None = None) -> list[str]:
    """The text of ``watch --summary``: counts by state, then who needs a person, most urgent first."""
    stamp = (now or datetime.now(UTC)).strftime("%H:%M:%S")
    counts = "  ".join(f"{state} {n}" for state, n in fleet.counts().items() if n or state in STATES)
    lines = [f"{len(fleet)} devices   {counts}   ({stamp} UTC)"]
    urgent = fleet.needs_attention()
    lines.append(f"needs a person now: {len(urgent)}" if urgent else "needs a person now: nobody")
    clock = time.monotonic()
    for dev in urgent[:limit]:
        lines.append(("  " + attention_line(dev, clock))[:width])
    if len(urgent) > limit:
        lines.append(f"  ... and {len(urgent) - limit} more")
    return lines


def attention_line(dev: Any, now: float) -> str:
    """One device needing a person: what to do, the most urgent reason first."""
    s = dev.status or {}
    parts: list[str] = []
    for why in dev.attention(now):
        if why == "code":
            code = dev.code or {}
            left = int(dev.seconds_left(now) or 0)
            uri = code.get("verification_uri_complete") or code.get("verification_uri") or "?"
            parts.append(f"CODE {code.get('user_code', '?')} {left // 60}:{left % 60:02d} left  open {uri}")
        elif why == "error":
            parts.append(f"error: {s.get('error') or 'unknown'}")
        elif why == "storage":
            parts.append(f"storage {str(s.get('storage')).replace('_', '-')}")
        elif why == "backlog":
            parts.append(f"oldest reading waiting {_duration(float(s.get('oldest_pending_s') or 0))}")
        elif why == "warning":
            parts.append(f"warning: {s.get('warning')}")
    return f"{dev.device_id:<20} " + "; ".join(parts)


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s >= 86400:
        return f"{s // 86400} d {s % 86400 // 3600} h"
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 60} min {s % 60} s"


class SummaryScreen:
    """Redraws the summary in place on a terminal (ANSI); elsewhere prints it when it changed."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self._version = -1
        self._at = -math.inf

    def refresh(self, fleet: Fleet, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._at < SUMMARY_EVERY_S:
            return
        if not self.tty and fleet.version == self._version:
            return      # a terminal redraws for the countdowns; a log only gets what changed
        self._at, self._version = now, fleet.version
        if self.tty:
            size = shutil.get_terminal_size((100, 30))
            lines = summary_lines(fleet, width=size.columns, limit=max(1, size.lines - 4))
            # home, draw, clear what is left of the previous frame
            self.out.write("\x1b[H" + "".join(line + "\x1b[K\n" for line in lines) + "\x1b[J")
        else:
            self.out.write("\n".join(summary_lines(fleet)) + "\n\n")
        self.out.flush()


def _option_problem(url: str, prefix: str, *, as_json: bool, summary: bool, timeout_s: float | None,
                    allow_insecure: bool) -> str | None:
    """What is wrong with the options as a whole (exit 78), or None. A malformed --url is
    WatchClient's to say."""
    if as_json and summary:
        return "command line: --json and --summary do not go together; choose one"
    if timeout_s is not None and not (timeout_s >= 0 and math.isfinite(timeout_s)):
        return f"command line: --timeout {timeout_s:g}: give seconds >= 0"
    if not is_topic_prefix(prefix):
        return (f"--prefix {prefix!r}: must be a topic without the MQTT wildcards + and # "
                "and no leading/trailing /, as mqtt.topic_prefix on the devices")
    try:
        address = parse_broker_url(url)
    except ConfigError:
        return None
    if not address.tls and not is_loopback_host(address.host) and not allow_insecure:
        # The same rule as the device's mqtt.allow_insecure: codes are sensitive.
        return ("--url: mqtt:// (no TLS) is refused for a non-loopback host because sign-in codes "
                "would travel in clear; use mqtts:// or pass --allow-insecure")
    return None


def _on_sigterm(stop: threading.Event) -> Callable[[], None]:
    """SIGTERM and SIGINT end the watch cleanly (exit 0); only possible in the main thread."""
    return relay_signals((signal.SIGTERM, signal.SIGINT), lambda _signum: stop.set(), name="watch-signals")
