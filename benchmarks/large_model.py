"""Rounds of a large model: 20 simulated devices with a ~10M-parameter model (40 MB of
float32 per update, sent in ~300 Parts of 128 KiB) over a private mosquitto (#13 item 5).

Each run is a fresh child process holding a `Simulation`: the broker, the aggregator and
the devices as real EdgeAgents (their own MQTT clients and threads), the digits task with
an mlp whose hidden layer is sized to the parameter count asked for (75 x hidden + 10
parameters), every device in every round. Measured per run:

- s/round: each round's wall time as the aggregator recorded it (round 1 includes every
  device downloading the first model, as every later round does);
- too_large: updates or Parts the aggregator refused as too_large (all reasons are shown);
- upload ratio: bytes the devices published on update topics (re-sends included), over
  bytes needed: what the aggregator counted for the updates it folded (each distinct Part
  once). Goal <= 1.05;
- peak RSS: VmHWM of the run's process (aggregator, 20 agents, simulator) and of mosquitto.

    python benchmarks/large_model.py [--devices 20 --params 10000000 --rounds 3 --repeat 2]

With --secure the rounds are SecAgg+ rounds (`secure_aggregation = true`, defaults:
32-bit field, graph planned for 30% dropout): each device's masked input (4 bytes for
each of params + 1 values) goes up in Parts like a plain update, and is reassembled and
folded into the field sum as it arrives (#14 item 1). Per round it also prints the
devices' bytes up and down (keys, shares and reveals included) for comparing with plain
runs (--codec float32 or q8):

    python benchmarks/large_model.py --devices 10 --params 1000000 --secure
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field

GOAL_RATIO = 1.05
MLP_INPUTS, MLP_CLASSES = 64, 10  # the digits task


def mlp_hidden_for(params: int) -> int:
    """Hidden units of a digits mlp with about `params` parameters."""
    per_unit = MLP_INPUTS + 1 + MLP_CLASSES  # in-weights, bias, out-weights
    return max(1, round((params - MLP_CLASSES) / per_unit))


def status_kib(pid: int, key: str) -> int:
    """A /proc/PID/status field in KiB (VmRSS, VmHWM); 0 if unreadable."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class Run:
    repeat: int
    params: int = 0
    round_s: list[float] = field(default_factory=list)
    participants: list[int] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)
    bytes_uploaded: int = 0
    bytes_needed: int = 0
    bytes_uploaded_all: int = 0  # for the round left open too (a run that timed out)
    resent: int = 0  # re-sends the devices made
    sim_peak_kib: int = 0
    broker_peak_kib: int = 0
    budget: int = 0  # the aggregator's reassembly budget during the rounds
    up_per_round: list[int] = field(default_factory=list)  # the devices' bytes, closed rounds
    down_per_round: list[int] = field(default_factory=list)
    error: str = ""

    @property
    def ratio(self) -> float:
        return self.bytes_uploaded / self.bytes_needed if self.bytes_needed else float("inf")


def run(args: argparse.Namespace, repeat: int) -> Run:
    from simulator.fleet import Simulation, SimulationConfig

    class BudgetedSimulation(Simulation):
        """Notes the aggregator's reassembly budget as each round closes (after the last
        one it plans the final model, asked of nobody, and the budget shrinks back)."""

        def __init__(self, config: SimulationConfig) -> None:
            super().__init__(config)
            self.budgets: list[int] = []

        def _on_round(self, record) -> None:
            reassembler = self.aggregator.reassembler  # type: ignore[union-attr]
            self.budgets.append(getattr(reassembler, "budget",  # before #13: fixed
                                        reassembler.max_pending_bytes))
            super()._on_round(record)

    hidden = mlp_hidden_for(args.params)
    out = Run(repeat=repeat, params=MLP_CLASSES + hidden * (MLP_INPUTS + 1 + MLP_CLASSES))
    extra = {"max_pending_bytes": args.max_pending_bytes} if args.max_pending_bytes else {}
    config = SimulationConfig(devices=args.devices, task="digits", model="mlp", hidden=hidden,
                              rounds=args.rounds, seed=args.seed, evaluate=False,
                              deadline_s=args.deadline_s, timeout_s=args.timeout_s,
                              engine="agents", codec=args.codec,
                              secure_aggregation=args.secure, **extra)
    try:
        with BudgetedSimulation(config) as sim:
            try:
                sim.wait()
            except Exception as exc:  # a run that times out still shows what it did
                out.error = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            service = sim.aggregator
            assert service is not None and sim.broker is not None
            records = list(sim.records)
            out.round_s = [r.wall_s for r in records]
            out.participants = [r.participants for r in records]
            out.rejected = dict(service.rejected)
            out.bytes_needed = sum(r.bytes_up for r in records)
            closed = {r.round for r in records}
            traffic = [(rnd, up) for a in sim.agents for rnd, (up, _) in a.stats.traffic.items()]
            out.bytes_uploaded = sum(up for rnd, up in traffic if rnd in closed)
            for r in records:
                out.up_per_round.append(sum(a.stats.traffic[r.round][0] for a in sim.agents
                                            if r.round in a.stats.traffic))
                out.down_per_round.append(sum(a.stats.traffic[r.round][1] for a in sim.agents
                                              if r.round in a.stats.traffic))
            out.bytes_uploaded_all = sum(up for _, up in traffic)
            out.resent = sum(a.stats.resent for a in sim.agents)
            out.broker_peak_kib = status_kib(sim.broker.process.pid, "VmHWM")
            out.budget = max(sim.budgets, default=0)
    except Exception as exc:  # a run that could not even start
        out.error = out.error or f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    out.sim_peak_kib = status_kib(os.getpid(), "VmHWM")
    return out


