"""DeviceMachine without a broker: events in, decisions out (fedmq/core/device.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.core import codecs
from fedmq.core.device import (
    RESEND_ON_MODEL_AFTER_S,
    AnnouncementIn,
    ChunkIn,
    Connected,
    DeviceMachine,
    Ignored,
    NewLineage,
    ReceiptIn,
    Rejected,
    Send,
    Sent,
    Settled,
    SitOut,
    Subscribe,
    Tick,
    Train,
    Trained,
    Unsubscribe,
)
from fedmq.core.outbox import MAX_BACKOFF_S
from fedmq.core.protocol import FleetTopics, ModelAnnouncement, Receipt, TaskConfig, Update
from fedmq.core.transfer import DELTA, FULL, encode_model
from fedmq.errors import ConfigError

RESEND_S = 30.0
SIZE = 8
TOPICS = FleetTopics("f")
FULL_FILTER, DELTA_FILTER = TOPICS.model_payload_filter, TOPICS.model_delta_filter


def machine(**kwargs) -> DeviceMachine:
    return DeviceMachine(device_id="d0", fleet="f", resend_after_s=RESEND_S, **kwargs)


def model_messages(version: int, round: int = 1, *, value: float = 1.0, delta_from=None,
                   **fields) -> tuple[bytes, list[bytes], list[bytes]]:
    """An announcement of `version` and the payloads of its full (and delta) chunks."""
    params = np.full(SIZE, value, np.float32)
    info, chunks = encode_model(params, codec="float32", version=version, max_payload=64)
    delta_info, delta_chunks = None, []
    if delta_from is not None:
        base_version, base = delta_from
        delta_info, delta_chunks = encode_model(params - base, codec="float32",
                                                version=version, max_payload=64)
        fields.update(delta_base=base_version)
    announcement = ModelAnnouncement(
        fleet="f", version=version, round=round, model="logreg", model_config={},
        layout=[["w", [SIZE]]], layout_hash="", task=TaskConfig(epochs=1),
        payload=info, delta=delta_info, **fields)
    return (announcement.to_payload(), [c.to_payload() for c in chunks],
            [c.to_payload() for c in delta_chunks])


def download(m: DeviceMachine, version: int, now: float = 0.0, **kwargs) -> list:
    """Every decision of announcing `version` and sending all its full chunks."""
    announcement, chunks, _ = model_messages(version, **kwargs)
    decisions = m.handle(AnnouncementIn(announcement, now))
    for chunk in chunks:
        decisions += m.handle(ChunkIn(FULL, chunk, now))
    return decisions


def update(uid: str, round: int = 1) -> Update:
    return Update(device_id="d0", update_id=uid, round=round, base_version=0, num_samples=1,
                  loss=0.0, delta=codecs.encode(np.zeros(SIZE, np.float32)))


def receipt(uid: str, status: str = "accepted") -> bytes:
    return Receipt(update_id=uid, round=1, status=status).to_payload()


def sends(decisions) -> list[str]:
    return [d.update_id for d in decisions if isinstance(d, Send)]


def train_and_send(m: DeviceMachine, uid: str, now: float, *, connected: bool = True) -> Send:
    (send,) = m.handle(Trained(update(uid), now))
    m.handle(Sent(uid, connected, now))
    return send


# -- the model coming down ------------------------------------------------------------------
def test_an_announcement_subscribes_the_full_stream_and_its_chunks_ask_to_train():
    m = machine()
    announcement, chunks, _ = model_messages(0)
    assert m.handle(AnnouncementIn(announcement, 0.0)) == [Subscribe((FULL_FILTER,))]
    for chunk in chunks[:-1]:
        assert m.handle(ChunkIn(FULL, chunk, 0.0)) == []
    unsubscribe, train = m.handle(ChunkIn(FULL, chunks[-1], 0.0))
    assert unsubscribe == Unsubscribe((FULL_FILTER,)) and isinstance(train, Train)
    assert train.task == TaskConfig(epochs=1) and train.model.announcement.version == 0
    assert np.array_equal(train.model.params, np.ones(SIZE, np.float32))
    assert m.following is None and m.receiver.held_version == 0


def test_chunks_before_their_announcement_are_kept():
    m = machine()
    announcement, chunks, _ = model_messages(0)
    for chunk in chunks:
        assert m.handle(ChunkIn(FULL, chunk, 0.0)) == []
    (train,) = m.handle(AnnouncementIn(announcement, 0.0))  # nothing to subscribe to
    assert isinstance(train, Train)


def test_older_and_repeated_announcements_are_ignored_explicitly():
    m = machine()
    download(m, 2)
    older, _, _ = model_messages(1)
    assert m.handle(AnnouncementIn(older, 0.0)) == [Ignored("announcement", "older")]
    again, _, _ = model_messages(2)
    assert m.handle(AnnouncementIn(again, 0.0)) == [Ignored("announcement", "repeat")]
    assert m.receiver.held_version == 2


def test_a_device_holding_the_base_version_follows_only_the_delta_stream():
    m = machine()
    download(m, 0, value=1.0)
    announcement, _, delta_chunks = model_messages(
        1, round=2, value=3.0, delta_from=(0, np.ones(SIZE, np.float32)))
    assert m.handle(AnnouncementIn(announcement, 0.0)) == [Subscribe((DELTA_FILTER,))]
    decisions = []
    for chunk in delta_chunks:
        decisions += m.handle(ChunkIn(DELTA, chunk, 0.0))
    unsubscribe, train = decisions
    assert unsubscribe == Unsubscribe((DELTA_FILTER,))
    assert np.array_equal(train.model.params, np.full(SIZE, 3.0, np.float32))


def test_the_model_held_announced_for_a_new_round_trains_without_a_download():
    m = machine()
    download(m, 0)
    announcement, _, _ = model_messages(0, round=2, announce_id="again")
    (train,) = m.handle(AnnouncementIn(announcement, 0.0))
    assert isinstance(train, Train) and train.model.announcement.round == 2


def test_a_device_outside_the_cohort_sits_out_without_downloading_and_a_tier_is_its_task():
    m = machine()
    sat_out, _, _ = model_messages(0, cohort=["d1"])
    out = m.handle(AnnouncementIn(sat_out, 0.0))
    assert [type(d) for d in out] == [SitOut]  # no Subscribe: the model is not downloaded
    assert m.receiver.wanted() is None and m.receiver.held_version == -1
    assert m.handle(AnnouncementIn(sat_out, 0.0)) == [Ignored("announcement", "repeat")]
    asked_later, _, _ = model_messages(0, round=2, announce_id="later", cohort=["d0"])
    (subscribe,) = m.handle(AnnouncementIn(asked_later, 0.0))  # asked now: full download
    assert subscribe == Subscribe((FULL_FILTER,))
    tier = TaskConfig(epochs=3, codec="top2-sign-ef")
    assigned = download(machine(), 0, cohort=["d0"], tiers=[tier], assign={"d0": 0})
    assert assigned[-1].task == tier


def test_bad_model_messages_are_rejected_and_empty_ones_ignored():
    m = machine()
    (rejected,) = m.handle(AnnouncementIn(b"\x00garbage", 0.0))
    assert isinstance(rejected, Rejected) and rejected.what == "model"
    assert m.handle(ChunkIn(FULL, b"", 0.0)) == []  # an emptied retained chunk
    with pytest.raises(ConfigError):
        m.handle(ChunkIn("sideways", b"x", 0.0))


def test_a_signed_only_device_rejects_an_unsigned_announcement():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedmq.core.signing import AnnouncementOpener

    m = machine(opener=AnnouncementOpener(Ed25519PrivateKey.generate().public_key()))
    announcement, _, _ = model_messages(0)
    (rejected,) = m.handle(AnnouncementIn(announcement, 0.0))
    assert rejected.reason == "unsigned" and m.following is None


# -- updates going up -----------------------------------------------------------------------
def test_a_trained_update_is_stored_then_sent_and_a_receipt_settles_it():
    m = machine()
    send = train_and_send(m, "u1", 100.0)
    assert send == Send(TOPICS.update("d0"), "u1", 1, update("u1").to_payload(), resend=False)
    assert m.outbox.ids() == {"u1"}
    (settled,) = m.handle(ReceiptIn(receipt("u1", "duplicate"), 101.0))
    assert isinstance(settled, Settled) and settled.receipt.status == "duplicate"
    assert m.handle(ReceiptIn(receipt("u1"), 102.0)) == [Ignored("receipt", "settled")]
    (bad,) = m.handle(ReceiptIn(b"not msgpack", 103.0))
    assert isinstance(bad, Rejected) and bad.what == "receipt"
    assert len(m.outbox) == 0 and sends(m.handle(Tick(10_000.0, online=True))) == []


def test_what_lacks_a_receipt_goes_out_again_with_backoff_and_only_online():
    m = machine()
    train_and_send(m, "u1", 100.0)
    assert m.handle(Tick(129.0, online=True)) == []
    assert m.handle(Tick(130.0, online=False)) == []  # receipts could not reach us
    (again,) = m.handle(Tick(130.0, online=True))
    assert again.resend and again.update_id == "u1"
    m.handle(Sent("u1", True, 130.0))
    assert sends(m.handle(Tick(189.0, online=True))) == []  # now 60 s
    assert sends(m.handle(Tick(190.0, online=True))) == ["u1"]


def test_a_reconnect_resends_everything_and_a_new_model_only_old_first_sends():
    m = machine()
    train_and_send(m, "often", 100.0)
    for now in (130.0, 190.0):  # sent three times
        m.handle(Sent("often", True, now))
    train_and_send(m, "old", 100.0)
    train_and_send(m, "fresh", 198.0)
    download(m, 0, now=200.0)
    assert RESEND_ON_MODEL_AFTER_S < 200.0 - 100.0
    assert sends(m.handle(Tick(200.0, online=True))) == ["old"]
    m.handle(Connected(201.0))
    assert sends(m.handle(Tick(201.0, online=True))) == ["fresh", "often", "old"]


def test_the_model_we_hold_announced_again_live_resends_everything_a_retained_copy_not():
    """An aggregator that moved to our broker announces its model again once subscribed:
    what we re-sent on our own reconnect (perhaps before it was there) goes out again now,
    not after its backoff. The broker's stored copy, sent as we subscribe, is no sign."""
    m = machine()
    announcement, _, _ = model_messages(0)
    download(m, 0, now=90.0)
    train_and_send(m, "u1", 100.0)
    m.handle(Connected(110.0))  # our broker died: we moved and re-sent at once
    assert sends(m.handle(Tick(110.0, online=True))) == ["u1"]
    m.handle(Sent("u1", True, 110.0))
    m.handle(AnnouncementIn(announcement, 111.0, retained=True))
    assert sends(m.handle(Tick(111.0, online=True))) == []  # backoff: 60 s after 2 sends
    again = m.handle(AnnouncementIn(announcement, 112.0))  # the aggregator arrived
    assert again == [Ignored("announcement", "repeat")]
    assert sends(m.handle(Tick(112.0, online=True))) == ["u1"]


