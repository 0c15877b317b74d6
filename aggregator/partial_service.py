"""A worker or site aggregator: PartialRound (partial.py) wired to MQTT and a state file.

It follows the central aggregator's retained announcement, folds the device updates it
takes (a worker: its shard; a site: all on its broker) and sends each sealed partial
aggregate to `partial/{source}`, re-sending it until the central aggregator's receipt
comes back on `receipt/{source}`; then each device gets its receipt. Durability is the
central service's (loop.py): a device's update is acked to the broker, a partial goes
upstream and a device's receipt goes out only once the state holding them is on disk, so
a worker killed at any moment loses nothing it acked and never sends a sum twice under
two ids.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aggregator.config import AggregatorConfig
from aggregator.devices import DeviceRegistry
from aggregator.ingest import Accepted, UpdateIngest, UpdateLimits
from aggregator.loop import WRITER_IDLE, Reply, ServiceLoop
from aggregator.partial import PartialRound, Sealed, Shard
from aggregator.rejections import RejectionLog
from fedmq import storage
from fedmq.core.chunking import split_payload
from fedmq.core.protocol import (
    UPDATE_BUCKETS,
    DeviceStatus,
    FleetTopics,
    ModelAnnouncement,
    Receipt,
)
from fedmq.errors import ConfigError, ProtocolError
from fedmq.models import build_model
from fedmq.transport.mqtt import MqttLink

log = logging.getLogger(__name__)

# A partial without the central aggregator's receipt is sent again after this long (and
# on every reconnect): the central one counts a partial once by its id, so re-sending is
# safe, and it is the only way a partial lost with a broker's queue still arrives.
RESEND_AFTER_S = 15.0


class StateFile:
    """The worker's whole state, written atomically each commit. Small next to the central
    checkpoint (no model, no optimizer), so no journal slots."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def save(self, state: dict[str, Any]) -> None:
        storage.save_state(self.path, state)

    def load(self) -> dict[str, Any] | None:
        return storage.load_state(self.path)

    def close(self) -> None:
        pass


_RECONNECTED = object()


@dataclass(frozen=True, slots=True)
class _Inbound:
    kind: str  # "update", "status", "model", "receipt"
    topic: str
    payload: bytes
    mid: int
    qos: int


