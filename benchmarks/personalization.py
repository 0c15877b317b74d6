"""Personalization: each device's top-1 on its own held-out data for the global FedAvg
model, that model fine-tuned on the device, FedPer (personal layers trained with the
shared ones) and FedRep (personal layers trained alone first, then the shared ones).

Three federated runs per seed, side by side on the same devices, data and seed: FedAvg,
FedPer (`personal_layers`) and FedRep (the same plus `personal_steps`). After the last
round every device scores on its held-out examples (eval_holdout; for the keyboard the
last share of its role's lines after a one-window gap, else a seeded random share; at
most EVAL_MAX_EXAMPLES of them) with the agent's own code (LocalTrainer.evaluate, what
an EvalReport carries):

  global        the final FedAvg model as announced
  ft lr=X       that model after --finetune-steps local steps at learning rate X (the
                task's own, then each --finetune-lr); "checked": with finetune_check
                (early stopping on the last 20% of the device's training data)
  FedPer        FedPer's final shared layers with the device's own personal layers
  FedRep        FedRep's, the personal layers refit to them (personal_steps)

Prints a per-device table for each seed and, over the seeds, the example-weighted fleet
means with their range (min-max over runs).

    python benchmarks/personalization.py [--task keyboard --devices 6 --rounds 12 --seeds 0 1]
    python benchmarks/personalization.py --task digits --alpha 0.1 --devices 10 --rounds 20
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time

import numpy as np

from fedmq.core.transfer import ReceivedModel
from fedmq.tasks import keyboard
from simulator.broker import LocalMosquitto
from simulator.fleet import Simulation, SimulationConfig

WAIT_S = 120.0
# the output layer of each bundled model the benchmark knows
HEADS = {"keyboard": "out.*", "digits": "w2,b2", "wearable": "out.*", "sensor": "out.*"}


def run(args: argparse.Namespace, seed: int, broker_url: str, *, variants: dict[str, dict],
        **options) -> tuple[list[dict[str, float]], float, float]:
    """One federated run with aggregator `options`; for every device its held-out
    examples, the final model's top-1 ("global") and, per variant (announcement fields),
    the top-1 of the device's personalized model; the run's wall time and the
    aggregator's own accuracy."""
    config = SimulationConfig(
        task=args.task, devices=args.devices, rounds=args.rounds, seed=seed, alpha=args.alpha,
        broker=broker_url, eval_holdout=args.holdout, timeout_s=args.timeout_s,
        deadline_s=600.0, **options)
    started = time.monotonic()
    with Simulation(config) as sim:
        result = sim.wait()
        service = sim.aggregator
        params = service.full_params()
        version = service.machine.version
        deadline = time.monotonic() + WAIT_S
        while any(a.receiver.announcement is None or a.receiver.announcement.version < version
                  for a in sim.agents):
            if time.monotonic() > deadline:
                raise RuntimeError("devices did not hear the final model")
            time.sleep(0.1)
        wall = time.monotonic() - started
        task = config.aggregator_config(broker=broker_url, fleet="x",
                                        checkpoint="").task_config()
        scores = []
        for agent in sim.agents:
            row: dict[str, float] = {}
            for name, fields in variants.items():
                announced = dataclasses.replace(agent.receiver.announcement, **fields)
                report = agent.trainer.evaluate(ReceivedModel(announced, params, 0), task)
                assert report is not None, "no held-out data: raise --holdout"
                row.update(examples=report.num_samples, glob=report.metrics.accuracy)
                if report.personal is not None:
                    row[name] = report.personal.accuracy
            scores.append(row)
    return scores, wall, result.final_accuracy or 0.0


