"""Secure aggregation (SecAgg+) for the aggregator: the thin adapter between the sans-I/O
SecAggServer (fedmq/core/secagg/server.py) and MQTT.

The round's stage machine stays pure; this plans each round's setup from the cohort,
turns its Outbound messages into publishes, feeds it the devices' messages and the
loop's clock, and hands the service the weighted mean of the unmasked sum. It never
sees an individual update: inputs are masked field elements summed as they arrive.

Topics (docs/protocol.md, "Secure aggregation"):
    secagg/setup          aggregator -> devices, retained: the open round's SecAggSetup
    secagg/{device}/in    aggregator -> one device: neighbours' keys, routed shares,
                          the unmask request
    update/{device}       device -> aggregator: its keys, shares, masked input (through
                          its durable outbox, receipted like an update; in Parts when
                          bigger than one message, reassembled before it gets here) and
                          reveal; the device's own topic, so production ACLs hold as
                          they are
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedmq.core.protocol import FleetTopics
from fedmq.core.protocol.wire import decode_any, peek_kind
from fedmq.core.secagg import SECAGG_MESSAGES, MaskedInput, SecAggSetup, StageTimeouts
from fedmq.core.secagg.field import FIELD_BITS
from fedmq.core.secagg.messages import AdvertiseKeys, ShareKeys, UnmaskResponse
from fedmq.core.secagg.server import STAGES, Outbound, SecAggServer, plan_setup
from fedmq.core.secagg.weighting import vector_size, weighted_mean
from fedmq.errors import ConfigError, ProtocolError, SecureAggregationError, require

if TYPE_CHECKING:
    from aggregator.config import AggregatorConfig

log = logging.getLogger(__name__)

SECAGG_KINDS = frozenset(m.KIND for m in SECAGG_MESSAGES)
DEVICE_KINDS = (AdvertiseKeys, ShareKeys, MaskedInput, UnmaskResponse)
MIN_DEVICES = 3  # the smallest SecAgg graph
STATE_FORMAT = 1
REMEMBER_ROUNDS = 8  # finished rounds whose late messages are told apart from strangers'


def setup_topic(topics: FleetTopics) -> str:
    return f"{topics.prefix}/secagg/setup"


def device_topic(topics: FleetTopics, device: str) -> str:
    """Where the aggregator sends one device its part of a secure round."""
    topics.receipt(device)  # checks the name
    return f"{topics.prefix}/secagg/{device}/in"


def is_secagg(payload: bytes) -> bool:
    """Whether a payload on an update topic is a secure-aggregation message."""
    try:
        return peek_kind(payload) in SECAGG_KINDS
    except ProtocolError:
        return False


def check_secure_config(config: AggregatorConfig) -> None:
    """ConfigError for settings that need to see individual updates, or bad secagg ones."""
    refused = []
    if config.mode != "sync":
        refused.append("mode = async (every update is a round of its own)")
    if config.aggregation != "mean":
        refused.append(f"aggregation = {config.aggregation} (robust rules look at every "
                       "update; the sum hides them)")
    if config.dp_noise_multiplier:
        refused.append("dp_noise_multiplier (central DP clips each update on the server, "
                       "which cannot see them)")
    if config.role != "central" or config.sources():
        refused.append(f"role = {config.role} / partial_sources (workers and sites fold "
                       "plain updates)")
    if config.late_updates != "discard":
        refused.append("late_updates = fold (a secure round sums one cohort's inputs)")
    if config.max_update_norm:
        refused.append("max_update_norm (the server cannot measure an update's norm: "
                       "devices clip each value to secagg_clip instead)")
    if config.norm_policy != "clip":
        refused.append("norm_policy = reject (nothing to measure: use secagg_clip)")
    if config.he:
        refused.append("he = ckks (two ways of hiding updates; choose one: docs/privacy.md)")
    if refused:
        raise ConfigError("secure_aggregation cannot be combined with "
                          + "; ".join(refused) + ". Drop these settings, or turn "
                          "secure_aggregation off")
    require("cryptography", "secure")  # at load, not at the first round's keys
    if not (np.isfinite(config.secagg_clip) and config.secagg_clip > 0):
        raise ConfigError(f"secagg_clip {config.secagg_clip} must be a finite value > 0")
    if not 0.0 <= config.secagg_dropout < 1.0:
        raise ConfigError(f"secagg_dropout {config.secagg_dropout} must be in [0, 1)")
    if config.secagg_field_bits not in FIELD_BITS:
        raise ConfigError(f"secagg_field_bits {config.secagg_field_bits} must be one of "
                          f"{FIELD_BITS}")
    if config.secagg_weight_cap < 0:
        raise ConfigError("secagg_weight_cap must be >= 0 (0: from the devices' births)")
    StageTimeouts(keys_s=config.secagg_stage_s, shares_s=config.secagg_stage_s,
                  inputs_s=config.deadline_s, unmask_s=config.secagg_stage_s)


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    payload: bytes
    retain: bool = False


@dataclass(frozen=True, slots=True)
class Received:
    """What became of one device message: `receipt` is owed for a masked input."""

    status: str  # accepted, duplicate, rejected
    reason: str = ""
    publishes: tuple[Publish, ...] = ()
    input_id: str = ""  # a MaskedInput's: its receipt's update id
    round: int = 0


@dataclass(frozen=True, slots=True)
class SecureSum:
    """A finished secure round: the weighted mean of the survivors' updates."""

    round: int
    mean: np.ndarray
    weight: float
    samples: int
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    excluded: tuple[str, ...]
    bytes_up: int  # every message the devices sent for the round
    total: np.ndarray  # the unmasked field sum itself (tests check it is exact)
    session: bytes


