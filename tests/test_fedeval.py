"""Federated evaluation and personalization, the pure parts: the layout mask, the
selection of evaluating devices, the EvalReport's checks, the evaluation pool's
weighted means, ingest's rejections, the device machine's Evaluate decisions, the
local held-out split and the personal layers' state."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.devices import DeviceRegistry
from aggregator.evaluation import EvalPool, fleet_fields, fleet_score, weighted_mean
from aggregator.ingest import Evaluated, Rejected, UpdateIngest, UpdateLimits
from aggregator.records import RoundRecord
from edge_agent.personal import PersonalLayers
from fedmq import storage
from fedmq.core import codecs
from fedmq.core.chunking import Reassembler
from fedmq.core.device import (
    AnnouncementIn,
    DeviceMachine,
    Evaluate,
    Report,
    SitOut,
    Train,
)
from fedmq.core.device import (
    Evaluated as EvaluatedEvent,
)
from fedmq.core.layout import LayoutMask, ParamLayout
from fedmq.core.protocol import (
    PROTOCOL_VERSION,
    DeviceStatus,
    EvalMetrics,
    EvalReport,
    FleetTopics,
    ModelAnnouncement,
    TaskConfig,
    evaluates,
)
from fedmq.core.transfer import chunk_tensor, encode_model
from fedmq.errors import ConfigError, ProtocolError
from fedmq.storage import StateError
from fedmq.tasks import Dataset
from fedmq.tasks.holdout import local_holdout

from .test_rounds import machine

LAYOUT = ParamLayout((("body.w", (3, 2)), ("body.b", (2,)), ("out.w", (2, 4)),
                      ("out.b", (4,))))


# -- the layout mask ---------------------------------------------------------------------
def test_mask_splits_personal_tensors_and_hashes_the_shared_layout():
    mask = LayoutMask(LAYOUT, ("out.*",))
    assert mask.shared.entries == LAYOUT.entries[:2]
    assert mask.personal.entries == LAYOUT.entries[2:]
    assert mask.shared.size == 8 and mask.personal.size == 12
    assert mask.shared.hash != LAYOUT.hash
    flat = np.arange(LAYOUT.size, dtype=np.float32)
    np.testing.assert_array_equal(mask.take_shared(flat), flat[:8])
    np.testing.assert_array_equal(mask.take_personal(flat), flat[8:])
    # no patterns: everything federates, under the model's own hash
    whole = LayoutMask(LAYOUT)
    assert whole.shared.hash == LAYOUT.hash and whole.personal.size == 0


@pytest.mark.parametrize("patterns", [("head.*",), ("*",), ("body.*", "out.*")])
def test_mask_refuses_patterns_that_match_nothing_or_everything(patterns):
    with pytest.raises(ProtocolError):
        LayoutMask(LAYOUT, patterns)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([n for n, _ in LAYOUT.entries]), min_size=1, max_size=3,
                unique=True).filter(lambda names: len(names) < len(LAYOUT.entries)),
       st.integers(0, 2**32 - 1))
def test_mask_merge_inverts_the_split(names, seed):
    mask = LayoutMask(LAYOUT, tuple(names))
    flat = np.random.default_rng(seed).normal(size=LAYOUT.size).astype(np.float32)
    shared, personal = mask.take_shared(flat), mask.take_personal(flat)
    assert shared.size == mask.shared.size and personal.size == mask.personal.size
    np.testing.assert_array_equal(mask.merge(shared=shared, personal=personal), flat)
    # the shared values, in order, are exactly the shared sub-layout's tensors
    split = mask.shared.split(shared)
    full = LAYOUT.split(flat)
    for name, values in split.items():
        np.testing.assert_array_equal(values, full[name])


# -- who evaluates ----------------------------------------------------------------------
def test_evaluates_picks_about_the_fraction_and_a_fresh_draw_per_model():
    ids = [f"dev{i}" for i in range(2000)]
    for fraction in (0.1, 0.5):
        picked = [d for d in ids if evaluates(d, 7, fraction)]
        assert abs(len(picked) / len(ids) - fraction) < 0.05
    assert {d for d in ids if evaluates(d, 7, 0.3)} != {d for d in ids if evaluates(d, 8, 0.3)}
    assert not any(evaluates(d, 7, 0.0) for d in ids)
    assert all(evaluates(d, 7, 1.0) for d in ids)


# -- the message -----------------------------------------------------------------------------
def report(device="d1", *, version=0, round=1, samples=10, loss=0.5, accuracy=0.75,
           personal=None) -> EvalReport:
    return EvalReport(device_id=device, round=round, version=version, num_samples=samples,
                      metrics=EvalMetrics(loss=loss, accuracy=accuracy), personal=personal)


@pytest.mark.parametrize(("fields", "reason"), [
    ({"loss": float("nan")}, "non_finite"), ({"loss": float("inf")}, "non_finite"),
    ({"accuracy": 1.5}, "out_of_range"), ({"accuracy": -0.1}, "out_of_range"),
    ({"accuracy": float("nan")}, "out_of_range"), ({"samples": 0}, "bad_samples"),
])
def test_eval_report_refuses_bad_values_with_a_reason(fields, reason):
    with pytest.raises(ProtocolError) as info:
        report(**fields)
    assert info.value.reason == reason


def test_eval_report_round_trips_and_omits_what_it_does_not_carry():
    plain = report()
    assert EvalReport.from_payload(plain.to_payload()) == plain
    personal = report(personal=EvalMetrics(loss=0.3, accuracy=None))
    assert EvalReport.from_payload(personal.to_payload()) == personal
    assert len(personal.to_payload()) > len(plain.to_payload())


def test_announcement_omits_evaluation_and_personal_fields_at_their_defaults():
    info, _ = encode_model(np.zeros(4, np.float32), codec="float32", version=0)
    base = dict(fleet="f", version=0, round=1, model="mlp", model_config={},
                layout=[], layout_hash="x", task=TaskConfig(), payload=info)
    plain = ModelAnnouncement(**base)
    asked = ModelAnnouncement(**base, evaluate=0.25, personal=("out.*",), finetune_steps=5)
    assert b"ev" not in plain.to_payload() and b"pl" not in plain.to_payload()
    assert ModelAnnouncement.from_payload(asked.to_payload()) == asked
    with pytest.raises(ProtocolError):
        ModelAnnouncement(**base, evaluate=1.5)


# -- the pool and its means ----------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.integers(1, 10_000)), min_size=1, max_size=30))
def test_fleet_accuracy_is_the_example_weighted_mean(scores):
    reports = [report(f"d{i}", accuracy=a, samples=n) for i, (a, n) in enumerate(scores)]
    score = fleet_score(3, reports)
    assert score is not None and score.devices == len(scores)
    assert score.samples == sum(n for _, n in scores)
    expected = sum(a * n for a, n in scores) / sum(n for _, n in scores)
    assert score.accuracy == pytest.approx(expected, abs=1e-9)
    assert min(a for a, _ in scores) - 1e-9 <= score.accuracy <= max(a for a, _ in scores) + 1e-9
    # pooling every example of every device gives the same share of correct answers
    correct = sum(round(a * n) for a, n in scores)
    assert abs(correct / score.samples - score.accuracy) <= 0.5 * len(scores) / score.samples


def test_weighted_mean_of_nothing_is_none():
    assert weighted_mean([]) is None
    assert fleet_score(0, []) is None


def test_pool_keeps_one_report_per_device_of_the_current_model():
    pool = EvalPool()
    pool.offer(report("a", accuracy=1.0, samples=30, version=2), version=2, open_round=3)
    pool.offer(report("b", accuracy=0.0, samples=10, version=2,
                      personal=EvalMetrics(loss=0.1, accuracy=1.0)), version=2, open_round=3)
    with pytest.raises(ProtocolError) as dup:
        pool.offer(report("a", version=2), version=2, open_round=3)
    assert dup.value.reason == "duplicate"
    score = pool.close(2)
    assert score.accuracy == pytest.approx(0.75) and score.devices == 2
    assert score.personal_accuracy == pytest.approx(1.0)  # only b personalizes
    record = RoundRecord(round=3, version=3, accuracy=None, loss=None, train_loss=0.0,
                         participants=0, samples=0, bytes_up=0, model_bytes=0, wall_s=0.0,
                         **fleet_fields(score))
    assert RoundRecord.from_json(record.to_json()) == record
    assert pool.close(3) is None  # the next model: nothing reported yet


def test_pool_state_round_trips_through_a_state_file_and_refuses_garbage(tmp_path):
    pool = EvalPool()
    pool.offer(report("a", accuracy=1.0, samples=30, version=2), version=2, open_round=3)
    pool.offer(report("b", accuracy=0.0, samples=10, version=2,
                      personal=EvalMetrics(loss=0.1, accuracy=1.0)), version=2, open_round=3)
    storage.save_state(tmp_path / "s", {"evaluations": pool.state_dict()})
    restored = EvalPool()
    restored.load_state_dict(storage.load_state(tmp_path / "s")["evaluations"])
    assert restored.reports == pool.reports and restored.accepted == 2
    with pytest.raises(ProtocolError) as dup:  # still one report per device
        restored.offer(report("a", version=2), version=2, open_round=3)
    assert dup.value.reason == "duplicate"
    assert restored.close(2) == pool.close(2)
    for bad in ({}, {"version": 2, "accepted": 1, "reports": [b"junk"]},
                {"version": 3, "accepted": 1, "reports": [report("a", version=2).to_payload()]}):
        with pytest.raises(StateError):
            EvalPool().load_state_dict(bad)


@pytest.mark.parametrize(("version", "round", "reason"), [
    (1, 3, "stale_eval"), (3, 3, "future_round"), (2, 4, "future_round")])
def test_pool_refuses_reports_of_another_model(version, round, reason):
    with pytest.raises(ProtocolError) as info:
        EvalPool().offer(report(version=version, round=round), version=2, open_round=3)
    assert info.value.reason == reason


# -- ingest -------------------------------------------------------------------------------------
TOPICS = FleetTopics("test")


def eval_ingest(fraction=1.0, *, known=("d1",), examples=100) -> UpdateIngest:
    registry = DeviceRegistry()
    for device in known:
        registry.observe(device, DeviceStatus(device_id=device, online=True,
                                              capabilities={"examples": examples}), now=0.0)
    return UpdateIngest(UpdateLimits(), params=4, topics=TOPICS, registry=registry,
                        reassembler=Reassembler(timeout_s=60.0, max_pending_bytes=1 << 20),
                        machine=machine(), evaluations=EvalPool(), evaluate_fraction=fraction)


def test_ingest_takes_an_asked_report_without_a_receipt():
    ingest = eval_ingest()
    result = ingest.receive(TOPICS.update("d1"), report().to_payload(), 1.0)
    assert isinstance(result, Evaluated) and result.report.device_id == "d1"
    assert ingest.evaluations.close(0).accuracy == pytest.approx(0.75)


def _nan_payload() -> bytes:
    import msgpack

    body = report().to_wire()
    body["g"]["l"] = math.nan
    return msgpack.packb({**body, "$v": PROTOCOL_VERSION, "$k": "eval"})


@pytest.mark.parametrize(("topic_device", "payload", "ingest_options", "reason"), [
    ("d2", report("d2").to_payload(), {}, "eval_unknown_device"),
    ("d2", report("d1").to_payload(), {"known": ("d1", "d2")}, "eval_wrong_topic"),
    ("d1", report().to_payload(), {"fraction": 0.0}, "eval_not_selected"),
    ("d1", report(version=1).to_payload(), {}, "eval_future_round"),
    ("d1", report(samples=101).to_payload(), {}, "eval_bad_samples"),
    ("d1", _nan_payload(), {}, "non_finite"),
])
def test_ingest_refuses_bad_reports_with_typed_reasons(topic_device, payload, ingest_options,
                                                       reason):
    result = eval_ingest(**ingest_options).receive(TOPICS.update(topic_device), payload, 1.0)
    assert isinstance(result, Rejected) and result.reason == reason
    assert result.receipt() is None  # an evaluation is never receipted


def test_ingest_refuses_a_report_when_the_aggregator_asked_for_none():
    ingest = UpdateIngest(UpdateLimits(), params=4, topics=TOPICS, registry=DeviceRegistry(),
                          reassembler=Reassembler(timeout_s=60.0, max_pending_bytes=1 << 20),
                          machine=machine())
    ingest.registry.observe("d1", DeviceStatus(device_id="d1", online=True), now=0.0)
    result = ingest.receive(TOPICS.update("d1"), report().to_payload(), 1.0)
    assert isinstance(result, Rejected) and result.reason == "eval_not_selected"


# -- the device machine ---------------------------------------------------------------------
def announcement(*, cohort=None, evaluate=0.0, version=1) -> bytes:
    """An announcement whose model travels inline: a device holds it at once."""
    info, _ = chunk_tensor(codecs.encode(np.zeros(4, np.float32), "float32"),
                           version=version, inline_max=1 << 20)
    return ModelAnnouncement(fleet="f", version=version, round=version, model="m",
                             model_config={}, layout=[["w", [4]]], layout_hash="x",
                             task=TaskConfig(), payload=info, cohort=cohort,
                             evaluate=evaluate).to_payload()


def device(name="d1") -> DeviceMachine:
    return DeviceMachine(device_id=name, fleet="f", resend_after_s=30.0)


def kinds(decisions) -> list[type]:
    return [type(d) for d in decisions if isinstance(d, (Evaluate, Train, SitOut))]


def test_device_evaluates_before_training_when_picked():
    d = device()
    decisions = d.handle(AnnouncementIn(announcement(evaluate=1.0), now=0.0))
    assert kinds(decisions) == [Evaluate, Train]
    assert kinds(device().handle(AnnouncementIn(announcement(), now=0.0))) == [Train]
    # the report goes up on the device's update topic, once
    out = d.handle(EvaluatedEvent(report("d1"), now=1.0))
    assert len(out) == 1 and isinstance(out[0], Report)
    assert out[0].topic == d.update_topic and EvalReport.from_payload(out[0].payload)
    assert not len(d.outbox)  # no receipt awaited


def test_device_outside_the_cohort_downloads_only_to_evaluate():
    picked = [f"d{i}" for i in range(40) if evaluates(f"d{i}", 1, 0.5)]
    skipped = [f"d{i}" for i in range(40) if not evaluates(f"d{i}", 1, 0.5)]
    payload = announcement(cohort=["someone-else"], evaluate=0.5)
    assert kinds(device(picked[0]).handle(AnnouncementIn(payload, now=0.0))) == [Evaluate,
                                                                                  SitOut]
    assert kinds(device(skipped[0]).handle(AnnouncementIn(payload, now=0.0))) == [SitOut]


# -- the device's own data and state ----------------------------------------------------------
def test_local_holdout_of_text_windows_is_the_later_text_after_a_gap():
    ids = np.arange(200, dtype=np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(ids, 8)[:-1]
    train, held = local_holdout(Dataset(windows, ids[8:]), 0.25, seed=0)
    assert held is not None and len(held) == round(len(windows) * 0.25)
    assert train.x.max() < held.x.min()  # no character in both
    rows = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    train, held = local_holdout(Dataset(rows, np.arange(40)), 0.25, seed=3)
    assert len(held) == 10 and len(train) == 30
    assert not set(train.y) & set(held.y)
    assert local_holdout(Dataset(rows, np.arange(40)), 0.0, seed=0)[1] is None
    assert local_holdout(Dataset(rows[:1], np.arange(1)), 0.5, seed=0)[1] is None
    with pytest.raises(ConfigError):
        local_holdout(Dataset(rows, np.arange(40)), 1.0, seed=0)


def test_personal_layers_start_from_the_announced_model_then_keep_their_own():
    mask = LayoutMask(LAYOUT, ("out.*",))
    layers = PersonalLayers()
    announced = np.zeros(LAYOUT.size, np.float32)
    np.testing.assert_array_equal(layers.start(mask, announced), announced)
    trained = np.arange(LAYOUT.size, dtype=np.float32)
    layers.keep(mask, trained)
    nxt = np.full(LAYOUT.size, -1.0, np.float32)
    start = layers.start(mask, nxt)
    np.testing.assert_array_equal(mask.take_shared(start), mask.take_shared(nxt))
    np.testing.assert_array_equal(mask.take_personal(start), mask.take_personal(trained))
    restored = PersonalLayers()
    restored.load_state_dict(layers.state_dict())
    np.testing.assert_array_equal(restored.start(mask, nxt), start)
    # other patterns (or another layout): the announced values again
    other = LayoutMask(LAYOUT, ("out.b",))
    np.testing.assert_array_equal(restored.start(other, nxt), nxt)


@pytest.mark.parametrize("state", [
    {}, {"revision": 2, "layout": "", "patterns": [], "rounds": 0,
         "values": np.zeros(0, np.float32)},
    {"revision": 1, "layout": "x", "patterns": ["o"], "rounds": 1,
     "values": np.array([np.nan], np.float32)},
    {"revision": 1, "layout": "x", "patterns": "o", "rounds": 1,
     "values": np.zeros(2, np.float32)},
])
def test_personal_layers_refuse_a_bad_state(state):
    with pytest.raises(StateError):
        PersonalLayers().load_state_dict(state)


# -- a user's task: its Trainer scores and personalizes like a bundled model ----------------
BLOBS = "tests.user_tasks.numpy_task:BlobsTask"


def blobs_round(**announced):
    """A user task's device shard (loading the task first), its model, the model's
    parameters, and a round-1 announcement of them with `announced` fields."""
    from fedmq.models import build_model
    from fedmq.tasks import device_shard

    data = device_shard(BLOBS, device_index=0, device_count=2, alpha=0.0, seed=0)
    model = build_model(BLOBS, {})
    params = model.get_flat()
    info, _ = encode_model(params, codec="float32", version=0)
    a = ModelAnnouncement(fleet="f", version=0, round=1, model=model.name, model_config={},
                          layout=model.layout.to_wire(), layout_hash=model.layout.hash,
                          task=TaskConfig(epochs=1, batch_size=16, lr=0.2), payload=info,
                          **announced)
    return data, model, params, a


def test_a_user_task_scores_personalizes_and_sends_only_its_shared_arrays():
    from edge_agent.agent import LocalTrainer
    from fedmq.core.transfer import ReceivedModel

    task = BLOBS
    data, model, params, a = blobs_round(evaluate=1.0, personal=("b",), finetune_steps=5)
    trainer = LocalTrainer(device_id="d0", data=data, codec="float32", seed=1, task=task,
                           holdout=0.25)
    assert len(trainer.eval_data) == round(len(data) * 0.25)
    assert len(trainer.data) + len(trainer.eval_data) == len(data)
    received = ReceivedModel(a, params, 0)
    report = trainer.evaluate(received)
    assert report.num_samples == len(trainer.eval_data)
    assert report.personal is not None and report.personal.accuracy > report.metrics.accuracy
    update = trainer.train(received)
    mask = LayoutMask(model.layout, ("b",))
    assert update.layout_hash == mask.shared.hash != model.layout.hash
    assert update.delta.size == mask.shared.size == params.size - 4
    assert trainer.personal.values is not None and trainer.personal.values.size == 4


def test_the_aggregator_config_checks_evaluation_and_personal_layers():
    from aggregator.config import AggregatorConfig

    config = AggregatorConfig(personal_layers="w2, b*", evaluate_fraction=0.5)
    assert config.personal_patterns() == ("w2", "b*")
    with pytest.raises(ConfigError, match="matches none of the model's tensors"):
        AggregatorConfig(personal_layers="head.*")
    with pytest.raises(ConfigError, match="nothing would be federated"):
        AggregatorConfig(personal_layers="*")
    with pytest.raises(ConfigError, match="evaluate_fraction"):
        AggregatorConfig(evaluate_fraction=1.5)
    with pytest.raises(ConfigError, match="one central aggregator"):
        AggregatorConfig(role="worker", personal_layers="w2")
    with pytest.raises(ConfigError, match="one central aggregator"):
        AggregatorConfig(role="worker", evaluate_fraction=0.5)
