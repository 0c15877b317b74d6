"""Several aggregator processes on one fleet: workers that split the devices by shard and a
reducer that folds their partial aggregates; sites behind bridged brokers. Real brokers,
real agents; the worker-kill test SIGKILLs a real `fedmq aggregator --role worker`."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from aggregator.config import AggregatorConfig
from aggregator.partial import Shard
from aggregator.partial_service import PartialService
from simulator.broker import site_bridge

from .helpers import make_agents, make_aggregator, wait_for

pytestmark = pytest.mark.integration
FEDMQ = [sys.executable, "-m", "fedmq.cli"]
DEVICES = 6  # dev0..dev5: shard 0/2 takes dev3, dev4, dev5; shard 1/2 the other three


def make_worker(broker_url, tmp_path, stoppers, name, *, fleet="test", start=True,
                **overrides) -> PartialService:
    settings = dict(broker=broker_url, fleet=fleet, task="digits", model="logreg",
                    role="worker", client_id=f"{fleet}-{name}", source_name=name,
                    checkpoint=str(tmp_path / f"{name}.state"), flush_after_s=5.0)
    settings.update(overrides)
    service = PartialService(AggregatorConfig(**settings))
    if start:
        service.start()
        stoppers(service.stop)
        wait_for(service.link.subscribed.is_set, f"{name}'s subscriptions")
    return service


def accepted(agents) -> int:
    return sum(a.stats.receipts["accepted"] for a in agents)


def test_two_workers_and_a_reducer_give_every_round_every_device(broker, tmp_path, stoppers):
    assert {Shard(0, 2).owns(f"dev{i}") for i in range(DEVICES)} == {True, False}
    workers = [make_worker(broker.url, tmp_path, stoppers, f"w{i}", shard=f"{i}/2")
               for i in range(2)]
    reducer = make_aggregator(broker.url, tmp_path, stoppers, role="reducer",
                              partial_sources="w0,w1", model="logreg",
                              min_updates=DEVICES, rounds=3)
    agents = make_agents(broker.url, stoppers, DEVICES)
    wait_for(reducer.finished.is_set, "three rounds through the workers", timeout=120)
    assert [r.participants for r in reducer.history] == [DEVICES] * 3
    assert reducer.history[-1].accuracy > 0.5
    # each worker folded only its own shard, and every device got its receipt from it;
    # the broker sent each worker only its own buckets' updates (topic layout 2)
    assert all(w.folded > 0 and w.others == 0 for w in workers)
    assert sum(w.folded for w in workers) == 3 * DEVICES
    wait_for(lambda: accepted(agents) == 3 * DEVICES, "every device's receipts")
    assert all(len(a.outbox) == 0 for a in agents)
    assert not reducer.rejected and not any(w.rejected for w in workers)


def test_an_update_on_the_old_topic_is_refused_and_counted_once(broker, tmp_path, stoppers):
    """Topic layout 1's update/{device} reaches worker 0 only (not every worker), and the
    central aggregator; each refuses it as old_topic."""
    from fedmq.core.protocol import FleetTopics
    from fedmq.transport.mqtt import MqttLink

    workers = [make_worker(broker.url, tmp_path, stoppers, f"w{i}", shard=f"{i}/2")
               for i in range(2)]
    central = make_aggregator(broker.url, tmp_path, stoppers, model="logreg", rounds=1,
                              min_updates=1)
    link = MqttLink(client_id="old-device", broker=broker.url, on_connect=lambda _: None)
    link.start()
    stoppers(link.stop)
    link.wait_connected(30)
    link.publish(f"{FleetTopics('test').prefix}/update/dev0", b"an update, old layout")
    wait_for(lambda: workers[0].rejected["old_topic"] == 1
             and central.rejected["old_topic"] == 1, "both refusals")
    assert not workers[1].rejected and central.accepted == 0


def test_a_device_update_on_a_partial_topic_or_from_a_stranger_is_refused(
        broker, tmp_path, stoppers):
    """A device cannot pass itself off as a worker: partials come only from
    partial_sources, and a device's update is never folded as a partial."""
    import numpy as np

    from aggregator.partial import PartialRound
    from fedmq.core import codecs
    from fedmq.core.protocol import FleetTopics, Update
    from fedmq.transport.mqtt import MqttLink

    reducer = make_aggregator(broker.url, tmp_path, stoppers, role="reducer",
                              partial_sources="w0", model="logreg", rounds=1)
    size, lay = reducer.model.layout.size, reducer.model.layout.hash
    part = PartialRound(source="w9", size=size, layout_hash=lay,
                        policy=reducer.config.policy(), flush_after_s=1.0)
    part.follow(round=1, version=0, cohort=None, now=0.0)
    plain = Update(device_id="w0", update_id="x", round=1, base_version=0, num_samples=5,
                   loss=1.0, delta=codecs.encode(np.zeros(size, "f4")), layout_hash=lay)
    part.offer(plain)
    stranger = part.seal(0.0).update
    topics = FleetTopics("test")
    link = MqttLink(client_id="intruder", broker=broker.url, on_connect=lambda _: None)
    link.start()
    stoppers(link.stop)
    link.wait_connected(30)
    link.publish(topics.partial("w9"), stranger.to_payload())
    link.publish(topics.partial("w0"), plain.to_payload())
    wait_for(lambda: reducer.rejected["unknown_source"] == 1
             and reducer.rejected["wrong_topic"] == 1, "both refusals")
    assert reducer.machine.open.count == 0


