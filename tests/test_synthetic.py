"""The synthetic task: per-device generation from (seed, index), held-out data, learnability."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.errors import ConfigError
from fedmq.models import build_model
from fedmq.tasks import (
    TASKS,
    device_shard,
    device_shards,
    fleet_test_set,
    split_task,
    synthetic,
    task_spec,
)


def _same(a, b):
    return np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)


def test_a_device_is_the_same_in_any_fleet_and_for_any_seed_only_its_own():
    small = device_shards("synthetic", device_count=10, alpha=0.5, seed=4)
    huge = device_shard("synthetic", device_index=7, device_count=10_000, alpha=0.5, seed=4)
    assert _same(small[7], huge)
    assert _same(huge, device_shard("synthetic", device_index=7, device_count=8, alpha=0.0,
                                    seed=4))
    assert not _same(small[7], small[6])
    other_seed = device_shard("synthetic", device_index=7, device_count=10, alpha=0.5, seed=5)
    assert not np.array_equal(other_seed.y[:20], huge.y[:20])


def test_the_last_of_ten_thousand_devices_is_generated_on_its_own(monkeypatch):
    made = []
    real = synthetic.device_samples

    def counting(setting, *, seed, device):
        made.append(device)
        return real(setting, seed=seed, device=device)

    monkeypatch.setattr(synthetic, "device_samples", counting)
    shard = device_shard("synthetic", device_index=9_999, device_count=10_000, alpha=0.5,
                         seed=0)
    assert made == [9_999]
    size = synthetic.device_size(seed=0, device=9_999)
    assert len(shard) == size - max(1, round(size * 0.2))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), device=st.integers(0, 10**6),
       alpha=st.sampled_from([0.0, 0.5, 1.0, 2.5]), beta=st.sampled_from([0.0, 0.5, 1.0]),
       test_fraction=st.sampled_from([0.1, 0.2, 0.5]))
def test_every_device_has_well_formed_data_split_once(seed, device, alpha, beta,
                                                       test_fraction):
    setting = synthetic.Synthetic(alpha=alpha, beta=beta)
    x, y = synthetic.device_samples(setting, seed=seed, device=device)
    n = synthetic.device_size(seed=seed, device=device)
    assert synthetic.MIN_SAMPLES <= n <= synthetic.MAX_SAMPLES
    assert x.shape == (n, synthetic.DIM) and x.dtype == np.float32 and np.isfinite(x).all()
    assert y.shape == (n,) and y.dtype == np.int64 and 0 <= y.min() <= y.max() < 10
    (tx, ty), (hx, hy) = synthetic.device_split(setting, seed=seed, device=device,
                                                test_fraction=test_fraction)
    assert np.array_equal(np.concatenate([tx, hx]), x) and np.array_equal(
        np.concatenate([ty, hy]), y)
    assert len(hy) == max(1, round(n * test_fraction))
    again = synthetic.device_samples(setting, seed=seed, device=device)
    assert np.array_equal(again[0], x) and np.array_equal(again[1], y)


def _label_mixes(name, devices=40):
    shards = device_shards(name, device_count=devices, alpha=0.5, seed=0)
    return np.array([np.bincount(s.y, minlength=10) / len(s) for s in shards])


def _pairwise_tv(mixes):
    return np.mean([0.5 * np.abs(a - b).sum() for i, a in enumerate(mixes) for b in mixes[:i]])


def test_devices_differ_in_labels_unless_iid_and_beta_moves_their_inputs():
    iid, zero, one = (_pairwise_tv(_label_mixes(n))
                      for n in ("synthetic-iid", "synthetic-0-0", "synthetic"))
    # Each device's own W_k skews its labels at any alpha, beta (measured 0.13 vs ~0.88).
    assert iid < 0.25 and zero > 0.6 and one > 0.6
    # beta spreads the devices' input means: about sqrt(beta^2 + 1/60) across devices.

    def mean_spread(name):
        return np.std([s.x.mean() for s in device_shards(name, device_count=40, alpha=0,
                                                         seed=0)])

    assert mean_spread("synthetic-0-0") < 0.3 < 0.6 < mean_spread("synthetic-1-1")


def test_alpha_alone_never_changes_a_label_as_in_fedprox():
    """u_k adds the same amount to every class's logit: documented, not a bug of ours."""
    for device in range(5):
        a = synthetic.device_samples(synthetic.Synthetic(0, 0.5), seed=1, device=device)
        b = synthetic.device_samples(synthetic.Synthetic(3, 0.5), seed=1, device=device)
        assert np.array_equal(a[1], b[1])


