"""Training through a mixed fleet: waiting for every device vs over-selection with a time
budget vs async FedBuff, side by side on the same devices, data and seed.

The fleet is `--profiles mixed`: Pi 4s, Pi Zeros (8x slower compute) and cellular devices
(3x slower, 128 kbit/s uplink through their fault proxy). Each strategy trains until the
held-out accuracy reaches --target or --budget-s runs out; the table shows the wall time
to the target, the accuracy at the end, and what the devices uploaded.

    python benchmarks/heterogeneity.py [--devices 14 --target 0.85 --budget-s 40]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass

from aggregator.broker import LocalMosquitto
from aggregator.simulator import Simulation, SimulationConfig


@dataclass
class Outcome:
    name: str
    time_to_target: float | None
    steps: int
    accuracy: float
    updates: int
    stale: int
    partial: int
    kib_up: float


def strategies(devices: int) -> dict[str, dict]:
    k = max(2, devices // 2)
    return {
        "sync, wait for all": {},
        f"sync, K={k} x1.3, budget 0.5 s": {
            "clients_per_round": k, "over_select": 1.3, "time_budget_s": 0.5,
            "constrained_epochs": 1, "slow_link_codec": "top2-sign-ef"},
        f"async FedBuff, K={max(2, devices // 4)}": {
            "mode": "async", "buffer_size": max(2, devices // 4), "time_budget_s": 0.5,
            "late_updates": "fold"},
    }


def run(name: str, overrides: dict, args: argparse.Namespace, broker_url: str) -> Outcome:
    config = SimulationConfig(
        devices=args.devices, rounds=10_000, seed=args.seed, profiles="mixed", alpha=0.5,
        epochs=2, lr=0.1, broker=broker_url, deadline_s=30.0, timeout_s=args.budget_s + 60,
        **overrides)
    with Simulation(config) as sim:
        started = time.monotonic()
        reached = None
        while time.monotonic() - started < args.budget_s:
            with sim.round_closed:
                sim.round_closed.wait(0.2)
            records = list(sim.records)
            if records and reached is None and (records[-1].accuracy or 0) >= args.target:
                reached = time.monotonic() - started
                break
        records = list(sim.records)
        up = sum(sum(v[0] for v in a.stats.traffic.values()) for a in sim.agents)
    return Outcome(name=name, time_to_target=reached, steps=len(records),
                   accuracy=records[-1].accuracy if records else 0.0,
                   updates=sum(r.participants for r in records),
                   stale=sum(r.stale for r in records), partial=sum(r.partial for r in records),
                   kib_up=up / 1024)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=14)
    parser.add_argument("--target", type=float, default=0.85)
    parser.add_argument("--budget-s", type=float, default=40.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # refused stale updates are expected here
    outcomes = []
    with LocalMosquitto() as broker:
        for name, overrides in strategies(args.devices).items():
            print(f"running {name} ...", file=sys.stderr, flush=True)
            outcomes.append(run(name, overrides, args, broker.url))
    print(f"\n{args.devices} devices, profiles=mixed, target accuracy {args.target:.2f}, "
          f"budget {args.budget_s:.0f} s per strategy\n")
    print(f"{'strategy':34s} {'to target':>10s} {'steps':>6s} {'accuracy':>9s} "
          f"{'updates':>8s} {'stale':>6s} {'partial':>8s} {'KiB up':>9s}")
    for o in outcomes:
        ttt = f"{o.time_to_target:.1f} s" if o.time_to_target is not None else "-"
        print(f"{o.name:34s} {ttt:>10s} {o.steps:6d} {o.accuracy:9.4f} {o.updates:8d} "
              f"{o.stale:6d} {o.partial:8d} {o.kib_up:9.1f}")
    base = outcomes[0].time_to_target
    best = min((o for o in outcomes if o.time_to_target is not None),
               key=lambda o: o.time_to_target, default=None)
    if best is None:
        print("summary: no strategy reached the target within the budget")
    elif base is None:
        print(f"summary: {best.name} reached {args.target:.2f} in {best.time_to_target:.1f} s; "
              f"waiting for every device did not within {args.budget_s:.0f} s")
    else:
        print(f"summary: {best.name} reached {args.target:.2f} in {best.time_to_target:.1f} s, "
              f"{base / best.time_to_target:.1f}x faster than waiting for every device "
              f"({base:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
