"""paho-mqtt wrapped: the retained status, the retained sign-in code and remote commands.

Admins of a fleet learn the code and each device's state from the broker instead of walking to
the box. Topics and payloads are docs/INTERFACE.md's "MQTT" table. Threads:

* paho's network thread runs the callbacks; they only record facts and wake our threads (an
  exception escaping a paho callback would kill that thread, so every callback is guarded);
* the publisher thread decides what the broker should hold (``Outbound``) and publishes it: on
  every relevant state change, at a code's expiry, and the whole truth after every (re)connect;
  in the service that is the observer loop's thread (``start(thread=False)``, the loop calls
  ``serve`` and its Signal is ``wakeup``; agent/observerloop.py);
* the command thread runs the ``commands`` callables, so a slow ``sign_out`` never stalls MQTT.

Nothing is published while disconnected: paho would queue stale QoS 1 copies for hours; instead
the current truth is published on reconnect.

Reconnects: paho's own loop reconnects, but every wait comes from ``agent.net.retry.Backoff``
(jitter, so a fleet does not reconnect in step after a broker restart): each failure callback,
which paho runs just before its reconnect wait, sets that one wait (``reconnect_delay_set(d, d)``).
The journal follows ``agent.net.retry.OutageLog``: a line when an outage starts, at most one
every 10 min with a count, one when it ends.
"""

from __future__ import annotations

import logging
import math
import queue
import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.config import MqttSettings
from agent.errors import AgentError, ConfigError, NotifyError
from agent.mqtt.connection import (
    ReportingClient,
    credentials_message,
    describe_connect_error,
    new_client,
    no_delay,
    parse_broker_url,
    read_password,
    receive_maximum,
    shutdown_client,
    tls_context,
)
from agent.mqtt.homeassistant import birth_topic, discovery_payload, discovery_topic
from agent.mqtt.protocol import (
    OFFLINE,
    STATUS_AGE_INTERVAL_S,
    STATUS_MIN_INTERVAL_S,
    Outbound,
    Publication,
    parse_command,
    result_payload,
)
from agent.net.retry import Backoff, OutageLog
from agent.state import AgentState, Snapshot
from agent.wakeup import name_os_thread

log = logging.getLogger(__name__)

RETAINED_NOT_RUN = "retained commands are not run: publish without retain"

RECONNECT_DELAY_S = (1, 60)          # Backoff: first wait, cap (doubling, equal jitter)
AUTH_RECONNECT_DELAY_S = (15, 300)   # refused credentials: nobody fixes them in a second
STOP_JOIN_S = 1.0

# Reason codes that mean "fix the credentials" (MQTT 5; paho maps 3.1.1's 4/5 onto them).
_BAD_CREDENTIALS = (134, 135)
_UNSUPPORTED_PROTOCOL = 132


# --------------------------------------------------------------------------- the notifier

