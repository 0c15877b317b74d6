"""Aggregation math against direct computation: weighted averaging and the server optimizers."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from aggregator.strategy.accumulator import WeightedAccumulator
from aggregator.strategy.optimizers import ServerOptConfig, create_optimizer, optimizer_names
from fedmq.core import codecs
from fedmq.core.protocol import EncodedTensor
from fedmq.errors import CodecError, ConfigError

values = st.floats(-100, 100, allow_nan=False, width=32)


@settings(max_examples=50)
@given(st.data())
def test_streaming_mean_equals_weighted_average(data):
    size = data.draw(st.integers(1, 40))
    k = data.draw(st.integers(1, 12))
    deltas = [data.draw(arrays(np.float32, size, elements=values)) for _ in range(k)]
    weights = [data.draw(st.integers(1, 5000)) for _ in range(k)]
    acc = WeightedAccumulator(size)
    for delta, w in zip(deltas, weights, strict=True):
        acc.add_encoded(codecs.encode(delta, "float32"), w)
    expected = sum(w * d.astype(np.float64) for w, d in zip(weights, deltas, strict=True))
    expected /= sum(weights)
    assert acc.count == k
    assert np.allclose(acc.mean(), expected, rtol=1e-4, atol=1e-3)


def test_fedavg_step_equals_mcmahan_formula():
    """w_{t+1} = sum_k n_k/n w^k_{t+1}, computed from deltas against w_t."""
    rng = np.random.default_rng(0)
    w_t = rng.normal(size=100).astype(np.float32)
    client_models = [w_t + rng.normal(size=100).astype(np.float32) for _ in range(5)]
    n = np.array([10, 200, 35, 1, 77])
    acc = WeightedAccumulator(100)
    for w_k, n_k in zip(client_models, n, strict=True):
        acc.add(w_k - w_t, float(n_k))
    new = create_optimizer(ServerOptConfig(name="fedavg")).step(w_t, acc.mean())
    direct = sum(n_k / n.sum() * w_k.astype(np.float64)
                 for w_k, n_k in zip(client_models, n, strict=True))
    assert np.allclose(new, direct, atol=1e-5)


def test_mean_over_nothing_is_refused():
    with pytest.raises(ValueError, match="over nothing"):
        WeightedAccumulator(3).mean()


def test_non_finite_update_leaves_no_trace():
    acc = WeightedAccumulator(3)
    acc.add(np.ones(3, np.float32), 2.0)
    bad = EncodedTensor(codec="f32", size=3,
                        data=np.array([1.0, np.nan, 0.0], np.float32).tobytes())
    with pytest.raises(CodecError) as info:
        acc.add_encoded(bad, 5.0)
    assert info.value.reason == "non_finite"
    assert acc.count == 1 and acc.weight == 2.0
    assert np.array_equal(acc.mean(), np.ones(3))


def test_accumulator_state_round_trip():
    acc = WeightedAccumulator(4)
    acc.add(np.arange(4, dtype=np.float32), 3.0)
    other = WeightedAccumulator(4)
    other.load_state_dict(acc.state_dict())
    assert np.array_equal(other.mean(), acc.mean()) and other.count == 1
    with pytest.raises(ValueError):
        WeightedAccumulator(5).load_state_dict(acc.state_dict())


def _reference(name: str, c: ServerOptConfig, x, deltas):
    """Reddi et al. 2021, Algorithm 2, written out longhand."""
    lr = c.lr
    m = np.zeros_like(x, dtype=np.float64)
    v = np.full_like(x, c.tau**2, dtype=np.float64)
    x = x.astype(np.float64)
    for d in deltas:
        if name == "fedavg":
            x = x + lr * d
            continue
        if name == "fedavgm":
            m = c.momentum * m + d
            x = x + lr * m
            continue
        m = c.beta1 * m + (1 - c.beta1) * d
        if name == "fedadagrad":
            v = v + d * d
        elif name == "fedadam":
            v = c.beta2 * v + (1 - c.beta2) * d * d
        elif name == "fedyogi":
            v = v - (1 - c.beta2) * d * d * np.sign(v - d * d)
        x = x + lr * m / (np.sqrt(v) + c.tau)
    return x


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi"])
def test_server_optimizers_follow_their_formulas(name):
    rng = np.random.default_rng(1)
    config = ServerOptConfig(name=name, lr=0.3, momentum=0.8, beta1=0.85, beta2=0.95, tau=0.01)
    x0 = rng.normal(size=64).astype(np.float32)
    deltas = [rng.normal(scale=0.1, size=64) for _ in range(6)]
    opt = create_optimizer(config)
    x = x0
    for d in deltas:
        x = opt.step(x, d.astype(np.float32))
    assert np.allclose(x, _reference(name, config, x0, deltas), atol=1e-4)


def test_optimizer_state_survives_restart_and_refuses_other_optimizer():
    rng = np.random.default_rng(2)
    x = rng.normal(size=8).astype(np.float32)
    d1, d2 = (rng.normal(size=8).astype(np.float32) for _ in range(2))
    a = create_optimizer(ServerOptConfig(name="fedadam"))
    x1 = a.step(x, d1)
    b = create_optimizer(ServerOptConfig(name="fedadam"))
    b.load_state_dict(a.state_dict())
    assert np.array_equal(a.step(x1, d2), b.step(x1, d2))
    with pytest.raises(ConfigError, match="fedadam"):
        create_optimizer(ServerOptConfig(name="fedyogi")).load_state_dict(a.state_dict())


def test_registry():
    assert optimizer_names() == ["fedadagrad", "fedadam", "fedavg", "fedavgm", "fedyogi"]
    with pytest.raises(ConfigError, match="choose one of"):
        create_optimizer(ServerOptConfig(name="sgd"))
    with pytest.raises(ConfigError):
        create_optimizer(ServerOptConfig(name="fedavg", lr=-1))


def test_config_rejects_unknown_optimizer_and_model_at_load():
    from aggregator.config import AggregatorConfig
    from fedmq.config import load_config

    with pytest.raises(ConfigError, match="choose one of"):
        load_config(AggregatorConfig, None, {"optimizer": "sgd"})
    with pytest.raises(ConfigError, match="unknown model"):
        load_config(AggregatorConfig, None, {"model": "resnet"})
