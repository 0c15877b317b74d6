"""The aggregator service's configuration (TOML file + flags, see deploy/aggregator.toml)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from aggregator.guard import ModelGuard
from aggregator.he_round import HESetup, load_setup
from aggregator.ingest import NORM_POLICIES, UpdateLimits
from aggregator.partial import Shard
from aggregator.rounds import LATE_POLICIES, ON_INSUFFICIENT, RoundPolicy
from aggregator.selection import AssignmentPolicy, CohortPolicy
from aggregator.staleness import STALENESS_KINDS, StalenessPolicy
from aggregator.strategy.accounting import accountant_names
from aggregator.strategy.optimizers import ServerOptConfig, create_optimizer, optimizer_names
from aggregator.strategy.privacy import CentralDP
from aggregator.strategy.rules import rule_names
from aggregator.strategy.schedule import cosine_lr
from fedmq.config import BrokerConfig, option
from fedmq.core import codecs, he
from fedmq.core.chunking import Reassembler
from fedmq.core.layout import LayoutMask
from fedmq.core.protocol import UPDATE_WEIGHTS, TaskConfig, check_name
from fedmq.errors import ConfigError, ProtocolError
from fedmq.models import build_model, model_names
from fedmq.tasks import TASKS, task_spec

ROLES = ("central", "reducer", "worker", "site")
# Where the dashboard's password may come from instead of a flag (which `ps` shows).
DASHBOARD_PASSWORD_ENV = "FEDMQ_DASHBOARD_PASSWORD"
MODES = ("sync", "async")
HE_SCHEMES = ("", *he.SCHEMES)


@dataclass(frozen=True, kw_only=True)
class RoundOptions:
    """How rounds deal with drop-outs, stragglers and late updates: the aggregator's
    settings, which `fedmq simulate` takes as they are."""

    mode: str = option("sync", "sync: rounds of a selected cohort; async: FedBuff, every "
                       "device trains continuously and the server steps every buffer_size "
                       "updates", choices=MODES)
    clients_per_round: int = option(0, "sync: K, the round closes on K updates (0: every "
                                    "device trains and min_updates closes the round)")
    over_select: float = option(1.3, "sync: select ceil(K * over_select) online devices, so "
                                "drop-outs do not stall the round (Bonawitz et al. 2019)")
    late_updates: str = option("discard", "sync: an update trained on an older model is "
                               "discarded or folded into the open round with weight s(tau) "
                               "(async always folds)", choices=LATE_POLICIES)
    staleness: str = option("polynomial", "s(tau): constant, polynomial (1+tau)^-a, or hinge",
                            choices=STALENESS_KINDS)
    staleness_a: float = option(0.5, "exponent a of polynomial, slope a of hinge")
    staleness_b: float = option(4.0, "hinge: versions forgiven before discounting")
    max_staleness: int = option(10, "refuse updates more than this many versions behind")
    time_budget_s: float = option(0.0, "devices stop local training after this many seconds "
                                  "and report the samples processed (0: no budget)")
    constrained_epochs: int = option(0, "epochs for devices with 1 core, < 1 GB RAM or on "
                                     "battery (0: the same as everyone)")
    constrained_time_budget_s: float = option(0.0, "seconds of local training for those "
                                              "devices, to spare batteries (0: time_budget_s)")
    dp_noise_multiplier: float = option(0.0, "central differential privacy (DP-FedAvg): "
                                        "Gaussian noise of this many dp_clip_norms on each "
                                        "round's sum; devices weigh equally (0: off)")
    dp_clip_norm: float = option(1.0, "DP: every update is clipped to this L2 norm")
    dp_delta: float = option(1e-5, "DP: the delta of the (epsilon, delta) reported per round")
    dp_accountant: str = option("rdp", "DP: privacy accountant of dp-accounting (extra dp): "
                                "rdp (amplified by cohort sampling without replacement, "
                                "under replace-one) or pld (no amplification claimed)",
                                choices=accountant_names)
    dp_target_epsilon: float = option(0.0, "DP: stop training before a round would spend "
                                      "beyond this epsilon (0: no budget)")
    dp_seed: int = option(-1, "DP: seed of the noise, for reproducible tests only (-1: fresh "
                          "from the OS; a known seed makes the noise removable)")
    dp_clip_quantile: float = option(0.0, "DP: adapt the clip to this quantile of the "
                                     "updates' norms (Andrew et al. 2021; e.g. 0.5; 0: the "
                                     "fixed dp_clip_norm, which is then where it starts)")
    dp_clip_lr: float = option(0.2, "DP: learning rate of the adaptive clip's geometric step")
    dp_clip_count_noise: float = option(0.0, "DP: noise std of the adaptive clip's count of "
                                        "updates within it (0: expected updates / 20)")
    he: str = option("", "homomorphic encryption of updates: ckks (devices encrypt their "
                     "clipped update under the fleet's public key, the server sums "
                     "ciphertexts; needs fedmq[he], docs/privacy.md); empty: off",
                     choices=HE_SCHEMES)
    aggregation: str = option("mean", "mean (FedAvg, weighted by samples), or robust to a "
                              "minority of corrupted updates: median or trimmed_mean "
                              "(coordinate-wise), krum, multi_krum, bulyan or centered_clip "
                              "(see byzantine_f); robust rules are unweighted and keep the "
                              "round's updates",
                              choices=rule_names)
    evaluate_fraction: float = option(0.0, "federated evaluation: this share of the devices "
                                      "(a different draw for each model) score each new "
                                      "model on their own held-out data (agents' "
                                      "eval_holdout) and report it; the round's record "
                                      "holds the sample-weighted fleet accuracy (0: off)")
    personal_layers: str = option("", "personalization (FedPer): comma-separated fnmatch "
                                  "patterns of the model's tensors that never leave a "
                                  "device, e.g. out.* (keyboard's output layer); updates "
                                  "carry the other tensors only (empty: all federate)")
    finetune_steps: int = option(0, "devices fine-tune each model this many steps on their "
                                 "own data before using it, and report its personalized "
                                 "accuracy beside the global one (0: off)")
    finetune_lr: float = option(0.0, "learning rate of that fine-tuning (0: the task's lr, "
                                "which overwrites what the fleet learnt; a tenth of it "
                                "suits keyboard)")
    finetune_check: int = option(0, "early stopping of that fine-tuning: every this many "
                                 "steps a device scores it on the last fifth of its training "
                                 "data (kept out of fine-tuning) and keeps the best, the "
                                 "model as announced included (0: off, keep the last)")
    personal_steps: int = option(0, "FedRep, with personal_layers: each round a device "
                                 "first trains its personal layers alone this many steps "
                                 "(shared ones frozen), then the shared ones with its "
                                 "personal ones frozen; it also refits them this way to a "
                                 "new model before using or scoring it (0: FedPer, both "
                                 "train together)")
    trim_fraction: float = option(0.1, "trimmed_mean: fraction cut from each end, per "
                                  "coordinate (tolerates floor(fraction x updates) bad ones)")
    byzantine_f: int = option(1, "krum, multi_krum (n >= 2f+3 updates a round), bulyan "
                              "(n >= 4f+3) and centered_clip (n >= 2f+1): attackers a round "
                              "withstands")


HE_DECRYPT = ("auto", "keyholder", "local")


def check_he_options(options: RoundOptions) -> None:
    """Refuse, at config load, what `he` cannot be combined with (RoundPolicy checks the
    same on its own fields; this says it in the config's words, before keys are read)."""
    if options.he not in HE_SCHEMES:
        raise ConfigError(f"he {options.he!r} must be ckks or empty (off)")
    if not options.he:
        return
    if options.aggregation != "mean":
        raise ConfigError(f"he = ckks sums encrypted updates: aggregation = "
                          f"{options.aggregation} needs every update in the clear; use mean")
    if options.dp_noise_multiplier:
        raise ConfigError("he = ckks with central DP is not supported: leave "
                          "dp_noise_multiplier at 0")
    if options.mode != "sync" or options.late_updates != "discard":
        raise ConfigError("he = ckks needs mode = sync and late_updates = discard: a late "
                          "update's weight s(tau) cannot be applied to its ciphertext")
    if getattr(options, "max_update_norm", 0.0):
        raise ConfigError("he = ckks: the server cannot measure an encrypted update's norm; "
                          "devices clip to the clip norm of the key file (`fedmq keys "
                          "he-init --clip-norm`): leave max_update_norm at 0")


@dataclass(frozen=True, kw_only=True)
class AggregatorConfig(BrokerConfig, RoundOptions):
    client_id: str = option("fedmq-aggregator", "the aggregator's MQTT client id")
    session_expiry_s: int = option(3600, "seconds the broker keeps the aggregator's session "
                                   "(queued updates) while it is away; 0: clean sessions")
    task: str = option("digits", f"task: {' '.join(TASKS)}, synthetic-ALPHA-BETA, or your "
                       "own: package.module:Class or an entry point of group fedmq.tasks "
                       "(docs/custom-tasks.md); sets the model and the test set")
    model: str = option("", "model architecture (empty: the task's own: mlp for digits, "
                        "char_gru for keyboard, har_cnn for sensor); mlp or logreg fit "
                        "flat-feature tasks", choices=model_names)
    hidden: int = option(64, "hidden units of the mlp")
    rnn_hidden: int = option(0, "hidden units of the keyboard's char_gru (0: its default, 128)")
    rnn_layers: int = option(0, "recurrent layers of the keyboard's char_gru (0: its default, "
                             "1)")
    local_optimizer: str = option("", "local optimizer of the keyboard's char_gru: sgd or "
                                  "adam (fresh state every round; empty: the task's "
                                  "default); lr is its learning rate")
    seed: int = option(0, "seed of the initial model and of the held-out split")
    evaluate: bool = option(True, "evaluate each new model on the task's held-out test split")
    rounds: int = option(0, "stop after this many aggregated rounds (0: run until stopped)")
    min_updates: int = option(2, "a round closes as soon as this many updates arrived")
    deadline_s: float = option(60.0, "seconds a round waits for min_updates")
    on_insufficient: str = option("extend", "too few updates at the deadline: extend (wait "
                                  "longer) or rerun (re-announce as a new round, keeping them)",
                                  choices=ON_INSUFFICIENT)
    buffer_size: int = option(0, "async: server steps every K updates (0: min_updates)")
    constrained_batch_size: int = option(0, "their mini-batch size, to fit small memories "
                                         "(0: the same as everyone)")
    slow_link_kbps: float = option(0.0, "devices advertising a slower uplink than this ...")
    slow_link_codec: str = option("", "... are assigned this codec, e.g. top2-sign-ef")
    epochs: int = option(2, "local epochs per round on each device")
    batch_size: int = option(32, "local mini-batch size")
    lr: float = option(0.1, "local learning rate")
    lr_decay: float = option(1.0, "the devices' learning rate at the last round, as a share "
                             "of lr: it falls on a cosine over `rounds` (1: constant; below "
                             "1 needs rounds)")
    max_steps: int = option(-1, "cap on local optimizer steps per round (-1: the task's "
                            "default, 50 for keyboard; 0: no cap)")
    update_weight: str = option("trained", "what an update weighs in the average: the samples "
                                "its device trained on this round (trained), or its device's "
                                "whole training set (examples: FedAvg's n_k, as LEAF; under a "
                                "step cap the fleet then weighs every example alike, as a "
                                "central run does)", choices=UPDATE_WEIGHTS)
    prox_mu: float = option(0.0, "FedProx proximal term mu on the devices (0: plain FedAvg; "
                            "0.001-1 as in Li et al. 2020)")
    optimizer: str = option("fedavg", "server optimizer (Reddi et al. 2021; server_lr, momentum, "
                            "beta1, beta2 and tau tune them)", choices=optimizer_names)
    server_lr: float = option(0.0, "server learning rate (0: the optimizer's default)")
    momentum: float = option(0.9, "FedAvgM momentum")
    beta1: float = option(0.9, "FedAdam/FedYogi/FedAdagrad first-moment decay")
    beta2: float = option(0.99, "FedAdam/FedYogi second-moment decay")
    tau: float = option(1e-3, "adaptivity of FedAdam/FedYogi/FedAdagrad")
    model_codec: str = option("float32", "codec of the full model broadcast, e.g. float16 or q8")
    model_delta_codec: str = option("", "codec of a delta broadcast for devices holding the "
                                    "previous version, e.g. q8 (empty: full model only)")
    max_payload: int = option(128 * 1024, "largest MQTT payload in bytes; bigger ones are chunked")
    chunk_timeout_s: float = option(
        60.0, "drop a chunked update when no new part of it arrived for this many seconds")
    max_pending_bytes: int = option(
        0, "bytes all incomplete chunked updates may declare together; a new one beyond is "
        "refused (0: automatic, a float32 update's worth for every device the round awaits "
        "and one more, at least 64 MiB)")
    max_update_bytes: int = option(0, "largest update payload, whole or declared by its parts; "
                                   "bigger ones are rejected as too_large (0: 9 bytes per model "
                                   "parameter + 256 KiB)")
    require_known_devices: bool = option(False, "refuse updates from devices that never "
                                         "published a birth on their status topic, or are "
                                         "offline (unknown_device, offline_device); turn "
                                         "it on in production (docs/security.md)")
    max_update_norm: float = option(0.0, "fixed bound on the L2 norm of a decoded update "
                                    "(0: the adaptive bound, see adaptive_norm_factor); see "
                                    "norm_policy")
    adaptive_norm_factor: float = option(5.0, "with max_update_norm 0, the bound is this x "
                                         "the median norm of the last 64 accepted updates, "
                                         "once 5 were accepted (0 with max_update_norm 0: "
                                         "no bound at all, unsafe)")
    norm_policy: str = option("clip", "an update above the norm bound is scaled down to it "
                              "(clip) or refused as norm_exceeded (reject)",
                              choices=NORM_POLICIES)
    max_sample_factor: float = option(4.0, "an update is weighted by at most this x the "
                                      "median samples of recent accepted updates, and x "
                                      "the examples its device declared in its birth times "
                                      "epochs (0: claims taken as they are, unsafe)")
    max_model_growth: float = option(10.0, "refuse a round whose new model is not finite or "
                                     "whose L2 norm is above this x the last good model's "
                                     "(at least 1.0); the round runs again from the last "
                                     "good model (0: refuse only non-finite models)")
    signing_key: str = option("", "PEM Ed25519 private key that signs model announcements "
                              "(`fedmq keys init`); empty: unsigned")
    he_public_context: str = option("", "he: the fleet's public HE key file (`fedmq keys "
                                    "he-init`; empty, with he_decrypt = local only: the "
                                    "public part of he_secret_context)")
    he_secret_context: str = option("", "he: the secret HE key file, with he_decrypt = local "
                                    "only (this process then decrypts each round's sum "
                                    "itself)")
    he_decrypt: str = option("auto", "he: who decrypts each round's encrypted sum: keyholder "
                             "(a separate `fedmq keyholder` holds the secret key; the "
                             "aggregator gets he_public_context only and refuses a secret "
                             "key), local (this process reads he_secret_context), auto "
                             "(local if he_secret_context is set, else keyholder)",
                             choices=HE_DECRYPT)
    he_keyholder_timeout_s: float = option(30.0, "he_decrypt = keyholder: ask the key holder "
                                           "again (with a WARNING) when it has not answered "
                                           "a round's sum within this many seconds")
    checkpoint: str = option("fedmq-aggregator.ckpt", "state file (FILE.model-0/-1 beside it "
                             "take new models, FILE.round-0/-1 journal the open round, "
                             "FILE.updates-0/-1 a robust rule's kept updates)")
    metrics: str = option("", "append one JSON line per round to this file")
    metrics_port: int = option(0, "serve Prometheus metrics at http://METRICS_BIND:PORT/metrics "
                               "(0: off; needs fedmq[metrics]; deploy/prometheus.yml scrapes it)")
    metrics_bind: str = option("127.0.0.1", "address the metrics port listens on (0.0.0.0: "
                               "every interface; the page is unauthenticated)")
    onnx_dir: str = option("", "write each new global model as ONNX here (model-v{N}.onnx and "
                           "latest.onnx, see docs/onnx.md); empty: off")
    onnx_keep: int = option(5, "ONNX versions kept in onnx_dir (0: all)")
    role: str = option("central", "central: folds the devices' updates and the partial "
                       "aggregates of partial_sources; reducer: only partial aggregates (its "
                       "workers take the devices); worker: folds its shard of the devices' "
                       "updates into partial aggregates for the reducer on the same broker; "
                       "site: folds every update on its site broker into partial aggregates "
                       "that the broker's bridge carries upstream (docs/scale.md)",
                       choices=ROLES)
    shard: str = option("0/1", "worker: I/N (N <= 64), it subscribes to the update buckets "
                        "b with b mod N = I and takes their devices (docs/scale.md)")
    partial_sources: str = option("", "central/reducer: the workers and sites whose partial "
                                  "aggregates it folds, comma-separated (their source_name)")
    source_name: str = option("", "worker/site: the name its partial aggregates carry "
                              "(empty: client_id)")
    flush_after_s: float = option(2.0, "worker/site: send a partial aggregate once its "
                                  "oldest update is this old, or as soon as every device "
                                  "this round expects of it delivered")
    secure_aggregation: bool = option(False, "SecAgg+: the aggregator learns only the sum "
                                      "of each round's updates (docs/secagg.md); the "
                                      "devices must run with secure_aggregation too")
    secagg_clip: float = option(0.5, "secure aggregation: devices clip every coordinate of "
                                "their delta to [-clip, clip] before masking it")
    secagg_dropout: float = option(0.3, "secure aggregation: the fraction of devices a round "
                                   "survives losing; sets the neighbours k and threshold t")
    secagg_field_bits: int = option(32, "secure aggregation: masked values are in "
                                    "Z_2^bits, 16, 24 or 32 (bytes per value = bits / 8)")
    secagg_stage_s: float = option(30.0, "secure aggregation: seconds the key, share and "
                                   "unmask stages wait for slow devices (inputs wait "
                                   "deadline_s)")
    secagg_weight_cap: int = option(0, "secure aggregation: a device weighs min(samples, "
                                    "cap) (0: the largest examples x epochs the round's "
                                    "devices declared)")
    dashboard_port: int = option(0, "serve a live web dashboard (fleet, round progress, "
                                 "accuracy, loss and bytes charts) on this TCP port (0: off)")
    dashboard_bind: str = option("127.0.0.1", "address the dashboard listens on: loopback "
                                 "unless set otherwise (then give it a password)")
    dashboard_password: str = option("", "password the dashboard asks for (HTTP Basic, any "
                                     "user name; empty: $FEDMQ_DASHBOARD_PASSWORD, else none)")
    dashboard_password_file: str = option("", "file whose first line is the dashboard "
                                          "password (instead of dashboard_password)")

    def __post_init__(self) -> None:
        super().__post_init__()
        task_spec(self.task)
        if self.rounds < 0:
            raise ConfigError("rounds must be >= 0")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port {self.metrics_port} must be 0 (off) to 65535")
        if self.onnx_keep < 0:
            raise ConfigError("onnx_keep must be >= 0 (0: keep every version)")
        if not 0 <= self.dashboard_port <= 65535:
            raise ConfigError(f"dashboard_port {self.dashboard_port} must be 0 (off) to 65535")
        if self.dashboard_password and self.dashboard_password_file:
            raise ConfigError("give dashboard_password or dashboard_password_file, not both")
        if self.dashboard_port:
            self.dashboard_secret()  # an unreadable password file fails now
        if self.max_payload < 4096:
            raise ConfigError("max_payload must be at least 4096 bytes")
        if self.model_name not in model_names():
            raise ConfigError(
                f"unknown model {self.model!r}; available: {', '.join(model_names())}"
            )
        self.model_config()  # a model that does not fit the task fails here
        if self.personal_patterns():  # patterns that match nothing (or all) fail here
            try:
                LayoutMask(build_model(self.model_name, self.model_config()).layout,
                           self.personal_patterns())
            except ProtocolError as exc:
                raise ConfigError(f"personal_layers: {exc}") from None
        create_optimizer(self.optimizer_config())
        for codec in (self.model_codec, self.model_delta_codec or "float32"):
            codecs.get_codec(codec)
        if self.mode not in MODES:
            raise ConfigError(f"mode {self.mode!r} must be {' or '.join(MODES)}")
        self._check_secure()  # first: what it refuses may fail later checks less clearly
        self._check_he()
        self.policy()  # validate now, not at the first round
        self._check_role()
        self.cohort_policy()
        self.assignment_policy()
        self.reassembler()
        UpdateLimits.from_config(self)
        if not (math.isfinite(self.lr_decay) and 0 < self.lr_decay <= 1):
            raise ConfigError(f"lr_decay {self.lr_decay} must be in (0, 1] (1: a constant "
                              "learning rate)")
        if self.lr_decay < 1 and self.rounds < 1:
            raise ConfigError(f"lr_decay {self.lr_decay} decays the learning rate over "
                              "`rounds`: set rounds (it is 0, run until stopped)")
        try:
            self.task_config()
        except ProtocolError as exc:
            raise ConfigError(f"bad local training settings: {exc}") from None

    def _check_role(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"role {self.role!r} must be one of {', '.join(ROLES)}")
        if self.role == "reducer" and not self.sources():
            raise ConfigError("a reducer folds only partial aggregates: list its workers in "
                              "partial_sources")
        if self.role in ("worker", "site") and self.sources():
            raise ConfigError(f"a {self.role} sends partial aggregates; partial_sources is "
                              "for the central aggregator or reducer")
        if not 0.0 <= self.evaluate_fraction <= 1.0:
            raise ConfigError(f"evaluate_fraction {self.evaluate_fraction} must be in [0, 1]")
        if not 0 <= self.finetune_steps <= 100_000:
            raise ConfigError(f"finetune_steps {self.finetune_steps} must be 0 to 100000")
        if not (math.isfinite(self.finetune_lr) and self.finetune_lr >= 0):
            raise ConfigError(f"finetune_lr {self.finetune_lr} must be >= 0 (0: the task's lr)")
        if not 0 <= self.finetune_check <= 100_000:
            raise ConfigError(f"finetune_check {self.finetune_check} must be 0 to 100000")
        for name in ("finetune_lr", "finetune_check"):
            if getattr(self, name) and not self.finetune_steps:
                raise ConfigError(f"{name} shapes fine-tuning: set finetune_steps too")
        if not 0 <= self.personal_steps <= 100_000:
            raise ConfigError(f"personal_steps {self.personal_steps} must be 0 to 100000")
        if self.personal_steps and not self.personal_patterns():
            raise ConfigError("personal_steps trains the personal layers alone: set "
                              "personal_layers too (e.g. out.*)")
        partial = self.role != "central" or self.sources()
        if partial and self.personal_patterns():
            raise ConfigError("personal_layers works with one central aggregator: workers, "
                              "sites and reducers fold whole-model updates")
        if self.personal_patterns() and (self.he or self.secure_aggregation):
            raise ConfigError("personal_layers with he or secure_aggregation is not supported "
                              "yet: their rounds sum whole-model vectors")
        if partial and (self.evaluate_fraction or self.finetune_steps):
            raise ConfigError("evaluate_fraction and finetune_steps need the devices' reports "
                              "at one central aggregator: workers and sites do not forward "
                              "them; leave them 0 with role, partial_sources")
        if partial and (self.aggregation != "mean" or self.dp_noise_multiplier):
            raise ConfigError("workers and sites send weighted sums: they work with "
                              "aggregation = mean and without central DP (median, "
                              "trimmed_mean and DP need every device's update in one place)")
        Shard.parse(self.shard)
        if self.role != "worker" and self.shard != "0/1":
            raise ConfigError("shard is for role = worker")
        if not self.flush_after_s > 0:
            raise ConfigError("flush_after_s must be > 0")

    def personal_patterns(self) -> tuple[str, ...]:
        """personal_layers as patterns."""
        return tuple(p.strip() for p in self.personal_layers.split(",") if p.strip())

    def _check_he(self) -> None:
        """What encrypted updates rule out, said before any key is read."""
        if not self.he:
            if self.he_public_context or self.he_secret_context:
                raise ConfigError("he_public_context and he_secret_context are for he = ckks")
            return
        if self.he_decrypt not in HE_DECRYPT:
            raise ConfigError(f"he_decrypt {self.he_decrypt!r} must be one of "
                              f"{', '.join(HE_DECRYPT)}")
        if not self.he_keyholder_timeout_s > 0:
            raise ConfigError("he_keyholder_timeout_s must be > 0")
        check_he_options(self)
        if self.min_updates < 2:
            raise ConfigError("he = ckks needs min_updates >= 2: the key holder decrypts only "
                              "sums of at least min_updates updates, and the sum of one update "
                              "is that update (more is better: docs/privacy.md)")
        if self.role != "central" or self.sources():
            raise ConfigError("he = ckks runs on one central aggregator: workers, sites and "
                              "reducers would each need the secret key to fold partial sums; "
                              "leave role = central and partial_sources empty")
        if self.he_decrypt_mode == "keyholder":
            if self.he_secret_context:
                raise ConfigError("he_decrypt = keyholder: the aggregator must not have the "
                                  "secret key; leave he_secret_context empty and give it to "
                                  "`fedmq keyholder` only")
            if not self.he_public_context:
                raise ConfigError("he_decrypt = keyholder needs he_public_context, the public "
                                  "file of `fedmq keys he-init` (he-public.ctx)")
        elif not self.he_secret_context:
            raise ConfigError("he_decrypt = local needs he_secret_context, the secret file "
                              "from `fedmq keys he-init`, to decrypt each round's sum")

    @property
    def he_decrypt_mode(self) -> str:
        """keyholder or local (auto resolved)."""
        if self.he_decrypt != "auto":
            return self.he_decrypt
        return "local" if self.he_secret_context else "keyholder"

    def he_setup(self) -> HESetup | None:
        """The loaded HE keys (None: he off); with a key holder, the public key only."""
        if not self.he:
            return None
        secret = self.he_secret_context if self.he_decrypt_mode == "local" else ""
        return load_setup(self.he_public_context, secret)

    def _check_secure(self) -> None:
        """Secure aggregation hides each update: refuse what needs to see one."""
        if not self.secure_aggregation:
            return
        from aggregator.secure_round import check_secure_config

        check_secure_config(self)

    def sources(self) -> frozenset[str]:
        """partial_sources as names."""
        names = [n.strip() for n in self.partial_sources.split(",") if n.strip()]
        return frozenset(check_name(n, "partial source") for n in names)

    @property
    def source(self) -> str:
        """The name a worker's or site's partial aggregates carry."""
        return check_name(self.source_name or self.client_id, "source_name")

    def dashboard_secret(self) -> str:
        """The dashboard's password ('' for none): from its file, the config, or the
        environment, so it need not appear on a command line."""
        if self.dashboard_password_file:
            try:
                lines = Path(self.dashboard_password_file).read_text().splitlines()
            except OSError as exc:
                raise ConfigError(f"dashboard_password_file {self.dashboard_password_file}: "
                                  f"{exc.strerror}") from None
            if not lines or not lines[0]:
                raise ConfigError(f"dashboard_password_file {self.dashboard_password_file} "
                                  "is empty: write the password on its first line")
            return lines[0]
        return self.dashboard_password or os.environ.get(DASHBOARD_PASSWORD_ENV, "")

    def model_config(self) -> dict[str, object]:
        """The config the model is built from, here and on every device (the task's own)."""
        return task_spec(self.task).model_config(self.model_name, hidden=self.hidden,
                                                 rnn_hidden=self.rnn_hidden,
                                                 rnn_layers=self.rnn_layers,
                                                 local_optimizer=self.local_optimizer)

    @property
    def model_name(self) -> str:
        return self.model or task_spec(self.task).model

    def policy(self) -> RoundPolicy:
        sync = self.mode == "sync"
        target = self.clients_per_round if sync else self.buffer_size
        dp = None
        if not self.dp_noise_multiplier and (self.dp_target_epsilon or self.dp_clip_quantile):
            raise ConfigError("dp_target_epsilon and dp_clip_quantile are settings of central "
                              "DP: set dp_noise_multiplier too (e.g. 1.0)")
        if self.dp_noise_multiplier:
            dp = CentralDP(clip_norm=self.dp_clip_norm, noise_multiplier=self.dp_noise_multiplier,
                           denominator=max(target, self.min_updates), delta=self.dp_delta,
                           accountant=self.dp_accountant,
                           target_epsilon=self.dp_target_epsilon, seed=self.dp_seed,
                           clip_quantile=self.dp_clip_quantile, clip_lr=self.dp_clip_lr,
                           count_noise=self.dp_clip_count_noise)
        return RoundPolicy(
            min_updates=self.min_updates, deadline_s=self.deadline_s,
            target_updates=target, on_insufficient=self.on_insufficient,
            late_updates=self.late_updates if sync else "fold",
            staleness=StalenessPolicy(kind=self.staleness, a=self.staleness_a,
                                      b=self.staleness_b, max_staleness=self.max_staleness),
            dp=dp, aggregation=self.aggregation, trim_fraction=self.trim_fraction,
            byzantine_f=self.byzantine_f,
            cohort=self.cohort_policy(), guard=ModelGuard(max_growth=self.max_model_growth),
            he=self.he_setup(),
        )

    def cohort_policy(self) -> CohortPolicy:
        clients = self.clients_per_round if self.mode == "sync" else 0
        return CohortPolicy(clients_per_round=clients, over_select=self.over_select)

    def assignment_policy(self) -> AssignmentPolicy:
        return AssignmentPolicy(constrained_epochs=self.constrained_epochs,
                                constrained_batch_size=self.constrained_batch_size,
                                constrained_time_budget_s=self.constrained_time_budget_s,
                                slow_link_kbps=self.slow_link_kbps,
                                slow_link_codec=self.slow_link_codec)

    def reassembler(self) -> Reassembler:
        return Reassembler(timeout_s=self.chunk_timeout_s, max_pending_bytes=self.max_pending_bytes)

    def round_lr(self, round: int) -> float:
        """The devices' learning rate in `round` (lr_decay's cosine; lr when constant)."""
        return cosine_lr(self.lr, floor=self.lr_decay, step=round, steps=self.rounds)

    def task_config(self, round: int = 1) -> TaskConfig:
        """What devices are asked to do in `round`."""
        return TaskConfig(epochs=self.epochs, batch_size=self.batch_size,
                          lr=self.round_lr(round),
                          deadline_s=self.deadline_s, prox_mu=self.prox_mu,
                          time_budget_s=self.time_budget_s,
                          max_steps=task_spec(self.task).max_steps if self.max_steps < 0
                          else self.max_steps, update_weight=self.update_weight)

    def optimizer_config(self) -> ServerOptConfig:
        return ServerOptConfig(name=self.optimizer, lr=self.server_lr or None,
                               momentum=self.momentum, beta1=self.beta1, beta2=self.beta2,
                               tau=self.tau)
