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
import multiprocessing
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from fedmq.errors import BrokerError

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
    codec: str = "float32"
    byzantine: int = 0  # devices 0 .. byzantine-1 of the fleet attack
    train_workers: int = 1
    log_level: str = "WARNING"


@dataclass
class HostReport:
    """A host's counters as of its last report."""

    ready: int = 0
    sessions: int = 0
    never_connected: list[str] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    trained: int = 0
    sat_out: int = 0
    sent: int = 0
    resent: int = 0
    settled: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    train_errors: int = 0
    announced_round: int = 0
    traffic: dict[int, list[int]] = field(default_factory=dict)  # round -> [up, down]
    final: bool = False


def serve(plan: HostPlan, conn: Connection) -> None:
    """The child's main: run the plan's devices until told to stop (or the parent goes)."""
    logging.basicConfig(level=plan.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from fedmq.tasks import device_data
    from simulator.fleet import poison
    from simulator.host import DeviceHost

    data_for = device_data(plan.task, device_count=plan.device_count, alpha=plan.alpha,
                           seed=plan.seed)
    attackers = range(plan.byzantine)
    host = DeviceHost(broker=plan.broker, fleet=plan.fleet, count=plan.count, first=plan.first,
                      data_for=data_for, id_prefix=f"{plan.fleet}-dev", codec=plan.codec,
                      seed=plan.seed, train_workers=plan.train_workers,
                      update_transform=lambda i: poison if i in attackers else None)
    host.start()
    try:
        while True:
            if conn.poll(REPORT_S) and conn.recv() == "stop":
                break
            conn.send(_report(host, final=False))
    except (EOFError, BrokenPipeError, OSError):
        pass  # the simulator has gone: stop too
    finally:
        host.close()
        with contextlib.suppress(OSError, BrokenPipeError):
            conn.send(_report(host, final=True))
        conn.close()


def _report(host, *, final: bool) -> HostReport:
    s = host.stats
    return HostReport(
        ready=host.loop.ready_count, sessions=len(host.devices),
        never_connected=host.never_connected()[:20] if final else [],
        failures=dict(host.loop.failures), trained=s.trained, sat_out=s.sat_out,
        sent=s.sent, resent=s.resent, settled=dict(s.settled), rejected=dict(s.rejected),
        train_errors=s.train_errors, announced_round=s.announced_round,
        traffic={r: list(v) for r, v in s.traffic.items()}, final=final)


class HostProcess:
    """The simulator's handle on one host process."""

    def __init__(self, plan: HostPlan) -> None:
        self.plan = plan
        context = multiprocessing.get_context("spawn")  # never fork a threaded process
        self._conn, child = context.Pipe()
        self.process = context.Process(target=serve, args=(plan, child), daemon=True,
                                       name=f"fedmq-host-{plan.first}")
        self.report = HostReport(sessions=plan.count)
        self._heard = 0.0

    def start(self) -> None:
        self.process.start()
        self._heard = time.monotonic()

    def poll(self) -> HostReport:
        """The newest report (drains the pipe); raises if the host died or fell silent."""
        with contextlib.suppress(EOFError, OSError):
            while self._conn.poll():
                self.report = self._conn.recv()
                self._heard = time.monotonic()
        if not self.report.final:
            if not self.process.is_alive():
                raise BrokerError(f"the device host for devices {self.plan.first}.."
                                  f"{self.plan.first + self.plan.count - 1} exited "
                                  f"(code {self.process.exitcode}); see its log above")
            if time.monotonic() - self._heard > SILENT_S:
                raise BrokerError(f"the device host for devices from {self.plan.first} has not "
                                  f"reported for {SILENT_S:.0f} s")
        return self.report

    def stop(self, timeout: float = 30.0) -> HostReport:
        """Stop the devices (clean disconnects) and return the final report."""
        with contextlib.suppress(OSError, BrokenPipeError):
            self._conn.send("stop")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.report.final:
            with contextlib.suppress(EOFError, OSError):
                if self._conn.poll(0.2):
                    self.report = self._conn.recv()
                    continue
            if not self.process.is_alive():
                break
        self.process.join(max(0.0, deadline - time.monotonic()))
        if self.process.is_alive():
            log.warning("device host %d did not stop in %.0f s; killing it",
                        self.plan.first, timeout)
            self.process.kill()
            self.process.join(5)
        self._conn.close()
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
                for round_no, (up, down) in theirs.items():
                    slot = mine.setdefault(round_no, [0, 0])
                    slot[0] += up
                    slot[1] += down
            elif f.name == "announced_round":
                total.announced_round = max(mine, theirs)
            elif f.name == "final":
                total.final = all(x.final for x in reports)
            else:
                setattr(total, f.name, mine + theirs)
    return total
