"""The server's ingest path (aggregator/ingest.py) as a pure unit: no broker, no thread."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from aggregator.config import AggregatorConfig
from aggregator.devices import DeviceRegistry
from aggregator.ingest import (
    SIZE_SLACK,
    Accepted,
    Rejected,
    UpdateIngest,
    UpdateLimits,
    check_sender,
    clip_factor,
    l2_norm,
)
from aggregator.rejections import LOG_EVERY, RejectionLog
from aggregator.selection import CohortPolicy
from fedmq.core import codecs
from fedmq.core.chunking import Reassembler, split_payload
from fedmq.core.codecs.pipeline import MAX_WEIGHTED_VALUE
from fedmq.core.protocol import DeviceStatus, EncodedTensor, FleetTopics, Part, Update
from fedmq.errors import ConfigError, ProtocolError

from .helpers import make_agents, make_aggregator, wait_for
from .test_rounds import machine

SIZE = 64
TOPICS = FleetTopics("test")


def update(values=None, *, codec="float32", samples=10, loss=0.5, device="d1", uid="u1",
           round=1, version=0) -> Update:
    values = np.zeros(SIZE, np.float32) if values is None else values
    return Update(device_id=device, update_id=uid, round=round, base_version=version,
                  num_samples=samples, loss=loss, layout_hash="lay",
                  delta=codecs.encode(np.asarray(values, np.float32), codec))


def ingest(*, registry: DeviceRegistry | None = None, rounds=None, **limits) -> UpdateIngest:
    return UpdateIngest(UpdateLimits(**limits), params=SIZE, topics=TOPICS,
                        registry=registry or DeviceRegistry(),
                        reassembler=Reassembler(timeout_s=60.0, max_pending_bytes=1 << 20),
                        machine=rounds or machine(size=SIZE, min_updates=3))


def screen(**limits) -> UpdateIngest:
    return ingest(**limits)


def reason(call) -> str:
    with pytest.raises(ProtocolError) as info:
        call()
    return info.value.reason


finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(values=hnp.arrays(np.float32, SIZE, elements=finite),
       bound=st.floats(1e-3, 1e4), policy=st.sampled_from(["clip", "reject"]))
def test_the_norm_bound_clips_to_the_bound_or_rejects_and_leaves_small_updates_alone(
        values, bound, policy):
    s = screen(max_update_norm=bound, norm_policy=policy)
    norm = l2_norm(values)
    u = update(values)
    if norm <= bound:
        assert np.array_equal(s.contents(u).delta, values)  # untouched, not even scaled
        assert s.clipped == 0
        return
    if policy == "reject":
        assert reason(lambda: s.contents(u)) == "norm_exceeded"
        return
    clipped = s.contents(u).delta
    assert l2_norm(clipped) <= bound * (1 + 1e-5)
    assert math.isclose(l2_norm(clipped), bound, rel_tol=1e-5)
    # same direction: a positive multiple of the original
    assert np.allclose(clipped, values * np.float32(bound / norm), rtol=1e-5, atol=1e-12)
    assert s.clipped == 1


@given(norm=st.floats(0, 1e30), bound=st.floats(1e-6, 1e30))
def test_clip_factor_never_grows_an_update(norm, bound):
    factor = clip_factor(norm, bound, "clip")
    assert 0 < factor <= 1
    assert norm * factor <= bound * (1 + 1e-12) or factor == 1.0


def test_l2_norm_does_not_overflow_in_float32():
    big = np.full(SIZE, 3e38, np.float32)
    assert math.isclose(l2_norm(big), 3e38 * 8, rel_tol=1e-6)


def test_values_whose_weighted_sum_would_overflow_are_out_of_range():
    s = screen(max_update_norm=1e38)  # the values are checked where the delta is decoded
    ok = MAX_WEIGHTED_VALUE / 10 * 0.99
    assert s.contents(update(np.full(SIZE, ok), samples=10)).delta is not None
    assert reason(lambda: s.contents(update(np.full(SIZE, ok), samples=11))) == "out_of_range"
    assert reason(lambda: s.contents(update(np.full(SIZE, 1e38), codec="q8"))) == "out_of_range"


def test_with_a_bound_contents_checks_codec_size_and_finiteness_before_any_sum():
    s = screen(max_update_norm=1e6)
    nan = np.zeros(SIZE, np.float32)
    nan[3] = np.nan
    raw = EncodedTensor(codec="f32", size=SIZE, data=nan.tobytes())
    assert reason(lambda: _replace(s, raw)) == "non_finite"
    wrong = EncodedTensor(codec="f32", size=SIZE + 1, data=b"\0" * 4 * (SIZE + 1))
    assert reason(lambda: _replace(s, wrong)) == "bad_shape"
    short = EncodedTensor(codec="f16", size=SIZE, data=b"\0" * 3)
    assert reason(lambda: _replace(s, short)) == "truncated"
    assert reason(lambda: _replace(s, EncodedTensor(codec="f64", size=SIZE, data=b""))) \
        == "unknown_codec"
    assert reason(lambda: s.contents(update(np.zeros(SIZE), loss=1e300, samples=10**10))) \
        == "non_finite"


def test_without_a_bound_the_delta_is_left_to_the_fold_and_not_decoded_twice():
    s = screen(norm_factor=0.0)  # no fixed and no adaptive bound
    raw = EncodedTensor(codec="f32", size=SIZE, data=np.full(SIZE, np.nan, "<f4").tobytes())
    u = dataclasses.replace(update(np.zeros(SIZE)), delta=raw)
    assert s.contents(u).delta is None  # not decoded here ...
    rejected = s.receive(TOPICS.update("d1"), u.to_payload(), 0.0)
    assert rejected == Rejected("non_finite", rejected.message, u)  # ... but by the fold
    assert s.machine.acc.count == 0 and not s.machine.acc.total.any()


def _replace(s: UpdateIngest, tensor: EncodedTensor):
    return s.contents(dataclasses.replace(update(np.zeros(SIZE)), delta=tensor))


def test_size_limits_cover_whole_payloads_and_declared_part_sizes():
    s = screen()
    topic = TOPICS.update("d1")
    assert s.max_bytes == 9 * SIZE + SIZE_SLACK
    assert s.receive(topic, b"x" * s.max_bytes, 0.0).reason == "malformed"  # size passed
    assert s.receive(topic, b"x" * (s.max_bytes + 1), 0.0).reason == "too_large"
    part = Part(transfer_id=b"t", index=0, count=2, size=s.max_bytes + 1, sha256=b"h" * 32,
                data=b"abc")
    assert s.receive(topic, part.to_payload(), 0.0).reason == "too_large"
    assert screen(max_update_bytes=100).max_bytes == 100


def test_every_honest_codec_fits_the_derived_size_limit():
    """The derived limit must never refuse an honest update, however it is encoded."""
    params = 5000
    limit = UpdateLimits().payload_limit(params)
    values = np.random.default_rng(0).normal(size=params).astype(np.float32)
    for codec in [*codecs.codec_names(), "top0.999+f32", "top0.5+f32+zlib"]:
        u = update(values, codec=codec)  # (error feedback is the device's business)
        assert len(u.to_payload()) <= limit, codec


def test_known_online_devices_pass_and_others_do_not():
    """No grace for a device gone offline: its last update is ahead of its offline status
    in the service's one inbox (see the service test below)."""
    registry = DeviceRegistry()
    registry.observe("pi1", DeviceStatus(device_id="pi1", online=True), now=0.0)
    registry.observe("pi2", DeviceStatus(device_id="pi2", online=False), now=0.0)
    check_sender("pi1", registry)
    assert reason(lambda: check_sender("pi2", registry)) == "offline_device"
    assert reason(lambda: check_sender("pi3", registry)) == "unknown_device"
    s = ingest(registry=registry)
    assert s.sender(TOPICS.update("pi3")) == "pi3"  # not required by default


