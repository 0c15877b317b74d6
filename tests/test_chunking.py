"""Splitting payloads into Parts and reassembling them: pure, no broker."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.core.chunking import Reassembler, frame, split_payload
from fedmq.core.protocol import Part
from fedmq.core.protocol.wire import peek_kind
from fedmq.errors import ConfigError, ProtocolError
from fedmq.transport.mqtt import MqttLink, publish_overhead

TIMEOUT_S = 10.0


def parts_of(payload: bytes, max_payload: int) -> list[Part]:
    messages = split_payload(payload, max_payload=max_payload)
    assert len(messages) > 1, "the payload should not fit in one message"
    return [Part.from_payload(m) for m in messages]


def reassembler(**overrides) -> Reassembler:
    settings_ = dict(timeout_s=TIMEOUT_S, max_pending_bytes=1 << 20)
    settings_.update(overrides)
    return Reassembler(**settings_)


def reencoded(part: Part, **changes) -> Part:
    """A changed part as a receiver would see it: through the wire and validation."""
    return Part.from_payload(dataclasses.replace(part, **changes).to_payload())


@st.composite
def multi_part(draw) -> tuple[bytes, list[Part]]:
    """A payload too big for one message, and its Parts."""
    max_payload = draw(st.integers(128, 4096))
    size = draw(st.integers(max_payload + 1, 6 * max_payload))
    payload = draw(st.binary(min_size=size, max_size=size))
    return payload, parts_of(payload, max_payload)


def test_small_payloads_are_sent_as_they_are():
    for size in (0, 1, 100, 1000):
        payload = bytes(size)
        assert split_payload(payload, max_payload=1000) == [payload]  # no envelope


@settings(max_examples=150, deadline=None)
@given(sent=multi_part(), data=st.data())
def test_parts_in_order_with_duplicates_anywhere_later_reassemble_once(sent, data):
    """MQTT keeps a sender's order; a QoS 1 duplicate may turn up at any later point of
    the transfer (one after it completed is a re-send: see the test below)."""
    payload, parts = sent
    assert all(len(p.to_payload()) <= 4096 for p in parts)
    arrival = list(parts)
    for _ in range(data.draw(st.integers(0, 5))):
        original = data.draw(st.integers(0, len(parts) - 2))
        last = arrival.index(parts[-1])
        arrival.insert(data.draw(st.integers(arrival.index(parts[original]) + 1, last)),
                       parts[original])
    r = reassembler()
    results = [r.offer("dev0", part, now=0.0, wire_bytes=1) for part in arrival]
    done = [result for result in results if result is not None]
    assert len(done) == 1 and done[0].payload == payload
    assert done[0].wire_bytes == len(parts)  # each distinct part counted once
    assert (r.pending_bytes, r.reserved_bytes, r.pending_transfers) == (0, 0, 0)
    assert r.ignored_parts == len(arrival) - len(parts)


@settings(max_examples=200, deadline=None)
@given(sent=multi_part(), data=st.data())
def test_a_transfer_opens_only_at_part_zero_whatever_the_order(sent, data):
    """Any arrival order: each part ends stored, ignored or refused once, and the payload
    is rebuilt exactly when every part arrives again after a part 0 (a re-send fills
    gaps; parts before any part 0 are gone)."""
    payload, parts = sent
    arrival = data.draw(st.lists(st.sampled_from(parts), max_size=3 * len(parts)))
    r = reassembler()
    done, refused = [], 0
    for part in arrival:
        try:
            result = r.offer("dev0", part, now=0.0)
        except ProtocolError as exc:
            assert exc.reason == "incomplete" and part.index != 0
            refused += 1
            continue
        assert r.reserved_bytes in (0, len(payload)) and r.pending_bytes <= len(payload)
        if result is not None:
            done.append(result.payload)
    first_zero = next((i for i, p in enumerate(arrival) if p.index == 0), None)
    after = {p.index for p in arrival[first_zero:]} if first_zero is not None else set()
    assert bool(done) == (len(after) == len(parts))
    assert all(p == payload for p in done)
    # one refusal if the transfer was first heard of by another part; the rest quietly
    assert refused == (bool(arrival) and arrival[0].index != 0)


def test_many_parts_keep_under_the_limit_as_index_and_count_widen():
    """Past 127 and 255 parts msgpack needs wider integers: measured, not guessed."""
    payload = bytes(range(256)) * 300
    parts = parts_of(payload, 200)
    assert len(parts) > 256
    assert all(len(p.to_payload()) <= 200 for p in parts)
    # the room is used, less a few bytes reserved for the widest integers and bin header
    assert max(len(p.to_payload()) for p in parts) >= 200 - 8


def test_a_payload_that_fits_is_returned_unchanged():
    payload = b"x" * 1000
    assert split_payload(payload, max_payload=1000)[0] is payload


def test_a_limit_with_no_room_for_data_says_what_to_raise():
    with pytest.raises(ConfigError, match="raise max_payload"):
        split_payload(b"x" * 1000, max_payload=40)


def test_parts_of_two_senders_never_mix():
    r = reassembler()
    a, b = parts_of(b"a" * 5000, 1024), parts_of(b"b" * 5000, 1024)
    b = [dataclasses.replace(p, transfer_id=a[0].transfer_id) for p in b]  # same id
    for pa, pb in zip(a[:-1], b[:-1], strict=True):
        assert r.offer("dev0", pa, 0.0) is None
        assert r.offer("dev1", pb, 0.0) is None
    assert r.offer("dev1", b[-1], 0.0).payload == b"b" * 5000
    assert r.offer("dev0", a[-1], 0.0).payload == b"a" * 5000


def test_missing_part_times_out_and_frees_the_memory():
    r = reassembler()
    parts = parts_of(bytes(10_000), 1024)
    for part in parts[:-1]:
        assert r.offer("dev0", part, now=100.0) is None
    assert r.pending_bytes == 10_000 - len(parts[-1].data)
    assert r.reserved_bytes == 10_000 and r.pending_transfers == 1
    assert r.expire(now=100.0 + TIMEOUT_S) == 0  # not older than the timeout yet
    assert r.expire(now=100.0 + TIMEOUT_S + 0.1) == 1
    assert (r.pending_bytes, r.reserved_bytes, r.pending_transfers) == (0, 0, 0)
    # the missing part turning up late does not open a transfer that can only time out
    assert r.offer("dev0", parts[-1], now=111.0) is None
    assert r.pending_transfers == 0 and r.ignored_parts == 1
    # the device's re-send (same transfer id) starts it again and completes it
    results = [r.offer("dev0", part, now=140.0) for part in parts]
    assert results[-1].payload == bytes(10_000) and r.reserved_bytes == 0


def test_a_re_send_keeps_its_transfer_id_and_fills_the_gaps():
    payload = bytes(range(256)) * 40
    first, again = parts_of(payload, 1024), parts_of(payload, 1024)
    assert first == again  # the id comes from the payload: a re-send is the same transfer
    other = parts_of(payload + b"!", 1024)
    assert other[0].transfer_id != first[0].transfer_id
    r = reassembler()
    for part in first[:4] + first[6:8]:  # parts 4, 5 and the tail went missing
        assert r.offer("dev0", part, 0.0, wire_bytes=1) is None
    results = [r.offer("dev0", part, 1.0, wire_bytes=1) for part in again]
    assert [i for i, res in enumerate(results) if res is not None] == [len(again) - 1]
    assert results[-1].payload == payload and results[-1].wire_bytes == len(first)
    assert r.superseded == 0 and r.ignored_parts == 6  # the re-sent parts it already had
    # a re-send after completion (its receipt was lost) is rebuilt again, to be answered
    again_results = [r.offer("dev0", part, 2.0) for part in again]
    assert again_results[-1].payload == payload
    assert (r.pending_bytes, r.reserved_bytes, r.pending_transfers) == (0, 0, 0)


def test_a_transfer_that_keeps_getting_parts_does_not_time_out():
    r = reassembler()
    parts = parts_of(bytes(5000), 1024)
    for step, part in enumerate(parts[:-1]):
        r.offer("dev0", part, now=step * TIMEOUT_S * 0.9)
        assert r.expire(now=step * TIMEOUT_S * 0.9) == 0
    assert r.offer("dev0", parts[-1], now=len(parts) * TIMEOUT_S).payload == bytes(5000)


def test_corrupted_part_fails_the_hash_and_is_discarded():
    payload = bytes(range(256)) * 40
    parts = parts_of(payload, 1024)
    bad = parts[2]
    parts[2] = reencoded(bad, data=bytes([bad.data[0] ^ 1]) + bad.data[1:])
    r = reassembler()
    for part in parts[:-1]:
        r.offer("dev0", part, 0.0)
    with pytest.raises(ProtocolError, match="SHA-256") as info:
        r.offer("dev0", parts[-1], 0.0)
    assert info.value.reason == "bad_hash"
    assert (r.pending_bytes, r.reserved_bytes, r.pending_transfers) == (0, 0, 0)


@pytest.mark.parametrize("change", [
    {"count": 99}, {"size": 10_001}, {"sha256": hashlib.sha256(b"other").digest()},
])
def test_a_part_whose_manifest_disagrees_is_rejected(change):
    parts = parts_of(bytes(10_000), 1024)
    r = reassembler()
    r.offer("dev0", parts[0], 0.0)
    with pytest.raises(ProtocolError, match="earlier parts declared") as info:
        r.offer("dev0", reencoded(parts[1], **change), 0.0)
    assert info.value.reason == "bad_chunks"
    for part in parts[1:]:  # the honest parts still complete the transfer
        result = r.offer("dev0", part, 0.0)
    assert result is not None and result.payload == bytes(10_000)


def test_parts_carrying_more_than_the_declared_size_are_rejected():
    parts = parts_of(bytes(3000), 1024)
    r = reassembler()
    r.offer("dev0", reencoded(parts[0], data=bytes(2500)), 0.0)
    with pytest.raises(ProtocolError, match="more than the declared") as info:
        r.offer("dev0", reencoded(parts[1], data=bytes(1000)), 0.0)
    assert info.value.reason == "bad_chunks"
    assert r.pending_bytes <= 3000


def test_declared_sizes_beyond_the_cap_are_refused():
    r = reassembler(max_pending_bytes=8000)
    with pytest.raises(ProtocolError, match="max_pending_bytes") as info:
        r.offer("dev0", parts_of(bytes(9000), 1024)[0], 0.0)
    assert info.value.reason == "too_large"
    first, second = parts_of(bytes(5000), 1024), parts_of(bytes(5000), 1024)
    r.offer("dev0", first[0], 0.0)
    with pytest.raises(ProtocolError) as info:  # 5000 + 5000 pending would pass 8000
        r.offer("dev1", second[0], 0.0)
    assert info.value.reason == "too_large"
    assert r.reserved_bytes == 5000
    for part in first[1:]:
        r.offer("dev0", part, 0.0)
    assert r.reserved_bytes == 0  # room again once the first finished
    results = [r.offer("dev1", part, 0.0) for part in second]
    assert results[-1].payload == bytes(5000)


@pytest.mark.parametrize("payload", [b"", b"\xc1", b"garbage", msgpack.packb([1, 2]),
                                     msgpack.packb({"a": 1}), b"\x85" + b"\x00" * 3])
def test_garbage_is_a_protocol_error(payload):
    with pytest.raises(ProtocolError):
        Part.from_payload(payload)
    with pytest.raises(ProtocolError):
        peek_kind(payload)


VALID_PART = Part(transfer_id=b"\1" * 8, index=0, count=3, size=10, sha256=b"\0" * 32,
                  data=b"abc")


@pytest.mark.parametrize("change", [
    {"i": 3}, {"i": -1}, {"k": 0}, {"h": b"\0" * 31}, {"t": b""}, {"t": b"\0" * 17},
    {"n": 2}, {"d": b"x" * 11}, {"n": 1 << 40},
])
def test_part_fields_are_validated(change):
    body = msgpack.unpackb(VALID_PART.to_payload())
    body.update(change)
    with pytest.raises(ProtocolError) as info:
        Part.from_payload(msgpack.packb(body))
    assert info.value.reason == "bad_field"


def test_peek_kind_reads_the_kind_without_decoding_the_fields():
    part = parts_of(bytes(5000), 1024)[0]
    assert peek_kind(part.to_payload()) == "part"
    assert peek_kind(msgpack.packb({"x": b"\0" * 100, "$k": "upd"})) == "upd"
    with pytest.raises(ProtocolError, match="no message kind"):
        peek_kind(msgpack.packb({"$k": 7}))


@given(st.binary(max_size=512))
def test_random_bytes_never_escape_peek_kind_as_other_errors(data):
    """Garbage gives a kind string or a ProtocolError, never another exception."""
    try:
        kind = peek_kind(data)
    except ProtocolError as exc:
        assert exc.reason
    else:
        assert isinstance(kind, str)


def test_frame_is_shared_and_fits_any_message():
    """The model's chunks are cut by the same function (transfer.encode_model)."""
    from fedmq.core.protocol import ModelChunk

    chunks = frame(bytes(10_000), max_payload=1000,
                   make=lambda i, k, d: ModelChunk(version=7, index=i, count=k, data=d))
    assert all(len(c.to_payload()) <= 1000 for c in chunks)
    assert b"".join(c.data for c in chunks) == bytes(10_000)


