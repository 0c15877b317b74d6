
import dataclasses

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.client import topic_matches_sub

from aggregator.partial import Shard
from fedmq.core.protocol import (
    UPDATE_BUCKETS,
    AggregatorStatus,
    CohortDigest,
    DeviceActivity,
    DeviceStatus,
    EncodedTensor,
    FleetTopics,
    ModelAnnouncement,
    ModelChunk,
    PayloadInfo,
    TaskConfig,
    Update,
    cohort_digest,
)
from fedmq.core.protocol.wire import KIND_KEY, VERSION_KEY, decode_any, wire
from fedmq.errors import ConfigError, ProtocolError

names = st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True)


def make_update(**overrides) -> Update:
    fields = dict(device_id="dev-1", update_id="u1", round=3, base_version=2, num_samples=40,
                  loss=0.25, delta=EncodedTensor(codec="float32", size=2, data=b"\0" * 8),
                  layout_hash="abcd")
    fields.update(overrides)
    return Update(**fields)


@given(device=names, round_=st.integers(0, 2**40), samples=st.integers(1, 2**40),
       loss=st.floats(allow_nan=False, allow_infinity=False), data=st.binary(max_size=256))
def test_update_round_trip(device, round_, samples, loss, data):
    update = make_update(device_id=device, round=round_, num_samples=samples, loss=loss,
                         delta=EncodedTensor(codec="float16", size=len(data) // 2, data=data))
    assert Update.from_payload(update.to_payload()) == update


def make_announcement() -> ModelAnnouncement:
    info = PayloadInfo(codec="float32", size=10, sha256="0" * 64, chunks=2)
    return ModelAnnouncement(fleet="f", version=1, round=2, model="mlp",
                             model_config={"inputs": 64, "classes": 10, "hidden": 8},
                             layout=[["w", [2, 3]]], layout_hash="ab", task=TaskConfig(),
                             payload=info, issued_at=1.5)


def test_every_message_round_trips():
    info = PayloadInfo(codec="float32", size=10, sha256="0" * 64, chunks=2)
    messages = [
        make_update(),
        ModelAnnouncement(fleet="f", version=1, round=2, model="mlp",
                          model_config={"inputs": 64, "classes": 10, "hidden": 8},
                          layout=[["w", [2, 3]]], layout_hash="ab", task=TaskConfig(),
                          payload=info, issued_at=1.5),
        ModelChunk(version=1, index=1, count=2, data=b"xyz"),
        DeviceStatus(device_id="d", online=True, capabilities={"cpus": 4}),
        AggregatorStatus(online=False, round=3, version=2),
    ]
    for message in messages:
        assert type(message).from_payload(message.to_payload()) == message


def test_envelope_is_compact():
    # Compressed updates are a few hundred bytes: the envelope must not dominate them.
    payload = make_update(delta=EncodedTensor(codec="float32", size=0, data=b"")).to_payload()
    assert len(payload) < 100


@pytest.mark.parametrize("payload", [b"", b"\xc1", b"garbage", msgpack.packb([1, 2]),
                                     msgpack.packb({"a": 1}), b"\x85" + b"\x00" * 3])
def test_malformed_payloads_raise_protocol_error(payload):
    with pytest.raises(ProtocolError):
        Update.from_payload(payload)


def _body(**changes):
    body = msgpack.unpackb(make_update().to_payload())
    body.update(changes)
    return msgpack.packb(body)


def test_unknown_protocol_version_is_rejected_with_reason():
    with pytest.raises(ProtocolError, match="protocol version 99") as info:
        Update.from_payload(_body(**{VERSION_KEY: 99}))
    assert info.value.reason == "bad_version"


def test_wrong_kind_is_rejected():
    with pytest.raises(ProtocolError) as info:
        DeviceStatus.from_payload(make_update().to_payload())
    assert info.value.reason == "wrong_kind"
    assert KIND_KEY != VERSION_KEY


def test_decode_any_returns_whichever_kind_the_payload_names():
    update = make_update()
    status = DeviceStatus(device_id="d1", online=True)
    assert decode_any(update.to_payload(), DeviceStatus, Update) == update
    assert decode_any(status.to_payload(), DeviceStatus, Update) == status
    with pytest.raises(ProtocolError, match=r"'upd'.* where 'dev'") as info:
        decode_any(update.to_payload(), DeviceStatus)
    assert info.value.reason == "wrong_kind"
    with pytest.raises(ProtocolError, match="protocol version 99") as info:
        decode_any(_body(**{VERSION_KEY: 99}), DeviceStatus, Update)
    assert info.value.reason == "bad_version"


@pytest.mark.parametrize("changes", [
    {"ns": 0}, {"ns": -5}, {"ns": "ten"}, {"r": 1.5}, {"r": True}, {"dev": "a/b"},
    {"dev": "+"}, {"x": {"c": "float32", "n": 2}}, {"x": "data"}, {"l": None}, {"id": ""},
])
def test_bad_fields_are_rejected(changes):
    with pytest.raises(ProtocolError):
        Update.from_payload(_body(**changes))


def test_missing_field_is_named():
    body = msgpack.unpackb(make_update().to_payload())
    del body["ns"]
    with pytest.raises(ProtocolError, match="num_samples"):
        Update.from_payload(msgpack.packb(body))


@given(st.binary(max_size=512))
def test_random_bytes_never_escape_as_other_errors(data):
    """Garbage gives an Update or a ProtocolError, never another exception."""
    try:
        update = Update.from_payload(data)
    except ProtocolError as exc:
        assert exc.reason
    else:
        assert isinstance(update, Update)


def test_reserved_envelope_keys_cannot_be_field_keys():
    with pytest.raises(ValueError):
        wire("$v")


def test_topics():
    t = FleetTopics("plant-7")
    # topic layout 2: SHA-256("pi-1")[:4] big-endian mod 64 = 53
    assert t.update("pi-1") == "fedmq/plant-7/update/53/pi-1"
    assert t.device_from_update_topic("fedmq/plant-7/update/53/pi-1") == "pi-1"
    assert t.device_from_status_topic(t.device_status("pi-2")) == "pi-2"
    assert t.model_payload_chunk(3) == "fedmq/plant-7/model/payload/3"
    for bad in ("fedmq/other/update/53/pi-1", "fedmq/plant-7/update/a/b",
                "fedmq/plant-7/update/", "fedmq/plant-7/update/53/", "fedmq/plant-7/update//pi-1",
                "fedmq/plant-7/update/52/pi-1", "fedmq/plant-7/update/053/pi-1",
                "fedmq/plant-7/update/117/pi-1", "fedmq/plant-7/update/53/pi-1/x",
                "fedmq/plant-7/update/53/+"):
        with pytest.raises(ProtocolError) as err:
            t.device_from_update_topic(bad)
        assert err.value.reason == "bad_topic", bad
    with pytest.raises(ProtocolError) as err:  # layout 1: refused, with its own reason
        t.device_from_update_topic("fedmq/plant-7/update/pi-1")
    assert err.value.reason == "old_topic"
    for bad_name in ("", "a/b", "#", "+", "x" * 65, "dev\n"):
        with pytest.raises(ConfigError):
            FleetTopics(bad_name)


@pytest.mark.parametrize("version", [True, 1.0, "1", None])
def test_protocol_version_must_be_the_integer(version):
    with pytest.raises(ProtocolError):
        Update.from_payload(_body(**{VERSION_KEY: version}))


def test_non_finite_loss_is_rejected():
    with pytest.raises(ProtocolError) as info:
        Update.from_payload(_body(l=float("nan")))
    assert info.value.reason == "non_finite"


counters = st.integers(0, 2**40)


@given(device=names, online=st.booleans(), round_=counters, updates=counters, sent=counters,
       pending=counters, codec=st.text(max_size=64), backend=st.text(max_size=32))
def test_device_activity_round_trips(device, online, round_, updates, sent, pending, codec,
                                     backend):
    activity = DeviceActivity(last_round=round_, updates=updates, bytes_up=sent,
                              pending=pending, codec=codec, backend=backend)
    status = DeviceStatus(device_id=device, online=online, ts=1.5, activity=activity)
    assert DeviceStatus.from_payload(status.to_payload()) == status


def test_device_activity_is_optional_and_extensible():
    # A status from an agent before DeviceActivity has no "act"; a later revision's extra
    # keys are ignored by this one, which still reads the fields it knows.
    old = _body(**{KIND_KEY: "dev", "dev": "d1", "on": True})
    assert DeviceStatus.from_payload(old).activity is None
    newer = _body(**{KIND_KEY: "dev", "dev": "d1", "on": True,
                     "act": {"v": 2, "r": 7, "u": 3, "zz": [1, 2]}})
    activity = DeviceStatus.from_payload(newer).activity
    assert (activity.revision, activity.last_round, activity.updates) == (2, 7, 3)
    with pytest.raises(ProtocolError, match=r"DeviceStatus\.activity"):
        DeviceStatus.from_payload(_body(**{KIND_KEY: "dev", "dev": "d1", "on": True,
                                           "act": {"p": -1}}))


@given(st.sets(st.from_regex(r"[A-Za-z0-9_.-]{1,20}", fullmatch=True), min_size=1,
               max_size=300))
def test_a_cohort_digest_holds_every_device_asked(devices):
    announcement = dataclasses.replace(make_announcement(), cohort=None,
                                       cohort_digest=cohort_digest(devices))
    again = ModelAnnouncement.from_payload(announcement.to_payload())
    assert all(again.task_for(d) is not None for d in devices)


def test_a_cohort_digest_is_small_and_rarely_admits_a_stranger():
    cohort = [f"sim-abc123-dev{i:05d}" for i in range(260)]
    digest = cohort_digest(cohort)
    assert len(digest) == 4 * 260  # vs ~5.2 KB of ids
    asked = CohortDigest(digest)
    strangers = [f"sim-abc123-dev{i:05d}" for i in range(260, 20_260)]
    assert sum(d in asked for d in strangers) <= 1  # expected 20,000 x 260 / 2^32 = 0.001


@pytest.mark.parametrize("changes", [
    {"cohort_digest": b"\x00\x00\x00"},  # not whole keys
    {"cohort_digest": b"\x00\x00\x00\x02\x00\x00\x00\x01"},  # not sorted
    {"cohort_digest": b"\x00\x00\x00\x01", "cohort": ["a"]},  # both forms
])
def test_malformed_cohort_digests_are_refused(changes):
    with pytest.raises(ProtocolError):
        dataclasses.replace(make_announcement(), **changes)


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_.-", min_size=1, max_size=64),
       st.integers(1, UPDATE_BUCKETS))
def test_every_update_topic_reaches_exactly_one_worker(device, workers):
    """The worker filters of N workers partition the update topics: each device's topic
    matches exactly one worker's filters, the worker whose shard owns the device."""
    t = FleetTopics("plant-7")
    topic = t.update(device)
    assert t.device_from_update_topic(topic) == device
    matching = [i for i in range(workers)
                if any(topic_matches_sub(f, topic) for f in Shard(i, workers).update_filters(t))]
    assert len(matching) == 1
    assert Shard(matching[0], workers).owns(device)
    assert not topic_matches_sub(t.legacy_update_filter, topic)
    assert topic_matches_sub(t.update_filter, topic)
