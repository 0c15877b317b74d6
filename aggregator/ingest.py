"""The server's one ingest path: every check an incoming update passes, in order.

An MQTT message on an update topic goes through these steps, each refusing it with one
reason (docs/protocol.md lists them all):

  1. sender: the topic names a device (`bad_topic`); with require_known_devices it
     announced itself and is online (`unknown_device`, `offline_device`);
  2. size: the payload fits the model (`too_large`);
  3. wire: the payload decodes to an Update or a Part, whose own schema checks every field
     (wire.py, messages.py);
  4. parts: a Part may not declare more than a whole update may take (`too_large`), and is
     reassembled (chunking.Reassembler: a transfer opens at its part 0 within the budget
     and the fair shares that `plan_reassembly` sets per round) until the Update is whole;
  5. topic: the Update speaks for the device of its topic (`wrong_topic`);
  6. cohort: the round machine asked its device (`not_selected`);
  7. contents: the reported loss is finite; with a norm bound the delta is decoded, once,
     into a float32 buffer and checked (codec, shape, finiteness, `out_of_range`) and
     clipped or refused (`norm_exceeded`);
  8. the round machine: round, version, layout, duplicates, and, for a delta not decoded
     in step 7, the decode into the aggregate (codec, shape, finiteness, range).

The result is the accepted Update with its wire byte count, or one Rejected with its
reason; nothing else is raised for a bad message. The delta is decoded at most once: by
step 7 when a norm bound needs its values (the decoded array is what gets folded), else
by the streaming fold itself (the fast path benchmarks/ingest.py measures). Pure apart
from a reused scratch buffer; the service calls it on its loop thread.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from aggregator.devices import DeviceRegistry
from aggregator.rounds import RoundMachine
from fedmq.core import codecs
from fedmq.core.chunking import Reassembler
from fedmq.core.codecs.pipeline import MAX_WEIGHTED_VALUE
from fedmq.core.protocol import FleetTopics, Part, Receipt, Update
from fedmq.core.protocol.wire import decode_any
from fedmq.errors import ConfigError, ProtocolError

# The largest honest update spends 9 bytes per parameter (top-k at 100%: a varint index
# of at most 5 bytes plus a float32). The slack covers the envelope and a lossless frame
# many times over, and leaves even a tiny model room for two default-sized messages.
MAX_BYTES_PER_PARAM = 9
SIZE_SLACK = 256 * 1024
# The reassembly share of each device a round awaits: a float32 update (the default and
# the largest of the named codecs) and its envelope. Bigger updates (top-k near 100%)
# still fit when the budget has room beyond every awaited device's share.
SHARE_BYTES_PER_PARAM = 4
SHARE_SLACK = 64 * 1024
NORM_POLICIES = ("clip", "reject")


def _reject(message: str, reason: str) -> ProtocolError:
    return ProtocolError(message, reason=reason)


@dataclass(frozen=True)
class Accepted:
    """An update the round machine took: `counted` False if it already counted (a
    redelivery, receipted "accepted" again)."""

    update: Update
    wire_bytes: int  # its MQTT payload bytes, all parts together
    counted: bool


@dataclass(frozen=True)
class Rejected:
    """An update refused for `reason`; `update` is the one whose sender is owed a
    rejection receipt (None: garbage, or an update sent on another device's topic)."""

    reason: str
    message: str
    update: Update | None = None

    def receipt(self) -> tuple[str, Receipt] | None:
        """(sender, the receipt it is owed), if one is owed."""
        if self.update is None:
            return None
        status = "duplicate" if self.reason == "duplicate" else "rejected"
        return self.update.device_id, Receipt(update_id=self.update.update_id,
                                              round=self.update.round, status=status,
                                              reason=self.reason)


@dataclass(frozen=True, kw_only=True)
class UpdateLimits:
    """The validation settings of AggregatorConfig, checked once at start-up."""

    require_known_devices: bool = False
    max_update_norm: float = 0.0  # 0: no bound
    norm_policy: str = "clip"
    max_update_bytes: int = 0  # 0: derived from the model size
    # Workers and sites whose partial aggregates (on `partial/{source}`) are taken.
    partial_sources: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_update_norm) and self.max_update_norm >= 0):
            raise ConfigError(f"max_update_norm {self.max_update_norm} must be >= 0 (0: off)")
        if self.norm_policy not in NORM_POLICIES:
            raise ConfigError(f"norm_policy {self.norm_policy!r} must be 'clip' or 'reject'")
        if self.max_update_bytes < 0:
            raise ConfigError("max_update_bytes must be >= 0 (0: derived from the model size)")

    @classmethod
    def from_config(cls, config) -> UpdateLimits:
        norm, policy = config.max_update_norm, config.norm_policy
        if config.dp_noise_multiplier:  # DP: every update clipped to the noise's scale
            if norm:
                raise ConfigError("with dp_noise_multiplier set, dp_clip_norm bounds every "
                                  "update; leave max_update_norm at 0")
            norm, policy = config.dp_clip_norm, "clip"
        return cls(require_known_devices=config.require_known_devices,
                   max_update_norm=norm, norm_policy=policy,
                   max_update_bytes=config.max_update_bytes,
                   partial_sources=config.sources())

    def payload_limit(self, params: int) -> int:
        """Bytes an update of a `params`-parameter model may take, whole or declared by
        its Parts."""
        return self.max_update_bytes or MAX_BYTES_PER_PARAM * params + SIZE_SLACK


