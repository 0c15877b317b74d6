"""LeanClient: a received PUBLISH payload is cut off the packet with one copy.

Brokerless properties pin `publish_header_length` to the offset where paho's own parser
finds the payload (for any topic, QoS, MQTT v5 properties and payload), and to None for
any packet shorter than the header it announces. An in-process check hands the same packet
to LeanClient and to plain paho and expects the same message. Against a real mosquitto,
MqttLink (a LeanClient) and a plain paho subscriber receive the same payloads
byte-identical, and the one-copy path is seen to be taken (if paho drops the hooks it
overrides, the integration test fails instead of silently going slow or losing payloads).
"""

from __future__ import annotations

import random
import struct
import threading
from collections.abc import Callable

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt import _packet
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedmq.transport.leanclient import LeanClient, publish_header_length
from fedmq.transport.message import Message
from fedmq.transport.mqtt import MqttLink, message_from_paho

from .helpers import WAIT_S

PUBLISH = 0x30  # PUBLISH packet type in the fixed header's first byte
DUP, RETAIN = 0x08, 0x01


def command(qos: int, flags: int = 0) -> int:
    return PUBLISH | qos << 1 | flags


def fit_utf8(text: str, limit: int = 200) -> bytes:
    """`text` in UTF-8, whole characters dropped from the end until it fits `limit` bytes."""
    while len(text.encode()) > limit:
        text = text[:-1]
    return text.encode()


topics = st.text(min_size=1, max_size=200).map(fit_utf8)
# paho refuses NUL, U+FEFF and surrogates (which UTF-8 cannot encode) in v5 strings.
mqtt_chars = st.characters(exclude_categories=("Cs",), exclude_characters="\x00\ufeff")
property_text = st.text(mqtt_chars, max_size=100)


@st.composite
def publish_properties(draw) -> Properties:
    """PUBLISH properties, any of them absent; long enough at times for a 2-byte length."""
    props = Properties(PacketTypes.PUBLISH)
    if draw(st.booleans()):
        props.MessageExpiryInterval = draw(st.integers(0, 2**32 - 1))
    for pair in draw(st.lists(st.tuples(property_text, property_text), max_size=4)):
        props.UserProperty = pair
    if draw(st.booleans()):
        props.ContentType = draw(property_text)
    if draw(st.booleans()):
        props.CorrelationData = draw(st.binary(max_size=300))
    return props


def variable_header(topic: bytes, qos: int, mid: int, props: Properties | None) -> bytes:
    """A PUBLISH variable header laid out as paho sends it (props None: MQTT v3.1.1)."""
    head = struct.pack("!H", len(topic)) + topic
    if qos:
        head += struct.pack("!H", mid)
    if props is not None:
        head += props.pack()
    return head


def protocol(v5: bool) -> int:
    return mqtt.MQTTv5 if v5 else mqtt.MQTTv311


def parsed(packet: _packet.PublishPacket) -> tuple:
    """Everything decode_publish found but the payload, comparable with ==."""
    props = None if packet.properties is None else packet.properties.json()
    return packet.dup, packet.qos, packet.retain, bytes(packet.topic), packet.mid, props


@settings(max_examples=300, deadline=None)
@given(topic=topics, qos=st.sampled_from([0, 1, 2]), mid=st.integers(1, 65535),
       props=st.none() | publish_properties(), payload=st.binary(max_size=5000),
       flags=st.sampled_from([0, DUP, RETAIN, DUP | RETAIN]), as_bytearray=st.booleans())
def test_the_header_length_is_where_paho_finds_the_payload(topic, qos, mid, props, payload,
                                                         flags, as_bytearray):
    v5 = props is not None
    head = variable_header(topic, qos, mid, props)
    packet = (bytearray if as_bytearray else bytes)(head + payload)  # paho reads a bytearray
    cmd = command(qos, flags)

    assert publish_header_length(cmd, packet, v5) == len(head)
    assert publish_header_length(cmd, head, v5) == len(head)  # a PUBLISH without payload
    whole = _packet.decode_publish(cmd, packet, protocol(v5))
    header_only = _packet.decode_publish(cmd, packet[:len(head)], protocol(v5))
    assert parsed(header_only) == parsed(whole)
    assert bytes(whole.payload) == payload and bytes(header_only.payload) == b""
    assert bytes(whole.topic) == topic and whole.mid == (mid if qos else 0)
    assert (whole.properties.json() if v5 else None) == (props.json() if v5 else None)


@settings(max_examples=150, deadline=None)
@given(topic=topics, qos=st.sampled_from([0, 1, 2]), props=st.none() | publish_properties())
def test_every_packet_cut_inside_its_header_is_refused(topic, qos, props):
    head = variable_header(topic, qos, 7, props)
    for cut in range(len(head)):
        assert publish_header_length(command(qos), head[:cut], props is not None) is None


