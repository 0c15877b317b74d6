"""Secure aggregation (SecAgg+) in the aggregator service: what the service does with
`secure_aggregation = true`, kept out of service.py (which calls these at a handful of
hooks). The round's protocol is aggregator/secure_round.py's; this opens one per
announced round, feeds it the loop's messages and ticks, and turns its result into the
round machine's close (or a re-run when the round was lost).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from aggregator.secure_round import MIN_DEVICES, Publish, SecureRounds, SecureSum, is_secagg
from fedmq.core.protocol import Receipt, Update
from fedmq.errors import ConfigError, ProtocolError

if TYPE_CHECKING:
    from aggregator.config import AggregatorConfig
    from aggregator.devices import DeviceRegistry
    from aggregator.ingest import UpdateIngest
    from aggregator.observers import ObserverFanout
    from aggregator.rounds import RoundMachine
    from fedmq.core.protocol import FleetTopics
    from fedmq.transport.mqtt import MqttLink

log = logging.getLogger(__name__)

# A round that found too few devices online starts again at most this often once enough
# are: a secure round needs its cohort before the devices train.
SECURE_RETRY_S = 5.0


class SecureAggregationDriver:
    """Mixed into AggregatorService; inert unless config.secure_aggregation. Uses the
    service's `_announce`, `_close_round`, `_count_rejected` and `_done`."""

    clock: Callable[[], float]
    observers: ObserverFanout
    config: AggregatorConfig
    machine: RoundMachine
    registry: DeviceRegistry
    ingest: UpdateIngest
    topics: FleetTopics
    link: MqttLink
    accepted: int
    _dirty: bool
    _births_in: bool

    def _init_secure(self, saved: dict[str, Any] | None) -> None:
        self.secure: SecureRounds | None = None
        self._secure_plan: tuple[int, list[str]] | None = None  # round, devices planned
        self._secure_retry_at = 0.0
        self.secure_sums: deque[SecureSum] = deque(maxlen=8)  # the last rounds' sums
        if self.config.secure_aggregation:
            self.secure = SecureRounds(self.config, topics=self.topics,
                                       params=self.machine.params.size)
            self.secure.load_state_dict(saved, round=self.machine.round, now=self.clock())

    def _plan_secure(self, round: int, devices: list[str]) -> None:
        """The devices an announcement of `round` asks: the secure round's participants."""
        self._secure_plan = (round, list(devices))

    def _open_secure_round(self) -> None:
        """Start the announced round's SecAgg+ round over the devices it asked."""
        m, secure = self.machine, self.secure
        assert secure is not None
        if self._done() or secure.round == m.round or self._secure_plan is None:
            return  # the same round announced again: its secure round goes on
        round_no, devices = self._secure_plan
        if round_no != m.round:
            return
        if len(devices) < max(MIN_DEVICES, self.config.min_updates):
            log.info("round %d: %d device(s) online, a secure round needs %d; waiting "
                     "(the round runs again after deadline_s)", m.round, len(devices),
                     max(MIN_DEVICES, self.config.min_updates))
            secure.close()
            return
        cap = self.config.secagg_weight_cap or self._weight_cap(devices)
        try:
            publishes = secure.open(m.round, devices, weight_cap=cap, now=self.clock())
        except ConfigError as exc:
            log.error("round %d: cannot start a secure round: %s", m.round, exc)
            return
        self._publish_secure(publishes)

    def _weight_cap(self, devices: list[str]) -> int:
        """The largest examples x epochs the devices declared in their births."""
        declared = [int(self.registry.devices[d].capabilities.get("examples", 0) or 0)
                    for d in devices if d in self.registry.devices]
        return max(1, max(declared, default=0) * self.config.epochs) if any(declared) else 0

    def _publish_secure(self, publishes: Iterable[Publish]) -> None:
        for p in publishes:
            self.link.publish(p.topic, p.payload, qos=1, retain=p.retain)
            self.observers.traffic(direction="out", kind="secagg", nbytes=len(p.payload))

    def _handle_secure(self, topic: str, payload: bytes) -> tuple[str, Receipt] | None:
        """A message on an update topic in secure mode: a SecAgg+ message goes to the
        secure round; a plain update is refused unread (it would show the server one
        device's update), with a receipt so its device stops sending it. A message too
        big for one MQTT message (a big model's masked input) comes in Parts, reassembled
        by the plain path's Reassembler, budget and fair shares (ingest.unchunk)."""
        try:
            device = self.topics.device_from_update_topic(topic)
            whole = self.ingest.unchunk(device, payload, self.clock())
        except ProtocolError as exc:
            self._count_rejected(exc.reason)
            return None
        if whole is None:
            return None  # a Part: more are to come
        payload = whole.payload
        if not is_secagg(payload):
            self._count_rejected("secure_only")
            log.warning("refused a plain update from %s: this aggregator runs "
                        "secure_aggregation; set secure_aggregation on the device", device)
            try:
                update_id = Update.from_payload(payload).update_id
            except ProtocolError:
                return None
            return device, Receipt(update_id=update_id, round=self.machine.round,
                                   status="rejected", reason="secure_only")
        assert self.secure is not None
        received = self.secure.receive(device, payload, self.clock(),
                                       wire_bytes=whole.wire_bytes)
        if received.input_id and received.status == "accepted":
            self.ingest.delivered(device)  # its share of the reassembly budget is free
        self._publish_secure(received.publishes)
        if received.reason == "secagg_round_closed":
            log.debug("secure round over: a late message from %s", device)
        elif received.status != "accepted":
            self._count_rejected(received.reason or received.status)
        elif not received.reason:
            self._dirty = True  # the secure round's state changed: checkpointed
        self._after_secure(self.clock())
        if not received.input_id:
            return None
        return device, Receipt(update_id=received.input_id, round=received.round,
                               status=received.status,
                               reason="" if received.status == "accepted" else received.reason)

    def _tick_secure(self, now: float) -> None:
        assert self.secure is not None
        self._publish_secure(self.secure.tick(now))
        self._after_secure(now)
        if self.secure.active or self._done() or not self._births_in:
            return
        # No secure round could start (too few devices online): run the round again at
        # its deadline, or as soon as enough devices are online (every few seconds at most)
        enough = self.registry.online_count >= max(MIN_DEVICES, self.config.min_updates)
        if now >= self.machine.open.deadline_at or (enough and now >= self._secure_retry_at):
            self._secure_retry_at = now + SECURE_RETRY_S
            self.machine.rerun(now)
            log.log(logging.INFO if enough else logging.WARNING,
                    "round %d: no secure round ran; re-announced as round %d (%d devices "
                    "online, a secure round needs %d)", self.machine.round - 1,
                    self.machine.round, self.registry.online_count,
                    max(MIN_DEVICES, self.config.min_updates))
            self._announce()

    def _after_secure(self, now: float) -> None:
        """Fold a finished secure round in (and close the round), or run a lost one again."""
        assert self.secure is not None
        outcome = self.secure.take()
        if outcome is None:
            return
        if isinstance(outcome, SecureSum):
            log.info("secure round %d: the sum of %d inputs unmasked (%d dropped after "
                     "sharing, %d excluded)", outcome.round, len(outcome.survivors),
                     len(outcome.dropped), len(outcome.excluded))
            self.machine.offer_sum(outcome.mean, weight=outcome.weight,
                                   devices=outcome.survivors, samples=outcome.samples,
                                   session=f"sa-{outcome.session.hex()}",
                                   bytes_up=outcome.bytes_up)
            self.accepted += len(outcome.survivors)
            self.secure_sums.append(outcome)
            self._close_round(now)
            return
        self._count_rejected(f"secagg_{outcome.reason}")
        log.error("secure round %d lost: %s; running the round again", self.machine.round,
                  outcome)
        self.machine.rerun(now)
        self._announce()
