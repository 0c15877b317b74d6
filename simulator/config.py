"""`fedmq simulate`'s configuration: the simulator's own keys, plus the aggregator's and a
few of the device's, each declared once where it belongs (aggregator/config.py,
edge_agent/config.py). What the simulator means differently by a borrowed key is said
here, in SIMULATOR_DEFAULTS, and nowhere else; `fedmq simulate --help` shows it."""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

from aggregator.config import AggregatorConfig, check_he_options
from edge_agent.config import AgentConfig
from fedmq.config import Default, borrow_options, option
from fedmq.core.protocol import UPDATE_BUCKETS
from fedmq.errors import ConfigError
from fedmq.tasks import task_partition, task_spec
from simulator.attacks import ATTACKS, check_attack
from simulator.profiles import MIXES, DeviceProfile, fleet_profiles
from simulator.tiers import site_names, worker_names

# Aggregator keys the simulator sets itself on every run, so not flags of `fedmq simulate`.
SET_BY_SIMULATOR = (
    "client_id",  # {fleet}-aggregator
    "checkpoint",  # in the run's temporary directory
    "metrics",  # the simulator's own --metrics, which has the devices' downloads too
    "log_level",  # --verbose
    # the simulated devices log in as nobody, so the aggregator does too
    "username", "password", "ca_file", "cert_file", "key_file",
    # a simulation runs one central aggregator
    "role", "shard", "partial_sources", "source_name", "flush_after_s",
    # --he ckks: a key pair made for the run, in its temporary directory
    "he_public_context", "he_secret_context",
)

# Aggregator keys whose default (or meaning) differs in a simulation, and why.
SIMULATOR_DEFAULTS: dict[str, Default] = {
    "broker": Default("", "use this broker instead of starting a private mosquitto"),
    "fleet": Default("", "fleet name (empty: a fresh sim-XXXXXX)"),
    # same default; it seeds the devices' data too
    "seed": Default(0, "seed of data split, partition, model init and local shuffling"),
    # a simulation ends (the service runs until stopped), and the task knows how to train
    "rounds": Default(0, "federated rounds to run (0: the task's default, 20)"),
    "epochs": Default(0, "local epochs per round (0: the task's default)"),
    "batch_size": Default(0, "local mini-batch size (0: the task's default)"),
    "lr": Default(0.0, "local learning rate (0: the task's default)"),
    # the simulator knows its fleet: wait for all of it, or a quarter of it in async mode
    "min_updates": Default(0, "updates that close a round (0: every device not cut off)"),
    "buffer_size": Default(0, "async: updates per server step (0: a quarter of the devices)"),
    "deadline_s": Default(30.0),
    # the cellular links of `--profiles mixed` are slower than this
    "slow_link_kbps": Default(256.0),
    # --he ckks: a key holder apart from the aggregator (simulator/fleet.py runs it)
    "he_decrypt": Default("keyholder", "--he: who decrypts each round's sum: keyholder (a "
                          "key holder beside the aggregator, which gets the public key only) "
                          "or local (the aggregator holds the secret key)"),
}

def round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def device_id(fleet: str, index: int) -> str:
    """Simulated device `index`'s id (its MQTT client id and topic level)."""
    return DEVICE_ID.format(fleet=fleet, index=index)


DEVICE_ID = "{fleet}-dev{index:03d}"

# `--engine auto` runs devices hosted (many per event loop) above this many devices.
HOSTED_ABOVE = 200
ENGINES = ("auto", "agents", "hosted")

# The share of its data a simulated device holds out to score models on, unless told.
SIM_EVAL_HOLDOUT = 0.2
# Device keys every simulated device shares.
AGENT_KEYS = ("codec", "partition", "alpha", "shards_per_device", "status_interval_s",
              "ldp_clip", "ldp_noise_multiplier", "ldp_delta", "eval_holdout")
AGENT_DEFAULTS: dict[str, Default] = {
    "codec": Default("float32", "update codec of every device (see `fedmq codecs`)"),
    "partition": Default("", "how the task's data is split over the devices: iid, dirichlet "
                         "(label skew, --alpha), shards (--shards-per-device labels per "
                         "device) or natural (whole subjects, one or more per device); empty: "
                         "the task's own (digits and sensor: dirichlet; wearable: natural; "
                         "keyboard, synthetic and user tasks: their own, only)"),
    "alpha": Default(0.5, "Dirichlet label skew across devices (0 = IID)"),
    "eval_holdout": Default(0.0, "share of each device's examples held out to score models "
                            "on, with --evaluate-fraction, --personal-layers or "
                            f"--finetune-steps (0: {SIM_EVAL_HOLDOUT:g} with them, else "
                            "none)"),
}


