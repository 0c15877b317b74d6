"""Agents and the aggregator over a real mosquitto started by the `broker` fixture."""

from __future__ import annotations

import dataclasses

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from aggregator.checkpoint import CheckpointStore
from fedmq.core.protocol import EncodedTensor, FleetTopics, Update

from .helpers import make_agents, make_aggregator, wait_for

pytestmark = pytest.mark.integration


def test_three_agents_three_rounds_accuracy_rises(broker, tmp_path, stoppers, mqtt_version):
    service = make_aggregator(broker.url, tmp_path, stoppers)
    agents = make_agents(broker.url, stoppers, 3)
    wait_for(service.finished.is_set, "3 rounds")
    assert {a.link.protocol_version for a in [*agents, service]
            if hasattr(a, "link")} == {mqtt_version}
    history = service.history
    assert [r.round for r in history] == [1, 2, 3]
    assert all(r.participants == 3 for r in history)
    assert history[-1].accuracy > history[0].accuracy
    assert history[-1].accuracy > 0.5
    assert service.accepted == 9 and not service.rejected


def test_nobody_trains_on_the_final_model(broker, tmp_path, stoppers):
    """After the last round the model is announced for devices to hold, asked of nobody:
    training on it would upload updates no round will ever count."""
    service = make_aggregator(broker.url, tmp_path, stoppers, rounds=2)
    agents = make_agents(broker.url, stoppers, 3)
    wait_for(service.finished.is_set, "2 rounds")
    wait_for(lambda: all(a.stats.sat_out >= 1 for a in agents), "the final announcement")
    assert [a.stats.updates_sent for a in agents] == [2, 2, 2]
    assert service.accepted == 6 and not service.rejected


def test_aggregator_restarts_between_rounds_and_resumes_from_checkpoint(broker, tmp_path,
                                                                       stoppers):
    first = make_aggregator(broker.url, tmp_path, stoppers, rounds=2)
    agents = make_agents(broker.url, stoppers, 3)
    wait_for(first.finished.is_set, "the first 2 rounds")
    first.stop()
    saved = CheckpointStore(tmp_path / "aggregator.ckpt").load()
    assert saved["machine"]["round"] == 3 and saved["machine"]["version"] == 2

    second = make_aggregator(broker.url, tmp_path, stoppers, rounds=4, start=False)
    assert (second.machine.round, second.machine.version) == (3, 2)
    assert np.array_equal(second.machine.params, saved["machine"]["params"])
    # round-3 updates the finished first process took are held in the checkpoint, not lost
    assert second.machine.acc.count == len(saved["machine"]["open"]["contributions"])
    second.start()
    stoppers(second.stop)
    wait_for(second.finished.is_set, "rounds 3 and 4 after the restart")
    assert [r.round for r in second.history] == [1, 2, 3, 4]
    assert second.history[-1].accuracy >= second.history[1].accuracy - 0.05
    assert all(a.stats.updates_sent >= 4 for a in agents)


def test_late_joiner_gets_the_retained_model_and_takes_part(broker, tmp_path, stoppers):
    service = make_aggregator(broker.url, tmp_path, stoppers, rounds=2, min_updates=3)
    early = make_agents(broker.url, stoppers, 2, total=3)
    wait_for(lambda: len(service.machine.open.devices) == 2, "the two early updates")
    assert not service.history  # the round cannot close without a third device
    late = make_agents(broker.url, stoppers, 1, total=3, first=2)[0]
    wait_for(service.finished.is_set, "2 rounds with the late device")
    assert late.stats.models_received >= 2
    assert all(r.participants == 3 for r in service.history)
    assert all(a.stats.updates_sent >= 2 for a in [*early, late])