@pytest.mark.parametrize(("overrides", "match"), [
    ({"max_update_norm": -1.0}, "max_update_norm"),
    ({"max_update_norm": float("nan")}, "max_update_norm"),
    ({"norm_policy": "shrink"}, "clip"),
    ({"max_update_bytes": -5}, "max_update_bytes"),
    ({"adaptive_norm_factor": 1.2}, "adaptive_norm_factor 1.2 must be 0"),
    ({"max_sample_factor": -1.0}, "max_sample_factor"),
    ({"max_model_growth": 0.5}, "max_model_growth 0.5 must be 0"),
    ({"max_model_growth": float("inf")}, "max_model_growth"),
])
def test_bad_limits_are_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        AggregatorConfig(**overrides)


def test_rejections_are_all_counted_but_logged_once_per_reason_and_source_then_sparsely(
        caplog):
    counter: Counter = Counter()
    rejections = RejectionLog(counter, logging.getLogger("test.rejections"), every=LOG_EVERY,
                              max_keys=3)
    with caplog.at_level(logging.WARNING, logger="test.rejections"):
        logged = [rejections.record("malformed", "a", "m") for _ in range(2 * LOG_EVERY)]
        rejections.record("too_large", "a", "t")
        rejections.record("malformed", "b", "m")
        for source in ("c", "d", "e"):  # past max_keys: new sources share one entry
            rejections.record("malformed", source, "m")
    assert counter == Counter(malformed=2 * LOG_EVERY + 4, too_large=1)
    assert sum(logged) == 3  # the first, the 1000th and the 2000th
    # malformed from a (3), too_large from a, malformed from b, and from the rest once
    assert len(caplog.records) == 3 + 1 + 1 + 1
    assert f"{LOG_EVERY} malformed rejections from a so far" in caplog.records[1].getMessage()


