"""How far one machine simulates a fleet: hosted devices (100 .. 19,000) against start-up
time, seconds per round, memory per simulated device and what the broker spends (#13).

Each run is a `Simulation` in this process: a private mosquitto, the aggregator (this
process) and the devices hosted in child processes (HOSTED_PER_PROCESS per process), the
synthetic-iid task (--task), min(200, N) devices per round. Measured per run:

- online: seconds from starting the host processes until every device was online
  (`Simulation.online_s`; the broker and the test set are ready before it starts);
- s/round: each round's wall time as the aggregator recorded it, rounds 2..R (round 1
  includes the warm-up); median and range;
- idle B/dev: VmRSS of the host processes once every device is online (read when the
  aggregator has just started, before round 1 is announced), minus that of a host with
  one device (a N=1 run made first, each repeat), per device;
  peak B/dev: the same with VmHWM (peak RSS) of the hosts after the last round;
- broker: CPU seconds per round (utime+stime from /proc/PID/stat, over the rounds, divided
  by the rounds), and VmRSS when idle / VmHWM at the end;
- sim MiB: VmHWM of the process that ran the simulation (aggregator, simulator): each run
  is a fresh child process of this script;
- round 1 s: the first round's wall time (warm-up: the devices' first announcement), and
  online at 50% / 90% / 100%: seconds until that share of the fleet was online;
- accuracy after the last round, KiB uploaded and downloaded per round (all devices).

Goals: 10,000 devices with <= 4 KB of RSS per idle device and start-up <= 10 s; 19,000 as
the stretch (two host processes; one mosquitto holding 19,000+ sockets, within the 20,000
descriptors a process may open here).

    python benchmarks/fleet_scale.py [--sizes 100 1000 3000 10000 19000 --rounds 5 --repeat 1]
"""

from __future__ import annotations

import argparse
import contextlib
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

from simulator.fleet import HOSTED_PER_PROCESS, Simulation, SimulationConfig
from simulator.hostproc import HostReport

GOAL_DEVICES = 10_000
GOAL_IDLE_BYTES = 4 * 1024
GOAL_ONLINE_S = 10.0
PER_ROUND = 200
TASK = "synthetic-iid"
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, key: str) -> int:
    """A /proc/PID/status field in KiB (VmRSS, VmHWM); 0 if the process is gone."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK  # fields 14 and 15 of stat(5)


class TimedSimulation(Simulation):
    """A Simulation that notes when 50%, 90% and all of its devices were online (it
    hooks the private poll the simulator makes while it waits for them)."""

    def __init__(self, config: SimulationConfig) -> None:
        super().__init__(config)
        self.started = time.monotonic()
        self.reached: dict[float, float] = {}

    def _poll_hosts(self) -> HostReport:
        report = super()._poll_hosts()
        for share in (0.5, 0.9, 1.0):
            if share not in self.reached and report.ready >= share * self.config.devices:
                self.reached[share] = time.monotonic() - self.started
        return report

    def _start_hosts(self, url: str, fleet: str) -> None:
        self.started = time.monotonic()
        super()._start_hosts(url, fleet)


@dataclass
class Run:
    devices: int
    repeat: int
    hosts: int = 0
    online_s: float = 0.0
    round_s: list[float] = field(default_factory=list)  # rounds 2..R
    round1_s: float = 0.0
    online_at: dict[str, float] = field(default_factory=dict)  # share -> seconds
    idle_kib: int = 0  # VmRSS of all hosts, devices online
    peak_kib: int = 0  # VmHWM of all hosts at the end
    broker_start_cpu_s: float = 0.0  # until the devices were online
    broker_cpu_per_round: float = 0.0
    broker_idle_kib: int = 0
    broker_peak_kib: int = 0
    hosts_cpu_per_round: float = 0.0
    sim_peak_kib: int = 0
    accuracy: float | None = None
    kib_up: float = 0.0  # per round
    kib_down: float = 0.0
    rounds_done: int = 0
    never_online: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    error: str = ""


def run(devices: int, rounds: int, repeat: int, seed: int, task: str = TASK) -> Run:
    out = Run(devices=devices, repeat=repeat)
    config = SimulationConfig(devices=devices, task=task, seed=seed,
                              clients_per_round=min(PER_ROUND, devices), rounds=rounds,
                              engine="hosted", timeout_s=600.0)
    try:
        with TimedSimulation(config) as sim:
            out.online_at = {f"{k:.0%}": v for k, v in sim.reached.items()}
            hosts = [h.process.pid for h in sim.hosts]
            broker = sim.broker.process.pid  # type: ignore[union-attr]
            out.hosts = len(hosts)
            out.online_s = sim.online_s
            out.idle_kib = sum(status_kib(p, "VmRSS") for p in hosts)
            out.broker_idle_kib = status_kib(broker, "VmRSS")
            broker_cpu0, hosts_cpu0 = cpu_s(broker), sum(cpu_s(p) for p in hosts)
            out.broker_start_cpu_s = broker_cpu0
            result = sim.wait()
            out.broker_cpu_per_round = (cpu_s(broker) - broker_cpu0) / max(1, len(result.rounds))
            out.hosts_cpu_per_round = ((sum(cpu_s(p) for p in hosts) - hosts_cpu0)
                                       / max(1, len(result.rounds)))
            out.peak_kib = sum(status_kib(p, "VmHWM") for p in hosts)
            out.broker_peak_kib = status_kib(broker, "VmHWM")
            out.rounds_done = len(result.rounds)
            out.round_s = [r.wall_s for r in result.rounds[1:]]
            out.round1_s = result.rounds[0].wall_s if result.rounds else 0.0
            out.accuracy = result.final_accuracy
            n = max(1, len(result.rounds))
            out.kib_up = result.bytes_up / 1024 / n
            out.kib_down = result.bytes_down / 1024 / n
            out.never_online = result.never_connected_count
            out.failures = dict(result.connect_failures)
            if out.never_online:
                print(f"  N={devices}: {result.offline_note().lstrip('; ')}", file=sys.stderr)
    except Exception as exc:  # a size that fails is reported, and the next one runs
        out.error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    out.sim_peak_kib = status_kib(os.getpid(), "VmHWM")
    return out


def run_child(devices: int, rounds: int, repeat: int, seed: int, task: str = TASK) -> Run:
    """`run` in a fresh process, so each run's peak RSS is its own."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", str(devices),
                           str(rounds), str(repeat), str(seed), "--task", task],
                          stdout=subprocess.PIPE, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        return Run(devices=devices, repeat=repeat,
                   error=f"child exited with code {proc.returncode}")
    return Run(**json.loads(lines[-1]))


