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
  7. contents: the reported loss is finite; the claimed samples are credited, capped
     by bounds.py; unless every norm bound is off the delta is decoded, once, into a
     float32 buffer and checked (codec, shape, finiteness, `out_of_range`), its norm
     measured, and clipped or refused (`norm_exceeded`) above the bound (fixed, or
     adaptive once warmed up);
  8. the round machine: round, version, layout, duplicates, and, for a delta not decoded
     in step 7, the decode into the aggregate (codec, shape, finiteness, range).

An EvalReport (federated evaluation) comes on the same topics and takes steps 1-3 and 5,
then its own: its device must be known (`unknown_device`) and picked by the model's
`evaluate` share (`not_selected`), its examples no more than the device declared in its
birth (`bad_samples`), its model the current one (`stale_eval`), once per device
(`duplicate`); a NaN loss or an accuracy outside [0, 1] fails step 3 (`non_finite`,
`out_of_range`). Its rejections count as `eval_<reason>`; it gets no receipt.

In secure mode (SecAgg+) the service takes steps 2 and 4 only (`unchunk`: a big model's
masked input comes in Parts like an update) and hands the whole payload to the secure
round (aggregator/secure_service.py), which reads it itself.

The result is the accepted Update with its wire byte count, or one Rejected with its
reason; nothing else is raised for a bad message. The delta is decoded at most once: by
step 7 when a norm bound needs its values (the decoded array is what gets folded), else
by the streaming fold itself (the fast path benchmarks/ingest.py measures, taken only
with `max_update_norm = 0` and `adaptive_norm_factor = 0`). Pure apart from a reused
scratch buffer and the bounds it learns; the service calls it on its loop thread.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from aggregator.bounds import UpdateBounds, check_factor
from aggregator.devices import DeviceRegistry
from aggregator.evaluation import EvalPool
from aggregator.guard import l2_norm
from aggregator.he_round import HESetup
from aggregator.rounds import RoundMachine
from fedmq.core import codecs
from fedmq.core.chunking import Assembled, Reassembler
from fedmq.core.codecs.pipeline import MAX_WEIGHTED_VALUE
from fedmq.core.protocol import EvalReport, FleetTopics, Part, Receipt, Update, evaluates
from fedmq.core.protocol.wire import decode_any, peek_kind
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
# An adaptive bound (or a sample cap) tighter than this many times the typical update
# would clip (or cap) honest ones routinely: honest norms and claims spread about 2x
# around their median on the bundled tasks.
MIN_FACTOR = 1.5


def _reject(message: str, reason: str) -> ProtocolError:
    return ProtocolError(message, reason=reason)


@dataclass(frozen=True)
class Accepted:
    """An update the round machine took: `counted` False if it already counted (a
    redelivery, receipted "accepted" again)."""

    update: Update
    wire_bytes: int  # its MQTT payload bytes, all parts together
    counted: bool
    # (what, message) for each way it was folded in other than it came: "clipped" to
    # the norm bound, samples "capped"
    notes: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Screened:
    """What step 7 hands the round machine: the decoded (maybe clipped) delta, or None
    for the fold to decode; the samples it is weighted by; its folded norm (None: not
    decoded); and notes for the log."""

    delta: np.ndarray | None
    samples: int
    norm: float | None
    notes: tuple[tuple[str, str], ...] = ()
    clipped: bool = False  # its norm before clipping was above the bound


