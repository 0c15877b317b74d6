"""Secure aggregation (SecAgg+) against plain q8 updates: bytes, seconds and accuracy.

Measures the pure protocol (fedmq/core/secagg) run in one process WITHOUT the broker:
every message is encoded and decoded as on the wire, but nothing is published, so MQTT
framing, broker hops and network time are not in these figures. Plain is the Update
message a device sends today with the q8 codec, decoded into a sum by the server.

1. Cost per round for 10 / 50 / 100 devices and 0 / 10 / 30% of them dropping after
   sending their masked input (the round still unmasks; their inputs count). The graph
   is planned for a 30% dropout rate in every case, as a deployment would. Ranges are
   min-max over --runs rounds with fresh keys.
2. Accuracy: FedAvg on digits, the same devices, data and seeds, with the round's mean
   update taken (a) from plain q8 updates, (b) from the SecAgg+ sum of updates
   quantized into Z_2^32. Both weigh devices equally (SecAgg+ sums; weighting by sample
   counts would send the weight as one more summand).

    python benchmarks/secagg.py [--runs 3 --sizes 10 50 100 --rounds 20 --seeds 0 1 2]

With --broker the same comparisons run end to end over a real (private) mosquitto: the
aggregator service and one EdgeAgent per device (`fedmq simulate`'s fleet), plain q8
updates against `secure_aggregation = true` with FedAvg weights inside the masked sum:

3. Bytes and seconds per round, 10 / 50 / 100 devices, 0 / 10 / 30% of them vanishing
   once their masked input is out (`--secagg-drop-after-input`). Bytes are what the
   devices counted, both directions, model download included (the same for both modes);
   seconds are the aggregator's round wall time (announcement to close, training
   included). Ranges over --broker-rounds rounds (the first, which waits for the fleet,
   left out).
4. Digits accuracy after --broker-acc-rounds rounds, plain q8 against SecAgg+ with 30%
   dropping after sending, --broker-acc-devices devices, one run per seed.

    python benchmarks/secagg.py --broker [--sizes 10 50 100 --seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import uuid

import numpy as np

from fedmq.core import codecs
from fedmq.core.protocol import Update
from fedmq.core.secagg.server import plan_setup
from fedmq.core.secagg.simulate import AFTER_INPUT, simulate_round
from fedmq.models import build_model
from fedmq.tasks import device_shards, fleet_test_set, task_spec

PLANNED_DROPOUT = 0.3


def span(values: list[float], fmt: str = "{:.3g}") -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}-{fmt.format(hi)}"


def digits_model(seed: int):
    spec = task_spec("digits")
    return build_model("mlp", spec.model_config("mlp", hidden=64), seed=seed)


def plain_round(deltas: list[np.ndarray], rng: np.random.Generator) -> tuple[int, float, float,
                                                                           np.ndarray]:
    """(bytes up, device seconds per device, server seconds, mean) with q8 Update messages."""
    total_bytes, device_s, server_s = 0, 0.0, 0.0
    acc = np.zeros(deltas[0].size, np.float32)
    for i, delta in enumerate(deltas):
        started = time.perf_counter()
        payload = Update(device_id=f"dev-{i:03d}", update_id=uuid.uuid4().hex, round=1,
                         base_version=0, num_samples=100, loss=0.5,
                         delta=codecs.encode(delta, "q8", rng=rng)).to_payload()
        device_s += time.perf_counter() - started
        total_bytes += len(payload)
        started = time.perf_counter()
        codecs.decode_into(Update.from_payload(payload).delta, acc, 1.0)
        server_s += time.perf_counter() - started
    return total_bytes, device_s / len(deltas), server_s, acc / len(deltas)


def cost_table(args: argparse.Namespace) -> None:
    size = digits_model(0).get_flat().size
    rng = np.random.default_rng(0)
    print(f"1. Cost per round, model of {size} values (digits mlp), graph planned for "
          f"{PLANNED_DROPOUT:.0%} dropout; {args.runs} rounds each, ranges min-max.")
    print("   Pure protocol in one process, without the broker: no MQTT framing or hops.")
    print(f"{'devices':>7s} {'k':>3s} {'t':>3s} {'drop':>5s} | {'secagg KB':>11s} "
          f"{'plain KB':>9s} {'x':>6s} | {'dev ms':>11s} {'plain':>6s} | {'server ms':>11s} "
          f"{'plain':>6s}")
    for n in args.sizes:
        names = [f"dev-{i:03d}" for i in range(n)]
        for fraction in (0.0, 0.1, 0.3):
            sa_bytes, sa_dev, sa_srv, pl_bytes, pl_dev, pl_srv = [], [], [], [], [], []
            for _ in range(args.runs):
                setup = plan_setup(names, round=1, vector_size=size, clip=args.clip,
                                   dropout_rate=PLANNED_DROPOUT, field_bits=args.field_bits)
                deltas = {d: rng.normal(0, 0.05, size).astype(np.float32) for d in names}
                gone = rng.choice(names, round(fraction * n), replace=False)
                report = simulate_round(setup, deltas, drops={d: AFTER_INPUT for d in gone},
                                        float_inputs=True)
                if report.error is not None:
                    raise SystemExit(f"round failed: {report.error}")
                sa_bytes.append(report.total_bytes / 1e3)
                sa_dev.append(1e3 * report.device_seconds / n)
                sa_srv.append(1e3 * report.server_seconds)
                b, dev_s, srv_s, _ = plain_round(list(deltas.values()), rng)
                pl_bytes.append(b / 1e3)
                pl_dev.append(1e3 * dev_s)
                pl_srv.append(1e3 * srv_s)
            ratio = [s / p for s, p in zip(sa_bytes, pl_bytes, strict=True)]
            print(f"{n:7d} {setup.neighbours:3d} {setup.threshold:3d} {fraction:5.0%} | "
                  f"{span(sa_bytes, '{:.0f}'):>11s} {statistics.mean(pl_bytes):9.0f} "
                  f"{span(ratio, '{:.1f}'):>6s} | {span(sa_dev, '{:.1f}'):>11s} "
                  f"{statistics.mean(pl_dev):6.2f} | {span(sa_srv, '{:.0f}'):>11s} "
                  f"{statistics.mean(pl_srv):6.1f}")
    kinds = {**{f"{k} up": v for k, v in report.bytes_up.items()},
             **{f"{k} down": v for k, v in report.bytes_down.items()}}
    print(f"   where the bytes of the last round ({n} devices) go, KB: "
          + ", ".join(f"{k} {v / 1e3:.0f}" for k, v in sorted(kinds.items(),
                                                              key=lambda kv: -kv[1])))
    print("   secagg KB: every message of the round, both directions (each device's copy of a")
    print("   broadcast counted); plain KB: the q8 updates only (the model broadcast is the same")
    print("   for both). dev ms: CPU per device per round; server ms: per round.")


def fedavg(seed: int, args: argparse.Namespace, *, secure: bool) -> float:
    """Final test accuracy of FedAvg on digits with the mean update from q8 or SecAgg+."""
    spec = task_spec("digits")
    shards = device_shards("digits", device_count=args.devices, alpha=args.alpha, seed=seed)
    test = fleet_test_set("digits", device_count=args.devices, seed=seed)
    model = digits_model(seed)
    names = [f"dev-{i:03d}" for i in range(args.devices)]
    rng = np.random.default_rng(seed)
    for round_ in range(args.rounds):
        base = model.get_flat().copy()
        deltas = {}
        for name, shard in zip(names, shards, strict=True):
            model.set_flat(base)
            model.train(shard.x, shard.y, epochs=spec.epochs, batch_size=spec.batch_size,
                        lr=spec.lr, rng=rng)
            deltas[name] = model.get_flat() - base
        if secure:
            setup = plan_setup(names, round=round_, vector_size=base.size, clip=args.clip,
                               dropout_rate=PLANNED_DROPOUT, field_bits=args.field_bits)
            report = simulate_round(setup, deltas, float_inputs=True)
            mean = report.result.float_sum(setup) / len(report.result.survivors)
        else:
            mean = plain_round(list(deltas.values()), rng)[3]
        model.set_flat((base + mean).astype(np.float32))
    return model.evaluate(test.x, test.y).accuracy


def accuracy_table(args: argparse.Namespace) -> None:
    print(f"\n2. FedAvg on digits (mlp), {args.devices} devices, Dirichlet({args.alpha}), "
          f"{args.rounds} rounds, seeds {args.seeds}, clip {args.clip}:")
    plain = [fedavg(s, args, secure=False) for s in args.seeds]
    secure = [fedavg(s, args, secure=True) for s in args.seeds]
    diffs = [100 * (s - p) for s, p in zip(secure, plain, strict=True)]
    print(f"   plain q8   accuracy {span(plain, '{:.3f}')}  per seed {plain}")
    print(f"   SecAgg+    accuracy {span(secure, '{:.3f}')}  per seed {secure}")
    print(f"   SecAgg+ - plain, per seed: {span(diffs, '{:+.1f}')} points")


def broker_run(devices: int, *, secure: bool, drop: float, rounds: int, seed: int,
               args: argparse.Namespace):
    """One `fedmq simulate` run over a private mosquitto; (records, sim traffic)."""
    from simulator.config import SimulationConfig
    from simulator.fleet import Simulation

    config = SimulationConfig(
        devices=devices, rounds=rounds, seed=seed, engine="agents", timeout_s=1800.0,
        codec="float32" if secure else "q8", secure_aggregation=secure,
        secagg_drop_after_input=drop, secagg_clip=args.clip,
        secagg_field_bits=args.field_bits)
    with Simulation(config) as sim:
        result = sim.wait()
        return result.rounds


def broker_cost_table(args: argparse.Namespace) -> None:
    print(f"3. Over a real mosquitto, one EdgeAgent per device, digits mlp; "
          f"{args.broker_rounds} rounds each, the first left out; ranges min-max.")
    print(f"{'devices':>7s} {'mode':>8s} {'drop':>5s} | {'KB up':>13s} {'KB down':>13s} | "
          f"{'s/round':>11s}")
    for n in args.sizes:
        for secure, drops in ((False, (0.0,)), (True, (0.0, 0.1, 0.3))):
            for drop in drops:
                records = broker_run(n, secure=secure, drop=drop,
                                     rounds=args.broker_rounds + 1, seed=0, args=args)[1:]
                up = [r.bytes_up / 1e3 for r in records]
                down = [(r.bytes_down or 0) / 1e3 for r in records]
                wall = [r.wall_s for r in records]
                print(f"{n:7d} {'secagg' if secure else 'plain q8':>8s} {drop:5.0%} | "
                      f"{span(up, '{:.0f}'):>13s} {span(down, '{:.0f}'):>13s} | "
                      f"{span(wall, '{:.2f}'):>11s}", flush=True)
    print("   KB up: every message the devices sent in the round (secagg: keys, shares,")
    print("   masked inputs, reveals; plain: q8 updates); KB down: the model and, for")
    print("   secagg, the setup, neighbours' keys, routed shares and unmask requests.")


def broker_accuracy_table(args: argparse.Namespace) -> None:
    n, rounds = args.broker_acc_devices, args.broker_acc_rounds
    print(f"\n4. Digits accuracy over a real mosquitto, {n} devices, {rounds} rounds, "
          f"seeds {args.seeds}:")
    plain, secure = [], []
    for seed in args.seeds:
        p = broker_run(n, secure=False, drop=0.0, rounds=rounds, seed=seed, args=args)[-1]
        s = broker_run(n, secure=True, drop=0.3, rounds=rounds, seed=seed, args=args)[-1]
        plain.append(p.accuracy)
        secure.append(s.accuracy)
        print(f"   seed {seed}: plain q8 {p.accuracy:.4f} (test loss {p.loss:.5f}), SecAgg+ "
              f"30% dropping after sending {s.accuracy:.4f} (test loss {s.loss:.5f})",
              flush=True)
    diffs = [100 * (s - p) for s, p in zip(secure, plain, strict=True)]
    print(f"   plain q8   accuracy {span(plain, '{:.3f}')}")
    print(f"   SecAgg+    accuracy {span(secure, '{:.3f}')}")
    print(f"   SecAgg+ - plain, per seed: {span(diffs, '{:+.1f}')} points")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--field-bits", type=int, default=32, choices=(16, 24, 32))
    parser.add_argument("--clip", type=float, default=0.5,
                        help="per-value clipping range of the quantized updates")
    parser.add_argument("--devices", type=int, default=10, help="for the accuracy part")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--broker", action="store_true",
                        help="measure end to end over a real mosquitto instead")
    parser.add_argument("--broker-rounds", type=int, default=3)
    parser.add_argument("--broker-acc-devices", type=int, default=10)
    parser.add_argument("--broker-acc-rounds", type=int, default=20)
    parser.add_argument("--skip-cost", action="store_true")
    args = parser.parse_args()
    if args.broker:
        logging.basicConfig(level=logging.ERROR)
        if not args.skip_cost:
            broker_cost_table(args)
        if not args.skip_accuracy:
            broker_accuracy_table(args)
        return 0
    cost_table(args)
    if not args.skip_accuracy:
        accuracy_table(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