@pytest.mark.parametrize("size", [127, 128, 16383, 16384, 65535])
def test_multi_byte_property_lengths(size):
    """Property lengths needing a varint of one, two and three bytes."""
    props = Properties(PacketTypes.PUBLISH)
    props.CorrelationData = bytes(size - 3)  # identifier, 2-byte length, data
    head = variable_header(b"t/x", 1, 9, props)
    assert len(props.pack()) == size + (1 if size < 128 else 2 if size < 16384 else 3)
    assert publish_header_length(command(1), head + b"payload", True) == len(head)


def test_a_four_byte_property_length():
    """Properties over 2 MiB: their length needs the longest varint, four bytes."""
    props = Properties(PacketTypes.PUBLISH)
    for i in range(33):
        props.UserProperty = (f"k{i}", "v" * 65000)
    head = variable_header(b"t", 0, 0, props)
    length = head[3:7]  # after the topic: continuation bits on all but the fourth byte
    assert [byte >> 7 for byte in length] == [1, 1, 1, 0]
    assert publish_header_length(command(0), head + b"tail", True) == len(head)
    assert publish_header_length(command(0), head[:-1], True) is None


BAD_HEADERS = {  # cut short, or a properties length over four bytes
    "empty": (0, b"", False),
    "half a topic length": (0, b"\x00", False),
    "topic length 100, 10 bytes there": (0, b"\x00\x64" + b"t" * 8, False),
    "topic length 100, 10 bytes there (v5)": (0, b"\x00\x64" + b"t" * 8, True),
    "no packet id": (1, b"\x00\x01t", False),
    "half a packet id": (2, b"\x00\x01t\x00", False),
    "no properties length": (0, b"\x00\x01t", True),
    "properties length runs off the end": (0, b"\x00\x01t\x80", True),
    "properties length runs off after 3 bytes": (1, b"\x00\x01t\x00\x05\xff\xff\xff", True),
    "properties length 10, 3 bytes there": (0, b"\x00\x01t\x0a\x02\x00\x00", True),
    # value 0 in five bytes: a parser reading a fifth byte would call the header complete
    "5-byte properties length": (0, b"\x00\x01t\x80\x80\x80\x80\x00" + b"p" * 64, True),
}