@dataclass(frozen=True)
class Evaluated:
    """An EvalReport the evaluation pool took."""

    report: EvalReport
    wire_bytes: int


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
    max_update_norm: float = 0.0  # 0: the adaptive bound (if norm_factor > 0)
    norm_factor: float = 5.0  # adaptive bound: this x the median recent norm; 0: off
    norm_policy: str = "clip"
    sample_factor: float = 4.0  # credited samples: at most this x the typical; 0: off
    claim_epochs: int = 1  # the most epochs a device may be asked for (declared claims)
    max_update_bytes: int = 0  # 0: derived from the model size
    # Workers and sites whose partial aggregates (on `partial/{source}`) are taken.
    partial_sources: frozenset[str] = frozenset()
    he: HESetup | None = None  # encrypted updates: their own size limit, nothing decoded

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_update_norm) and self.max_update_norm >= 0):
            raise ConfigError(f"max_update_norm {self.max_update_norm} must be >= 0 (0: "
                              "adaptive, see adaptive_norm_factor)")
        check_factor("adaptive_norm_factor", self.norm_factor, minimum=MIN_FACTOR)
        check_factor("max_sample_factor", self.sample_factor, minimum=MIN_FACTOR)
        if self.claim_epochs < 1:
            raise ConfigError("claim_epochs must be >= 1")
        if self.norm_policy not in NORM_POLICIES:
            raise ConfigError(f"norm_policy {self.norm_policy!r} must be 'clip' or 'reject'")
        if self.max_update_bytes < 0:
            raise ConfigError("max_update_bytes must be >= 0 (0: derived from the model size)")

    @classmethod
    def from_config(cls, config) -> UpdateLimits:
        norm, policy = config.max_update_norm, config.norm_policy
        norm_factor, sample_factor = config.adaptive_norm_factor, config.max_sample_factor
        setup = config.he_setup()
        if setup is not None:  # the server sees no update: no norm to bound, no claim to
            norm_factor = sample_factor = 0.0  # scale (the decrypted weight is checked)
        if config.dp_noise_multiplier:  # DP: every update clipped to the noise's scale
            if norm:
                raise ConfigError("with dp_noise_multiplier set, dp_clip_norm bounds every "
                                  "update; leave max_update_norm at 0")
            # fixed: a bound learnt from the updates would itself depend on private data
            norm, policy = config.dp_clip_norm, "clip"
        return cls(require_known_devices=config.require_known_devices,
                   max_update_norm=norm, norm_factor=norm_factor,
                   norm_policy=policy, sample_factor=sample_factor, he=setup,
                   claim_epochs=max(config.epochs, config.constrained_epochs),
                   max_update_bytes=config.max_update_bytes,
                   partial_sources=config.sources())

    def bounds(self) -> UpdateBounds:
        """Fresh bounds of these settings (nothing learnt yet)."""
        return UpdateBounds(max_update_norm=self.max_update_norm, norm_factor=self.norm_factor,
                            sample_factor=self.sample_factor)

    def payload_limit(self, params: int) -> int:
        """Bytes an update of a `params`-parameter model may take, whole or declared by
        its Parts."""
        if self.max_update_bytes:
            return self.max_update_bytes
        if self.he is not None:
            return self.he.payload_limit(params) + SIZE_SLACK
        return MAX_BYTES_PER_PARAM * params + SIZE_SLACK


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


# quick_norm's relative error bound, with a wide margin: float32 BLAS sums of a million
# squares measure about 1e-6.
QUICK_NORM_ERROR = 1e-4
# Below it a float32 square underflows, above it a float32 sum of squares may overflow.
_QUICK_PEAK = (1e-15, 1e15)


def quick_norm(values: np.ndarray, peak: float) -> float:
    """L2 norm of a float32 vector whose largest magnitude is `peak`: a float32 BLAS dot
    (8x quicker than summing in float64, which every update would pay) when its squares
    can neither underflow nor overflow, else exactly (l2_norm)."""
    low, high = _QUICK_PEAK
    if low <= peak <= high and peak * peak * values.size < 1e37:
        return math.sqrt(float(np.dot(values, values)))
    return l2_norm(values) if peak else 0.0


def clip_factor(norm: float, bound: float, policy: str) -> float:
    """What to scale a delta of L2 norm `norm` by (1.0: keep it); raises for `reject`."""
    if bound <= 0 or norm <= bound:
        return 1.0
    if policy == "reject":
        raise _reject(f"update has L2 norm {norm:.4g}, above the norm bound {bound:.4g} "
                      "(max_update_norm, or adaptive_norm_factor x the median of recent "
                      "updates)", "norm_exceeded")
    # a hair under: float32 rounding of the scaled values may otherwise land just above
    return bound / norm * (1.0 - 1e-6)


