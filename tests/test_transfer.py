import random

import numpy as np
import pytest

from fedmq.core.protocol import ModelAnnouncement, ModelChunk, TaskConfig
from fedmq.core.transfer import ModelReceiver, encode_model
from fedmq.errors import ProtocolError


def model_messages(params, *, version=1, round=1, max_payload=4096):
    info, chunks = encode_model(params, codec="float32", version=version, max_payload=max_payload)
    announcement = ModelAnnouncement(
        fleet="f", version=version, round=round, model="logreg", model_config={},
        layout=[["w", [params.size]]], layout_hash="h", task=TaskConfig(), payload=info)
    return announcement, chunks


def test_big_model_is_chunked_under_the_limit_and_reassembles_in_any_order():
    params = np.random.default_rng(0).normal(size=5000).astype(np.float32)
    announcement, chunks = model_messages(params, max_payload=4096)
    assert len(chunks) > 4
    assert all(len(c.to_payload()) <= 4096 for c in chunks)
    receiver = ModelReceiver()
    shuffled = chunks + chunks[:2]  # duplicates too
    random.Random(1).shuffle(shuffled)
    results = [receiver.offer_chunk(c, 1) for c in shuffled[:-1]]
    assert not any(results)
    received = receiver.offer_chunk(shuffled[-1], 1) or receiver.offer_announcement(
        announcement, 10)
    assert received is not None
    assert np.array_equal(received.params, params)
    # the same announcement again (a reconnect) does not trigger training twice
    assert receiver.offer_announcement(announcement, 10) is None


def test_corrupted_chunk_fails_the_hash():
    params = np.arange(3000, dtype=np.float32)
    announcement, chunks = model_messages(params)
    bad = chunks[1]
    flipped = bytes([bad.data[0] ^ 1]) + bad.data[1:]
    chunks[1] = ModelChunk(version=bad.version, index=bad.index, count=bad.count, data=flipped)
    receiver = ModelReceiver()
    receiver.offer_announcement(announcement, 10)
    for c in chunks[:-1]:
        receiver.offer_chunk(c, 1)
    with pytest.raises(ProtocolError) as info:
        receiver.offer_chunk(chunks[-1], 1)
    assert info.value.reason == "bad_hash"


def test_newer_version_supersedes_older_and_old_copies_are_ignored():
    receiver = ModelReceiver()
    old_a, old_chunks = model_messages(np.zeros(10, np.float32), version=1)
    new_a, new_chunks = model_messages(np.ones(10, np.float32), version=2, round=2)
    receiver.offer_announcement(new_a, 1)
    assert receiver.offer_announcement(old_a, 1) is None
    assert receiver.offer_chunk(old_chunks[0], 1) is None
    received = receiver.offer_chunk(new_chunks[0], 1)
    assert received is not None and received.announcement.version == 2
    assert np.array_equal(received.params, np.ones(10))


def test_same_model_announced_for_a_new_round_is_delivered_again():
    receiver = ModelReceiver()
    a1, chunks = model_messages(np.zeros(4, np.float32), version=3, round=5)
    a2, _ = model_messages(np.zeros(4, np.float32), version=3, round=6)
    receiver.offer_chunk(chunks[0], 1)
    assert receiver.offer_announcement(a1, 1) is not None
    again = receiver.offer_announcement(a2, 1)
    assert again is not None and again.announcement.round == 6


def test_a_restarted_aggregator_reannouncing_the_same_round_gets_devices_to_train_again():
    import dataclasses

    receiver = ModelReceiver()
    a, chunks = model_messages(np.zeros(4, np.float32), version=2, round=3)
    a = dataclasses.replace(a, announce_id="first")
    receiver.offer_chunk(chunks[0], 1)
    assert receiver.offer_announcement(a, 1) is not None
    assert receiver.offer_announcement(dataclasses.replace(a), 1) is None  # reconnect
    again = receiver.offer_announcement(dataclasses.replace(a, announce_id="restart"), 1)
    assert again is not None and again.announcement.round == 3


def _announce_with_delta(base, new, *, version, delta_codec="q8", full_codec="float32"):
    from fedmq.core import codecs
    from fedmq.core.transfer import chunk_tensor

    info, chunks = chunk_tensor(codecs.encode(new, full_codec), version=version, max_payload=4096)
    delta = codecs.encode(new - base, delta_codec, rng=np.random.default_rng(0))
    dinfo, dchunks = chunk_tensor(delta, version=version, max_payload=4096)
    a = ModelAnnouncement(fleet="f", version=version, round=version + 1, model="logreg",
                          model_config={}, layout=[["w", [new.size]]], layout_hash="h",
                          task=TaskConfig(), payload=info, delta=dinfo, delta_base=version - 1)
    return a, chunks, dchunks, codecs.decode(delta)