def test_publish_overhead_counts_every_header_byte():
    # type+flags 1, remaining length up to 4, topic length 2 + 3, packet id 2, properties 1
    assert publish_overhead("a/b", qos=1) == 13
    assert publish_overhead("a/b", qos=0) == 11
    assert publish_overhead("é", qos=1) == 12  # UTF-8 bytes, not characters


def test_effective_max_payload_is_the_smaller_of_config_and_broker_limit():
    link = MqttLink(client_id="t", broker="mqtt://127.0.0.1:1", max_payload=100_000)
    assert link.effective_max_payload("a/b") == 100_000  # before any CONNACK
    link.max_packet_size = 65536
    assert link.effective_max_payload("a/b") == 65536 - 13
    link.max_packet_size = 1 << 20
    assert link.effective_max_payload("a/b") == 100_000


def test_every_link_backs_off_on_its_own_jittered_schedule():
    """After a broker restart a fleet must not reconnect in lockstep."""
    import fedmq.transport.mqtt as mqtt_module

    delays = {MqttLink(client_id=f"d{i}", broker="mqtt://127.0.0.1:1").reconnect_delays
              for i in range(20)}
    assert len(delays) == 20
    low, high = 1 - mqtt_module.RECONNECT_JITTER, 1 + mqtt_module.RECONNECT_JITTER
    for first, cap in delays:
        assert low * mqtt_module.RECONNECT_MIN_S <= first <= high * mqtt_module.RECONNECT_MIN_S
        assert cap / first == pytest.approx(mqtt_module.RECONNECT_MAX_S
                                            / mqtt_module.RECONNECT_MIN_S)


