"""Broker lists: a link whose broker dies moves on to the next address of its list, and the
outbox and receipts make the move lossless (nothing lost, nothing counted twice)."""

from __future__ import annotations

import logging

import pytest

from fedmq.transport.mqtt import MqttLink

from .helpers import make_agents, make_aggregator, wait_for

pytestmark = pytest.mark.integration


def test_a_link_moves_to_the_next_broker_and_back_round_the_list(broker_factory, stoppers,
                                                                 caplog):
    caplog.set_level(logging.WARNING)
    first, second = broker_factory(name="a"), broker_factory(name="b")
    link = MqttLink(client_id="dev-a", broker=[first.url, second.url])
    link.start()
    stoppers(link.stop)
    link.wait_connected(30)
    assert str(link.address) == first.url
    first.stop(kill=True)
    wait_for(lambda: link.connected.is_set() and str(link.address) == second.url,
             "the link on the second broker")
    assert link.failovers == 1
    assert any(f"lost {first.url}; trying {second.url}" in r.message for r in caplog.records)
    first.start()
    second.stop(kill=True)
    wait_for(lambda: link.connected.is_set() and str(link.address) == first.url,
             "the link back on the first broker")


def test_a_fleet_whose_broker_is_killed_finishes_on_the_next_one_losslessly(
        broker_factory, tmp_path, stoppers):
    """Two independent mosquittos: the first is SIGKILLed after round 1 with everything
    it held (sessions, queued updates, the retained model). The aggregator and the agents
    all list both; they move to the second, the aggregator re-announces there (no session),
    agents re-send what has no receipt, at once, and every update counts once."""
    first, second = broker_factory(name="a"), broker_factory(name="b")
    brokers = f"{first.url},{second.url}"
    service = make_aggregator(brokers, tmp_path, stoppers, rounds=4, min_updates=3)
    # A backoff longer than the test: what reaches the aggregator after the move was
    # sent on the device's reconnect, or re-sent on its re-announcement there.
    agents = make_agents(brokers, stoppers, 3, resend_after_s=600.0)
    wait_for(lambda: len(service.history) >= 1, "the first round")
    first.stop(kill=True)
    wait_for(service.finished.is_set, "4 rounds across the failover")
    assert [r.round for r in service.history] == [1, 2, 3, 4]
    assert all(r.participants == 3 for r in service.history)
    assert all(str(x.link.address) == second.url for x in [service, *agents])
    assert all(x.link.failovers >= 1 for x in [service, *agents])
    # An update re-sent on reconnect can reach the second broker before the aggregator has
    # subscribed there; the aggregator's announcement there sends it again.
    wait_for(lambda: all(len(a.outbox) == 0 for a in agents), "every outbox to drain",
             timeout=120)
    wait_for(lambda: sum(a.stats.receipts["accepted"] for a in agents) == service.accepted,
             "a receipt for every counted update")
    counted = sum(r.participants for r in service.history) + len(service.machine.open.devices)
    assert service.accepted == counted
    assert service.history[-1].accuracy > service.history[0].accuracy


def test_an_update_sent_before_the_aggregator_reached_the_new_broker_goes_again_on_its_announcement(
        broker_factory, tmp_path, stoppers):
    """The devices move first: what they send on reconnecting reaches a broker with nobody
    subscribed, and is gone. When the aggregator arrives and announces the model they
    hold, they send it again at once, not after their backoff (here longer than the test)."""
    import threading

    from simulator.faultproxy import FaultProxy

    first, second = broker_factory(name="a"), broker_factory(name="b")
    ways_in = []  # the aggregator reaches each broker through a link the test can cut
    for broker in (first, second):
        proxy = FaultProxy(upstream_host="127.0.0.1", upstream_port=broker.port).start()
        stoppers(proxy.stop)
        ways_in.append(proxy)
    service = make_aggregator(",".join(p.url for p in ways_in), tmp_path, stoppers, rounds=2,
                              min_updates=3, deadline_s=600.0)
    turns = threading.Semaphore(0)  # no device trains round 1 before the test says so
    agents = make_agents(f"{first.url},{second.url}", stoppers, 3, resend_after_s=600.0,
                         start=False)
    for agent in agents:
        agent.trainer.compute_gate = turns
        agent.start()
        stoppers(agent.stop)
    wait_for(lambda: all(a.receiver.announcement is not None for a in agents),
             "round 1's model on every device")
    for proxy in ways_in:
        proxy.cut()  # the aggregator is away while the devices send their updates
    turns.release(len(agents))
    wait_for(lambda: all(len(a.outbox) == 1 for a in agents), "round 1's updates, unreceipted")
    first.stop(kill=True)

    def sent_again_on_the_second_broker(agent) -> bool:
        entries = [agent.outbox.get(i) for i in agent.outbox.ids()]
        return (str(agent.link.address) == second.url and agent.link.connected.is_set()
                and all(e is not None and e.last_sent > 0 for e in entries))

    wait_for(lambda: all(sent_again_on_the_second_broker(a) for a in agents),
             "the devices' re-sends into the second broker, where nobody listens yet")
    ways_in[1].restore()
    wait_for(service.finished.is_set, "rounds 1 and 2 on the second broker", timeout=120)
    assert [r.participants for r in service.history] == [3, 3]
    wait_for(lambda: all(len(a.outbox) == 0 for a in agents), "every outbox to drain")


def test_a_retained_model_the_broker_lost_comes_back_at_the_next_deadline(broker, tmp_path,
                                                                           stoppers):
    """A loaded NATS cluster failed to store a retained model ("unable to store retained
    message ... timeout"): a device that subscribes later finds nothing. A round short of
    updates at its deadline announces its model again, so that device still trains."""
    service = make_aggregator(broker.url, tmp_path, stoppers, rounds=1, min_updates=3,
                              deadline_s=1.0)
    make_agents(broker.url, stoppers, 2, total=3)
    wait_for(lambda: service.machine.open.count == 2, "two updates")
    eraser = MqttLink(client_id="eraser", broker=broker.url)
    eraser.start()
    stoppers(eraser.stop)
    eraser.wait_connected(30)
    # what the broker lost: the retained announcement (an empty retained message clears it)
    eraser.publish(service.topics.model_current, b"", qos=1, retain=True).wait_for_publish(30)
    (late,) = make_agents(broker.url, stoppers, 1, total=3, first=2)
    wait_for(service.finished.is_set, "the round, with the late device")
    assert late.stats.updates_sent >= 1 and service.history[0].participants == 3
