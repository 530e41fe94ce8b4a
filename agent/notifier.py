"""paho-mqtt wrapped: the retained status, the retained sign-in code and remote commands.

Admins of a fleet learn the code and each device's state from the broker instead of walking to
the box. Topics and payloads are CONTRACT.md's "MQTT" table. Threads:

* paho's network thread runs the callbacks; they only record facts and wake our threads (an
  exception escaping a paho callback would kill that thread, so every callback is guarded);
* the publisher thread decides what the broker should hold (``Outbound``) and publishes it: on
  every relevant state change, at a code's expiry, and the whole truth after every (re)connect;
* the command thread runs the ``commands`` callables, so a slow ``sign_out`` never stalls MQTT.

Nothing is published while disconnected: paho would queue stale QoS 1 copies for hours; instead
the current truth is published on reconnect.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.config import MqttSettings
from agent.errors import AgentError, ConfigError, NotifyError
from agent.state import AgentState, DeviceCode, Snapshot

log = logging.getLogger(__name__)

ACTIONS = ("renew_code", "sign_out", "flush", "publish_status")
MAX_COMMAND_BYTES = 4096
STATUS_MIN_INTERVAL_S = 5.0          # outbox/last_upload-only changes: at most this often
RECONNECT_DELAY_S = (1, 60)          # paho doubles the wait from min to max per failed attempt
AUTH_RECONNECT_DELAY_S = (15, 300)   # refused credentials: nobody fixes them in a second
STOP_JOIN_S = 1.0
OFFLINE = b'{"state":"offline"}'

# Reason codes that mean "fix the credentials" (MQTT 5; paho maps 3.1.1's 4/5 onto them).
_BAD_CREDENTIALS = (134, 135)
_UNSUPPORTED_PROTOCOL = 132


# --------------------------------------------------------------------------- connection helpers
# Shared with agent.watch, so the admin's view connects exactly like the device does.

@dataclass(frozen=True)
class BrokerAddress:
    """Where a broker listens, from an ``mqtt://`` or ``mqtts://`` URL."""

    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """Split ``mqtt[s]://host[:port]``; default ports 1883 / 8883.

    Raises:
        ConfigError: not an mqtt/mqtts URL, no host, a bad port, or a path/query.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ConfigError(f"{url!r} must look like mqtts://host[:port] or mqtt://host[:port]")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"{url!r} has an invalid port") from None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{url!r}: an MQTT broker URL has no path or query")
    tls = parts.scheme == "mqtts"
    return BrokerAddress(parts.hostname, port or (8883 if tls else 1883), tls)


def tls_context(ca_file: str = "", client_cert: str = "", client_key: str = "",
                *, what: str = "mqtt") -> ssl.SSLContext:
    """System CAs plus ``ca_file`` (in addition, never instead), and the client cert if any.

    Raises:
        NotifyError: a file is missing, unreadable or not PEM of the right kind.
    """
    ctx = ssl.create_default_context()
    if ca_file:
        try:
            ctx.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as err:
            raise NotifyError(f"{what}.ca_file {ca_file!r}: cannot load CA certificates: "
                              f"{_reason(err)}") from err
    if client_cert or client_key:
        try:
            ctx.load_cert_chain(client_cert, client_key or None)
        except (OSError, ssl.SSLError) as err:
            raise NotifyError(f"{what}.client_cert/client_key {client_cert!r}/{client_key!r}: "
                              f"cannot load the client certificate and key: {_reason(err)}") from err
    return ctx


def read_password(path: str, *, what: str = "mqtt.password_file") -> str:
    """The password file's content without its trailing newline.

    Raises:
        NotifyError: unreadable or not UTF-8.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as err:
        raise NotifyError(f"{what} {path!r}: cannot read the password: {_reason(err)}") from err