def test_garbage_on_update_topics_is_rejected_counted_and_survived(broker, tmp_path, stoppers):
    service = make_aggregator(broker.url, tmp_path, stoppers, rounds=2, min_updates=2)
    topics = FleetTopics("test")
    rogue = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="rogue",
                        protocol=mqtt.MQTTv5)
    rogue.connect("127.0.0.1", broker.port)
    rogue.loop_start()
    stoppers(rogue.loop_stop)
    stoppers(rogue.disconnect)
    nan = Update(device_id="dev0", update_id="x", round=1, base_version=0, num_samples=5,
                 loss=0.0, delta=EncodedTensor(codec="float32", size=2, data=b"\0" * 8),
                 layout_hash=service.model.layout.hash)
    size = service.model.layout.size
    bad_codecs = [  # well-formed Updates whose encoded delta is not
        EncodedTensor(codec="q8+zstd", size=size, data=b"\x28\xb5\x2f\xfd" + b"x" * 40),
        EncodedTensor(codec="q4", size=size, data=b"\x01" * 17),
        EncodedTensor(codec="top0.1+q8", size=size, data=b"\xff" * 64),
        EncodedTensor(codec="rot13", size=size, data=b""),
    ]
    garbage = [b"", b"\xff\xfe", b"not msgpack", nan.to_payload()]
    garbage += [dataclasses.replace(nan, delta=t).to_payload() for t in bad_codecs]
    infos = [rogue.publish(topics.update("dev0"), g, qos=1) for g in garbage]
    infos.append(rogue.publish(topics.update("dev9"), nan.to_payload(), qos=1))  # wrong topic
    # (a delta of the model's size: the norm bound decodes it before the layout is checked)
    zeros = EncodedTensor(codec="f32", size=size, data=b"\0" * 4 * size)
    no_layout = dataclasses.replace(nan, layout_hash="", delta=zeros)
    infos.append(rogue.publish(topics.update("dev0"), no_layout.to_payload(), qos=1))
    for info in infos:
        info.wait_for_publish(30)
    wait_for(lambda: sum(service.rejected.values()) == 10, "10 rejections")
    assert service.rejected["bad_layout"] == 1  # an update must say which model it fits
    assert service.rejected["malformed"] == 4  # 3 undecodable payloads + a corrupt zstd frame
    assert service.rejected["wrong_topic"] == 1
    assert service.rejected["bad_shape"] == 1  # 2 values for a 1,210-parameter model
    assert service.rejected["truncated"] == 2  # q4 and top-k bodies of the wrong length
    assert service.rejected["unknown_codec"] == 1
    make_agents(broker.url, stoppers, 2)
    wait_for(service.finished.is_set, "2 clean rounds after the garbage")
    assert service.accepted == 4


def test_training_continues_after_the_broker_restarts(broker, tmp_path, stoppers, mqtt_version):
    """Everyone reconnects by themselves; the round the restart interrupted still closes."""
    service = make_aggregator(broker.url, tmp_path, stoppers, rounds=4, min_updates=3)
    agents = make_agents(broker.url, stoppers, 3)
    wait_for(lambda: len(service.history) >= 1, "the first round")
    broker.stop()  # clean stop of a broker without persistence: sessions and retained go
    wait_for(lambda: not service.link.connected.is_set(), "the aggregator to notice")
    broker.start()
    wait_for(service.finished.is_set, "4 rounds across the broker restart")
    assert [r.round for r in service.history][-1] >= 4
    assert all(r.participants == 3 for r in service.history)
    assert all(a.link.connected.is_set() for a in agents)
    assert service.link.protocol_version == mqtt_version


def test_missing_mosquitto_says_how_to_install_it(monkeypatch):
    from fedmq.errors import BrokerError
    from simulator import broker as broker_module

    monkeypatch.setattr(broker_module.shutil, "which", lambda _name: None)
    monkeypatch.setattr(broker_module, "_sbin", lambda _name: None)
    with pytest.raises(BrokerError, match="apt-get install -y mosquitto"):
        broker_module.LocalMosquitto()


def test_updates_lost_while_the_aggregator_was_away_are_trained_again(broker, tmp_path,
                                                                       stoppers, mqtt_version):
    service = make_aggregator(broker.url, tmp_path, stoppers, rounds=1, min_updates=3)
    devices = make_agents(broker.url, stoppers, 2, total=3)
    wait_for(lambda: len(service.machine.open.devices) == 2, "two updates")
    service.link.stop()  # the aggregator drops off
    late = make_agents(broker.url, stoppers, 1, total=3, first=2)[0]
    wait_for(lambda: late.stats.updates_sent == 1, "the late update, sent while it was away")
    broker.stop()  # whatever the broker held for the aggregator is gone now
    broker.start()
    service.link.start()
    wait_for(service.finished.is_set, "round 1 after the aggregator came back")
    assert service.history[0].participants == 3
    # The late update comes back two ways: its outbox re-sends it, and the fresh
    # announcement makes every device train again. Every trained update is counted once
    # (round 1, or the open round 2 of the final model) or refused with a receipt; no
    # outbox keeps anything, and nothing counts twice.
    agents = [*devices, late]
    wait_for(lambda: all(len(a.outbox) == 0 for a in agents), "every outbox to drain")
    trained = sum(a.stats.updates_sent for a in agents)
    counted = service.history[0].participants + len(service.machine.open.devices)
    # (refusals counted per update by the devices: a re-sent refused update is refused
    # again at the aggregator, but settles only one outbox entry)
    refused = sum(sum(a.stats.receipts.values()) - a.stats.receipts["accepted"] for a in agents)
    assert service.accepted == counted
    assert counted + refused == trained
    assert sum(a.stats.receipts["accepted"] for a in agents) == counted


