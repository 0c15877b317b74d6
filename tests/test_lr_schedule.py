"""lr_decay: the devices' learning rate falls on a cosine over the run, sent each round."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aggregator.config import AggregatorConfig
from aggregator.strategy.schedule import cosine_lr
from fedmq.core.protocol import FleetTopics, ModelAnnouncement
from fedmq.errors import ConfigError
from fedmq.transport.mqtt import MqttLink

from .helpers import make_agents, make_aggregator, wait_for

rates = st.floats(1e-4, 10.0)
floors = st.floats(1e-3, 1.0)


@given(rates, floors, st.integers(2, 500))
def test_the_cosine_starts_at_lr_ends_at_the_floor_and_never_rises(lr, floor, steps):
    values = [cosine_lr(lr, floor=floor, step=s, steps=steps) for s in range(0, steps + 3)]
    assert values[1] == pytest.approx(lr) and values[0] == pytest.approx(lr)
    assert values[steps] == pytest.approx(lr * floor)
    assert values[-1] == pytest.approx(lr * floor)  # rounds past the last: the floor
    assert all(b <= a * (1 + 1e-12) for a, b in itertools.pairwise(values))
    assert all(lr * floor * (1 - 1e-12) <= v <= lr * (1 + 1e-12) for v in values)


@given(rates, st.integers(-5, 50), st.integers(0, 50))
def test_no_decay_or_a_single_round_is_a_constant_rate(lr, step, steps):
    assert cosine_lr(lr, floor=1.0, step=step, steps=steps) == lr
    assert cosine_lr(lr, floor=0.1, step=step, steps=min(steps, 1)) == lr


def test_the_midpoint_is_halfway_between_lr_and_the_floor():
    assert cosine_lr(1.0, floor=0.1, step=3, steps=5) == pytest.approx(0.55)


@pytest.mark.parametrize("settings, message", [
    (dict(lr_decay=0.0, rounds=10), r"lr_decay 0.0 must be in \(0, 1\]"),
    (dict(lr_decay=1.5, rounds=10), r"must be in \(0, 1\]"),
    (dict(lr_decay=math.nan, rounds=10), r"must be in \(0, 1\]"),
    (dict(lr_decay=0.1, rounds=0), r"set rounds"),
])
def test_a_decay_out_of_range_or_without_rounds_is_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        AggregatorConfig(broker="mqtt://127.0.0.1:1", **settings)


def test_devices_are_told_each_rounds_rate_and_the_records_say_it(broker, tmp_path, stoppers):
    told: dict[int, float] = {}
    watcher = MqttLink(client_id="watcher", broker=broker.url)

    def note(message) -> None:
        announcement = ModelAnnouncement.from_payload(message.payload)
        told[announcement.round] = announcement.task.lr

    watcher.route(FleetTopics("test").model_current, note)
    watcher.start()
    stoppers(watcher.stop)
    service = make_aggregator(broker.url, tmp_path, stoppers, rounds=3, lr=0.1, lr_decay=0.1)
    make_agents(broker.url, stoppers, 3)
    wait_for(lambda: len(service.history) == 3, "three rounds")
    wait_for(lambda: 3 in told, "round 3's announcement")
    assert [told[r] for r in (1, 2, 3)] == pytest.approx([0.1, 0.055, 0.01])
    assert [r.lr for r in service.history] == pytest.approx([0.1, 0.055, 0.01])
