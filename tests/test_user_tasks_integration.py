"""Users' own tasks (tests/user_tasks: only fedmq's public API) train over a real
mosquitto, each named by its import path: a PyTorch module with its own loss and
optimizer, a scikit-learn SGDClassifier and a numpy model."""

import numpy as np
import pytest

from edge_agent.agent import EdgeAgent
from edge_agent.config import AgentConfig
from fedmq.errors import DataError
from fedmq.tasks import device_shard, held_out_set
from simulator.fleet import Simulation, SimulationConfig

from .helpers import make_aggregator, wait_for

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


def test_a_bug_in_the_task_stops_a_simulation_before_it_starts(tmp_path):
    config = SimulationConfig(task="tests.user_tasks.faulty:BrokenFit", devices=2, rounds=1)
    sim = Simulation(config, workdir=tmp_path / "sim")
    try:
        with pytest.raises(DataError, match=r"task tests.user_tasks.faulty:BrokenFit: fit\(\) "
                                            r"failed: ValueError: .*faulty\.py:\d+\)"):
            sim.start()
        assert sim.broker is None and sim.aggregator is None  # nothing was started
    finally:
        sim.close()


def test_a_failing_evaluation_leaves_the_round_without_test_metrics(broker, tmp_path, stoppers,
                                                                     caplog):
    """Only the aggregator evaluates: the round still closes and its model goes out."""
    task = "tests.user_tasks.faulty:BrokenEvaluation"
    service = make_aggregator(broker.url, tmp_path, stoppers, task=task, model="", hidden=64,
                              min_updates=2, rounds=2)
    for i in range(2):
        agent = EdgeAgent(AgentConfig(broker=broker.url, fleet="test", device_id=f"dev{i}",
                                      task=task),
                          device_shard(task, device_index=i, device_count=2, alpha=0.0, seed=0))
        agent.start()
        stoppers(agent.stop)
    wait_for(service.finished.is_set, "two rounds with a failing evaluation")
    assert service.failure is None
    assert [(r.participants, r.accuracy) for r in service.history] == [(2, None), (2, None)]
    assert "evaluating the new model failed: task tests.user_tasks.faulty:BrokenEvaluation: " \
           "evaluate() failed: ZeroDivisionError: metric over an empty class" in caplog.text