def run_child(args: argparse.Namespace, repeat: int) -> Run:
    """`run` in a fresh process, so each run's peak RSS is its own."""
    argv = [sys.executable, os.path.abspath(__file__), "--child", str(repeat),
            "--devices", str(args.devices), "--params", str(args.params),
            "--rounds", str(args.rounds), "--seed", str(args.seed),
            "--deadline-s", str(args.deadline_s), "--timeout-s", str(args.timeout_s),
            "--max-pending-bytes", str(args.max_pending_bytes), "--codec", args.codec]
    if args.secure:
        argv.append("--secure")
    proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        return Run(repeat=repeat, error=f"child exited with code {proc.returncode}")
    values = json.loads(lines[-1])
    return Run(**values)


def describe(r: Run) -> str:
    if r.error and not r.round_s:
        return f"repeat {r.repeat}: FAILED {r.error}"
    rounds = ", ".join(f"{s:.1f}" for s in r.round_s)
    rejected = ", ".join(f"{k} {v}" for k, v in sorted(r.rejected.items())) or "none"
    failed = f"; FAILED {r.error}" if r.error else ""
    traffic = ", ".join(f"{u / 1e6:.1f}/{d / 1e6:.1f}"
                        for u, d in zip(r.up_per_round, r.down_per_round, strict=True))
    return (f"repeat {r.repeat}: {r.params:,} params, s/round [{rounds}], participants "
            f"{r.participants}, too_large {r.rejected.get('too_large', 0)} (rejected: "
            f"{rejected}), uploaded {r.bytes_uploaded / 1e6:.1f} MB / needed "
            f"{r.bytes_needed / 1e6:.1f} MB = {r.ratio:.3f} (all rounds "
            f"{r.bytes_uploaded_all / 1e6:.1f} MB), re-sends {r.resent}, peak RSS "
            f"sim {r.sim_peak_kib / 1024:.0f} MiB broker {r.broker_peak_kib / 1024:.0f} MiB, "
            f"reassembly budget {r.budget / 2**20:.0f} MiB, devices' MB up / down per "
            f"round [{traffic}]{failed}")


def span(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return format(lo, fmt) if lo == hi else f"{format(lo, fmt)}-{format(hi, fmt)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deadline-s", type=float, default=600.0)
    parser.add_argument("--timeout-s", type=float, default=900.0)
    parser.add_argument("--max-pending-bytes", type=int, default=0,
                        help="the aggregator's reassembly budget (0: its default)")
    parser.add_argument("--codec", default="float32", help="the devices' update codec")
    parser.add_argument("--secure", action="store_true",
                        help="SecAgg+ rounds (secure_aggregation = true; --codec unused)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.child is not None:  # one run, its figures as the last line of stdout
        print(json.dumps(dataclasses.asdict(run(args, args.child))))
        return 0
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    print(f"large_model {time.strftime('%Y-%m-%d %H:%M:%S %Z')} commit "
          f"{commit.stdout.strip() or '?'}, {os.cpu_count()} cores, {args.devices} devices, "
          f"~{args.params:,} params, {args.rounds} rounds, "
          f"{'SecAgg+' if args.secure else 'plain ' + args.codec}", flush=True)
    runs = []
    for repeat in range(1, args.repeat + 1):
        runs.append(run_child(args, repeat))
        print(describe(runs[-1]), flush=True)
    good = [r for r in runs if not r.error]
    rounds = [s for r in good for s in r.round_s]
    later = [s for r in good for s in r.round_s[1:]]  # round 1 waits for the fleet too
    up = [u / 1e6 for r in good for u in r.up_per_round[1:]]
    down = [d / 1e6 for r in good for d in r.down_per_round[1:]]
    print(f"\nrounds after the first, over {len(good)} runs: s/round {span(later, '.1f')}, "
          f"devices' MB up / round {span(up, '.2f')}, down {span(down, '.2f')}")
    print(f"\nover {len(good)}/{len(runs)} runs: s/round {span(rounds, '.1f')} (median "
          f"{statistics.median(rounds) if rounds else float('nan'):.1f}), too_large "
          f"{span([r.rejected.get('too_large', 0) for r in good], 'd')}, upload ratio "
          f"{span([r.ratio for r in good], '.3f')} (goal <= {GOAL_RATIO}), peak RSS sim "
          f"{span([r.sim_peak_kib / 1024 for r in good], '.0f')} MiB, broker "
          f"{span([r.broker_peak_kib / 1024 for r in good], '.0f')} MiB")
    met = good and all(r.ratio <= GOAL_RATIO and not r.rejected.get("too_large") for r in good)
    print(f"goal (no too_large, ratio <= {GOAL_RATIO}): {'met' if met else 'MISSED'}")
    return 0 if len(good) == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