class PartialService(ServiceLoop):
    def __init__(self, config: AggregatorConfig, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if config.role not in ("worker", "site"):
            raise ConfigError(f"PartialService runs a worker or site, not role {config.role}")
        self.config = config
        self.topics = FleetTopics(config.fleet)
        self.clock = clock
        self.shard = Shard.parse(config.shard)
        self.source = config.source
        model = build_model(config.model_name, config.model_config(), seed=config.seed)
        self.layout_hash = model.layout.hash
        self.part = PartialRound(source=self.source, size=model.layout.size,
                                 layout_hash=self.layout_hash, policy=config.policy(),
                                 flush_after_s=config.flush_after_s)
        self.registry = DeviceRegistry()
        self.reassembler = config.reassembler()
        self.ingest = UpdateIngest(UpdateLimits.from_config(config), params=model.layout.size,
                                   topics=self.topics, registry=self.registry,
                                   reassembler=self.reassembler, machine=self.part)
        self.rejected: Counter[str] = Counter()
        self.rejections = RejectionLog(self.rejected, log)
        self.folded = 0  # device updates folded in
        self.others = 0  # updates of devices another worker takes, passed over (none
        # arrive while the broker honours the bucket subscriptions)
        self.sent = 0  # partial aggregates published (re-sends included)
        storage.check_writable(config.checkpoint, what="checkpoint")
        self.store = StateFile(config.checkpoint)
        self._init_loop(self.store)  # type: ignore[arg-type]
        self._restore()
        self._sent_at: dict[str, float] = {}  # partial id -> when last published
        self._wrong_model_logged = False
        self.link = MqttLink(
            client_id=config.client_id, broker=config.broker, username=config.username,
            password=config.password, on_connect=self._on_connect, tls=config.tls(),
            max_payload=config.max_payload, session_expiry_s=config.session_expiry_s,
            mqtt_version=config.mqtt_version,
            manual_ack=True)
        # a worker subscribes to its own update buckets only: the broker sends it no other
        # worker's updates. Worker 0 (or the site) also takes topic layout 1's
        # update/{device}, to refuse and count what old devices still send there.
        update_filters = self.shard.update_filters(self.topics)
        if self.shard.index == 0:
            update_filters += (self.topics.legacy_update_filter,)
        for kind, topic_filter in (("status", self.topics.device_status_filter),
                                   ("model", self.topics.model_current),
                                   ("receipt", self.topics.receipt(self.source)),
                                   *(("update", f) for f in update_filters)):
            self.link.route(topic_filter, functools.partial(self._enqueue, kind), qos=1)

    def _enqueue(self, kind: str, message) -> None:
        self._inbox.put(_Inbound(kind, message.topic, message.payload, message.mid,
                                 message.qos))

    def _on_connect(self, session_present: bool) -> None:
        self._inbox.put(_RECONNECTED)

    # -- state ---------------------------------------------------------------------------
    def _restore(self) -> None:
        try:
            state = self.store.load()
        except storage.StateError as exc:
            raise ConfigError(f"state file {self.config.checkpoint}: {exc}; move it away "
                              "to start fresh (partials it held are lost)") from None
        if state is not None:
            self.part.load_state_dict(state["partial"])
            if "bounds" in state:
                self.ingest.bounds.load_state_dict(state["bounds"])
            log.info("%s resumed from %s: %d partial aggregate(s) await the central "
                     "aggregator, %d update(s) folded since the last", self.source,
                     self.config.checkpoint, len(self.part.pending), self.part.open.count)

    def _snapshot(self) -> dict[str, Any]:
        return {"partial": self.part.state_dict(), "bounds": self.ingest.bounds.state_dict()}

    # -- the loop ------------------------------------------------------------------------
    def _process(self, batch: list) -> None:
        now = self.clock()
        for item in batch:
            if item is WRITER_IDLE:
                continue
            if item is _RECONNECTED:  # what the broker lost with its queue goes out again
                self._sent_at.clear()
                continue
            if item.kind == "status":  # acked at once, as the central service does
                self._observe(item.topic, item.payload)
                self.link.ack(item.mid, item.qos)
            elif item.kind == "model":
                self._follow(item.payload, now)
                self.link.ack(item.mid, item.qos)
            elif item.kind == "receipt":
                self._upstream(item.payload)
                self._held.append(functools.partial(self.link.ack, item.mid, item.qos))
            else:
                reply = self._update(item.topic, item.payload, now)
                self._held.append(functools.partial(self._reply, item.mid, item.qos, reply))

    def _observe(self, topic: str, payload: bytes) -> None:
        try:
            device = self.topics.device_from_status_topic(topic)
            if payload:
                self.registry.observe(device, DeviceStatus.from_payload(payload), self.clock())
        except ProtocolError as exc:
            self.rejected[f"status_{exc.reason}"] += 1

    def _follow(self, payload: bytes, now: float) -> None:
        """The central aggregator's announcement: the round and model updates are for."""
        if not payload:
            return
        try:
            announcement = ModelAnnouncement.from_payload(payload)
        except ProtocolError as exc:
            log.warning("%s: unreadable model announcement (%s); still following the last "
                        "one", self.source, exc)
            return
        if announcement.layout_hash != self.layout_hash:
            if not self._wrong_model_logged:
                log.error("%s is configured for model layout %s but the central aggregator "
                          "announces %s (model %s): give both the same task and model",
                          self.source, self.layout_hash, announcement.layout_hash,
                          announcement.model)
                self._wrong_model_logged = True
            return
        if (announcement.round, announcement.version) != (self.part.open.round,
                                                          self.part.open.version):
            log.info("%s: following round %d (model v%d)", self.source, announcement.round,
                     announcement.version)
        sealed = self.part.follow(round=announcement.round, version=announcement.version,
                                  cohort=announcement.asked(), now=now)
        if sealed is not None:
            self._send(sealed)

    def _update(self, topic: str, payload: bytes, now: float) -> Reply:
        try:
            device = self.topics.device_from_update_topic(topic)
        except ProtocolError:
            device = None  # the ingest path refuses and counts it
        if device is not None and not self.shard.owns(device):
            self.others += 1
            return None
        result = self.ingest.receive(topic, payload, now)
        if result is None:
            return None
        if isinstance(result, Accepted):
            if result.counted:
                self.folded += 1
                self._dirty = True
                return None  # its receipt comes when the central aggregator answers
            answer = self.part.answer(result.update.device_id, result.update.update_id)
            return None if answer is None else (result.update.device_id, answer)
        self.rejections.record(result.reason, topic, f"{self.source}: rejected update on "
                               f"{topic} ({result.reason}): {result.message}")
        return result.receipt()

    def _upstream(self, payload: bytes) -> None:
        """The central aggregator's receipt for a partial: pass its verdict down."""
        try:
            receipt = Receipt.from_payload(payload)
        except ProtocolError as exc:
            log.warning("%s: unreadable receipt from the central aggregator (%s)",
                        self.source, exc)
            return
        owed = self.part.receipt(receipt)
        if not owed:
            return
        self._sent_at.pop(receipt.update_id, None)
        self._dirty = True
        if receipt.status != "accepted":
            log.warning("%s: the central aggregator refused partial %s of round %d (%s): "
                        "its %d device update(s) are refused too", self.source,
                        receipt.update_id, receipt.round, receipt.reason or receipt.status,
                        len(owed))
        for device, mine in owed:
            self._held.append(functools.partial(
                self.link.publish, self.topics.receipt(device), mine.to_payload(), qos=1))

    def _send(self, sealed: Sealed) -> None:
        """Publish a sealed partial once the state holding it is on disk: a crash before
        that folds its updates again from their redelivery, under a new partial id."""
        self._dirty = True
        self._sent_at[sealed.update.update_id] = self.clock()
        self._held.append(functools.partial(self._publish, sealed))

    def _publish(self, sealed: Sealed) -> None:
        update = sealed.update
        topic = self.topics.partial(self.source)
        limit = self.link.effective_max_payload(topic)
        for piece in split_payload(update.to_payload(), max_payload=limit):
            self.link.publish(topic, piece, qos=1)
        self.sent += 1
        log.info("%s: sent partial %s of round %d (%d device updates, %d samples)",
                 self.source, update.update_id, update.round, update.represents,
                 update.num_samples)

    def _tick(self) -> None:
        now = self.clock()
        dropped = self.ingest.expire(now) + self.ingest.take_superseded()
        if dropped:
            self.rejected["incomplete"] += dropped
        # Only with updates folded: the fleet's online list is sorted and each id hashed.
        if self.part.open.count and self.part.due(
                now, [d for d in self.registry.online() if self.shard.owns(d)]):
            self._send(self.part.seal(now))
        for update_id, sealed in self.part.pending.items():
            sent = self._sent_at.get(update_id)
            if sent is None or now - sent >= RESEND_AFTER_S:
                if sent is not None:
                    log.info("%s: no receipt for partial %s after %.0f s; sending it again",
                             self.source, update_id, now - sent)
                self._send(sealed)

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        Path(self.config.checkpoint).parent.mkdir(parents=True, exist_ok=True)
        self._start_loop(self.config.role)
        self.link.start()
        log.info("%s %s started (shard %s: %d of %d update buckets), sending partial "
                 "aggregates to %s", self.config.role, self.source, self.config.shard,
                 len(self.shard.buckets), UPDATE_BUCKETS, self.topics.partial(self.source))
        if not self.shard.even:
            log.warning("%d workers do not divide the %d update buckets: some workers take "
                        "one bucket more than others (use a power of two for an even "
                        "split)", self.shard.count, UPDATE_BUCKETS)

    def stop(self) -> None:
        self._stop_loop()
        self.link.stop()
