"""The update checks of aggregator/validation.py, without a broker."""

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
from aggregator.validation import (
    LOG_EVERY,
    MAX_WEIGHTED_VALUE,
    OFFLINE_GRACE_S,
    SIZE_SLACK,
    RejectionLog,
    UpdateLimits,
    UpdateScreen,
    check_sender,
    clip_factor,
    l2_norm,
)
from fedmq.core import codecs
from fedmq.core.protocol import DeviceStatus, EncodedTensor, Part, Update
from fedmq.errors import ConfigError, ProtocolError

from .helpers import make_agents, make_aggregator, wait_for

SIZE = 64


def update(values, *, codec="float32", samples=10, loss=0.5) -> Update:
    return Update(device_id="d1", update_id="u1", round=1, base_version=0, num_samples=samples,
                  loss=loss, delta=codecs.encode(np.asarray(values, np.float32), codec))


def screen(**limits) -> UpdateScreen:
    return UpdateScreen(UpdateLimits(**limits), params=SIZE, registry=DeviceRegistry())


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
        assert s.contents(u) is u  # untouched, not even re-encoded
        return
    if policy == "reject":
        assert reason(lambda: s.contents(u)) == "norm_exceeded"
        return
    clipped = codecs.decode(s.contents(u).delta)
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
    assert s.contents(update(np.full(SIZE, ok), samples=10)).num_samples == 10
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
    s = screen()
    raw = EncodedTensor(codec="f32", size=SIZE, data=np.full(SIZE, np.nan, "<f4").tobytes())
    u = dataclasses.replace(update(np.zeros(SIZE)), delta=raw)
    assert s.contents(u) is u  # decode_into refuses it (non_finite) when it is folded


def _replace(s: UpdateScreen, tensor: EncodedTensor) -> Update:
    return s.contents(dataclasses.replace(update(np.zeros(SIZE)), delta=tensor))


def test_size_limits_cover_whole_payloads_and_declared_part_sizes():
    s = screen()
    assert s.max_bytes == 9 * SIZE + SIZE_SLACK
    s.payload(b"x" * s.max_bytes)
    assert reason(lambda: s.payload(b"x" * (s.max_bytes + 1))) == "too_large"
    part = Part(transfer_id=b"t", index=0, count=2, size=s.max_bytes + 1, sha256=b"h" * 32,
                data=b"abc")
    assert reason(lambda: s.part(part)) == "too_large"
    assert screen(max_update_bytes=100).max_bytes == 100


def test_every_honest_codec_fits_the_derived_size_limit():
    """The derived limit must never refuse an honest update, however it is encoded."""
    params = 5000
    limit = UpdateLimits().payload_limit(params)
    values = np.random.default_rng(0).normal(size=params).astype(np.float32)
    for codec in [*codecs.codec_names(), "top0.999+f32", "top0.5+f32+zlib"]:
        u = update(values, codec=codec)  # (error feedback is the device's business)
        assert len(u.to_payload()) <= limit, codec


def test_known_devices_online_or_just_gone_pass_and_others_do_not():
    registry = DeviceRegistry()
    registry.observe("pi1", DeviceStatus(device_id="pi1", online=True), now=0.0)
    registry.observe("pi2", DeviceStatus(device_id="pi2", online=False), now=0.0)
    check_sender("pi1", registry, now=1000.0)
    check_sender("pi2", registry, now=OFFLINE_GRACE_S / 2)  # its last update may trail it
    assert reason(lambda: check_sender("pi2", registry, now=OFFLINE_GRACE_S + 1)) \
        == "offline_device"
    assert reason(lambda: check_sender("pi3", registry, now=0.0)) == "unknown_device"
    s = UpdateScreen(UpdateLimits(), params=SIZE, registry=registry)
    s.sender("pi3", now=0.0)  # not required by default


@pytest.mark.parametrize(("overrides", "match"), [
    ({"max_update_norm": -1.0}, "max_update_norm"),
    ({"max_update_norm": float("nan")}, "max_update_norm"),
    ({"norm_policy": "shrink"}, "clip"),
    ({"max_update_bytes": -5}, "max_update_bytes"),
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
        assert receipt.status == "accepted" and acc.count == 1 and service.screen.clipped == 1
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
