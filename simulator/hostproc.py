"""A DeviceHost in a child process, reporting to the simulator through a pipe.

Why a process: the simulator's aggregator is a paho client, and paho's `select()` loop
cannot use a file descriptor above 1023; thousands of device sockets in the same process
would push the aggregator's reconnects there. A child process also gives the devices'
training a core of their own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from fedmq.errors import BrokerError
from simulator.childproc import ReportingChild

log = logging.getLogger(__name__)

# How often a host reports its counters to the simulator.
REPORT_S = 0.5
# A host that does not report for this long (start-up included: spawning imports numpy and
# fedmq, then it opens its sessions) is taken for dead.
SILENT_S = 120.0


@dataclass(frozen=True)
class HostPlan:
    """Which devices one host process runs, and how (picklable: sent to the child)."""

    broker: str
    fleet: str
    first: int
    count: int
    device_count: int
    task: str
    alpha: float
    seed: int
    partition: str = ""  # as SimulationConfig's
    shards_per_device: int = 2
    codec: str = "float32"
    id_format: str = "dev{index}"  # device ids: id_format.format(index=i)
    byzantine: int = 0  # devices 0 .. byzantine-1 of the fleet attack ...
    attack: str = "scaled"  # ... so (simulator/attacks.py; not label_flip: agents only)
    train_workers: int = 1
    log_level: str = "WARNING"
    status_interval_s: float = 10.0  # as AgentConfig's


@dataclass
class HostReport:
    """A host's counters as of its last report."""

    ready: int = 0
    sessions: int = 0
    never_connected: list[str] = field(default_factory=list)  # the first few ids
    never_connected_count: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    trained: int = 0
    sat_out: int = 0
    sent: int = 0
    resent: int = 0
    settled: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    train_errors: int = 0
    announced_round: int = 0
    # round -> [bytes up, bytes down, devices that uploaded]
    traffic: dict[int, list[int]] = field(default_factory=dict)
    final: bool = False
    answers: int = 0  # the number of the last report request this report answers


def serve(plan: HostPlan, conn: Connection) -> None:
    """The child's main: run the plan's devices until told to stop (or the parent goes)."""
    logging.basicConfig(level=plan.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from fedmq.tasks import device_data, task_spec
    from simulator import attacks
    from simulator.host import DeviceHost

    data_for = device_data(plan.task, device_count=plan.device_count, alpha=plan.alpha,
                           partition=plan.partition, shards_per_device=plan.shards_per_device,
                           seed=plan.seed)
    attackers = range(plan.byzantine)
    host = DeviceHost(broker=plan.broker, fleet=plan.fleet, count=plan.count, first=plan.first,
                      data_for=data_for, id_format=plan.id_format, codec=plan.codec,
                      seed=plan.seed, train_workers=plan.train_workers,
                      update_transform_for=lambda i: attacks.update_transform(
                          plan.attack, seed=plan.seed * 7919 + i) if i in attackers else None,
                      status_interval_s=plan.status_interval_s,
                      task=plan.task if task_spec(plan.task).custom else "")
    host.start()
    answered = 0
    try:
        while True:
            if conn.poll(REPORT_S):
                request = conn.recv()
                if request == "stop":
                    break
                answered = request  # a report asked for: sent now
            conn.send(_report(host, final=False, answers=answered))
    except (EOFError, BrokenPipeError, OSError):
        pass  # the simulator has gone: stop too
    finally:
        host.close()
        with contextlib.suppress(OSError, BrokenPipeError):
            conn.send(_report(host, final=True))
        conn.close()


def _report(host, *, final: bool, answers: int = 0) -> HostReport:
    s = host.stats
    never = host.never_connected()
    return HostReport(
        ready=host.loop.ready_count, sessions=len(host.devices),
        never_connected=never[:20], never_connected_count=len(never),
        failures=dict(host.loop.failures), trained=s.trained, sat_out=s.sat_out,
        sent=s.sent, resent=s.resent, settled=dict(s.settled), rejected=dict(s.rejected),
        train_errors=s.train_errors, announced_round=s.announced_round,
        traffic={r: list(v) for r, v in s.traffic.items()}, final=final, answers=answers)


class HostProcess(ReportingChild):
    """The simulator's handle on one host process."""

    def __init__(self, plan: HostPlan) -> None:
        self.plan = plan
        self.label = f"the device host for devices from {plan.first}"
        super().__init__(serve, plan, name=f"fedmq-host-{plan.first}",
                         report=HostReport(sessions=plan.count))
        self._heard = 0.0

    def start(self) -> None:
        super().start()
        self._heard = time.monotonic()

    def poll(self) -> HostReport:
        """The newest report (drains the pipe); raises if the host died or fell silent."""
        if self._drain():
            self._heard = time.monotonic()
        if not self.report.final:
            if not self.process.is_alive():
                raise BrokerError(f"the device host for devices {self.plan.first}.."
                                  f"{self.plan.first + self.plan.count - 1} exited "
                                  f"(code {self.process.exitcode}); see its log above")
            if time.monotonic() - self._heard > SILENT_S:
                raise BrokerError(f"{self.label} has not reported for {SILENT_S:.0f} s")
        return self.report


def merged(reports: list[HostReport]) -> HostReport:
    """One report for the whole fleet."""
    total = HostReport()
    counters = ("settled", "rejected", "failures")
    for r in reports:
        for f in dataclasses.fields(HostReport):
            mine, theirs = getattr(total, f.name), getattr(r, f.name)
            if f.name in counters:
                setattr(total, f.name, dict(Counter(mine) + Counter(theirs)))
            elif f.name == "never_connected":
                mine.extend(theirs)
            elif f.name == "traffic":
                for round_no, counts in theirs.items():
                    slot = mine.setdefault(round_no, [0] * len(counts))
                    for i, n in enumerate(counts):
                        slot[i] += n
            elif f.name == "announced_round":
                total.announced_round = max(mine, theirs)
            elif f.name == "final":
                total.final = all(x.final for x in reports)
            else:
                setattr(total, f.name, mine + theirs)
    return total
