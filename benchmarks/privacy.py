"""Privacy modes side by side on digits: final accuracy, epsilon and cost per round.

--devices (100) simulated devices train --rounds (10) rounds in each mode, --runs (3)
seeded runs each (seeds 0, 1, ...), all on one private broker. Accuracy is the median
(min-max) over runs; epsilon is at the mode's delta (central DP: the aggregator's ledger,
dp-accounting RDP; local DP: the most any device reported); seconds and KiB uploaded
are per round, medians over runs.

    python benchmarks/privacy.py [--devices 100 --rounds 10 --runs 3 --modes plain,dp]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys

from simulator.broker import LocalMosquitto
from simulator.fleet import Simulation, SimulationConfig

DELTA = 1e-4  # below 1 / devices
MODES: dict[str, tuple[str, dict]] = {
    "plain": ("every update, in the clear", {}),
    "central DP z=1 C=1": ("every update; models are DP",
                           {"dp_noise_multiplier": 1.0, "dp_clip_norm": 1.0,
                            "dp_delta": DELTA}),
    "central DP z=1 adaptive q=0.5": ("every update; models are DP",
                                      {"dp_noise_multiplier": 1.0, "dp_clip_norm": 1.0,
                                       "dp_clip_quantile": 0.5, "dp_delta": DELTA}),
    "central DP z=1 C=1 K=20 sampled": ("every sampled update; models are DP",
                                         {"dp_noise_multiplier": 1.0, "dp_clip_norm": 1.0,
                                          "dp_delta": DELTA, "clients_per_round": 20}),
    "local DP z=1 C=0.1": ("noised updates only",
                           {"ldp_clip": 0.1, "ldp_noise_multiplier": 1.0,
                            "ldp_delta": DELTA}),
}


def run(options: dict, seed: int, args: argparse.Namespace, broker: str):
    config = SimulationConfig(devices=args.devices, rounds=args.rounds, seed=seed,
                              broker=broker, engine="agents", timeout_s=900, **options)
    with Simulation(config) as sim:
        result = sim.wait()
    epsilon = result.rounds[-1].epsilon if result.rounds else None
    if result.ldp_epsilon is not None:
        epsilon = result.ldp_epsilon
    rounds = len(result.rounds)
    seconds = statistics.median(r.wall_s for r in result.rounds)
    return result.final_accuracy, epsilon, seconds, result.bytes_up / 1024 / rounds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    names = [m for m in args.modes.split(",") if m]
    rows = []
    with LocalMosquitto() as broker:
        for name in names:
            learns, options = MODES[name]
            outcomes = [run(options, seed, args, broker.url) for seed in range(args.runs)]
            acc = [o[0] for o in outcomes]
            print(f"  {name}: {acc}", file=sys.stderr, flush=True)
            epsilon = outcomes[0][1]
            rows.append([name, learns,
                         "-" if epsilon is None else f"{epsilon:.3g} (delta {DELTA:g})",
                         f"{statistics.median(acc):.3f} ({min(acc):.3f}-{max(acc):.3f})",
                         f"{statistics.median(o[2] for o in outcomes):.2f}",
                         f"{statistics.median(o[3] for o in outcomes):.0f}"])
    print(f"digits, {args.devices} devices, {args.rounds} rounds, {args.runs} runs")
    header = ["mode", "the server learns", "epsilon", "accuracy", "s/round", "KiB up/round"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
