"""Users' own tasks (tests/user_tasks: only fedmq's public API) train over a real
mosquitto, each named by its import path: a PyTorch module with its own loss and
optimizer, a scikit-learn SGDClassifier and a numpy model."""

import numpy as np
import pytest

from fedmq.tasks import held_out_set
from simulator.fleet import Simulation, SimulationConfig

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(("task", "engine", "needs"), [
    ("tests.user_tasks.torch_task:DigitsTorchTask", "agents", "torch"),
    ("tests.user_tasks.sklearn_task:DigitsSgdTask", "agents", "sklearn"),
    ("tests.user_tasks.numpy_task:BlobsTask", "agents", "numpy"),
    ("tests.user_tasks.numpy_task:BlobsTask", "hosted", "numpy"),  # devices in a child process
])
def test_a_user_task_trains_over_a_real_broker(tmp_path, task, engine, needs):
    pytest.importorskip(needs)
    test = held_out_set(task, seed=0)
    floor = float(np.bincount(test.y).max() / len(test.y)) + 0.3  # well above the majority
    config = SimulationConfig(task=task, devices=3, rounds=3, seed=0, engine=engine,
                              timeout_s=120)
    with Simulation(config, workdir=tmp_path / "sim") as sim:
        result = sim.wait()
        assert sim.aggregator.config.model_name == task
    assert [r.participants for r in result.rounds] == [3, 3, 3]
    assert result.final_accuracy > floor
    assert result.rounds[-1].loss < result.rounds[0].loss
    assert not result.rejected
