"""A TCP fault proxy between devices and the broker: cut, delay, throttle and flap a link.

One FaultProxy stands for one device's link: the device connects to `proxy.url` instead of
the broker, and every fault applies to all connections through that proxy. The proxy
forwards opaque bytes and knows nothing of MQTT, so client and broker see exactly what a
bad network would show them (dropped connections, latency, a slow pipe), and react with
their real reconnect, keepalive and Last Will logic.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

from fedmq.errors import BrokerError, ConfigError
from fedmq.transport.mqtt import BrokerAddress

log = logging.getLogger(__name__)

# Bytes per recv(): multi-MB MQTT payloads move in few chunks.
RECV_BYTES = 64 * 1024
# Bytes one direction of one connection holds (read but not yet sent) before it stops
# reading, so backpressure reaches the sender and memory stays bounded with dozens of
# connections. Under a delay d this caps one connection at MAX_BUFFERED_BYTES / d bytes/s.
MAX_BUFFERED_BYTES = 1024 * 1024
# A throttled direction sends pieces worth this many seconds: smooth enough that a rate
# change bites within a tick, coarse enough to keep the number of sends small.
TICK_S = 0.05
# Loopback connects finish at once; this only bounds a broker that hangs in accept().
CONNECT_TIMEOUT_S = 5.0
# Back-off after accept() fails (e.g. out of file descriptors) instead of spinning.
ACCEPT_RETRY_S = 0.1


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkProfile:
    """How a device's link behaves: latency added to every chunk, and a rate cap in
    bytes per second applied to each direction separately (None or 0: unlimited)."""

    delay_s: float = 0.0
    bandwidth_bps: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.delay_s) and self.delay_s >= 0):
            raise ConfigError(f"delay_s must be a finite number of seconds >= 0, "
                              f"not {self.delay_s!r}")
        bps = self.bandwidth_bps
        if bps is not None and not (math.isfinite(bps) and bps >= 0):
            raise ConfigError(f"bandwidth_bps must be bytes per second > 0 (None or 0 for "
                              f"unlimited), not {bps!r}")

    @property
    def rate(self) -> float | None:
        """Bytes per second each way, None when unlimited."""
        return self.bandwidth_bps or None


@dataclass(frozen=True, slots=True)
class ProxyStats:
    """Counters since start (`open` is the number of connections open right now)."""

    bytes_up: int = 0  # client -> broker, bytes sent on
    bytes_down: int = 0  # broker -> client
    accepted: int = 0  # connections forwarded to the broker
    refused: int = 0  # connections closed at once because the link was cut
    cut: int = 0  # open connections closed by cut() or a flap
    open: int = 0


class TokenBucket:
    """A byte-rate cap shared by every connection through one direction of a link.

    Senders reserve bytes first and then wait the time returned, so concurrent senders
    queue up fairly and none spins; an idle link saves up one tick's worth as a burst.
    """

    def __init__(self, rate: float | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._rate: float | None = None
        self._tokens = 0.0
        self._stamp = clock()
        self.set_rate(rate)

    @property
    def rate(self) -> float | None:
        return self._rate

    def set_rate(self, rate: float | None) -> None:
        """A new rate starts from a full burst, forgetting debt run up at the old rate."""
        rate = rate or None
        with self._lock:
            if rate == self._rate:
                return
            self._rate = rate
            self._tokens = self._burst()
            self._stamp = self._clock()

    def piece_bytes(self) -> int | None:
        """How many bytes to send in one go: one tick's worth (None: any amount)."""
        rate = self._rate
        return None if rate is None else max(1, int(rate * TICK_S))

    def reserve(self, size: int) -> float:
        """Take `size` bytes from the bucket; return the seconds to wait before sending."""
        with self._lock:
            if self._rate is None:
                return 0.0
            now = self._clock()
            self._tokens = min(self._burst(), self._tokens + (now - self._stamp) * self._rate)
            self._stamp = now
            self._tokens -= size
            return max(0.0, -self._tokens / self._rate)

    def _burst(self) -> float:
        return 0.0 if self._rate is None else self._rate * TICK_S