@pytest.mark.parametrize("policy", ["clip", "reject"])
def test_the_service_folds_a_clipped_update_or_nothing(tmp_path, stoppers, policy):
    """An over-norm update in a real service: scaled to the bound, or refused without a
    trace in the aggregate; a huge-valued one never reaches the sum."""
    service = make_aggregator("mqtt://127.0.0.1:1", tmp_path, stoppers, start=False,
                              max_update_norm=2.0, norm_policy=policy)
    stoppers(service.writer.close)
    size = service.model.layout.size
    topic = service.topics.update("dev0")
    layout = service.model.layout.hash
    big = Update(device_id="dev0", update_id="big", round=1, base_version=0, num_samples=4,
                 loss=0.1, delta=codecs.encode(np.full(size, 1.0, np.float32), "q8"),
                 layout_hash=layout)
    huge = Update(device_id="dev1", update_id="huge", round=1, base_version=0, num_samples=4,
                  loss=0.1, delta=codecs.encode(np.full(size, 1e37, np.float32)),
                  layout_hash=layout)
    _, receipt = service._handle_update(service.topics.update("dev1"), huge.to_payload())
    assert (receipt.status, receipt.reason) == ("rejected", "out_of_range")
    _, receipt = service._handle_update(topic, big.to_payload())
    acc = service.machine.acc
    if policy == "reject":
        assert (receipt.status, receipt.reason) == ("rejected", "norm_exceeded")
        assert acc.count == 0 and not acc.total.any()
        assert service.rejected == Counter(norm_exceeded=1, out_of_range=1)
    else:
        assert receipt.status == "accepted" and acc.count == 1 and service.ingest.clipped == 1
        assert math.isclose(l2_norm(acc.total / acc.weight), 2.0, rel_tol=1e-5)
        assert service.rejected == Counter(out_of_range=1)


@pytest.mark.integration
def test_with_require_known_devices_the_fleet_trains_and_strangers_are_refused(
        broker, tmp_path, stoppers):
    """Births reach the registry before the first update, so no honest update is lost."""
    from fedmq.transport.mqtt import MqttLink

    service = make_aggregator(broker.url, tmp_path, stoppers, rounds=2, min_updates=2,
                              require_known_devices=True)
    make_agents(broker.url, stoppers, 2)
    stranger = MqttLink(client_id="mallory", broker=broker.url)
    stranger.start()
    stoppers(stranger.stop)
    wait_for(stranger.subscribed.is_set, "the stranger's connection")
    size = service.model.layout.size
    forged = Update(device_id="mallory", update_id="m1", round=1, base_version=0,
                    num_samples=10, loss=0.1, delta=codecs.encode(np.ones(size, np.float32)))
    stranger.publish(service.topics.update("mallory"), forged.to_payload()).wait_for_publish(30)
    wait_for(service.finished.is_set, "2 rounds of known devices")
    wait_for(lambda: service.rejected["unknown_device"] == 1, "the stranger's refusal")
    assert all(r.participants == 2 for r in service.history)
    assert service.rejected == Counter(unknown_device=1)


# -- the order of the steps, and what each hands on --------------------------------------

