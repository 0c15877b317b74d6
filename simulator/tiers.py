"""Several aggregator processes in one simulation (`fedmq simulate --workers N` or
`--sites N`, docs/scale.md), so the layouts can be tried on one machine.

- workers: N worker processes (`role = worker`, shard I/N: each subscribes to its own
  update buckets) and the simulator's aggregator as their reducer, on the one broker;
- sites: N more mosquitto processes, each bridged to the central broker
  (`simulator.broker.site_bridge`) with a site aggregator process beside it; the devices
  are spread over the sites in contiguous blocks and connect only to their site's broker;
  the simulator's aggregator is the central one and folds the sites' partials.

Each worker or site aggregator is a `PartialService` in a child process (spawned, as the
device hosts are) that says when its subscriptions are in place: the first round is
announced only after every one of them listens, so no update is published to nobody.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from aggregator.config import AggregatorConfig
from fedmq.errors import BrokerError
from simulator.broker import LocalMosquitto, site_bridge
from simulator.childproc import ReportingChild

log = logging.getLogger(__name__)

# A partial aggregator has this long to connect and subscribe (spawning imports numpy,
# the model and the task) before the simulation gives up.
READY_S = 120.0
REPORT_S = 0.5


def worker_names(count: int) -> list[str]:
    return [f"w{i}" for i in range(count)]


def site_names(count: int) -> list[str]:
    return [f"site{i}" for i in range(count)]


def site_blocks(devices: int, sites: int) -> list[range]:
    """Device indexes per site: contiguous blocks whose sizes differ by at most one."""
    base, extra = divmod(devices, sites)
    blocks, first = [], 0
    for s in range(sites):
        size = base + (s < extra)
        blocks.append(range(first, first + size))
        first += size
    return blocks


def partial_config(central: AggregatorConfig, *, role: str, name: str, broker: str,
                   index: int, count: int, workdir: Path) -> AggregatorConfig:
    """A worker's or site's configuration: the central aggregator's task, model and
    limits, its own identity, state file and (for a worker) shard; no dashboard, metrics
    or ONNX export (those belong to the aggregator the simulator watches)."""
    return dataclasses.replace(
        central, role=role, broker=broker, source_name=name,
        client_id=f"{central.fleet}-{name}", shard=f"{index}/{count}" if role == "worker"
        else "0/1", partial_sources="", checkpoint=str(workdir / f"{name}.state"),
        metrics="", metrics_port=0, dashboard_port=0, onnx_dir="")


@dataclass
class PartialReport:
    """A worker's or site's counters as of its last report."""

    ready: bool = False
    folded: int = 0
    others: int = 0
    sent: int = 0
    rejected: dict[str, int] = dataclasses.field(default_factory=dict)
    failure: str = ""
    final: bool = False
    answers: int = 0  # the number of the last report request this report answers


def serve(config: AggregatorConfig, conn: Connection) -> None:
    """The child's main: run one PartialService until told to stop (or the parent goes)."""
    logging.basicConfig(level=config.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from aggregator.partial_service import PartialService

    service = PartialService(config)
    service.start()
    report = PartialReport()
    try:
        while not service.link.subscribed.wait(0.1):
            if conn.poll():  # asked to stop before it was ready
                return
        answered = 0
        while True:
            report = PartialReport(ready=True, folded=service.folded, others=service.others,
                                   sent=service.sent, rejected=dict(service.rejected),
                                   failure=repr(service.failure) if service.failure else "",
                                   answers=answered)
            conn.send(report)
            if conn.poll(REPORT_S):
                request = conn.recv()
                if request == "stop":
                    break
                answered = request  # a report asked for: sent now
    except (EOFError, BrokenPipeError, OSError):
        pass  # the simulator has gone: stop too
    finally:
        service.stop()
        report = dataclasses.replace(report, folded=service.folded, sent=service.sent,
                                     rejected=dict(service.rejected), final=True)
        with contextlib.suppress(OSError, BrokenPipeError):
            conn.send(report)
        conn.close()


class PartialProcess(ReportingChild):
    """The simulator's handle on one worker or site aggregator process."""

    def __init__(self, config: AggregatorConfig) -> None:
        self.config = config
        self.name = config.source
        self.label = self.name
        super().__init__(serve, config, name=f"fedmq-{self.name}", report=PartialReport())

    def poll(self) -> PartialReport:
        """The newest report; raises if the process died."""
        self._drain()
        if self.report.failure:
            raise BrokerError(f"{self.config.role} {self.name} failed: {self.report.failure}")
        if not self.report.final and not self.process.is_alive():
            raise BrokerError(f"{self.config.role} {self.name} exited (code "
                              f"{self.process.exitcode}); see its log above")
        return self.report


class Tiers:
    """The partial aggregators of one simulation (and, for sites, their brokers)."""

    def __init__(self, *, workers: int = 0, sites: int = 0) -> None:
        if workers and sites:
            raise ValueError("workers or sites, not both")
        self.workers = workers
        self.sites = sites
        self.brokers: list[LocalMosquitto] = []
        self.processes: list[PartialProcess] = []

    @property
    def names(self) -> list[str]:
        return worker_names(self.workers) if self.workers else site_names(self.sites)

    def start_site_brokers(self, *, central_port: int, fleet: str, workdir: Path) -> list[str]:
        """One mosquitto per site, bridged to the central broker; their URLs."""
        for name in site_names(self.sites):
            broker = LocalMosquitto(extra_config=site_bridge(central_port=central_port,
                                                             site=name, fleet=fleet),
                                    workdir=workdir / f"broker-{name}")
            broker.workdir.mkdir(parents=True, exist_ok=True)
            self.brokers.append(broker)
            broker.start()
        return [b.url for b in self.brokers]

    def start(self, central: AggregatorConfig, *, workdir: Path,
              site_urls: list[str] | None = None) -> None:
        """Start every worker or site aggregator and wait until each one listens."""
        role = "worker" if self.workers else "site"
        for i, name in enumerate(self.names):
            broker = site_urls[i] if site_urls else central.broker
            config = partial_config(central, role=role, name=name, broker=broker, index=i,
                                    count=len(self.names), workdir=workdir)
            self.processes.append(PartialProcess(config))
        for process in self.processes:
            process.start()
        deadline = time.monotonic() + READY_S
        while not all(p.poll().ready for p in self.processes):
            if time.monotonic() > deadline:
                late = [p.name for p in self.processes if not p.report.ready]
                raise BrokerError(f"{', '.join(late)} not subscribed after {READY_S:.0f} s")
            time.sleep(0.05)
        log.info("%d %s(s) listening: %s", len(self.processes), role, ", ".join(self.names))

    def poll(self) -> list[PartialReport]:
        return [p.poll() for p in self.processes]

    def close(self) -> list[PartialReport]:
        reports = [p.stop() for p in self.processes]
        self.processes = []
        for broker in self.brokers:
            with contextlib.suppress(Exception):
                broker.stop()
        self.brokers = []
        return reports
