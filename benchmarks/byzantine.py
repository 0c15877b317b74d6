"""Aggregation rules under attack: final held-out accuracy on digits, rule x attack.

A fleet of --devices (20) simulated devices, --attackers (4) of them attacking as
simulator/attacks.py says (none, sign_flip, scaled, gaussian, label_flip), trains --rounds
rounds with every rule; each cell is the range (min-max) and median over --runs seeded
runs (seeds 0, 1, ...), all on one private broker, side by side. The robust rules are told
byzantine_f = attackers (Bulyan needs n >= 4f + 3: 19 of 20 here). The default adaptive
norm bound (5x the median recent norm) is on for every rule, as it is in production:
the mean column measures the mean as users get it, not an unbounded one.

    python benchmarks/byzantine.py [--devices 20 --attackers 4 --rounds 10 --runs 3]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time

from simulator.attacks import ATTACKS
from simulator.broker import LocalMosquitto
from simulator.fleet import Simulation, SimulationConfig

RULES = ("mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan", "centered_clip")


def run(rule: str, attack: str, seed: int, args: argparse.Namespace, broker: str) -> float:
    attackers = 0 if attack == "none" else args.attackers
    options = {"aggregation": rule}
    if rule == "trimmed_mean":  # cut as many from each end as there are attackers
        options["trim_fraction"] = args.attackers / args.devices + 1e-6
    if rule in ("krum", "multi_krum", "bulyan", "centered_clip"):
        options["byzantine_f"] = args.attackers
    config = SimulationConfig(devices=args.devices, rounds=args.rounds, seed=seed,
                              attackers=attackers, attack=attack if attackers else "scaled",
                              broker=broker, engine="agents", timeout_s=600, **options)
    with Simulation(config) as sim:
        accuracy = sim.wait().final_accuracy
    assert accuracy is not None
    return accuracy


def cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--attackers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--attacks", default=",".join(("none", *ATTACKS)))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    rules = [r for r in args.rules.split(",") if r]
    attacks = [a for a in args.attacks.split(",") if a]
    results: dict[tuple[str, str], list[float]] = {}
    started = time.monotonic()
    with LocalMosquitto() as broker:
        for seed in range(args.runs):
            for rule in rules:
                for attack in attacks:
                    results.setdefault((rule, attack), []).append(
                        run(rule, attack, seed, args, broker.url))
                    print(f"  seed {seed} {rule:<14} {attack:<10} "
                          f"{results[(rule, attack)][-1]:.3f}", file=sys.stderr, flush=True)
    print(f"digits, {args.devices} devices of which {args.attackers} attack, {args.rounds} "
          f"rounds; final accuracy, median (min-max) of {args.runs} runs; "
          f"{time.monotonic() - started:.0f} s")
    header = ["rule"] + [a if a != "none" else "no attack" for a in attacks]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for rule in rules:
        print("| " + " | ".join([rule] + [cell(results[(rule, a)]) for a in attacks]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