def test_a_worker_sigkilled_mid_round_loses_nothing_it_acked(
        broker, tmp_path, stoppers, processes):
    """Worker w0 runs as a real process. While the reducer's loop is held up after round
    2, w0 acks its devices' round-3 updates and seals them into a partial nobody
    receipts; SIGKILLed then and restarted on its state file, it sends that partial again,
    and every round still counts every device exactly once."""
    import threading

    from aggregator.service import AggregatorService
    from fedmq import storage
    from fedmq.core.protocol import Update

    rounds = 5
    state_file = tmp_path / "w0.state"
    command = [*FEDMQ, "aggregator", "--role", "worker", "--shard", "0/2",
               "--broker", broker.url, "--fleet", "test", "--task", "digits",
               "--model", "logreg", "--client-id", "test-w0", "--source-name", "w0",
               "--checkpoint", str(state_file), "--flush-after-s", "1",
               "--log-level", "WARNING"]
    processes.append(subprocess.Popen(command))

    def w0_connected(times: int) -> bool:
        """The broker has logged w0's connection `times` times (it subscribes in the same
        breath; devices' updates sent before it listens would wait out a resend)."""
        return broker.log_path.read_text().count(" as test-w0 ") >= times

    wait_for(lambda: w0_connected(1), "the worker process w0 to connect")
    make_worker(broker.url, tmp_path, stoppers, "w1", shard="1/2", flush_after_s=1.0)
    release = threading.Event()
    stoppers(release.set)  # never leave the reducer's loop stuck, even on failure

    def hold_after_round_two(record) -> None:
        if record.round == 2:
            release.wait(120)

    reducer = AggregatorService(AggregatorConfig(
        broker=broker.url, fleet="test", task="digits", model="logreg", role="reducer",
        partial_sources="w0,w1", min_updates=DEVICES, rounds=rounds, deadline_s=60.0,
        epochs=1, checkpoint=str(tmp_path / "reducer.ckpt")), on_round=hold_after_round_two)
    reducer.start()
    stoppers(reducer.stop)
    agents = make_agents(broker.url, stoppers, DEVICES)

    def rounds_w0_holds() -> set[int]:
        """Rounds of the partials w0's state file holds unreceipted."""
        state = storage.load_state(state_file)
        pending = [] if state is None else state["partial"]["pending"]
        return {Update.from_payload(bytes(payload)).round for payload, _ in pending}

    wait_for(lambda: 3 in rounds_w0_holds(), "w0 to seal round 3 while the reducer is held up",
             timeout=120)
    assert len(reducer.history) == 2
    processes[0].send_signal(signal.SIGKILL)
    processes[0].wait(30)
    processes.append(subprocess.Popen(command))
    release.set()
    wait_for(reducer.finished.is_set, "every round after the restart", timeout=180)
    assert [r.participants for r in reducer.history] == [DEVICES] * rounds
    wait_for(lambda: all(len(a.outbox) == 0 for a in agents), "every receipt")
    assert accepted(agents) == rounds * DEVICES
    refused = sum(sum(a.stats.receipts.values()) for a in agents) - accepted(agents)
    assert refused == 0


def test_a_site_behind_a_bridged_broker_sends_one_partial_per_round(
        broker_factory, tmp_path, stoppers):
    """Three devices at the central broker, three at a site whose broker is bridged to
    it: the central aggregator folds the direct updates and the site's partial alike."""
    central = broker_factory(name="central")
    site_broker = broker_factory(site_bridge(central_port=central.port, site="site-a",
                                             fleet="test"), name="site")
    site = make_worker(site_broker.url, tmp_path, stoppers, "site-a", role="site",
                       client_id="site-a-aggregator")
    aggregator = make_aggregator(central.url, tmp_path, stoppers, partial_sources="site-a",
                                 model="logreg", min_updates=6, rounds=3)
    direct = make_agents(central.url, stoppers, 3, total=6)
    remote = make_agents(site_broker.url, stoppers, 3, total=6, first=3)
    wait_for(aggregator.finished.is_set, "three rounds over the bridge", timeout=120)
    assert [r.participants for r in aggregator.history] == [6, 6, 6]
    assert site.folded == 9 and site.others == 0
    # one partial a round, as a rule: a second one when a device came online after the
    # first ones' updates were in (the site expects the devices it knows online)
    assert 3 <= site.sent <= 6
    wait_for(lambda: accepted(direct + remote) == 18, "receipts down the bridge")
