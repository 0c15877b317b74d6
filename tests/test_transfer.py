import random

import numpy as np
import pytest

from edge_agent.errors import ProtocolError
from edge_agent.protocol import ModelAnnouncement, ModelChunk, TaskConfig
from edge_agent.transfer import ModelReceiver, encode_model


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
