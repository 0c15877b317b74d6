"""Real processes killed with SIGKILL: nothing accepted is lost, nothing counts twice."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

import pytest

from aggregator.checkpoint import CheckpointStore
from aggregator.observers import AggregatorObserver
from fedmq.core.protocol import AggregatorStatus, FleetTopics

from .helpers import make_agents, wait_for
from .test_cli import RetainedWatcher

pytestmark = pytest.mark.integration
FEDMQ = [sys.executable, "-m", "fedmq.cli"]


def counted_in(checkpoint) -> int:
    """Updates a checkpoint counts: closed rounds plus the open round's partial aggregate."""
    state = CheckpointStore(checkpoint).load()
    return (sum(r["participants"] for r in state["history"])
            + len(state["machine"]["open"]["contributions"]))


def assert_every_update_accounted_for(agents, counted: int) -> None:
    """Each trained update is counted once with an `accepted` receipt, refused with a
    receipt, or still in its device's outbox: never silently gone, never counted twice."""
    receipted = sum(a.stats.receipts["accepted"] for a in agents)
    refused = sum(sum(a.stats.receipts.values()) - a.stats.receipts["accepted"] for a in agents)
    pending = sum(len(a.outbox) for a in agents)
    trained = sum(a.stats.updates_sent for a in agents)
    assert trained == receipted + refused + pending, (trained, receipted, refused, pending)
    assert receipted <= counted <= receipted + pending, (receipted, counted, pending)


def in_service(service) -> int:
    return sum(r.participants for r in service.history) + service.machine.open.count


def settle(service, agents) -> None:
    """Stop the aggregator, then the devices, so no count moves while it is checked (a
    finished aggregator still takes updates trained on the final model)."""
    service.stop()
    for agent in agents:
        agent.stop()


@pytest.mark.parametrize("aggregation", ["mean", "median"])
def test_aggregator_sigkilled_mid_round_resumes_with_every_receipted_update(
        broker, tmp_path, stoppers, processes, aggregation):
    """The median keeps the round's updates in a side file the journal counts: those
    too must be back after the kill, one per counted device, and the restarted process
    (whose first save writes them inline, then appends afresh) must finish the run."""
    topics = FleetTopics("chaos")
    watcher = RetainedWatcher(broker.port, "chaos")
    stoppers(watcher.close)
    checkpoint = tmp_path / "agg.ckpt"
    command = [*FEDMQ, "aggregator", "--broker", broker.url, "--fleet", "chaos",
               "--min-updates", "3", "--rounds", "6", "--model", "logreg",
               "--checkpoint", str(checkpoint), "--log-level", "WARNING",
               "--aggregation", aggregation]

    def aggregator_round() -> int:
        raw = watcher.latest.get(topics.aggregator_status)
        return AggregatorStatus.from_payload(raw).round if raw else 0

    processes.append(subprocess.Popen(command))
    agents = make_agents(broker.url, stoppers, 3, fleet="chaos")
    wait_for(lambda: aggregator_round() >= 3, "two rounds before the crash")
    # wait for part of round 3 to be held, so the kill lands mid-round
    wait_for(lambda: sum(a.stats.receipts["accepted"] for a in agents) >= 7,
             "a receipt inside round 3")
    processes[0].send_signal(signal.SIGKILL)
    processes[0].wait(30)
    receipted_before = sum(a.stats.receipts["accepted"] for a in agents)
    assert counted_in(checkpoint) >= receipted_before  # a receipt means "on disk"
    if aggregation == "median":
        held = CheckpointStore(checkpoint).load()["machine"]["open"]
        assert len(held["acc"]["tensors"]) == len(held["contributions"])

    processes.append(subprocess.Popen(command))
    assert processes[1].wait(120) == 0  # exits by itself after round 6
    state = CheckpointStore(checkpoint).load()
    history = state["history"]
    assert [r["round"] for r in history] == [1, 2, 3, 4, 5, 6]
    assert all(r["participants"] == 3 for r in history)
    # the median of three devices' updates learns slower (0.78 here) than their mean
    assert history[-1]["accuracy"] > (0.8 if aggregation == "mean" else 0.7)
    # every trained update is either counted exactly once, with a receipt, or refused with
    # one; nothing is silently gone and nothing counts twice
    wait_for(lambda: all(len(a.outbox) == 0 for a in agents) or processes[1].poll() is not None,
             "outboxes to drain")
    assert_every_update_accounted_for(agents, counted_in(checkpoint))


