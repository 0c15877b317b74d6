"""A worker's or site's share of a round, as a pure state machine: device updates in,
partial aggregates out, receipts back down.

Several aggregator processes share a fleet by partial sums (docs/scale.md). A worker
takes the devices of its shard on the central broker; a site takes every device on its
own broker, bridged to the central one. Either folds its devices' updates into a running
weighted sum and, when the round's expected devices are in (or its oldest update waited
`flush_after_s`), seals it into one Update with `represents` = k: the weighted mean of
the k updates and their summed samples. The central aggregator folds that like one
device's update, which gives exactly the FedAvg of the k updates.

A device gets its receipt only when the central aggregator receipted the partial holding
its update: "accepted" means counted in the global round, and a partial refused upstream
(say, too late for its round) is a refusal for each of its devices, as it would have been
without the worker. Dedup is local: a device always lands on the same worker (its id's
shard), so a re-sent update is recognised by the one worker that folded it.

No MQTT, no disk, no clock: the service (partial_service.py) feeds announcements,
updates, receipts and `now`, and journals `state_dict()` before it acks anything.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Container
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aggregator.rounds import RoundPolicy, check_timeliness, forget_counted
from aggregator.strategy.accumulator import WeightedAccumulator
from fedmq.core.protocol import CohortDigest, EncodedTensor, Receipt, Update, device_key
from fedmq.errors import ConfigError, ProtocolError

STATE_FORMAT = 1
# Receipts already passed down are remembered this many rounds, so a device re-sending an
# update whose receipt it missed gets the same answer again (see rounds.REMEMBER_ROUNDS).
REMEMBER_ROUNDS = 8


@dataclass(frozen=True, slots=True)
class Shard:
    """Worker `index` of `count` takes the devices whose id hashes to index: the first 4
    bytes of SHA-256(id), big-endian, mod count.

    SHA-256 because it is the same in every process and language (Python's hash is
    salted) and mixes well: crc32's low bits put dev0..dev3 all on one of two workers.
    Under a microsecond per message, before anything is decoded."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not (self.count >= 1 and 0 <= self.index < self.count):
            raise ConfigError(f"shard {self.index}/{self.count} must be I/N with 0 <= I < N")

    @classmethod
    def parse(cls, text: str) -> Shard:
        try:
            index, count = (int(x) for x in text.split("/"))
        except ValueError:
            raise ConfigError(f"shard {text!r} must be I/N, e.g. 0/2 for the first of two "
                              "workers") from None
        return cls(index, count)

    def owns(self, device_id: str) -> bool:
        if self.count == 1:
            return True
        return int.from_bytes(device_key(device_id), "big") % self.count == self.index


@dataclass(frozen=True, slots=True)
class Sealed:
    """A partial aggregate on its way upstream, and the device updates it answers for."""

    update: Update
    members: tuple[tuple[str, str], ...]  # (device, update id)


@dataclass
class _Open:
    """The updates folded since the last seal, all of one (round, version)."""

    round: int
    version: int
    acc: WeightedAccumulator
    members: list[tuple[str, str]] = field(default_factory=list)
    samples: int = 0
    loss_sum: float = 0.0
    complete: bool = True
    first_at: float = math.inf

    @property
    def count(self) -> int:
        return len(self.members)