def test_task_names_choose_the_setting():
    assert synthetic.parse("synthetic") == synthetic.Synthetic(1.0, 1.0)
    assert synthetic.parse("synthetic-0.5-2") == synthetic.Synthetic(0.5, 2.0)
    assert synthetic.parse("synthetic-iid").iid and synthetic.parse("digits") is None
    for name in ("synthetic", "synthetic-0.5-0.5", "synthetic-0-0", "synthetic-iid"):
        assert name in TASKS
    spec = task_spec("synthetic-0.25-3")
    assert spec.name == "synthetic-0.25-3" and spec.model == "logreg"
    assert spec.model_config() == {"inputs": 60, "classes": 10}
    for bad in ("synthetic-1", "synthetic--1-1", "synthetic-a-b"):
        with pytest.raises(ConfigError, match=r"synthetic-<alpha>-<beta>"):
            task_spec(bad)
    with pytest.raises(ConfigError, match="device index"):
        device_shard("synthetic", device_index=3, device_count=3, alpha=0, seed=0)


def test_the_fleet_is_scored_on_held_out_samples_of_its_own_devices():
    shards = device_shards("synthetic", device_count=5, alpha=0.5, seed=2)
    test = fleet_test_set("synthetic", device_count=5, seed=2)
    held = [synthetic.device_split(synthetic.Synthetic(), seed=2, device=k,
                                   test_fraction=0.2)[1] for k in range(5)]
    assert np.array_equal(test.y, np.concatenate([y for _, y in held]))
    train_rows = {row.tobytes() for s in shards for row in s.x}
    assert not train_rows & {row.tobytes() for row in test.x}
    # A big fleet is scored on its first TEST_DEVICES devices, as the standalone server is.
    big = fleet_test_set("synthetic", device_count=10_000, seed=2)
    assert _same(big, split_task("synthetic", seed=2)[1])
    assert len(big) == sum(max(1, round(synthetic.device_size(seed=2, device=k) * 0.2))
                           for k in range(synthetic.TEST_DEVICES))


def test_fedavg_on_synthetic_learns_far_above_chance():
    """30 devices, 10 rounds of FedAvg with the task's defaults: measured 65.6% (chance
    is 10%, the most common test label 20%)."""
    spec = task_spec("synthetic")
    shards = device_shards("synthetic", device_count=30, alpha=0.5, seed=0)
    test = fleet_test_set("synthetic", device_count=30, seed=0)
    model = build_model("logreg", spec.model_config())
    start = model.evaluate(test.x, test.y).accuracy
    for r in range(10):
        flat, total = model.get_flat(), np.zeros_like(model.get_flat())
        for i, shard in enumerate(shards):
            model.set_flat(flat)
            model.train(shard.x, shard.y, epochs=spec.epochs, batch_size=spec.batch_size,
                        lr=spec.lr, max_steps=spec.max_steps,
                        rng=np.random.default_rng(100 * r + i))
            total += len(shard) * model.get_flat()
        model.set_flat(total / sum(map(len, shards)))
    accuracy = model.evaluate(test.x, test.y).accuracy
    assert accuracy > 0.55 > start + 0.3
    assert accuracy > np.bincount(test.y).max() / len(test) + 0.3