def test_one_sender_cannot_fill_the_budget_that_every_multi_part_update_needs():
    """A device starting transfer after transfer (one part each, each declaring a big size)
    keeps one open at a time; an honest device's transfer is still admitted."""
    budget = 10_000
    reassembler = Reassembler(timeout_s=60.0, max_pending_bytes=budget)
    for i in range(310):
        hostile = Part(transfer_id=i.to_bytes(8, "big"), index=0, count=2, size=budget // 2,
                       sha256=bytes(32), data=b"x")
        assert reassembler.offer("mallory", hostile, float(i)) is None
    assert reassembler.pending_transfers == 1 and reassembler.superseded == 309
    assert reassembler.reserved_bytes == budget // 2
    payload = bytes(range(200)) * 10
    parts = split_payload(payload, max_payload=600)
    results = [reassembler.offer("honest", Part.from_payload(p), 400.0) for p in parts]
    assert results[-1] is not None and results[-1].payload == payload


# -- admission: part 0 only, per-sender quota, fair shares ---------------------------------

def test_a_transfer_whose_part_zero_was_refused_reserves_nothing_and_is_refused_once():
    """Issue 13: a refused first part made every later part a new admission, each holding
    the whole declared size until the timeout; now the transfer is refused once, its
    other parts are ignored quietly, and the re-send starts cleanly."""
    r = reassembler(max_pending_bytes=12_000)
    first, second = parts_of(bytes(10_000), 1024), parts_of(b"\1" * 10_000, 1024)
    r.offer("dev0", first[0], 0.0)
    with pytest.raises(ProtocolError) as info:
        r.offer("dev1", second[0], 0.0)
    assert info.value.reason == "too_large"
    for part in first[1:]:  # dev0 completes, freeing the budget ...
        result = r.offer("dev0", part, 0.0)
    assert result.payload == bytes(10_000) and r.reserved_bytes == 0
    for part in second[1:]:  # ... but dev1's transfer stays closed: no part 0, no admission
        assert r.offer("dev1", part, 0.0) is None
    assert r.reserved_bytes == 0 and r.pending_transfers == 0
    assert r.ignored_parts == len(second) - 1
    results = [r.offer("dev1", part, 30.0) for part in second]  # the re-send
    assert results[-1].payload == b"\1" * 10_000