@pytest.mark.parametrize("qos, packet, v5", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
def test_a_truncated_or_garbled_header_gets_none(qos, packet, v5):
    assert publish_header_length(command(qos), packet, v5) is None
    with pytest.raises(MalformedPacket):  # so LeanClient's fallback to paho reports it
        _packet.decode_publish(command(qos), packet, protocol(v5))


@st.composite
def damaged_publishes(draw) -> tuple[int, bytes, bool]:
    """A PUBLISH body with up to three header bytes overwritten, at times cut short."""
    qos, v5 = draw(st.integers(0, 3)), draw(st.booleans())  # QoS 3 is invalid
    props = draw(publish_properties()) if v5 else None
    head = variable_header(draw(st.binary(max_size=20)), qos, 1, props)
    packet = bytearray(head + draw(st.binary(max_size=50)))
    for _ in range(draw(st.integers(0, 3))):
        packet[draw(st.integers(0, len(head) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        del packet[draw(st.integers(0, len(packet))):]
    return command(qos, draw(st.sampled_from([0, DUP | RETAIN]))), bytes(packet), v5


@settings(max_examples=500, deadline=None)
@given(case=damaged_publishes() | st.tuples(st.integers(0, 255), st.binary(max_size=12),
                                            st.booleans()))
def test_garbage_never_raises_and_what_parses_matches_paho(case):
    """Whenever LeanClient's split header parses, paho finds the same fields in the whole
    packet and the payload exactly where the split put it."""
    cmd, packet, v5 = case
    head = publish_header_length(cmd, packet, v5)
    if head is None:
        return
    assert 2 <= head <= len(packet)
    try:
        lean = _packet.decode_publish(cmd, packet[:head], protocol(v5))
    except MalformedPacket:
        return  # LeanClient reports the packet malformed and delivers nothing
    whole = _packet.decode_publish(cmd, packet, protocol(v5))
    assert parsed(lean) == parsed(whole)
    assert bytes(whole.payload) == packet[head:]


def deliver(client: mqtt.Client, cmd: int, packet: bytes) -> list[mqtt.MQTTMessage]:
    """Hand `client` one received PUBLISH as its network loop would; the messages it gave
    on_message."""
    received: list[mqtt.MQTTMessage] = []
    client.on_message = lambda _c, _u, message: received.append(message)
    client._in_packet = {"command": cmd, "packet": bytearray(packet)}
    client._handle_publish()
    return received


def fresh(cls: type[mqtt.Client], v5: bool) -> mqtt.Client:
    return cls(callback_api_version=CallbackAPIVersion.VERSION2, protocol=protocol(v5))


def message_fields(message: mqtt.MQTTMessage) -> tuple:
    props = message.properties.json() if message.properties is not None else None
    return (message.topic, message.qos, message.mid, message.retain, message.dup,
            bytes(message.payload), type(message.payload), props)


@settings(max_examples=100, deadline=None)
@given(topic=st.text(mqtt_chars, min_size=1, max_size=50),
       qos=st.sampled_from([0, 1]), mid=st.integers(1, 65535),
       props=st.none() | publish_properties(), payload=st.binary(max_size=5000))
def test_lean_client_gives_on_message_what_paho_gives(topic, qos, mid, props, payload):
    v5 = props is not None
    packet = variable_header(topic.encode(), qos, mid, props) + payload
    lean = fresh(LeanClient, v5)
    [ours] = deliver(lean, command(qos, RETAIN), packet)
    [theirs] = deliver(fresh(mqtt.Client, v5), command(qos, RETAIN), packet)
    assert message_fields(ours) == message_fields(theirs)
    assert bytes(ours.payload) == payload
    assert lean.split_publishes == 1


def test_qos_2_and_malformed_packets_take_paho_s_own_path():
    lean = fresh(LeanClient, True)
    packet = variable_header(b"t/q2", 2, 5, Properties(PacketTypes.PUBLISH)) + b"exactly once"
    assert deliver(lean, command(2), packet) == []  # on_message waits for PUBREL
    assert bytes(lean._in_messages[5].payload) == b"exactly once"
    with pytest.raises(MalformedPacket):
        deliver(lean, command(0), b"\x00\x64" + b"t" * 8)
    assert lean.split_publishes == 0
    assert lean._split_payload is None


def test_an_invalid_qos_3_publish_does_not_turn_the_split_off():
    lean = fresh(LeanClient, True)
    packet = variable_header(b"t/x", 1, 9, Properties(PacketTypes.PUBLISH)) + b"payload"
    assert deliver(lean, 0x30 | 0x06, packet) == []  # QoS bits 3: paho refuses it
    [message] = deliver(lean, command(1), packet)
    assert bytes(message.payload) == b"payload" and lean._lean and lean.split_publishes == 1


def test_a_paho_that_stops_delivering_from_handle_publish_turns_the_split_off(caplog):
    """If a future paho built the message but delivered it some other way, split payloads
    would reach callbacks empty: LeanClient notices the payload was never taken, logs it
    and parses with paho's own code from then on."""
    lean = fresh(LeanClient, True)
    packet = variable_header(b"t/x", 1, 9, Properties(PacketTypes.PUBLISH)) + b"payload"
    lean._handle_on_message = lambda message: None  # the hook no longer fires
    deliver(lean, command(1), packet)
    assert lean._split_payload is None and not lean._lean
    assert "paho's own parsing" in caplog.text
    del lean._handle_on_message
    [message] = deliver(lean, command(1), packet)
    assert bytes(message.payload) == b"payload" and lean.split_publishes == 0


# Integration: what the broker delivers to MqttLink (a LeanClient) and to plain paho.

FILTER = "fedmq/test/lean/#"


def sample_publishes() -> dict[str, tuple[bytes, int, Properties | None]]:
    """topic -> (payload, qos, properties) of the messages the integration tests send."""
    rng = random.Random(20240611)
    props = Properties(PacketTypes.PUBLISH)
    props.MessageExpiryInterval = 3600
    props.UserProperty = ("round", "7")
    return {
        "fedmq/test/lean/big": (rng.randbytes(1 << 20), 1, None),
        "fedmq/test/lean/empty": (b"", 0, None),
        "fedmq/test/lean/exactly-once": (rng.randbytes(70_000), 2, None),
        "fedmq/test/lean/with-properties": (rng.randbytes(3000), 1, props),
    }


def lean_paths(samples) -> int:
    """How many of `samples` LeanClient should receive on its one-copy path (QoS 0 and 1)."""
    return sum(1 for _, qos, _ in samples.values() if qos < 2)


def publish_all(url: str, stoppers, samples) -> None:
    sender = MqttLink(client_id="lean-sender", broker=url)
    sender.start()
    stoppers(sender.stop)
    sender.wait_connected(WAIT_S)
    infos = []
    for topic, (payload, qos, props) in samples.items():
        if props is None:
            infos.append(sender.publish(topic, payload, qos=qos))
        else:
            infos.append(sender._client.publish(topic, payload, qos=qos, properties=props))
    for info in infos:
        info.wait_for_publish(WAIT_S)


def check_received(received: list[Message], samples) -> None:
    by_topic = {message.topic: message for message in received}
    assert len(received) == len(samples) and by_topic.keys() == samples.keys()
    for topic, (payload, qos, props) in samples.items():
        message = by_topic[topic]
        assert type(message) is Message, "paho's MQTTMessage must never reach a handler"
        assert bytes(message.payload) == payload, topic
        assert message.qos == qos, topic
        if props is not None:
            assert list(message.user_properties) == props.UserProperty
            # the broker forwards what is left of the expiry interval
            assert 0 < message.expiry_s <= 3600


def collector(expected: int) -> tuple[list[Message], threading.Event,
                                     Callable[[Message], None]]:
    received: list[Message] = []
    done = threading.Event()

    def collect(message: Message) -> None:
        received.append(message)
        if len(received) >= expected:
            done.set()
    return received, done, collect


@pytest.mark.integration
def test_mqtt_link_receives_every_payload_intact_on_the_one_copy_path(broker, stoppers):
    samples = sample_publishes()
    received, done, collect = collector(len(samples))
    listener = MqttLink(client_id="lean-listener", broker=broker.url)
    assert isinstance(listener._client, LeanClient) and LeanClient.supported
    listener.route(FILTER, collect, qos=2)
    listener.start()
    stoppers(listener.stop)
    assert listener.subscribed.wait(WAIT_S), "the listener's subscription"
    before = listener._client.split_publishes

    publish_all(broker.url, stoppers, samples)
    assert done.wait(WAIT_S), f"only {len(received)} of {len(samples)} messages arrived"
    check_received(received, samples)
    assert listener.handler_errors == 0
    # exactly the QoS 0 and 1 messages were split; QoS 2 went paho's way
    assert listener._client.split_publishes - before == lean_paths(samples)


@pytest.mark.integration
def test_a_plain_paho_client_beside_it_is_unchanged(broker, stoppers):
    samples = sample_publishes()
    lean_received, lean_done, collect = collector(len(samples))
    listener = MqttLink(client_id="lean-listener", broker=broker.url)
    listener.route(FILTER, collect, qos=2)
    listener.start()
    stoppers(listener.stop)

    plain_received, plain_done, plain_collect = collector(len(samples))
    subscribed, disconnected = threading.Event(), threading.Event()
    plain = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                        client_id="plain-listener", protocol=mqtt.MQTTv5)
    assert not isinstance(plain, LeanClient)
    assert mqtt.Client._handle_publish is not LeanClient._handle_publish
    plain.on_connect = lambda c, _u, _f, _rc, _p: c.subscribe(FILTER, qos=2)
    plain.on_subscribe = lambda *_: subscribed.set()
    plain.on_message = lambda _c, _u, message: plain_collect(message_from_paho(message))
    plain.on_disconnect = lambda *_: disconnected.set()
    plain.connect("127.0.0.1", broker.port)
    plain.loop_start()

    def stop_plain() -> None:
        plain.disconnect()
        disconnected.wait(WAIT_S)
        plain.loop_stop()
        plain._reset_sockets(sockpair_only=True)  # as MqttLink.stop: no unclosed sockets
    stoppers(stop_plain)
    assert subscribed.wait(WAIT_S), "the plain client's subscription"
    assert listener.subscribed.wait(WAIT_S), "the lean listener's subscription"

    publish_all(broker.url, stoppers, samples)
    assert plain_done.wait(WAIT_S), f"plain paho got {len(plain_received)} messages"
    assert lean_done.wait(WAIT_S), f"LeanClient got {len(lean_received)} messages"
    check_received(plain_received, samples)
    check_received(lean_received, samples)
    assert not hasattr(plain, "split_publishes")
    assert listener._client.split_publishes == lean_paths(samples)


def test_handlers_get_a_frozen_fedmq_message_sharing_the_payload_object():
    """MqttLink's guard hands handlers fedmq's Message, never paho's, with the very payload
    object received (no copy beside LeanClient's one)."""
    import dataclasses

    raw = mqtt.MQTTMessage(mid=7, topic=b"f/x")
    raw.payload, raw.qos, raw.retain, raw.dup = b"\x00" * 1000, 1, True, True
    raw.properties = Properties(PacketTypes.PUBLISH)
    raw.properties.UserProperty = ("k", "v")
    raw.properties.MessageExpiryInterval = 60
    seen: list[Message] = []
    link = MqttLink(client_id="guard", broker="mqtt://127.0.0.1:1")
    link._guard(seen.append)(None, None, raw)
    (message,) = seen
    assert message == Message(topic="f/x", payload=raw.payload, qos=1, retain=True, mid=7,
                              dup=True, user_properties=(("k", "v"),), expiry_s=60)
    assert message.payload is raw.payload
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.payload = b""  # type: ignore[misc]
    assert message_from_paho(mqtt.MQTTMessage(topic=b"t")).user_properties == ()
