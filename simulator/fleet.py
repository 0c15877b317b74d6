"""A whole fleet on one machine: a broker, the real aggregator and N real agents.

Each agent is its own MQTT client with its own training thread; nothing is shortcut
around the broker, so what the simulator measures (bytes, rounds, accuracy) is what a
real fleet would see.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aggregator.config import AggregatorConfig, RoundOptions
from aggregator.service import AggregatorService, RoundRecord
from edge_agent.agent import EdgeAgent
from edge_agent.config import AgentConfig
from fedmq.config import option
from fedmq.core import codecs
from fedmq.errors import BrokerError, ConfigError, FedmqError, require
from fedmq.tasks import device_shards, fleet_test_set, task_spec
from simulator.broker import LocalMosquitto
from simulator.faultproxy import ProxyPool
from simulator.profiles import DeviceProfile, fleet_profiles

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SimulationConfig(RoundOptions):
    devices: int = option(10, "number of simulated devices")
    rounds: int = option(0, "federated rounds to run (0: the task's default, 20)")
    seed: int = option(0, "seed of data split, partition, model init and local shuffling")
    task: str = option("digits", "digits, keyboard (next character on Shakespeare roles, "
                       "torch), sensor (activity recognition, torch) or sensor-features")
    model: str = option("", "model (empty: the task's own; mlp or logreg for flat features)")
    hidden: int = option(64, "hidden units of the mlp")
    alpha: float = option(0.5, "Dirichlet label skew across devices (0 = IID)")
    epochs: int = option(0, "local epochs per round (0: the task's default)")
    batch_size: int = option(0, "local mini-batch size (0: the task's default)")
    lr: float = option(0.0, "local learning rate (0: the task's default)")
    prox_mu: float = option(0.0, "FedProx proximal term mu (0: FedAvg)")
    optimizer: str = option("fedavg", "server optimizer")
    server_lr: float = option(0.0, "server learning rate (0: optimizer default)")
    codec: str = option("float32", "update codec of every device")
    model_codec: str = option("float32", "codec of the full model broadcast")
    model_delta_codec: str = option("", "codec of the delta broadcast for devices holding the "
                                    "previous model (empty: full model only)")
    min_updates: int = option(0, "updates that close a round (0: all devices)")
    deadline_s: float = option(30.0, "round deadline in seconds")
    broker: str = option("", "use this broker instead of starting a private mosquitto")
    fleet: str = option("", "fleet name (default: a fresh sim-XXXXXX)")
    metrics: str = option("", "write per-round JSON lines here and a PNG plot next to it")
    timeout_s: float = option(600.0, "give up if the run takes longer than this")
    agents_only: bool = option(False, "run only the devices, against an aggregator started "
                               "separately (`fedmq aggregator`) on --broker and --fleet")
    byzantine: int = option(0, "this many devices send their delta flipped and scaled by "
                            "BYZANTINE_SCALE: an attack for --aggregation median or "
                            "trimmed_mean to withstand")
    dropout: float = option(0.0, "fraction of devices cut off from the broker before every "
                            "round (each device talks through its own fault proxy)")
    profiles: str = option("uniform", "device mix: uniform (all like this host), mixed (Pi "
                           "4s, Pi Zeros, cellular links: slower compute, thin uplinks, "
                           "advertised in each birth) or stragglers (30%% 10x slower, 30%% "
                           "on a link down about 3 s of every 7)")
    buffer_size: int = option(0, "async: updates per server step (0: a quarter of the devices)")
    slow_link_codec: str = option("", "codec assigned to devices with an uplink under 256 "
                                  "kbit/s, e.g. top2-sign-ef")

    def __post_init__(self) -> None:
        spec = task_spec(self.task)  # an unknown task fails here
        for name in ("rounds", "epochs", "batch_size", "lr"):  # 0: the task's default
            if not getattr(self, name):
                object.__setattr__(self, name, getattr(spec, name))
        if self.devices < 1 or self.rounds < 1:
            raise ConfigError("devices and rounds must be >= 1")
        if not 0 <= self.byzantine <= self.devices:
            raise ConfigError(f"byzantine {self.byzantine} must be between 0 and devices")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout {self.dropout} must be in [0, 1)")
        if self.agents_only and not (self.broker and self.fleet):
            raise ConfigError("--agents-only needs --broker and --fleet: those of the "
                              "aggregator the devices should join")
        fleet_profiles(self.profiles, 0, seed=0)  # an unknown mix fails here
        if self.mode not in ("sync", "async"):
            raise ConfigError(f"mode {self.mode!r} must be sync or async")
        if self.clients_per_round > self.devices:
            raise ConfigError(f"clients_per_round {self.clients_per_round} > devices "
                              f"{self.devices}")
        if self.min_updates > self.devices:
            raise ConfigError(f"min_updates {self.min_updates} > devices {self.devices}")

    @property
    def dropped_per_round(self) -> int:
        return round(self.dropout * self.devices)

    @property
    def quorum(self) -> int:
        """Updates that close a round (or an async step): K with selection, the buffer in
        async mode, else all devices that are not cut off; min_updates wins when set."""
        if self.min_updates:
            return self.min_updates
        if self.mode == "async":
            return self.buffer
        if self.clients_per_round:
            return min(self.clients_per_round, self.devices)
        return max(1, self.devices - self.dropped_per_round)

    @property
    def buffer(self) -> int:
        return self.buffer_size or max(1, self.devices // 4)


@dataclass(frozen=True)
class SimRound:
    round: int
    accuracy: float | None
    top3: float | None
    loss: float | None
    train_loss: float
    participants: int
    bytes_up: int
    bytes_down: int
    wall_s: float
    epsilon: float | None = None  # DP: privacy spent after this round


@dataclass
class SimulationResult:
    rounds: list[SimRound] = field(default_factory=list)
    wall_s: float = 0.0
    rejected: dict[str, int] = field(default_factory=dict)

    @property
    def final_accuracy(self) -> float | None:
        return self.rounds[-1].accuracy if self.rounds else None

    @property
    def bytes_up(self) -> int:
        return sum(r.bytes_up for r in self.rounds)

    @property
    def bytes_down(self) -> int:
        return sum(r.bytes_down for r in self.rounds)

    def summary(self) -> str:
        acc = self.final_accuracy
        if acc is None:  # agents only: the aggregator elsewhere measures accuracy
            return f"devices took part in {len(self.rounds)} rounds, {self.bytes_up} bytes uploaded"
        epsilon = self.rounds[-1].epsilon
        privacy = f", differential privacy epsilon {epsilon:.2f}" if epsilon is not None else ""
        return (f"final accuracy {acc:.4f} after {len(self.rounds)} rounds, "
                f"{self.bytes_up} bytes uploaded{privacy}")


# A Byzantine device sends -BYZANTINE_SCALE x its honest delta: it pushes the model
# hard the wrong way, as a poisoning attack would (Blanchard et al. 2017 use the like).
BYZANTINE_SCALE = 10.0


def _turn_byzantine(agent: EdgeAgent) -> None:
    """Make `agent` an attacker: it trains honestly, then sends its delta reversed and
    scaled, as float32 (a well-formed update that validation alone cannot tell apart)."""
    honest = agent.trainer.train

    def poisoned(*args, **kwargs):
        update = honest(*args, **kwargs)
        delta = -BYZANTINE_SCALE * codecs.decode(update.delta)
        return dataclasses.replace(update, delta=codecs.encode(delta, "float32"))

    agent.trainer.train = poisoned


class Simulation:
    """Owns every process and thread of one simulated run; `close()` stops them all."""

    def __init__(self, config: SimulationConfig, *, workdir: str | Path | None = None) -> None:
        self.config = config
        self._tmp = tempfile.TemporaryDirectory(prefix="fedmq-sim-") if workdir is None else None
        self.workdir = Path(workdir or self._tmp.name)  # type: ignore[union-attr]
        self.broker: LocalMosquitto | None = None
        self.aggregator: AggregatorService | None = None
        self.agents: list[EdgeAgent] = []
        self.records: list[RoundRecord] = []
        self.round_closed = threading.Condition()
        self.proxies: ProxyPool | None = None  # one fault proxy per device, with --dropout
        self._dropout_rng = random.Random(config.seed)
        self._dropout_round = -1
        self._flaky: dict[str, DeviceProfile] = {}  # devices whose link flaps on a schedule

    def start(self) -> None:
        c = self.config
        url = c.broker
        if not url:
            self.broker = LocalMosquitto(workdir=self.workdir / "broker")
            self.broker.workdir.mkdir(parents=True, exist_ok=True)
            self.broker.start()
            url = self.broker.url
        fleet = c.fleet or f"sim-{os.urandom(3).hex()}"
        test = fleet_test_set(c.task, device_count=c.devices, seed=c.seed)
        shards = device_shards(c.task, device_count=c.devices, alpha=c.alpha, seed=c.seed)
        if not c.agents_only:
            self._start_aggregator(url, fleet, test)
        profiles = fleet_profiles(c.profiles, c.devices, seed=c.seed)
        if c.dropout > 0 or any(p.link_kbps or p.flaky for p in profiles):
            self.proxies = ProxyPool.for_broker(url)
        for i, (shard, profile) in enumerate(zip(shards, profiles, strict=True)):
            device_id = f"{fleet}-dev{i:03d}"
            if self.proxies is not None:
                self.proxies.proxy(device_id).bandwidth(profile.bandwidth_bytes_per_s)
                if profile.flaky:
                    self._flaky[device_id] = profile
            agent_config = AgentConfig(
                broker=self.proxies.url(device_id) if self.proxies else url, fleet=fleet,
                device_id=device_id, task=c.task,
                device_index=i, device_count=c.devices, partition_seed=c.seed, alpha=c.alpha,
                codec=c.codec, seed=c.seed * 1_000_003 + i, log_level="WARNING",
                cpus=profile.cpus, link_kbps=profile.link_kbps, on_battery=profile.battery,
                slowdown=profile.slowdown, train_threads=1,  # many devices share this host
            )
            agent = EdgeAgent(agent_config, shard)
            if i < c.byzantine:
                _turn_byzantine(agent)
            self.agents.append(agent)
        self._apply_dropout()
        if self.aggregator is not None:
            self.aggregator.start()
        for agent in self.agents:
            agent.start()

    def _apply_dropout(self) -> None:
        """Before each round, cut a fresh random set of devices off and restore the rest."""
        if self.proxies is None or self.rounds_done() == self._dropout_round:
            return
        self._dropout_round = self.rounds_done()
        ids = [a.config.device_id for a in self.agents]
        dropped = set(self._dropout_rng.sample(ids, self.config.dropped_per_round))
        for device_id in ids:
            proxy = self.proxies.proxy(device_id)
            if device_id in dropped:
                proxy.cut()
            elif device_id in self._flaky:
                if not proxy.flapping:  # each device on its own schedule, not in phase
                    p, jitter = self._flaky[device_id], self._dropout_rng.uniform
                    proxy.flap(up_s=p.up_s * jitter(0.6, 1.4),
                               down_s=p.down_s * jitter(0.6, 1.4))
            else:
                proxy.restore()

    def _start_aggregator(self, url: str, fleet: str, test) -> None:
        c = self.config
        self.aggregator = AggregatorService(
            AggregatorConfig(
                broker=url, fleet=fleet, client_id=f"{fleet}-aggregator", task=c.task,
                model=c.model, hidden=c.hidden, seed=c.seed, rounds=c.rounds,
                min_updates=c.quorum if c.mode == "sync" and not c.clients_per_round else 1,
                deadline_s=c.deadline_s, buffer_size=c.buffer,
                slow_link_kbps=256.0, slow_link_codec=c.slow_link_codec,
                **{f.name: getattr(c, f.name) for f in dataclasses.fields(RoundOptions)},
                epochs=c.epochs, batch_size=c.batch_size, lr=c.lr, prox_mu=c.prox_mu,
                optimizer=c.optimizer,
                server_lr=c.server_lr, checkpoint=str(self.workdir / "aggregator.ckpt"),
                model_codec=c.model_codec, model_delta_codec=c.model_delta_codec,
                log_level="WARNING",
            ),
            test_data=test, on_round=self._on_round,
        )

    def announced_round(self) -> int:
        """The newest round any simulated device has heard announced."""
        return max((a.receiver.announcement.round for a in self.agents
                    if a.receiver.announcement is not None), default=0)

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
        return r, sum(1 for a in self.agents if a.stats.traffic.get(r, (0, 0))[0] > 0)

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
            self._apply_dropout()
            if progress is not None:
                shown = progress(self, shown)
        if progress is not None:
            progress(self, shown)
        return self._result(time.monotonic() - started)

    def _result(self, wall_s: float) -> SimulationResult:
        result = SimulationResult(wall_s=wall_s)
        if self.aggregator is None:  # agents only: what the devices themselves saw
            self.records = [RoundRecord(
                round=r, version=r, accuracy=None, test_loss=None, train_loss=float("nan"),
                participants=sum(1 for a in self.agents if a.stats.traffic.get(r, (0, 0))[0]),
                samples=0, bytes_up=0, model_bytes=0, wall_s=0.0)
                for r in range(1, self.rounds_done() + 1)]
        for r in self.records:
            up = sum(a.stats.traffic.get(r.round, (0, 0))[0] for a in self.agents)
            down = sum(a.stats.traffic.get(r.round, (0, 0))[1] for a in self.agents)
            result.rounds.append(SimRound(
                round=r.round, accuracy=r.accuracy, top3=r.top3, loss=r.test_loss,
                train_loss=r.train_loss,
                participants=r.participants, bytes_up=up, bytes_down=down, wall_s=r.wall_s,
                epsilon=r.epsilon))
        if self.aggregator is not None:
            result.rejected = dict(self.aggregator.rejected)
        return result

    def close(self) -> None:
        if self.proxies is not None:  # let every device say goodbye through a working link
            for proxy in self.proxies.proxies.values():
                proxy.restore()
        for agent in self.agents:
            with contextlib.suppress(Exception):
                agent.stop()
        if self.proxies is not None:
            self.proxies.stop()
        if self.aggregator is not None:
            with contextlib.suppress(Exception):
                self.aggregator.stop()
        if self.broker is not None:
            self.broker.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Simulation:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_metrics(result: SimulationResult, path: str | Path) -> Path:
    """JSON lines, one per round, and a PNG of accuracy and traffic beside them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for r in result.rounds:
            fh.write(json.dumps({
                "round": r.round, "accuracy": r.accuracy, "top3": r.top3, "loss": r.loss,
                "train_loss": r.train_loss, "participants": r.participants,
                "bytes_up": r.bytes_up, "bytes_down": r.bytes_down, "wall_s": round(r.wall_s, 4),
            }) + "\n")
    return plot_metrics(result, path.with_suffix(".png"))


def plot_metrics(result: SimulationResult, path: Path) -> Path:
    matplotlib = require("matplotlib", "sim")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rounds = [r.round for r in result.rounds]
    fig, (ax_acc, ax_bytes) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    ax_acc.plot(rounds, [np.nan if r.accuracy is None else r.accuracy for r in result.rounds],
                marker="o")
    ax_acc.set_ylabel("test accuracy")
    ax_acc.grid(alpha=0.3)
    ax_bytes.bar([x - 0.2 for x in rounds], [r.bytes_up / 1024 for r in result.rounds],
                 width=0.4, label="uploaded")
    ax_bytes.bar([x + 0.2 for x in rounds], [r.bytes_down / 1024 for r in result.rounds],
                 width=0.4, label="downloaded")
    ax_bytes.set_ylabel("KiB per round (all devices)")
    ax_bytes.set_xlabel("round")
    ax_bytes.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax_bytes.legend()
    ax_bytes.grid(alpha=0.3)
    fig.suptitle(f"fedmq simulation: {result.summary()}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