def test_a_send_into_a_dead_link_goes_out_on_the_next_tick():
    m = machine()
    train_and_send(m, "u1", 100.0, connected=False)
    assert sends(m.handle(Tick(100.5, online=True))) == ["u1"]
    assert m.outbox.get("u1").sends == 0


def test_entries_restored_into_the_ledger_go_out_on_the_first_online_tick():
    from fedmq.core.outbox import Outbox

    box = Outbox()
    box.put("from-before", 4, b"payload")
    m = machine(outbox=box)
    assert m.handle(Tick(0.5, online=False)) == []
    (send,) = m.handle(Tick(1.0, online=True))
    assert (send.update_id, send.round, send.payload, send.resend) == (
        "from-before", 4, b"payload", True)


def test_decisions_and_events_are_frozen_and_the_machine_checks_its_settings():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Tick(1.0, online=True).now = 2.0  # type: ignore[misc]
    with pytest.raises(ConfigError):
        DeviceMachine(device_id="d0", fleet="f", resend_after_s=0)
    assert machine().always_subscribed == (TOPICS.receipt("d0"), TOPICS.model_current)


# -- any order of receipts, duplicates, reconnects and ticks --------------------------------
operations = st.lists(st.one_of(
    st.tuples(st.just("train")),
    st.tuples(st.just("receipt"), st.integers(0, 7), st.sampled_from(
        ["accepted", "duplicate", "rejected"])),
    st.tuples(st.just("connect")),
    st.tuples(st.just("tick"), st.floats(0.0, 200.0), st.booleans(), st.booleans()),
), max_size=60)


