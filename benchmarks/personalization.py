"""Personalization on the keyboard: each device's next-character top-1 on its own later
typing, for the global FedAvg model, the same model fine-tuned on the device, and FedPer
(the output layer personal: it never leaves the device).

Two federated runs per seed, side by side on the same devices, roles and seed: FedAvg,
and FedPer with `personal_layers = "out.*"`. After the last round every device scores on
its held-out windows (agent.toml eval_holdout: the last share of its role's training
lines, after a one-window gap; at most EVAL_MAX_EXAMPLES of them) with the agent's own
code (LocalTrainer.evaluate, what an EvalReport carries):

  global     the final FedAvg model as announced
  fine-tuned that model after --finetune-steps local steps on the device's training data
  FedPer     FedPer's final shared layers with the device's own output layer

Prints a per-device table for each seed and, over the seeds, the example-weighted fleet
means with their range (min-max over runs).

    python benchmarks/personalization.py [--devices 6 --rounds 10 --seeds 0 1]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass

import numpy as np

from fedmq.core.transfer import ReceivedModel
from fedmq.tasks import keyboard
from simulator.broker import LocalMosquitto
from simulator.fleet import Simulation, SimulationConfig

WAIT_S = 120.0


@dataclass
class DeviceScore:
    device: str
    role: str
    examples: int  # held-out windows scored
    accuracy: float  # the model as announced
    personal: float | None  # the device's own: fine-tuned, or with its personal layers


def run(args: argparse.Namespace, seed: int, broker_url: str, *, personal_layers: str,
        finetune_steps: int) -> tuple[list[DeviceScore], float, float]:
    """One federated run; every device's score of the final model, the run's wall time
    and the aggregator's held-out accuracy of it."""
    config = SimulationConfig(
        task="keyboard", devices=args.devices, rounds=args.rounds, seed=seed,
        broker=broker_url, eval_holdout=args.holdout, personal_layers=personal_layers,
        finetune_steps=finetune_steps, timeout_s=args.timeout_s, deadline_s=600.0)
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
        roles = keyboard.device_roles(device_count=args.devices, seed=seed,
                                      test_fraction=0.2)
        scores = []
        for agent, role in zip(sim.agents, roles, strict=True):
            final = ReceivedModel(agent.receiver.announcement, params, 0)
            report = agent.trainer.evaluate(final, config.aggregator_config(
                broker=broker_url, fleet="x", checkpoint="").task_config())
            assert report is not None, "no held-out data: raise --holdout"
            scores.append(DeviceScore(
                device=agent.config.device_id, role=f"{role.name} ({role.play})",
                examples=report.num_samples, accuracy=report.metrics.accuracy,
                personal=report.personal.accuracy if report.personal else None))
    return scores, time.monotonic() - started, result.final_accuracy or 0.0


def weighted(scores: list[DeviceScore], pick) -> float:
    return float(np.average([pick(s) for s in scores], weights=[s.examples for s in scores]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--finetune-steps", type=int, default=20)
    parser.add_argument("--holdout", type=float, default=0.2)
    parser.add_argument("--timeout-s", type=float, default=3600.0)
    parser.add_argument("--broker", default="", help="an MQTT broker URL (default: a private "
                        "mosquitto)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    broker = None
    if not args.broker:
        broker = LocalMosquitto()
        broker.start()
    url = args.broker or broker.url
    fleet: dict[str, list[float]] = {"global": [], "fine-tuned": [], "FedPer": []}
    try:
        for seed in args.seeds:
            avg, avg_s, avg_server = run(args, seed, url, personal_layers="",
                                         finetune_steps=args.finetune_steps)
            per, per_s, _ = run(args, seed, url, personal_layers="out.*", finetune_steps=0)
            print(f"\nseed {seed}: {args.devices} devices, {args.rounds} rounds "
                  f"(FedAvg {avg_s:.0f} s, FedPer {per_s:.0f} s of wall time; the aggregator's "
                  f"held-out top-1 of the FedAvg model: {avg_server:.3f})")
            print(f"| device | role | held-out windows | global top-1 | fine-tuned "
                  f"({args.finetune_steps} steps) | FedPer (out.* personal) |")
            print("|---|---|---:|---:|---:|---:|")
            for a, p in zip(avg, per, strict=True):
                print(f"| {a.device.rsplit('-', 1)[-1]} | {a.role} | {a.examples} | "
                      f"{a.accuracy:.3f} | {a.personal:.3f} | {p.personal:.3f} |")
            row = (weighted(avg, lambda s: s.accuracy), weighted(avg, lambda s: s.personal),
                   weighted(per, lambda s: s.personal))
            print(f"| fleet (weighted) | | {sum(a.examples for a in avg)} | {row[0]:.3f} | "
                  f"{row[1]:.3f} | {row[2]:.3f} |")
            for name, value in zip(fleet, row, strict=True):
                fleet[name].append(value)
    finally:
        if broker is not None:
            broker.stop()
    print(f"\nover {len(args.seeds)} run(s) (seeds {' '.join(map(str, args.seeds))}): "
          "example-weighted fleet top-1, mean [min-max]")
    for name, values in fleet.items():
        print(f"  {name:<11} {np.mean(values):.3f} [{min(values):.3f}-{max(values):.3f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
