"""Federated evaluation and personalization end to end, over the real mosquitto fixture:
devices score the announced model on their held-out data, the aggregator records the
fleet's accuracy; personal layers never leave a device and survive its restart."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from aggregator.records import read_records
from edge_agent.agent import EdgeAgent
from edge_agent.config import AgentConfig
from fedmq import storage
from fedmq.core.layout import LayoutMask
from fedmq.core.protocol import EvalMetrics, EvalReport, FleetTopics
from fedmq.tasks import partition, split_task

from .helpers import make_agents, make_aggregator, wait_for


def test_devices_score_each_model_and_the_aggregator_records_the_fleet_accuracy(
        broker, tmp_path, stoppers):
    metrics = tmp_path / "metrics.jsonl"
    service = make_aggregator(broker.url, tmp_path, stoppers, rounds=3, evaluate_fraction=1.0,
                              metrics=str(metrics))
    agents = make_agents(broker.url, stoppers, 3, eval_holdout=0.25)
    wait_for(service.finished.is_set, "three rounds", timeout=120)
    records = list(read_records(metrics))
    assert [r.round for r in records] == [1, 2, 3]
    for r in records:
        assert r.fleet_devices == 3, r  # every device scored the model its round began from
        assert r.fleet_samples == sum(len(a.trainer.eval_data) for a in agents)
        assert 0.0 <= r.fleet_accuracy <= 1.0 and r.personal_accuracy is None
    # the model trained from in round 3 scores better on the devices than the initial one
    assert records[-1].fleet_accuracy > records[0].fleet_accuracy
    assert all(a.stats.evaluated >= 3 for a in agents)
    # a report nobody asked for, a forged one and a NaN are refused, counted, and the
    # service keeps going
    topics = FleetTopics("test")
    forged = EvalReport(device_id="stranger", round=4, version=3, num_samples=5,
                        metrics=EvalMetrics(loss=1.0, accuracy=0.5))
    agents[0].link.publish(topics.update("stranger"), forged.to_payload(), qos=1)
    lying = EvalReport(device_id="dev1", round=4, version=3, num_samples=10**6,
                       metrics=EvalMetrics(loss=1.0, accuracy=0.5))
    agents[1].link.publish(topics.update("dev1"), lying.to_payload(), qos=1)
    wait_for(lambda: service.rejected["eval_unknown_device"] == 1
             and service.rejected["eval_bad_samples"] == 1, "the refused reports")
    assert service.link.connected.is_set() and service.failure is None


def test_personal_layers_stay_on_the_device_and_survive_its_restart(broker, tmp_path,
                                                                      stoppers):
    service = make_aggregator(broker.url, tmp_path, stoppers, rounds=2, evaluate_fraction=1.0,
                              personal_layers="w2, b2", finetune_steps=5)
    mask = service.mask
    assert mask.patterns == ("w2", "b2")
    assert service.ingest.params == mask.shared.size < service.model.layout.size
    state_dirs = [tmp_path / f"state{i}" for i in range(3)]
    agents = [make_agents(broker.url, stoppers, 1, total=3, first=i, eval_holdout=0.2,
                          state_dir=str(state_dirs[i]))[0] for i in range(3)]
    wait_for(service.finished.is_set, "two rounds", timeout=120)
    records = service.history
    assert all(r.personal_accuracy is not None and r.fleet_devices == 3 for r in records)
    # the updates carried the shared tensors only: the aggregate moved them, never the
    # personal ones, which are still the aggregator's initial values
    full = service.full_params()
    np.testing.assert_array_equal(mask.take_personal(full), service.personal_init)
    personal = [a.trainer.personal.values for a in agents]
    for values in personal:
        assert values is not None and values.size == mask.personal.size
        assert not np.allclose(values, service.personal_init)  # trained on the device
    assert not np.allclose(personal[0], personal[1])  # each device its own
    # the device stops; its personal layers are on disk, checked, and come back
    agents[0].stop()
    saved = storage.load_state(Path(state_dirs[0]) / "agent-state.bin")
    assert saved["personal"]["rounds"] == 2
    train, _ = split_task("digits", seed=0)
    shard = partition(train.y, devices=3, alpha=0.5, seed=0)[0]
    again = EdgeAgent(AgentConfig(broker=broker.url, fleet="test", device_id="dev0",
                                  device_index=0, device_count=3, eval_holdout=0.2,
                                  state_dir=str(state_dirs[0])), train.subset(shard))
    try:
        restored = again.trainer.personal
        np.testing.assert_array_equal(restored.values, personal[0])
        start = restored.start(LayoutMask(service.model.layout, mask.patterns), full)
        np.testing.assert_array_equal(mask.take_personal(start), personal[0])
        np.testing.assert_array_equal(mask.take_shared(start), mask.take_shared(full))
    finally:
        again.stop()
    assert json.dumps(records[-1].to_dict())  # the record with personal_* writes as JSON


def test_pending_evaluations_survive_an_aggregator_restart(broker, tmp_path, stoppers):
    """Reports of the open round are checkpointed before they are acked: after a restart
    the round closes with the scores of devices that have gone quiet since."""
    service = make_aggregator(broker.url, tmp_path, stoppers, rounds=1, min_updates=3,
                              evaluate_fraction=1.0)
    first = make_agents(broker.url, stoppers, 2, total=3, eval_holdout=0.25)
    wait_for(lambda: len(service.evaluations.reports) == 2 and service.accepted == 2
             and service.writer.idle and not service._dirty, "two reports on disk")
    for agent in first:
        agent.stop()  # they do not score the model again after the restart
    service.stop()
    restarted = make_aggregator(broker.url, tmp_path, stoppers, rounds=1, min_updates=3,
                                evaluate_fraction=1.0)
    assert set(restarted.evaluations.reports) == {"dev0", "dev1"}
    make_agents(broker.url, stoppers, 1, total=3, first=2, eval_holdout=0.25)
    wait_for(restarted.finished.is_set, "the round", timeout=120)
    record = restarted.history[-1]
    assert record.fleet_devices == 3, record
    assert restarted.rejected["eval_duplicate"] == 0


def test_fedrep_with_checked_fine_tuning_over_the_broker(broker, tmp_path, stoppers):
    """personal_steps, finetune_lr and finetune_check reach the devices in the
    announcement: they train FedRep-style, and score a personalized model every round."""
    service = make_aggregator(broker.url, tmp_path, stoppers, rounds=2, evaluate_fraction=1.0,
                              personal_layers="w2, b2", personal_steps=5, finetune_steps=6,
                              finetune_lr=0.05, finetune_check=3)
    agents = make_agents(broker.url, stoppers, 3, eval_holdout=0.2)
    wait_for(service.finished.is_set, "two rounds", timeout=120)
    assert all(r.fleet_devices == 3 and r.personal_accuracy is not None
               for r in service.history)
    heard = agents[0].receiver.announcement
    assert (heard.personal_steps, heard.finetune_lr, heard.finetune_check) == (5, 0.05, 3)
    # the personal layers never went up: the global ones are still as initialised
    np.testing.assert_array_equal(service.mask.take_personal(service.full_params()),
                                  service.personal_init)
    assert all(a.trainer.personal.rounds == 2 for a in agents)
