"""Every payload fedmq puts on the wire, as frozen dataclasses (see docs/protocol.md)."""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
from collections.abc import Container, Iterable
from dataclasses import dataclass
from typing import Any

from fedmq.core.protocol.topics import DEVICE_KEY_BYTES, check_name, device_key
from fedmq.core.protocol.wire import MAX_DECODED_BYTES, Message, WireObject, wire
from fedmq.errors import ProtocolError

# Bytes of a device's key in an announcement's cohort digest. 4 bytes: 260 asked devices
# take 1 KiB instead of ~5 KiB of ids, in the retained announcement every device of the
# fleet receives each round; a device outside the cohort matches by chance with
# probability (cohort size) / 2^32, and then only trains an update refused as not_selected.
COHORT_KEY_BYTES = DEVICE_KEY_BYTES  # a device's key in a cohort digest: device_key(id)

# What a device's update weighs in FedAvg (TaskConfig.update_weight). "trained": the
# samples it trained on this round, so work cut short by a time budget or step cap
# counts for what was done. "examples": its whole training set (McMahan et al. 2017's
# n_k, and LEAF's), so under a step cap a large device still weighs its size and the
# fleet optimises the loss over every example, as a central run on the union does.
UPDATE_WEIGHTS = ("trained", "examples")


def cohort_digest(device_ids: Iterable[str]) -> bytes:
    """The sorted, distinct keys of `device_ids`, concatenated (ModelAnnouncement.coh)."""
    return b"".join(sorted({device_key(d) for d in device_ids}))


@dataclass(frozen=True, slots=True)
class CohortDigest:
    """Membership in a cohort digest, by binary search over its sorted keys."""

    keys: bytes

    def __contains__(self, device_id: object) -> bool:
        if not isinstance(device_id, str):
            return False
        key, n = device_key(device_id), len(self.keys) // COHORT_KEY_BYTES
        index = bisect.bisect_left(range(n), key, key=self._key_at)
        return index < n and self._key_at(index) == key

    def _key_at(self, index: int) -> bytes:
        return self.keys[index * COHORT_KEY_BYTES:(index + 1) * COHORT_KEY_BYTES]

    def __len__(self) -> int:
        return len(self.keys) // COHORT_KEY_BYTES


def _require(condition: bool, message: str, reason: str = "bad_field") -> None:
    if not condition:
        raise ProtocolError(message, reason=reason)


@dataclass(frozen=True, slots=True)
class EncodedTensor(WireObject):
    """A flat float vector after a codec, which `codec` names; `size` floats when decoded."""

    codec: str = wire("c")
    size: int = wire("n")
    data: bytes = wire("d")

    def __post_init__(self) -> None:
        _require(0 <= self.size <= 1 << 31, f"tensor size {self.size} out of range")


@dataclass(frozen=True, slots=True)
class TaskConfig(WireObject):
    """What the server asks devices to do with the model this round."""

    epochs: int = wire("e", 1)
    batch_size: int = wire("b", 32)
    lr: float = wire("lr", 0.05)
    deadline_s: float = wire("dl", 60.0)
    # FedProx (Li et al. 2020): mu/2 ||w - w_global||^2 keeps partial local work useful.
    prox_mu: float = wire("mu", 0.0)
    # A device stops local training after this many seconds or steps (0: no limit) and
    # reports the samples it actually processed, which is what its update is weighted by.
    time_budget_s: float = wire("tb", 0.0)
    max_steps: int = wire("ms", 0)
    codec: str = wire("cd", "")  # the codec assigned to this device ("": its own)
    update_weight: str = wire("uw", "trained", omit_default=True)  # see UPDATE_WEIGHTS

    def __post_init__(self) -> None:
        _require(1 <= self.epochs <= 1000, f"epochs {self.epochs} out of range")
        _require(1 <= self.batch_size <= 1 << 20, f"batch size {self.batch_size} out of range")
        _require(math.isfinite(self.lr) and self.lr > 0, f"learning rate {self.lr} is not > 0")
        _require(math.isfinite(self.deadline_s) and self.deadline_s > 0, "deadline must be > 0")
        _require(math.isfinite(self.prox_mu) and self.prox_mu >= 0, "prox_mu must be >= 0")
        _require(math.isfinite(self.time_budget_s) and self.time_budget_s >= 0,
                 "time budget must be >= 0 seconds")
        _require(self.max_steps >= 0, "max_steps must be >= 0")
        _require(len(self.codec) <= 64, "codec name too long")
        _require(self.update_weight in UPDATE_WEIGHTS,
                 f"update_weight {self.update_weight!r} is not one of {UPDATE_WEIGHTS}")


