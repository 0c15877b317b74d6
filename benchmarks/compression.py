"""Upload bytes vs accuracy for every codec preset on the same federated task.

Each configuration runs the real simulator (aggregator + agents over a private
mosquitto) with the same seeds, partition and rounds; only the agents' codec changes.
Bytes are whole update payloads as published (envelope included), per device and round.

    python benchmarks/compression.py [--rounds 30 --devices 10 --seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from fedmq.core.codecs import PRESETS
from simulator.broker import LocalMosquitto
from simulator.fleet import Simulation, SimulationConfig

GOAL_RATIO = 32.0
MAX_LOSS_POINTS = 1.0


# Model broadcast configurations: (full model codec, delta codec or "" for none).
BROADCASTS = [("float32", ""), ("float16", ""), ("q8", ""), ("float32", "q8"),
              ("float16", "q8"), ("float32", "q4")]


def run(codec: str, seed: int, args: argparse.Namespace, broker_url: str,
        model_codec: str = "float32", model_delta_codec: str = "") -> tuple[float, float, float]:
    """(final accuracy, upload and download bytes per device-round) of one training run."""
    config = SimulationConfig(
        devices=args.devices, rounds=args.rounds, seed=seed, model=args.model, alpha=args.alpha,
        epochs=args.epochs, codec=codec, broker=broker_url, timeout_s=600,
        model_codec=model_codec, model_delta_codec=model_delta_codec,
    )
    with Simulation(config) as sim:
        result = sim.wait()
    device_rounds = sum(r.participants for r in result.rounds)
    return (result.final_accuracy or 0.0, result.bytes_up / device_rounds,
            result.bytes_down / device_rounds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--codecs", nargs="+", default=list(PRESETS))
    parser.add_argument("--no-broadcast", action="store_true",
                        help="skip the model broadcast table")
    args = parser.parse_args()

    rows = []
    started = time.monotonic()
    with LocalMosquitto() as broker:
        for codec in args.codecs:
            runs = [run(codec, seed, args, broker.url) for seed in args.seeds]
            rows.append((codec, statistics.mean(r[1] for r in runs),
                         statistics.mean(r[0] for r in runs), [r[0] for r in runs]))
            print(f"  {codec:13s} done ({time.monotonic() - started:.0f} s)", file=sys.stderr)
        broadcast_rows = []
        for full, delta in [] if args.no_broadcast else BROADCASTS:
            runs = [run("float32", seed, args, broker.url, full, delta) for seed in args.seeds]
            broadcast_rows.append((full, delta, statistics.mean(r[2] for r in runs),
                                   statistics.mean(r[0] for r in runs)))
            print(f"  broadcast {full}/{delta or '-'} done ({time.monotonic() - started:.0f} s)",
                  file=sys.stderr)

    base_bytes, base_acc = rows[0][1], rows[0][2]
    print(f"digits/{args.model}, {args.devices} devices, Dirichlet({args.alpha}), {args.rounds} "
          f"rounds, {args.epochs} local epochs, seeds {args.seeds} (accuracy = mean of seeds)")
    print(f"{'codec':14s} {'bytes/dev-round':>15s} {'ratio':>7s} {'accuracy':>9s} "
          f"{'vs float32':>10s}   per seed")
    best = None
    for codec, nbytes, acc, per_seed in rows:
        ratio = base_bytes / nbytes
        change = 100 * (acc - base_acc)
        seeds = " ".join(f"{a:.3f}" for a in per_seed)
        print(f"{codec:14s} {nbytes:15.0f} {ratio:6.1f}x {acc:9.4f} {change:+9.2f}pt   {seeds}")
        if change >= -MAX_LOSS_POINTS and (best is None or ratio > best[1]):
            best = (codec, ratio, change)
    if broadcast_rows:
        print("\nmodel broadcast (float32 updates): download bytes per device-round")
        print(f"{'full model':11s} {'delta':6s} {'bytes/dev-round':>15s} {'ratio':>7s} "
              f"{'accuracy':>9s} {'vs float32':>10s}")
        base_down, base_down_acc = broadcast_rows[0][2], broadcast_rows[0][3]
        for full, delta, down, acc in broadcast_rows:
            print(f"{full:11s} {delta or '-':6s} {down:15.0f} {base_down / down:6.1f}x "
                  f"{acc:9.4f} {100 * (acc - base_down_acc):+9.2f}pt")
    assert best is not None
    verdict = "meets" if best[1] >= GOAL_RATIO else "MISSES"
    print(f"best within {MAX_LOSS_POINTS:.1f} point of float32: {best[0]} at {best[1]:.1f}x fewer "
          f"upload bytes ({best[2]:+.2f} pt); {verdict} the {GOAL_RATIO:.0f}x goal")
    return 0


if __name__ == "__main__":
    sys.exit(main())
