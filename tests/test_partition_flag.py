"""`fedmq simulate --partition NAME` (and `partition` in agent.toml) splits the bundled data
with the partitioner registry's NAME: the flags reach every device's config, a name the
registry or the task cannot have fails when the config is made, and a split the data
cannot make fails before the run starts, naming the largest fleet it allows."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.config import AgentConfig
from fedmq.cli import build_parser
from fedmq.errors import ConfigError
from fedmq.runtime import config_from_args
from fedmq.tasks import device_shards, task_partition
from fedmq.tasks.partition import dirichlet_partition, iid_partition
from simulator.fleet import Simulation, SimulationConfig
from simulator.profiles import fleet_profiles


def simulate_config(*flags: str) -> SimulationConfig:
    args = build_parser(["simulate"]).parse_args(["simulate", *flags])
    return config_from_args(SimulationConfig, args)


def test_partition_flags_reach_the_config_and_every_device():
    config = simulate_config("--partition", "shards", "--shards-per-device", "3",
                             "--devices", "5")
    assert (config.partition, config.shards_per_device) == ("shards", 3)
    profile = fleet_profiles("uniform", 1, seed=0)[0]
    agent = config.agent_config(4, broker="mqtt://127.0.0.1:1", fleet="f", profile=profile)
    assert (agent.partition, agent.shards_per_device, agent.device_count) == ("shards", 3, 5)
    assert simulate_config().partition == ""  # the task's own, as before the flag


def test_an_unknown_partition_lists_the_choices():
    with pytest.raises(ConfigError, match="unknown partitioner 'pathological'; available: "
                                          "dirichlet, iid, natural, shards"):
        simulate_config("--partition", "pathological")
    with pytest.raises(ConfigError, match="available: dirichlet, iid"):
        AgentConfig(device_id="d", partition="bogus")
    with pytest.raises(ConfigError, match="shards_per_device 0 must be >= 1"):
        AgentConfig(device_id="d", shards_per_device=0)


def test_a_partition_the_task_cannot_have_is_refused_at_config_time():
    with pytest.raises(ConfigError, match=r"keyboard.*only partition is natural"):
        SimulationConfig(task="keyboard", partition="iid")
    with pytest.raises(ConfigError, match="no natural groups"):
        SimulationConfig(task="digits", partition="natural")
    assert task_partition("keyboard", "natural") == "natural"
    assert task_partition("wearable") == "natural"
    assert task_partition("digits") == "dirichlet"
    assert task_partition("wearable", "shards") == "shards"


def test_the_tasks_own_split_is_unchanged():
    """No --partition: the same shards as before the flag (Dirichlet; alpha 0: IID)."""
    from fedmq.tasks import split_task

    train, _ = split_task("digits", seed=3)
    for alpha, expected in ((0.5, dirichlet_partition(train.y, devices=6, alpha=0.5, seed=3)),
                            (0.0, iid_partition(len(train.y), devices=6, seed=3))):
        got = device_shards("digits", device_count=6, alpha=alpha, seed=3)
        assert [len(s) for s in got] == [len(p) for p in expected]
        for shard, idx in zip(got, expected, strict=True):
            assert np.array_equal(shard.y, train.y[idx])
    with pytest.raises(ConfigError, match=r"alpha 0\.0 must be > 0"):  # explicit: no silent IID
        device_shards("digits", device_count=6, alpha=0.0, seed=3, partition="dirichlet")


def test_shards_give_each_device_k_labels_and_too_big_a_fleet_names_the_largest():
    shards = device_shards("digits", device_count=10, alpha=0.5, seed=1, partition="shards",
                           shards_per_device=2)
    assert [len(np.unique(s.y)) for s in shards] == [2] * 10
    wearable = device_shards("wearable", device_count=7, alpha=0.5, seed=1,
                             partition="shards", shards_per_device=1)  # 7 exercises
    assert sorted(int(np.unique(s.y)[0]) for s in wearable) == list(range(7))
    with pytest.raises(ConfigError, match="largest fleet it allows is 665"):
        device_shards("digits", device_count=700, alpha=0.5, seed=0, partition="shards")
    with pytest.raises(ConfigError, match="use at least 10 devices"):
        device_shards("digits", device_count=5, alpha=0.5, seed=0, partition="shards",
                      shards_per_device=1)


def test_a_split_that_cannot_be_made_fails_before_the_broker_starts(tmp_path):
    config = SimulationConfig(devices=700, rounds=1, partition="shards", engine="agents")
    sim = Simulation(config, workdir=tmp_path / "sim")
    with pytest.raises(ConfigError, match="largest fleet it allows is 665"):
        sim.start()
    assert sim.broker is None  # nothing was started
    sim.close()


def test_a_shards_fleet_trains_over_a_real_broker(tmp_path):
    config = SimulationConfig(devices=5, rounds=3, partition="shards", shards_per_device=2,
                              model="logreg", epochs=2, timeout_s=120)
    with Simulation(config, workdir=tmp_path / "sim") as sim:
        result = sim.wait()
        labels = [np.unique(a.trainer.data.y) for a in sim.agents]
    assert [len(ls) for ls in labels] == [2] * 5
    assert sorted(np.concatenate(labels).tolist()) == list(range(10))  # every label held
    assert [r.round for r in result.rounds] == [1, 2, 3]
    assert all(r.participants == 5 for r in result.rounds)
    assert result.final_accuracy is not None and result.final_accuracy > 0.3


SKLEARN_TASK = "tests.user_tasks.sklearn_task:DigitsSgdTask"  # its load_data: device.shard


def test_a_user_tasks_device_shard_splits_by_the_partition_chosen():
    pytest.importorskip("sklearn")
    import fedmq
    from fedmq.errors import DataError

    assert task_partition(SKLEARN_TASK) == "" and task_partition(SKLEARN_TASK, "iid") == "iid"
    shards = device_shards(SKLEARN_TASK, device_count=5, alpha=0.5, seed=1,
                           partition="shards", shards_per_device=2)
    assert [len(np.unique(s.y)) for s in shards] == [2] * 5
    iid = device_shards(SKLEARN_TASK, device_count=5, alpha=0.5, seed=1, partition="iid")
    assert [len(s) for s in iid] == [280] * 5
    x, y = np.arange(12).reshape(6, 2), np.array([0, 1, 0, 1, 0, 1])
    groups = np.array(["ann", "ann", "bob", "bob", "cy", "cy"])
    held = [fedmq.Device(index=i, count=3, partition="natural").shard(x, y, groups=groups)[0]
            for i in range(3)]
    assert sorted(tuple(sorted(set(groups[h[:, 0] // 2]))) for h in held) == [
        ("ann",), ("bob",), ("cy",)]  # each device one whole group
    with pytest.raises(DataError, match=r"device.shard\(x, y, groups=...\)"):
        fedmq.Device(index=0, count=3, partition="natural").shard(x, y)


def test_a_user_task_fleet_split_into_shards_trains_over_a_real_broker(tmp_path):
    pytest.importorskip("sklearn")
    config = SimulationConfig(task=SKLEARN_TASK, devices=5, rounds=2, partition="shards",
                              shards_per_device=2, timeout_s=120)
    with Simulation(config, workdir=tmp_path / "sim") as sim:
        result = sim.wait()
        labels = [np.unique(a.trainer.data.y) for a in sim.agents]
    assert [len(ls) for ls in labels] == [2] * 5
    assert all(r.participants == 5 for r in result.rounds)