def _ordered_cases():
    """(what is wrong, topic, payload, reason): each message also breaks every later step
    it can, so only the order makes its reason the first one."""
    nan = EncodedTensor(codec="f32", size=SIZE, data=np.full(SIZE, np.nan, "<f4").tobytes())
    big = 1e6 * np.ones(SIZE, np.float32)
    overflow = {"loss": 1e300, "samples": 10**10}
    huge = b"x" * (9 * SIZE + SIZE_SLACK + 1)
    declared = Part(transfer_id=b"t", index=0, count=2, size=10**7, sha256=b"h" * 32,
                    data=b"abc").to_payload()
    return [
        ("no device in the topic", "test/bogus", huge, "bad_topic"),
        ("a stranger", TOPICS.update("pi9"), huge, "unknown_device"),
        ("an offline device", TOPICS.update("pi8"), huge, "offline_device"),
        ("too big", TOPICS.update("pi1"), huge, "too_large"),
        ("not msgpack", TOPICS.update("pi1"), b"\xc1garbage", "malformed"),
        ("a Part declaring too much", TOPICS.update("pi1"), declared, "too_large"),
        ("another device's update", TOPICS.update("pi1"),
         dataclasses.replace(update(device="pi2", round=9), delta=nan).to_payload(),
         "wrong_topic"),
        ("outside the cohort", TOPICS.update("pi2"),
         dataclasses.replace(update(device="pi2", **overflow), delta=nan).to_payload(),
         "not_selected"),
        ("a loss x samples overflowing", TOPICS.update("pi1"),
         update(big, device="pi1", round=0, **overflow).to_payload(), "non_finite"),
        ("above the norm bound", TOPICS.update("pi1"),
         update(big, device="pi1", round=0).to_payload(), "norm_exceeded"),
        ("a closed round", TOPICS.update("pi1"),
         update(device="pi1", round=0).to_payload(), "stale_round"),
    ]


@pytest.mark.parametrize(("what", "topic", "payload", "expected"), _ordered_cases(),
                         ids=[case[0] for case in _ordered_cases()])
def test_each_step_refuses_with_its_own_reason_before_any_later_step(what, topic, payload,
                                                                     expected):
    registry = DeviceRegistry()
    for device, online in (("pi1", True), ("pi2", True), ("pi8", False)):
        registry.observe(device, DeviceStatus(device_id=device, online=online), now=0.0)
    rounds = machine(size=SIZE, min_updates=1,
                     cohort=CohortPolicy(clients_per_round=1, over_select=1.0))
    while rounds.plan(["pi1", "pi2"]) != ["pi1"]:  # a cohort of pi1 alone
        rounds.cohort = type(rounds.cohort)()
        rounds.seed += 1
    s = ingest(registry=registry, rounds=rounds, require_known_devices=True,
               max_update_norm=1.0, norm_policy="reject")
    result = s.receive(topic, payload, 0.0)
    assert isinstance(result, Rejected) and result.reason == expected, result
    # a receipt is owed only to a device that sent a parseable update on its own topic
    owed = expected in ("not_selected", "non_finite", "norm_exceeded", "stale_round")
    assert (result.update is not None) == owed
    assert rounds.acc.count == 0


def test_an_accepted_update_carries_its_wire_bytes_whole_or_in_parts():
    s = ingest()
    whole = update(np.ones(SIZE), device="a", uid="1")
    accepted = s.receive(TOPICS.update("a"), whole.to_payload(), 0.0)
    assert accepted == Accepted(whole, len(whole.to_payload()), counted=True)
    assert s.receive(TOPICS.update("a"), whole.to_payload(), 0.0) == Accepted(
        whole, len(whole.to_payload()), counted=False)  # a redelivery counts once
    chunked = update(np.ones(SIZE), device="b", uid="2")
    parts = split_payload(chunked.to_payload(), max_payload=120)
    assert len(parts) > 2
    results = [s.receive(TOPICS.update("b"), part, 1.0) for part in parts]
    assert results[:-1] == [None] * (len(parts) - 1)
    assert results[-1] == Accepted(chunked, sum(map(len, parts)), counted=True)


