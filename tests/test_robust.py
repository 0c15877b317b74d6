"""Robust aggregation: coordinate-wise median and trimmed mean against corrupted updates."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from aggregator.config import AggregatorConfig
from aggregator.strategy import robust
from aggregator.strategy.accumulator import WeightedAccumulator
from aggregator.strategy.collectors import CoordinateMedian
from aggregator.strategy.robust import coordinate_median, trimmed_mean
from fedmq.core import codecs
from fedmq.core.protocol import EncodedTensor
from fedmq.errors import CodecError, ConfigError

from .test_rounds import machine, update

honest_values = st.floats(-1.0, 1.0, width=32)
attack_values = st.floats(float(np.float32(-1e30)), float(np.float32(1e30)), width=32)


@st.composite
def attacked(draw, *, max_bad_share: float):
    """(rows, honest rows): honest updates in [-1, 1], plus attackers' rows with any
    values, as many as keep them below `max_bad_share` of all rows, in any order."""
    size = draw(st.integers(1, 20))
    honest = draw(arrays(np.float32, (draw(st.integers(1, 9)), size), elements=honest_values))
    # the most attackers f with f < share * (honest + f)
    most = max(0, math.ceil(max_bad_share * len(honest) / (1 - max_bad_share)) - 1)
    bad = draw(arrays(np.float32, (draw(st.integers(0, most)), size), elements=attack_values))
    rows = np.concatenate([honest, bad])
    order = draw(st.permutations(range(len(rows))))
    return rows[list(order)], honest


def within_honest_range(result: np.ndarray, honest: np.ndarray) -> bool:
    return bool(np.all(result >= honest.min(axis=0) - 1e-6)
                and np.all(result <= honest.max(axis=0) + 1e-6))


@settings(max_examples=200)
@given(attacked(max_bad_share=0.5))
def test_the_median_stays_within_the_honest_range_while_attackers_are_a_minority(case):
    rows, honest = case
    assert within_honest_range(coordinate_median(rows), honest)


@settings(max_examples=200)
@given(attacked(max_bad_share=0.25))
def test_a_trimmed_mean_cutting_a_quarter_stays_within_the_honest_range(case):
    rows, honest = case
    assert within_honest_range(trimmed_mean(rows, 0.25), honest)


@given(arrays(np.float32, st.tuples(st.integers(1, 8), st.integers(1, 30)),
              elements=honest_values), st.integers(1, 7))
def test_no_trim_is_the_plain_mean_and_column_steps_change_nothing(rows, columns):
    assert np.allclose(trimmed_mean(rows, 0.0), rows.mean(axis=0), atol=1e-6)
    whole_median, whole_trimmed = coordinate_median(rows), trimmed_mean(rows, 0.2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(robust, "COLUMNS", columns)
        assert np.array_equal(coordinate_median(rows), whole_median)
        assert np.array_equal(trimmed_mean(rows, 0.2), whole_trimmed)


def test_the_collector_refuses_a_bad_update_at_once_and_survives_a_restart():
    collector = CoordinateMedian(4)
    for value in (1.0, 2.0, 50.0):
        collector.add_encoded(codecs.encode(np.full(4, value, np.float32), "q8"), 10.0)
    with pytest.raises(CodecError):
        collector.add_encoded(EncodedTensor(codec="q8", size=4, data=b"\x01"), 1.0)
    assert collector.count == 3
    restored = CoordinateMedian(4)
    restored.load_state_dict(collector.state_dict())
    assert np.allclose(restored.result(), 2.0, atol=0.02)  # q8 rounding, not the outlier
    with pytest.raises(ConfigError, match="collected for median"):
        WeightedAccumulator(4).load_state_dict(collector.state_dict())
    with pytest.raises(ConfigError, match="summed for the mean"):
        restored.load_state_dict(WeightedAccumulator(4).state_dict())


def test_a_round_closed_by_median_ignores_one_huge_update_and_sample_claims():
    m = machine(min_updates=4, aggregation="median")
    for device, value, samples in (("a", 1.0, 5), ("b", 1.1, 5), ("c", 0.9, 5),
                                   ("evil", 1000.0, 10_000)):
        m.offer(update(device, delta=np.full(4, value, np.float32), samples=samples))
    m.close(now=1.0)
    assert np.allclose(m.params, 1.05, atol=1e-6)  # median of 0.9, 1, 1.1, 1000


@pytest.mark.parametrize(("settings", "message"), [
    ({"aggregation": "geomed"}, "aggregation 'geomed' must be bulyan, centered_clip, krum"),
    ({"aggregation": "trimmed_mean", "trim_fraction": 0.5}, "trim_fraction 0.5"),
    ({"aggregation": "median", "dp_noise_multiplier": 1.0}, "differential privacy works on"),
])
def test_bad_robust_settings_are_config_errors(settings, message):
    with pytest.raises(ConfigError, match=message):
        AggregatorConfig(**settings)


def test_a_simulated_fleet_with_an_attacker_trains_with_the_median_not_the_mean(tmp_path):
    """One of six devices sends its delta reversed and scaled by 10: the unbounded mean
    follows it, the median does not, and the default adaptive norm bound (which clips
    the attacker to 5x the typical norm) saves the mean part of the way (all runs
    deterministic for this seed)."""
    from simulator.fleet import Simulation, SimulationConfig

    accuracy = {}
    unbounded = {"adaptive_norm_factor": 0.0}
    for name, options in (("mean", unbounded),
                          ("median", {**unbounded, "aggregation": "median"}),
                          ("bounded mean", {})):
        config = SimulationConfig(devices=6, rounds=5, model="logreg", epochs=2, lr=0.1,
                                  byzantine=1, seed=0, timeout_s=120, **options)
        with Simulation(config, workdir=tmp_path / name.replace(" ", "-")) as sim:
            accuracy[name] = sim.wait().final_accuracy
    assert accuracy["median"] > 0.4 and accuracy["median"] > accuracy["mean"] + 0.15
    assert accuracy["bounded mean"] > accuracy["mean"] + 0.1


def test_a_median_round_survives_a_restart_through_the_checkpoint_store(tmp_path):
    from aggregator.checkpoint import CheckpointStore

    m = machine(min_updates=3, aggregation="median")
    for device, value in (("a", 1.0), ("b", 3.0)):
        m.offer(update(device, delta=np.full(4, value, np.float32)))
    store = CheckpointStore(tmp_path / "agg.ckpt")
    store.save({"machine": m.state_dict(), "history": []})
    m.offer(update("c", delta=np.full(4, 2.0, np.float32)))
    store.save({"machine": m.state_dict(), "history": []})  # journaled, not whole
    store.close()
    resumed = machine(min_updates=3, aggregation="median")
    resumed.load_state_dict(CheckpointStore(tmp_path / "agg.ckpt").load()["machine"], now=1.0)
    assert resumed.acc.count == 3
    resumed.close(now=2.0)
    assert np.allclose(resumed.params, 2.0)


@pytest.mark.parametrize(("settings", "message"), [
    ({"aggregation": "median", "min_updates": 3, "mode": "async"}, "needs sync rounds"),
    ({"aggregation": "median", "min_updates": 3, "late_updates": "fold"}, "needs sync rounds"),
    ({"aggregation": "median", "min_updates": 2}, "the median of 2 updates is their mean"),
    ({"aggregation": "trimmed_mean", "min_updates": 9}, "cuts nothing from a round of 9"),
])
def test_robust_rules_refuse_rounds_they_cannot_protect(settings, message):
    with pytest.raises(ConfigError, match=message):
        AggregatorConfig(**settings)


def test_a_trimmed_mean_configured_by_the_aggregator_cuts_its_share():
    policy = AggregatorConfig(aggregation="trimmed_mean", trim_fraction=0.25,
                              min_updates=4).policy()
    assert (policy.aggregation, policy.trim_fraction) == ("trimmed_mean", 0.25)
    m = machine(min_updates=4, aggregation="trimmed_mean", trim_fraction=0.25)
    for device, value in (("a", 0.9), ("b", 1.0), ("c", 1.1), ("evil", 1000.0)):
        m.offer(update(device, delta=np.full(4, value, np.float32)))
    m.close(now=1.0)
    assert np.allclose(m.params, 1.05, atol=1e-6)  # one cut from each end: (1.0 + 1.1) / 2
    assert robust.trimmed_count(0.29, 100) == 29  # not 28: 0.29 * 100 is 28.999...


def test_an_empty_open_round_lets_the_aggregation_change_on_restart():
    mean_machine = machine(min_updates=3)
    for device in ("a", "b", "c"):
        mean_machine.offer(update(device))
    mean_machine.close(now=1.0)  # the checkpoint now holds an empty mean round
    switched = machine(min_updates=3, aggregation="median")
    switched.load_state_dict(mean_machine.state_dict(), now=2.0)
    assert switched.acc.count == 0 and switched.version == 1
    back = machine(min_updates=3)
    back.load_state_dict(switched.state_dict(), now=3.0)
    assert back.version == 1