def _borrowed() -> type:
    """The aggregator's and the devices' keys, as a base class of SimulationConfig."""
    cls = dataclasses.make_dataclass(
        "BorrowedOptions",
        borrow_options(AggregatorConfig, exclude=SET_BY_SIMULATOR, defaults=SIMULATOR_DEFAULTS)
        + borrow_options(AgentConfig, keys=AGENT_KEYS, defaults=AGENT_DEFAULTS),
        frozen=True, kw_only=True)
    cls.__module__ = __name__
    cls.__doc__ = "AggregatorConfig's and AgentConfig's options, with the simulator's defaults."
    return cls


BorrowedOptions = _borrowed()


@dataclass(frozen=True, kw_only=True)
class SimulationConfig(BorrowedOptions):
    """A simulated run: the simulator's own keys below, the borrowed ones above."""

    devices: int = option(10, "number of simulated devices")
    metrics: str = option("", "write per-round JSON lines here and a PNG plot next to it")
    timeout_s: float = option(600.0, "give up if the run takes longer than this")
    agents_only: bool = option(False, "run only the devices, against an aggregator started "
                               "separately (`fedmq aggregator`) on --broker and --fleet")
    attackers: int = option(0, "devices 0 .. K-1 attack, as --attack says (an attack for a "
                            "robust --aggregation to withstand)")
    attack: str = option("scaled", "what attackers do: sign_flip (-delta), scaled (-10 "
                         "delta), gaussian (random, 10x the delta's RMS) or label_flip "
                         "(train on flipped labels; --engine agents)", choices=ATTACKS)
    byzantine: int = option(0, "this many devices send their delta flipped and scaled by 10 "
                            "(the same as --attack scaled --attackers K)")
    dropout: float = option(0.0, "fraction of devices cut off from the broker before every "
                            "round (each device talks through its own fault proxy)")
    secagg_drop_after_input: float = option(0.0, "with --secure-aggregation: this fraction "
                                            "of the devices, drawn anew each round, vanish "
                                            "once their masked input is out (they never "
                                            "answer the unmask request)")
    profiles: str = option("uniform", "device mix: uniform (all like this host), mixed (Pi "
                           "4s, Pi Zeros, cellular links: slower compute, thin uplinks, "
                           "advertised in each birth) or stragglers (30%% 10x slower, 30%% "
                           "on a link down about 3 s of every 7)", choices=MIXES)
    workers: int = option(0, "aggregate through this many worker processes and a reducer "
                          "(the simulator's aggregator) on the one broker: each worker takes "
                          "the devices of its update buckets (docs/scale.md); 0: one "
                          "aggregator. Needs aggregation = mean without central DP")
    sites: int = option(0, "spread the devices over this many sites: each a mosquitto of its "
                        "own, bridged to the private central broker, with a site aggregator "
                        "process that sends partial aggregates upstream (docs/scale.md); "
                        "0: every device on the central broker")
    he_clip_norm: float = option(1.0, "--he ckks: the L2 norm every device clips its "
                                 "update to before encrypting it (in the run's key pair)")
    engine: str = option("auto", "how devices run: agents (each a real EdgeAgent: its own "
                         "MQTT client and thread; every feature, up to a few hundred), "
                         "hosted (DeviceMachines on one event loop per process: 10,000s of "
                         "devices, uniform profiles, no --dropout) or auto (hosted above "
                         f"{HOSTED_ABOVE} devices when nothing needs agents)",
                         choices=ENGINES)

    def __post_init__(self) -> None:
        spec = task_spec(self.task)  # an unknown task fails here
        task_partition(self.task, self.partition)  # and a partition it cannot have
        for name in ("rounds", "epochs", "batch_size", "lr"):  # 0: the task's default
            if not getattr(self, name):
                object.__setattr__(self, name, getattr(spec, name))
        if self.devices < 1 or self.rounds < 1:
            raise ConfigError("devices and rounds must be >= 1")
        if not 0 <= self.byzantine <= self.devices:
            raise ConfigError(f"byzantine {self.byzantine} must be between 0 and devices")
        if not 0 <= self.attackers <= self.devices:
            raise ConfigError(f"attackers {self.attackers} must be between 0 and devices")
        if self.attackers and self.byzantine:
            raise ConfigError("give --attackers (with --attack) or --byzantine, not both")
        if self.byzantine and self.attack != "scaled":
            raise ConfigError("--byzantine is --attack scaled; for another attack use "
                              "--attackers")
        check_attack(self.attack)
        if not 0.0 <= self.secagg_drop_after_input < 1.0:
            raise ConfigError(f"secagg_drop_after_input {self.secagg_drop_after_input} must "
                              "be in [0, 1)")
        if self.secagg_drop_after_input and not self.secure_aggregation:
            raise ConfigError("--secagg-drop-after-input needs --secure-aggregation")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout {self.dropout} must be in [0, 1)")
        if self.agents_only and not (self.broker and self.fleet):
            raise ConfigError("--agents-only needs --broker and --fleet: those of the "
                              "aggregator the devices should join")
        fleet_profiles(self.profiles, 0, seed=0)  # an unknown mix fails here
        if self.engine not in ENGINES:
            raise ConfigError(f"engine {self.engine!r} must be one of {', '.join(ENGINES)}")
        if self.engine == "hosted" and self._needs_agents():
            raise ConfigError(f"--engine hosted runs uniform devices without fault proxies; "
                              f"{self._needs_agents()} needs --engine agents")
        self._check_tiers()
        if self.engine == "hosted" and self.mqtt_version == "3.1.1":
            raise ConfigError("--engine hosted speaks MQTT 5 only; --mqtt-version 3.1.1 needs "
                              "--engine agents")
        if self.clients_per_round > self.devices:
            raise ConfigError(f"clients_per_round {self.clients_per_round} > devices "
                              f"{self.devices}")
        if self.min_updates > self.devices:
            raise ConfigError(f"min_updates {self.min_updates} > devices {self.devices}")
        # every aggregator key is checked now, by the aggregator's own rules (HE keys are
        # made when the run starts: their combinations are checked here)
        check_he_options(self)
        if self.he and self.devices < 2:
            raise ConfigError("--he ckks needs at least 2 devices: the sum of one update is "
                              "that update")
        if self.he and self.agents_only:
            raise ConfigError("--he with --agents-only: run the devices with `fedmq agent` "
                              "and he_context, the public file of the aggregator's key pair")
        if not self.he_clip_norm > 0:
            raise ConfigError("he_clip_norm must be > 0")
        self.aggregator_config(broker=self.broker or "mqtt://127.0.0.1:1883",
                               fleet=self.fleet or "sim", checkpoint="", he_keys=None)

    @property
    def attacker_count(self) -> int:
        return self.attackers or self.byzantine

    def _check_tiers(self) -> None:
        if self.workers < 0 or self.sites < 0:
            raise ConfigError("workers and sites must be >= 0")
        if self.workers and self.sites:
            raise ConfigError("give --workers or --sites, not both")
        if self.workers > UPDATE_BUCKETS:
            raise ConfigError(f"at most {UPDATE_BUCKETS} workers (the protocol's update "
                              "buckets)")
        if self.sites > self.devices:
            raise ConfigError(f"sites {self.sites} > devices {self.devices}: every site "
                              "needs a device")
        if (self.workers or self.sites) and self.agents_only:
            raise ConfigError("--agents-only runs no aggregator: start the workers or sites "
                              "yourself (docs/scale.md)")
        if self.sites and self.broker:
            raise ConfigError("--sites starts the central broker and the site brokers "
                              "itself: leave out --broker")
        if (self.workers or self.sites) and (self.he or self.secure_aggregation):
            raise ConfigError("workers and sites fold plain updates into partial sums: "
                              "--he and --secure-aggregation need every update at one "
                              "aggregator")
        if self.sites and self._needs_agents():
            raise ConfigError(f"{self._needs_agents()} puts fault proxies in front of one "
                              "broker: it does not combine with --sites")

    @property
    def partial_sources(self) -> str:
        """The workers' or sites' names the aggregator folds partials of ('' if none)."""
        return ",".join(worker_names(self.workers) + site_names(self.sites))

    def _needs_agents(self) -> str:
        """What in this run only EdgeAgents can do ('' if nothing)."""
        if self.attacker_count and self.attack == "label_flip":
            return "--attack label_flip"
        if self.ldp_clip:
            return "--ldp-clip"
        if self.profiles != "uniform":
            return f"--profiles {self.profiles}"
        if self.secure_aggregation:
            return "--secure-aggregation"
        if self.dropout:
            return "--dropout"
        if self.he:
            return "--he"
        if self.evaluate_fraction or self.personal_layers or self.finetune_steps:
            return "--evaluate-fraction, --personal-layers or --finetune-steps"
        return ""

    @property
    def hosted(self) -> bool:
        """Whether devices run hosted (DeviceMachines on event loops) or as EdgeAgents."""
        if self.engine == "auto":
            return self.devices > HOSTED_ABOVE and not self._needs_agents()
        return self.engine == "hosted"

    def secagg_dropouts(self, fleet: str, round: int) -> frozenset[str]:
        """The devices that vanish after their masked input in `round`."""
        count = round_half_up(self.secagg_drop_after_input * self.devices)
        ids = [device_id(fleet, i) for i in range(self.devices)]
        return frozenset(random.Random(f"{self.seed}/secagg/{round}").sample(ids, count))

    def cohort_shortfall(self) -> str:
        """Why most rounds will wait out their deadline ('' if they will not): with
        selection and dropout, the devices a round asks (K x over_select) less the share
        cut off are expected to fall short of the K updates it closes on."""
        k = self.clients_per_round
        if self.mode != "sync" or not k or not self.dropout:
            return ""
        asked = min(self.devices, math.ceil(k * self.over_select))
        answering = asked * (1.0 - self.dropout)
        if answering >= k:
            return ""
        # a quarter to spare for the draw's spread (at 30% dropout, 1.6 still leaves one
        # round in seven short of K; 1.8 about one in a hundred), up to a tenth
        enough = math.ceil(12.5 / (1.0 - self.dropout)) / 10
        fix = (f"--over-select {enough:g} asks enough" if math.ceil(k * enough) <= self.devices
               else f"fewer --clients-per-round (at most {int(self.devices * (1 - self.dropout))})")
        return (f"with --dropout {self.dropout:g}, about {answering:.1f} of the {asked} devices "
                f"a round asks (clients_per_round {k} x over_select {self.over_select:g}) "
                f"can answer: most rounds will close at their {self.deadline_s:g} s deadline "
                f"short of {k} updates; {fix}")

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

    def aggregator_config(self, *, broker: str, fleet: str, checkpoint: str,
                          he_keys: tuple[str, str] | None = None) -> AggregatorConfig:
        """The aggregator of this run: every borrowed key as given, the rest derived.
        `he_keys`: the run's (public, secret) HE key files (None: HE off)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(AggregatorConfig)
                  if f.name not in SET_BY_SIMULATOR}
        values.update(
            broker=broker, fleet=fleet, client_id=f"{fleet}-aggregator", checkpoint=checkpoint,
            log_level="WARNING", buffer_size=self.buffer,
            # with workers the simulator's aggregator is their reducer; with sites the
            # central aggregator (it would also fold devices connected to it directly)
            role="reducer" if self.workers else "central",
            partial_sources=self.partial_sources,
            # with selection, the cohort's K closes a round; in async mode, the buffer
            min_updates=self.quorum if self.mode == "sync" and not self.clients_per_round else 1)
        if he_keys is None:
            values["he"] = ""
        else:  # the key holder decrypts sums of at least 2 (a sum of 1 is the update)
            local = self.he_decrypt == "local"
            values.update(he_public_context=he_keys[0],
                          he_secret_context=he_keys[1] if local else "",
                          he_decrypt="local" if local else "keyholder",
                          min_updates=max(2, values["min_updates"]))
        return AggregatorConfig(**values)

    def agent_config(self, index: int, *, broker: str, fleet: str,
                     profile: DeviceProfile, he_context: str = "") -> AgentConfig:
        """Device `index` of this run, shaped by its profile (`he_context`: the run's
        public HE key file, with --he)."""
        return AgentConfig(
            broker=broker, fleet=fleet, device_id=device_id(fleet, index), task=self.task,
            device_index=index, device_count=self.devices, partition_seed=self.seed,
            partition=self.partition, alpha=self.alpha,
            shards_per_device=self.shards_per_device, codec=self.codec,
            seed=self.seed * 1_000_003 + index,
            log_level="WARNING", cpus=profile.cpus, link_kbps=profile.link_kbps,
            on_battery=profile.battery, slowdown=profile.slowdown,
            train_threads=1,  # many devices share this host
            status_interval_s=self.status_interval_s, he_context=he_context,
            ldp_clip=self.ldp_clip, ldp_noise_multiplier=self.ldp_noise_multiplier,
            ldp_delta=self.ldp_delta,
            secure_aggregation=self.secure_aggregation, mqtt_version=self.mqtt_version,
            eval_holdout=(self.eval_holdout or SIM_EVAL_HOLDOUT) if self.evaluates else 0.0,
        )

    @property
    def evaluates(self) -> bool:
        """Whether devices score models (and so hold data out for it)."""
        return bool(self.evaluate_fraction or self.personal_layers or self.finetune_steps)
