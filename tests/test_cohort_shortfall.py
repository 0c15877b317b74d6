"""A simulated fleet whose selected cohort, less the devices its dropout cuts off, cannot
reach the K updates a round closes on is told so before it starts, with the fix."""

from __future__ import annotations

import logging

import pytest

from simulator.config import SimulationConfig
from simulator.fleet import Simulation


@pytest.mark.parametrize(("settings", "says"), [
    (dict(devices=100, clients_per_round=20, dropout=0.3),
     "about 18.2 of the 26 devices a round asks (clients_per_round 20 x over_select 1.3) "
     "can answer: most rounds will close at their 30 s deadline short of 20 updates; "
     "--over-select 1.8 asks enough"),
    (dict(devices=25, clients_per_round=20, dropout=0.3), "fewer --clients-per-round (at most 17)"),
    (dict(devices=100, clients_per_round=20, dropout=0.3, over_select=1.8), ""),
    (dict(devices=100, clients_per_round=20, dropout=0.0), ""),
    (dict(devices=100, dropout=0.3), ""),  # no selection: the quorum counts who is not cut
])
def test_the_shortfall_is_computed_from_the_cohort_and_the_dropout(settings, says):
    shortfall = SimulationConfig(**settings).cohort_shortfall()
    assert (says in shortfall) if says else shortfall == ""


def test_the_suggested_over_selection_is_enough():
    suggested = SimulationConfig(devices=100, clients_per_round=20, dropout=0.45)
    fixed = float(suggested.cohort_shortfall().split("--over-select ")[1].split()[0])
    assert SimulationConfig(devices=100, clients_per_round=20, dropout=0.45,
                            over_select=fixed).cohort_shortfall() == ""


def test_a_simulation_says_it_at_start(tmp_path, caplog):
    config = SimulationConfig(devices=10, clients_per_round=6, dropout=0.3, rounds=1,
                              model="logreg", timeout_s=120, deadline_s=5)
    with caplog.at_level(logging.WARNING, logger="simulator.fleet"), \
            Simulation(config, workdir=tmp_path / "sim") as sim:
        sim.wait()
    assert any("short of 6 updates" in r.getMessage() for r in caplog.records)