def test_delta_broadcast_cuts_download_bytes_and_late_joiners_take_the_full_model(
        broker, tmp_path, stoppers):
    # Rounds to spare: a round of this fleet takes milliseconds, the late joiner's connect
    # longer, and the final model is asked of nobody (no download for it).
    service = make_aggregator(broker.url, tmp_path, stoppers, rounds=500, min_updates=2,
                              model_delta_codec="q8")
    agents = make_agents(broker.url, stoppers, 2, total=3)
    wait_for(lambda: len(service.history) >= 3, "3 rounds with delta broadcasts")
    late = make_agents(broker.url, stoppers, 1, total=3, first=2)[0]
    wait_for(lambda: any(d for _up, d in late.stats.traffic.values()),
             "the late joiner's first download")
    assert service.history[-1].accuracy > service.history[0].accuracy
    down = [agents[0].stats.traffic[r][1] for r in (1, 2, 3)]
    assert down[1] * 2.5 < down[0] and down[2] * 2.5 < down[0]  # q8 delta vs float32 full
    # the late device took a full model first (its first download is full-sized)
    first_round = min(r for r, (_up, d) in late.stats.traffic.items() if d)
    assert late.stats.traffic[first_round][1] > down[1] * 2.5
    assert not late.stats.rejected and not agents[0].stats.rejected


def test_agents_only_simulation_joins_a_separately_started_aggregator(broker, tmp_path,
                                                                      stoppers):
    from fedmq.errors import ConfigError
    from simulator.fleet import Simulation, SimulationConfig

    service = make_aggregator(broker.url, tmp_path, stoppers, rounds=3, min_updates=3,
                              fleet="ao")
    config = SimulationConfig(devices=3, rounds=3, broker=broker.url, fleet="ao",
                              agents_only=True, timeout_s=60)
    with Simulation(config, workdir=tmp_path / "sim") as sim:
        assert sim.aggregator is None
        result = sim.wait()
    assert [r.round for r in result.rounds] == [1, 2, 3]
    assert all(r.participants == 3 and r.accuracy is None for r in result.rounds)
    assert result.summary().startswith("devices took part in 3 rounds")
    wait_for(service.finished.is_set, "the separate aggregator's 3 rounds")
    assert all(r.participants == 3 for r in service.history)
    with pytest.raises(ConfigError, match="--broker and --fleet"):
        SimulationConfig(agents_only=True)


def test_simulation_with_dropout_cuts_a_random_share_of_devices_every_round(tmp_path):
    from fedmq.errors import ConfigError
    from simulator.fleet import Simulation, SimulationConfig

    config = SimulationConfig(devices=6, rounds=5, dropout=0.34, model="logreg", epochs=3,
                              timeout_s=120)
    assert (config.dropped_per_round, config.quorum) == (2, 4)
    with Simulation(config, workdir=tmp_path / "sim") as sim:
        result = sim.wait()
        cuts = sum(p.stats().cut for p in sim.proxies.proxies.values())
        sent = [a.stats.updates_sent for a in sim.agents]
    assert [r.round for r in result.rounds] == [1, 2, 3, 4, 5]
    assert all(r.participants >= 4 for r in result.rounds)
    assert cuts > 0 and min(sent) < 5  # somebody missed a round while cut off
    assert result.final_accuracy > 0.7
    with pytest.raises(ConfigError, match="dropout"):
        SimulationConfig(dropout=1.0)


def test_a_fresh_aggregator_is_followed_by_a_fleet_holding_a_newer_model(broker, tmp_path,
                                                                          stoppers):
    """#17: the checkpoint deleted (as deploy/README.md permits), a new aggregator starts at
    v0 while the devices hold v3 of the old one; they follow the new lineage and train."""
    first = make_aggregator(broker.url, tmp_path, stoppers, rounds=3, model="logreg")
    agents = make_agents(broker.url, stoppers, 3)
    wait_for(first.finished.is_set, "3 rounds of the first aggregator")
    first.stop()
    for path in tmp_path.glob("aggregator.ckpt*"):
        path.unlink()
    second = make_aggregator(broker.url, tmp_path, stoppers, rounds=2, model="logreg")
    wait_for(second.finished.is_set, "2 rounds of a fresh aggregator, same devices")
    assert [r.participants for r in second.history] == [3, 3]
    assert second.lineage != first.lineage
    assert all(a.receiver.lineage_changes == 1 for a in agents)
