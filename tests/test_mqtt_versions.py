"""MQTT 3.1.1 as well as 5: the version fallback, and every v5 feature's 3.1.1 path.

A broker that refuses MQTT 5 is either NATS's MQTT listener (which speaks only 3.1.1; the
test skips where nats-server is missing) or a tiny fake that answers CONNECT with the
refusal a 3.1.1-only broker sends: mosquitto always accepts 5, so it cannot play that part.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest

from edge_agent.config import AgentConfig
from fedmq.config import load_config
from fedmq.errors import BrokerError, ConfigError
from fedmq.transport.mqtt import MqttLink, parse_brokers
from simulator.fleet import Simulation, SimulationConfig

from .helpers import make_agents, make_aggregator, wait_for
from .nats_cluster import NatsCluster, require_nats

FALLBACK = "does not speak MQTT 5"


def fallback_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING and FALLBACK in r.message]


class RefusingBroker:
    """Answers an MQTT 5 CONNECT with a refusal (`refusal`: the CONNACK bytes after the
    fixed header) and accepts 3.1.1, acknowledging subscriptions and pings: all a link
    needs to say it is connected."""

    def __init__(self, refusal: bytes | None, *, refuse_subscriptions: int = 0,
                 answer_311: bool = True) -> None:
        self.refusal = refusal  # None: hang up on a v5 CONNECT unanswered (RabbitMQ < 3.13)
        self.answer_311 = answer_311  # False: hang up on 3.1.1 too (nothing behind a proxy)
        self.refuse_subscriptions = refuse_subscriptions  # the first N SUBSCRIBEs get 0x80
        self.subscribes = 0
        self.levels: list[int] = []  # protocol level of every CONNECT seen
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    @staticmethod
    def _packet(conn: socket.socket) -> tuple[int, bytes] | None:
        head = conn.recv(1)
        if not head:
            return None
        length, shift = 0, 0
        while True:
            byte = conn.recv(1)[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        body = b""
        while len(body) < length:
            chunk = conn.recv(length - len(body))
            if not chunk:
                return None
            body += chunk
        return head[0], body

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                packet = self._packet(conn)
                if packet is None or packet[0] >> 4 != 1:
                    return
                level = packet[1][6]  # after the protocol name "MQTT" and its length
                self.levels.append(level)
                if (level == 5 and self.refusal is None) or not self.answer_311:
                    return
                if level == 5:
                    conn.sendall(bytes([0x20, len(self.refusal)]) + self.refusal)
                    return
                conn.sendall(b"\x20\x02\x00\x00")
                while (packet := self._packet(conn)) is not None:
                    kind = packet[0] >> 4
                    if kind == 8:  # SUBSCRIBE (of one filter): grant QoS 1, or refuse
                        self.subscribes += 1
                        granted = b"\x80" if self.subscribes <= self.refuse_subscriptions \
                            else b"\x01"
                        conn.sendall(b"\x90\x03" + packet[1][:2] + granted)
                    elif kind == 12:  # PINGREQ
                        conn.sendall(b"\xd0\x00")
                    elif kind == 14:  # DISCONNECT
                        return
            except OSError:
                return

    def close(self) -> None:
        self._closing = True
        self._server.close()


# A 3.1.1 broker answers a CONNECT of a level it does not know with return code 1; an
# MQTT 5 broker that refuses 5 (configured off) with reason code 0x84.
REFUSALS = {"return code 1": b"\x00\x01", "reason code 0x84": b"\x00\x84\x00"}


@pytest.fixture(params=list(REFUSALS))
def refusing(request) -> Iterator[RefusingBroker]:
    fake = RefusingBroker(REFUSALS[request.param])
    yield fake
    fake.close()


@pytest.fixture
def nats(tmp_path) -> Iterator[NatsCluster]:
    require_nats()
    cluster = NatsCluster(tmp_path / "nats", size=1).start()
    yield cluster
    cluster.stop()


def started(link: MqttLink, stoppers) -> MqttLink:
    link.start()
    stoppers(link.stop)
    return link


def test_auto_falls_back_to_311_once_with_one_warning_naming_the_broker(refusing, stoppers,
                                                                        caplog):
    caplog.set_level(logging.WARNING)
    link = started(MqttLink(client_id="dev-a", broker=refusing.url, session_expiry_s=60),
                   stoppers)
    link.wait_connected(30)
    assert link.protocol_version == "3.1.1"
    assert refusing.levels == [5, 4]
    (warning,) = fallback_warnings(caplog)
    assert refusing.url in warning.message and "3.1.1" in warning.message
    # a reconnect stays on 3.1.1: no second try of 5, no second warning
    link.stop()
    link.start()
    link.wait_connected(30)
    assert refusing.levels == [5, 4, 4] and len(fallback_warnings(caplog)) == 1


def test_a_broker_that_hangs_up_on_5_gets_311_and_one_warning_once_it_answers(stoppers,
                                                                            caplog):
    """RabbitMQ before 3.13 closes an MQTT 5 connection without a CONNACK."""
    caplog.set_level(logging.INFO)
    fake = RefusingBroker(None)
    stoppers(fake.close)
    link = started(MqttLink(client_id="dev-a", broker=fake.url), stoppers)
    link.wait_connected(60)
    assert link.protocol_version == "3.1.1" and fake.levels == [5, 5, 4]
    (warning,) = fallback_warnings(caplog)
    assert fake.url in warning.message and "without answering" in warning.message


def test_a_link_nobody_answers_is_not_taken_for_a_311_broker(stoppers, caplog):
    """A proxy or load balancer with no broker behind it (or a simulated device cut off)
    closes every connection: that says nothing of the version, so the link goes back to
    5 after its 3.1.1 trial and says at WARNING, once, that nothing answers."""
    caplog.set_level(logging.INFO)
    fake = RefusingBroker(None, answer_311=False)
    stoppers(fake.close)
    link = started(MqttLink(client_id="dev-a", broker=fake.url), stoppers)
    wait_for(lambda: len(fake.levels) >= 4, "four connection attempts", timeout=90)
    assert fake.levels[:4] == [5, 5, 4, 5] and link.protocol_version == "5"
    assert not fallback_warnings(caplog)
    unanswered = [r for r in caplog.records if "without answering: is a broker" in r.message]
    assert unanswered and unanswered[0].levelno == logging.WARNING


def test_a_forced_version_5_fails_with_a_hint_and_3_1_1_goes_straight_in(refusing, stoppers):
    five = started(MqttLink(client_id="dev-5", broker=refusing.url, mqtt_version="5"),
                   stoppers)
    with pytest.raises(BrokerError, match=r'Unsupported protocol version.*mqtt_version = "auto"'):
        five.wait_connected(30)
    old = started(MqttLink(client_id="dev-3", broker=refusing.url, mqtt_version="3.1.1"),
                  stoppers)
    old.wait_connected(30)
    assert refusing.levels.count(5) >= 1 and refusing.levels[-1] == 4
    assert old.protocol_version == "3.1.1" and old.max_packet_size is None


def test_a_refused_subscription_is_asked_again_until_granted(stoppers, caplog):
    """NATS refuses a subscription when creating its JetStream consumer times out (a
    loaded or re-forming cluster); the link asks again instead of going without."""
    caplog.set_level(logging.ERROR)
    fake = RefusingBroker(REFUSALS["return code 1"], refuse_subscriptions=2)
    stoppers(fake.close)
    link = MqttLink(client_id="dev-a", broker=fake.url, mqtt_version="3.1.1")
    link.route("fedmq/test/model/current", lambda m: None)
    started(link, stoppers)
    wait_for(link.subscribed.is_set, "the subscription, granted the third time")
    assert fake.subscribes == 3 and link.connected.is_set()
    assert sum("refused the subscription" in r.message for r in caplog.records) == 1


def test_311_persistent_sessions_keep_queued_messages_and_clean_ones_do_not(broker, stoppers):
    """session_expiry_s > 0 on 3.1.1: clean_session false, so the broker queues QoS 1
    messages (a device's receipts) while the device is away."""
    got: dict[str, list[bytes]] = {"kept": [], "clean": []}
    links = {}
    for name, expiry in (("kept", 3600), ("clean", 0)):
        link = MqttLink(client_id=f"dev-{name}", broker=broker.url, mqtt_version="3.1.1",
                        session_expiry_s=expiry)
        link.route(f"t/{name}", lambda m, n=name: got[n].append(m.payload))
        started(link, stoppers)
        wait_for(link.subscribed.is_set, f"{name}'s subscription")
        link.stop()
        links[name] = link
    sender = started(MqttLink(client_id="sender", broker=broker.url, mqtt_version="3.1.1"),
                     stoppers)
    sender.wait_connected(30)
    for name in links:
        sender.publish(f"t/{name}", b"receipt", qos=1).wait_for_publish(30)
    for link in links.values():
        link.start()
        wait_for(link.subscribed.is_set, "the reconnect")
    wait_for(lambda: got["kept"] == [b"receipt"], "the queued message")
    marker = sender.publish("t/clean", b"marker", qos=1)
    marker.wait_for_publish(30)
    wait_for(lambda: b"marker" in got["clean"], "the clean session's marker")
    assert got["kept"] == [b"receipt"]  # queued while away, delivered once
    assert got["clean"] == [b"marker"]  # the receipt sent while away was not kept


def test_the_one_copy_receive_path_runs_on_311(broker, stoppers):
    payload = bytes(range(256)) * 800  # 200 KB
    got: list[bytes] = []
    link = MqttLink(client_id="lean", broker=broker.url, mqtt_version="3.1.1")
    link.route("big/#", lambda m: got.append(m.payload))
    started(link, stoppers)
    wait_for(link.subscribed.is_set, "the subscription")
    assert link._client.protocol == mqtt.MQTTv311
    for qos, retain in ((0, False), (1, False), (1, True)):
        link.publish(f"big/{qos}", payload, qos=qos, retain=retain)
    wait_for(lambda: len(got) == 3, "three payloads")
    assert all(p == payload for p in got)
    assert link._client.split_publishes == 3


@pytest.mark.parametrize("mqtt_version", ["5", "3.1.1"])
def test_chunked_updates_fit_the_broker_limit_on_both_versions(broker_factory, tmp_path,
                                                              stoppers, mqtt_version):
    """MQTT 5 learns the broker's packet limit from CONNACK; 3.1.1 has no such field, so
    max_payload from the configuration is the limit (set below the broker's)."""
    limit = 65536
    small = broker_factory(f"max_packet_size {limit}")
    room = {"max_payload": limit - 1024} if mqtt_version == "3.1.1" else {}
    service = make_aggregator(small.url, tmp_path, stoppers, hidden=256, rounds=1,
                              mqtt_version=mqtt_version, **room)
    agents = make_agents(small.url, stoppers, 3, mqtt_version=mqtt_version, **room)
    wait_for(service.finished.is_set, "a round of chunked models and updates")
    assert all(r.participants == 3 for r in service.history) and not service.rejected
    for record in service.history:
        assert record.bytes_up > 3 * limit  # every update went up in parts
    expected = limit if mqtt_version == "5" else None
    assert {a.link.max_packet_size for a in agents} == {expected}
    assert all(a.receiver.announcement.payload.chunks >= 2 for a in agents)


def test_simulate_against_a_311_only_broker_trains_after_one_warning(nats, caplog):
    """The done-when: `fedmq simulate --broker` on a 3.1.1-only broker (NATS), no flag."""
    caplog.set_level(logging.WARNING)
    config = SimulationConfig(broker=nats.urls[0], devices=4, rounds=3, timeout_s=120)
    with Simulation(config) as sim:
        result = sim.wait()
        assert sim.config.mqtt_version == "3.1.1"
        assert all(a.link.protocol_version == "3.1.1" for a in sim.agents)
    assert len(result.rounds) == 3 and result.final_accuracy > 0.5
    assert all(r.participants == 4 for r in result.rounds)
    (warning,) = fallback_warnings(caplog)
    assert nats.urls[0] in warning.message


def test_the_hosted_engine_refuses_311_with_what_to_do_instead(nats):
    config = SimulationConfig(broker=nats.urls[0], devices=3, rounds=1, engine="hosted")
    with pytest.raises(ConfigError, match=r"hosted engine speaks MQTT 5 only.*--engine agents"):
        Simulation(config).__enter__()
    with pytest.raises(ConfigError, match="--engine agents"):
        SimulationConfig(devices=3, rounds=1, engine="hosted", mqtt_version="3.1.1")


def test_broker_lists_and_versions_are_checked_in_the_config(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('broker = ["mqtt://a:1883", "mqtt://b:1884"]\nmqtt_version = "3.1.1"\n')
    config = load_config(AgentConfig, path)
    assert [str(a) for a in parse_brokers(config.broker)] == ["mqtt://a:1883",
                                                              "mqtt://b:1884"]
    with pytest.raises(ConfigError, match="mixes mqtts:// and mqtt://"):
        AgentConfig(broker="mqtts://a:8883, mqtt://b:1883")
    with pytest.raises(ConfigError, match=r"mqtt_version '4' must be one of auto, 5, 3\.1\.1"):
        AgentConfig(mqtt_version="4")


def test_names_with_dots_on_nats_stop_with_a_clear_error_not_a_reconnect_loop(nats, stoppers,
                                                                             caplog):
    """NATS 2.9's MQTT gateway refuses topics with '.' and drops the client; fedmq names
    may contain dots. The link says why and stops, instead of retrying forever."""
    caplog.set_level(logging.ERROR)
    (agent,) = make_agents(nats.urls[0], stoppers, 1, fleet="lab.1", mqtt_version="3.1.1")
    wait_for(lambda: agent.link.fatal is not None, "the link to give up")
    assert "without '.'" in agent.link.fatal
    with pytest.raises(BrokerError, match="NATS"):
        agent.link.wait_connected(1)
    wait_for(lambda: not agent.link.connected.is_set(), "the link to stay down")
    refusals = sum("not reconnecting" in r.message for r in caplog.records)
    assert refusals == 1