class SecureRounds:
    """One secure round at a time for the service's loop thread (not thread-safe)."""

    def __init__(self, config: AggregatorConfig, *, topics: FleetTopics, params: int) -> None:
        self.config = config
        self.topics = topics
        self.size = vector_size(params)
        self.timeouts = StageTimeouts(
            keys_s=config.secagg_stage_s, shares_s=config.secagg_stage_s,
            inputs_s=config.deadline_s, unmask_s=config.secagg_stage_s)
        self.server: SecAggServer | None = None
        self.result: SecureSum | None = None
        self.failure: SecureAggregationError | None = None
        self.counts: Counter[str] = Counter()  # messages by kind/outcome, for tests and logs
        self.bytes_in = self.bytes_out = 0
        self._restarted: set[str] = set()  # re-advertised other keys: excluded this round
        # sessions of recent rounds -> the devices whose inputs were in their sum
        self._finished: dict[bytes, frozenset[str]] = {}
        self._round_bytes = 0

    @property
    def round(self) -> int:
        return -1 if self.server is None else self.server.setup.round

    @property
    def active(self) -> bool:
        return self.server is not None

    def open(self, round: int, participants: list[str], *, weight_cap: int,
             now: float) -> list[Publish]:
        """Plan and start round `round` over `participants` (ConfigError: too few)."""
        self.close()
        if len(participants) < MIN_DEVICES:
            raise ConfigError(f"a secure round needs at least {MIN_DEVICES} devices, "
                              f"{len(participants)} are online")
        c = self.config
        setup = plan_setup(sorted(participants), round=round, vector_size=self.size,
                           clip=c.secagg_clip, dropout_rate=c.secagg_dropout,
                           field_bits=c.secagg_field_bits)
        # a round needs min_updates inputs, as a plain one does (and t, the protocol's floor)
        least = min(len(participants), max(setup.min_clients, c.min_updates))
        setup = dataclasses.replace(setup, weight_cap=weight_cap, min_clients=least)
        self.server = SecAggServer(setup, timeouts=self.timeouts, now=now)
        self._restarted = set()
        self._advertised: dict[str, bytes] = {}  # device -> the cipher key it advertised
        self._round_bytes = 0
        log.info("secure round %d: %d devices, k=%d neighbours, threshold t=%d, %d-bit field",
                 round, len(participants), setup.neighbours, setup.threshold,
                 setup.field_bits)
        return self._publishes(self.server.start())

    def close(self) -> None:
        """Forget the open round (a new one replaces it, or the service stops)."""
        if self.server is not None:
            result = self.server.result
            self._finished[self.server.setup.session] = frozenset(
                result.survivors if result is not None else ())
            while len(self._finished) > REMEMBER_ROUNDS:
                del self._finished[next(iter(self._finished))]
        self.server = None

    def receive(self, device: str, payload: bytes, now: float, *,
                wire_bytes: int = 0) -> Received:
        """A secure-aggregation message on `update/{device}`; `wire_bytes`: what it cost
        on the wire when it came in Parts (0: its own length)."""
        wire_bytes = wire_bytes or len(payload)
        self.bytes_in += wire_bytes
        try:
            message = decode_any(payload, *DEVICE_KINDS)
        except ProtocolError as exc:
            return self._count(Received("rejected", f"secagg_{exc.reason}"))
        input_id = message.input_id if isinstance(message, MaskedInput) else ""
        if message.device_id != device:
            return self._count(Received("rejected", "secagg_wrong_device", input_id=input_id,
                                        round=message.round))
        server = self.server
        if message.session in self._finished:  # a straggler of a round already over
            counted = input_id and device in self._finished[message.session]
            return self._count(Received("accepted" if counted else "rejected",
                                        "secagg_resent" if counted else "secagg_round_closed",
                                        input_id=input_id, round=message.round), kind="late")
        if server is None or message.session != server.setup.session:
            return self._count(Received("rejected", "secagg_wrong_session",
                                        input_id=input_id, round=message.round))
        if device in self._restarted and not isinstance(message, MaskedInput):
            return self._count(Received("rejected", "secagg_restarted"))
        self._round_bytes += wire_bytes  # every message of the round, up
        try:
            handled = server.receive(message, now=now)
        except SecureAggregationError as exc:
            self._lost(exc)
            return self._count(Received("rejected", "secagg_round_lost", input_id=input_id,
                                        round=message.round))
        if isinstance(message, AdvertiseKeys) \
                and self._advertised.setdefault(device, message.cipher_key) != message.cipher_key:
            # other keys than it advertised first: it restarted and lost its secrets; its
            # neighbours hold keys it no longer has, so it must not share under new ones
            self._restarted.add(device)
            log.warning("secure round %d: %s advertised new keys (restarted?); it is left "
                        "out of the round", server.setup.round, device)
        reason = f"secagg_{handled.reason}" if handled.reason else ""
        received = Received(handled.status, reason, self._publishes(handled.outgoing),
                            input_id=input_id, round=message.round)
        self._finish()
        return self._count(received, kind=message.KIND)

    def tick(self, now: float) -> list[Publish]:
        """Close the open stage if its deadline passed."""
        if self.server is None:
            return []
        try:
            out = self._publishes(self.server.tick(now))
        except SecureAggregationError as exc:
            self._lost(exc)
            return []
        self._finish()
        return out

    def take(self) -> SecureSum | SecureAggregationError | None:
        """The finished round's sum, or why it was lost, once; None while it runs."""
        out: SecureSum | SecureAggregationError | None = self.result or self.failure
        self.result = self.failure = None
        return out

    # -- persistence ---------------------------------------------------------------------
    def state_dict(self) -> dict | None:
        """The open round, for the service's checkpoint (None: none open). No device
        secret is in it (SecAggServer.state_dict)."""
        if self.server is None:
            return None
        return {"format": STATE_FORMAT, "setup": self.server.setup.to_payload(),
                "server": self.server.state_dict(), "restarted": sorted(self._restarted),
                "advertised": [[d, k] for d, k in sorted(self._advertised.items())],
                "bytes": self._round_bytes}

    def load_state_dict(self, state: dict | None, *, round: int, now: float) -> bool:
        """Go on with a saved round if it is round `round` and still running; True if so
        (its stage's deadline starts afresh)."""
        if state is None:
            return False
        if state.get("format") != STATE_FORMAT:
            raise ConfigError(f"secure-aggregation checkpoint format {state.get('format')} "
                              f"is not supported (this build reads {STATE_FORMAT})")
        setup = SecAggSetup.from_payload(bytes(state["setup"]))
        if setup.round != round or setup.vector_size != self.size:
            log.warning("the checkpoint's secure round %d is not the open round %d: it "
                        "runs again", setup.round, round)
            return False
        server = SecAggServer(setup, timeouts=self.timeouts, now=now)
        server.load_state_dict(state["server"], now=now)
        if server.stage not in STAGES:
            return False
        self.server = server
        self._restarted = set(state["restarted"])
        self._advertised = {d: bytes(k) for d, k in state["advertised"]}
        self._round_bytes = int(state["bytes"])
        log.info("resumed secure round %d at its %s stage", round, server.stage)
        return True

    # -- helpers -------------------------------------------------------------------------
    def _finish(self) -> None:
        server = self.server
        if server is None or server.result is None:
            return
        setup, result = server.setup, server.result
        try:
            mean, weight, samples = weighted_mean(result.float_sum(setup), clip=setup.clip,
                                                  weight_cap=setup.weight_cap)
        except SecureAggregationError as exc:
            self._lost(exc)
            return
        self.result = SecureSum(round=setup.round, mean=mean, weight=weight, samples=samples,
                                survivors=result.survivors, dropped=result.dropped,
                                excluded=result.excluded, bytes_up=self._round_bytes,
                                total=result.total, session=setup.session)
        self.close()

    def _lost(self, exc: SecureAggregationError) -> None:
        self.failure = exc
        self.close()

    def _publishes(self, outbound: list[Outbound] | tuple[Outbound, ...]) -> tuple[Publish, ...]:
        out = []
        for o in outbound:
            payload = o.message.to_payload()
            if o.to is None:
                out.append(Publish(setup_topic(self.topics), payload, retain=True))
            else:
                out.append(Publish(device_topic(self.topics, o.to), payload))
            self.bytes_out += len(payload)
        return tuple(out)

    def _count(self, received: Received, *, kind: str = "") -> Received:
        self.counts[f"{kind or 'bad'}:{received.status}"] += 1
        return received
