"""ModelBroadcast without a broker: what goes out for a model, built once per round."""

from __future__ import annotations

import numpy as np

from aggregator.broadcast import ModelBroadcast
from fedmq.core.protocol import FleetTopics, ModelAnnouncement, TaskConfig
from fedmq.core.signing import unsigned

TOPICS = FleetTopics("f")


def broadcast(**kwargs) -> ModelBroadcast:
    settings = dict(topics=TOPICS, seal=unsigned, model_codec="float32", delta_codec="", seed=0)
    settings.update(kwargs)
    return ModelBroadcast(**settings)


def fields(cohort=None):
    def make():
        return dict(fleet="f", model="logreg", model_config={}, layout=[["w", [100]]],
                    layout_hash="", task=TaskConfig(), cohort=cohort, tiers=[], assign={})
    return make


def announcement(messages) -> ModelAnnouncement:
    (payload,) = [p for t, p in messages if t == TOPICS.model_current]
    return ModelAnnouncement.from_payload(payload)


def test_one_round_is_built_once_and_a_fresh_one_after_forget():
    b, params = broadcast(), np.ones(100, np.float32)
    first = b.messages(params=params, version=1, round=1, limit=4096, fields=fields())
    assert b.messages(params=params, version=1, round=1, limit=4096, fields=fields()) is first
    b.forget()
    again = b.messages(params=params, version=1, round=1, limit=4096, fields=fields())
    assert announcement(again).announce_id != announcement(first).announce_id
    assert [t for t, _ in again] == [t for t, _ in first]


def test_a_small_model_is_inline_only_when_every_device_is_asked():
    params = np.ones(100, np.float32)
    everyone = broadcast().messages(params=params, version=1, round=1, limit=4096,
                                    fields=fields())
    some = broadcast().messages(params=params, version=1, round=1, limit=4096,
                                fields=fields(cohort=["d1"]))
    assert announcement(everyone).payload.data and not announcement(some).payload.data


def test_with_a_delta_only_the_delta_is_inline():
    b = broadcast(delta_codec="q8")
    b.messages(params=np.zeros(100, np.float32), version=1, round=1, limit=4096,
               fields=fields())
    a = announcement(b.messages(params=np.ones(100, np.float32), version=2, round=2,
                                limit=4096, fields=fields()))
    assert a.delta is not None and a.delta.data and not a.payload.data


def test_chunks_a_bigger_model_left_behind_are_deleted():
    b = broadcast()
    big = b.messages(params=np.ones(4000, np.float32), version=1, round=1, limit=4096,
                     fields=fields(cohort=["d1"]))
    small = b.messages(params=np.ones(10, np.float32), version=2, round=2, limit=4096,
                       fields=fields(cohort=["d1"]))
    chunk_topics = [t for t, _ in big if t != TOPICS.model_current]
    assert len(chunk_topics) > 1
    emptied = [t for t, p in small if p == b"" and t != TOPICS.model_current]
    assert emptied == chunk_topics[1:]  # the one chunk left is overwritten, the rest deleted