class _Pipe:
    """One direction of one connection: a reader thread stamps each chunk with the time
    it is due (arrival + delay); a writer thread sends the chunks in order when due and
    when the bucket allows, so latency is added without serialising throughput."""

    def __init__(self, conn: _Connection, src: socket.socket, dst: socket.socket, *,
                 up: bool) -> None:
        self._conn = conn
        self._src = src
        self._dst = dst
        self._up = up
        self._cond = threading.Condition()
        self._chunks: deque[tuple[float, bytes]] = deque()
        self._buffered = 0
        self._eof = False

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def read(self) -> None:
        conn = self._conn
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(
                        lambda: self._buffered < MAX_BUFFERED_BYTES or conn.closed)
                    if conn.closed:
                        return
                data = self._src.recv(RECV_BYTES)
                due = time.monotonic() + conn.proxy.profile.delay_s
                with self._cond:
                    if data:
                        self._chunks.append((due, data))
                        self._buffered += len(data)
                    else:
                        self._eof = True
                    self._cond.notify_all()
                if not data:
                    return
        except OSError:
            conn.abort()

    def write(self) -> None:
        conn = self._conn
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._chunks or self._eof or conn.closed)
                    if conn.closed:
                        return
                    if not self._chunks:
                        break  # end of stream, everything before it sent
                    due, data = self._chunks.popleft()
                if not (conn.sleep_until(due) and self._send(data)):
                    return
                with self._cond:
                    self._buffered -= len(data)
                    self._cond.notify_all()
            # Pass the half-close on: the peer reads end-of-stream after the last byte.
            with contextlib.suppress(OSError):
                self._dst.shutdown(socket.SHUT_WR)
        except OSError:
            conn.abort()

    def _send(self, data: bytes) -> bool:
        proxy = self._conn.proxy
        bucket = proxy._bucket(up=self._up)
        view = memoryview(data)
        while view:
            size = bucket.piece_bytes() or len(view)
            piece, view = view[:size], view[size:]
            if not self._conn.sleep_until(time.monotonic() + bucket.reserve(len(piece))):
                return False
            self._dst.sendall(piece)
            proxy._count(**{"bytes_up" if self._up else "bytes_down": len(piece)})
        return True


