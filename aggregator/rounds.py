"""The synchronous round as a pure state machine: updates and clock ticks in, decisions out.

No MQTT, no disk, no wall clock: the service feeds it messages and `now`, and carries
out what it decides (publish a model, checkpoint, re-announce).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_agent.errors import ConfigError, ProtocolError
from edge_agent.protocol import Update

from .accumulator import WeightedAccumulator
from .optimizers import ServerOptimizer

STATE_FORMAT = 2
# Accepted (device, update id) keys are remembered this many rounds back, so an update
# re-sent after its round closed still gets an "accepted" receipt, not a rejection.
REMEMBER_ROUNDS = 8


class Action(enum.Enum):
    WAIT = "wait"
    CLOSE = "close"  # enough updates: aggregate and publish the next model
    EXTEND = "extend"  # deadline passed with too few: keep collecting for another deadline
    RERUN = "rerun"  # deadline passed with too few: announce the round anew, keeping them


@dataclass(frozen=True, kw_only=True)
class RoundPolicy:
    min_updates: int = 2
    deadline_s: float = 60.0
    on_insufficient: str = "extend"  # "extend" or "rerun"

    def __post_init__(self) -> None:
        if self.min_updates < 1:
            raise ConfigError("min_updates must be >= 1: a round never averages over nothing")
        if not self.deadline_s > 0:
            raise ConfigError("deadline_s must be > 0")
        if self.on_insufficient not in ("extend", "rerun"):
            raise ConfigError(
                f"on_insufficient {self.on_insufficient!r} must be 'extend' or 'rerun'"
            )


@dataclass(frozen=True)
class RoundResult:
    round: int
    version: int  # version of the new global model
    participants: int
    samples: int
    train_loss: float
    bytes_up: int
    devices: tuple[str, ...]


@dataclass
class _OpenRound:
    round: int
    deadline_at: float
    devices: dict[str, str] = field(default_factory=dict)  # device -> update id
    samples: int = 0
    loss_sum: float = 0.0
    bytes_up: int = 0


class RoundMachine:
    """Collects the updates of one round and steps the server optimizer when it closes."""

    def __init__(
        self, *, params: np.ndarray, optimizer: ServerOptimizer, policy: RoundPolicy,
        layout_hash: str, now: float, round: int = 1, version: int = 0,
    ) -> None:
        self.params = np.asarray(params, dtype=np.float32).copy()
        self.optimizer = optimizer
        self.policy = policy
        self.layout_hash = layout_hash
        self.version = version
        self.acc = WeightedAccumulator(self.params.size)
        self.open = _OpenRound(round=round, deadline_at=now + policy.deadline_s)
        self.recent: dict[tuple[str, str], int] = {}  # (device, update id) -> round

    @property
    def round(self) -> int:
        return self.open.round

    def offer(self, update: Update, *, payload_bytes: int = 0) -> bool:
        """Fold a valid update into the open round, or raise ProtocolError with a reason.

        Idempotent on (device, update id): an update that already counts (a redelivery or
        a device re-sending what it never got a receipt for) returns False and changes
        nothing; a newly counted one returns True.
        """
        if self.recent.get((update.device_id, update.update_id)) is not None:
            return False
        if update.round != self.open.round:
            reason = "stale_round" if update.round < self.open.round else "future_round"
            raise ProtocolError(
                f"update from {update.device_id} is for round {update.round}, "
                f"round {self.open.round} is open", reason=reason,
            )
        if update.base_version != self.version:
            raise ProtocolError(
                f"update from {update.device_id} trained on version {update.base_version}, "
                f"current is {self.version}", reason="wrong_version",
            )
        if update.layout_hash and update.layout_hash != self.layout_hash:
            raise ProtocolError(
                f"update from {update.device_id} has layout {update.layout_hash}, "
                f"model has {self.layout_hash}", reason="bad_layout",
            )
        if update.device_id in self.open.devices:
            raise ProtocolError(
                f"device {update.device_id} already contributed to round {self.open.round}",
                reason="duplicate",
            )
        self.acc.add_encoded(update.delta, float(update.num_samples))
        self.open.devices[update.device_id] = update.update_id
        self.open.samples += update.num_samples
        self.open.loss_sum += update.loss * update.num_samples
        self.open.bytes_up += payload_bytes
        self.recent[(update.device_id, update.update_id)] = self.open.round
        return True

    def due(self, now: float) -> Action:
        if len(self.open.devices) >= self.policy.min_updates:
            return Action.CLOSE
        if now < self.open.deadline_at:
            return Action.WAIT
        return Action.EXTEND if self.policy.on_insufficient == "extend" else Action.RERUN

    def close(self, now: float) -> RoundResult:
        """Aggregate the open round into a new global model and open the next round."""
        mean_delta = self.acc.mean()
        self.params = self.optimizer.step(self.params, mean_delta)
        self.version += 1
        o = self.open
        result = RoundResult(
            round=o.round, version=self.version, participants=len(o.devices), samples=o.samples,
            train_loss=o.loss_sum / o.samples if o.samples else float("nan"),
            bytes_up=o.bytes_up, devices=tuple(sorted(o.devices)),
        )
        self._start(o.round + 1, now)
        return result

    def extend(self, now: float) -> None:
        self.open.deadline_at = now + self.policy.deadline_s

    def rerun(self, now: float) -> int:
        """Re-open the too-small round under a new number on the same model, so devices that
        missed its announcement train; the updates already held (and receipted) stay, since
        they were trained on this very model. Returns how many are kept."""
        self.open.round += 1
        self.open.deadline_at = now + self.policy.deadline_s
        return len(self.open.devices)

    def _start(self, round: int, now: float) -> None:
        self.acc = WeightedAccumulator(self.params.size)
        self.open = _OpenRound(round=round, deadline_at=now + self.policy.deadline_s)
        oldest = round - REMEMBER_ROUNDS
        self.recent = {k: r for k, r in self.recent.items() if r >= oldest}

    def state_dict(self) -> dict[str, Any]:
        """The model, the optimizer and the open round's partial aggregate: after a crash
        every update that got a receipt is still counted."""
        o = self.open
        return {
            "format": STATE_FORMAT, "round": o.round, "version": self.version,
            "layout_hash": self.layout_hash, "params": self.params.copy(),
            "optimizer": self.optimizer.state_dict(),
            "open": {"acc": self.acc.state_dict(), "devices": dict(o.devices),
                     "samples": o.samples, "loss_sum": o.loss_sum, "bytes_up": o.bytes_up},
            "recent": [[d, u, r] for (d, u), r in self.recent.items()],
        }

    def load_state_dict(self, state: dict[str, Any], *, now: float) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ConfigError(f"checkpoint format {state.get('format')} is not supported")
        if state["layout_hash"] != self.layout_hash:
            raise ConfigError(
                "checkpoint was written for a different model layout; point the aggregator at a "
                "new checkpoint path or configure the same model"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.params = np.asarray(state["params"], dtype=np.float32).copy()
        self.version = int(state["version"])
        self.recent = {(d, u): int(r) for d, u, r in state.get("recent", [])}
        self._start(int(state["round"]), now)  # the deadline starts afresh
        partial = state.get("open")
        if partial:
            self.acc.load_state_dict(partial["acc"])
            self.open.devices = dict(partial["devices"])
            self.open.samples = int(partial["samples"])
            self.open.loss_sum = float(partial["loss_sum"])
            self.open.bytes_up = int(partial["bytes_up"])
