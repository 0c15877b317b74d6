"""Each bundled task trains for a few rounds over a real mosquitto, torch models included."""

import numpy as np
import pytest

from fedmq.tasks import fleet_test_set
from simulator.fleet import Simulation, SimulationConfig

pytestmark = pytest.mark.integration


def majority_baseline(task: str, devices: int) -> float:
    """Accuracy of always predicting the test set's most frequent class (for keyboard, the
    unigram baseline: the space character, ~19%)."""
    test = fleet_test_set(task, device_count=devices, seed=0)
    return float(np.bincount(test.y).max() / len(test.y))


@pytest.mark.parametrize(("task", "devices", "rounds", "margin"), [
    ("sensor", 4, 3, 0.15),  # 4 balanced activities: the baseline is 0.25
    ("sensor-features", 4, 3, 0.25),
    ("keyboard", 2, 2, 0.03),  # clearly above the unigram baseline after two rounds
])
def test_a_task_trains_over_a_real_broker(tmp_path, task, devices, rounds, margin):
    floor = majority_baseline(task, devices) + margin
    config = SimulationConfig(task=task, devices=devices, rounds=rounds, seed=0, timeout_s=180)
    with Simulation(config, workdir=tmp_path / "sim") as sim:
        result = sim.wait()
        expected_model = {"sensor": "har_cnn", "sensor-features": "mlp",
                          "keyboard": "char_gru"}[task]
        assert sim.aggregator.config.model_name == expected_model
    assert [r.participants for r in result.rounds] == [devices] * rounds
    assert result.final_accuracy > floor
    if task == "keyboard":
        assert result.rounds[-1].top3 > result.final_accuracy
    assert not result.rejected