def weighted(rows: list[dict[str, float]], key: str) -> float:
    return float(np.average([r[key] for r in rows], weights=[r["examples"] for r in rows]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="keyboard", choices=sorted(HEADS))
    parser.add_argument("--devices", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="Dirichlet label skew (not the keyboard: one role per device)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--finetune-steps", type=int, default=20)
    parser.add_argument("--finetune-lr", type=float, nargs="*", default=[0.1],
                        help="fine-tuning rates besides the task's own")
    parser.add_argument("--finetune-check", type=int, default=5,
                        help="finetune_check of the 'checked' column (0: no such column)")
    parser.add_argument("--personal-layers", default="", help="default: the output layer")
    parser.add_argument("--personal-steps", type=int, default=20, help="FedRep's")
    parser.add_argument("--holdout", type=float, default=0.2)
    parser.add_argument("--timeout-s", type=float, default=3600.0)
    parser.add_argument("--broker", default="", help="an MQTT broker URL (default: a private "
                        "mosquitto)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    head = args.personal_layers or HEADS[args.task]
    steps = args.finetune_steps
    tuned = {"ft task lr": dict(finetune_steps=steps)}
    for lr in args.finetune_lr:
        tuned[f"ft lr={lr:g}"] = dict(finetune_steps=steps, finetune_lr=lr)
        if args.finetune_check:
            tuned[f"ft lr={lr:g} checked"] = dict(finetune_steps=steps, finetune_lr=lr,
                                                  finetune_check=args.finetune_check)
    columns = ["glob", *tuned, "FedPer", "FedRep"]
    broker = None
    if not args.broker:
        broker = LocalMosquitto()
        broker.start()
    url = args.broker or broker.url
    fleet: dict[str, list[float]] = {c: [] for c in columns}
    try:
        for seed in args.seeds:
            # finetune_steps only makes the simulator hold data out; devices that are not
            # asked to evaluate never fine-tune
            avg, avg_s, avg_server = run(args, seed, url, variants=tuned, finetune_steps=steps)
            per, per_s, _ = run(args, seed, url, variants={"FedPer": {}},
                                personal_layers=head)
            rep, rep_s, _ = run(args, seed, url, variants={"FedRep": {}}, personal_layers=head,
                                personal_steps=args.personal_steps)
            rows = [{**a, "FedPer": p["FedPer"], "FedRep": r["FedRep"]}
                    for a, p, r in zip(avg, per, rep, strict=True)]
            print(f"\nseed {seed}: {args.task}, {args.devices} devices, {args.rounds} rounds "
                  f"(wall time: FedAvg {avg_s:.0f} s, FedPer {per_s:.0f} s, FedRep {rep_s:.0f} "
                  f"s; the aggregator's held-out top-1 of the FedAvg model: {avg_server:.3f}); "
                  f"fine-tuning {steps} steps, personal layers {head}, FedRep "
                  f"{args.personal_steps} head steps")
            names = ([r.name for r in keyboard.device_roles(
                device_count=args.devices, seed=seed, test_fraction=0.2)]
                if args.task == "keyboard" else list(map(str, range(args.devices))))
            print("| device | held-out | " + " | ".join(
                "global" if c == "glob" else c for c in columns) + " |")
            print("|---|---:|" + "---:|" * len(columns))
            for name, row in zip(names, rows, strict=True):
                print(f"| {name} | {row['examples']} | "
                      + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
            means = [weighted(rows, c) for c in columns]
            print(f"| fleet (weighted) | {sum(r['examples'] for r in rows)} | "
                  + " | ".join(f"{m:.3f}" for m in means) + " |", flush=True)
            for c, m in zip(columns, means, strict=True):
                fleet[c].append(m)
    finally:
        if broker is not None:
            broker.stop()
    print(f"\nover {len(args.seeds)} run(s) (seeds {' '.join(map(str, args.seeds))}): "
          "example-weighted fleet top-1, mean [min-max]")
    for name, values in fleet.items():
        print(f"  {'global' if name == 'glob' else name:<20} {np.mean(values):.3f} "
              f"[{min(values):.3f}-{max(values):.3f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