def check_sender(device: str, registry: DeviceRegistry) -> None:
    """The device announced itself (a birth on its status topic) and has not left.

    Statuses and updates share the service's inbox, in the order the broker delivered
    them, so a device's last update before its clean stop is handled before its offline
    status: no grace period is needed for it."""
    info = registry.devices.get(device)
    if info is None:
        raise _reject(f"{device} never announced itself on its status topic; updates from "
                      "unknown devices are refused (require_known_devices)", "unknown_device")
    if not info.online:
        raise _reject(f"{device} is offline (its status says so); its update is refused "
                      "(require_known_devices)", "offline_device")


def check_size(size: int, limit: int, what: str) -> None:
    if size > limit:
        raise _reject(f"{what} of {size} bytes exceeds the {limit}-byte limit for this model "
                      "(max_update_bytes)", "too_large")


def l2_norm(values: np.ndarray) -> float:
    """In float64: float32 squares overflow long before a float32 vector does."""
    x = values.astype(np.float64, copy=False).ravel()
    return math.sqrt(float(np.dot(x, x)))


def clip_factor(norm: float, bound: float, policy: str) -> float:
    """What to scale a delta of L2 norm `norm` by (1.0: keep it); raises for `reject`."""
    if bound <= 0 or norm <= bound:
        return 1.0
    if policy == "reject":
        raise _reject(f"update has L2 norm {norm:.4g}, above max_update_norm {bound:.4g}",
                      "norm_exceeded")
    # a hair under: float32 rounding of the scaled values may otherwise land just above
    return bound / norm * (1.0 - 1e-6)


