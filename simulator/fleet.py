"""A whole fleet on one machine: a broker, the real aggregator and N devices.

Devices run as real EdgeAgents (each its own MQTT client and training thread: every
feature, a few hundred devices) or hosted (each a DeviceMachine, the agent's own protocol
logic, on one event loop per child process: tens of thousands). Nothing is shortcut around
the broker, so what the simulator measures (bytes, rounds, accuracy) is what a real fleet
would see.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import random
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aggregator.keyholder import KeyHolderConfig, KeyHolderService
from aggregator.records import RoundRecord
from aggregator.service import AggregatorService
from edge_agent.agent import EdgeAgent
from fedmq.core.he import CkksParams
from fedmq.core.protocol import EvalReport
from fedmq.errors import BrokerError, ConfigError, FedmqError, require
from fedmq.keyfiles import generate_he_keys
from fedmq.tasks import device_data, fleet_test_set, plugins, task_spec
from fedmq.transport.mqtt import negotiate_mqtt_version
from simulator import attacks
from simulator.broker import LocalMosquitto
from simulator.config import DEVICE_ID, SimulationConfig
from simulator.faultproxy import ProxyPool
from simulator.hostproc import HostPlan, HostProcess, HostReport, merged
from simulator.profiles import DeviceProfile, fleet_profiles
from simulator.tiers import Tiers, site_blocks

__all__ = ["BYZANTINE_SCALE", "Simulation", "SimulationConfig", "SimulationResult",
           "metrics_figure", "plot_metrics", "poison", "write_metrics"]

log = logging.getLogger(__name__)


@dataclass
class SimulationResult:
    """The aggregator's records of a run, with what the devices downloaded filled in."""

    rounds: list[RoundRecord] = field(default_factory=list)
    wall_s: float = 0.0  # the whole run: start-up (broker, data, devices) included
    startup_s: float = 0.0  # of which starting the broker, loading data, starting devices
    rejected: dict[str, int] = field(default_factory=dict)
    devices: int = 0
    # hosted devices that never came online, and why sessions failed (cause -> count)
    never_connected: list[str] = field(default_factory=list)
    never_connected_count: int = 0
    connect_failures: dict[str, int] = field(default_factory=dict)
    stopped: str = ""  # why the aggregator stopped training early (the privacy budget)
    ldp_epsilon: float | None = None  # local DP: the most any device spent (None: off)
    # --workers / --sites: device updates each worker or site aggregator folded
    partials: dict[str, int] = field(default_factory=dict)
    # Federated evaluation: each agent's newest EvalReport (its own held-out score of the
    # announced model and, personalizing, of its personalized one), by device id.
    device_evals: dict[str, EvalReport] = field(default_factory=dict)

    @property
    def final_accuracy(self) -> float | None:
        return self.rounds[-1].accuracy if self.rounds else None

    @property
    def bytes_up(self) -> int:
        return sum(r.bytes_up for r in self.rounds)

    @property
    def bytes_down(self) -> int:
        return sum(r.bytes_down or 0 for r in self.rounds)

    def summary(self) -> str:
        acc = self.final_accuracy
        if acc is None:  # agents only: the aggregator elsewhere measures accuracy
            return f"devices took part in {len(self.rounds)} rounds, {self.bytes_up} bytes uploaded"
        epsilon = self.rounds[-1].epsilon
        privacy = f", differential privacy epsilon {epsilon:.2f}" if epsilon is not None else ""
        stopped = f"; training stopped: {self.stopped}" if self.stopped else ""
        if self.ldp_epsilon is not None:
            privacy += f", local DP epsilon {self.ldp_epsilon:.3g} per device (at most)"
        return (f"final accuracy {acc:.4f} after {len(self.rounds)} rounds, "
                f"{self.bytes_up} bytes uploaded{privacy}{self.partials_note()}"
                f"{self.offline_note()}{stopped}")

    def partials_note(self) -> str:
        if not self.partials:
            return ""
        return ", device updates folded by " + ", ".join(
            f"{name} {n}" for name, n in self.partials.items())

    def offline_note(self) -> str:
        if not self.never_connected_count:
            return ""
        shown = ", ".join(self.never_connected[:5])
        more = self.never_connected_count - min(5, len(self.never_connected))
        causes = "; ".join(f"{c} x{n}" for c, n in self.connect_failures.items())
        return (f"; {self.never_connected_count} of {self.devices} devices never came online "
                f"({shown}{f' and {more} more' if more > 0 else ''}: {causes or 'no answer'})")


