"""Many MQTT v5 sessions on one selector loop: how one process hosts a 10,000-device fleet.

A paho client per simulated device costs two threads and three file descriptors, and
paho's `select()` loop cannot use a descriptor above 1023: a fleet stalled at 338 devices.
Here every session is a non-blocking socket registered with one `selectors` (epoll) loop
on one thread, and packets are encoded and parsed by `mqtt5` (a sans-I/O MQTT v5 codec,
the `sim` extra) — a session costs a socket and a few hundred bytes of Python objects.

Handlers run on the loop thread and must return quickly (hand training to a worker
pool); `publish` may be called from any thread. What the loop cannot do is said in words:
a session the broker refuses or that cannot connect is logged at WARNING (once per
session and cause) and counted in `failures`, and retried with a jittered backoff.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import heapq
import itertools
import logging
import os
import random
import resource
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fedmq.errors import BrokerError, require
from fedmq.transport.message import Message
from fedmq.transport.mqtt import BrokerAddress

log = logging.getLogger(__name__)

# Mosquitto listens with a backlog of 100: more connects in flight overflow it and the
# kernel drops SYNs, which it retransmits only after a second. Stay well below.
MAX_CONNECTING = 48
# Above ~14,000 connections from one source address to one broker port, connect() slows
# tenfold in the kernel (its search for a free ephemeral port); loopback brokers get
# connections spread round-robin over 127.0.0.1-5 instead (so several host processes
# together stay far below it too).
LOOPBACK_SOURCES = ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
# Reconnect backoff, as MqttLink's: quick after a blip, capped, jittered per session.
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 30.0
# Keep-alive: the broker drops a session silent for 1.5x this; pings go out at half of it.
KEEPALIVE_S = 60
# How often the loop looks at timers (reconnects, pings, connect time-outs) when idle.
TICK_S = 0.25
CONNECT_TIMEOUT_S = 30.0
RECV_BYTES = 256 * 1024

# Session states.
WAITING, CONNECTING, AWAIT_CONNACK, SUBSCRIBING, READY, CLOSED = range(6)
_STATE_NAMES = ("waiting", "connecting", "awaiting CONNACK", "subscribing", "ready", "closed")

Handler = Callable[["Session", Message], None]


@dataclass(frozen=True, slots=True)
class SessionSpec:
    """Who a session is and what it wants: fixed for its life."""

    client_id: str
    subscriptions: tuple[tuple[str, int], ...] = ()
    # Last Will: (topic, payload, qos, retain), published by the broker if we vanish.
    will: tuple[str, bytes, int, bool] | None = None
    # > 0: a persistent session the broker keeps (queueing QoS 1 messages) that long.
    session_expiry_s: int = 0
    username: str = ""
    password: str = ""


class Session:
    """One MQTT session's connection state; owned by the loop thread."""

    __slots__ = ("_inbuf", "_next_pid", "_out", "_ping_due", "_source", "attempts",
                 "connected_once", "extra", "handler", "last_error", "on_ready", "retry_at",
                 "sock", "spec", "state", "userdata")

    def __init__(self, spec: SessionSpec, handler: Handler,
                 on_ready: Callable[[Session], None] | None, userdata: object) -> None:
        self.spec = spec
        self.handler = handler
        self.on_ready = on_ready
        self.userdata = userdata
        self.state = WAITING
        self.sock: socket.socket | None = None
        self._inbuf: bytearray | None = None  # None while idle: no buffer per idle device
        self._out: bytearray | None = None
        self._next_pid = 0
        self._ping_due = 0.0
        self._source = ""
        self.retry_at = 0.0
        self.attempts = 0
        self.connected_once = False
        self.last_error = ""
        # Filters subscribed at run time (a model's chunk stream), renewed on reconnect.
        self.extra: dict[str, int] | None = None

    @property
    def client_id(self) -> str:
        return self.spec.client_id

    @property
    def ready(self) -> bool:
        return self.state == READY

    def packet_id(self) -> int:
        self._next_pid = self._next_pid % 65535 + 1
        return self._next_pid

    def __repr__(self) -> str:
        return f"Session({self.spec.client_id!r}, {_STATE_NAMES[self.state]})"


