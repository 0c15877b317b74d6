"""The edge agent's configuration (TOML file + flags, see deploy/agent.toml)."""

from __future__ import annotations

import dataclasses

from edge_agent.privacy import LocalDP
from fedmq.config import BrokerConfig, default_device_id, option
from fedmq.core.protocol.topics import check_name
from fedmq.errors import ConfigError
from fedmq.tasks.partition import check_partitioner


@dataclasses.dataclass(frozen=True, kw_only=True)
class AgentConfig(BrokerConfig):
    device_id: str = option("", "this device's id and MQTT client id (default: host name)")
    task: str = option("digits", "task whose data this device trains on: a bundled one, or "
                       "your own as package.module:Class or a fedmq.tasks entry point (its "
                       "load_data reads the data; docs/custom-tasks.md)")
    device_index: int = option(0, "this device's share of the bundled data: index ...")
    device_count: int = option(1, "... out of this many shares")
    partition_seed: int = option(0, "seed of the train/test split and the partition")
    partition: str = option("", "how the bundled data is split over devices: iid, "
                            "dirichlet (label skew, alpha), shards (shards_per_device labels "
                            "per device) or natural (whole subjects; keyboard's roles); "
                            "empty: the task's own (dirichlet, natural for wearable)")
    alpha: float = option(0.5, "Dirichlet label skew of the partition (0 = IID)")
    shards_per_device: int = option(2, "the shards partition: labels per device")
    data_source: str = option("", "this device's own data instead of the bundled shard: "
                              "csv:PATH, npz:PATH, text:PATH or python:package.module:function "
                              "(read at start, and before every round with data_reload)")
    data_label: str = option("", "csv data: name of the label column (empty: the last column)")
    data_max_samples: int = option(10_000, "text and python data: most examples to keep")
    data_reload: bool = option(False, "re-read data_source before every round (a file a logger "
                               "appends to, a live python: sensor); a bad read is logged and "
                               "the previous data trained on")
    codec: str = option("float32", "codec for this device's updates (see `fedmq codecs`)")
    seed: int = option(-1, "seed of local shuffling and stochastic rounding "
                       "(-1: derived from device_id, so every device differs)")
    max_payload: int = option(128 * 1024, "largest MQTT payload in bytes; bigger updates are "
                              "sent in parts (lowered to the broker's limit automatically)")
    session_expiry_s: int = option(3600, "seconds the broker keeps this device's session "
                                   "(queued receipts) while it is offline; 0: clean sessions")
    resend_after_s: float = option(30.0, "re-send an update that got no receipt after this "
                                   "many seconds, doubling for each further re-send (and "
                                   "after every reconnect)")
    status_interval_s: float = option(10.0, "republish this device's retained status with "
                                      "its activity (round, bytes, outbox: `fedmq status`) "
                                      "at most this often, when it changed (0: birth only)")
    state_dir: str = option("", "directory for state that must survive a reboot "
                            "(error-feedback residual, outbox); empty: memory only")
    model_public_key: str = option("", "PEM Ed25519 public key of the aggregator's "
                                   "signing_key: refuse unsigned or tampered models (empty: "
                                   "accept unsigned ones)")
    he_context: str = option("", "the fleet's public HE key file (he-public.ctx from `fedmq "
                             "keys he-init`): encrypt every update under it, for an "
                             "aggregator with he = ckks (needs fedmq[he]); empty: plain")
    link_kbps: float = option(0.0, "uplink speed this device advertises, kbit/s (0: unknown); "
                              "the aggregator may assign a smaller codec to slow links")
    on_battery: bool = option(False, "advertise that this device runs on battery (the "
                              "aggregator may give it less work)")
    cpus: int = option(0, "cores to advertise (0: all the machine has)")
    train_threads: int = option(0, "threads a torch model trains with (0: the advertised "
                                "cores); numpy models use one")
    eval_holdout: float = option(0.0, "share of this device's examples kept aside, never "
                                 "trained on, to score models on when the aggregator asks "
                                 "(evaluate_fraction) and to compare personalized with "
                                 "global accuracy; 0: none (it then never evaluates)")
    secure_aggregation: bool = option(False, "send updates only masked, in the aggregator's "
                                      "SecAgg+ rounds (docs/secagg.md): never in the clear, "
                                      "whatever the aggregator asks")
    slowdown: float = option(1.0, "simulation only: compute this many times slower than "
                             "the host (a Pi Zero next to a laptop), time budget included")
    ldp_clip: float = option(0.0, "local DP: clip this device's update to this L2 norm and "
                             "add Gaussian noise before upload (0: off; docs/privacy.md)")
    ldp_noise_multiplier: float = option(1.0, "local DP: noise std in units of ldp_clip")
    ldp_delta: float = option(1e-5, "local DP: the delta of the epsilon this device reports")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.device_id:
            object.__setattr__(self, "device_id", default_device_id())
        check_name(self.device_id, "device_id")
        if self.partition:
            check_partitioner(self.partition)
        if self.shards_per_device < 1:
            raise ConfigError(f"shards_per_device {self.shards_per_device} must be >= 1")
        if not self.status_interval_s >= 0:
            raise ConfigError("status_interval_s must be >= 0 (0: publish the birth only)")
        if self.max_payload < 1024:
            raise ConfigError("max_payload must be at least 1024 bytes")
        self.local_dp()  # bad local DP settings fail now
        if not 0.0 <= self.eval_holdout < 1.0:
            raise ConfigError(f"eval_holdout {self.eval_holdout} must be in [0, 1)")
        if self.he_context and self.secure_aggregation:
            raise ConfigError("he_context and secure_aggregation are two ways of hiding "
                              "updates; set the one your aggregator uses (docs/privacy.md)")
        if self.data_reload and not self.data_source.strip():
            raise ConfigError("data_reload needs a data_source to re-read (the bundled shard "
                              "never changes)")

    def local_dp(self) -> LocalDP | None:
        """The device's local DP (None: off)."""
        if not self.ldp_clip:
            return None
        return LocalDP(clip=self.ldp_clip, noise_multiplier=self.ldp_noise_multiplier,
                       delta=self.ldp_delta)