def test_a_part_of_a_transfer_never_seen_is_refused_once_as_incomplete():
    parts = parts_of(bytes(10_000), 1024)
    r = reassembler()
    with pytest.raises(ProtocolError, match="part 0 of its transfer never") as info:
        r.offer("dev0", parts[3], 0.0)
    assert info.value.reason == "incomplete"
    for part in parts[4:]:
        assert r.offer("dev0", part, 0.0) is None
    assert r.ignored_parts == len(parts) - 4 and r.reserved_bytes == 0


def test_the_automatic_budget_holds_a_share_for_every_awaited_sender_and_one_more():
    from fedmq.core.chunking import AUTO_BUDGET_FLOOR, SPARE_SHARES

    r = Reassembler(timeout_s=60.0)
    assert r.budget == AUTO_BUDGET_FLOOR  # nothing planned yet
    share = 40_065_536  # a 10M-parameter float32 update and its slack
    r.plan([f"dev{i}" for i in range(20)], share=share)
    assert r.budget == (20 + SPARE_SHARES) * share and r.held_bytes == 20 * share
    r.expect("dev20")  # came online in a round that asks everyone
    r.expect("dev20")
    assert r.budget == (21 + SPARE_SHARES) * share
    r.delivered("dev3")
    assert r.held_bytes == 20 * share and r.budget == (21 + SPARE_SHARES) * share
    r.plan(["a"], share=1000)  # a tiny model: the floor
    assert r.budget == AUTO_BUDGET_FLOOR
    fixed = Reassembler(timeout_s=60.0, max_pending_bytes=5000)
    fixed.plan([f"dev{i}" for i in range(20)], share=share)
    assert fixed.budget == 5000  # an explicit max_pending_bytes wins