def raise_open_file_limit(wanted: int) -> int:
    """Raise this process's soft open-file limit toward `wanted` (as far as the hard limit
    allows) and return the limit in force; say so when it falls short."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
    limit = soft if soft != resource.RLIM_INFINITY else wanted
    if limit < wanted:
        log.warning("this process may open %d files (hard limit %s) but %d are wanted: "
                    "sessions beyond that will fail to connect; raise the limit (ulimit -n, "
                    "systemd LimitNOFILE) or run fewer devices per process", limit, hard,
                    wanted)
    return limit


class SessionLoop:
    """MQTT v5 client sessions to one broker, multiplexed on one selector thread."""

    def __init__(self, broker: str, *, max_connecting: int = MAX_CONNECTING,
                 keepalive_s: int = KEEPALIVE_S, name: str = "fedmq-sessions") -> None:
        self.mqtt5 = require("mqtt5", "sim")
        self.address = BrokerAddress.parse(broker)
        if self.address.tls:
            raise BrokerError("the simulator's session loop speaks plain MQTT only; use an "
                              "mqtt:// broker for large simulated fleets")
        self.max_connecting = max_connecting
        self.keepalive_s = keepalive_s
        self.name = name
        self.sessions: list[Session] = []
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._commands: collections.deque[Callable[[], None]] = collections.deque()
        self._queue: collections.deque[Session] = collections.deque()  # to connect now
        # Sessions waiting out a reconnect backoff: (when, tie-breaker, session).
        self._retries: list[tuple[float, int, Session]] = []
        self._tie = itertools.count()
        self._connecting = 0
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._rng = random.Random()
        self.ready_count = 0
        # Why sessions could not connect: cause -> count (each session logged once per cause).
        self.failures: collections.Counter[str] = collections.Counter()
        self.connects = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.handler_errors = 0
        self._sources = self._source_addresses()

    def _source_addresses(self) -> tuple[str, ...]:
        host = self.address.host
        if host in ("127.0.0.1", "localhost"):
            return LOOPBACK_SOURCES
        return ("",)

    # -- the public side (any thread) ----------------------------------------------------
    def add(self, spec: SessionSpec, handler: Handler, *,
            on_ready: Callable[[Session], None] | None = None,
            userdata: object = None) -> Session:
        """A new session; it connects once the loop runs (paced, in the order added)."""
        session = Session(spec, handler, on_ready, userdata)
        session._source = self._sources[len(self.sessions) % len(self._sources)]
        self.sessions.append(session)
        self._call(lambda: self._queue.append(session))
        return session

    def publish(self, session: Session, topic: str, payload: bytes, *, qos: int = 1,
                retain: bool = False) -> None:
        """Queue a PUBLISH on `session` (dropped with a debug line if it is not connected:
        the device's outbox re-sends what never got a receipt)."""
        self._call(lambda: self._publish(session, topic, payload, qos, retain))

    def subscribe(self, session: Session, filters: tuple[str, ...], qos: int = 1) -> None:
        """Subscribe `session` to more filters, now and after every reconnect."""
        self._call(lambda: self._change_subscriptions(session, filters, qos))

    def unsubscribe(self, session: Session, filters: tuple[str, ...]) -> None:
        self._call(lambda: self._change_subscriptions(session, filters, None))

    def call_soon(self, command: Callable[[], None]) -> None:
        """Run `command` on the loop thread (from any thread): how workers hand results
        back to the sessions' owners without locks."""
        self._call(command)

    def start(self) -> None:
        raise_open_file_limit(len(self.sessions) + 64)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Disconnect every session cleanly (no Last Will) and stop; takes about as long
        as writing one DISCONNECT per session, whatever the fleet's size."""
        if self._thread is None:
            return
        self._stopping.set()
        self._wake()
        self._thread.join(timeout)
        self._thread = None

    def state_counts(self) -> dict[str, int]:
        counts = collections.Counter(_STATE_NAMES[s.state] for s in self.sessions)
        return dict(counts)

    def never_connected(self) -> list[Session]:
        return [s for s in self.sessions if not s.connected_once]

    def _call(self, command: Callable[[], None]) -> None:
        if threading.current_thread() is self._thread:
            command()  # a handler publishing: no need to wait for the next wake-up
            return
        self._commands.append(command)
        self._wake()

    def _wake(self) -> None:
        # BlockingIOError: a wake-up is already pending; OSError: the loop has gone.
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    # -- the loop thread -----------------------------------------------------------------
    def _run(self) -> None:
        next_tick = 0.0
        try:
            while not self._stopping.is_set():
                self._run_commands()
                self._start_connects()
                now = time.monotonic()
                if now >= next_tick:
                    self._timers(now)
                    next_tick = now + TICK_S
                for key, events in self._selector.select(TICK_S):
                    session = key.data
                    if session is None:
                        self._drain_wake()
                        continue
                    if events & selectors.EVENT_WRITE:
                        self._on_writable(session)
                    if events & selectors.EVENT_READ and session.sock is not None:
                        self._on_readable(session)
            self._run_commands()
        except Exception:  # a bug here must not leave a silent, dead fleet
            log.exception("the session loop failed; every simulated device is offline")
        finally:
            self._shutdown()

    def _run_commands(self) -> None:
        commands = self._commands
        while commands:
            commands.popleft()()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _start_connects(self) -> None:
        now = time.monotonic()
        retries = self._retries
        while retries and retries[0][0] <= now:
            self._queue.append(heapq.heappop(retries)[2])
        while self._queue and self._connecting < self.max_connecting:
            self._connect(self._queue.popleft())

    def _connect(self, session: Session) -> None:
        session.attempts += 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if session._source:
                sock.bind((session._source, 0))
            code = sock.connect_ex((self.address.host, self.address.port))
        except OSError as exc:
            sock.close()
            self._failed(session, f"cannot open a socket: {exc.strerror or exc}")
            return
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self._failed(session, f"connect: {os.strerror(code)}")
            return
        session.sock = sock
        session.state = CONNECTING
        session.retry_at = time.monotonic() + CONNECT_TIMEOUT_S  # the connect's deadline
        self._connecting += 1
        self._selector.register(sock, selectors.EVENT_WRITE, session)

    def _on_writable(self, session: Session) -> None:
        sock = session.sock
        if sock is None:
            return
        if session.state == CONNECTING:
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self._drop(session, f"connect: {os.strerror(code)}")
                return
            session.state = AWAIT_CONNACK
            self._send(session, self._connect_packet(session))
            self._watch(session)
            return
        self._flush(session)

    def _connect_packet(self, session: Session) -> bytes:
        m, spec = self.mqtt5, session.spec
        will = None
        if spec.will is not None:
            topic, payload, qos, retain = spec.will
            will = m.Will(topic, payload=payload, qos=m.QoS(qos), retain=retain)
        return m.ConnectPacket(
            spec.client_id, username=spec.username or None,
            password=spec.password.encode() if spec.password else None,
            clean_start=spec.session_expiry_s == 0 or not session.connected_once,
            will=will, keep_alive=self.keepalive_s,
            session_expiry_interval=spec.session_expiry_s).write()

    def _on_readable(self, session: Session) -> None:
        sock = session.sock
        try:
            data = sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(session, f"connection lost: {exc.strerror or exc}")
            return
        if not data:
            self._drop(session, "the broker closed the connection")
            return
        self.bytes_in += len(data)
        buf = session._inbuf
        if buf is None:
            buf = session._inbuf = bytearray(data)
        else:
            buf += data
        consumed = 0
        m = self.mqtt5
        while session.sock is not None:
            try:
                with memoryview(buf) as view:
                    packet, size = m.read(view[consumed:])
            except IndexError:  # not all of the next packet is here yet
                break
            except ValueError as exc:
                self._drop(session, f"the broker sent a malformed packet: {exc}")
                return
            consumed += size
            self._on_packet(session, packet)
        if session._inbuf is buf:
            if consumed == len(buf):
                session._inbuf = None
            elif consumed:
                del buf[:consumed]

    def _on_packet(self, session: Session, packet) -> None:
        m = self.mqtt5
        if isinstance(packet, m.PublishPacket):
            message = Message(topic=packet.topic, payload=packet.payload, qos=int(packet.qos),
                              retain=packet.retain, mid=packet.packet_id or 0,
                              dup=packet.duplicate)
            try:
                session.handler(session, message)
            except Exception:
                self.handler_errors += 1
                log.exception("%s: the handler failed on %s", session.spec.client_id,
                              packet.topic)
            if packet.qos == 1 and session.sock is not None:
                self._send(session, m.PubAckPacket(packet.packet_id).write())
        elif isinstance(packet, m.ConnAckPacket):
            self._on_connack(session, packet)
        elif isinstance(packet, m.SubAckPacket):
            refused = [c for c in packet.reason_codes if int(c) >= 0x80]
            if refused:
                self._drop(session, f"subscription refused: {refused[0].name}", retry=False)
                return
            self._became_ready(session)
        elif isinstance(packet, m.DisconnectPacket):
            self._drop(session, f"the broker disconnected: {packet.reason_code.name}")
        # PUBACK, PINGRESP: nothing to do (a device's outbox tracks delivery by receipts)

    def _on_connack(self, session: Session, packet) -> None:
        if int(packet.reason_code) != 0:
            self._drop(session, f"the broker refused: {packet.reason_code.name}"
                       + (f" ({packet.reason_str})" if packet.reason_str else ""))
            return
        self._connecting -= 1
        session.connected_once = True
        self.connects += 1
        wanted = list(session.spec.subscriptions) + list((session.extra or {}).items())
        if wanted:
            session.state = SUBSCRIBING
            filters = [self.mqtt5.TopicFilter(f, max_qos=self.mqtt5.QoS(q)) for f, q in wanted]
            self._send(session, self.mqtt5.SubscribePacket(session.packet_id(),
                                                           filters).write())
        else:
            self._became_ready(session)

    def _change_subscriptions(self, session: Session, filters: tuple[str, ...],
                              qos: int | None) -> None:
        extra = session.extra if session.extra is not None else {}
        for f in filters:
            if qos is None:
                extra.pop(f, None)
            else:
                extra[f] = qos
        session.extra = extra or None
        if session.state != READY:
            return  # sent with the others once (re)connected
        m = self.mqtt5
        if qos is None:
            packet = m.UnsubscribePacket(session.packet_id(), list(filters))
        else:
            packet = m.SubscribePacket(session.packet_id(),
                                       [m.TopicFilter(f, max_qos=m.QoS(qos)) for f in filters])
        self._send(session, packet.write())

    def _became_ready(self, session: Session) -> None:
        if session.state == READY:
            return
        session.state = READY
        session.attempts = 0
        self.ready_count += 1
        if session.on_ready is not None:
            try:
                session.on_ready(session)
            except Exception:
                self.handler_errors += 1
                log.exception("%s: on_ready failed", session.spec.client_id)

    def _publish(self, session: Session, topic: str, payload: bytes, qos: int,
                 retain: bool) -> None:
        if session.state != READY:
            log.debug("%s is offline: not publishing on %s", session.spec.client_id, topic)
            return
        m = self.mqtt5
        packet = m.PublishPacket(topic, payload, qos=m.QoS(qos), retain=retain,
                                 packet_id=session.packet_id() if qos else None)
        self._send(session, packet.write())

    def _send(self, session: Session, data: bytes) -> None:
        if session._out:  # earlier bytes still wait: keep the order
            session._out += data
            return
        try:
            sent = session.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._drop(session, f"connection lost: {exc.strerror or exc}")
            return
        self.bytes_out += sent
        session._ping_due = time.monotonic() + self.keepalive_s / 2
        if sent < len(data):
            session._out = bytearray(data[sent:]) if session._out is None else \
                session._out + data[sent:]
            self._watch(session)

    def _flush(self, session: Session) -> None:
        out = session._out
        if out:
            try:
                sent = session.sock.send(out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._drop(session, f"connection lost: {exc.strerror or exc}")
                return
            self.bytes_out += sent
            del out[:sent]
        if not out:
            session._out = None
            self._watch(session)

    def _watch(self, session: Session) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if session._out else 0)
        self._selector.modify(session.sock, events, session)

    def _timers(self, now: float) -> None:
        ping = None
        for session in self.sessions:
            state = session.state
            if state == READY:
                if now >= session._ping_due:
                    ping = ping or self.mqtt5.PingReqPacket().write()
                    self._send(session, ping)
            elif state in (CONNECTING, AWAIT_CONNACK) and now > session.retry_at:
                self._drop(session, f"no answer within {CONNECT_TIMEOUT_S:.0f} s")

    def _failed(self, session: Session, cause: str) -> None:
        """A connect that never got a socket going: note it and retry later."""
        self._note_failure(session, cause)
        self._retry_later(session)

    def _drop(self, session: Session, cause: str, *, retry: bool = True) -> None:
        """Close a session's connection; it reconnects after a backoff (unless stopping)."""
        sock = session.sock
        if sock is None:
            return
        if session.state in (CONNECTING, AWAIT_CONNACK):
            self._connecting -= 1
            self._note_failure(session, cause)
        elif session.state == READY:
            self.ready_count -= 1
            log.info("%s: %s", session.spec.client_id, cause)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)
        sock.close()
        session.sock = None
        session._inbuf = session._out = None
        session.state = CLOSED
        session.last_error = cause
        if retry and not self._stopping.is_set():
            self._retry_later(session)

    def _note_failure(self, session: Session, cause: str) -> None:
        kind = cause.split(":")[0]
        self.failures[kind] += 1
        if session.last_error != cause:
            log.warning("%s cannot connect to %s: %s (retrying)", session.spec.client_id,
                        self.address, cause)
        session.last_error = cause

    def _retry_later(self, session: Session) -> None:
        backoff = min(RECONNECT_MAX_S, RECONNECT_MIN_S * 2 ** min(session.attempts, 10))
        session.retry_at = time.monotonic() + backoff * self._rng.uniform(0.5, 1.5)
        session.state = WAITING
        heapq.heappush(self._retries, (session.retry_at, next(self._tie), session))

    def _shutdown(self) -> None:
        goodbye = self.mqtt5.DisconnectPacket().write()
        for session in self.sessions:
            sock = session.sock
            if sock is None:
                continue
            if session.state == READY and not session._out:
                with contextlib.suppress(OSError):  # a clean goodbye: no Last Will
                    sock.send(goodbye)
            sock.close()
            session.sock = None
            session.state = CLOSED
        self.ready_count = 0
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