def test_a_median_round_sigkilled_holding_updates_resumes_with_every_one(
        broker, tmp_path, stoppers, processes):
    """Three of the four updates a median round needs are receipted (so on disk, in the
    side file its journal counts), then the aggregator is killed: the restarted one
    holds all three and closes the round with a fourth device's."""
    checkpoint = tmp_path / "agg.ckpt"
    command = [*FEDMQ, "aggregator", "--broker", broker.url, "--fleet", "held",
               "--min-updates", "4", "--rounds", "1", "--model", "logreg",
               "--aggregation", "median", "--checkpoint", str(checkpoint),
               "--log-level", "WARNING"]
    processes.append(subprocess.Popen(command))
    agents = make_agents(broker.url, stoppers, 3, total=4, fleet="held", start=False)
    for i, agent in enumerate(agents):  # one commit each: the first whole, then journals
        agent.start()
        stoppers(agent.stop)
        wait_for(lambda i=i: sum(a.stats.receipts["accepted"] for a in agents) > i,
                 f"receipt {i + 1} in round 1")
    processes[0].send_signal(signal.SIGKILL)
    processes[0].wait(30)
    held = CheckpointStore(checkpoint).load()["machine"]["open"]
    assert len(held["acc"]["tensors"]) == len(held["contributions"]) == 3
    assert (tmp_path / "agg.ckpt.updates-0").exists()

    processes.append(subprocess.Popen(command))
    agents += make_agents(broker.url, stoppers, 1, total=4, first=3, fleet="held")
    assert processes[1].wait(120) == 0  # exits by itself after round 1
    (record,) = CheckpointStore(checkpoint).load()["history"]
    assert record["participants"] == 4
    assert_every_update_accounted_for(agents, counted_in(checkpoint))


@pytest.mark.parametrize("kill", [True, False], ids=["sigkill", "clean-restart"])
def test_broker_killed_mid_round_and_restarted_empty(broker, tmp_path, stoppers, kill):
    from .helpers import make_aggregator

    # Rounds to spare after the kill: it lands in round 3 or a little later.
    service = make_aggregator(broker.url, tmp_path, stoppers, rounds=40, min_updates=3,
                              fleet="chaos", model="logreg", start=False)
    round_three_under_way = threading.Event()

    class Watch(AggregatorObserver):  # rounds of a few ms: polling can miss them all
        def update_accepted(self, *, device_id: str, round: int, counted: bool) -> None:
            if round >= 3:
                round_three_under_way.set()

    service.observers.add(Watch())
    service.start()
    stoppers(service.stop)
    agents = make_agents(broker.url, stoppers, 3, fleet="chaos")
    assert round_three_under_way.wait(60), "no update of round 3 came in"
    broker.stop(kill=kill)  # SIGKILL: no sessions, no queued or retained messages survive
    broker.start()
    wait_for(service.finished.is_set, "40 rounds across the broker restart")
    assert [r.round for r in service.history] == list(range(1, 41))
    assert all(r.participants == 3 for r in service.history)
    assert service.history[-1].accuracy > 0.8
    wait_for(lambda: all(len(a.outbox) == 0 for a in agents), "outboxes to drain")
    settle(service, agents)
    assert service.accepted == in_service(service)
    assert_every_update_accounted_for(agents, in_service(service))


@pytest.fixture
def fast_reconnects(monkeypatch):
    """Links built after this retry within 0.3 s: cut devices rejoin promptly."""
    import fedmq.transport.mqtt as mqtt_module

    monkeypatch.setattr(mqtt_module, "RECONNECT_MAX_S", 0.3)
    monkeypatch.setattr(mqtt_module, "RECONNECT_MIN_S", 0.05)


def proxied_agents(broker, stoppers, pool, count, *, fleet):
    """Each device connects through its own fault proxy."""
    agents = []
    for i in range(count):
        agents += make_agents(pool.url(f"dev{i}"), stoppers, 1, total=count, first=i,
                              fleet=fleet)
    return agents


def test_a_device_offline_for_three_rounds_rejoins_on_the_latest_model(
        broker, tmp_path, stoppers, fast_reconnects):
    from simulator.faultproxy import ProxyPool

    from .helpers import make_aggregator

    pool = ProxyPool.for_broker(broker.url)
    stoppers(pool.stop)
    # Enough rounds that dev3 is back before they run out: with TCP_NODELAY a round of
    # this fleet takes ~10 ms, dev3's reconnect up to a second.
    service = make_aggregator(broker.url, tmp_path, stoppers, rounds=100, min_updates=3,
                              fleet="away", model="logreg")
    agents = proxied_agents(broker, stoppers, pool, 4, fleet="away")
    away = agents[3]
    wait_for(lambda: len(service.history) >= 1, "a first round")
    pool.proxy("dev3").cut()
    wait_for(lambda: not away.link.connected.is_set(), "dev3 to drop off")
    cut_at = len(service.history)
    wait_for(lambda: len(service.history) >= cut_at + 3, "3 rounds without dev3")
    assert "dev3" not in service.machine.open.devices  # still away
    pool.proxy("dev3").restore()
    # back online, it takes the newest model, trains on it and is counted again
    wait_for(lambda: any(r > cut_at + 3 for (d, _u), (r, _v) in service.machine.recent.items()
                         if d == "dev3"), "dev3 counted in a round after its return")
    wait_for(service.finished.is_set, "the remaining rounds with dev3 back")
    assert away.receiver.held_version >= cut_at + 3
    wait_for(lambda: all(len(a.outbox) == 0 for a in agents), "every outbox to drain")
    assert service.history[-1].accuracy > 0.8
    settle(service, agents)
    assert service.accepted == in_service(service)
    assert_every_update_accounted_for(agents, in_service(service))


