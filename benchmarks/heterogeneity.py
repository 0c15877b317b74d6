"""Training through stragglers and flaky links: sync vs sync+FedProx vs async FedBuff,
side by side on the same devices, data and seed.

The fleet is `--profiles stragglers` (20 devices: 30% compute 10x slower, 30% sit behind a
fault proxy whose link is down about 3 s of every 7, the rest are well). Each strategy trains
for --budget-s seconds of wall time; the table shows wall time and rounds (server steps)
until the held-out accuracy first reached --target, the accuracy at the end of the
budget, and what was uploaded.
`--profiles mixed` runs the same comparison on Pi 4s, Pi Zeros and cellular links.

    python benchmarks/heterogeneity.py [--devices 20 --target 0.95 --budget-s 40]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass

from simulator.broker import LocalMosquitto
from simulator.fleet import Simulation, SimulationConfig


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
    """Sync waits for 70% of the fleet (all but the 30% that are offline at any time);
    sync+FedProx over-selects K = half the fleet and gives every device a time budget, so a
    slow device sends partial work that the proximal term keeps useful."""
    k = max(2, devices // 2)
    return {
        "sync FedAvg, wait for 70%": {"min_updates": max(1, int(devices * 0.7))},
        f"sync+FedProx, K={k} x1.3, budget": {
            "clients_per_round": k, "over_select": 1.3, "time_budget_s": 0.05,
            "prox_mu": 0.01},
        f"async FedBuff, K={max(2, devices // 4)}": {
            "mode": "async", "buffer_size": max(2, devices // 4)},
    }


def run(name: str, overrides: dict, args: argparse.Namespace, broker_url: str) -> Outcome:
    config = SimulationConfig(
        devices=args.devices, rounds=10_000, seed=args.seed, profiles=args.profiles,
        alpha=0.5, epochs=5, lr=0.05, broker=broker_url, deadline_s=10.0,
        timeout_s=args.budget_s + 60,
        **overrides)
    with Simulation(config) as sim:
        started = time.monotonic()
        reached, rounds_to_target = None, None
        while time.monotonic() - started < args.budget_s:
            with sim.round_closed:
                sim.round_closed.wait(0.2)
            records = list(sim.records)
            if records and reached is None and (records[-1].accuracy or 0) >= args.target:
                reached = time.monotonic() - started
                rounds_to_target = len(records)
        records = list(sim.records)
        up = sum(sum(v[0] for v in a.stats.traffic.values()) for a in sim.agents)
    return Outcome(name=name, time_to_target=reached, steps=rounds_to_target or 0,
                   accuracy=records[-1].accuracy if records else 0.0,
                   updates=sum(r.participants for r in records),
                   stale=sum(r.stale for r in records), partial=sum(r.partial for r in records),
                   kib_up=up / 1024)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--profiles", default="stragglers")
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--budget-s", type=float, default=40.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # refused stale updates are expected here
    outcomes = []
    with LocalMosquitto() as broker:
        for name, overrides in strategies(args.devices).items():
            print(f"running {name} ...", file=sys.stderr, flush=True)
            outcomes.append(run(name, overrides, args, broker.url))
    print(f"\n{args.devices} devices, profiles={args.profiles}, target accuracy {args.target:.2f}, "
          f"budget {args.budget_s:.0f} s per strategy\n")
    print(f"{'strategy':34s} {'to target':>10s} {'rounds':>6s} {'accuracy':>9s} "
          f"{'updates':>8s} {'stale':>6s} {'partial':>8s} {'KiB up':>9s}")
    for o in outcomes:
        ttt = f"{o.time_to_target:.1f} s" if o.time_to_target is not None else "-"
        steps = str(o.steps) if o.time_to_target is not None else "-"
        print(f"{o.name:34s} {ttt:>10s} {steps:>6s} {o.accuracy:9.4f} {o.updates:8d} "
              f"{o.stale:6d} {o.partial:8d} {o.kib_up:9.1f}")
    base = outcomes[0].time_to_target
    best = min((o for o in outcomes if o.time_to_target is not None),
               key=lambda o: o.time_to_target, default=None)
    if best is None:
        print("summary: no strategy reached the target within the budget")
    elif base is None:
        print(f"summary: {best.name} reached {args.target:.2f} in {best.time_to_target:.1f} s; "
              f"sync FedAvg did not within {args.budget_s:.0f} s")
    else:
        print(f"summary: {best.name} reached {args.target:.2f} in {best.time_to_target:.1f} s, "
              f"{base / best.time_to_target:.1f}x faster than sync FedAvg "
              f"({base:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