class UpdateIngest:
    """The ingest path of one service: its limits, topics, registry, reassembler and round
    machine, and a reused scratch buffer."""

    def __init__(self, limits: UpdateLimits, *, params: int, topics: FleetTopics,
                 registry: DeviceRegistry, reassembler: Reassembler,
                 machine: RoundMachine, bounds: UpdateBounds | None = None,
                 evaluations: EvalPool | None = None, evaluate_fraction: float = 0.0) -> None:
        """evaluations: where EvalReports go, asked of `evaluate_fraction` of the devices
        (None: every report is refused as not_selected)."""
        self.limits = limits
        self.bounds = bounds if bounds is not None else limits.bounds()
        self.params = params
        self.topics = topics
        self.registry = registry
        self.reassembler = reassembler
        self._dropped_counted = reassembler.superseded + reassembler.evicted
        self.machine = machine
        self.max_bytes = limits.payload_limit(params)
        self.clipped = 0  # updates scaled down to the norm bound
        self.capped = 0  # updates weighted by fewer samples than they claimed
        self._scratch = np.zeros(params, dtype=np.float32)
        self.evaluations = evaluations
        self.evaluate_fraction = evaluate_fraction if evaluations is not None else 0.0

    def receive(self, topic: str, payload: bytes, now: float, *,
                partial: bool = False) -> Accepted | Evaluated | Rejected | None:
        """One MQTT message on an update topic (`partial`: on a partial topic, from a
        worker or site), through every step (see the module doc); None: a Part was stored
        and more are to come."""
        update = None
        try:
            device = self.partial_source(topic) if partial else self.sender(topic)  # 1
            check_size(len(payload), self.max_bytes, "update payload")  # 2
            message = (decode_any(payload, Update, Part) if partial
                       else decode_any(payload, Update, Part, EvalReport))  # 3
            if isinstance(message, EvalReport):
                return self._evaluation(device, message, len(payload), now)
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
            screened = self.contents(update)  # 7
            counted = self.machine.offer(update, payload_bytes=wire_bytes,  # 8
                                         decoded=screened.delta, samples=screened.samples,
                                         clipped=screened.clipped)
            self.delivered(device)  # its share of the budget is free again
        except ProtocolError as exc:
            owed = None if update is None or exc.reason == "wrong_topic" else update
            return Rejected(exc.reason, str(exc), owed)
        self.registry.heard_from(device, now)
        if not counted:
            return Accepted(update, wire_bytes, counted)
        if not update.represents:  # a partial's samples are a sum, its delta a mean
            self.bounds.accepted(norm=screened.norm, samples=screened.samples)
        return Accepted(update, wire_bytes, counted, screened.notes)

    def _evaluation(self, device: str, report: EvalReport, wire_bytes: int,
                    now: float) -> Evaluated | Rejected:
        """An EvalReport's own checks (see the module doc), then into the pool."""
        try:
            if report.device_id != device:
                raise _reject(f"evaluation for {report.device_id} arrived on {device}'s "
                              "topic", "wrong_topic")
            if not self.registry.known(device):
                raise _reject(f"evaluation from {device}, which never published a birth",
                              "unknown_device")
            if self.evaluations is None or not evaluates(device, report.version,
                                                         self.evaluate_fraction):
                raise _reject(f"{device} sent an evaluation of model v{report.version} it "
                              "was not asked for", "not_selected")
            declared = self.registry.declared_examples(device)
            if declared is not None and report.num_samples > declared:
                raise _reject(f"{device} scored {report.num_samples} held-out examples but "
                              f"declared {declared} in its birth", "bad_samples")
            self.evaluations.offer(report, version=self.machine.version,
                                   open_round=self.machine.round)
        except ProtocolError as exc:
            return Rejected(f"eval_{exc.reason}", str(exc))
        self.registry.heard_from(device, now)
        return Evaluated(report, wire_bytes)

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
        assembled = self._reassemble(device, message, wire_bytes, now)
        if assembled is None:
            return None
        return Update.from_payload(assembled.payload), assembled.wire_bytes

    def _reassemble(self, device: str, part: Part, wire_bytes: int,
                    now: float) -> Assembled | None:
        check_size(part.size, self.max_bytes, "chunked update (declared size)")
        return self.reassembler.offer(device, part, now, wire_bytes=wire_bytes)

    def unchunk(self, device: str, payload: bytes, now: float) -> Assembled | None:
        """Steps 2 and 4 for a message on `device`'s update topic that its caller reads
        itself (a SecAgg+ message, which may come in Parts like an update): its size
        checked, and a Part held until its transfer is whole. The whole payload with its
        wire bytes, None while parts are missing; ProtocolError as for an update
        (`too_large`, `bad_chunks`, `bad_hash`, `incomplete`). Anything but a Part,
        garbage included, comes back as it is for the caller to read or refuse."""
        check_size(len(payload), self.max_bytes, "update payload")
        try:
            chunked = peek_kind(payload) == Part.KIND
        except ProtocolError:
            chunked = False
        if not chunked:
            return Assembled(payload, len(payload))
        return self._reassemble(device, Part.from_payload(payload), len(payload), now)

    def delivered(self, device: str) -> None:
        """`device`'s message for the round was counted outside `receive` (a masked
        input): its share of the reassembly budget is free again."""
        self.reassembler.delivered(device)

    def contents(self, update: Update) -> Screened:
        """The update's samples as credited, and its delta decoded and bounded unless
        every norm bound is off (then None: the fold decodes it). The delta is a reused
        buffer, valid until the next call.

        Decoded, the delta is checked (codec, size, finiteness), then its values x the
        credited samples must stay within MAX_WEIGHTED_VALUE, then its norm is bounded.
        Without any bound the fold validates it just as strictly, but cannot see an
        overflow coming: a second decode would cost a quarter of the ingest rate.
        """
        if not math.isfinite(update.loss * update.num_samples):
            raise _reject(f"training loss {update.loss} x {update.num_samples} samples is "
                          "not finite", "non_finite")
        samples, notes = self.credit(update)
        if not self.bounds.decodes:
            return Screened(None, samples, None, notes)
        scratch = self._scratch
        scratch.fill(0.0)
        codecs.decode_into(update.delta, scratch, 1.0)
        peak = max(float(scratch.max()), -float(scratch.min())) if scratch.size else 0.0
        if peak * samples > MAX_WEIGHTED_VALUE:
            raise _reject(f"update value {peak:.3g} x {samples} samples would "
                          "overflow the aggregate", "out_of_range")
        norm = quick_norm(scratch, peak)
        # under DP the round's clip (fixed, or adaptive: rounds.py), else the update bound
        dp_clip = self.machine.dp_clip_norm()
        bound = dp_clip if dp_clip is not None else self.bounds.norm_bound()
        if bound is not None and norm > bound * (1 - QUICK_NORM_ERROR):
            norm = l2_norm(scratch)  # at the bound: exactly, so a clip holds it to it
        factor = 1.0 if bound is None else clip_factor(norm, bound, self.limits.norm_policy)
        if factor != 1.0:
            scratch *= np.float32(factor)
            self.clipped += 1
            notes += (("clipped", f"update {update.update_id} from {update.device_id} has L2 "
                       f"norm {norm:.4g}, clipped to the bound {bound:.4g} (max_update_norm, "
                       "or adaptive_norm_factor x the median of recent updates)"),)
            norm = l2_norm(scratch)
        return Screened(scratch, samples, norm, notes, clipped=factor != 1.0)

    def credit(self, update: Update) -> tuple[int, tuple[tuple[str, str], ...]]:
        """The samples `update` is weighted by (see bounds.py), and a note if capped. A
        partial aggregate's are a sum its worker or site credited device by device."""
        if update.represents:
            return update.num_samples, ()
        epochs = self.limits.claim_epochs
        declared = self.registry.declared_examples(update.device_id)
        fleet = None
        if not self.bounds.samples.warm:  # O(devices), only for the first few updates
            typical = self.registry.typical_declared_examples()
            fleet = None if typical is None else typical * epochs
        credited = self.bounds.credit(update.num_samples, fleet_declared=fleet,
                                      known=self.registry.known(update.device_id),
                                      declared=None if declared is None else declared * epochs)
        if credited == update.num_samples:
            return credited, ()
        self.capped += 1
        return credited, (("capped", f"update {update.update_id} from {update.device_id} "
                           f"claims {update.num_samples} samples; weighted as {credited} "
                           f"(max_sample_factor {self.limits.sample_factor:g} x the typical "
                           "claim, or x what the device declared in its birth; a device "
                           "without a birth: 1 x the typical claim)"),)

    @property
    def reassembly_share(self) -> int:
        """Bytes of the reassembly budget held for each device a round awaits."""
        if self.limits.he is not None:
            return self.limits.he.payload_limit(self.params) + SHARE_SLACK
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