class MqttPublisher:
    """Announces code and status on MQTT and runs remote commands; see the module docstring."""

    def __init__(self, settings: MqttSettings, device_id: str, state: AgentState,
                 commands: Mapping[str, Callable[[], None]], version: str, *,
                 clock: Callable[[], float] = time.monotonic,
                 status_min_interval_s: float = STATUS_MIN_INTERVAL_S,
                 status_age_interval_s: float = STATUS_AGE_INTERVAL_S,
                 reconnect_delay_s: tuple[float, float] = RECONNECT_DELAY_S,
                 rng: Callable[[], float] = random.random,
                 wakeup: threading.Event | None = None) -> None:
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
        self._out = Outbound(prefix, device_id, version, status_min_interval_s=status_min_interval_s,
                             status_age_interval_s=status_age_interval_s)
        self._client_id = f"device-agent-{device_id}"
        self._ha: Publication | None = None          # Home Assistant discovery, when opted in
        self._ha_birth = ""
        if settings.homeassistant:
            self._ha = Publication(discovery_topic(settings.homeassistant_prefix, device_id),
                                   discovery_payload(prefix, device_id, version))
            self._ha_birth = birth_topic(settings.homeassistant_prefix)
        self._ha_due = False

        self._lock = threading.Lock()
        self._wake = wakeup or threading.Event()   # news for the publishing step
        self._own_thread = True           # start(thread=False): the observer loop calls serve()
        self._stopping = threading.Event()
        self._client: ReportingClient | None = None
        self._protocol = mqtt.MQTTv5
        self._connected = False
        self._force = False               # publish the whole truth at the next chance
        self._rebuild_as: MQTTProtocolVersion | None = None   # rebuild the client for this version
        self._rebuild_delay_s = 0.0       # ... after this back-off (a 3.1.1 connection was lost)
        self._rebuilder: threading.Thread | None = None   # the one mqtt-rebuild thread (loop mode)
        self._auth_failed = False         # the last CONNACK refused the credentials
        # Network thread only: paho runs every callback there, one at a time.
        self._backoff = Backoff(*reconnect_delay_s, rng)
        self._auth_backoff = Backoff(*AUTH_RECONNECT_DELAY_S, rng)
        self._down = OutageLog(log, clock=clock)
        self._refused = OutageLog(log, level=logging.ERROR, clock=clock)
        self._crashed = OutageLog(log, level=logging.ERROR, clock=clock)   # the publisher thread
        self._said_no_v5 = False          # "does not support MQTT 5": once until 5 works again
        self._awaiting_connack = False    # a socket is open, no CONNACK yet
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

    def start(self, *, thread: bool = True) -> None:
        """Connect in the background; never blocks (a broker down at boot is fine).
        ``thread=False``: publishing is ``serve()``, called by the observer loop."""
        self._stopping.clear()
        self._own_thread = thread
        with self._lock:
            self._client = client = self._make_client()
        # Said before _connect: a broker on loopback may answer (and "connected" be logged) at once.
        log.info("MQTT: connecting to %s as %s (topics %s/...)", self.address, self._client_id,
                 self._out.status_topic.rsplit("/", 1)[0])
        self._connect(client)
        self._state.subscribe(self._on_state)
        threads = (("mqtt-publisher", self._run_publisher),) if thread else ()
        for name, target in (*threads, ("mqtt-commands", self._run_commands)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

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
        client.connect_async(self.address.host, self.address.port, keepalive=self._keepalive_s,
                             properties=receive_maximum() if self._protocol == mqtt.MQTTv5 else None)
        client.loop_start()

    def _retire_client(self) -> None:
        """The current client off and its network thread stopped (its callbacks are ignored
        from here on: they check for the current client)."""
        with self._lock:
            old, self._client = self._client, None
        if old is not None:
            shutdown_client(old, 2.0)

    def _rebuild(self, protocol: MQTTProtocolVersion) -> None:
        """Runs on the publisher thread: paho fixes the protocol per Client, so build a new one."""
        self._retire_client()
        if self._stopping.is_set():
            return
        with self._lock:
            self._protocol = protocol
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
                    # Only this answer means "no MQTT 5 here"; a hang-up is a busy or broken front.
                    log.log(logging.DEBUG if self._said_no_v5 else logging.WARNING,
                            "MQTT: %s does not support MQTT 5; using 3.1.1 for this connection",
                            self.address)
                    self._said_no_v5 = True
                    self._rebuild_as = mqtt.MQTTv311
                    client.disconnect()
                    self._wake.set()
                elif reason.value in _BAD_CREDENTIALS:
                    self._auth_failed = True
                    self._refused.failed(credentials_message(reason, "mqtt.username/password_file"),
                                         f"retrying with back-off up to {self._auth_backoff.max_s:g} s")
                else:
                    self._auth_failed = False
                    self._down.failed(f"MQTT: {self.address} refused the connection "
                                      f"({reason.value} {reason.getName()})", "retrying")
                return        # on_disconnect follows and sets the wait before the next attempt
            self._auth_failed = False
            self._backoff.reset()
            self._auth_backoff.reset()
            if self._protocol == mqtt.MQTTv5:
                self._said_no_v5 = False
            # Retained commands are delivered (and answered, never run): every command gets a
            # result (docs/INTERFACE.md), and a stale one left on the broker must be explained.
            options = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_ON_SUBSCRIBE)
            if self._protocol == mqtt.MQTTv5:
                client.subscribe(self.cmd_topic, options=options)
            else:
                client.subscribe(self.cmd_topic, qos=1)
            if self._ha is not None:
                client.subscribe(self._ha_birth, qos=1)
            with self._lock:
                self._connected = True
                self._force = True
                self._ha_due = self._ha is not None
            self._wake.set()
            self._state.set_link("mqtt", "up")
            line = f"MQTT: connected to {self.address} (MQTT {self.protocol})"
            if not (self._down.ended(line) | self._refused.ended(line)):
                log.info("%s", line)
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
            hung_up, self._awaiting_connack = self._awaiting_connack, False
            self._state.set_link("mqtt", "down")
            why = reason.getName() if isinstance(reason, ReasonCode) else reason
            if was:
                self._down.failed(f"MQTT: lost the connection to {self.address} ({why})", "reconnecting")
            elif hung_up:          # a load balancer without a backend, a broker at its limit
                self._down.failed(f"MQTT: {self.address} hung up before answering ({why})", "retrying")
            if self._protocol != mqtt.MQTTv5 and self._rebuild_as is None:
                # 3.1.1 was this connection's answer, not the broker's forever (it may be upgraded,
                # or a load balancer sent us to an old node): the next connection tries 5 again.
                self._retry_v5(client)
            elif self._rebuild_as is None:
                self._schedule_reconnect(client)
        except Exception:
            log.exception("MQTT: on_disconnect failed")

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        try:
            if client is not self._client:
                return
            self._connected = False
            self._state.set_link("mqtt", "down")
            err = getattr(client, "last_connect_error", None)
            why = (describe_connect_error(err, self.address, ca_hint="mqtt.ca_file")
                   if err is not None else f"cannot connect to {self.address}")
            self._down.failed(f"MQTT: {why}", f"retrying with back-off up to {self._backoff.max_s:g} s")
            if self._protocol != mqtt.MQTTv5 and self._rebuild_as is None:
                self._retry_v5(client)
            else:
                self._schedule_reconnect(client)
        except Exception:
            log.exception("MQTT: on_connect_fail failed")

    def _next_delay(self) -> float:
        return (self._auth_backoff if self._auth_failed else self._backoff).next_delay()

    def _schedule_reconnect(self, client: mqtt.Client) -> None:
        """paho's next reconnect wait, from our Backoff: paho calls on_disconnect and
        on_connect_fail just before that wait, and ``reconnect_delay_set`` restarts its own
        doubling, so ``(d, d)`` makes the wait exactly ``d``."""
        delay = self._next_delay()
        client.reconnect_delay_set(delay, delay)  # type: ignore[arg-type]

    def _retry_v5(self, client: mqtt.Client) -> None:
        """A 3.1.1 client failed: the publisher thread builds an MQTT 5 one after the same
        back-off (a 3.1.1 broker that drops us at once, e.g. a cloned box with our client id,
        must not get a reconnect loop). This client stops reconnecting by itself."""
        self._rebuild_delay_s = self._next_delay()
        client.disconnect()
        self._rebuild_as = mqtt.MQTTv5
        self._wake.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            if self._ha is not None and message.topic == self._ha_birth:
                # Home Assistant restarted and forgot its entities; a retained "online" is the
                # one we already answered at connect.
                if bytes(message.payload) == b"online" and not message.retain:
                    self._ha_due = True
                    self._wake.set()
                return
            correlation = getattr(message.properties, "CorrelationData", None) if message.properties else None
            if message.retain:
                # A retained command would run again on every reconnect (sign_out in a loop):
                # answered, not run. An empty payload is a retained message being cleared.
                if message.payload:
                    self._reply(client, parse_command(bytes(message.payload)).action,
                                RETAINED_NOT_RUN, correlation)
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
        key = (snap.phase, snap.account, snap.error, snap.outbox, snap.last_upload, snap.code, snap.warning,
               getattr(snap, "storage", None), getattr(snap, "clock", None))
        if key != self._seen:
            self._seen = key
            if self._own_thread:
                self._wake.set()      # else the observer loop serves state changes itself

    def _run_publisher(self) -> None:
        name_os_thread()
        while not self._stopping.is_set():
            # Asleep until news (state, connection, stop: they set _wake) or what the plan
            # asked for (a code's expiry, the status rate limit); no ticking on an idle box.
            delay = self.serve()
            timeout = None if delay == math.inf else delay
            if self._clock is not time.monotonic:
                timeout = 5.0 if timeout is None else min(5.0, timeout)   # an injected clock
            self._wake.wait(timeout)
            self._wake.clear()

    def serve(self) -> float:
        """Publish what the broker should hold now; seconds until the plan wants to be asked
        again (``math.inf``: on news only)."""
        if self._stopping.is_set():
            return math.inf
        try:
            if self._rebuild_as is not None:
                if self._own_thread:
                    delay, self._rebuild_delay_s = self._rebuild_delay_s, 0.0
                    protocol, self._rebuild_as = self._rebuild_as, None
                    self._rebuild_after(delay, protocol)
                    return math.inf
                # Its back-off and paho's join must not hold up the loop: a thread, and one at
                # a time (a late on_disconnect asks again while one runs: that one takes it).
                with self._lock:
                    if self._rebuilder is None:
                        self._rebuilder = threading.Thread(target=self._rebuild_pending, name="mqtt-rebuild",
                                                           daemon=True)
                        self._rebuilder.start()
                return math.inf
            with self._lock:
                client = self._client
                if not self._connected or client is None:
                    return math.inf
                force, self._force = self._force, False
                ha, self._ha_due = self._ha_due, False
            now = self._clock()
            pubs, wake_at = self._out.plan(self._state.snapshot, now, force=force)
            if ha and self._ha is not None:
                pubs.insert(0, self._ha)
            for pub in pubs:
                self._publish(client, pub)
            self._crashed.ended("MQTT: publishing works again")
            return math.inf if wake_at is None else max(0.0, wake_at - now)
        except Exception:
            self._crashed.failed("MQTT: publishing failed", exc_info=True)
            return math.inf

    def _rebuild_pending(self) -> None:
        """The ``mqtt-rebuild`` thread (observer-loop mode): every rebuild asked for, in turn."""
        while True:
            with self._lock:
                if self._rebuild_as is None or self._stopping.is_set():
                    self._rebuilder = None
                    return
                delay, self._rebuild_delay_s = self._rebuild_delay_s, 0.0
                protocol, self._rebuild_as = self._rebuild_as, None
            try:
                self._rebuild_after(delay, protocol)
            except Exception:
                self._crashed.failed("MQTT: rebuilding the client failed", exc_info=True)

    def _rebuild_after(self, delay: float, protocol: MQTTProtocolVersion) -> None:
        """The old client retired first, then the back-off, then the new client: a client that
        called ``disconnect()`` in its own ``on_disconnect`` still reconnects by itself (paho
        marks the connection lost after the callback), so left running through the wait it
        could connect again with the old protocol, and its shutdown after the wait made the
        wait up to 1 s longer (paho's reconnect sleeps in 1 s steps)."""
        began = time.monotonic()
        self._retire_client()
        left = delay - (time.monotonic() - began)
        if left > 0 and self._stopping.wait(left):   # the back-off; stop ends it
            return
        self._rebuild(protocol)
        self._wake.set()

    def _run_commands(self) -> None:
        name_os_thread()
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