class PartialRound:
    """Follows the central aggregator's announcements; folds, seals and answers."""

    def __init__(self, *, source: str, size: int, layout_hash: str, policy: RoundPolicy,
                 flush_after_s: float) -> None:
        if not policy.rule(0).streams:
            raise ConfigError("a worker or site sends weighted sums: aggregation must be mean")
        self.source = source
        self.size = size
        self.layout_hash = layout_hash
        self.policy = policy
        self.flush_after_s = flush_after_s
        self.epoch = secrets.token_hex(4)  # partial ids stay unique across lost state
        self.seq = 0
        self.cohort: Container[str] | None = None  # who the round asked (None: everyone)
        self.open = self._fresh(round=-1, version=-1)
        self.pending: dict[str, Sealed] = {}  # partial update id -> sealed, not receipted
        # (device, update id) -> (round, version) of every update folded and not forgotten
        self.folded: dict[tuple[str, str], tuple[int, int]] = {}
        # (device, update id) -> its receipt, once the central aggregator answered
        self.answered: dict[tuple[str, str], Receipt] = {}
        self.contributed: set[tuple[str, int]] = set()  # (device, base version) of folded
        self.delivered: set[str] = set()  # devices folded for the followed round

    def _fresh(self, *, round: int, version: int) -> _Open:
        return _Open(round=round, version=version, acc=WeightedAccumulator(self.size))

    @property
    def following(self) -> bool:
        """An announcement arrived: updates can be judged."""
        return self.open.round >= 0

    def follow(self, *, round: int, version: int, cohort: Container[str] | None,
               now: float) -> Sealed | None:
        """The central aggregator announced `round` on model `version`, asking `cohort`
        (ModelAnnouncement.asked()). What was folded for an earlier one is sealed at once
        (the central one judges whether it is late)."""
        self.cohort = cohort if cohort is None or isinstance(cohort, CohortDigest) \
            else frozenset(cohort)
        if (round, version) == (self.open.round, self.open.version):
            return None
        sealed = self.seal(now) if self.open.count else None
        self.open = self._fresh(round=round, version=version)
        self.delivered = set()
        self._forget(round)
        return sealed

    # -- the UpdateIngest sink (see ingest.py) -------------------------------------------
    def check_selected(self, update: Update) -> None:
        if self.cohort is not None and update.round == self.open.round \
                and update.device_id not in self.cohort:
            raise ProtocolError(f"{update.device_id} is not in round {update.round}'s cohort",
                                reason="not_selected")

    def dp_clip_norm(self) -> float | None:
        """Workers and sites run without central DP (config refuses it): no DP clip."""
        return None

    def offer(self, update: Update, *, payload_bytes: int = 0,
              decoded: np.ndarray | None = None, samples: int | None = None,
              clipped: bool = False) -> bool:
        """Fold a device's update, or raise ProtocolError with a reason. False: it is
        already folded (a re-send); its receipt comes, or came, from upstream.
        `clipped` (adaptive DP clipping's count) means nothing here.
        `samples`: what the ingest path credited it with (None: its claim)."""
        if not self.following:
            raise ProtocolError(f"update from {update.device_id} arrived before any model "
                                "announcement; the device re-sends it", reason="future_round")
        key = (update.device_id, update.update_id)
        if key in self.folded:
            return False
        if update.layout_hash != self.layout_hash:
            raise ProtocolError(
                f"update from {update.device_id} has layout {update.layout_hash or '(none)'}, "
                f"model has {self.layout_hash}", reason="bad_layout")
        o = self.open
        tau = check_timeliness(update, open_round=o.round, version=o.version,
                               policy=self.policy)
        if (update.device_id, update.base_version) in self.contributed:
            raise ProtocolError(f"device {update.device_id} already contributed a model "
                                f"v{update.base_version} update", reason="duplicate")
        credited = update.num_samples if samples is None else samples
        weight = credited * self.policy.staleness.weight(tau) if tau else float(credited)
        if decoded is None:
            o.acc.add_encoded(update.delta, weight, norm=float(credited))
        else:
            o.acc.add(decoded, weight, norm=float(credited))
        o.members.append(key)
        o.samples += credited
        o.loss_sum += update.loss * credited
        o.complete &= update.complete
        self.folded[key] = (o.round, update.base_version)
        self.contributed.add((update.device_id, update.base_version))
        self.delivered.add(update.device_id)
        return True

    def answer(self, device: str, update_id: str) -> Receipt | None:
        """The receipt owed to a re-sent update, if upstream already answered it."""
        return self.answered.get((device, update_id))

    # -- sealing -------------------------------------------------------------------------
    def due(self, now: float, online: list[str]) -> bool:
        """Seal now: every device expected of this round delivered (those online that this
        worker takes, and the round asked), or the oldest update waited long enough."""
        o = self.open
        if not o.count:
            return False
        o.first_at = min(o.first_at, now)  # the first look after it arrived: within a tick
        if now - o.first_at >= self.flush_after_s:
            return True
        cohort = self.cohort
        expected = [d for d in online if cohort is None or d in cohort]
        return bool(expected) and all(d in self.delivered for d in expected)

    def seal(self, now: float) -> Sealed:
        """The open sum as one partial aggregate (weighted mean + summed samples); the
        open round starts over empty, still following the same announcement."""
        o = self.open
        if not o.count:
            raise ValueError("nothing to seal")
        self.seq += 1
        mean = o.acc.mean()
        update = Update(
            device_id=self.source, update_id=f"p{self.seq}-{self.epoch}", round=o.round,
            base_version=o.version, num_samples=o.samples, loss=o.loss_sum / o.samples,
            delta=EncodedTensor(codec="f32", size=mean.size, data=mean.astype("<f4").tobytes()),
            layout_hash=self.layout_hash, complete=o.complete, represents=o.count)
        sealed = Sealed(update, tuple(o.members))
        self.pending[update.update_id] = sealed
        self.open = self._fresh(round=o.round, version=o.version)
        return sealed

    def receipt(self, receipt: Receipt) -> list[tuple[str, Receipt]]:
        """Upstream answered a partial: the receipt each of its devices is owed. An
        unknown id (answered before, or not ours) owes nothing."""
        sealed = self.pending.pop(receipt.update_id, None)
        if sealed is None:
            return []
        status = "accepted" if receipt.status == "accepted" else "rejected"
        reason = "" if status == "accepted" else receipt.reason or receipt.status
        owed = []
        for device, update_id in sealed.members:
            mine = Receipt(update_id=update_id, round=sealed.update.round, status=status,
                           reason=reason)
            self.answered[(device, update_id)] = mine
            owed.append((device, mine))
        return owed

    def _forget(self, round: int) -> None:
        """Drop what no re-send can need any more: answered updates of old rounds. Folded
        ones still pending upstream stay (their devices may re-send meanwhile)."""
        waiting = {m for s in self.pending.values() for m in s.members}
        self.folded = forget_counted(
            self.folded, lambda k, v: k in waiting or v[0] >= round - REMEMBER_ROUNDS)
        self.answered = {k: v for k, v in self.answered.items() if k in self.folded}
        self.contributed = {(d, v) for (d, _), (_, v) in self.folded.items()}

    # -- durability ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        o = self.open
        return {
            "format": STATE_FORMAT, "source": self.source, "layout_hash": self.layout_hash,
            "epoch": self.epoch, "seq": self.seq,
            "cohort": _cohort_state(self.cohort),
            "open": {"round": o.round, "version": o.version, "acc": o.acc.state_dict(),
                     "members": [list(m) for m in o.members], "samples": o.samples,
                     "loss_sum": o.loss_sum, "complete": o.complete},
            "pending": [[s.update.to_payload(), [list(m) for m in s.members]]
                        for s in self.pending.values()],
            "folded": [[d, u, r, v] for (d, u), (r, v) in self.folded.items()],
            "answered": [[d, u, r.to_payload()] for (d, u), r in self.answered.items()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ConfigError(f"partial-aggregate state format {state.get('format')} is not "
                              "supported; move the state file away to start fresh")
        if state["source"] != self.source or state["layout_hash"] != self.layout_hash:
            raise ConfigError(f"the state file belongs to {state['source']} with model layout "
                              f"{state['layout_hash']}, not {self.source} with "
                              f"{self.layout_hash}; point this one at its own checkpoint")
        self.epoch, self.seq = str(state["epoch"]), int(state["seq"])
        saved = state["cohort"]
        self.cohort = (None if saved is None else CohortDigest(bytes(saved)) if
                       isinstance(saved, (bytes, bytearray)) else frozenset(saved))
        saved = state["open"]
        self.open = self._fresh(round=int(saved["round"]), version=int(saved["version"]))
        if saved["members"]:
            o = self.open
            o.acc.load_state_dict(saved["acc"])
            o.members = [(d, u) for d, u in saved["members"]]
            o.samples, o.loss_sum = int(saved["samples"]), float(saved["loss_sum"])
            o.complete = bool(saved["complete"])
        self.pending = {}
        for payload, members in state["pending"]:
            update = Update.from_payload(bytes(payload))
            self.pending[update.update_id] = Sealed(update, tuple((d, u) for d, u in members))
        self.folded = {(d, u): (int(r), int(v)) for d, u, r, v in state["folded"]}
        self.contributed = {(d, v) for (d, _), (_, v) in self.folded.items()}
        self.delivered = {d for (d, _), (r, _) in self.folded.items() if r == self.open.round}
        self.answered = {(d, u): Receipt.from_payload(bytes(r))
                         for d, u, r in state["answered"]}


def _cohort_state(cohort: Container[str] | None) -> bytes | list[str] | None:
    if cohort is None or isinstance(cohort, CohortDigest):
        return None if cohort is None else cohort.keys
    return sorted(cohort)  # type: ignore[call-overload]