# Devices per host process: each session is a file descriptor, and this machine allows a
# process 20,000; half of that leaves room and spreads big fleets over both cores.
HOSTED_PER_PROCESS = 10_000
# How long a hosted fleet may take to come online before the aggregator starts anyway
# (10,000 devices take a few seconds), and how often the simulator looks meanwhile.
ONLINE_WAIT_S = 60.0
HOST_POLL_S = 0.1

# `--byzantine K` is `--attack scaled --attackers K` (simulator/attacks.py): the delta
# reversed and scaled, a well-formed update that validation alone cannot tell apart.
BYZANTINE_SCALE = attacks.SCALE
poison = attacks.scaled


def _vanishes(config: SimulationConfig, fleet: str, device: str, round: int) -> bool:
    """Whether simulated `device` vanishes after its masked input in `round`."""
    return device in config.secagg_dropouts(fleet, round)


class Simulation:
    """Owns every process and thread of one simulated run; `close()` stops them all."""

    def __init__(self, config: SimulationConfig, *, workdir: str | Path | None = None) -> None:
        self.config = config
        self._tmp = tempfile.TemporaryDirectory(prefix="fedmq-sim-") if workdir is None else None
        self.workdir = Path(workdir or self._tmp.name)  # type: ignore[union-attr]
        self.broker: LocalMosquitto | None = None
        self.aggregator: AggregatorService | None = None
        self.agents: list[EdgeAgent] = []
        self.hosts: list[HostProcess] = []
        self._hosted = HostReport()
        self.online_s = 0.0  # seconds the hosted fleet took to come online
        self.began: float | None = None  # monotonic time start() was called
        self.startup_s = 0.0  # seconds start() took
        self.records: list[RoundRecord] = []
        self.round_closed = threading.Condition()
        self.proxies: ProxyPool | None = None  # one fault proxy per device, with --dropout
        self._dropout_rng = random.Random(config.seed)
        self._dropout_round = -1
        self._flaky: dict[str, DeviceProfile] = {}  # devices whose link flaps on a schedule
        self.tiers = Tiers(workers=config.workers, sites=config.sites)
        self.site_urls: list[str] = []  # --sites: each site's broker
        self._partials: dict[str, int] = {}
        self.he_keys: tuple[str, str] | None = None  # --he: (public, secret) key files
        # --he: the key holder, the only holder of the secret key (the aggregator has the
        # public key only), on its own MQTT connection
        self.keyholder: KeyHolderService | None = None
        # The agents engine's devices are threads of this process: one trainer a core at a
        # time (LocalTrainer's compute_gate says why)
        self._compute_gate = threading.BoundedSemaphore(os.cpu_count() or 1)

    def start(self) -> None:
        self.began = time.monotonic()
        self._start()
        self.startup_s = time.monotonic() - self.began

    def _start(self) -> None:
        c = self.config
        test = fleet_test_set(c.task, device_count=c.devices, seed=c.seed)
        # The devices' data before anything starts: a partition the data cannot make fails
        # now, naming the largest fleet it allows (a generated or user task's device data
        # is made when asked).
        data_for = device_data(c.task, device_count=c.devices, alpha=c.alpha, seed=c.seed,
                               partition=c.partition, shards_per_device=c.shards_per_device)
        user = plugins.cached(c.task)
        if user is not None:  # a user's code: tried once before anything starts
            user.rehearse(data_for(0), test)
        url = c.broker
        if not url:
            self.broker = LocalMosquitto(workdir=self.workdir / "broker")
            self.broker.workdir.mkdir(parents=True, exist_ok=True)
            self.broker.start()
            url = self.broker.url
            if c.mqtt_version == "auto":  # our own mosquitto speaks 5: nothing to find out
                c = self.config = dataclasses.replace(c, mqtt_version="5")
        else:
            c = self.config = self._settle_mqtt_version(c)
        fleet = c.fleet or f"sim-{os.urandom(3).hex()}"
        if c.sites:
            assert self.broker is not None  # the config refuses --sites with --broker
            self.site_urls = self.tiers.start_site_brokers(
                central_port=self.broker.port, fleet=fleet, workdir=self.workdir)
        if c.he:  # the run's own key pair: devices encrypt, the key holder decrypts
            public, secret, _ = generate_he_keys(
                self.workdir / "he", CkksParams(clip_norm=c.he_clip_norm), force=True)
            self.he_keys = (str(public), str(secret))
        if not c.agents_only:
            shortfall = c.cohort_shortfall()
            if shortfall:
                log.warning("%s", shortfall)
            self._start_aggregator(url, fleet, test)
            if c.workers or c.sites:  # listening before the first round is announced
                assert self.aggregator is not None
                self.tiers.start(self.aggregator.config, workdir=self.workdir,
                                 site_urls=self.site_urls or None)
        if c.hosted:
            self._start_hosts(url, fleet)
            return
        shards = [data_for(i) for i in range(c.devices)]
        profiles = fleet_profiles(c.profiles, c.devices, seed=c.seed)
        if c.dropout > 0 or any(p.link_kbps or p.flaky for p in profiles):
            self.proxies = ProxyPool.for_broker(url)
        for i, (shard, profile) in enumerate(zip(shards, profiles, strict=True)):
            agent_config = c.agent_config(i, broker=self._device_broker(i, url), fleet=fleet,
                                          profile=profile,
                                          he_context=self.he_keys[0] if self.he_keys else "")
            device_id = agent_config.device_id
            if self.proxies is not None:  # the device talks to the broker through its proxy
                agent_config = dataclasses.replace(agent_config,
                                                   broker=self.proxies.url(device_id))
                self.proxies.proxy(device_id).bandwidth(profile.bandwidth_bytes_per_s)
                if profile.flaky:
                    self._flaky[device_id] = profile
            transform = None
            if i < c.attacker_count:
                transform = attacks.update_transform(c.attack, seed=c.seed * 7919 + i)
                shard = attacks.poisoned_data(c.attack, shard,
                                              classes=task_spec(c.task).classes)
            drop = None
            if c.secagg_drop_after_input:
                drop = functools.partial(_vanishes, c, fleet, device_id)
            self.agents.append(EdgeAgent(agent_config, shard, update_transform=transform,
                                         secagg_drop_after_input=drop,
                                         compute_gate=self._compute_gate))
        self._apply_dropout()
        if self.aggregator is not None:
            self.aggregator.start()
        for agent in self.agents:
            agent.start()

    @staticmethod
    def _settle_mqtt_version(c: SimulationConfig) -> SimulationConfig:
        """Another broker than the private mosquitto: with mqtt_version auto, one probe
        finds its version (one WARNING if it speaks only 3.1.1), so the engine is chosen
        for it and no device repeats the try."""
        if c.mqtt_version != "auto":
            return c
        try:
            version = negotiate_mqtt_version(c.broker, timeout=min(10.0, c.timeout_s / 4))
        except BrokerError as exc:  # not there yet: every link tries for itself, as before
            log.info("no MQTT version probe (%s); every device negotiates its own", exc)
            return c
        if version == "3.1.1" and c.hosted:
            raise ConfigError(
                f"the hosted engine speaks MQTT 5 only, and {c.broker} speaks 3.1.1: run "
                f"--engine agents (every device a real EdgeAgent, up to a few hundred "
                f"devices; this run has {c.devices}) or use a broker that speaks MQTT 5")
        return dataclasses.replace(c, mqtt_version=version)

    def _start_hosts(self, url: str, fleet: str) -> None:
        """Devices first, in their own processes; the aggregator once they are online (or
        ONLINE_WAIT_S passed), so its first round selects from the whole fleet."""
        c = self.config
        for block, broker in self._device_blocks(url):
            for first in range(block.start, block.stop, HOSTED_PER_PROCESS):
                self.hosts.append(HostProcess(self._host_plan(
                    broker, fleet, first, min(HOSTED_PER_PROCESS, block.stop - first))))
        for host in self.hosts:
            host.start()
        started = time.monotonic()
        while self._poll_hosts().ready < c.devices:
            if time.monotonic() - started > ONLINE_WAIT_S:
                report = self._hosted
                log.warning("%d of %d devices online after %.0f s; starting anyway (%s)",
                            report.ready, c.devices, ONLINE_WAIT_S,
                            "; ".join(f"{k} x{n}" for k, n in report.failures.items())
                            or "no failures reported yet")
                break
            time.sleep(HOST_POLL_S)
        self.online_s = time.monotonic() - started
        log.info("%d devices online in %.1f s, hosted in %d process(es)", self._hosted.ready,
                 self.online_s, len(self.hosts))
        if self.aggregator is not None:
            self.aggregator.start()

    def _host_plan(self, broker: str, fleet: str, first: int, count: int) -> HostPlan:
        c = self.config
        return HostPlan(broker=broker, fleet=fleet, first=first, count=count,
                        device_count=c.devices, task=c.task, alpha=c.alpha, seed=c.seed,
                        partition=c.partition, shards_per_device=c.shards_per_device,
                        codec=c.codec, id_format=DEVICE_ID, byzantine=c.attacker_count,
                        attack=c.attack,
                        log_level="WARNING", status_interval_s=c.status_interval_s)

    def _device_blocks(self, url: str) -> list[tuple[range, str]]:
        """(device indexes, their broker): all on `url`, or one block per site."""
        if not self.site_urls:
            return [(range(self.config.devices), url)]
        return list(zip(site_blocks(self.config.devices, len(self.site_urls)),
                        self.site_urls, strict=True))

    def _device_broker(self, index: int, url: str) -> str:
        return next(broker for block, broker in self._device_blocks(url) if index in block)

    def _poll_hosts(self) -> HostReport:
        if self.hosts:
            self._hosted = merged([h.poll() for h in self.hosts])
        return self._hosted

    def online(self) -> int:
        """Devices connected now."""
        if self.hosts:
            return self._poll_hosts().ready
        return sum(1 for a in self.agents if a.link.connected.is_set())

    def _apply_dropout(self) -> None:
        """Before each round, cut a fresh random set of devices off and restore the rest."""
        if self.proxies is None or self.rounds_done() == self._dropout_round:
            return
        self._dropout_round = self.rounds_done()
        ids = [a.config.device_id for a in self.agents]
        dropped = set(self._dropout_rng.sample(ids, self.config.dropped_per_round))
        back = []  # devices whose link comes back now
        for agent, device_id in zip(self.agents, ids, strict=True):
            proxy = self.proxies.proxy(device_id)
            if device_id in dropped:
                proxy.cut()
            elif device_id in self._flaky:
                if not proxy.flapping:  # each device on its own schedule, not in phase
                    p, jitter = self._flaky[device_id], self._dropout_rng.uniform
                    proxy.flap(up_s=p.up_s * jitter(0.6, 1.4),
                               down_s=p.down_s * jitter(0.6, 1.4))
            else:
                if proxy.is_cut:
                    back.append(agent)
                proxy.restore()
        # A device whose link came back reconnects now, as one told of its network coming
        # up would, not after the rest of a backoff that grew while it was cut off (up to
        # 30 s, which the round would wait for).
        for agent in back:
            agent.link.retry_now()

    def _start_aggregator(self, url: str, fleet: str, test) -> None:
        config = self.config.aggregator_config(
            broker=url, fleet=fleet, checkpoint=str(self.workdir / "aggregator.ckpt"),
            he_keys=self.he_keys)
        self.aggregator = AggregatorService(config, test_data=test, on_round=self._on_round)
        if self.he_keys is not None and self.aggregator.he_remote:
            self.keyholder = KeyHolderService(KeyHolderConfig(
                broker=url, fleet=fleet, client_id=f"{fleet}-keyholder",
                he_secret_context=self.he_keys[1], min_updates=config.min_updates,
                state=str(self.workdir / "he" / "keyholder.state"), log_level="WARNING"))
            self.keyholder.start()  # its own MQTT client: listening before round 1

    def announced_round(self) -> int:
        """The newest round any simulated device has heard announced."""
        return max([a.announced_round for a in self.agents]
                   + [self._hosted.announced_round], default=0)

    def rounds_done(self) -> int:
        if self.aggregator is not None:
            return len(self.records)
        return max(0, self.announced_round() - 1)

    def open_round(self) -> tuple[int, int]:
        """(round, updates in so far) of the round under way."""
        if self.aggregator is not None:
            o = self.aggregator.machine.open
            return o.round, o.count
        r = self.announced_round()
        return r, self._uploaders(r)

    def _uploaders(self, round_no: int) -> int:
        """Devices that uploaded for `round_no`, agents and hosted ones."""
        agents = sum(1 for a in self.agents if a.stats.traffic.get(round_no, (0, 0))[0] > 0)
        return agents + self._hosted.traffic.get(round_no, (0, 0, 0))[2]

    def _finished(self) -> bool:
        if self.aggregator is not None:
            if self.aggregator.failure is not None:
                raise FedmqError(f"the aggregator failed: {self.aggregator.failure!r}")
            return self.aggregator.finished.is_set()
        return self.rounds_done() >= self.config.rounds

    def _on_round(self, record: RoundRecord) -> None:
        with self.round_closed:
            self.records.append(record)
            self.round_closed.notify_all()

    def wait(self, progress=None) -> SimulationResult:
        """Block until every round is aggregated (or the timeout), then collect the figures."""
        c = self.config
        started = time.monotonic()
        deadline = started + c.timeout_s
        shown = 0
        while not self._finished():
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"simulation did not finish {c.rounds} rounds within {c.timeout_s:.0f} s "
                    f"({self.rounds_done()} done); see the log above for rejected updates"
                )
            with self.round_closed:
                self.round_closed.wait(0.1)
            self._poll_hosts()
            self._poll_tiers()
            self._apply_dropout()
            if progress is not None:
                shown = progress(self, shown)
        if progress is not None:
            progress(self, shown)
        return self._result(time.monotonic() - (self.began or started))

    def _poll_tiers(self, *, fresh: bool = False) -> None:
        """Raises if a worker or site aggregator failed; notes what each folded."""
        for process in self.tiers.processes:
            report = process.fresh() if fresh else process.poll()
            self._partials[process.name] = report.folded

    def _traffic(self, round_no: int) -> tuple[int, int]:
        """(bytes uploaded, bytes downloaded) of all devices for one round, as they counted."""
        seen = [a.stats.traffic.get(round_no, (0, 0)) for a in self.agents]
        seen.append(self._hosted.traffic.get(round_no, (0, 0))[:2])
        return sum(up for up, _ in seen), sum(down for _, down in seen)

    def _result(self, wall_s: float) -> SimulationResult:
        if self.hosts:  # counts as of now, not of the last periodic report
            self._hosted = merged([h.fresh() for h in self.hosts])
        hosted = self._hosted
        result = SimulationResult(wall_s=wall_s, startup_s=self.startup_s,
                                  devices=self.config.devices,
                                  never_connected=hosted.never_connected,
                                  never_connected_count=hosted.never_connected_count,
                                  connect_failures=hosted.failures)
        if self.aggregator is None:  # agents only: what the devices themselves saw
            self.records = [RoundRecord(
                round=r, version=r, accuracy=None, loss=None, train_loss=float("nan"),
                participants=self._uploaders(r),
                samples=0, bytes_up=self._traffic(r)[0], model_bytes=0, wall_s=0.0)
                for r in range(1, self.rounds_done() + 1)]
        result.rounds = [dataclasses.replace(r, bytes_down=self._traffic(r.round)[1])
                         for r in self.records]
        spent = [a.trainer.ldp_epsilon for a in self.agents
                 if a.trainer.ldp_epsilon is not None]
        result.ldp_epsilon = max(spent) if spent else None
        result.device_evals = {a.config.device_id: a.last_eval for a in self.agents
                               if a.last_eval is not None}
        if self.aggregator is not None:
            result.rejected = dict(self.aggregator.rejected)
            result.stopped = self.aggregator.stopped
        self._poll_tiers(fresh=True)  # counts as of now
        result.partials = dict(self._partials)
        return result

    def stop_devices(self) -> HostReport:
        """Stop every device (hosts in parallel: seconds at any fleet size); the hosted
        devices' final counts, who never came online among them."""
        if self.proxies is not None:  # let every device say goodbye through a working link
            for proxy in self.proxies.proxies.values():
                proxy.restore()
        for agent in self.agents:  # all told first: none waits behind one not yet told
            agent.request_stop()
        for agent in self.agents:
            with contextlib.suppress(Exception):
                agent.stop()
        self.agents = []
        if self.hosts:
            for host in self.hosts:  # all told first, then all awaited
                host.request_stop()
            self._hosted = merged([host.stop() for host in self.hosts])
            self.hosts = []
        return self._hosted

    def close(self) -> None:
        self.stop_devices()
        self.tiers.close()  # the workers or sites, and the site brokers
        if self.proxies is not None:
            self.proxies.stop()
        if self.aggregator is not None:
            with contextlib.suppress(Exception):
                self.aggregator.stop()
        if self.keyholder is not None:
            with contextlib.suppress(Exception):
                self.keyholder.stop()
        if self.broker is not None:
            self.broker.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Simulation:
        self._signals = contextlib.ExitStack()
        self._signals.enter_context(unwinding_on_kill())
        try:
            self.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.close()
        finally:
            self._signals.close()


