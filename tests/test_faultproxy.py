"""The fault proxy between real MQTT clients and a real mosquitto: bytes pass unchanged,
and cut, delay, bandwidth and flap faults do to clients what a bad network would."""

from __future__ import annotations

import contextlib
import gc
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fedmq.errors import BrokerError, ConfigError
from fedmq.transport import mqtt as edge_mqtt
from fedmq.transport.message import Message
from fedmq.transport.mqtt import MqttLink, Will
from simulator.broker import free_port
from simulator.faultproxy import FaultProxy, LinkProfile, ProxyPool, TokenBucket

from .helpers import wait_for

integration = pytest.mark.integration

# Bounds for timing assertions: faults must slow traffic down at least this much, and
# anything slower than the upper bound is a hang, not a slow machine.
HANG_S = 10.0


class Inbox:
    """Messages a link received, with their arrival times."""

    def __init__(self) -> None:
        self.items: list[tuple[float, str, bytes]] = []

    def __call__(self, message: Message) -> None:
        self.items.append((time.monotonic(), message.topic, message.payload))

    def __len__(self) -> int:
        return len(self.items)

    @property
    def payloads(self) -> list[bytes]:
        return [payload for _, _, payload in self.items]


def start_link(stack: contextlib.ExitStack, name: str, url: str,
               routes: dict[str, Inbox] | None = None, **options) -> MqttLink:
    """A connected, subscribed MqttLink that `stack` stops."""
    link = MqttLink(client_id=name, broker=url, **options)
    for topic_filter, inbox in (routes or {}).items():
        link.route(topic_filter, inbox)
    link.start()
    stack.callback(link.stop)
    wait_for(link.connected.is_set, f"{name} to connect")
    wait_for(link.subscribed.is_set, f"{name}'s subscriptions")
    return link


@pytest.fixture(autouse=True)
def fast_reconnect(monkeypatch) -> None:
    """Retry within 0.2 s of a link coming back (the default backoff doubles up to 30 s),
    so a 0.3 s up-phase of a flap is seen. MqttLink reads these when it is built."""
    monkeypatch.setattr(edge_mqtt, "RECONNECT_MIN_S", 0.05)
    monkeypatch.setattr(edge_mqtt, "RECONNECT_MAX_S", 0.2)


@pytest.fixture
def proxy(broker) -> Iterator[FaultProxy]:
    with FaultProxy(upstream_host="127.0.0.1", upstream_port=broker.port) as fault_proxy:
        yield fault_proxy


@pytest.fixture
def connect(proxy) -> Iterator[Callable[..., MqttLink]]:
    """start_link, stopped at teardown before the proxy and the broker."""
    with contextlib.ExitStack() as stack:
        yield lambda *args, **kwargs: start_link(stack, *args, **kwargs)


