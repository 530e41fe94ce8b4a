"""Connecting to a broker: URL parsing, TLS contexts, passwords, paho clients, and error texts.

Shared by the device's publisher and the admin's ``watch``, so both connect the same way.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.errors import ConfigError, NotifyError
from agent.net.tls import client_context
from agent.wakeup import name_os_thread

log = logging.getLogger(__name__)

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
    """System CAs plus ``ca_file`` (in addition, never instead: ``agent.net.tls.client_context``,
    the same trust as the HTTPS clients), and the client cert if any.

    Raises:
        NotifyError: a file is missing, unreadable or not PEM of the right kind.
    """
    try:
        ctx = client_context(ca_file)
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


IDLE_SELECT_S = 3600.0        # paho's network thread with nothing to do (see ReportingClient)


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

    # paho's loop_start() thread selects with a 1 s timeout: 60 wake-ups a minute on an idle box.
    # Publishes, subscribes and disconnect() from other threads wake the select through paho's
    # own socket pair, and incoming packets wake it anyway; the only timer in the loop is the
    # keepalive check that runs after each select. So the select sleeps until that is due.

    def _thread_main(self) -> None:
        name_os_thread("mqtt-network")
        try:
            self.loop_forever(timeout=IDLE_SELECT_S, retry_first_connection=True)
        finally:
            self._thread = None

    def _loop(self, timeout: float = 1.0) -> MQTTErrorCode:
        return super()._loop(min(timeout, self._keepalive_due_s()))

    def _keepalive_due_s(self) -> float:
        """Seconds until paho's keepalive check has work (a PINGREQ to send, or a PINGRESP
        overdue), from the same clock and fields it uses; a quarter keepalive if they moved."""
        keepalive = float(self.keepalive or 0)
        if keepalive <= 0:
            return IDLE_SELECT_S
        try:
            with self._msgtime_mutex:
                last = min(self._last_msg_out, self._last_bytes_received)
            due = last + keepalive
            if self._ping_t:
                due = min(due, self._ping_t + keepalive)
            return max(0.05, min(IDLE_SELECT_S, due - time.monotonic() + 0.05))
        except (AttributeError, TypeError):
            return keepalive / 4


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


RECEIVE_MAXIMUM = 65535


def receive_maximum() -> Properties:
    """MQTT 5 CONNECT properties allowing the broker 65,535 unacknowledged QoS 1 messages to us.

    Without it Mosquitto allows 20 in flight and queues at most ``max_queued_messages`` (1000)
    more: the retained burst of a 10,000-device fleet is then silently cut to ~1,020 messages.
    Our clients acknowledge as fast as they read, so the window costs the broker nothing.
    """
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.ReceiveMaximum = RECEIVE_MAXIMUM
    return props


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
