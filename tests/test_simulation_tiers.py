"""`fedmq simulate --workers N` and `--sites N`: the layouts of docs/scale.md on one machine,
with real worker / site aggregator processes, real (bridged) mosquittos and real devices."""

from __future__ import annotations

import re

import pytest

from aggregator.partial import Shard
from fedmq.cli import main
from fedmq.errors import ConfigError
from simulator.config import SimulationConfig, device_id
from simulator.fleet import Simulation
from simulator.tiers import site_blocks

pytestmark = pytest.mark.integration

DEVICES, ROUNDS = 6, 2


def test_simulate_with_two_workers_counts_every_device_once_per_round(capsys):
    """Through the CLI: two worker processes and the reducer; every round counts every
    device, and each worker folds exactly its shard's devices once a round. The fleet is
    named, so the shards are known: a fresh random name can leave one worker no device
    (1 in 32 for 6 devices) and the test would say nothing about it."""
    fleet = "sim-workers"
    owned = {f"w{i}": sum(Shard(i, 2).owns(device_id(fleet, d)) for d in range(DEVICES))
             for i in range(2)}
    assert all(owned.values()), owned  # both workers have devices under this name
    code = main(["simulate", "--devices", str(DEVICES), "--rounds", str(ROUNDS),
                 "--workers", "2", "--fleet", fleet, "--quiet", "--timeout-s", "240"])
    out = capsys.readouterr().out
    assert code == 0, out
    folded = {name: int(n) for name, n in re.findall(r"\b(w\d) (\d+)", out)}
    assert folded == {name: n * ROUNDS for name, n in owned.items()}, out
    accuracy = float(re.search(r"final accuracy (\d\.\d+)", out).group(1))
    assert accuracy > 0.5


def test_simulate_with_two_sites_trains_through_bridged_brokers():
    config = SimulationConfig(devices=DEVICES, rounds=ROUNDS, sites=2, timeout_s=240)
    with Simulation(config) as sim:
        assert len(sim.site_urls) == 2 and len(set(sim.site_urls)) == 2
        # the devices connect to their site's broker only
        brokers = {a.config.device_id: a.config.broker for a in sim.agents}
        assert sorted(brokers.values()) == sorted(sim.site_urls * (DEVICES // 2))
        assert sim.broker is not None and sim.broker.url not in brokers.values()
        result = sim.wait()
    assert [r.participants for r in result.rounds] == [DEVICES] * ROUNDS
    assert result.partials == {"site0": 3 * ROUNDS, "site1": 3 * ROUNDS}
    assert not result.rejected
    assert result.final_accuracy is not None and result.final_accuracy > 0.5


def test_site_blocks_cover_every_device_once():
    for devices in (1, 2, 7, 100):
        for sites in range(1, devices + 1):
            blocks = site_blocks(devices, sites)
            assert [i for b in blocks for i in b] == list(range(devices))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


@pytest.mark.parametrize("settings, says", [
    (dict(workers=2, sites=2), "not both"),
    (dict(workers=65), "at most 64"),
    (dict(sites=11), "every site needs a device"),
    (dict(sites=2, broker="mqtt://127.0.0.1:1"), "leave out --broker"),
    (dict(sites=2, dropout=0.2), "does not combine"),
    (dict(workers=2, aggregation="median"), "aggregation = mean"),
])
def test_simulate_refuses_what_workers_or_sites_cannot_do(settings, says):
    with pytest.raises(ConfigError, match=says):
        SimulationConfig(devices=10, **settings)