def our_sockets(*, local_port: int, remote_port: int) -> int:
    """TCP sockets this process holds open on `local_port` or towards `remote_port`."""
    ours = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile (listdir's own fd)
            ours.add(os.readlink(f"/proc/self/fd/{fd}"))
    found = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        ports = int(local.split(":")[1], 16), int(remote.split(":")[1], 16)
        if (ports[0] == local_port or ports[1] == remote_port) and \
                f"socket:[{inode}]" in ours:
            found += 1
    return found


# -- without a broker --------------------------------------------------------------------

def test_link_profile_rejects_impossible_settings():
    assert LinkProfile().rate is None and LinkProfile(bandwidth_bps=0).rate is None
    assert LinkProfile(delay_s=0.2, bandwidth_bps=1000).rate == 1000
    for bad in (dict(delay_s=-1), dict(delay_s=float("nan")), dict(bandwidth_bps=-5),
                dict(bandwidth_bps=float("inf"))):
        with pytest.raises(ConfigError):
            LinkProfile(**bad)


def test_token_bucket_paces_reservations_at_its_rate():
    now = [0.0]
    bucket = TokenBucket(1000, clock=lambda: now[0])
    assert bucket.piece_bytes() == 50  # one 0.05 s tick
    assert bucket.reserve(50) == 0.0  # the burst saved up while idle
    assert bucket.reserve(100) == pytest.approx(0.1)
    assert bucket.reserve(100) == pytest.approx(0.2)  # queued behind the first
    now[0] = 10.0  # a long idle spell pays the debt but saves only one burst
    assert bucket.reserve(50) == 0.0 and bucket.reserve(10) == pytest.approx(0.01)
    bucket.set_rate(None)
    assert bucket.reserve(10**9) == 0.0 and bucket.piece_bytes() is None


def test_proxy_misuse_says_what_to_do(broker):
    proxy = FaultProxy(upstream_host="127.0.0.1", upstream_port=broker.port)
    with pytest.raises(BrokerError, match="start"):
        _ = proxy.url
    with pytest.raises(ConfigError):
        proxy.flap(up_s=0, down_s=1)
    with pytest.raises(ConfigError):
        proxy.flap(up_s=1, down_s=1, cycles=0)
    with pytest.raises(ConfigError):
        proxy.delay(-0.1)
    with proxy:
        with pytest.raises(BrokerError, match="only once"):
            proxy.start()
        with pytest.raises(BrokerError, match="listen_port=0"):
            FaultProxy(upstream_host="127.0.0.1", upstream_port=broker.port,
                       listen_port=proxy.port).start()
    with pytest.raises(ConfigError, match="mqtt://"):
        ProxyPool.for_broker("mqtts://127.0.0.1:8883")


# -- over a real mosquitto ---------------------------------------------------------------

@integration
def test_messages_pass_through_unchanged_both_ways(broker, proxy, connect):
    from_device, to_device = Inbox(), Inbox()
    device = connect("device", proxy.url, {"down/#": to_device})
    server = connect("server", broker.url, {"up/#": from_device})
    payloads = [b"hello", b"", random.Random(0).randbytes(1_000_000)]
    for i, payload in enumerate(payloads):
        device.publish(f"up/{i}", payload)
        server.publish(f"down/{i}", payload)
    wait_for(lambda: len(from_device) == len(to_device) == 3, "every message both ways")
    for inbox, prefix in ((from_device, "up"), (to_device, "down")):
        got = {topic: payload for _, topic, payload in inbox.items}
        assert got == {f"{prefix}/{i}": payload for i, payload in enumerate(payloads)}
    stats = proxy.stats()
    assert stats.bytes_up > 1_000_000 and stats.bytes_down > 1_000_000
    assert (stats.accepted, stats.refused, stats.cut, stats.open) == (1, 0, 0, 1)


@integration
def test_dozens_of_devices_share_one_proxy(broker, proxy, connect):
    from_devices = Inbox()
    connect("server", broker.url, {"up/#": from_devices})
    devices = [connect(f"device{i}", proxy.url) for i in range(30)]
    proxy.delay(0.05)
    for i, device in enumerate(devices):
        device.publish(f"up/{i}", bytes([i]) * 50_000)
    wait_for(lambda: len(from_devices) == 30, "a message from every device")
    got = {topic: payload for _, topic, payload in from_devices.items}
    assert got == {f"up/{i}": bytes([i]) * 50_000 for i in range(30)}
    assert proxy.stats().open == 30


@integration
def test_cut_drops_both_sides_until_restore_then_the_client_reconnects(broker, proxy,
                                                                      connect):
    to_device, wills = Inbox(), Inbox()
    server = connect("server", broker.url, {"will/#": wills})
    device = connect("device", proxy.url, {"cmd": to_device},
                     will=Will("will/device", b"gone", retain=False))
    proxy.cut()
    wait_for(lambda: not device.connected.is_set(), "the device to lose its link")
    wait_for(lambda: wills.payloads == [b"gone"], "the broker to see the device drop")
    wait_for(lambda: proxy.stats().refused >= 2, "two refused reconnect attempts")
    assert not device.connected.is_set()
    assert proxy.stats().cut == 1
    proxy.restore()
    wait_for(device.connected.is_set, "the device to reconnect by itself")
    wait_for(device.subscribed.is_set, "the device to subscribe again")
    server.publish("cmd", b"after")
    wait_for(lambda: to_device.payloads == [b"after"], "traffic through the restored link")
    assert proxy.stats().accepted == 2


def test_retry_now_reconnects_a_restored_link_without_sleeping_out_the_backoff(
        broker, proxy, monkeypatch):
    """The simulator restores a device cut off for a round; with retry_now the device is
    back at once instead of after a backoff that grew while it was cut (here >= 30 s)."""
    monkeypatch.setattr(edge_mqtt, "RECONNECT_MIN_S", 60.0)
    monkeypatch.setattr(edge_mqtt, "RECONNECT_MAX_S", 120.0)
    with contextlib.ExitStack() as stack:
        device = start_link(stack, "device", proxy.url)
        proxy.cut()
        wait_for(lambda: not device.connected.is_set(), "the device to lose its link")
        proxy.restore()
        started = time.monotonic()
        device.retry_now()
        wait_for(device.connected.is_set, "the device to reconnect", timeout=HANG_S)
        assert time.monotonic() - started < min(device.reconnect_delays)
        assert proxy.stats().accepted == 2


@integration
def test_delay_adds_latency_each_way_and_keeps_order(proxy, connect):
    echo = Inbox()
    device = connect("device", proxy.url, {"echo/#": echo})
    proxy.delay(0.3)
    start = time.monotonic()
    for i in range(10):
        device.publish(f"echo/{i}", str(i).encode())
    wait_for(lambda: len(echo) == 10, "the echoes", timeout=HANG_S)
    # up 0.3 s to the broker, then 0.3 s back down
    assert 0.6 <= echo.items[0][0] - start < HANG_S
    assert echo.payloads == [str(i).encode() for i in range(10)]
    proxy.bandwidth(1000)
    proxy.reset()
    assert proxy.profile == LinkProfile() and not proxy.is_cut


@integration
def test_bandwidth_throttles_each_direction(broker, proxy, connect):
    from_device, to_device = Inbox(), Inbox()
    server = connect("server", broker.url, {"up": from_device})
    device = connect("device", proxy.url, {"down": to_device})
    proxy.bandwidth(200_000)
    payload = random.Random(1).randbytes(400_000)
    start = time.monotonic()
    device.publish("up", payload)
    server.publish("down", payload)
    wait_for(lambda: len(from_device) == len(to_device) == 1, "both payloads",
             timeout=HANG_S)
    for inbox in (from_device, to_device):  # 400 KB at 200 KB/s each way: about 2 s
        assert 1.5 <= inbox.items[0][0] - start < HANG_S
        assert inbox.payloads == [payload]


@integration
def test_flap_drops_the_client_repeatedly_and_ends_with_the_link_up(proxy, connect):
    connects = []
    device = connect("device", proxy.url, on_connect=connects.append)
    proxy.flap(up_s=0.3, down_s=0.3, cycles=3)
    wait_for(lambda: not proxy.flapping, "the flap schedule to end", timeout=HANG_S)
    assert not proxy.is_cut
    wait_for(device.connected.is_set, "the device to reconnect after the last outage",
             timeout=HANG_S)
    assert len(connects) >= 3  # the first connect plus a reconnect after each drop seen
    assert proxy.stats().cut >= 2


def test_a_client_is_dropped_when_the_broker_is_unreachable():
    nothing_there = free_port()
    with FaultProxy(upstream_host="127.0.0.1", upstream_port=nothing_there) as proxy, \
            socket.create_connection(("127.0.0.1", proxy.port), timeout=HANG_S) as client:
        assert client.recv(1) == b""  # closed by the proxy, not left hanging
        wait_for(lambda: proxy.stats().open == 0, "the proxy to forget the connection")
        assert proxy.stats().accepted == 1


@integration
def test_one_proxy_per_device_keeps_faults_per_device(broker):
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(ProxyPool.for_broker(broker.url))
        assert pool.url("a") == pool.url("a") != pool.url("b")
        inbox_b = Inbox()
        device_a = start_link(stack, "a", pool.url("a"))
        device_b = start_link(stack, "b", pool.url("b"), {"to/b": inbox_b})
        server = start_link(stack, "server", broker.url)
        pool.proxy("a").cut()
        wait_for(lambda: not device_a.connected.is_set(), "device a to lose its link")
        server.publish("to/b", b"still here")
        wait_for(lambda: inbox_b.payloads == [b"still here"], "device b's traffic")
        assert device_b.connected.is_set()
        assert set(pool.proxies) == {"a", "b"}
    with pytest.raises(BrokerError, match="stopped"):
        pool.proxy("c")


@integration
def test_stop_closes_every_socket_and_joins_every_thread(broker):
    threads_before = threading.active_count()
    proxy = FaultProxy(upstream_host="127.0.0.1", upstream_port=broker.port).start()
    with contextlib.ExitStack() as stack:
        stack.callback(proxy.stop)
        devices = [start_link(stack, f"device{i}", proxy.url) for i in range(3)]
        proxy.delay(0.5)
        devices[0].publish("t", bytes(300_000))  # still inside the proxy when it stops
        assert our_sockets(local_port=proxy.port, remote_port=broker.port) == 1 + 3 + 3
        proxy.stop()
        assert our_sockets(local_port=proxy.port, remote_port=broker.port) == 0
        assert proxy.stats().open == 0
        proxy.stop()  # again: nothing to do
        for device in devices:
            wait_for(lambda d=device: not d.connected.is_set(), "the devices to see the drop")
    del proxy, devices
    gc.collect()  # a socket left unclosed would raise ResourceWarning here
    wait_for(lambda: threading.active_count() == threads_before, "every thread to end")