def test_training_completes_when_30_percent_of_devices_drop_every_round(
        broker, tmp_path, stoppers, fast_reconnects):
    import random

    from simulator.faultproxy import ProxyPool

    from .helpers import make_aggregator

    pool = ProxyPool.for_broker(broker.url)
    stoppers(pool.stop)
    devices = [f"dev{i}" for i in range(10)]
    service = make_aggregator(broker.url, tmp_path, stoppers, rounds=6, min_updates=7,
                              fleet="drop", model="logreg", deadline_s=60, epochs=5,
                              lr=0.2)
    agents = proxied_agents(broker, stoppers, pool, 10, fleet="drop")
    rng = random.Random(0)
    for done in range(6):  # before each round: a different 30% of the fleet is gone
        wait_for(lambda d=done: len(service.history) >= d or service.finished.is_set(),
                 f"round {done}")
        dropped = set(rng.sample(devices, 3))
        for device in devices:
            if device in dropped:
                pool.proxy(device).cut()
            else:
                pool.proxy(device).restore()
    wait_for(service.finished.is_set, "6 rounds with 30% dropping out")
    for device in devices:
        pool.proxy(device).restore()
    assert all(r.participants >= 7 for r in service.history)
    assert service.history[-1].accuracy > 0.8
    wait_for(lambda: all(len(a.outbox) == 0 for a in agents), "every outbox to drain")
    settle(service, agents)
    assert service.accepted == in_service(service)
    assert_every_update_accounted_for(agents, in_service(service))


def test_an_agent_process_sigkilled_before_its_update_got_out_sends_it_after_restart(
        broker, tmp_path, stoppers, processes, fast_reconnects):
    """(e) with a real `fedmq agent`: trained and stored, its link down, then SIGKILL."""
    from edge_agent.outbox import Outbox
    from simulator.faultproxy import ProxyPool

    from .helpers import make_aggregator

    pool = ProxyPool.for_broker(broker.url)
    stoppers(pool.stop)
    service = make_aggregator(broker.url, tmp_path, stoppers, rounds=1, min_updates=3,
                              fleet="kill", model="logreg")
    others = make_agents(broker.url, stoppers, 2, total=3, fleet="kill")
    state = tmp_path / "dev2"
    # slowdown: its local training takes seconds, long enough to cut its link meanwhile
    command = [*FEDMQ, "agent", "--broker", pool.url("dev2"), "--fleet", "kill",
               "--device-id", "dev2", "--device-index", "2", "--device-count", "3",
               "--state-dir", str(state), "--slowdown", "3000", "--log-level", "INFO"]
    processes.append(subprocess.Popen(command, stderr=subprocess.PIPE, text=True))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(processes[0].stderr), daemon=True)
    reader.start()
    wait_for(lambda: any("training on model v0" in line for line in lines), "dev2 training")
    proxy = pool.proxy("dev2")
    proxy.cut()  # its update, once trained and stored, cannot get out
    wait_for(lambda: len(Outbox(state / "outbox")) == 1, "dev2's trained, stored update",
             timeout=120)
    processes[0].send_signal(signal.SIGKILL)
    processes[0].wait(30)
    reader.join(30)  # the pipe's end
    (stored,) = Outbox(state / "outbox").ids()
    assert "dev2" not in service.machine.open.devices  # it never got out

    proxy.restore()
    command[-1] = "WARNING"  # nobody reads this one's log: keep the pipe from filling
    processes.append(subprocess.Popen(command, stderr=subprocess.PIPE, text=True))
    wait_for(service.finished.is_set, "round 1 with the restarted device", timeout=120)
    assert service.history[0].participants == 3
    assert ("dev2", stored) in service.machine.recent  # counted: the very update it stored
    wait_for(lambda: len(Outbox(state / "outbox")) == 0, "the receipt to clear dev2's outbox")
    assert service.accepted == in_service(service) and len(others) == 2