def describe_connect_error(err: BaseException, address: BrokerAddress, *, ca_hint: str) -> str:
    """One line saying why a TCP/TLS connection failed and what to check."""
    if isinstance(err, ssl.SSLCertVerificationError):
        return (f"TLS: the certificate of {address} is not trusted "
                f"({err.verify_message or _reason(err)}): check {ca_hint}")
    if isinstance(err, ssl.SSLError):
        return f"TLS handshake with {address} failed ({_reason(err)}): is it an mqtts:// listener?"
    if isinstance(err, ConnectionRefusedError):
        return f"connection to {address} refused: is the broker running and listening there?"
    if isinstance(err, socket.gaierror):
        return f"cannot resolve {address.host!r}: {err.strerror or err}"
    if isinstance(err, TimeoutError | socket.timeout):
        return f"connection to {address} timed out"
    return f"cannot connect to {address}: {_reason(err)}"


def credentials_message(reason: ReasonCode | int, hint: str) -> str:
    value = reason.value if isinstance(reason, ReasonCode) else int(reason)
    return f"MQTT broker refused the credentials ({value} {reason_name(reason)}): check {hint}"


def reason_name(reason: ReasonCode | int) -> str:
    if isinstance(reason, ReasonCode):
        return reason.getName()
    return str(reason)


class ReportingClient(mqtt.Client):
    """paho's Client that remembers why the last connection attempt failed.

    paho's network loop swallows the OSError of a failed (re)connect and only calls
    ``on_connect_fail``; the reason (refused, unknown CA, DNS) is what an operator needs.
    """

    last_connect_error: BaseException | None = None

    def reconnect(self) -> MQTTErrorCode:
        try:
            return super().reconnect()
        except OSError as err:
            self.last_connect_error = err
            raise


def new_client(protocol: MQTTProtocolVersion, client_id: str, address: BrokerAddress,
               ctx: ssl.SSLContext | None, username: str, password: str | None) -> ReportingClient:
    """A VERSION2-callback paho client set up for ``address`` (TLS if its scheme says so)."""
    client = ReportingClient(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                             clean_session=None if protocol == mqtt.MQTTv5 else True)
    if address.tls and ctx is not None:
        client.tls_set_context(ctx)
    if username:
        client.username_pw_set(username, password)
    client.on_socket_open = no_delay
    return client


def no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """Disable Nagle: after a PUBACK, the next small publish otherwise waits ~40 ms for the peer's
    delayed ACK (measured on loopback: command round trip 43 ms -> 2 ms)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):   # not a TCP socket (e.g. a unix socket or a proxy wrapper)
        pass


def _reason(err: BaseException) -> str:
    if isinstance(err, ssl.SSLError) and err.reason:
        return str(err.reason)
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__


# --------------------------------------------------------------------------- commands

@dataclass(frozen=True)
class Command:
    """A parsed ``P/D/cmd`` message: ``action`` is valid when ``error`` is None."""

    action: str | None
    error: str | None


def parse_command(payload: bytes) -> Command:
    """Check one command message; never raises (every message gets exactly one result)."""
    if len(payload) > MAX_COMMAND_BYTES:
        return Command(None, f"payload too large ({len(payload)} bytes; at most {MAX_COMMAND_BYTES})")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return Command(None, "payload is not UTF-8 JSON")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return Command(None, 'payload is not JSON; send {"action": "<name>"}')
    if not isinstance(data, dict):
        return Command(None, f'payload must be a JSON object like {{"action": "<name>"}}, '
                             f"not {_json_type(data)}")
    action = data.get("action")
    if "action" not in data:
        return Command(None, f"missing \"action\"; one of: {', '.join(ACTIONS)}")
    if not isinstance(action, str):
        return Command(None, f"\"action\" must be a string, not {_json_type(action)}")
    if action not in ACTIONS:
        shown = action if len(action) <= 64 else action[:64] + "..."
        return Command(action, f"unknown action {shown!r}; one of: {', '.join(ACTIONS)}")
    return Command(action, None)


def result_payload(action: str | None, error: str | None) -> bytes:
    return json.dumps({"action": action, "ok": error is None, "error": error},
                      separators=(",", ":")).encode()


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------- what to publish

@dataclass(frozen=True)
class Publication:
    """One retained message the broker should hold; ``expiry_s`` is MQTT 5's Message Expiry."""

    topic: str
    payload: bytes
    expiry_s: int | None = None