@dataclass(frozen=True, slots=True)
class PayloadInfo(WireObject):
    """Where and how the model parameters of one version travel (chunked for big models)."""

    codec: str = wire("c")
    size: int = wire("n")  # encoded bytes of the whole model payload
    sha256: str = wire("h")
    chunks: int = wire("k", 1)
    # A small payload also travels inline, whole: a device needs no chunk stream (one
    # broker round trip less per round). Empty: chunks only. The chunks are published
    # either way, for devices that predate this field.
    data: bytes = wire("d", b"")

    def __post_init__(self) -> None:
        _require(self.chunks >= 1, "a model payload has at least one chunk")
        _require(not self.data or len(self.data) == self.size,
                 "inline payload data must be exactly `size` bytes")
        _require(self.size >= 0, "payload size must be >= 0")
        _require(len(self.sha256) == 64 and all(c in "0123456789abcdef" for c in self.sha256),
                 "sha256 must be 64 lowercase hex characters")


@dataclass(frozen=True, slots=True)
class ModelAnnouncement(Message):
    """Retained on `model/current`: what the current global model is and how to train it."""

    KIND = "model"
    fleet: str = wire("f")
    version: int = wire("v")
    round: int = wire("r")
    model: str = wire("m")
    model_config: dict[str, Any] = wire("mc")
    layout: list[Any] = wire("lay")
    layout_hash: str = wire("lh")
    task: TaskConfig = wire("t")
    payload: PayloadInfo = wire("p")
    # A new id for the same (version, round) asks devices to train again: a restarted
    # aggregator lost the open round's updates. Reconnects republish the same id.
    announce_id: str = wire("aid", "")
    issued_at: float = wire("ts", 0.0)
    # Devices holding the model of version `delta_base` may fetch this (much smaller)
    # delta from `model/delta/{i}` instead of the full payload.
    delta: PayloadInfo | None = wire("dp", None)
    delta_base: int = wire("db", -1)
    # Who trains this round (None: every device) and, per device, which of `tiers`
    # replaces `task` for it (capability-based assignment); devices not listed use `task`.
    cohort: list[str] | None = wire("co", None)
    # The same as `co` but compact (fedmq sends it for a non-empty cohort, and then no
    # `co`): the sorted 4-byte keys of the devices asked, see device_key.
    cohort_digest: bytes = wire("coh", b"", omit_default=True)
    tiers: list[TaskConfig] = wire("ti", default_factory=list)
    assign: dict[str, int] = wire("as", default_factory=dict)
    # Which line of models this is: drawn when an aggregator starts without a checkpoint
    # and kept across its restarts. A device holding a newer version of another lineage
    # takes this one anyway (the aggregator started over; it would otherwise refuse the
    # device's updates forever), and never as a delta of what it holds. Empty: an
    # aggregator that predates the field.
    lineage: str = wire("ln", "")
    # Federated evaluation: the share of devices (chosen by `evaluates`, the same on both
    # sides) that score this model on their own held-out data and send an EvalReport. 0:
    # none. Left out of the envelope while 0, as the two fields below while unset.
    evaluate: float = wire("ev", 0.0, omit_default=True)
    # Personalization: fnmatch patterns of the tensors that never leave a device (its
    # personal layers, FedPer / FedRep); updates carry the other tensors only, under
    # their own layout hash (fedmq.core.layout.LayoutMask).
    personal: tuple[str, ...] = wire("pl", (), omit_default=True)
    # Optimizer steps a device fine-tunes the model on its own data before using it (and
    # before scoring its personalized accuracy); 0: used as announced.
    finetune_steps: int = wire("ft", 0, omit_default=True)
    # The learning rate of that fine-tuning; 0: the task's `lr`. Fine-tuning a model the
    # whole fleet trained at the fleet's rate overwrites it with a few noisy local steps.
    finetune_lr: float = wire("fl", 0.0, omit_default=True)
    # Early stopping of that fine-tuning: every this many steps the device scores it on
    # a validation part of its training data (the last share, kept out of fine-tuning)
    # and keeps the best, the model as announced included. 0: keeps the last.
    finetune_check: int = wire("fc", 0, omit_default=True)
    # FedRep: steps a device trains its personal layers alone (the shared ones frozen) on
    # each announced model, before using or scoring it and before the round's training,
    # which then moves the shared layers only. 0: both train together (FedPer).
    personal_steps: int = wire("ps", 0, omit_default=True)

    @property
    def key(self) -> tuple[int, int, str]:
        return (self.version, self.round, self.announce_id)

    def __post_init__(self) -> None:
        check_name(self.fleet, "fleet name")
        _require(self.version >= 0 and self.round >= 0, "version and round must be >= 0")
        _require(all(isinstance(t, int) and 0 <= t < len(self.tiers)
                     for t in self.assign.values()), "device assigned a missing tier")
        _require(math.isfinite(self.evaluate) and 0.0 <= self.evaluate <= 1.0,
                 f"evaluate fraction {self.evaluate} must be in [0, 1]")
        _require(all(isinstance(p, str) and 0 < len(p) <= 128 for p in self.personal)
                 and len(self.personal) <= 64, "personal layer patterns must be 1-64 "
                 "strings of 1-128 characters")
        _require(0 <= self.finetune_steps <= 100_000,
                 f"finetune_steps {self.finetune_steps} out of range")
        _require(math.isfinite(self.finetune_lr) and self.finetune_lr >= 0,
                 f"finetune_lr {self.finetune_lr} must be >= 0")
        _require(0 <= self.finetune_check <= 100_000,
                 f"finetune_check {self.finetune_check} out of range")
        _require(0 <= self.personal_steps <= 100_000,
                 f"personal_steps {self.personal_steps} out of range")
        _require(not self.personal_steps or bool(self.personal),
                 "personal_steps needs personal layers (pl)")
        digest = self.cohort_digest
        if digest:
            _require(self.cohort is None, "an announcement names its cohort once: co or coh")
            _require(len(digest) % COHORT_KEY_BYTES == 0,
                     f"cohort digest of {len(digest)} bytes is not whole 4-byte keys")
            keys = [digest[i:i + COHORT_KEY_BYTES]
                    for i in range(0, len(digest), COHORT_KEY_BYTES)]
            _require(all(a < b for a, b in itertools.pairwise(keys)),
                     "cohort digest keys must be sorted and distinct")

    def asked(self) -> Container[str] | None:
        """The devices asked to train this round (None: every device)."""
        if self.cohort_digest:
            return CohortDigest(self.cohort_digest)
        return None if self.cohort is None else frozenset(self.cohort)

    def task_for(self, device_id: str) -> TaskConfig | None:
        """What `device_id` should do with this model; None: sit this round out."""
        asked = self.asked()
        if asked is not None and device_id not in asked:
            return None
        tier = self.assign.get(device_id)
        return self.task if tier is None else self.tiers[tier]