@contextlib.contextmanager
def unwinding_on_kill():
    """SIGTERM and SIGHUP unwind like Ctrl-C while a simulation runs in this process.

    Python's default for both ends the process at once: a benchmark or script that is
    killed would leave the private mosquitto, the device processes and the temporary
    directory behind. Only signals still at that default are taken (a program's own
    handlers stay), only in the main thread (the only one Python lets set them), and the
    default comes back afterwards.
    """
    taken = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) is signal.SIG_DFL:
                taken[sig] = signal.signal(sig, _exit_on_signal)
    try:
        yield
    finally:
        for sig, previous in taken.items():
            signal.signal(sig, previous)


def _exit_on_signal(signum: int, _frame) -> None:
    sys.exit(128 + signum)


def write_metrics(result: SimulationResult, path: str | Path) -> Path:
    """JSON lines, one per round, and a PNG of accuracy and traffic beside them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:  # the format of the aggregator's --metrics file
        for r in result.rounds:
            fh.write(r.to_json() + "\n")
    return plot_metrics(result, path.with_suffix(".png"))


def plot_metrics(result: SimulationResult, path: Path) -> Path:
    matplotlib = require("matplotlib", "sim")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = metrics_figure(result)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def metrics_figure(result: SimulationResult):
    """Accuracy, loss and traffic per round, one panel each; legends sit beside their
    panel, never over the last rounds' points and bars."""
    require("matplotlib", "sim")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    records = result.rounds
    rounds = [r.round for r in records]
    fig, (ax_acc, ax_loss, ax_bytes) = plt.subplots(3, 1, figsize=(8, 8), sharex=True,
                                                    layout="constrained")
    ax_acc.plot(rounds, [np.nan if r.accuracy is None else r.accuracy for r in records],
                marker="o")
    # the devices' scores of the model each round trained from: the previous round's
    if any(r.fleet_accuracy is not None for r in records):
        ax_acc.lines[0].set_label("aggregator's held-out set")
        ax_acc.plot([r.round - 1 for r in records],
                    [np.nan if r.fleet_accuracy is None else r.fleet_accuracy for r in records],
                    marker="s", linestyle="--", label="devices' held-out data (global model)")
        if any(r.personal_accuracy is not None for r in records):
            ax_acc.plot([r.round - 1 for r in records],
                        [np.nan if r.personal_accuracy is None else r.personal_accuracy
                         for r in records], marker="^", linestyle=":",
                        label="devices' held-out data (personalized)")
        ax_acc.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax_acc.set_ylabel("test accuracy")
    ax_loss.plot(rounds, [np.nan if r.loss is None else r.loss for r in records],
                 marker="o", label="test")
    ax_loss.plot(rounds, [r.train_loss for r in records], marker=".", linestyle="--",
                 label="train (devices)")
    ax_loss.set_ylabel("loss")
    ax_bytes.bar([x - 0.2 for x in rounds], [r.bytes_up / 1024 for r in records],
                 width=0.4, label="uploaded")
    ax_bytes.bar([x + 0.2 for x in rounds], [(r.bytes_down or 0) / 1024 for r in records],
                 width=0.4, label="downloaded")
    ax_bytes.set_ylabel("KiB per round\n(all devices)")
    ax_bytes.set_xlabel("round")
    ax_bytes.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    for ax in (ax_loss, ax_bytes):
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    for ax in (ax_acc, ax_loss, ax_bytes):
        ax.grid(alpha=0.3)
    fig.suptitle(f"fedmq simulation: {result.summary()}", fontsize=10)
    return fig