def test_an_explicit_budget_too_small_for_the_cohort_admits_awaited_senders_first_come():
    share = 5000
    r = reassembler(max_pending_bytes=2 * share)
    honest = {f"dev{i}": parts_of(bytes([i]) * share, 1024) for i in range(3)}
    r.plan(honest, share=share)
    r.offer("dev0", honest["dev0"][0], 0.0)
    r.offer("dev1", honest["dev1"][0], 0.0)
    with pytest.raises(ProtocolError) as info:
        r.offer("dev2", honest["dev2"][0], 0.0)
    assert info.value.reason == "too_large"
    for part in honest["dev0"][1:]:
        r.offer("dev0", part, 0.0)
    r.delivered("dev0")
    results = [r.offer("dev2", part, 1.0) for part in honest["dev2"]]  # its re-send
    assert results[-1].payload == bytes([2]) * share


HONEST = 3
SHARE = 4000
HOSTILE = "mallory"


@st.composite
def hostile_moves(draw) -> list[tuple]:
    """What one hostile sender does: open transfers declaring any size (and fill them
    slowly or never), send stray parts of transfers it never opened, repeat itself."""
    moves = []
    for _ in range(draw(st.integers(1, 60))):
        kind = draw(st.sampled_from(["open", "fill", "stray", "again"]))
        if kind == "open":
            moves.append(("open", draw(st.integers(2, 3 * SHARE)), draw(st.integers(0, 9))))
        elif kind == "stray":
            moves.append(("stray", draw(st.integers(1, 5)), draw(st.binary(min_size=8,
                                                                          max_size=8))))
        else:
            moves.append((kind,))
    return moves


