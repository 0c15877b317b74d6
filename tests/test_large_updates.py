"""Multi-part updates of a ~1M-parameter model over a real mosquitto (#13 item 5, #17).

The small version of benchmarks/large_model.py: updates of 4 MB go up in ~60 Parts of
64 KiB each. The aggregator's reassembly budget is set to exactly one share per device
(the tightest an operator may set), and a hostile sender outside the cohort floods the
aggregator with transfers declaring the largest size it accepts (the whole budget),
stray parts of transfers it never opened, and a trickle into its open transfer to keep
it alive. Every honest
update must still be folded on its first send: with transfers admitted at any part and
no fair shares, the flood took the honest devices' room and their refused first parts
turned every later part into a transfer that could never complete.
"""

from __future__ import annotations

import itertools
import threading

import pytest

from aggregator.ingest import SHARE_BYTES_PER_PARAM, SHARE_SLACK
from fedmq.core.protocol import Part
from fedmq.transport.mqtt import MqttLink

from .helpers import make_agents, make_aggregator, wait_for

pytestmark = pytest.mark.integration

DEVICES = 4
HIDDEN = 13_333  # a digits mlp of 75 x 13,333 + 10 = 999,985 parameters (4 MB of float32)
PARAMS = 75 * HIDDEN + 10
AGENT_MAX_PAYLOAD = 64 * 1024


def flood(link: MqttLink, topic: str, declared: int, stop: threading.Event) -> None:
    """Mallory's garbage, paced so the broker's queue never drops honest messages."""
    serial = itertools.count()
    open_parts: list[Part] = []
    while not stop.wait(0.02):
        n = next(serial)
        if n % 10 == 0:  # a new transfer declaring the most an update may take
            tid = n.to_bytes(8, "big")
            open_parts = [Part(transfer_id=tid, index=i, count=50, size=declared,
                               sha256=bytes(32), data=b"x" * 100) for i in range(50)]
            link.publish(topic, open_parts.pop(0).to_payload(), qos=1)
        elif n % 3 == 0:  # a part of a transfer it never opened
            stray = Part(transfer_id=(n + 1 << 32).to_bytes(8, "big"), index=7, count=50,
                         size=declared, sha256=bytes(32), data=b"y" * 100)
            link.publish(topic, stray.to_payload(), qos=1)
        elif open_parts:  # keeps its open transfer from timing out
            link.publish(topic, open_parts.pop(0).to_payload(), qos=1)


def test_a_hostile_sender_cannot_starve_honest_multi_part_updates(broker, tmp_path,
                                                                   stoppers):
    share = SHARE_BYTES_PER_PARAM * PARAMS + SHARE_SLACK
    budget = DEVICES * share
    # An update may declare the whole budget: the old design let one stalled transfer of
    # mallory's hold all of it; the default (9 bytes a parameter) is 2.25 shares of it.
    service = make_aggregator(broker.url, tmp_path, stoppers, hidden=HIDDEN, rounds=2,
                              min_updates=DEVICES, evaluate=False, deadline_s=120.0,
                              max_pending_bytes=budget, max_update_bytes=budget)
    mallory = MqttLink(client_id="mallory", broker=broker.url)
    mallory.start()
    stoppers(mallory.stop)
    wait_for(mallory.connected.is_set, "mallory's connection")
    stop = threading.Event()
    flooder = threading.Thread(target=flood, daemon=True, args=(
        mallory, service.topics.update("mallory"), service.ingest.max_bytes, stop))
    flooder.start()
    stoppers(flooder.join)
    stoppers(stop.set)
    wait_for(lambda: service.rejected["too_large"] + service.reassembler.pending_transfers,
             "mallory's first transfer to be taken or refused")

    agents = make_agents(broker.url, stoppers, DEVICES, max_payload=AGENT_MAX_PAYLOAD)
    wait_for(service.finished.is_set, "2 rounds beside the flood", timeout=240.0)
    stop.set()

    assert [(r.round, r.participants) for r in service.history] == [(1, DEVICES),
                                                                    (2, DEVICES)]
    for agent in agents:  # every update counted on its first send: none refused
        assert agent.stats.resent == 0, agent.config.device_id
    for record in service.history:
        assert record.bytes_up > DEVICES * 4 * PARAMS  # they did go up in parts
        sent = sum(a.stats.traffic[record.round][0] for a in agents)
        assert sent == record.bytes_up, "every byte uploaded was needed"
    assert service.rejected["too_large"] > 0  # mallory's transfers, refused
    assert service.rejected["incomplete"] > 0  # its stray parts, each refused once