@settings(max_examples=200, deadline=None)
@given(operations)
def test_no_order_of_events_loses_an_update_or_sends_one_early(ops):
    """Whatever the order of receipts (duplicates, for unknown or settled ids), reconnects
    and ticks: an update stays in the outbox until its receipt, is never sent after it,
    and is sent again only when due: after a reconnect, or its backoff after its last
    send (a send into a dead link not counting)."""
    m = machine()
    now, trained, receipted = 1000.0, [], set()
    last_sent: dict[str, float] = {}  # time of the last connected send
    sends_of: dict[str, int] = {}
    reconnected: set[str] = set()  # entries a reconnect made due at once

    def carry_out(decisions, connected: bool) -> None:
        for d in decisions:
            if not isinstance(d, Send):
                continue
            uid = d.update_id
            assert uid not in receipted, "sent after its receipt"
            if uid in last_sent and uid not in reconnected:
                backoff = min(RESEND_S * 2.0 ** max(sends_of[uid] - 1, 0),
                              max(RESEND_S, MAX_BACKOFF_S))
                assert now - last_sent[uid] >= backoff, "re-sent before it was due"
            reconnected.discard(uid)
            m.handle(Sent(uid, connected, now))
            if connected:
                last_sent[uid], sends_of[uid] = now, sends_of.get(uid, 0) + 1
            else:
                last_sent.pop(uid, None)

    for op in ops:
        if op[0] == "train":
            uid = f"u{len(trained)}"
            trained.append(uid)
            carry_out(m.handle(Trained(update(uid), now)), connected=True)
        elif op[0] == "receipt":
            uid = f"u{op[1]}"
            decisions = m.handle(ReceiptIn(receipt(uid, op[2]), now))
            known = uid in trained and uid not in receipted
            assert decisions == ([Settled(Receipt.from_payload(receipt(uid, op[2])))] if known
                                 else [Ignored("receipt", "settled")])
            if known:  # (a receipt for an id never trained: some other device's, say)
                receipted.add(uid)
        elif op[0] == "connect":
            m.handle(Connected(now))
            reconnected |= set(trained) - receipted
        else:
            now += op[1]
            online, connected = op[2], op[3] and op[2]
            decisions = m.handle(Tick(now, online=online))
            assert online or decisions == []
            carry_out(decisions, connected)
        # nothing lost, nothing kept after its receipt
        assert m.outbox.ids() == set(trained) - receipted
    # and nothing waits forever: a reconnect and a tick send all that is left, once each
    m.handle(Connected(now))
    left = m.handle(Tick(now, online=True))
    assert sorted(sends(left)) == sorted(set(trained) - receipted)



def test_a_model_of_another_lineage_is_taken_even_when_its_version_is_older():
    """The aggregator started over (its checkpoint gone): a device holding v5 of the old
    line takes v3 of the new one, downloads it whole, and says so."""
    m = machine()
    download(m, 5, lineage="old")
    announcement, chunks, _ = model_messages(3, round=1, lineage="new", value=7.0,
                                             delta_from=(5, np.zeros(SIZE, np.float32)))
    decisions = m.handle(AnnouncementIn(announcement, 0.0))
    assert decisions[0] == NewLineage("new")
    assert Subscribe((FULL_FILTER,)) in decisions  # never a delta on another line's model
    for chunk in chunks:
        decisions += m.handle(ChunkIn(FULL, chunk, 0.0))
    train = decisions[-1]
    assert isinstance(train, Train) and np.array_equal(train.model.params,
                                                       np.full(SIZE, 7.0, np.float32))
    old, _, _ = model_messages(2, lineage="new")  # within a line, older is still ignored
    assert m.handle(AnnouncementIn(old, 0.0)) == [Ignored("announcement", "older")]
