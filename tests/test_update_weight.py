"""What an update weighs: the samples its device trained on (the default), or its whole
training set (`update_weight = "examples"`, FedAvg's n_k): under a step cap the fleet then
weighs every example alike, as a central run on the union does."""

from __future__ import annotations

import pytest

from aggregator.config import AggregatorConfig
from fedmq.core.protocol import TaskConfig
from fedmq.errors import ConfigError, ProtocolError

from .helpers import make_agents, make_aggregator, trained_digits_delta, wait_for


def test_the_default_stays_off_the_wire_and_examples_travel():
    assert "uw" not in TaskConfig().to_wire()  # devices that predate the field see nothing new
    wired = TaskConfig(update_weight="examples").to_wire()
    assert wired["uw"] == "examples"
    assert TaskConfig.from_wire(wired).update_weight == "examples"
    assert TaskConfig.from_wire(TaskConfig().to_wire()).update_weight == "trained"


def test_an_unknown_weight_is_refused_on_the_wire_and_in_the_config():
    with pytest.raises(ProtocolError, match="update_weight 'rows' is not one of"):
        TaskConfig.from_wire({**TaskConfig().to_wire(), "uw": "rows"})
    with pytest.raises(ConfigError, match="update_weight"):
        AggregatorConfig(broker="mqtt://127.0.0.1:1", update_weight="rows")


@pytest.mark.parametrize("weight", ["trained", "examples"])
def test_a_capped_device_reports_its_steps_work_or_its_training_set(weight):
    from fedmq.tasks import device_shard

    _, update = trained_digits_delta(
        TaskConfig(batch_size=8, max_steps=2, update_weight=weight), with_update=True)
    examples = len(device_shard("digits", device_index=0, device_count=4, alpha=0.5, seed=0))
    assert examples > 16 and update.steps == 2
    assert update.num_samples == (16 if weight == "trained" else examples)


@pytest.mark.integration
@pytest.mark.parametrize("weight", ["trained", "examples"])
def test_the_round_weighs_each_update_as_the_fleet_is_told(broker, tmp_path, stoppers, weight):
    service = make_aggregator(broker.url, tmp_path, stoppers, rounds=1, batch_size=8,
                              max_steps=1, update_weight=weight)
    agents = make_agents(broker.url, stoppers, 3)
    wait_for(lambda: len(service.history) == 1, "one round")
    sizes = [len(a.trainer.data) for a in agents]
    record = service.history[0]
    assert record.participants == 3
    assert record.samples == (3 * 8 if weight == "trained" else sum(sizes))