def per_device(r: Run, base: Run, total: str) -> float | None:
    """Bytes per device of the hosts' RSS above `r.hosts` hosts of one device each."""
    if r.error or base.error or r.devices <= r.hosts:
        return None
    return (getattr(r, total) - r.hosts * getattr(base, total)) * 1024 / (r.devices - r.hosts)


def span(values: list[float], fmt: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return format(lo, fmt) if lo == hi else f"{format(lo, fmt)}-{format(hi, fmt)}"


def describe(r: Run, base: Run) -> str:
    if r.error:
        return f"N={r.devices} repeat {r.repeat}: FAILED {r.error}"
    idle, peak = per_device(r, base, "idle_kib"), per_device(r, base, "peak_kib")
    rounds = ", ".join(f"{s:.2f}" for s in r.round_s)
    reached = " ".join(f"{k} {v:.2f}" for k, v in r.online_at.items())
    return (f"N={r.devices} repeat {r.repeat}: online {r.online_s:.2f} s ({reached}), "
            f"round 1 {r.round1_s:.2f} s, rounds 2.. [{rounds}] s, "
            f"hosts RSS idle {r.idle_kib / 1024:.1f} MiB peak {r.peak_kib / 1024:.1f} MiB "
            f"({'-' if idle is None else f'{idle:.0f}'} / "
            f"{'-' if peak is None else f'{peak:.0f}'} B/device), "
            f"hosts CPU {r.hosts_cpu_per_round:.2f} s/round, broker CPU start-up "
            f"{r.broker_start_cpu_s:.2f} s, {r.broker_cpu_per_round:.3f} s/round, broker RSS "
            f"{r.broker_idle_kib / 1024:.1f}/{r.broker_peak_kib / 1024:.1f} MiB, sim peak "
            f"{r.sim_peak_kib / 1024:.0f} MiB, accuracy {r.accuracy}, "
            f"{r.rounds_done} rounds, never online {r.never_online} {r.failures or ''}")


def table(runs: list[Run], bases: dict[int, Run]) -> list[str]:
    head = (f"{'devices':>7s} {'hosts':>5s} {'ok':>3s} {'online s':>11s} {'round 1 s':>11s} "
            f"{'s/round med':>11s} "
            f"{'s/round range':>13s} {'idle B/dev':>11s} {'peak B/dev':>11s} "
            f"{'brk CPU s/rd':>12s} {'brk RSS MiB':>11s} {'brk peak MiB':>12s} "
            f"{'sim MiB':>8s} {'accuracy':>11s} {'KiB up/rd':>9s} {'KiB dn/rd':>9s} "
            f"{'offline':>7s}")
    lines = [head, "-" * len(head)]
    for devices in dict.fromkeys(r.devices for r in runs):
        mine = [r for r in runs if r.devices == devices]
        good = [r for r in mine if not r.error]
        rounds = [s for r in good for s in r.round_s]
        med = f"{statistics.median(rounds):.2f}" if rounds else "-"
        lines.append(
            f"{devices:7d} {span([r.hosts for r in good], 'd'):>5s} "
            f"{len(good):>1d}/{len(mine):<1d} "
            f"{span([r.online_s for r in good], '.2f'):>11s} "
            f"{span([r.round1_s for r in good], '.2f'):>11s} {med:>11s} "
            f"{span(rounds, '.2f'):>13s} "
            f"{span([per_device(r, bases[r.repeat], 'idle_kib') for r in good], '.0f'):>11s} "
            f"{span([per_device(r, bases[r.repeat], 'peak_kib') for r in good], '.0f'):>11s} "
            f"{span([r.broker_cpu_per_round for r in good], '.3f'):>12s} "
            f"{span([r.broker_idle_kib / 1024 for r in good], '.1f'):>11s} "
            f"{span([r.broker_peak_kib / 1024 for r in good], '.1f'):>12s} "
            f"{span([r.sim_peak_kib / 1024 for r in good], '.0f'):>8s} "
            f"{span([r.accuracy for r in good], '.3f'):>11s} "
            f"{span([r.kib_up for r in good], '.0f'):>9s} "
            f"{span([r.kib_down for r in good], '.0f'):>9s} "
            f"{span([r.never_online for r in good], 'd'):>7s}")
    return lines


def verdict(runs: list[Run], bases: dict[int, Run]) -> str:
    at_goal = [r for r in runs if r.devices == GOAL_DEVICES and not r.error]
    if not at_goal:
        return f"goal ({GOAL_DEVICES:,} devices) not measured"
    idle = max(per_device(r, bases[r.repeat], "idle_kib") or 0.0 for r in at_goal)
    online = max(r.online_s for r in at_goal)
    offline = max(r.never_online for r in at_goal)
    ok = idle <= GOAL_IDLE_BYTES and online <= GOAL_ONLINE_S and not offline
    return (f"goal at {GOAL_DEVICES:,} devices: idle <= {GOAL_IDLE_BYTES} B/device (worst "
            f"{idle:.0f}), online <= {GOAL_ONLINE_S:.0f} s (worst {online:.2f}), all online "
            f"(worst {offline} not): {'met' if ok else 'MISSED'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+",
                        default=[100, 1_000, 3_000, 10_000, 19_000])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=1, help="run every size this many times")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", default=TASK,
                        help="synthetic-iid (default): devices share one labelling, so a "
                        "global model can learn it at any fleet size; synthetic (FedProx's "
                        "(1, 1)) gives every device its own random labelling, which one linear "
                        "model cannot fit over thousands of devices (near chance)")
    parser.add_argument("--child", type=int, nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.child:  # one run, its figures as the last line of stdout
        print(json.dumps(dataclasses.asdict(run(*args.child, task=args.task))))
        return 0
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    print(f"fleet_scale {time.strftime('%Y-%m-%d %H:%M:%S %Z')} commit "
          f"{commit.stdout.strip() or '?'}, {os.cpu_count()} cores, {args.rounds} rounds, "
          f"{PER_ROUND} devices per round (all when fewer), {HOSTED_PER_PROCESS:,} devices per "
          f"host process", flush=True)
    runs: list[Run] = []
    bases: dict[int, Run] = {}
    for repeat in range(1, args.repeat + 1):
        bases[repeat] = base = run_child(1, args.rounds, repeat, args.seed, args.task)
        failed = f"; FAILED {base.error}" if base.error else ""
        print(f"baseline (one host, one device): hosts RSS idle {base.idle_kib / 1024:.1f} MiB, "
              f"peak {base.peak_kib / 1024:.1f} MiB{failed}", flush=True)
        for devices in args.sizes:
            runs.append(run_child(devices, args.rounds, repeat, args.seed, args.task))
            print(describe(runs[-1], base), flush=True)
    print()
    print("\n".join(table(runs, bases)))
    print(verdict(runs, bases))
    return 0 if all(not r.error for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
