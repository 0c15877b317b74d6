"""Hosted devices: DeviceMachines on one session loop train real rounds over a real broker."""

from __future__ import annotations

import threading

import pytest

from fedmq.tasks import device_shards
from simulator.host import DeviceHost

from .helpers import make_aggregator, wait_for

pytestmark = pytest.mark.integration


def hosted(broker, stoppers, count: int, **kwargs) -> DeviceHost:
    shards = device_shards("digits", device_count=count, alpha=0.5, seed=0)
    host = DeviceHost(broker=broker.url, fleet="test", count=count,
                      data_for=lambda i: shards[i], **kwargs)
    host.start()
    stoppers(host.close)
    return host


def test_hosted_devices_train_rounds_with_a_cohort(broker, tmp_path, stoppers):
    threads_before = threading.active_count()
    host = hosted(broker, stoppers, 12)
    wait_for(lambda: host.loop.ready_count == 12, "12 hosted devices online")
    assert threading.active_count() - threads_before <= 2  # the loop and its ticker
    service = make_aggregator(broker.url, tmp_path, stoppers, model="logreg", rounds=3,
                              min_updates=4, clients_per_round=4)
    wait_for(service.finished.is_set, "3 rounds trained by hosted devices", timeout=120)
    assert service.failure is None
    # ceil(4 x 1.3) = 6 asked per round: the round closes on 4 or more of them
    assert all(4 <= r.participants <= 6 for r in service.history), service.history
    assert len(service.history) == 3
    # the other 6 sit out, downloading nothing; every update sent gets its receipt
    wait_for(lambda: sum(host.stats.settled.values()) == host.stats.trained, "every receipt")
    assert host.stats.sat_out >= 3 * 6 and host.stats.settled["accepted"] >= 12
    assert host.stats.rejected == {} and host.stats.train_errors == 0
    # per round: who uploaded (first sends), what went up and came down
    assert sum(up_down_n[2] for up_down_n in host.stats.traffic.values()) == host.stats.sent
    assert all(up > 0 and down > 0 for up, down, _ in host.stats.traffic.values())


def test_hosted_devices_come_back_after_a_broker_restart(broker, tmp_path, stoppers):
    host = hosted(broker, stoppers, 8)
    wait_for(lambda: host.loop.ready_count == 8, "8 hosted devices online")
    broker.stop()
    wait_for(lambda: host.loop.ready_count == 0, "the devices to notice")
    broker.start()
    service = make_aggregator(broker.url, tmp_path, stoppers, model="logreg", rounds=2,
                              min_updates=8)
    wait_for(service.finished.is_set, "2 rounds after the restart", timeout=120)
    assert [r.participants for r in service.history] == [8, 8]
