"""The aggregator service: the round machine wired to MQTT, a checkpoint file and metrics.

paho's thread only enqueues (updates and device statuses alike, in the order they came);
one loop thread owns the round machine and the device registry, so the math never races
with the network and a slow aggregation never stalls keep-alives. Checks live in
ingest.py, round state in rounds.py: this queues, commits and replies.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.broadcast import Messages, ModelBroadcast
from aggregator.checkpoint import CheckpointStore
from aggregator.config import AggregatorConfig
from aggregator.dashboard import DashboardServer
from aggregator.devices import DeviceRegistry
from aggregator.evaluation import EvalPool, fleet_fields
from aggregator.fleetview import serve_dashboard
from aggregator.he_service import HeReply, KeyHolderDriver
from aggregator.ingest import Accepted, Evaluated, UpdateIngest, UpdateLimits
from aggregator.loop import WRITER_IDLE, ServiceLoop
from aggregator.observers import AggregatorObserver, ObserverFanout
from aggregator.records import RoundRecord
from aggregator.rejections import RejectionLog
from aggregator.rounds import Action, RoundMachine, RoundResult
from aggregator.secure_service import SecureAggregationDriver
from aggregator.selection import assign_tasks
from aggregator.strategy.optimizers import create_optimizer
from fedmq import storage
from fedmq.core.layout import LayoutMask
from fedmq.core.protocol import (
    AggregatorStatus,
    DeviceStatus,
    FleetTopics,
    Receipt,
)
from fedmq.errors import ConfigError, DataError, ProtocolError
from fedmq.keyfiles import announcement_sealer
from fedmq.models import build_model
from fedmq.tasks import Dataset, held_out_set
from fedmq.transport.mqtt import MqttLink, Will

log = logging.getLogger(__name__)

# The model's chunk topics are sized for this many chunks: their index is part of the topic,
# which counts against the broker's packet limit. A million chunks is far beyond any model.
MAX_MODEL_CHUNKS = 10**6
_REPUBLISH = object()  # same announcement again: devices ignore it
_REANNOUNCE = object()  # fresh announce_id: devices train on the model again
# A fresh announcement plans its round's cohort from the devices known online, so it waits
# until the retained births its subscription brings are in: the aggregator publishes a
# marker to itself, which the broker delivers after them. If it does not come back (an ACL
# without aggregator/sync) it announces anyway after this long, and says so.
SYNC_WAIT_S = 15.0


@dataclass(frozen=True, slots=True)
class _Synced:
    """The aggregator's marker came back: every retained birth before it is in the inbox."""

    nonce: bytes
    mid: int
    qos: int


