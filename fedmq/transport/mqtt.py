"""Thin adapter over one paho-mqtt 2.x client (MQTT 5 or 3.1.1): connect, reconnect, route
messages, fail over to the next of several broker addresses.

Handlers run on paho's network thread and must be quick; exceptions in them are logged
and counted here so a bad message can never stop the network loop.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedmq.core.chunking import DEFAULT_MAX_PAYLOAD
from fedmq.errors import BrokerError, ConfigError
from fedmq.transport.leanclient import LeanClient
from fedmq.transport.message import Message
from fedmq.transport.tls import TlsFiles, describe_tls_failure

log = logging.getLogger(__name__)

# Reconnect backoff bounds: fast first retry for a blip, capped so a device that lost its
# link for hours still comes back within half a minute of the link returning.
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 30.0
# Each link scales both bounds by its own random factor in [1 - J, 1 + J]: after a broker
# restart a fleet does not come back in lockstep, doubling its delays in unison.
RECONNECT_JITTER = 0.5
KEEPALIVE_S = 30

# mqtt_version settings: "auto" tries MQTT 5 and falls back to 3.1.1 when the broker refuses
# the protocol version in its CONNACK (docs/brokers.md lists who speaks what).
MQTT_VERSIONS = ("auto", "5", "3.1.1")
_PAHO_PROTOCOL = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}
# paho's name for the CONNACK of a broker that does not speak MQTT 5 (it answers a v5 CONNECT
# with its own 3.1.1 refusal, return code 1, or with v5 reason code 0x84).
_UNSUPPORTED_PROTOCOL = "Unsupported protocol version"
_UNSUPPORTED_PROTOCOL_CODE = 0x84

# With "auto": connections closed without a CONNACK, in a row, after which a broker that
# never answered MQTT 5 is tried with 3.1.1, in case it cannot parse 5 (RabbitMQ before
# 3.13). Only a 3.1.1 CONNACK settles it: a link whose every connection is closed at once
# (a TCP proxy or load balancer with no broker behind it, or a simulated device cut off)
# goes back to 5, since its version was never the trouble.
UNANSWERED_BEFORE_FALLBACK = 2

# Handlers get fedmq's own Message: paho's MQTTMessage never reaches them.
Handler = Callable[[Message], None]

# CONNACK reasons that only an operator can fix, with what to do about them.
_CREDENTIALS_HINT = ("check username and password in the config (empty: anonymous, which a "
                     "production broker refuses); `fedmq enroll DEVICE_ID` on the broker "
                     "creates an account")
_REFUSAL_HINTS = {
    "Not authorized": _CREDENTIALS_HINT,
    "Bad user name or password": _CREDENTIALS_HINT,
    "Client identifier not valid": "check device_id / client_id",
    "Banned": "the broker banned this client",
    _UNSUPPORTED_PROTOCOL: ('the broker does not speak this MQTT version; set mqtt_version = '
                            '"auto" (or "3.1.1")'),
}
# A TLS broker that hangs up before CONNACK rejected the handshake after it completed on
# our side (TLS 1.3 verifies the client certificate late).
TLS_CLOSED = ("the broker probably requires a client certificate signed by its CA; check "
              "cert_file and key_file (`fedmq enroll DEVICE_ID --cert` issues them)")


def _refusal_hint(reason: str) -> str:
    hint = _REFUSAL_HINTS.get(reason)
    return f"; {hint}" if hint else ""


def publish_overhead(topic: str, *, qos: int, v5: bool = True) -> int:
    """Bytes a PUBLISH adds around its payload: what a broker's packet limit counts beyond
    the payload itself."""
    fixed_header = 1 + 4  # packet type and flags, remaining length (a varint of up to 4 bytes)
    topic_name = 2 + len(topic.encode("utf-8"))
    packet_id = 2 if qos > 0 else 0
    properties = 1 if v5 else 0  # publish() sends none: a one-byte zero length (v5 only)
    return fixed_header + topic_name + packet_id + properties


def message_from_paho(message: mqtt.MQTTMessage) -> Message:
    """paho's message as fedmq's, the payload object passed on as it is (no copy)."""
    payload = message.payload
    if type(payload) is not bytes:  # paho's own parser may leave a bytearray slice
        payload = bytes(payload)
    props = message.properties
    return Message(
        topic=message.topic, payload=payload, qos=message.qos, retain=bool(message.retain),
        mid=message.mid, dup=bool(message.dup),
        user_properties=tuple(getattr(props, "UserProperty", ())) if props else (),
        expiry_s=getattr(props, "MessageExpiryInterval", None) if props else None,
    )


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        parsed = urlparse(url if "://" in url else f"mqtt://{url}")
        if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
            raise ConfigError(f"broker URL {url!r} must look like mqtt://host:port")
        tls = parsed.scheme == "mqtts"
        try:
            port = parsed.port or (8883 if tls else 1883)
        except ValueError:
            raise ConfigError(f"broker URL {url!r} has a bad port") from None
        return cls(parsed.hostname, port, tls)

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_brokers(spec: str | Sequence[str]) -> tuple[BrokerAddress, ...]:
    """One broker URL, several separated by commas, or a list of them: the addresses a link
    tries in turn. All must be TLS (mqtts://) or all plain: one TLS setup serves them all."""
    urls = [u.strip() for u in (spec.split(",") if isinstance(spec, str) else spec)]
    urls = [u for u in urls if u]
    if not urls:
        raise ConfigError("broker is empty: give a URL like mqtt://host:1883 (or several, "
                          "separated by commas)")
    addresses = tuple(BrokerAddress.parse(u) for u in urls)
    if len({a.tls for a in addresses}) > 1:
        raise ConfigError(f"broker list {', '.join(map(str, addresses))} mixes mqtts:// and "
                          "mqtt://; use one scheme for all of them")
    return addresses


def check_mqtt_version(value: str) -> str:
    if value not in MQTT_VERSIONS:
        raise ConfigError(f"mqtt_version {value!r} must be one of {', '.join(MQTT_VERSIONS)}")
    return value


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def _no_delay(_client, _userdata, sock) -> None:
    """Turn off Nagle's algorithm before CONNECT goes out. MQTT is request/response
    (PUBLISH -> PUBACK, model -> update): with Nagle on, a small message waits for the
    ACK of the previous one, which the peer delays by up to 40 ms, so every hop stalls
    ~40 ms (measured: 0.135-0.160 s per digits round with it, 0.009-0.015 s without)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError) as exc:  # not TCP (a websocket or a Unix socket)
        log.debug("TCP_NODELAY not set: %s", exc)


class MqttLink:
    """One MQTT client (v5 or 3.1.1) that reconnects by itself, to the next broker of its
    list when it has several, and re-subscribes on every connect."""

    def __init__(
        self, *, client_id: str, broker: str | Sequence[str], username: str = "",
        password: str = "", will: Will | None = None,
        on_connect: Callable[[bool], None] | None = None,
        max_payload: int = DEFAULT_MAX_PAYLOAD, session_expiry_s: int = 0,
        manual_ack: bool = False, tls: TlsFiles | None = None, mqtt_version: str = "auto",
    ) -> None:
        """broker: one URL, or several (a list, or separated by commas): a lost connection
        or a failed connect moves on to the next, with the same backoff. session_expiry_s
        > 0: a persistent session the broker keeps that long after a disconnect, queueing
        QoS 1 messages for us (MQTT 5: clean_start false and a Session Expiry Interval;
        3.1.1: clean_session false, kept as long as the broker's own settings say).
        manual_ack: QoS 1 messages are acknowledged only by `ack()`, after the caller
        stored them. tls: CA and client certificate for an mqtts:// broker (mqtts://
        alone: the system's CAs). mqtt_version: "5", "3.1.1", or "auto" (5, then 3.1.1 for
        good once a broker refuses 5, said once at WARNING)."""
        self.addresses = parse_brokers(broker)
        self._next_address = 0  # index into addresses of the one connected or tried now
        self.address = self.addresses[0]
        self.failovers = 0  # times the link moved on to another address of its list
        self._last_address: BrokerAddress | None = None  # of the last accepted connection
        self.resubscribed_after_failover = 0  # see _handle_connect
        self.mqtt_version = check_mqtt_version(mqtt_version)
        # The version spoken now: "auto" starts with 5.
        self.protocol_version = "3.1.1" if mqtt_version == "3.1.1" else "5"
        self.session_expiry_s = session_expiry_s
        self.client_id = client_id
        self.max_payload = max_payload
        # The broker's Maximum Packet Size from its last CONNACK (None: it set no limit).
        self.max_packet_size: int | None = None
        # filter -> QoS of every active subscription (renewed on every connect)
        self._subscriptions: dict[str, int] = {}
        self._on_connect_cb = on_connect
        self.connected = threading.Event()
        self._disconnected = threading.Event()
        self._started_before = False
        # Set once the broker acknowledged every subscription of the current connection:
        # from then on, nothing published to our filters is missed.
        self.subscribed = threading.Event()
        self._pending_subacks: dict[int, str] = {}  # SUBSCRIBE packet id -> its filter
        # Why this link gave up for good (a broker that refuses fedmq's topics): retrying
        # cannot help, so it stopped reconnecting. None while all is well.
        self.fatal: str | None = None
        # Subscriptions the broker refused, asked again after a delay (_retry_subscription)
        self._retrying: set[str] = set()
        self._sub_attempts: dict[str, int] = {}
        self._timers: list[threading.Timer] = []
        self._generation = 0  # connections accepted so far: a retry belongs to one
        self._lock = threading.Lock()
        self.handler_errors = 0
        if self.protocol_version == "3.1.1":
            self._client = LeanClient(
                callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                protocol=mqtt.MQTTv311, clean_session=session_expiry_s <= 0)
        else:
            self._client = LeanClient(
                callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                protocol=mqtt.MQTTv5)
        if manual_ack:
            self._client.manual_ack_set(True)
        if username:
            self._client.username_pw_set(username, password or None)
        self._setup_tls(tls or TlsFiles(), has_password=bool(password))
        # Why the broker last turned us away (CONNACK reason or TLS failure), until we connect.
        self.refusal: str | None = None
        self._unreachable: str | None = None  # the last connect failure said, until connected
        self._connack: bool | None = None  # this connection's CONNACK: accepted, refused, none
        self._client.on_connect_fail = self._handle_connect_fail
        # Dotted topics: NATS's MQTT gateway (before 2.10) drops the client (see _dotted)
        self._will_topic = will.topic if will is not None else ""
        self._closed_unanswered = 0  # connections closed before CONNACK, in a row
        self._answered_v5 = False  # a broker answered an MQTT 5 CONNECT of this link
        self._trying_311 = ""  # why 3.1.1 is on trial (unanswered 5s), until a CONNACK
        self._said_unanswered = False  # that neither version is answered, until connected
        if will is not None:
            self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        jitter = random.uniform(1.0 - RECONNECT_JITTER, 1.0 + RECONNECT_JITTER)
        self.reconnect_delays = (RECONNECT_MIN_S * jitter, RECONNECT_MAX_S * jitter)
        self._client.reconnect_delay_set(*self.reconnect_delays)
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_subscribe = self._handle_subscribe
        self._client.on_socket_open = _no_delay

    def route(self, topic_filter: str, handler: Handler, qos: int = 1, *,
              active: bool = True) -> None:
        """Send messages on `topic_filter` to `handler`; subscribe now and after every
        reconnect, or (active=False) only once `activate` is called."""
        self._client.message_callback_add(topic_filter, self._guard(handler))
        if active:
            self.activate(topic_filter, qos)

    def activate(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe to a routed filter (no-op if already subscribed: a second SUBSCRIBE
        would make the broker send every retained message again)."""
        with self._lock:
            if topic_filter in self._subscriptions:
                return
            self._subscriptions[topic_filter] = qos
        if self.connected.is_set():
            self._subscribe([(topic_filter, qos)])

    def deactivate(self, topic_filter: str) -> None:
        with self._lock:
            if self._subscriptions.pop(topic_filter, None) is None:
                return
        if self.connected.is_set():
            self._client.unsubscribe(topic_filter)

    def _guard(self, handler: Handler) -> Callable:
        def call(_client, _userdata, message: mqtt.MQTTMessage) -> None:
            try:
                handler(message_from_paho(message))
            except Exception:
                self.handler_errors += 1
                log.exception("%s: handler for %s failed", self.client_id, message.topic)
        return call

    def start(self) -> None:
        """Connect in the background; paho keeps retrying while the broker is away."""
        v5: dict = {}
        if self.protocol_version == "5":
            props = Properties(PacketTypes.CONNECT)
            if self.session_expiry_s > 0:
                props.SessionExpiryInterval = self.session_expiry_s
            v5 = {"clean_start": self.session_expiry_s <= 0, "properties": props}
        try:
            self._client.connect_async(self.address.host, self.address.port,
                                       keepalive=KEEPALIVE_S, **v5)
        except (OSError, ValueError) as exc:
            raise BrokerError(f"cannot connect to {self.address}: {exc}") from exc
        if self._started_before:
            # paho 2.2's loop_start() opens a new wake-up socket pair without closing the
            # one the previous loop left behind; close it so a restarted link leaks nothing.
            self._client._reset_sockets(sockpair_only=True)
        self._started_before = True
        self._client.loop_start()

    def wait_connected(self, timeout: float) -> None:
        """Block until connected; fail early once the broker refused us (bad credentials,
        TLS), since retrying the same credentials will not help."""
        deadline = time.monotonic() + timeout
        while not self.connected.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
            if self.fatal is not None:
                raise BrokerError(f"{self.client_id}: {self.fatal}")
            refusal = self.refusal
            if refusal is not None:
                raise BrokerError(f"{self.client_id}: {self.address} refused the connection: "
                                  f"{refusal}")
            if time.monotonic() >= deadline:
                break
        if not self.connected.is_set():
            raise BrokerError(
                f"{self.client_id}: no connection to {self.address} after {timeout:.0f} s; "
                "is the broker running and reachable?"
            )

    def publish(self, topic: str, payload: bytes, *, qos: int = 1,
                retain: bool = False) -> mqtt.MQTTMessageInfo:
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log.warning("%s: publish to %s failed: %s", self.client_id, topic,
                        mqtt.error_string(info.rc))
        return info

    def ack(self, mid: int, qos: int) -> None:
        """Acknowledge a QoS 1 message received under manual_ack (after storing it)."""
        if qos > 0:
            self._client.ack(mid, qos)

    def effective_max_payload(self, topic: str, *, qos: int = 1) -> int:
        """The largest payload to publish on `topic`: max_payload, or less when the broker's
        packet limit leaves less room after the PUBLISH headers."""
        if self.max_packet_size is None:  # MQTT 3.1.1 always: its CONNACK says no limit
            return self.max_payload
        return min(self.max_payload, self.max_packet_size - publish_overhead(
            topic, qos=qos, v5=self.protocol_version == "5"))

    def stop(self, *, final: tuple[str, bytes] | None = None, timeout: float = 5.0) -> None:
        """Disconnect cleanly, first publishing `final` (e.g. a retained offline status)."""
        if final is not None and self.connected.is_set():
            info = self.publish(final[0], final[1], qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                log.warning("%s: final status not delivered", self.client_id)
        if self.connected.is_set():
            self._disconnected.clear()
            self._client.disconnect()
            # loop_stop() right away can drop the DISCONNECT and leave the socket open: the
            # broker would go on routing messages to a client that no longer reads them.
            if not self._disconnected.wait(timeout):
                log.warning("%s: broker did not confirm the disconnect", self.client_id)
        else:
            self._client.disconnect()
        self._client.loop_stop()
        for timer in self._timers:
            timer.cancel()
        self._timers = []
        # paho leaves its wake-up socket pair open until garbage collection, which then
        # may warn about unclosed sockets; close it now (start() makes a new one).
        self._client._reset_sockets(sockpair_only=True)
        self.connected.clear()

    def retry_now(self) -> None:
        """Reconnect now rather than after the backoff (the link is known to be back)."""
        self._client.retry_now()

    def _handle_connect(self, client, _userdata, flags, reason_code, props) -> None:
        self._connack = not reason_code.is_failure
        if self.protocol_version == "5" and not self._fall_back_pending(reason_code):
            self._answered_v5 = True  # a broker that answers 5 speaks it, refusal or not
        if reason_code.is_failure and self._fall_back(reason_code):
            return
        if reason_code.is_failure:
            self.refusal = f"{reason_code}{_refusal_hint(str(reason_code))}"
            log.error("%s: broker %s refused the connection: %s (retrying with backoff)",
                      self.client_id, self.address, self.refusal)
            return
        self.refusal = None
        self._closed_unanswered = 0
        self._said_unanswered = False
        if self._trying_311:
            self._trying_311, why = "", self._trying_311
            self._say_fell_back(why)
        self._note_packet_limit(getattr(props, "MaximumPacketSize", None))
        with self._lock:
            active = list(self._subscriptions.items())
            self._generation += 1
            self._retrying.clear()
        moved = self._last_address is not None and self._last_address != self.address
        self._last_address = self.address
        if moved and flags.session_present and active:
            # Another node of a cluster that shares sessions (NATS) handed us our session
            # back. Its subscriptions may be bound to state that died with the old node
            # (a consumer that never delivers again), and a SUBSCRIBE that repeats an
            # existing one need not bring the retained messages: drop them and subscribe
            # anew, so retained models and parts come down again.
            self._client.unsubscribe([f for f, _ in active])
            self.resubscribed_after_failover += 1
        self._subscribe(active)
        self.connected.set()
        self._unreachable = None
        log.info("%s: connected to %s (MQTT %s)", self.client_id, self.address,
                 self.protocol_version)
        if self._on_connect_cb is not None:
            try:
                self._on_connect_cb(bool(flags.session_present))
            except Exception:
                self.handler_errors += 1
                log.exception("%s: on-connect hook failed", self.client_id)

    @staticmethod
    def _fall_back_pending(reason_code) -> bool:
        return (str(reason_code) == _UNSUPPORTED_PROTOCOL
                or getattr(reason_code, "value", None) == _UNSUPPORTED_PROTOCOL_CODE)

    def _fall_back(self, reason_code) -> bool:
        """With mqtt_version "auto", a broker that refuses MQTT 5 gets 3.1.1 from the next
        attempt on (paho reconnects after its backoff); said once, at WARNING."""
        refused = self._fall_back_pending(reason_code)
        if not (refused and self.mqtt_version == "auto" and self.protocol_version == "5"):
            return False
        self._fall_back_to_311(str(reason_code))
        return True

    def _fall_back_to_311(self, why: str) -> None:
        self._use_version("3.1.1")
        self._say_fell_back(why)

    def _use_version(self, version: str) -> None:
        self.protocol_version = version
        if version == "3.1.1":
            self._client.use_mqtt311(clean_session=self.session_expiry_s <= 0)
        else:
            self._client.use_mqtt5()

    def _say_fell_back(self, why: str) -> None:
        log.warning("%s: broker %s does not speak MQTT 5 (%s); speaking MQTT 3.1.1 to it "
                    "(set mqtt_version = \"3.1.1\" to skip the attempt)", self.client_id,
                    self.address, why)

    def _dotted(self, what: str) -> str:
        return (f"{self.address} {what}: brokers that refuse '.' in MQTT topics (NATS's MQTT "
                "gateway before 2.10) drop such clients every time; name the fleet and the "
                "devices without '.' (A-Z a-z 0-9 _ -)")

    def _give_up(self, why: str) -> None:
        """Stop reconnecting: the broker will refuse us the same way every time."""
        if self.fatal is None:
            self.fatal = why
            log.error("%s: %s; not reconnecting", self.client_id, why)
            self._client.disconnect()
            # On paho's own thread (a callback): ends its retry loop without joining it;
            # stop() joins it later.
            self._client.loop_stop()

    def _fail_over(self, why: str) -> None:
        """Aim paho's next reconnect at the next address of the list (paho's backoff
        applies as before). Called with the socket closed."""
        if len(self.addresses) < 2:
            return
        self._next_address = (self._next_address + 1) % len(self.addresses)
        previous, self.address = self.address, self.addresses[self._next_address]
        self._client.aim(self.address.host, self.address.port)
        self.failovers += 1
        log.warning("%s: %s %s; trying %s next", self.client_id, why, previous, self.address)

    def _setup_tls(self, tls: TlsFiles, *, has_password: bool) -> None:
        """TLS for mqtts:// only: TLS files with mqtt:// would silently go unused."""
        if not self.address.tls:
            if tls:
                raise ConfigError(f"ca_file/cert_file/key_file are set but the broker URL "
                                  f"{self.address} is not TLS; use mqtts://")
            if has_password and self.address.host not in ("127.0.0.1", "localhost", "::1"):
                log.warning("%s: sending a password in clear text to %s; use mqtts://",
                            self.client_id, self.address)
            return
        self._client.tls_set_context(tls.context())

    def _handle_connect_fail(self, _client, _userdata) -> None:
        """TCP or TLS connect failed; paho retries. Called inside paho's `except OSError`,
        so the exception is still current and can be named."""
        exc = sys.exc_info()[1]
        if self.address.tls and isinstance(exc, ssl.SSLError):
            self.refusal = describe_tls_failure(exc)
            log.error("%s: TLS connection to %s failed: %s", self.client_id, self.address,
                      self.refusal)
        else:
            # Said once per cause until a connection succeeds (paho retries every few
            # seconds; a WARNING each time would bury the log), then at DEBUG.
            cause = f"{type(exc).__name__}: {exc}" if exc is not None else "unknown error"
            level = logging.DEBUG if cause == self._unreachable else logging.WARNING
            self._unreachable = cause
            log.log(level, "%s: cannot reach the broker at %s (%s); retrying with backoff",
                    self.client_id, self.address, exc)
        self._fail_over("cannot reach")

    def _note_packet_limit(self, limit: int | None) -> None:
        """Keep the broker's limit; say so once when it lowers max_payload."""
        if limit == self.max_packet_size:
            return
        self.max_packet_size = limit
        room = self.effective_max_payload("")
        if room < self.max_payload:
            log.info("%s: broker %s accepts packets of at most %d bytes, so payloads are split "
                     "above %d bytes less the topic length instead of above max_payload %d",
                     self.client_id, self.address, limit, room, self.max_payload)

    def _subscribe(self, subscriptions: list[tuple[str, int]]) -> None:
        with self._lock:
            self.subscribed.clear()
            for topic_filter, qos in subscriptions:
                rc, mid = self._client.subscribe(topic_filter, qos=qos)
                if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                    self._pending_subacks[mid] = topic_filter
            if not self._pending_subacks:
                self.subscribed.set()

    def _handle_subscribe(self, _client, _userdata, mid, reason_codes, _props) -> None:
        with self._lock:
            topic_filter = self._pending_subacks.pop(mid, "")
        refused = [code for code in reason_codes if code.is_failure]
        if refused and "." in topic_filter:
            log.error("%s: broker refused the subscription %s: %s", self.client_id,
                      topic_filter, refused[0])
            self._give_up(self._dotted(f"refused the subscription {topic_filter!r}"))
        elif refused:
            self._retry_subscription(topic_filter, refused[0])
        else:
            self._sub_attempts.pop(topic_filter, None)
        with self._lock:
            if not self._pending_subacks and not self._retrying:
                self.subscribed.set()

    def _retry_subscription(self, topic_filter: str, code) -> None:
        """A broker may refuse a subscription for a while (NATS's MQTT gateway refuses one
        when creating its JetStream consumer times out, on a loaded or re-forming cluster):
        ask again with the reconnect backoff, on this connection, until it is granted."""
        attempt = self._sub_attempts.get(topic_filter, 0)
        self._sub_attempts[topic_filter] = attempt + 1
        delay = min(self.reconnect_delays[1], self.reconnect_delays[0] * 2 ** attempt)
        level = logging.ERROR if attempt == 0 else logging.DEBUG
        log.log(level, "%s: broker %s refused the subscription %s: %s; asking again in "
                "%.1f s", self.client_id, self.address, topic_filter, code, delay)
        generation = self._generation
        with self._lock:
            self._retrying.add(topic_filter)

        def again() -> None:
            with self._lock:
                self._retrying.discard(topic_filter)
                qos = self._subscriptions.get(topic_filter)
                current = generation == self._generation and self.connected.is_set()
            if qos is not None and current:
                self._subscribe([(topic_filter, qos)])

        timer = threading.Timer(delay, again)
        timer.daemon = True
        self._timers = [t for t in self._timers if t.is_alive()] + [timer]
        timer.start()

    def _handle_disconnect(self, _client, _userdata, _flags, reason_code, _props) -> None:
        connack, self._connack = self._connack, None
        self.connected.clear()
        self._disconnected.set()
        self.subscribed.clear()
        with self._lock:
            self._pending_subacks.clear()
        if connack is False:
            if self.refusal is not None:  # refused for good: another node may let us in
                self._fail_over("refused by")
            return  # refused in CONNACK (or falling back to 3.1.1): logged there
        if connack is None and not self.address.tls:
            self._closed_unanswered += 1
            if (self._closed_unanswered >= UNANSWERED_BEFORE_FALLBACK
                    and self.mqtt_version == "auto" and self.protocol_version == "5"
                    and not self._answered_v5):
                # RabbitMQ's MQTT plugin before 3.13 cannot parse an MQTT 5 CONNECT and
                # hangs up without a CONNACK: try 3.1.1, said once a CONNACK settles it
                self._closed_unanswered = 0
                self._trying_311 = (f"closed the connection {UNANSWERED_BEFORE_FALLBACK} "
                                    "times without answering an MQTT 5 CONNECT")
                self._use_version("3.1.1")
                log.info("%s: %s %s; trying MQTT 3.1.1", self.client_id, self.address,
                         self._trying_311)
                return
            if self._trying_311:
                # 3.1.1 is not answered either: not a version problem, back to 5
                self._trying_311 = ""
                self._closed_unanswered = 0
                self._use_version("5")
                said, self._said_unanswered = self._said_unanswered, True
                log.log(logging.INFO if said else logging.WARNING,
                        "%s: %s closes MQTT 5 and 3.1.1 connections without answering: is "
                        "a broker running behind that address? Trying MQTT 5 again",
                        self.client_id, self.address)
                return
            if (self.mqtt_version == "auto" and self.protocol_version == "5"
                    and not self._answered_v5):
                log.info("%s: %s closed the connection without answering; trying again",
                         self.client_id, self.address)
                return  # said at WARNING once it is clear what it means
            if (self._closed_unanswered >= 2 and "." in self._will_topic
                    and self.protocol_version == "3.1.1"):
                self._give_up(self._dotted(f"closed the connection before answering CONNECT "
                                           f"{self._closed_unanswered} times; our will "
                                           f"topic {self._will_topic!r} has a '.'"))
                return
        if connack is None and self.address.tls and reason_code != 0:
            self.refusal = TLS_CLOSED
            log.error("%s: %s closed the TLS connection before answering CONNECT: %s",
                      self.client_id, self.address, self.refusal)
            return
        if reason_code != 0:
            log.warning("%s: disconnected from %s (%s); reconnecting", self.client_id,
                        self.address, reason_code)
            self._fail_over("lost")


def negotiate_mqtt_version(broker: str | Sequence[str], *, timeout: float = 30.0,
                           username: str = "", password: str = "",
                           tls: TlsFiles | None = None) -> str:
    """The MQTT version ("5" or "3.1.1") a broker speaks, found by connecting once with
    mqtt_version "auto" (a broker that refuses 5 is said at WARNING, once). For a process
    about to open many connections: it tells them the version, so none repeats the try."""
    link = MqttLink(client_id=f"fedmq-probe-{random.getrandbits(32):08x}", broker=broker,
                    username=username, password=password, tls=tls)
    link.start()
    try:
        link.wait_connected(timeout)
        return link.protocol_version
    finally:
        link.stop()