class _Connection:
    """A client connection and its twin to the broker, run by four threads (a reader and a
    writer per direction); the last thread out closes both sockets."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, number: int) -> None:
        self.proxy = proxy
        self.name = f"fedmq-proxy-{proxy.port}-{number}"
        self._client = client
        self._upstream: socket.socket | None = None
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._pipes: list[_Pipe] = []
        self._threads: list[threading.Thread] = []
        self._live = 0

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def start(self) -> None:
        self._spawn(self._run, "up-recv")

    def abort(self) -> None:
        """Drop both sides now, like a link going down, and wake every thread."""
        self._closed.set()
        with self._lock:
            sockets = [s for s in (self._client, self._upstream) if s is not None]
            pipes = list(self._pipes)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for pipe in pipes:
            pipe.wake()

    def join(self) -> None:
        """Wait for every thread (call after abort, once the acceptor has stopped)."""
        with self._lock:
            first = self._threads[0]
        first.join()  # _run starts every other thread before it returns
        with self._lock:
            rest = self._threads[1:]
        for thread in rest:
            thread.join()

    def sleep_until(self, deadline: float) -> bool:
        """Wait until `deadline` (time.monotonic); False if the connection ended first."""
        while (left := deadline - time.monotonic()) > 0:
            if self._closed.wait(left):
                return False
        return not self.closed

    def _run(self) -> None:
        """Connect to the broker, start the other three threads, then read from the client."""
        proxy = self.proxy
        if self.closed:  # cut before it got going
            return
        try:
            upstream = socket.create_connection((proxy.upstream_host, proxy.upstream_port),
                                                timeout=CONNECT_TIMEOUT_S)
        except OSError as exc:
            log.warning("%s: cannot reach the broker at %s:%d (%s); dropping the client",
                        self.name, proxy.upstream_host, proxy.upstream_port, exc)
            self.abort()
            return
        upstream.settimeout(None)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        up = _Pipe(self, self._client, upstream, up=True)
        down = _Pipe(self, upstream, self._client, up=False)
        with self._lock:
            self._upstream = upstream
            self._pipes = [up, down]
        if self.closed:  # aborted while connecting
            return
        self._spawn(up.write, "up-send")
        self._spawn(down.read, "down-recv")
        self._spawn(down.write, "down-send")
        up.read()

    def _spawn(self, target: Callable[[], None], role: str) -> None:
        thread = threading.Thread(target=self._guard, args=(target,), daemon=True,
                                  name=f"{self.name}-{role}")
        with self._lock:
            self._threads.append(thread)
            self._live += 1
        thread.start()

    def _guard(self, target: Callable[[], None]) -> None:
        try:
            target()
        except Exception:
            log.exception("%s: forwarding failed; dropping the connection", self.name)
            self.abort()
        finally:
            with self._lock:
                self._live -= 1
                last = self._live == 0
            if last:
                self._client.close()
                if self._upstream is not None:
                    self._upstream.close()
                self.proxy._forget(self)


class FaultProxy:
    """A TCP forwarder on 127.0.0.1 in front of the broker whose link can be cut, delayed,
    throttled and flapped from any thread while clients are connected."""

    def __init__(self, *, upstream_host: str, upstream_port: int, listen_port: int = 0) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.listen_port = listen_port
        self.port: int | None = None  # the port listened on, once started
        self.profile = LinkProfile()
        self._buckets = {True: TokenBucket(), False: TokenBucket()}  # up, down
        self._control = threading.Lock()  # serialises start/stop and fault changes
        self._lock = threading.Lock()  # guards the cut flag, state and connection set
        self._stats_lock = threading.Lock()
        self._stats = ProxyStats()
        self._state = "new"  # -> "running" -> "stopped"
        self._cut = False
        self._conns: set[_Connection] = set()
        self._numbers = itertools.count(1)
        self._listener: socket.socket | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._stopping = threading.Event()
        self._acceptor: threading.Thread | None = None
        self._flapper: threading.Thread | None = None
        self._flap_stop = threading.Event()

    @property
    def url(self) -> str:
        if self.port is None:
            raise BrokerError("the fault proxy has no address yet: call start() first")
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def is_cut(self) -> bool:
        return self._cut

    @property
    def flapping(self) -> bool:
        thread = self._flapper
        return thread is not None and thread.is_alive()

    def start(self) -> FaultProxy:
        """Listen on 127.0.0.1 and forward every connection to the upstream broker."""
        with self._control:
            if self._state != "new":
                raise BrokerError("a FaultProxy starts only once; create a new one")
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind(("127.0.0.1", self.listen_port))
                listener.listen(128)
            except OSError as exc:
                listener.close()
                raise BrokerError(f"fault proxy cannot listen on 127.0.0.1:{self.listen_port} "
                                  f"({exc}); pass listen_port=0 for a free port") from exc
            listener.setblocking(False)
            self._listener = listener
            self._wake = socket.socketpair()
            self.port = listener.getsockname()[1]
            self._state = "running"
            self._acceptor = threading.Thread(target=self._accept_loop, daemon=True,
                                              name=f"fedmq-proxy-{self.port}-accept")
            self._acceptor.start()
        log.info("fault proxy %s -> %s:%d", self.url, self.upstream_host, self.upstream_port)
        return self

    def stop(self) -> None:
        """Close every socket and join every thread; safe to call again."""
        with self._control:
            if self._state != "running":
                self._state = "stopped"
                return
            self._stop_flapping()
            with self._lock:
                self._state = "stopped"
            self._stopping.set()
            assert self._wake is not None and self._acceptor is not None
            self._wake[1].send(b"\0")
            self._acceptor.join()
            with self._lock:
                conns = list(self._conns)
            for conn in conns:
                conn.abort()
            for conn in conns:
                conn.join()
            assert self._listener is not None
            self._listener.close()
            for sock in self._wake:
                sock.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> ProxyStats:
        with self._lock:
            open_now = len(self._conns)
        with self._stats_lock:
            return replace(self._stats, open=open_now)

    # -- faults ---------------------------------------------------------------------------

    def cut(self) -> None:
        """Drop every open connection (both sides) and refuse new ones until `restore()`;
        ends any flap schedule."""
        with self._control:
            self._stop_flapping()
            self._set_cut(True)

    def restore(self) -> None:
        """End a cut or a flap schedule: the link is up (delay and bandwidth stay)."""
        with self._control:
            self._stop_flapping()
            self._set_cut(False)

    def stop_flapping(self) -> None:
        """End a flap schedule early; like `restore()`, it leaves the link up."""
        self.restore()

    def flap(self, *, up_s: float, down_s: float, cycles: int | None = None) -> None:
        """In a background thread, cut the link for down_s then restore it for up_s,
        `cycles` times (None: until restore/stop); a finished schedule leaves it up."""
        for name, value in (("up_s", up_s), ("down_s", down_s)):
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"flap {name} must be a number of seconds > 0, not {value!r}")
        if cycles is not None and cycles < 1:
            raise ConfigError(f"flap cycles must be >= 1 (None: until stopped), not {cycles!r}")
        with self._control:
            self._stop_flapping()
            self._flap_stop = stop = threading.Event()
            self._flapper = threading.Thread(target=self._flap_loop, daemon=True,
                                             args=(stop, up_s, down_s, cycles),
                                             name=f"fedmq-proxy-{self.port}-flap")
            self._flapper.start()

    def apply(self, profile: LinkProfile) -> None:
        """Use `profile` from now on (chunks already read keep the delay they were given)."""
        with self._control:
            self._apply(profile)

    def delay(self, seconds: float) -> None:
        """Add `seconds` of latency to every chunk, each way (0: none)."""
        with self._control:
            self._apply(replace(self.profile, delay_s=seconds))

    def bandwidth(self, bytes_per_second: float | None) -> None:
        """Cap each direction at `bytes_per_second` (None or 0: unlimited)."""
        with self._control:
            self._apply(replace(self.profile, bandwidth_bps=bytes_per_second))

    def reset(self) -> None:
        """Back to a perfect link: no cut, no flap, no delay, no bandwidth cap."""
        with self._control:
            self._stop_flapping()
            self._set_cut(False)
            self._apply(LinkProfile())

    # -- internals ------------------------------------------------------------------------

    def _bucket(self, *, up: bool) -> TokenBucket:
        return self._buckets[up]

    def _apply(self, profile: LinkProfile) -> None:
        self.profile = profile
        for bucket in self._buckets.values():
            bucket.set_rate(profile.rate)

    def _set_cut(self, cut: bool) -> None:
        """The one place the link goes down or comes back."""
        with self._lock:
            changed = cut != self._cut
            self._cut = cut
            victims = list(self._conns) if cut else []
        self._count(cut=len(victims))
        for conn in victims:
            conn.abort()
        if changed:
            log.info("fault proxy %s: link %s", self.port,
                     f"cut ({len(victims)} connections dropped)" if cut else "restored")

    def _stop_flapping(self) -> None:
        """Stop the flap thread and wait for it (caller holds _control)."""
        thread, self._flapper = self._flapper, None
        if thread is not None:
            self._flap_stop.set()
            thread.join()

    def _flap_loop(self, stop: threading.Event, up_s: float, down_s: float,
                   cycles: int | None) -> None:
        for _ in itertools.count() if cycles is None else range(cycles):
            self._set_cut(True)
            if stop.wait(down_s):
                return
            self._set_cut(False)
            if stop.wait(up_s):
                return

    def _accept_loop(self) -> None:
        assert self._listener is not None and self._wake is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wake[0], selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in selector.select():
                    if key.fileobj is self._listener:
                        self._accept()

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            client, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("fault proxy %s: accept failed (%s); retrying", self.port, exc)
            self._stopping.wait(ACCEPT_RETRY_S)
            return
        client.setblocking(True)
        conn: _Connection | None = None
        with self._lock:
            if not self._cut and self._state == "running":
                conn = _Connection(self, client, next(self._numbers))
                self._conns.add(conn)
        if conn is None:  # a cut link: the client sees its connection close at once
            self._count(refused=1)
            client.close()
            return
        self._count(accepted=1)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.start()

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._conns.discard(conn)

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            s = self._stats
            self._stats = replace(s, **{k: getattr(s, k) + v for k, v in deltas.items()})


class ProxyPool:
    """One FaultProxy per device id in front of one broker: give each device
    `pool.url(device_id)` and inject its faults through `pool.proxy(device_id)`."""

    def __init__(self, *, upstream_host: str, upstream_port: int) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self._proxies: dict[str, FaultProxy] = {}
        self._lock = threading.Lock()
        self._stopped = False

    @classmethod
    def for_broker(cls, url: str) -> ProxyPool:
        address = BrokerAddress.parse(url)
        if address.tls:
            raise ConfigError(f"fault proxies forward plain MQTT; {url!r} uses TLS, "
                              "so pass an mqtt:// broker URL")
        return cls(upstream_host=address.host, upstream_port=address.port)

    def proxy(self, device_id: str) -> FaultProxy:
        """The device's proxy, started on first use."""
        with self._lock:
            if self._stopped:
                raise BrokerError("this ProxyPool is stopped; create a new one")
            proxy = self._proxies.get(device_id)
            if proxy is None:
                proxy = FaultProxy(upstream_host=self.upstream_host,
                                   upstream_port=self.upstream_port).start()
                self._proxies[device_id] = proxy
            return proxy

    def url(self, device_id: str) -> str:
        """The broker URL this device should connect to."""
        return self.proxy(device_id).url

    @property
    def proxies(self) -> dict[str, FaultProxy]:
        with self._lock:
            return dict(self._proxies)

    def stop(self) -> None:
        """Stop every proxy (their stats stay readable); safe to call again."""
        with self._lock:
            self._stopped = True
            proxies = list(self._proxies.values())
        for proxy in proxies:
            proxy.stop()

    def __enter__(self) -> ProxyPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