def test_a_re_sent_chunked_update_fills_the_gaps_and_counts_once():
    """A re-send keeps its transfer id: it completes the open transfer (no supersession)
    and, sent again after that (a lost receipt), is answered again but counted once."""
    rounds = machine(size=SIZE, min_updates=3)
    s = ingest(rounds=rounds)
    chunked = update(np.ones(SIZE), device="b", uid="2")
    parts = split_payload(chunked.to_payload(), max_payload=120)
    assert len(parts) > 4
    lost = {2, 3}  # the link dropped them
    for i, part in enumerate(parts):
        if i not in lost:
            assert s.receive(TOPICS.update("b"), part, 0.0) is None
    parts = split_payload(chunked.to_payload(), max_payload=120)  # as the outbox re-sends
    resend = [s.receive(TOPICS.update("b"), part, 1.0) for part in parts]
    assert [i for i, r in enumerate(resend) if r is not None] == [max(lost)]
    assert resend[max(lost)] == Accepted(chunked, sum(map(len, parts)), counted=True)
    assert s.reassembler.superseded == 0 and s.reassembler.pending_transfers == 0
    again = [s.receive(TOPICS.update("b"), part, 2.0) for part in parts]
    assert again[-1] == Accepted(chunked, sum(map(len, parts)), counted=False)
    assert rounds.open.count == 1


def test_reassembly_shares_are_held_for_the_awaited_devices_not_yet_counted():
    s = ingest()
    s.receive(TOPICS.update("a"), update(device="a", uid="1").to_payload(), 0.0)
    share = s.reassembly_share
    assert share == 4 * SIZE + 64 * 1024
    s.plan_reassembly(["a", "b", "c"])  # a's update already counted
    assert s.reassembler.held_bytes == 2 * share
    s.device_online("d")  # a round that asks everyone awaits a device that comes online
    assert s.reassembler.held_bytes == 3 * share
    s.receive(TOPICS.update("b"), update(device="b", uid="2").to_payload(), 0.0)
    assert s.reassembler.held_bytes == 2 * share  # counted: its share is free


class _CountingDecoder:
    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        real = codecs.decode_into

        def decode_into(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(codecs, "decode_into", decode_into)


@pytest.mark.parametrize("aggregation", ["mean", "median"])
@pytest.mark.parametrize("bound", [0.0, 4.0, 1000.0])  # off (no adaptive bound either),
# clipping, passing
def test_an_update_is_decoded_once_on_its_way_into_the_aggregate(monkeypatch, aggregation,
                                                                 bound):
    values = np.linspace(-1, 1, SIZE, dtype=np.float32)  # norm about 4.6
    s = ingest(rounds=machine(size=SIZE, min_updates=3, aggregation=aggregation),
               max_update_norm=bound, norm_factor=0.0 if bound == 0 else 5.0)
    sent = update(values, codec="q8")  # (stochastic rounding: encoded once)
    decoder = _CountingDecoder(monkeypatch)
    result = s.receive(TOPICS.update("d1"), sent.to_payload(), 0.0)
    assert isinstance(result, Accepted) and decoder.calls == 1
    assert s.clipped == (bound == 4.0)
    if aggregation == "mean":  # folded: the sum holds the (clipped) values x 10 samples
        expected = codecs.decode(sent.delta) * 10
        if bound == 4.0:
            expected *= 4.0 / l2_norm(expected / 10)
        assert np.allclose(s.machine.acc.total, expected, rtol=1e-4, atol=1e-5)
        assert s.machine.acc.weight == 10
    else:  # kept, encoded as it came unless clipped; decoded again only at close
        kept = s.machine.acc.tensors[0]
        assert (kept.codec == "f32") == (bound > 0)


def test_the_norm_bounded_fold_is_the_clipped_delta_not_a_reencoded_copy(monkeypatch):
    """Clipping scales the decoded buffer in place and folds it: no encode on the way."""
    payload = update(np.full(SIZE, 3.0, np.float32), samples=2).to_payload()
    encodes = []
    monkeypatch.setattr(codecs, "encode", lambda *a, **k: encodes.append(a))
    s = ingest(max_update_norm=1.0)
    assert isinstance(s.receive(TOPICS.update("d1"), payload, 0.0), Accepted)
    assert encodes == []
    assert math.isclose(l2_norm(s.machine.acc.total / 2), 1.0, rel_tol=1e-5)


def test_an_update_queued_before_its_devices_offline_status_is_accepted(tmp_path, stoppers):
    """Statuses and updates share the inbox: a clean stop's last update, sent before the
    offline status, is handled first; one sent after it is refused (no grace period)."""
    from aggregator.service import _Inbound

    service = make_aggregator("mqtt://127.0.0.1:1", tmp_path, stoppers, start=False,
                              require_known_devices=True)
    stoppers(service.writer.close)
    topics, layout = service.topics, service.model.layout.hash
    size = service.model.layout.size

    def status(online: bool) -> _Inbound:
        payload = DeviceStatus(device_id="pi1", online=online).to_payload()
        return _Inbound(topics.device_status("pi1"), payload, 0, 0, status=True)

    def sent(uid: str) -> _Inbound:
        u = Update(device_id="pi1", update_id=uid, round=1, base_version=0, num_samples=5,
                   loss=0.1, delta=codecs.encode(np.zeros(size, np.float32)),
                   layout_hash=layout)
        return _Inbound(topics.update("pi1"), u.to_payload(), 0, 0)

    service._process([status(True), sent("last"), status(False), sent("after")])
    service._commit()
    assert service.writer.flush(timeout=30)
    assert service.accepted == 1 and service.rejected == Counter(offline_device=1)
    assert not service.registry.devices["pi1"].online


def test_routine_refusals_are_logged_at_info_and_hostile_ones_at_warning(caplog):
    rejections = RejectionLog(Counter(), logging.getLogger("test.routine"))
    with caplog.at_level(logging.INFO, logger="test.routine"):
        rejections.record("stale_round", "a", "late: the round closed")
        rejections.record("malformed", "a", "garbage")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "late: the round closed"), (logging.WARNING, "garbage")]