@settings(max_examples=150, deadline=None)
@given(moves=hostile_moves(), awaited_hostile=st.booleans(), data=st.data())
def test_one_hostile_sender_beside_honest_multi_part_devices_never_starves_them(
        moves, awaited_hostile, data):
    """Issue 17: each sender the round awaits is sure of its share. The budget is exactly
    the awaited senders' shares (the tightest an operator may set); the hostile sender is
    in the cohort (it may use its own share) or outside it (it may use nothing held)."""
    honest = {f"dev{i}": bytes([i]) * data.draw(st.integers(SHARE // 2, SHARE))
              for i in range(HONEST)}
    streams = {d: [("honest", p) for p in parts_of(payload, 600)]
               for d, payload in honest.items()}
    mallory: list[tuple] = []
    serial = itertools.count()
    current: list[Part] = []
    for move in moves:
        if move[0] == "open":
            size, filled = move[1], move[2]
            tid = next(serial).to_bytes(8, "big")
            count = min(size, 10)
            current = [Part(transfer_id=tid, index=i, count=count, size=size,
                            sha256=bytes(32), data=b"x") for i in range(count)]
            mallory.append(("hostile", current[0]))
            mallory.extend(("hostile", p) for p in current[1:1 + filled])
        elif move[0] == "stray":
            mallory.append(("hostile", Part(transfer_id=move[2], index=move[1], count=6,
                                            size=3 * SHARE, sha256=bytes(32), data=b"y")))
        elif move[0] == "again" and current:
            mallory.append(("hostile", current[0]))
    # an interleaving that keeps each sender's own order, as MQTT does
    queues = [*(list(s) for s in streams.values()), mallory]
    senders = [*honest, HOSTILE]
    awaited = senders if awaited_hostile else list(honest)
    r = Reassembler(timeout_s=60.0, max_pending_bytes=len(awaited) * SHARE)
    r.plan(awaited, share=SHARE)
    rebuilt: dict[str, bytes] = {}
    now = 0.0
    while any(queues):
        pick = data.draw(st.sampled_from([i for i, q in enumerate(queues) if q]))
        _, part = queues[pick].pop(0)
        now += 0.01
        try:
            result = r.offer(senders[pick], part, now)
        except ProtocolError as exc:
            assert senders[pick] == HOSTILE, f"honest {senders[pick]} refused: {exc}"
            continue
        assert r.reserved_bytes <= r.budget
        if result is not None:
            rebuilt[senders[pick]] = result.payload
            r.delivered(senders[pick])
    assert {d: rebuilt.get(d) for d in honest} == honest


def test_a_new_plan_evicts_outsiders_that_took_the_room_while_it_was_free():
    share = 5000
    r = reassembler(max_pending_bytes=2 * share)
    r.plan([], share=share)  # between rounds: nobody awaited, all the room is free
    stalled = Part(transfer_id=b"m" * 8, index=0, count=5, size=2 * share, sha256=bytes(32),
                   data=b"x")
    r.offer(HOSTILE, stalled, 0.0)
    r.plan(["dev0", "dev1"], share=share)
    assert r.evicted == 1 and r.reserved_bytes == 0 and r.held_bytes == 2 * share
    with pytest.raises(ProtocolError) as info:  # and it cannot come back into their room
        r.offer(HOSTILE, dataclasses.replace(stalled, transfer_id=b"n" * 8), 1.0)
    assert info.value.reason == "too_large"
    for device in ("dev0", "dev1"):
        payload = device.encode() * (share // 4)
        assert [r.offer(device, p, 1.0) for p in parts_of(payload, 1024)][-1].payload == payload
