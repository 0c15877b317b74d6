"""`fedmq simulate`'s hosted engine end to end: device processes, a real broker, rounds."""

from __future__ import annotations

import logging

import pytest

from simulator import fleet
from simulator.config import SimulationConfig
from simulator.fleet import Simulation, SimulationResult

pytestmark = pytest.mark.integration


def test_a_hosted_fleet_trains_every_device_every_round():
    config = SimulationConfig(devices=30, task="synthetic-iid", rounds=3, engine="hosted")
    with Simulation(config) as sim:
        assert len(sim.hosts) == 1 and not sim.agents
        result = sim.wait()
    assert [r.participants for r in result.rounds] == [30, 30, 30]
    assert all(r.bytes_down and r.bytes_up for r in result.rounds)
    assert result.final_accuracy > 0.3  # chance is 0.1
    assert result.never_connected_count == 0 and "never came online" not in result.summary()


def test_devices_that_never_come_online_are_named_with_the_cause(broker_factory, monkeypatch,
                                                                 caplog):
    monkeypatch.setattr(fleet, "ONLINE_WAIT_S", 2.0)
    locked = broker_factory("allow_anonymous false\n", name="locked")
    config = SimulationConfig(devices=4, task="synthetic-iid", rounds=1, engine="hosted",
                              broker=locked.url, fleet="shut", agents_only=True)
    with caplog.at_level(logging.WARNING, logger="simulator.fleet"), Simulation(config) as sim:
        report = sim.stop_devices()
    assert report.never_connected_count == 4 and len(report.never_connected) == 4
    assert any("refused" in cause for cause in report.failures)
    assert any("0 of 4 devices online" in r.getMessage() for r in caplog.records)
    note = SimulationResult(devices=4, never_connected=report.never_connected,
                            never_connected_count=4, connect_failures=report.failures)
    assert "4 of 4 devices never came online (shut-dev000" in note.offline_note()
