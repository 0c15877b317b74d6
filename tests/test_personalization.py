"""Personalization's options, the pure parts: fine-tuning's own learning rate and early
stopping (finetune_lr, finetune_check), FedRep's phases (personal_steps) and the frozen
training under them (edge_agent.personal.train_part)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from aggregator.config import AggregatorConfig
from edge_agent.agent import LocalTrainer
from edge_agent.personal import train_part
from fedmq.core.layout import LayoutMask
from fedmq.core.protocol import ModelAnnouncement, TaskConfig
from fedmq.core.transfer import ReceivedModel, encode_model
from fedmq.errors import ConfigError, ProtocolError
from fedmq.models import build_model
from fedmq.tasks import partition, split_task

from .test_fedeval import BLOBS, blobs_round

TASK = TaskConfig(epochs=1, batch_size=16, lr=0.2, max_steps=10)
CONFIG = {"inputs": 64, "classes": 10, "hidden": 16}


def digits_mlp():
    return build_model("mlp", CONFIG)


def device_data(index=0, devices=4):
    train, _ = split_task("digits", seed=0)
    return train.subset(partition(train.y, devices=devices, alpha=0.1, seed=0)[index])


def received(model, **fields) -> ReceivedModel:
    params = model.get_flat()
    info, _ = encode_model(params, codec="float32", version=0)
    a = ModelAnnouncement(fleet="f", version=0, round=1, model=model.name,
                          model_config=CONFIG,
                          layout=model.layout.to_wire(), layout_hash=model.layout.hash,
                          task=TASK, payload=info, **fields)
    return ReceivedModel(a, params, 0)


def trainer(**options) -> LocalTrainer:
    return LocalTrainer(device_id="d0", data=device_data(), codec="float32", seed=1,
                        **options)


# -- the wire and the config ------------------------------------------------------------------
def test_announcement_carries_the_new_fields_and_omits_them_at_their_defaults():
    model = digits_mlp()
    plain = received(model).announcement
    for key in (b"fl", b"fc", b"ps"):
        assert key not in plain.to_payload()
    asked = dataclasses.replace(plain, personal=("w2",), finetune_steps=5, finetune_lr=0.01,
                                finetune_check=2, personal_steps=3)
    assert ModelAnnouncement.from_payload(asked.to_payload()) == asked
    for bad in (dict(finetune_lr=-1.0), dict(finetune_lr=float("nan")),
                dict(finetune_check=-1), dict(personal_steps=3),  # no personal layers
                dict(personal=("w2",), personal_steps=100_001)):
        with pytest.raises(ProtocolError):
            dataclasses.replace(plain, **bad)


@pytest.mark.parametrize(("options", "message"), [
    (dict(finetune_steps=5, finetune_lr=-0.1), "finetune_lr"),
    (dict(finetune_steps=5, finetune_lr=float("inf")), "finetune_lr"),
    (dict(finetune_lr=0.1), "set finetune_steps too"),
    (dict(finetune_check=5), "set finetune_steps too"),
    (dict(finetune_steps=5, finetune_check=-1), "finetune_check"),
    (dict(personal_steps=5), "set personal_layers too"),
    (dict(personal_layers="w2", personal_steps=-1), "personal_steps"),
])
def test_the_aggregator_config_checks_the_personalization_options(options, message):
    with pytest.raises(ConfigError, match=message):
        AggregatorConfig(**options)
    AggregatorConfig(personal_layers="w2,b2", personal_steps=5, finetune_steps=10,
                     finetune_lr=0.01, finetune_check=5)


# -- frozen training --------------------------------------------------------------------------
def test_train_part_holds_the_frozen_values_and_trains_the_rest():
    model, data = digits_mlp(), device_data()
    mask = LayoutMask(model.layout, ("w2", "b2"))
    start = model.get_flat()
    result = train_part(model, data.x, data.y, frozen=mask.index, epochs=3, batch_size=16,
                        lr=0.2, rng=np.random.default_rng(0), max_steps=7)
    after = model.get_flat()
    np.testing.assert_array_equal(after[mask.index], start[mask.index])
    assert not np.allclose(after[~mask.index], start[~mask.index])
    assert result.steps == 7 and not result.complete and result.num_samples == 7 * 16
    with pytest.raises(ValueError, match="bools"):
        train_part(model, data.x, data.y, frozen=np.zeros(3, bool), epochs=1, batch_size=16,
                   lr=0.2, rng=np.random.default_rng(0))


def test_train_part_with_nothing_frozen_is_the_backends_sgd_fedprox_included():
    data = device_data()
    ours, theirs = digits_mlp(), digits_mlp()
    # whole-batch epochs: both take the same steps, whatever order each draws
    kwargs = dict(epochs=3, batch_size=len(data), lr=0.1, prox_mu=0.5)
    train_part(ours, data.x, data.y, frozen=np.zeros(ours.layout.size, bool),
               rng=np.random.default_rng(0), **kwargs)
    theirs.train(data.x, data.y, rng=np.random.default_rng(0), **kwargs)
    np.testing.assert_allclose(ours.get_flat(), theirs.get_flat(), rtol=1e-5, atol=1e-6)


# -- fine-tuning ----------------------------------------------------------------------------
def test_finetune_lr_sets_the_rate_and_zero_means_the_tasks():
    model = digits_mlp()
    at = {}
    for lr in (0.0, TASK.lr, 0.001):
        at[lr] = trainer().personalize(received(model, finetune_steps=10, finetune_lr=lr))
    np.testing.assert_array_equal(at[0.0], at[TASK.lr])
    start = model.get_flat()
    # a hundredth of the rate moves the model about a hundredth as far
    assert (np.linalg.norm(at[0.001] - start)
            < 0.05 * np.linalg.norm(at[TASK.lr] - start))


def test_finetune_check_keeps_the_announced_model_when_fine_tuning_only_hurts():
    model = digits_mlp()
    device = trainer()
    start = model.get_flat()
    wild = received(model, finetune_steps=6, finetune_lr=50.0)  # diverges
    assert not np.allclose(device.personalize(wild), start)
    checked = dataclasses.replace(wild.announcement, finetune_check=2)
    np.testing.assert_array_equal(device.personalize(ReceivedModel(checked, start, 0)), start)


def test_finetune_check_keeps_a_fine_tuned_model_that_helps():
    model = digits_mlp()
    device = trainer(holdout=0.25)
    report = device.evaluate(received(model, finetune_steps=40, finetune_check=10))
    assert not np.allclose(device.personalized, model.get_flat())  # it did fine-tune
    assert report.personal.accuracy > report.metrics.accuracy


# -- FedRep -----------------------------------------------------------------------------------
def test_fedrep_trains_the_head_alone_then_the_body_with_the_head_frozen():
    model = digits_mlp()
    mask = LayoutMask(model.layout, ("w2", "b2"))
    start = model.get_flat()
    device = trainer()
    update = device.train(received(model, personal=("w2", "b2"), personal_steps=4))
    assert update.layout_hash == mask.shared.hash and update.delta.size == mask.shared.size
    # the same head phase by hand, then nothing: the body phase left the head alone
    by_hand = digits_mlp()
    rng = np.random.default_rng([device.seed, 1])
    train_part(by_hand, device.data.x, device.data.y, frozen=mask.index, epochs=1000,
               batch_size=TASK.batch_size, lr=TASK.lr, rng=rng, max_steps=4)
    np.testing.assert_array_equal(device.personal.values, mask.take_personal(by_hand.get_flat()))
    assert not np.allclose(device.personal.values, mask.take_personal(start))


def test_fedrep_refits_the_personal_layers_to_the_announced_model_before_scoring():
    model = digits_mlp()
    mask = LayoutMask(model.layout, ("w2", "b2"))
    start = model.get_flat()
    fedper = trainer().personalize(received(model, personal=("w2", "b2")))
    np.testing.assert_array_equal(fedper, start)  # nothing trained yet: as announced
    device = trainer(holdout=0.25)
    report = device.evaluate(received(model, personal=("w2", "b2"), personal_steps=30))
    refit = device.personalized
    np.testing.assert_array_equal(refit[mask.index], start[mask.index])  # body as announced
    assert not np.allclose(refit[~mask.index], start[~mask.index])
    assert report.personal.accuracy > report.metrics.accuracy
    assert device.personal.values is None  # scoring keeps nothing: training does


def test_fedrep_and_checked_fine_tuning_work_around_a_users_trainer():
    data, model, params, a = blobs_round(personal=("b",), personal_steps=3,
                                         finetune_steps=6, finetune_check=2)
    device = LocalTrainer(device_id="d0", data=data, codec="float32", seed=1, task=BLOBS,
                          holdout=0.25)
    mask = LayoutMask(model.layout, ("b",))
    report = device.evaluate(ReceivedModel(a, params, 0))
    assert report.personal is not None
    update = device.train(ReceivedModel(a, params, 0))
    assert update.delta.size == mask.shared.size
    assert not np.allclose(device.personal.values, mask.take_personal(params))
