"""Chunking over a real mosquitto whose packet limit is smaller than the model."""

from __future__ import annotations

import hashlib
import threading

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fedmq.core.chunking import split_payload
from fedmq.core.protocol import FleetTopics, Part
from fedmq.transport.mqtt import MqttLink
from simulator.broker import LocalMosquitto

from .helpers import make_agents, make_aggregator, wait_for

pytestmark = pytest.mark.integration

PACKET_LIMIT = 65536


@pytest.fixture
def small_broker(broker_factory) -> LocalMosquitto:
    """A loopback mosquitto that refuses MQTT packets above 64 KiB."""
    return broker_factory(f"max_packet_size {PACKET_LIMIT}")


def connected_link(url: str, client_id: str, stoppers) -> MqttLink:
    link = MqttLink(client_id=client_id, broker=url)
    link.start()
    stoppers(link.stop)
    wait_for(link.subscribed.is_set, f"{client_id}'s connection")
    return link


def test_the_broker_limit_is_real_and_the_computed_room_is_exact(small_broker, stoppers):
    """A payload of exactly effective_max_payload passes; a bigger one costs the connection."""
    topic = "fedmq/test/probe"
    received: list[bytes] = []
    listener = MqttLink(client_id="listener", broker=small_broker.url)
    listener.route(topic, lambda m: received.append(m.payload))
    listener.start()
    stoppers(listener.stop)
    wait_for(listener.subscribed.is_set, "the listener's subscription")
    assert listener.max_packet_size == PACKET_LIMIT  # read from the CONNACK

    sender = connected_link(small_broker.url, "sender", stoppers)
    room = sender.effective_max_payload(topic)
    assert PACKET_LIMIT - 64 < room < PACKET_LIMIT
    sender.publish(topic, b"a" * room, qos=1).wait_for_publish(30)
    wait_for(lambda: len(received) == 1, "the payload that just fits")

    refused = threading.Event()
    rogue = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="rogue",
                        protocol=mqtt.MQTTv5)
    reasons: list[str] = []
    rogue.on_disconnect = lambda _c, _u, _f, rc, _p: (reasons.append(str(rc)), refused.set())
    rogue.connect("127.0.0.1", small_broker.port)
    rogue.loop_start()
    stoppers(rogue.loop_stop)
    stoppers(rogue.disconnect)
    rogue.publish(topic, b"b" * PACKET_LIMIT, qos=1)  # what an unchunked model would need
    wait_for(refused.is_set, "the broker to drop the oversize publisher")
    assert reasons[0] == "Packet too large"
    sender.publish(topic, b"marker", qos=1).wait_for_publish(30)
    wait_for(lambda: received[-1:] == [b"marker"], "a marker after the refused payload")
    assert [len(p) for p in received] == [room, len(b"marker")]  # the big one never arrived


def test_rounds_complete_with_a_model_bigger_than_the_broker_limit(small_broker, tmp_path,
                                                                  stoppers):
    service = make_aggregator(small_broker.url, tmp_path, stoppers, model="mlp", hidden=512,
                              rounds=2, min_updates=3)
    agents = make_agents(small_broker.url, stoppers, 3)
    wait_for(service.finished.is_set, "2 rounds over the 64 KiB broker")

    assert [r.round for r in service.history] == [1, 2]
    assert all(r.participants == 3 for r in service.history)
    assert sum(r.participants for r in service.history) == 6 and not service.rejected
    assert service.link.max_packet_size == PACKET_LIMIT
    chunk_topic = service.topics.model_payload_chunk(0)
    assert service.link.effective_max_payload(chunk_topic) < PACKET_LIMIT
    for agent in agents:
        assert agent.link.max_packet_size == PACKET_LIMIT
        payload = agent.receiver.announcement.payload
        assert payload.size > PACKET_LIMIT and payload.chunks >= 3  # ~154 KB of float32
    # Every update went up in parts (bigger than the limit) and was counted byte for byte.
    for record in service.history:
        assert record.bytes_up > 3 * PACKET_LIMIT
        wait_for(lambda r=record: r.bytes_up == sum(a.stats.traffic[r.round][0]
                                                    for a in agents),
                 f"the agents' upload count of round {record.round}")
    # devices go on sending updates for the final model; once those complete, nothing
    # stays held in the reassembler
    wait_for(lambda: service.reassembler.pending_bytes == 0, "reassembly to settle")


def test_bad_parts_are_rejected_and_incomplete_ones_expire(small_broker, tmp_path, stoppers):
    service = make_aggregator(small_broker.url, tmp_path, stoppers, rounds=1, min_updates=1,
                              chunk_timeout_s=0.5, max_pending_bytes=200_000)
    topic = FleetTopics("test").update("dev0")
    rogue = connected_link(small_broker.url, "dev0", stoppers)

    def send(messages: list[bytes]) -> None:
        for message in messages:
            rogue.publish(topic, message, qos=1).wait_for_publish(30)

    corrupt = [Part.from_payload(m) for m in split_payload(bytes(100_000), max_payload=30_000)]
    flipped = b"\1" + corrupt[1].data[1:]
    corrupt[1] = Part(transfer_id=corrupt[1].transfer_id, index=1, count=corrupt[1].count,
                      size=corrupt[1].size, sha256=corrupt[1].sha256, data=flipped)
    send([p.to_payload() for p in corrupt])
    wait_for(lambda: service.rejected["bad_hash"] == 1, "the corrupted transfer's rejection")

    huge = Part(transfer_id=b"huge", index=0, count=10, size=10_000_000,
                sha256=hashlib.sha256(b"").digest(), data=b"x")
    send([huge.to_payload()])
    wait_for(lambda: service.rejected["too_large"] == 1, "the oversize declaration")

    send(split_payload(bytes(100_000), max_payload=30_000)[:-1])  # last part never comes
    wait_for(lambda: service.rejected["incomplete"] == 1, "the incomplete transfer to expire")
    assert service.reassembler.pending_bytes == 0 and service.reassembler.reserved_bytes == 0
    assert service.accepted == 0 and not service.link.handler_errors