class Outbound:
    """Decides what the broker should hold for this device; pure, clock passed in, unit-tested.

    ``plan`` assumes its publications are made (the caller only asks while connected and asks
    with ``force=True`` after every (re)connect, when the broker's copy is unknown).
    """

    def __init__(self, prefix: str, device_id: str, version: str, *,
                 status_min_interval_s: float = STATUS_MIN_INTERVAL_S) -> None:
        self.device_id = device_id
        self.version = version
        self.status_topic = f"{prefix}/{device_id}/status"
        self.code_topic = f"{prefix}/{device_id}/auth/code"
        self.min_interval_s = status_min_interval_s
        self._status: dict[str, Any] | None = None
        self._status_at = -math.inf
        self._code: DeviceCode | None = None
        self.code_published = False          # a code may be on the broker: stop() must clear it

    def plan(self, snap: Snapshot, now: float, *,
             force: bool = False) -> tuple[list[Publication], float | None]:
        """Publications needed now, and the monotonic time to ask again (None: on change only)."""
        out: list[Publication] = []
        wake: list[float] = []

        status = snap.status_payload(self.version)
        if force or status != self._status:
            # Sample-rate churn (outbox depth, upload time) is throttled; what a person acts on is not.
            churn_only = self._status is not None and all(
                status[k] == self._status[k] for k in status if k not in ("outbox", "last_upload"))
            due = self._status_at + self.min_interval_s
            if force or not churn_only or now >= due:
                out.append(Publication(self.status_topic, _json(status)))
                self._status, self._status_at = status, now
            else:
                wake.append(due)

        code = snap.code if snap.code is not None and snap.code.seconds_left(now) > 0 else None
        if force or code != self._code:
            if code is not None:
                # Whole seconds, rounded down: the broker must never offer a code that is dead.
                expiry = max(1, int(code.seconds_left(now)))
                out.append(Publication(self.code_topic, _json(code.public(self.device_id)), expiry))
                self.code_published = True
            else:
                out.append(Publication(self.code_topic, b""))
                self.code_published = False
            self._code = code
        if code is not None:
            wake.append(code.expires_at_monotonic)   # 3.1.1 has no expiry: clear it ourselves
        return out, min(wake) if wake else None

    def offline_status(self, snap: Snapshot) -> Publication:
        status = snap.status_payload(self.version)
        status["state"] = "offline"
        return Publication(self.status_topic, _json(status))