# -- messages the caller reads itself (SecAgg+ in secure mode) -------------------------
def masked_input(size: int, device: str = "d1"):
    from fedmq.core.secagg import MaskedInput

    data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    return MaskedInput(device_id=device, round=1, session=bytes(16), data=data)


def test_unchunk_rebuilds_a_masked_input_from_its_parts_and_passes_the_rest_through():
    ing = ingest()
    payload = masked_input(10_000).to_payload()
    parts = split_payload(payload, max_payload=4096)
    assert len(parts) == 3
    results = [ing.unchunk("d1", p, 1.0) for p in parts]
    assert results[:-1] == [None, None]  # held until the transfer is whole
    assert results[-1].payload == payload
    assert results[-1].wire_bytes == sum(len(p) for p in parts)
    assert ing.unchunk("d1", parts[1], 1.0) is None  # a late duplicate: ignored quietly
    whole = ing.unchunk("d1", payload, 1.0)  # fits one message: as it is
    assert (whole.payload, whole.wire_bytes) == (payload, len(payload))
    assert ing.unchunk("d1", b"\x01garbage", 1.0).payload == b"\x01garbage"  # caller refuses
    # a re-send after completion opens the transfer again and is rebuilt again
    again = [ing.unchunk("d1", p, 2.0) for p in parts]
    assert again[-1] is not None and again[-1].payload == payload


def test_unchunk_applies_the_update_size_limit_and_part_checks():
    ing = ingest(max_update_bytes=8000)
    payload = masked_input(10_000).to_payload()
    with pytest.raises(ProtocolError) as whole:
        ing.unchunk("d1", payload, 1.0)
    assert whole.value.reason == "too_large"
    first = split_payload(payload, max_payload=4096)[0]
    with pytest.raises(ProtocolError) as declared:
        ing.unchunk("d1", first, 1.0)
    assert declared.value.reason == "too_large"
    later = split_payload(masked_input(5000).to_payload(), max_payload=4096)[1]
    with pytest.raises(ProtocolError) as orphan:
        ing.unchunk("d2", later, 1.0)
    assert orphan.value.reason == "incomplete"  # its part 0 never came


def test_a_masked_input_fits_the_reassembly_share_of_its_device():
    """The share each awaited device is sure of (4 bytes a parameter + SHARE_SLACK) holds
    a masked input of the widest field (4 bytes for each of params + 1 values), whatever
    the device's name and the round."""
    from fedmq.core.secagg import MaskedInput
    from fedmq.core.secagg.field import FIELD_BITS

    longest = MaskedInput(device_id="d" * 64, round=2**62, session=bytes(16), data=b"")
    envelope = len(longest.to_payload()) + 3  # the bin header grows from 2 to 5 bytes
    for params in (1, 4810, 1_000_000, 10_000_000):
        ing = UpdateIngest(UpdateLimits(), params=params, topics=TOPICS,
                           registry=DeviceRegistry(), machine=machine(size=1),
                           reassembler=Reassembler(timeout_s=60.0))
        assert envelope + max(FIELD_BITS) // 8 * (params + 1) <= ing.reassembly_share