class UpdateIngest:
    """The ingest path of one service: its limits, topics, registry, reassembler and round
    machine, and a reused scratch buffer."""

    def __init__(self, limits: UpdateLimits, *, params: int, topics: FleetTopics,
                 registry: DeviceRegistry, reassembler: Reassembler,
                 machine: RoundMachine) -> None:
        self.limits = limits
        self.params = params
        self.topics = topics
        self.registry = registry
        self.reassembler = reassembler
        self._dropped_counted = reassembler.superseded + reassembler.evicted
        self.machine = machine
        self.max_bytes = limits.payload_limit(params)
        self.clipped = 0  # updates scaled down to max_update_norm
        self._scratch = np.zeros(params, dtype=np.float32)

    def receive(self, topic: str, payload: bytes, now: float, *,
                partial: bool = False) -> Accepted | Rejected | None:
        """One MQTT message on an update topic (`partial`: on a partial topic, from a
        worker or site), through every step (see the module doc); None: a Part was stored
        and more are to come."""
        update = None
        try:
            device = self.partial_source(topic) if partial else self.sender(topic)  # 1
            check_size(len(payload), self.max_bytes, "update payload")  # 2
            message = decode_any(payload, Update, Part)  # 3
            # a source and a device may share a name: their transfers must not
            key = f"partial/{device}" if partial else device
            whole = self._whole(key, message, len(payload), now)  # 4
            if whole is None:
                return None
            update, wire_bytes = whole
            if update.device_id != device:  # 5
                raise _reject(f"update for {update.device_id} arrived on {topic}",
                              "wrong_topic")
            if bool(update.represents) != partial:
                raise _reject(f"{update.device_id} sent a partial aggregate on a device's "
                              "update topic" if update.represents else
                              f"{update.device_id} sent a device update on a partial topic",
                              "wrong_topic")
            self.machine.check_selected(update)  # 6
            decoded = self.contents(update)  # 7
            counted = self.machine.offer(update, payload_bytes=wire_bytes,  # 8
                                         decoded=decoded)
            self.reassembler.delivered(device)  # its share of the budget is free again
        except ProtocolError as exc:
            owed = None if update is None or exc.reason == "wrong_topic" else update
            return Rejected(exc.reason, str(exc), owed)
        self.registry.heard_from(device, now)
        return Accepted(update, wire_bytes, counted)

    def sender(self, topic: str) -> str:
        """The device an update topic names, if it may send updates at all."""
        device = self.topics.device_from_update_topic(topic)
        if self.limits.require_known_devices:
            check_sender(device, self.registry)
        return device

    def partial_source(self, topic: str) -> str:
        """The worker or site a partial topic names, if it is one of partial_sources."""
        source = self.topics.source_from_partial_topic(topic)
        if source not in self.limits.partial_sources:
            raise _reject(f"partial aggregate from {source}, which is not one of "
                          "partial_sources; list it there if it is your worker or site",
                          "unknown_source")
        return source

    def _whole(self, device: str, message: Update | Part, wire_bytes: int,
               now: float) -> tuple[Update, int] | None:
        """The Update and its wire bytes; a Part is held until its transfer is complete."""
        if isinstance(message, Update):
            return message, wire_bytes
        check_size(message.size, self.max_bytes, "chunked update (declared size)")
        assembled = self.reassembler.offer(device, message, now, wire_bytes=wire_bytes)
        if assembled is None:
            return None
        return Update.from_payload(assembled.payload), assembled.wire_bytes

    def contents(self, update: Update) -> np.ndarray | None:
        """The update's decoded delta, clipped to max_update_norm, if a bound is set (a
        reused buffer, valid until the next call); None: no bound, the fold decodes it.

        With a bound the delta is decoded into scratch (codec, size, finiteness), then
        values x num_samples must stay within MAX_WEIGHTED_VALUE, then the norm is bounded.
        Without one, the fold validates it just as strictly but cannot see an overflow
        coming: a second decode would cost a quarter of the ingest rate, and without a
        bound any device can move the model anywhere anyway.
        """
        if not math.isfinite(update.loss * update.num_samples):
            raise _reject(f"training loss {update.loss} x {update.num_samples} samples is "
                          "not finite", "non_finite")
        bound = self.limits.max_update_norm
        if not bound:
            return None
        scratch = self._scratch
        scratch.fill(0.0)
        codecs.decode_into(update.delta, scratch, 1.0)
        peak = max(float(scratch.max()), -float(scratch.min())) if scratch.size else 0.0
        if peak * update.num_samples > MAX_WEIGHTED_VALUE:
            raise _reject(f"update value {peak:.3g} x {update.num_samples} samples would "
                          "overflow the aggregate", "out_of_range")
        factor = clip_factor(l2_norm(scratch), bound, self.limits.norm_policy)
        if factor != 1.0:
            scratch *= np.float32(factor)
            self.clipped += 1
        return scratch

    @property
    def reassembly_share(self) -> int:
        """Bytes of the reassembly budget held for each device a round awaits."""
        return SHARE_BYTES_PER_PARAM * self.params + SHARE_SLACK

    def plan_reassembly(self, awaited: Iterable[str]) -> None:
        """The open round awaits updates from `awaited` (its cohort, or every device online
        when it asks everyone): each is sure of a share of the reassembly budget, which
        (unless max_pending_bytes is set) grows to hold them all (chunking.Reassembler)."""
        counted = self.machine.open.devices
        self.reassembler.plan((d for d in awaited if d not in counted),
                              share=self.reassembly_share)

    def device_online(self, device: str) -> None:
        """A device came online: a round that asks every device awaits it too."""
        if not self.machine.selective and device not in self.machine.open.devices:
            self.reassembler.expect(device)

    def expire(self, now: float) -> int:
        """Drop chunked updates that got no new part for the timeout; how many."""
        return self.reassembler.expire(now)

    def take_superseded(self) -> int:
        """Chunked updates dropped, since the last call, for a newer transfer from the same
        sender or to make room for the devices a round awaits (see Reassembler): counted
        once each, like an expired one."""
        dropped = self.reassembler.superseded + self.reassembler.evicted
        new, self._dropped_counted = dropped - self._dropped_counted, dropped
        return new