def test_a_device_holding_the_base_takes_the_small_delta_and_others_the_full_model():
    from fedmq.core.transfer import DELTA, FULL

    rng = np.random.default_rng(0)
    v0 = rng.normal(size=3000).astype(np.float32)
    v1 = v0 + rng.normal(scale=0.01, size=3000).astype(np.float32)
    a0, chunks0 = model_messages(v0, version=0, round=1)
    a1, full1, delta1, decoded_delta = _announce_with_delta(v0, v1, version=1)
    assert sum(len(c.data) for c in delta1) * 3 < sum(len(c.data) for c in full1)

    follower = ModelReceiver()
    assert follower.wanted() is None
    follower.offer_announcement(a0, 1)
    assert follower.wanted() == FULL
    for c in chunks0:
        follower.offer_chunk(c, 1, FULL)
    follower.offer_announcement(a1, 1)
    assert follower.wanted() == DELTA
    for c in full1:  # a stray full chunk does not complete the delta path
        assert follower.offer_chunk(c, 1, FULL) is None
    got = None
    for c in delta1:
        got = follower.offer_chunk(c, 1, DELTA) or got
    assert got is not None and follower.wanted() is None
    assert np.array_equal(got.params, v0 + decoded_delta)  # exactly what the chain holds
    assert np.abs(got.params - v1).max() < 1e-3

    newcomer = ModelReceiver()
    newcomer.offer_announcement(a1, 1)
    assert newcomer.wanted() == FULL
    for c in full1:
        got = newcomer.offer_chunk(c, 1, FULL) or got
    assert np.array_equal(got.params, v1)


def test_the_held_model_announced_for_a_new_round_needs_no_download():
    import dataclasses

    receiver = ModelReceiver()
    a, chunks = model_messages(np.ones(8, np.float32), version=4, round=5)
    receiver.offer_announcement(a, 1)
    receiver.offer_chunk(chunks[0], 1)
    again = receiver.offer_announcement(dataclasses.replace(a, round=6, announce_id="x"), 7)
    assert again is not None and again.wire_bytes == 7 and receiver.wanted() is None


def inline_announcement(params, *, tamper: bool = False):
    from fedmq.core import codecs
    from fedmq.core.transfer import chunk_tensor

    info, chunks = chunk_tensor(codecs.encode(params, "float32"), version=1, max_payload=4096,
                                inline_max=1 << 20)
    if tamper:
        import dataclasses

        info = dataclasses.replace(info, data=bytes([info.data[0] ^ 1]) + info.data[1:])
    return ModelAnnouncement(
        fleet="f", version=1, round=1, model="logreg", model_config={},
        layout=[["w", [params.size]]], layout_hash="h", task=TaskConfig(), payload=info), chunks


def test_a_small_model_inline_in_its_announcement_needs_no_chunk_stream():
    params = np.arange(300, dtype=np.float32)
    announcement, chunks = inline_announcement(params)
    assert announcement.payload.data and chunks  # the chunks still go out, for older devices
    receiver = ModelReceiver()
    received = receiver.offer_announcement(announcement, 10)
    assert received is not None and np.array_equal(received.params, params)
    assert receiver.wanted() is None
    # the chunks alone still make the model (what a device that predates the field takes)
    assert ModelAnnouncement.from_payload(announcement.to_payload()) == announcement
    from fedmq.core.chunking import join_verified
    from fedmq.core.protocol.wire import unpack

    blob = join_verified((c.data for c in chunks), size=announcement.payload.size,
                         sha256=bytes.fromhex(announcement.payload.sha256), what="chunks")
    assert blob == announcement.payload.data and unpack(blob)


def test_a_tampered_inline_model_fails_the_hash():
    announcement, _ = inline_announcement(np.arange(300, dtype=np.float32), tamper=True)
    with pytest.raises(ProtocolError) as info:
        ModelReceiver().offer_announcement(announcement, 10)
    assert info.value.reason == "bad_hash"


def test_only_models_up_to_the_inline_limit_travel_inline():
    from fedmq.core import codecs
    from fedmq.core.transfer import chunk_tensor

    small, _ = chunk_tensor(codecs.encode(np.zeros(10, np.float32), "float32"), version=1,
                            inline_max=1024)
    big, _ = chunk_tensor(codecs.encode(np.zeros(1000, np.float32), "float32"), version=1,
                          inline_max=1024)
    assert small.data and not big.data
