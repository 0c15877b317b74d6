"""Each bundled task trains for a few rounds over a real mosquitto, torch models included."""

import pytest

from aggregator.simulator import Simulation, SimulationConfig

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(("task", "devices", "rounds", "floor"), [
    ("sensor", 4, 3, 0.40),  # 4 activities: chance is 0.25
    ("sensor-features", 4, 3, 0.50),
    ("keyboard", 2, 2, 0.19),  # the unigram baseline is ~0.19 top-1
])
def test_a_task_trains_over_a_real_broker(tmp_path, task, devices, rounds, floor):
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
