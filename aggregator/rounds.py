"""The synchronous round as a pure state machine: updates and clock ticks in, decisions out.

No MQTT, no disk, no wall clock: the service feeds it messages and `now`, and carries
out what it decides (publish a model, checkpoint, re-announce). It owns all round state:
the open round's aggregate (an AggregationRule chosen by name), who was asked to train
it (the Cohort), and what was already counted.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aggregator.cohort import Cohort
from aggregator.guard import ModelGuard
from aggregator.he_round import HESetup
from aggregator.selection import CohortPolicy
from aggregator.staleness import StalenessPolicy
from aggregator.strategy.optimizers import ServerOptimizer
from aggregator.strategy.privacy import CentralDP, epsilon_from_rdp
from aggregator.strategy.rule import AggregationRule
from aggregator.strategy.rules import create_rule
from fedmq.core.protocol import Update
from fedmq.errors import ConfigError, ProtocolError

STATE_FORMAT = 3
# Accepted (device, update id) keys are remembered this many rounds back, so an update
# re-sent after its round closed still gets an "accepted" receipt, not a rejection.
REMEMBER_ROUNDS = 8


class Action(enum.Enum):
    WAIT = "wait"
    CLOSE = "close"  # enough updates: aggregate and publish the next model
    EXTEND = "extend"  # deadline passed with too few: keep collecting for another deadline
    RERUN = "rerun"  # deadline passed with too few: announce the round anew, keeping them


LATE_POLICIES = ("discard", "fold")
ON_INSUFFICIENT = ("extend", "rerun")


@dataclass(frozen=True, kw_only=True)
class RoundPolicy:
    """When a round closes, and what happens to updates trained on an older model.

    A round closes as soon as `target_updates` arrived (the quorum of an over-selected
    cohort, or FedBuff's buffer size K; 0: `min_updates`), or at the deadline if at least
    `min_updates` did. Late updates are discarded, or folded into the open round with
    weight s(tau) (always so in async mode, where every update is late by design).
    """

    min_updates: int = 2
    target_updates: int = 0
    deadline_s: float = 60.0
    on_insufficient: str = "extend"  # "extend" or "rerun"
    late_updates: str = "discard"  # "discard" or "fold"
    staleness: StalenessPolicy = field(default_factory=StalenessPolicy)
    dp: CentralDP | None = None  # central differential privacy of every round's aggregate
    aggregation: str = "mean"  # a registered rule (strategy/rules.py): median, trimmed_mean
    trim_fraction: float = 0.1  # trimmed_mean: cut from each end, per coordinate
    cohort: CohortPolicy = field(default_factory=CohortPolicy)  # who is asked to train
    guard: ModelGuard = field(default_factory=ModelGuard)  # what a new model must pass
    he: HESetup | None = None  # he = "ckks": the rule sums ciphertexts (he_round.py)

    @property
    def close_at(self) -> int:
        return max(self.target_updates, self.min_updates)

    def rule(self, size: int) -> AggregationRule:
        """A fresh aggregate for one round of `size`-parameter updates."""
        if self.he is not None:
            return self.he.rule(size, min_count=self.min_updates)
        return create_rule(self.aggregation, size, trim_fraction=self.trim_fraction)

    def __post_init__(self) -> None:
        if self.min_updates < 1:
            raise ConfigError("min_updates must be >= 1: a round never averages over nothing")
        if self.target_updates < 0:
            raise ConfigError("target_updates must be >= 0 (0: close at min_updates)")
        if self.late_updates not in LATE_POLICIES:
            raise ConfigError(f"late_updates {self.late_updates!r} must be 'discard' or 'fold'")
        if not self.deadline_s > 0:
            raise ConfigError("deadline_s must be > 0")
        if self.on_insufficient not in ON_INSUFFICIENT:
            raise ConfigError(
                f"on_insufficient {self.on_insufficient!r} must be 'extend' or 'rerun'"
            )
        rule = self.rule(0)  # an unknown name or bad settings fail here
        if self.he is not None:
            check_he(self)
        if self.dp is not None and rule.name != "mean":
            raise ConfigError("differential privacy works on the mean: use aggregation "
                              "= mean with dp_noise_multiplier")
        if not rule.streams and self.late_updates != "discard":
            raise ConfigError(f"{rule.name} needs sync rounds that discard late "
                              "updates: folded late updates would let one device put "
                              "several updates into a round and outvote the others")
        rule.check_round_size(self.min_updates)
        if self.dp is not None and self.late_updates != "discard":
            raise ConfigError("differential privacy needs sync rounds that discard late "
                              "updates: a folded late update would let one device count twice "
                              "in a round, doubling what the noise must hide")


@dataclass(frozen=True)
class RoundResult:
    round: int
    version: int  # version of the new global model
    participants: int  # updates aggregated
    samples: int
    train_loss: float
    bytes_up: int
    devices: tuple[str, ...]
    stale: int = 0  # of the participants, how many were trained on an older model
    max_staleness: int = 0
    partial: int = 0  # of the participants, how many stopped at their time budget
    cohort: int = 0  # devices asked to train the round (0: every device)
    # Why the model guard refused the round's model ('' : it was taken); a refused round
    # leaves `version` (the last good model) in place and is run again as the next round.
    refused: str = ""


@dataclass
class _OpenRound:
    round: int
    deadline_at: float
    # (device, base version) -> update id: a device counts once per model it trained on.
    # A partial aggregate keys on (source/update id, base version): a worker or site may
    # send several per round, each of device updates it folded once (aggregator/partial.py).
    contributions: dict[tuple[str, int], str] = field(default_factory=dict)
    represented: int = 0  # device updates in the round: 1 per update, k per partial of k
    samples: int = 0
    loss_sum: float = 0.0
    bytes_up: int = 0
    stale: int = 0
    max_staleness: int = 0
    partial: int = 0
    target: int = 0  # this round's K when it differs from the policy's (a small cohort)

    @property
    def count(self) -> int:
        return self.represented

    @property
    def devices(self) -> set[str]:
        return {device.split("/")[0] for device, _ in self.contributions}


class RoundMachine:
    """Collects the updates of one round and steps the server optimizer when it closes."""

    def __init__(
        self, *, params: np.ndarray, optimizer: ServerOptimizer, policy: RoundPolicy,
        layout_hash: str, now: float, round: int = 1, version: int = 0, seed: int = 0,
    ) -> None:
        self.params = _frozen(params)
        self._optimizer_state: dict[str, Any] | None = None  # cached between steps
        self.optimizer = optimizer
        self.policy = policy
        self.layout_hash = layout_hash
        self.version = version
        self.seed = seed  # of the cohort sampling
        self.acc = policy.rule(self.params.size)
        self.open = _OpenRound(round=round, deadline_at=now + policy.deadline_s)
        self.cohort = Cohort()
        # (device, update id) -> (round counted in, base version) of every counted update
        # a device might still re-send: see _forget
        self.recent: dict[tuple[str, str], tuple[int, int]] = {}
        # Models released with DP noise, and the summed RDP of every noised round, released
        # or refused (noise may differ by round)
        self.dp_rounds, self.dp_rdp = 0, 0.0
        self.refused = 0  # rounds whose model the guard refused
        self.refused_updates = 0  # updates counted in them (receipted, then dropped)

    @property
    def round(self) -> int:
        return self.open.round

    @property
    def plain_releases(self) -> int:
        """Models released without DP noise (a checkpoint from before DP was turned on)."""
        return self.version - self.dp_rounds

    def epsilon(self) -> float:
        """Privacy spent by every model released so far, at the policy's dp_delta: infinite
        once any was released without noise (a checkpoint from before DP was turned on)."""
        dp = self.policy.dp
        if dp is None or self.plain_releases:
            return math.inf
        return epsilon_from_rdp(self.dp_rdp, dp.delta)

    def plan(self, online: list[str]) -> list[str] | None:
        """The devices to ask in this announcement of the open round, from those online
        (None: everyone may train). Each plan of the same round asks devices not asked
        yet, and the round closes on min(K, devices asked)."""
        self.cohort, chosen = self.cohort.plan(self.open.round, online, self.policy.cohort,
                                               seed=self.seed)
        self._retarget()
        return chosen

    @property
    def selective(self) -> bool:
        """The open round asked only some devices: a short round should ask others."""
        return self.cohort.size(self.open.round) > 0

    def check_selected(self, update: Update) -> None:
        """Raise ProtocolError (`not_selected`) for an update from a device the open round
        did not ask (a partial aggregate's devices were checked by its worker or site)."""
        if not update.represents:
            self.cohort.check_selected(update)

    def _retarget(self) -> None:
        """Close this round on min(K, cohort) updates: with fewer devices online than K,
        waiting for K would always run into the deadline."""
        asked = self.cohort.size(self.open.round)
        if asked:
            self.open.target = max(self.policy.min_updates, min(self.policy.close_at, asked))

    def offer(self, update: Update, *, payload_bytes: int = 0,
              decoded: np.ndarray | None = None, samples: int | None = None) -> bool:
        """Fold a valid update into the open round, or raise ProtocolError with a reason.

        `decoded`: its delta, already decoded (and validated, maybe clipped) by the
        caller, so it is not decoded again; None: the rule decodes `update.delta` itself.
        `samples`: what it is weighted by, its claim as credited by the caller (see
        bounds.py); None: its num_samples.
        Idempotent on (device, update id): an update that already counts (a redelivery or
        a device re-sending what it never got a receipt for) returns False and changes
        nothing; a newly counted one returns True.
        """
        if self.recent.get((update.device_id, update.update_id)) is not None:
            return False
        tau = self._staleness(update)
        if update.layout_hash != self.layout_hash:  # agents always send it
            raise ProtocolError(
                f"update from {update.device_id} has layout {update.layout_hash or '(none)'}, "
                f"model has {self.layout_hash}", reason="bad_layout",
            )
        if update.represents and not self.acc.streams:
            raise ProtocolError(f"partial aggregate from {update.device_id}: the "
                                f"{self.acc.name} rule needs every device's update",
                                reason="not_supported")
        key = _contribution_key(update)
        if key in self.open.contributions:
            raise ProtocolError(
                f"device {update.device_id} already contributed to round {self.open.round} "
                f"with a model v{update.base_version} update", reason="duplicate",
            )
        credited = update.num_samples if samples is None else samples
        # Under DP every device weighs 1: its clipped delta is all it can move the sum by.
        norm = 1.0 if self.policy.dp else float(credited)
        weight = norm * self.policy.staleness.weight(tau) if tau else norm
        if decoded is None:
            self.acc.add_encoded(update.delta, weight, norm=norm)
        else:
            self.acc.add(decoded, weight, norm=norm)
        o = self.open
        o.contributions[key] = update.update_id
        o.represented += update.represents or 1
        o.samples += credited
        o.loss_sum += update.loss * credited
        o.bytes_up += payload_bytes
        o.partial += not update.complete
        if tau:
            o.stale += 1
            o.max_staleness = max(o.max_staleness, tau)
        self.recent[(update.device_id, update.update_id)] = (o.round, update.base_version)
        return True

    def offer_sum(self, mean: np.ndarray, *, weight: float, devices: tuple[str, ...],
                  samples: int, session: str, bytes_up: int = 0) -> None:
        """Fold a secure round's result (aggregator/secure_round.py): the weighted mean of
        `devices`' updates, which the server never saw one by one, as the whole round."""
        if self.open.contributions:
            raise ProtocolError(f"round {self.open.round} already holds updates: a secure "
                                "sum is the whole round", reason="duplicate")
        self.acc.add(np.asarray(mean, dtype=np.float32), 1.0, norm=1.0)
        o = self.open
        for device in devices:
            o.contributions[(device, self.version)] = session
        o.represented = len(devices)
        o.samples = samples
        o.loss_sum = float("nan")  # devices' losses are not in the sum
        o.bytes_up = bytes_up

    def _staleness(self, update: Update) -> int:
        return check_timeliness(update, open_round=self.open.round, version=self.version,
                                policy=self.policy)

    def due(self, now: float) -> Action:
        count = self.open.count
        if count >= (self.open.target or self.policy.close_at):
            return Action.CLOSE
        if now < self.open.deadline_at:
            return Action.WAIT
        if count >= self.policy.min_updates:
            return Action.CLOSE  # the deadline closes on the quorum that made it
        return Action.EXTEND if self.policy.on_insufficient == "extend" else Action.RERUN

    def close(self, now: float) -> RoundResult:
        """Aggregate the open round into a new global model and open the next round.

        A model the guard refuses (non-finite, or its norm exploded) is dropped with the
        round: the optimizer's state goes back to before the step, the last good model
        stays, and the next round trains on it again (`RoundResult.refused` says why)."""
        dp = self.policy.dp
        delta = self.acc.result() if dp is None else dp.noised_mean(self.acc.total)
        if dp is not None:  # the noise was drawn on private data: spent even if refused
            self.dp_rdp += dp.rdp_per_round
        before = self._optimizer_state or self.optimizer.state_dict()
        new = self.optimizer.step(self.params, delta)
        refused = self.acc.refusal() or self.policy.guard.refusal(
            self.params, new, slack=0.0 if dp is None else dp.noise_norm(self.params.size))
        if refused:
            self.optimizer.load_state_dict(before)
            self.refused += 1
            self.refused_updates += self.open.count
        else:
            self.params = _frozen(new)
            self.version += 1
            self.dp_rounds += int(dp is not None)
        self._optimizer_state = None
        o = self.open
        result = RoundResult(
            round=o.round, version=self.version, participants=o.count, samples=o.samples,
            train_loss=o.loss_sum / o.samples if o.samples else float("nan"),
            bytes_up=o.bytes_up, devices=tuple(sorted(o.devices)), stale=o.stale,
            max_staleness=o.max_staleness, partial=o.partial, cohort=self.cohort.size(o.round),
            refused=refused,
        )
        self._start(o.round + 1, now)
        return result

    def extend(self, now: float) -> bool:
        """Wait another deadline; True if the round should be planned (and announced)
        again, asking other devices: the ones asked may have gone away."""
        self.open.deadline_at = now + self.policy.deadline_s
        return self.selective

    def rerun(self, now: float) -> int:
        """Re-open the too-small round under a new number on the same model, so devices that
        missed its announcement train; the updates already held (and receipted) stay, since
        they were trained on this very model. Returns how many are kept."""
        self.open.round += 1
        self.open.deadline_at = now + self.policy.deadline_s
        return self.open.count

    def _start(self, round: int, now: float) -> None:
        self.acc = self.policy.rule(self.params.size)
        self.open = _OpenRound(round=round, deadline_at=now + self.policy.deadline_s)
        self.recent = {k: v for k, v in self.recent.items() if self._remember(*v, round)}

    def _remember(self, counted_in: int, base_version: int, round: int) -> bool:
        """Keep a counted id while a re-send of it could still be accepted: REMEMBER_ROUNDS
        rounds, and with late updates folded in, as long as its base version is within
        max_staleness (else a re-send would count twice; past that it is refused anyway)."""
        if counted_in >= round - REMEMBER_ROUNDS:
            return True
        return (self.policy.late_updates == "fold"
                and self.version - base_version <= self.policy.staleness.max_staleness)

    def state_dict(self) -> dict[str, Any]:
        """The model, the optimizer, the open round's partial aggregate and its cohort:
        after a crash every update that got a receipt is still counted, and every device
        asked may still deliver.

        Taken after every batch of updates, so only what changes within a round is copied:
        the parameters are read-only and shared, the optimizer's state is copied once per
        step. A 1M-parameter FedAdam snapshot copies 4 MB instead of 28 MB."""
        o = self.open
        if self._optimizer_state is None:
            self._optimizer_state = self.optimizer.state_dict()
        return {
            "format": STATE_FORMAT, "round": o.round, "version": self.version,
            "layout_hash": self.layout_hash, "params": self.params,
            "optimizer": self._optimizer_state,
            "open": {"acc": self.acc.state_dict(),
                     "contributions": [[d, v, u] for (d, v), u in o.contributions.items()],
                     "represented": o.represented,
                     "samples": o.samples, "loss_sum": o.loss_sum, "bytes_up": o.bytes_up,
                     "stale": o.stale, "max_staleness": o.max_staleness,
                     "partial": o.partial},
            "recent": [[d, u, r, v] for (d, u), (r, v) in self.recent.items()],
            "dp_rounds": self.dp_rounds, "dp_rdp": self.dp_rdp, "refused": self.refused,
            "refused_updates": self.refused_updates,
            "cohort": self.cohort.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], *, now: float) -> None:
        if state.get("format") == 2:  # one update per device, all on the current version
            partial = state.get("open") or {}
            partial["contributions"] = [[d, state["version"], u]
                                        for d, u in partial.pop("devices", {}).items()]
            partial.setdefault("stale", 0)
            partial.setdefault("max_staleness", 0)
            state = {**state, "format": STATE_FORMAT, "open": partial or None}
        if state.get("format") != STATE_FORMAT:
            raise ConfigError(f"checkpoint format {state.get('format')} is not supported")
        if state["layout_hash"] != self.layout_hash:
            raise ConfigError(
                f"checkpoint was written for a different model layout ({state['layout_hash']}, "
                f"this model's is {self.layout_hash}); point the aggregator at a new "
                "checkpoint path or configure the same model and task"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.params = _frozen(state["params"])
        self._optimizer_state = None
        self.version = int(state["version"])
        # entries of older checkpoints have no base version: assume the round's
        self.recent = {(e[0], e[1]): (int(e[2]), int(e[3]) if len(e) > 3 else int(e[2]) - 1)
                       for e in state.get("recent", [])}
        self.dp_rounds = int(state.get("dp_rounds", 0))
        self.dp_rdp = float(state.get("dp_rdp", 0.0))
        self.refused = int(state.get("refused", 0))
        self.refused_updates = int(state.get("refused_updates", 0))
        self._start(int(state["round"]), now)  # the deadline starts afresh
        # older checkpoints have no cohort: everyone may deliver until the next plan
        self.cohort = (Cohort.from_state(state["cohort"], open_round=self.open.round)
                       if state.get("cohort") is not None else Cohort())
        self._retarget()
        partial = state.get("open")
        if partial and partial["contributions"]:  # an empty round: any aggregation may go on
            self.acc.load_state_dict(partial["acc"])
            o = self.open
            o.contributions = {(d, int(v)): u for d, v, u in partial["contributions"]}
            o.represented = int(partial.get("represented", len(o.contributions)))
            o.samples = int(partial["samples"])
            o.loss_sum = float(partial["loss_sum"])
            o.bytes_up = int(partial["bytes_up"])
            o.stale = int(partial["stale"])
            o.max_staleness = int(partial["max_staleness"])
            o.partial = int(partial.get("partial", 0))


def check_he(policy: RoundPolicy) -> None:
    """Refuse what encrypted updates cannot do: the server sees only their sum."""
    if policy.min_updates < 2:
        raise ConfigError("he = \"ckks\" needs min_updates >= 2: the decrypted sum of one "
                          "update is that update")
    if policy.aggregation != "mean":
        raise ConfigError(f"he = \"ckks\" sums encrypted updates: aggregation = "
                          f"{policy.aggregation} needs every update in the clear; use mean "
                          "(docs/privacy.md)")
    if policy.dp is not None:
        raise ConfigError("he = \"ckks\" with central DP is not supported yet: leave "
                          "dp_noise_multiplier at 0")
    if policy.late_updates != "discard":
        raise ConfigError("he = \"ckks\" needs sync rounds that discard late updates "
                          "(mode = sync, late_updates = discard): a late update's weight "
                          "s(tau) cannot be applied to its ciphertext")


def check_timeliness(update: Update, *, open_round: int, version: int,
                     policy: RoundPolicy) -> int:
    """Versions `update`'s base is behind the model of `version` while `open_round` is
    open; raises ProtocolError for what the policy refuses. Shared by the round machine
    and the worker's partial round, so both refuse exactly the same updates."""
    tau = version - update.base_version
    if update.round > open_round:
        raise ProtocolError(f"update from {update.device_id} is for round {update.round}, "
                            f"round {open_round} is open", reason="future_round")
    if tau < 0:
        raise ProtocolError(f"update from {update.device_id} trained on version "
                            f"{update.base_version}, current is {version}",
                            reason="wrong_version")
    if policy.late_updates == "discard":
        if update.round < open_round:
            raise ProtocolError(f"update from {update.device_id} is for round "
                                f"{update.round}, round {open_round} is open",
                                reason="stale_round")
        if tau:
            raise ProtocolError(f"update from {update.device_id} trained on version "
                                f"{update.base_version}, current is {version}",
                                reason="wrong_version")
    elif not policy.staleness.accepts(tau):
        raise ProtocolError(
            f"update from {update.device_id} is {tau} versions behind; the limit is "
            f"{policy.staleness.max_staleness}", reason="too_stale")
    return tau


def _contribution_key(update: Update) -> tuple[str, int]:
    """A device counts once per base version; a partial aggregate once per its own id
    ("/" cannot occur in a device or source name, so the keys never collide)."""
    if update.represents:
        return (f"{update.device_id}/{update.update_id}", update.base_version)
    return (update.device_id, update.base_version)


def _frozen(params: Any) -> np.ndarray:
    """A read-only float32 copy: checkpoints share it instead of copying it."""
    out = np.array(params, dtype=np.float32, copy=True)
    out.flags.writeable = False
    return out