def _json(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


# --------------------------------------------------------------------------- the notifier

class MqttNotifier:
    """Announces code and status on MQTT and runs remote commands; see the module docstring."""

    def __init__(self, settings: MqttSettings, device_id: str, state: AgentState,
                 commands: Mapping[str, Callable[[], None]], version: str, *,
                 clock: Callable[[], float] = time.monotonic,
                 status_min_interval_s: float = STATUS_MIN_INTERVAL_S,
                 reconnect_delay_s: tuple[float, float] = RECONNECT_DELAY_S) -> None:
        """Check URL, TLS files and password now, so a mistake stops the service at start.

        Raises:
            NotifyError: bad URL, TLS files or unreadable password file.
        """
        try:
            self.address = parse_broker_url(settings.url)
        except ConfigError as err:
            raise NotifyError(f"mqtt.url: {err}") from err
        self._ctx = (tls_context(settings.ca_file, settings.client_cert, settings.client_key)
                     if self.address.tls else None)
        self._username = settings.username
        self._password: str | None = None
        if settings.password_file:
            if not settings.username:
                raise NotifyError("mqtt.password_file is set but mqtt.username is empty; set both")
            self._password = read_password(settings.password_file)
        self._keepalive_s = settings.keepalive_s
        self._state = state
        self._commands = dict(commands)
        self._clock = clock
        self._reconnect_delay = reconnect_delay_s
        prefix = settings.topic_prefix
        self.device_id = device_id
        self.cmd_topic = f"{prefix}/{device_id}/cmd"
        self.result_topic = f"{prefix}/{device_id}/cmd/result"
        self._out = Outbound(prefix, device_id, version, status_min_interval_s=status_min_interval_s)
        self._client_id = f"device-agent-{device_id}"

        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._client: ReportingClient | None = None
        self._protocol = mqtt.MQTTv5
        self._connected = False
        self._force = False               # publish the whole truth at the next chance
        self._fallback = False            # rebuild the client for MQTT 3.1.1
        self._auth_failed = False
        self._down_logged = False
        self._awaiting_connack = False    # a socket is open, no CONNACK yet
        self._silent_closes = 0           # MQTT 5 CONNECTs answered by closing the connection
        self._seen: tuple[Any, ...] | None = None
        self._jobs: queue.Queue[tuple[str, bytes | None] | None] = queue.Queue(maxsize=32)
        self._threads: list[threading.Thread] = []

    # ----- public

    @property
    def protocol(self) -> str:
        """The MQTT version in use, "5" or "3.1.1" (after a broker refused 5)."""
        return "5" if self._protocol == mqtt.MQTTv5 else "3.1.1"

    @property
    def connected(self) -> bool:
        return self._connected

    def start(self) -> None:
        """Connect in the background; never blocks (a broker down at boot is fine)."""
        self._stopping.clear()
        with self._lock:
            self._client = client = self._make_client()
        self._connect(client)
        self._state.subscribe(self._on_state)
        for name, target in (("mqtt-publisher", self._run_publisher), ("mqtt-commands", self._run_commands)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("MQTT: connecting to %s as %s (topics %s/...)", self.address, self._client_id,
                 self._out.status_topic.rsplit("/", 1)[0])

    def stop(self) -> None:
        """Publish the offline status, clear a published code, disconnect; returns within ~1 s."""
        deadline = time.monotonic() + STOP_JOIN_S
        self._state.unsubscribe(self._on_state)
        self._stopping.set()
        self._wake.set()
        try:
            self._jobs.put_nowait(None)
        except queue.Full:
            pass
        for t in self._threads:
            t.join(max(0.0, deadline - 0.5 - time.monotonic()))
        self._threads.clear()
        with self._lock:
            client, self._client = self._client, None
            connected = self._connected
        if client is None:
            return
        if connected:
            infos = [self._publish(client, self._out.offline_status(self._state.snapshot))]
            if self._out.code_published:
                infos.append(self._publish(client, Publication(self._out.code_topic, b"")))
                self._out.code_published = False
            for info in infos:
                if info is not None:
                    try:
                        info.wait_for_publish(max(0.05, deadline - 0.4 - time.monotonic()))
                    except (RuntimeError, ValueError):
                        pass
        # Not connected: paho may sit in a back-off sleep (1 s steps) and will leave it by itself
        # once it sees the disconnect; don't make the service's shutdown wait for that.
        shutdown_client(client, max(0.1, deadline - time.monotonic()) if connected else 0.2)
        self._connected = False
        self._state.set_link("mqtt", "off")
        log.info("MQTT: disconnected from %s", self.address)

    # ----- client lifecycle

    def _make_client(self) -> ReportingClient:
        client = new_client(self._protocol, self._client_id, self.address, self._ctx,
                            self._username, self._password)
        client.will_set(self._out.status_topic, OFFLINE, qos=1, retain=True)
        client.reconnect_delay_set(*self._reconnect_delay)  # type: ignore[arg-type]
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_message = self._on_message
        client.on_socket_open = self._on_socket_open
        return client

    def _connect(self, client: mqtt.Client) -> None:
        # Only after self._client is set: callbacks ignore clients that are not the current one.
        client.connect_async(self.address.host, self.address.port, keepalive=self._keepalive_s)
        client.loop_start()

    def _fall_back_to_311(self) -> None:
        """Runs on the publisher thread: paho fixes the protocol per Client, so build a new one."""
        with self._lock:
            old = self._client
            self._protocol = mqtt.MQTTv311
            self._client = None
        if old is not None:
            shutdown_client(old, 2.0)
        if self._stopping.is_set():
            return
        with self._lock:
            self._client = client = self._make_client()
        self._connect(client)

    # ----- paho callbacks (network thread): record, wake, never raise

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        no_delay(client, userdata, sock)
        self._awaiting_connack = True

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags,
                    reason: ReasonCode, properties: Properties | None) -> None:
        try:
            if client is not self._client:
                return
            self._awaiting_connack = False
            if reason.is_failure:
                self._connected = False
                self._state.set_link("mqtt", "down")
                if reason.value == _UNSUPPORTED_PROTOCOL and self._protocol == mqtt.MQTTv5:
                    log.warning("MQTT: %s does not support MQTT 5; falling back to 3.1.1", self.address)
                    self._fallback = True
                    client.disconnect()
                    self._wake.set()
                elif reason.value in _BAD_CREDENTIALS:
                    if not self._auth_failed:
                        self._auth_failed = True
                        log.error("%s; retrying every %d-%d s",
                                  credentials_message(reason, "mqtt.username/password_file"),
                                  *AUTH_RECONNECT_DELAY_S)
                        client.reconnect_delay_set(*AUTH_RECONNECT_DELAY_S)
                elif not self._down_logged:
                    self._down_logged = True
                    log.warning("MQTT: %s refused the connection (%s %s); retrying", self.address,
                                reason.value, reason.getName())
                return
            if self._auth_failed:
                client.reconnect_delay_set(*self._reconnect_delay)  # type: ignore[arg-type]
            self._auth_failed = self._down_logged = False
            self._silent_closes = 0
            options = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
            if self._protocol == mqtt.MQTTv5:
                client.subscribe(self.cmd_topic, options=options)
            else:
                client.subscribe(self.cmd_topic, qos=1)
            with self._lock:
                self._connected = True
                self._force = True
            self._wake.set()
            self._state.set_link("mqtt", "up")
            log.info("MQTT: connected to %s (MQTT %s)", self.address, self.protocol)
        except Exception:
            log.exception("MQTT: on_connect failed")

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: mqtt.DisconnectFlags,
                       reason: ReasonCode, properties: Properties | None) -> None:
        try:
            if client is not self._client:
                return
            was = self._connected
            self._connected = False
            if self._stopping.is_set():
                return
            if self._awaiting_connack and self._protocol == mqtt.MQTTv5:
                # Some 3.1.1-only brokers hang up on an MQTT 5 CONNECT instead of answering rc 1.
                self._silent_closes += 1
                if self._silent_closes >= 2:
                    log.warning("MQTT: %s closed the connection twice without answering an MQTT 5 "
                                "CONNECT; falling back to 3.1.1", self.address)
                    self._fallback = True
                    self._wake.set()
            self._awaiting_connack = False
            self._state.set_link("mqtt", "down")
            if was and not self._down_logged:
                self._down_logged = True
                log.warning("MQTT: lost the connection to %s (%s); reconnecting", self.address,
                            reason.getName() if isinstance(reason, ReasonCode) else reason)
        except Exception:
            log.exception("MQTT: on_disconnect failed")

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        try:
            if client is not self._client:
                return
            self._connected = False
            self._state.set_link("mqtt", "down")
            err = getattr(client, "last_connect_error", None)
            if not self._down_logged:
                self._down_logged = True
                why = (describe_connect_error(err, self.address, ca_hint="mqtt.ca_file")
                       if err is not None else f"cannot connect to {self.address}")
                log.warning("MQTT: %s; retrying with back-off up to %s s", why, self._reconnect_delay[1])
            else:
                log.debug("MQTT: still cannot connect to %s: %s", self.address, err)
        except Exception:
            log.exception("MQTT: on_connect_fail failed")

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            correlation = getattr(message.properties, "CorrelationData", None) if message.properties else None
            if message.retain:
                # A retained command would run again on every reconnect (sign_out in a loop).
                self._reply(client, None, "retained commands are ignored; publish without retain",
                            correlation)
                return
            cmd = parse_command(bytes(message.payload))
            if cmd.error is not None:
                log.warning("MQTT: rejected command on %s: %s", message.topic, cmd.error)
                self._reply(client, cmd.action, cmd.error, correlation)
                return
            try:
                self._jobs.put_nowait((cmd.action or "", correlation))
            except queue.Full:
                self._reply(client, cmd.action, "busy: too many commands queued; try again", correlation)
        except Exception:
            log.exception("MQTT: on_message failed")

    # ----- our threads

    def _on_state(self, snap: Snapshot) -> None:
        """State observer (any thread): wake the publisher only for what MQTT shows."""
        key = (snap.phase, snap.account, snap.error, snap.outbox, snap.last_upload, snap.code)
        if key != self._seen:
            self._seen = key
            self._wake.set()

    def _run_publisher(self) -> None:
        wake_at: float | None = None
        while not self._stopping.is_set():
            timeout = 5.0 if wake_at is None else min(5.0, max(0.0, wake_at - self._clock()))
            self._wake.wait(timeout)
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                if self._fallback:
                    self._fallback = False
                    self._fall_back_to_311()
                    continue
                with self._lock:
                    client = self._client
                    if not self._connected or client is None:
                        continue
                    force, self._force = self._force, False
                pubs, wake_at = self._out.plan(self._state.snapshot, self._clock(), force=force)
                for pub in pubs:
                    self._publish(client, pub)
            except Exception:
                log.exception("MQTT: publishing failed")

    def _run_commands(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None or self._stopping.is_set():
                return
            action, correlation = job
            error: str | None = None
            try:
                fn = self._commands.get(action)
                if fn is not None:
                    log.info("MQTT: running command %s", action)
                    fn()
                elif action == "publish_status":
                    with self._lock:
                        self._force = True
                    self._wake.set()
                else:
                    error = f"{action} is not available on this device"
            except AgentError as err:
                error = str(err) or type(err).__name__
                log.warning("MQTT: command %s failed: %s", action, error)
            except Exception as err:
                log.exception("MQTT: command %s crashed", action)
                error = f"internal error: {type(err).__name__}: {err}"
            client = self._client
            if client is not None:
                try:
                    self._reply(client, action, error, correlation)
                except Exception:   # this thread is not supervised: it must outlive a bad reply
                    log.exception("MQTT: could not publish the result of %s", action)

    # ----- publishing

    def _publish(self, client: mqtt.Client, pub: Publication) -> mqtt.MQTTMessageInfo | None:
        props = None
        if pub.expiry_s is not None and self._protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.MessageExpiryInterval = pub.expiry_s
        info = client.publish(pub.topic, pub.payload, qos=1, retain=True, properties=props)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.warning("MQTT: publishing to %s failed: %s", pub.topic, mqtt.error_string(info.rc))
        return info

    def _reply(self, client: mqtt.Client, action: str | None, error: str | None,
               correlation: bytes | None) -> None:
        props = None
        if correlation is not None and self._protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.CorrelationData = correlation
        client.publish(self.result_topic, result_payload(action, error), qos=1, retain=False,
                       properties=props)


def shutdown_client(client: mqtt.Client, timeout_s: float) -> None:
    """Disconnect and stop paho's thread, waiting at most ``timeout_s``.

    loop_stop() joins without a timeout and paho may sit in a back-off sleep or a connect
    attempt; its thread is a daemon, so waiting in a helper thread keeps stop() bounded.
    """
    try:
        client.disconnect()
    except Exception:  # noqa: S110 - a dead socket must not stop the shutdown
        pass
    stopper = threading.Thread(target=client.loop_stop, name="mqtt-stop", daemon=True)
    stopper.start()
    stopper.join(timeout_s)
    if stopper.is_alive():
        log.debug("MQTT: network thread still busy after %.1f s; leaving it (daemon)", timeout_s)
