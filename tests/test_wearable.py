"""The wearable task: seglearn's smartwatch shoulder exercises, one subject per device,
read from the installed package with numpy alone, and trained over a real mosquitto."""

import numpy as np
import pytest

from fedmq.errors import ConfigError
from fedmq.tasks import device_shards, fleet_test_set, split_task, task_spec, wearable
from simulator.fleet import Simulation, SimulationConfig


def test_the_data_ships_in_the_package_and_splits_in_time():
    recordings = wearable.load_recordings()
    assert len(recordings) == wearable.RECORDINGS
    assert {r.subject for r in recordings} == set(range(1, wearable.SUBJECTS + 1))
    assert {r.label for r in recordings} == set(range(len(wearable.CLASSES)))
    train, test = split_task("wearable", seed=0)
    spec = task_spec("wearable")
    assert train.x.shape[1:] == test.x.shape[1:] == spec.shape == (6, wearable.WINDOW)
    assert train.x.dtype == np.float32 and np.isfinite(train.x).all()
    # Standardised with the training part's statistics.
    assert np.allclose(train.x.mean(axis=(0, 2)), 0, atol=0.1)
    # Every class in both parts, and no held-out window equals a training window.
    assert set(np.unique(train.y)) == set(np.unique(test.y)) == set(range(7))
    seen = {w.tobytes() for w in train.x}
    assert not any(w.tobytes() in seen for w in test.x)


def test_one_subject_per_device_and_the_largest_fleet_is_named():
    (_, _, subjects), _ = wearable.split(test_fraction=0.2)
    shards = device_shards("wearable", device_count=10, alpha=0.5, seed=3)
    assert sum(len(s) for s in shards) == len(subjects)
    # Each device's windows are one subject's: the shard sizes are the subjects' sizes.
    assert sorted(map(len, shards)) == sorted(np.bincount(subjects)[1:].tolist())
    assert sum(len(s) for s in device_shards("wearable", device_count=4, alpha=0,
                                              seed=0)) == len(subjects)
    with pytest.raises(ConfigError, match="largest fleet it allows is 10"):
        device_shards("wearable", device_count=11, alpha=0.5, seed=0)


@pytest.mark.integration
@pytest.mark.timeout(600)  # generous for a busy 2-core host
def test_wearable_trains_over_a_real_broker(broker, tmp_path):
    """5 devices (two subjects each), 3 rounds of one local epoch (the task's default is
    5; kept short for the suite): well above chance on the subjects' later repetitions
    (7 exercises: chance is ~15%; centralised: ~95%)."""
    test = fleet_test_set("wearable", device_count=5, seed=0)
    assert np.bincount(test.y).max() / len(test.y) < 0.2
    config = SimulationConfig(task="wearable", devices=5, rounds=3, seed=0, broker=broker.url,
                              epochs=1, timeout_s=600)
    with Simulation(config, workdir=tmp_path / "sim") as sim:
        result = sim.wait()
        assert sim.aggregator.config.model_name == "har_cnn"
    assert [r.participants for r in result.rounds] == [5] * 3
    assert not result.rejected
    assert result.final_accuracy >= 0.50  # 0.63-0.65 measured (seeds 0, 1)
