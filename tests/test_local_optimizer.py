"""char_gru's local optimizer: plain SGD (the default) or Adam built fresh at every
train() call, so no optimizer state outlives a round; the model on the wire is the same."""

import numpy as np
import pytest

from fedmq.errors import ConfigError
from fedmq.models import build_model

from .test_char_loss import SMALL, _data


def _one_step(model, x, y, lr, **kwargs):
    before = model.get_flat()
    model.train(x, y, epochs=1, batch_size=len(x), lr=lr, rng=np.random.default_rng(0),
                max_steps=1, **kwargs)
    return model.get_flat() - before


def test_sgd_is_the_default_and_adam_keeps_the_layout():
    sgd = build_model("char_gru", SMALL, seed=1)
    adam = build_model("char_gru", {**SMALL, "optimizer": "adam"}, seed=1)
    assert sgd.optimizer == "sgd"
    assert adam.layout == sgd.layout  # the same model on the wire
    assert np.array_equal(adam.get_flat(), sgd.get_flat())


def test_adams_first_step_moves_every_touched_weight_by_about_lr():
    """Adam's first step is lr * g / (|g| + eps): ~lr for any gradient that is not tiny,
    where SGD's step is lr * g, its size the gradient's."""
    x, y = _data()
    lr = 1e-3
    delta = _one_step(build_model("char_gru", {**SMALL, "optimizer": "adam"}, seed=1), x, y, lr)
    assert np.abs(delta).max() <= lr * 1.001
    moved = np.abs(delta)[np.abs(delta) > 0]
    assert np.median(moved) == pytest.approx(lr, rel=0.05)
    sgd = _one_step(build_model("char_gru", SMALL, seed=1), x, y, lr)
    assert np.median(np.abs(sgd)[np.abs(sgd) > 0]) < lr / 10


def test_adam_state_is_fresh_every_round():
    """A second train() from the same weights repeats the first exactly: no moments are
    carried over from the earlier call (a round's update depends on its model only)."""
    x, y = _data()
    model = build_model("char_gru", {**SMALL, "optimizer": "adam"}, seed=1)
    start = model.get_flat()
    first = _one_step(model, x, y, 1e-2)
    model.set_flat(start)
    again = _one_step(model, x, y, 1e-2)
    assert np.array_equal(first, again)


def test_fedprox_still_pulls_towards_the_global_model():
    x, y = _data(n=200)
    model = build_model("char_gru", {**SMALL, "optimizer": "adam"}, seed=1)
    start = model.get_flat()
    model.train(x, y, epochs=5, batch_size=20, lr=1e-2, rng=np.random.default_rng(0))
    loose_drift = np.linalg.norm(model.get_flat() - start)
    model.set_flat(start)
    model.train(x, y, epochs=5, batch_size=20, lr=1e-2, rng=np.random.default_rng(0),
                prox_mu=10.0)
    assert np.linalg.norm(model.get_flat() - start) < loose_drift


def test_adam_lowers_the_training_loss():
    x, y = _data(n=200)
    model = build_model("char_gru", {**SMALL, "optimizer": "adam"}, seed=1)
    before = model.evaluate(x, y).loss
    model.train(x, y, epochs=10, batch_size=20, lr=1e-2, rng=np.random.default_rng(0))
    assert model.evaluate(x, y).loss < before - 0.5


def test_an_unknown_optimizer_is_refused():
    with pytest.raises(ConfigError, match="optimizer must be one of"):
        build_model("char_gru", {**SMALL, "optimizer": "adagrad"})


def test_the_aggregator_sets_it_in_the_announced_model_config():
    from aggregator.config import AggregatorConfig

    default = AggregatorConfig(task="keyboard").model_config()
    adam = AggregatorConfig(task="keyboard", local_optimizer="adam").model_config()
    assert adam == default | {"optimizer": "adam"}
    assert build_model("char_gru", adam).optimizer == "adam"
    for bad, match in [({"task": "keyboard", "local_optimizer": "adagrad"}, "one of sgd, adam"),
                       ({"task": "digits", "local_optimizer": "adam"}, "trains by SGD")]:
        with pytest.raises(ConfigError, match=match):
            AggregatorConfig(**bad)