@dataclass(frozen=True, slots=True)
class _Inbound:
    """An MQTT message for the loop thread: an update (or one of its Parts) or a status."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    status: bool = False
    partial: bool = False  # on a partial topic: a worker's or site's partial aggregate


class AggregatorService(SecureAggregationDriver, KeyHolderDriver, ServiceLoop):
    def __init__(
        self, config: AggregatorConfig, *, test_data: Dataset | None = None,
        on_round: Callable[[RoundRecord], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        observers: Iterable[AggregatorObserver] = (),
    ) -> None:
        """observers: told what happens (aggregator/observers.py); with metrics_port set,
        the Prometheus exporter is one of them."""
        self.config = config
        self.observers = ObserverFanout(observers)
        if config.metrics_port:
            from aggregator.metrics_export import PrometheusExporter

            self.observers.add(PrometheusExporter(
                port=config.metrics_port, bind=config.metrics_bind,
                info={"fleet": config.fleet, "task": config.task, "model": config.model_name,
                      "mode": config.mode}))
        self.topics = FleetTopics(config.fleet)
        self.clock = clock
        self.on_round = on_round
        self.test_data = test_data
        if test_data is None and config.evaluate:
            self.test_data = held_out_set(config.task, seed=config.seed)
        self.model = build_model(config.model_name, config.model_config(), seed=config.seed)
        self.exporter = None  # ONNX files of every new model, written off the loop thread
        if config.onnx_dir:
            from aggregator.onnx_export import BackgroundExporter, ModelExporter

            self.exporter = BackgroundExporter(
                ModelExporter(config.onnx_dir, keep=config.onnx_keep),
                model=config.model_name, model_config=config.model_config(), task=config.task)
        # Personal layers (personal_layers) never come up: the round machine, its rules,
        # bounds and DP see the shared tensors only; announcements carry the personal ones
        # as initialised, for a device's first round.
        self.mask = LayoutMask(self.model.layout, config.personal_patterns())
        initial = self.model.get_flat()
        self.personal_init = self.mask.take_personal(initial)
        self.machine = RoundMachine(
            params=self.mask.take_shared(initial),
            optimizer=create_optimizer(config.optimizer_config()),
            policy=config.policy(), layout_hash=self.mask.shared.hash, now=clock(),
            seed=config.seed,
        )
        self.evaluations = EvalPool()  # the devices' scores of the current model
        self.evaluated = 0  # evaluation reports taken
        self.history: list[RoundRecord] = []
        # the records as checkpointed, each converted once (not on every commit)
        self._history_state: list[dict[str, Any]] = []
        self.accepted = 0  # updates counted
        self.redelivered = 0  # updates that already counted, seen again (receipted again)
        self.rejected: Counter[str] = Counter()
        self.adjusted: Counter[str] = Counter()  # updates folded in clipped or capped
        self.limits = UpdateLimits.from_config(config)
        self.bounds = self.limits.bounds()  # learnt from accepted updates, checkpointed
        self.reassembler = config.reassembler()  # updates that arrive in Parts
        self.model_bytes = 0
        # Paths it will write, checked now: not a traceback at the first round's save.
        storage.check_writable(config.checkpoint, what="checkpoint")
        if config.metrics:
            storage.check_writable(config.metrics, what="metrics")
        if config.onnx_dir:
            storage.check_writable(config.onnx_dir, what="onnx_dir", directory=True)
        self.store = CheckpointStore(config.checkpoint)
        self._init_loop(self.store, on_saved=self.observers.checkpoint_saved)
        self._saved_secagg = None  # the checkpoint's open secure round, restored below
        self._restore()
        self._round_started = time.monotonic()
        self.link = MqttLink(
            client_id=config.client_id, broker=config.broker, username=config.username,
            password=config.password, on_connect=self._on_connect, tls=config.tls(),
            will=Will(self.topics.aggregator_status, AggregatorStatus(online=False).to_payload()),
            max_payload=config.max_payload, session_expiry_s=config.session_expiry_s,
            mqtt_version=config.mqtt_version,
            manual_ack=True,
        )
        if config.role == "central":  # a reducer's workers take the devices' updates
            # every bucket, and topic layout 1's update/{device} to refuse it (old_topic)
            for topic_filter in (self.topics.update_filter, self.topics.legacy_update_filter):
                self.link.route(topic_filter, lambda m: self._inbox.put(
                    _Inbound(m.topic, m.payload, m.mid, m.qos)), qos=1)
        if config.sources():
            self.link.route(self.topics.partial_filter, lambda m: self._inbox.put(
                _Inbound(m.topic, m.payload, m.mid, m.qos, partial=True)), qos=1)
        self.registry = DeviceRegistry()  # births and Last Wills, applied on the loop thread
        self.ingest = UpdateIngest(self.limits, params=self.mask.shared.size,
                                   topics=self.topics, registry=self.registry,
                                   reassembler=self.reassembler, machine=self.machine,
                                   bounds=self.bounds, evaluations=self.evaluations,
                                   evaluate_fraction=config.evaluate_fraction)
        # counted per reason, logged sparingly
        self.rejections = RejectionLog(self.rejected, log,
                                       on_count=self.observers.update_rejected)
        self.adjustments = RejectionLog(self.adjusted, log)  # the same, for clips and caps
        self._init_secure(self._saved_secagg)  # secure_aggregation (secure_service.py)
        self._init_keyholder()  # he_decrypt = keyholder (he_service.py)
        self._route_keyholder(self._inbox.put)
        self.broadcast = ModelBroadcast(
            topics=self.topics, seal=announcement_sealer(config.signing_key),  # signed if set
            model_codec=config.model_codec, delta_codec=config.model_delta_codec,
            seed=config.seed)
        self.link.route(self.topics.device_status_filter, lambda m: self._inbox.put(
            _Inbound(m.topic, m.payload, m.mid, m.qos, status=True)), qos=1)
        # QoS 1, as the births are: a QoS 0 marker would overtake births the broker still
        # holds back behind its in-flight window.
        self.link.route(self.topics.aggregator_sync, lambda m: self._inbox.put(
            _Synced(m.payload, m.mid, m.qos)), qos=1)
        self._sync: tuple[bytes, float] | None = None  # the marker awaited, and until when
        self.dashboard: DashboardServer | None = None  # with dashboard_port, once started
        # Until the retained births are in (the first marker came back), an update from a
        # device the registry does not know waits here: a restarted aggregator's session
        # hands it the updates queued while it was away before the births its new
        # subscription brings, and they must not be taken for a stranger's.
        self._births_in = False
        self._parked: list[_Inbound] = []

    def _on_connect(self, session_present: bool) -> None:
        """Re-announce on every connect. Without a session, updates sent while we were away
        are gone: a fresh announcement makes devices train again (duplicates are refused).
        The first connect of this process waits for the births in any case."""
        self._inbox.put(_REPUBLISH if session_present and self._births_in else _REANNOUNCE)

    def _handle_status(self, topic: str, payload: bytes) -> None:
        """A birth or Last Will, in its place among the updates: a device's last update
        before it stops is handled before its offline status."""
        try:
            device = self.topics.device_from_status_topic(topic)
            if payload:  # an empty retained message only clears a status
                info = self.registry.observe(device, DeviceStatus.from_payload(payload),
                                             self.clock())
                self.observers.device_seen(info, online=self.registry.online_count,
                                           known=len(self.registry.devices))
                if info.online:
                    self.ingest.device_online(device)
                if log.isEnabledFor(logging.DEBUG):  # counting is O(fleet): 10,000 births
                    log.debug("device %s is %s (%d online)", device,
                              "online" if info.online else "offline",
                              len(self.registry.online()))
        except ProtocolError as exc:
            self._count_rejected(f"status_{exc.reason}")
            log.warning("rejected status on %s (%s): %s", topic, exc.reason, exc)

    def _count_rejected(self, reason: str, count: int = 1) -> None:
        """Rejections the RejectionLog does not count (it logs each itself)."""
        self.rejected[reason] += count
        self.observers.update_rejected(reason, count)

    # -- state ---------------------------------------------------------------------------
    def _restore(self) -> None:
        try:
            state = self.store.load()
        except storage.StateError as exc:
            raise ConfigError(f"checkpoint {self.config.checkpoint}: {exc}; move it (and the "
                              "FILE.* files beside it) away to start fresh") from None
        if state is None:
            self.lineage = secrets.token_hex(6)  # a new line of models (see ModelAnnouncement)
            return
        # A checkpoint from before lineages continues the line its devices know as "".
        self.lineage = state.get("lineage", "")
        self.machine.load_state_dict(state["machine"], now=self.clock())
        if state.get("bounds") is not None:  # older checkpoints: learnt afresh
            self.bounds.load_state_dict(state["bounds"])
        self.history = [RoundRecord.from_dict(r) for r in state.get("history", [])]
        self._history_state = [r.to_dict() for r in self.history]
        if state.get("evaluations") is not None:  # older checkpoints: reports lost
            self.evaluations.load_state_dict(state["evaluations"])
        self._saved_secagg = state.get("secagg")
        log.info("resumed from %s at round %d (model v%d)", self.config.checkpoint,
                 self.machine.round, self.machine.version)
        if self.machine.stopped:
            log.warning("resumed with training stopped: %s", self.machine.stopped)
        if self.machine.policy.dp is not None and self.machine.plain_releases:
            log.warning("%d of the %d models in %s were released without DP noise: the "
                        "epsilon reported is infinite; start from a fresh checkpoint for a "
                        "private run", self.machine.plain_releases, self.machine.version,
                        self.config.checkpoint)
        if self._done():
            self.finished.set()

    def _snapshot(self) -> dict:
        """The state to checkpoint; state_dict copies what the loop changes in place (a
        robust rule's kept updates are shared: they are only ever appended to), so the
        loop may go on."""
        state = {"machine": self.machine.state_dict(), "lineage": self.lineage,
                 "history": list(self._history_state),
                 "bounds": self.bounds.state_dict(),
                 "evaluations": self.evaluations.state_dict()}
        if self.secure is not None:
            state["secagg"] = self.secure.state_dict()
        return state

    def _done(self) -> bool:
        return ((self.config.rounds > 0 and self.machine.version >= self.config.rounds)
                or bool(self.machine.stopped))

    # -- publishing ----------------------------------------------------------------------
    def _announcement(self) -> Messages:
        """The current model's messages (see ModelBroadcast): encoded, with this round's
        cohort planned, but not yet published."""
        m = self.machine
        limit = self.link.effective_max_payload(
            self.topics.model_payload_chunk(MAX_MODEL_CHUNKS - 1))
        return self.broadcast.messages(params=self.full_params(), version=m.version,
                                       round=m.round, limit=limit,
                                       fields=self._announcement_fields)

    def _announce(self, messages: Messages | None = None) -> None:
        """Publish the current model (`messages`, built by `_announcement` ahead of time, or
        built now) and the aggregator's status."""
        m = self.machine
        if messages is None:
            messages = self._announcement()
        for topic, payload in messages:
            self.link.publish(topic, payload, retain=True)
        self.model_bytes = sum(len(payload) for _, payload in messages)
        status = AggregatorStatus(online=True, round=m.round, version=m.version,
                                  ts=time.time()).to_payload()
        self.link.publish(self.topics.aggregator_status, status, retain=True)
        self.observers.traffic(direction="out", kind="model", nbytes=self.model_bytes)
        self.observers.traffic(direction="out", kind="status", nbytes=len(status))
        self.observers.announced(round=m.round, version=m.version, model_bytes=self.model_bytes)
        log.info("announced model v%d for round %d (%d bytes in %d messages)", m.version,
                 m.round, self.model_bytes, len(messages))
        if self.secure is not None:
            self._open_secure_round()

    def full_params(self) -> np.ndarray:
        """The global model: the machine's shared tensors with the personal ones as
        initialised (the machine's own vector when nothing is personal)."""
        params = self.machine.params
        if not self.mask.patterns:
            return params
        return self.mask.merge(shared=params, personal=self.personal_init)

    def _announcement_fields(self) -> dict:
        """What an announcement of this round says besides the model: the model's shape,
        the task, and who is asked to train (planned now)."""
        c = self.config
        cohort, tiers, assign = self._plan_round()
        return dict(fleet=c.fleet, model=c.model_name, model_config=c.model_config(),
                    layout=self.model.layout.to_wire(), layout_hash=self.model.layout.hash,
                    task=c.task_config(self.machine.round), cohort=cohort, tiers=tiers,
                    assign=assign,
                    lineage=self.lineage, evaluate=c.evaluate_fraction,
                    personal=self.mask.patterns, finetune_steps=c.finetune_steps,
                    finetune_lr=c.finetune_lr, finetune_check=c.finetune_check,
                    personal_steps=c.personal_steps)

    def _plan_round(self) -> tuple[list[str] | None, list, dict[str, int]]:
        """The cohort the machine asks in this announcement (from the devices online) and
        the devices' task tiers."""
        m, c = self.machine, self.config
        if self._done():
            # The final model: announced for devices to hold, asked of nobody (training on
            # it would upload updates no round will ever count).
            self.ingest.plan_reassembly(())
            return [], [], {}
        online = self.registry.online()
        asked_before = m.cohort.size(m.round)
        cohort = m.plan(online)
        self._plan_secure(m.round, online if cohort is None else cohort)
        self.ingest.plan_reassembly(online if m.cohort.asked is None else m.cohort.asked)
        if cohort is not None:
            log.info("round %d: selected %d of %d online devices%s", m.round, len(cohort),
                     len(online), f" ({asked_before} asked before)" if asked_before else "")
        devices = {d: self.registry.devices[d].capabilities for d in (cohort or online)}
        tiers, assign = assign_tasks(c.task_config(m.round), devices, c.assignment_policy())
        return cohort, tiers, assign

    # -- the loop ------------------------------------------------------------------------
    def _handle_update(self, topic: str, payload: bytes, *,
                       partial: bool = False) -> tuple[str, Receipt] | None:
        """An update (or one of its Parts; `partial`: a worker's or site's partial
        aggregate) through the ingest path: the receipt owed to its sender, or None (more
        parts to come, or a payload no device can be held to: garbage, or an update on
        another device's topic)."""
        result = self.ingest.receive(topic, payload, self.clock(), partial=partial)
        if result is None:
            return None
        if isinstance(result, Evaluated):  # no receipt: fire and forget
            self.evaluated += 1
            self._dirty = True  # acked once the pool holding it is on disk
            self.observers.evaluation_accepted(result.report)
            return None
        update = result.update
        if not isinstance(result, Accepted):
            self.rejections.record(result.reason, topic,
                                   f"rejected update on {topic} ({result.reason}): "
                                   f"{result.message}")
            return result.receipt()
        for what, message in result.notes:
            self.adjustments.record(what, topic, message)
        self.observers.update_accepted(device_id=update.device_id, round=update.round,
                                       counted=result.counted)
        if result.counted:
            self.accepted += 1
            self._dirty = True
            log.debug("accepted update %s from %s for round %d", update.update_id,
                      update.device_id, update.round)
        else:
            self.redelivered += 1
        return update.device_id, Receipt(update_id=update.update_id, round=update.round,
                                         status="accepted")

    def _process(self, batch: list) -> None:
        """Fold a batch in, holding its acks and receipts for the next commit.

        Nothing is acknowledged to the broker, nor receipted to a device, before the
        checkpoint holding it is on disk: after a crash the broker redelivers whatever we
        had not acked, and devices re-send whatever has no receipt.
        """
        for item in batch:
            if item is _REANNOUNCE:
                self._await_births()
            elif isinstance(item, _Synced):
                self.link.ack(item.mid, item.qos)
                if self._sync is not None and item.nonce == self._sync[0]:
                    self._synced()
            elif item is _REPUBLISH:
                self._announce()
            elif isinstance(item, HeReply):
                self._handle_keyholder(item, self.clock())
            elif item is WRITER_IDLE:
                pass
            elif item.status:
                # Acked at once: the registry is not checkpointed (after a restart the
                # retained births come again), so nothing waits for a write; and births
                # acked late would hold the broker's in-flight window for a whole fleet.
                self.observers.traffic(direction="in", kind="status", nbytes=len(item.payload))
                self._handle_status(item.topic, item.payload)
                self.link.ack(item.mid, item.qos)
            elif not self._births_in and self._from_stranger(item.topic):
                self._parked.append(item)  # acked once handled, after the births
            elif self.secure is not None and not item.partial:
                self.observers.traffic(direction="in", kind="update", nbytes=len(item.payload))
                reply = self._handle_secure(item.topic, item.payload)
                self._held.append(functools.partial(self._reply, item.mid, item.qos, reply))
            else:
                self.observers.traffic(direction="in", kind="update", nbytes=len(item.payload))
                reply = self._handle_update(item.topic, item.payload, partial=item.partial)
                self._held.append(functools.partial(self._reply, item.mid, item.qos, reply))

    def _from_stranger(self, topic: str) -> bool:
        try:
            return not self.registry.known(self.topics.device_from_update_topic(topic))
        except ProtocolError:
            return False  # no device at all: refused as it is

    def _synced(self) -> None:
        """The births are in (or SYNC_WAIT_S passed): announce afresh, and handle the
        updates that waited for them, in the order they came."""
        self._sync = None
        self._births_in = True
        parked, self._parked = self._parked, []
        if parked:
            log.info("handling %d update(s) that came before their devices' births",
                     len(parked))
            self._process(parked)
        self.broadcast.forget()
        self._announce()

    def _await_births(self) -> None:
        """Announce afresh once the retained births are in (see SYNC_WAIT_S)."""
        self.link.subscribed.wait(SYNC_WAIT_S)
        nonce = os.urandom(8)
        self._sync = (nonce, self.clock() + SYNC_WAIT_S)
        self.link.publish(self.topics.aggregator_sync, nonce, qos=1, retain=False)

    def _receipt_sent(self, nbytes: int) -> None:
        self.observers.traffic(direction="out", kind="receipt", nbytes=nbytes)

    def _tick(self) -> None:
        now = self.clock()
        dropped = self.ingest.expire(now)
        if dropped:
            self._count_rejected("incomplete", dropped)
            log.warning("dropped %d chunked update(s) that got no new part for %.0f s",
                        dropped, self.reassembler.timeout_s)
        superseded = self.ingest.take_superseded()
        if superseded:  # incomplete too: whether it expired first is a matter of timing
            self._count_rejected("incomplete", superseded)
            log.info("dropped %d incomplete chunked update(s) for a newer transfer from the "
                     "same device, or for the room the round's devices need", superseded)
        if self._sync is not None and now > self._sync[1]:
            log.warning("no echo on %s within %.0f s: announcing without waiting for the "
                        "devices' births (the broker's ACL should let the aggregator read and "
                        "write it)", self.topics.aggregator_sync, SYNC_WAIT_S)
            self._synced()
        if self.finished.is_set():
            return
        if self.secure is not None:
            self._tick_secure(now)
            return
        action = self.machine.due(now)
        if self.he_remote and self._tick_keyholder(now, action is Action.CLOSE):
            return  # the round's sum is with the key holder
        if action is Action.CLOSE:
            self._close_round(now)
        elif action is Action.EXTEND:
            log.warning("round %d: only %d of %d updates by the deadline; extending",
                        self.machine.round, self.machine.open.count,
                        self.config.min_updates)
            if self.machine.extend(now):  # ask more devices: the cohort may be gone
                self.broadcast.forget()
            # Announced again either way: fresh for a new cohort, else the same bytes
            # (devices ignore repeats) for a device whose broker lost the retained model
            # or its delivery (seen on a loaded NATS cluster: "unable to store retained
            # message ... timeout").
            self._announce()
        elif action is Action.RERUN:
            kept = self.machine.rerun(now)
            log.warning("round %d had only %d of %d updates by the deadline; re-announced the "
                        "model as round %d, keeping them", self.machine.round - 1, kept,
                        self.config.min_updates, self.machine.round)
            self._announce()

    def _close_round(self, now: float) -> None:
        result: RoundResult = self.machine.close(now)
        if result.refused and result.stopped:  # the budget: nothing drawn, nothing released
            self._stop_training(result.stopped)
            return
        if result.refused:
            self._refuse_round(result)
            return
        dp = self.machine.policy.dp
        accuracy = test_loss = top3 = None
        fleet = self.evaluations.close(result.version - 1)  # the model it trained from
        if self.test_data is not None:
            self.model.set_flat(self.full_params())
            try:
                ev = self.model.evaluate(self.test_data.x, self.test_data.y)
                accuracy, test_loss, top3 = ev.accuracy, ev.loss, ev.top3
            except DataError as exc:  # a user task's evaluate(): the round still counts
                log.error("round %d: evaluating the new model failed: %s; the round is "
                          "recorded without test metrics", result.round, exc)
        record = RoundRecord(
            round=result.round, version=result.version, accuracy=accuracy, loss=test_loss,
            train_loss=result.train_loss, participants=result.participants,
            samples=result.samples, bytes_up=result.bytes_up, model_bytes=self.model_bytes,
            wall_s=time.monotonic() - self._round_started, stale=result.stale,
            partial=result.partial,
            cohort=result.cohort,
            top3=top3, epsilon=self.machine.epsilon() if dp else None,
            stopped=result.stopped, lr=self.config.round_lr(result.round),
            **fleet_fields(fleet),
        )
        self.history.append(record)
        self._history_state.append(record.to_dict())
        # The closed round is on disk before its model goes out: a model a restart would
        # close (and, under DP, noise) a second time must never be released. The model's
        # messages are encoded (and the next cohort planned) while the writer fsyncs: the
        # snapshot is already taken, and a round of ~10 ms would otherwise wait for both.
        self._checkpoint()
        announcement = self._announcement()
        if not self._written():
            log.error("round %d closed but could not be saved; its model is not announced "
                      "(a restart closes the round again)", result.round)
            return
        if self.config.metrics:
            try:
                with open(self.config.metrics, "a") as fh:
                    fh.write(record.to_json() + "\n")
            except OSError as exc:  # a full disk loses a metrics line, never the round
                log.error("round %d's line could not be appended to metrics %s: %s",
                          result.round, self.config.metrics, exc.strerror or exc)
        log.info("round %d closed: %d updates, %d samples, train loss %.4f%s%s%s",
                 result.round, result.participants, result.samples, result.train_loss,
                 f", test accuracy {accuracy:.4f}" if accuracy is not None else "",
                 f", fleet accuracy {fleet.accuracy:.4f} of v{fleet.version} on "
                 f"{fleet.devices} devices" if fleet and fleet.accuracy is not None else "",
                 f", DP epsilon {record.epsilon:.2f} at delta {dp.delta:g}" if dp else "")
        self._round_started = time.monotonic()
        self._announce(announcement)
        if self.exporter is not None:
            self.exporter.submit(self.full_params(), version=result.version,
                                 round=result.round)
        self.observers.round_closed(record)
        if result.stopped:
            self._stop_training(result.stopped, announced=True)
        if self._done():
            self.finished.set()
        if self.on_round is not None:
            self.on_round(record)

    def _stop_training(self, reason: str, *, announced: bool = False) -> None:
        """The privacy budget allows no further round: the last model stays announced,
        asking nobody to train, and the service says why and finishes."""
        log.warning("training stopped: %s. Model v%d is final; raise dp_target_epsilon "
                    "(and restart from this checkpoint) to train on", reason,
                    self.machine.version)
        if not announced:
            self._checkpoint(wait=True)
            self.broadcast.forget()
            self._announce()  # the final model again, with an empty cohort
        self.finished.set()

    @property
    def stopped(self) -> str:
        """Why training stopped before its rounds were done ('': it did not)."""
        return self.machine.stopped

    def _refuse_round(self, result: RoundResult) -> None:
        """The guard refused the round's model: it is never published; the devices train
        the last good model again, in a new round."""
        m = self.machine
        log.error("round %d refused: %s. Its %d updates are dropped and model v%d stays; "
                  "the devices train it again as round %d (%d round(s) refused so far; if "
                  "honest rounds are refused, raise max_model_growth)", result.round,
                  result.refused, result.participants, m.version, m.round, m.refused)
        # the round's end is on disk before it is re-announced, as a closed round's is
        if not self._checkpoint(wait=True):
            log.error("round %d was refused but the new round could not be saved; not "
                      "announced", result.round)
            return
        self._round_started = time.monotonic()
        self.broadcast.forget()  # a fresh announcement: devices train the same model again
        self._announce()

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        if self.config.dashboard_port:  # first: a port in use stops us before we connect
            self.dashboard = serve_dashboard(self)
        Path(self.config.checkpoint).parent.mkdir(parents=True, exist_ok=True)
        self.observers.start()  # a metrics port in use fails here, before anything runs
        if self.exporter is not None:  # devices can predict with the model we start from
            m = self.machine
            self.exporter.submit(self.full_params(), version=m.version, round=m.round)
        self._start_loop("aggregator")
        self.link.start()

    def stop(self) -> None:
        self._stop_loop()
        if self.exporter is not None:
            self.exporter.close(timeout=30)
        offline = AggregatorStatus(online=False, round=self.machine.round,
                                   version=self.machine.version, ts=time.time())
        self.link.stop(final=(self.topics.aggregator_status, offline.to_payload()))
        if self.dashboard is not None:
            self.dashboard.stop()
        self.observers.close()