def evaluates(device_id: str, version: int, fraction: float) -> bool:
    """Whether `device_id` scores model `version` when a share `fraction` of the fleet is
    asked to: a hash of both below the fraction, so the aggregator can tell a report it
    asked for from one it did not, and a different share of the fleet scores each model."""
    if fraction <= 0.0:
        return False
    if fraction >= 1.0:
        return True
    digest = hashlib.sha256(f"eval/{version}/{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2.0**64


@dataclass(frozen=True, slots=True)
class EvalMetrics(WireObject):
    """One model's score on a device's held-out examples."""

    loss: float = wire("l")
    accuracy: float | None = wire("a", None)  # top-1; None: a task without classes

    def __post_init__(self) -> None:
        _require(math.isfinite(self.loss), f"evaluation loss {self.loss} is not finite",
                 "non_finite")
        _require(self.accuracy is None or (math.isfinite(self.accuracy)
                                           and 0.0 <= self.accuracy <= 1.0),
                 f"accuracy {self.accuracy} is not in [0, 1]", "out_of_range")


@dataclass(frozen=True, slots=True)
class EvalReport(Message):
    """QoS 1 on `update/{device_id}` (the topic a device already publishes on): how the
    announced model of `version` scores on the device's own held-out data. `personal`:
    the same examples scored by the model the device actually uses (its personal layers
    and `finetune_steps` of fine-tuning applied), when it personalizes. Fire and forget:
    no receipt; a lost report only thins the round's fleet sample."""

    KIND = "eval"
    device_id: str = wire("dev")
    round: int = wire("r")
    version: int = wire("v")
    num_samples: int = wire("ns")
    metrics: EvalMetrics = wire("g")
    personal: EvalMetrics | None = wire("p", None, omit_default=True)
    eval_s: float = wire("s", 0.0, omit_default=True)

    def __post_init__(self) -> None:
        check_name(self.device_id, "device id")
        _require(self.round >= 0 and self.version >= 0, "round/version must be >= 0")
        _require(0 < self.num_samples <= 1 << 31,
                 f"num_samples {self.num_samples} must be in (0, 2^31]", "bad_samples")
        _require(math.isfinite(self.eval_s) and self.eval_s >= 0, "eval_s must be >= 0")


@dataclass(frozen=True, slots=True)
class ModelChunk(Message):
    """Retained on `model/payload/{index}`: one piece of an encoded model version."""

    KIND = "mchunk"
    version: int = wire("v")
    index: int = wire("i")
    count: int = wire("k")
    data: bytes = wire("d")

    def __post_init__(self) -> None:
        _require(0 <= self.index < self.count, f"chunk {self.index} of {self.count} is invalid")


@dataclass(frozen=True, slots=True)
class Part(Message):
    """One piece of a payload too big for one MQTT message (see chunking.py).

    Every part repeats the manifest (count, size, sha256), so the receiver can start
    reassembling from whichever part arrives first.
    """

    KIND = "part"
    transfer_id: bytes = wire("t")  # random per payload; the receiver keys on (sender, id)
    index: int = wire("i")
    count: int = wire("k")
    size: int = wire("n")  # bytes of the whole payload
    sha256: bytes = wire("h")  # digest of the whole payload
    data: bytes = wire("d")

    def __post_init__(self) -> None:
        _require(1 <= len(self.transfer_id) <= 16, "transfer id must be 1-16 bytes")
        _require(0 <= self.index < self.count, f"part {self.index} of {self.count} is invalid")
        _require(self.count <= self.size <= MAX_DECODED_BYTES,
                 f"{self.count} parts of a {self.size}-byte payload: every part carries at "
                 f"least one byte and payloads stay below {MAX_DECODED_BYTES} bytes")
        _require(len(self.data) <= self.size,
                 f"part holds {len(self.data)} bytes of a {self.size}-byte payload")
        _require(len(self.sha256) == 32, "sha256 must be the 32-byte digest")


@dataclass(frozen=True, slots=True)
class Update(Message):
    """QoS 1 on `update/{device_id}`: a device's trained delta against the model it received."""

    KIND = "upd"
    device_id: str = wire("dev")
    update_id: str = wire("id")
    round: int = wire("r")
    base_version: int = wire("bv")
    num_samples: int = wire("ns")
    loss: float = wire("l")
    delta: EncodedTensor = wire("x")
    layout_hash: str = wire("lh", "")
    train_s: float = wire("s", 0.0)
    steps: int = wire("st", 0)
    complete: bool = wire("cp", True)  # False: stopped at its time budget or step cap
    # 0: one device's own update, on `update/{device_id}`. k >= 1: a partial aggregate of
    # k device updates from a worker or site aggregator, on `partial/{source}`: `delta` is
    # their weighted mean (float32), `num_samples` their summed weight, `loss` their
    # sample-weighted mean loss, so the receiver folds it exactly like one update.
    represents: int = wire("rep", 0, omit_default=True)

    def __post_init__(self) -> None:
        check_name(self.device_id, "device id")
        _require(0 <= self.represents <= 1 << 31, f"represents {self.represents} out of range")
        _require(0 < len(self.update_id) <= 64, "update id must be 1-64 characters")
        _require(self.round >= 0 and self.base_version >= 0, "round/version must be >= 0")
        _require(self.num_samples > 0, f"num_samples {self.num_samples} must be > 0",
                 "bad_samples")
        _require(math.isfinite(self.loss), f"training loss {self.loss} is not finite",
                 "non_finite")


# What DeviceActivity's revision 1 carries; a later revision adds fields (never changes
# these), so a reader can tell a field the sender does not know from a zero.
ACTIVITY_REVISION = 1


@dataclass(frozen=True, slots=True)
class DeviceActivity(WireObject):
    """A device's work since it started, for operators (`fedmq status`); the aggregator
    decides nothing from it."""

    revision: int = wire("v", ACTIVITY_REVISION)
    last_round: int = wire("r", 0)  # round of the newest update trained (0: none yet)
    updates: int = wire("u", 0)  # updates trained and sent (re-sends not counted)
    bytes_up: int = wire("up", 0)  # update bytes published, re-sends included
    pending: int = wire("p", 0)  # updates still waiting for their receipt (the outbox)
    codec: str = wire("c", "")  # of the newest update
    backend: str = wire("b", "")  # what it trains with: numpy or torch

    def __post_init__(self) -> None:
        _require(self.revision >= 1, "activity revision must be >= 1")
        _require(min(self.last_round, self.updates, self.bytes_up, self.pending) >= 0,
                 "activity counters must be >= 0")
        _require(len(self.codec) <= 64 and len(self.backend) <= 32,
                 "activity codec or backend name too long")


@dataclass(frozen=True, slots=True)
class DeviceStatus(Message):
    """Retained on `device/{id}/status`: birth (online, capabilities), the same with fresh
    activity now and then, or Last Will (offline)."""

    KIND = "dev"
    device_id: str = wire("dev")
    online: bool = wire("on")
    capabilities: dict[str, Any] = wire("cap", default_factory=dict)
    agent_version: str = wire("av", "")
    ts: float = wire("ts", 0.0)
    # Optional within protocol 1: senders before it, and Last Wills, carry none.
    activity: DeviceActivity | None = wire("act", None, omit_default=True)

    def __post_init__(self) -> None:
        check_name(self.device_id, "device id")


@dataclass(frozen=True, slots=True)
class AggregatorStatus(Message):
    """Retained on `aggregator/status`: online with progress, or the Last Will's offline."""

    KIND = "agg"
    online: bool = wire("on")
    round: int = wire("r", 0)
    version: int = wire("v", 0)
    ts: float = wire("ts", 0.0)


RECEIPT_STATUSES = ("accepted", "duplicate", "rejected")
# Refusals that are the protocol working as designed: an over-selected device's update
# arriving after its round closed, a re-send already counted, a device outside the cohort.
# In a fleet of thousands they happen every round; both sides log them at INFO, so that a
# WARNING means something is wrong.
ROUTINE_REFUSALS = frozenset({"stale_round", "duplicate", "not_selected"})


@dataclass(frozen=True, slots=True)
class Receipt(Message):
    """QoS 1 on `receipt/{device_id}`: the aggregator durably holds (or refuses) an update.

    A broker PUBACK is not delivery; only this lets a device drop the update from its
    outbox. `accepted`: counted (also sent again for a re-sent update already counted);
    `duplicate`: another update of this device already counts for the round; `rejected`:
    refused for `reason` (e.g. stale_round) and will never count.
    """

    KIND = "rcpt"
    update_id: str = wire("id")
    round: int = wire("r")
    status: str = wire("st")
    reason: str = wire("why", "")

    def __post_init__(self) -> None:
        _require(self.status in RECEIPT_STATUSES, f"unknown receipt status {self.status!r}")

    @property
    def routine(self) -> bool:
        """A refusal by design (ROUTINE_REFUSALS), nothing for the device to worry about."""
        return self.status == "duplicate" or (self.status == "rejected"
                                              and self.reason in ROUTINE_REFUSALS)


DECRYPT_STATUSES = ("ok", "refused")


@dataclass(frozen=True, slots=True)
class DecryptRequest(Message):
    """QoS 1 on `he/decrypt` (aggregator -> key holder, in Parts when large): decrypt the
    encrypted sum of round `round`'s `count` updates (`he = "ckks"`, docs/privacy.md)."""

    KIND = "he.req"
    lineage: str = wire("lin")  # the aggregator's line of models (ModelAnnouncement.lineage)
    round: int = wire("r")
    key: str = wire("fp")  # fingerprint of the HE key the sum is encrypted under
    size: int = wire("n")  # parameters of the model (the packed sum holds n + 1 values)
    count: int = wire("c")  # updates in the sum
    devices: list[str] = wire("dev")  # who contributed (for the key holder's log)
    ciphertexts: list[bytes] = wire("ct")  # the serialized CKKS ciphertexts of the sum

    def __post_init__(self) -> None:
        _require(self.round >= 1, f"round {self.round} must be >= 1")
        _require(self.size >= 1, f"size {self.size} must be >= 1")
        _require(self.count >= 1, f"count {self.count} must be >= 1")
        _require(len(self.devices) <= self.count, f"{len(self.devices)} devices for a sum of "
                 f"{self.count} updates")
        _require(bool(self.ciphertexts), "a sum of no ciphertexts")

    def digest(self) -> bytes:
        """SHA-256 over the ciphertexts: what the key holder decrypted, and what its
        reply names (so a reply never answers another sum)."""
        h = hashlib.sha256()
        for blob in self.ciphertexts:
            h.update(len(blob).to_bytes(8, "big"))
            h.update(blob)
        return h.digest()


@dataclass(frozen=True, slots=True)
class DecryptReply(Message):
    """QoS 1 on `he/sum` (key holder -> aggregator, in Parts when large): a round's
    decrypted sum, or why the key holder refused to decrypt it."""

    KIND = "he.sum"
    lineage: str = wire("lin")
    round: int = wire("r")
    digest: bytes = wire("h")  # DecryptRequest.digest() of the sum answered
    status: str = wire("st")  # ok or refused
    reason: str = wire("why", "")  # refused: a short code (too_few, replayed, ...)
    message: str = wire("msg", "")  # refused: what to do, for the aggregator's log
    weighted: bytes = wire("s", b"")  # ok: the weighted sum of the deltas, float64 LE
    weight: float = wire("w", 0.0)  # ok: the decrypted total weight

    def __post_init__(self) -> None:
        _require(self.status in DECRYPT_STATUSES, f"unknown decrypt status {self.status!r}")
        _require(len(self.digest) == 32, "digest must be the 32-byte SHA-256")
        _require(len(self.weighted) % 8 == 0, "the weighted sum is float64: 8 bytes a value")
        _require(self.status == "ok" or (self.reason and not self.weighted),
                 "a refusal carries a reason and no sum")
