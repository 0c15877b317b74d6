"""The key-holder hop of he = "ckks": what a separate key holder adds to a round.

Runs the digits simulation (`fedmq simulate --he ckks`: a private mosquitto, the real
aggregator, EdgeAgents, and the key holder on its own MQTT connection) with
he_decrypt = keyholder and with he_decrypt = local (the aggregator decrypts itself),
alternating, --runs times each. Reports, per key-holder run, the hop: wall seconds from
publishing a round's encrypted sum on he/decrypt to handling the reply from he/sum
(serializing, the broker both ways, the key holder's decryption and its fsynced state
write); and per mode the median wall seconds of a round (training included, so noisy).

    python benchmarks/he_keyholder.py [--runs 3 --devices 10 --rounds 10 --model mlp]
"""

from __future__ import annotations

import argparse
import statistics

from simulator.fleet import Simulation, SimulationConfig


def run(mode: str, args: argparse.Namespace, seed: int) -> tuple[list[float], list[float]]:
    config = SimulationConfig(devices=args.devices, rounds=args.rounds, model=args.model,
                              he="ckks", he_decrypt=mode, seed=seed, timeout_s=600)
    with Simulation(config) as sim:
        result = sim.wait()
        hops = list(sim.aggregator.he_hops) if sim.aggregator.he_remote else []
        assert sim.aggregator.he_remote == (mode == "keyholder")
    return hops, [r.wall_s for r in result.rounds[1:]]  # round 1 includes start-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--model", default="mlp")
    args = parser.parse_args()
    walls: dict[str, list[float]] = {"keyholder": [], "local": []}
    for i in range(args.runs):
        for mode in ("keyholder", "local"):
            hops, wall = run(mode, args, seed=i)
            walls[mode].append(statistics.median(wall))
            if hops:
                ms = sorted(h * 1000 for h in hops)
                print(f"run {i}: hop ms min {ms[0]:.1f} median {statistics.median(ms):.1f} "
                      f"max {ms[-1]:.1f} over {len(ms)} rounds")
    for mode, values in walls.items():
        print(f"{mode:9s}: median round wall s per run "
              + ", ".join(f"{v:.3f}" for v in values))


if __name__ == "__main__":
    main()
