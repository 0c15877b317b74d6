"""The edge agent: receive the global model, train on local data, publish the delta.

`LocalTrainer` is the pure part (model in, Update out) and is tested without a broker;
`EdgeAgent` wires it to MQTT and runs training on its own thread so the network loop
keeps answering pings while a device trains.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import platform
import threading
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_agent.config import AgentConfig
from edge_agent.outbox import Outbox, Pending
from fedmq import __version__, storage
from fedmq.core import codecs
from fedmq.core.chunking import split_payload
from fedmq.core.protocol import (
    DeviceStatus,
    FleetTopics,
    ModelAnnouncement,
    ModelChunk,
    Receipt,
    TaskConfig,
    Update,
)
from fedmq.core.transfer import DELTA, FULL, ModelReceiver, ReceivedModel
from fedmq.errors import DataError, FedmqError, ProtocolError
from fedmq.keyfiles import opener_for_config
from fedmq.models import Model, build_model
from fedmq.tasks import Dataset
from fedmq.transport.mqtt import MqttLink, Will

log = logging.getLogger(__name__)
# How often the training thread looks for updates whose receipt is overdue.
RESEND_CHECK_S = 1.0
# A new model re-sends unreceipted updates at once, but only those sent at least this long
# ago: a receipt normally follows within a checkpoint write, and in async mode models
# arrive many times a second; re-sending what is still in flight would flood the broker.
RESEND_ON_MODEL_AFTER_S = 5.0
# How long a round waits for a fresh read of a live data source before it trains on the
# last good data (the read goes on and serves a later round).
RELOAD_WAIT_S = 10.0


def device_capabilities(config: AgentConfig | None = None) -> dict[str, object]:
    """What the aggregator may use to assign work: cores, memory, link, backend, codecs."""
    try:
        ram_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)
    except (ValueError, OSError, AttributeError):
        ram_mb = 0
    backends = ["numpy"] + (["torch"] if importlib.util.find_spec("torch") else [])
    return {"cpus": os.cpu_count() or 1, "ram_mb": int(ram_mb), "backends": backends,
            "codecs": codecs.codec_names(), "zstd": codecs.lossless.zstd_available(),
            "arch": platform.machine(), "python": platform.python_version(),
            **_advertised(config)}


def _advertised(config: AgentConfig | None) -> dict[str, object]:
    """What only the operator knows (link, battery, a core budget), from the config."""
    if config is None:
        return {}
    out: dict[str, object] = {"battery": config.on_battery}
    if config.link_kbps > 0:
        out["link_kbps"] = config.link_kbps
    if config.cpus > 0:
        out["cpus"] = config.cpus
    return out


class LocalTrainer:
    """Trains the received global model on this device's data and builds the Update.

    With an error-feedback codec the residual the codec dropped is kept here and, when
    `state_path` is set, saved atomically after every update so a reboot does not lose it.

    `update_transform`, when given, rewrites each delta before it is encoded: how a
    simulated attacker sends a poisoned (yet well-formed) update.
    """

    def __init__(self, *, device_id: str, data: Dataset, codec: str, seed: int,
                 state_path: str | Path | None = None, slowdown: float = 1.0,
                 threads: int = 1, reload: Callable[[], Dataset] | None = None,
                 update_transform: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        if len(data) == 0:
            raise FedmqError(f"device {device_id} has no training data")
        # A live source (reload) is read again before every round, on its own thread: a
        # failed read keeps the last good data, and a read still going after
        # RELOAD_WAIT_S (a hung sensor) is left to finish for a later round. A sensor
        # hiccup costs freshness, never a round, and never blocks stop().
        self.reload = reload
        self.reload_wait_s = RELOAD_WAIT_S
        self.reloads = self.reload_failures = 0
        self._read: _Read | None = None  # the read in flight, if any
        self.codec = codec
        self.spec = codecs.get_codec(codec)  # fail at start-up, not mid-round
        self.device_id = device_id
        self.data = data
        self.seed = seed
        # One residual, whatever codec the server assigns: what was not sent is owed
        # regardless of how the next delta is compressed.
        self.feedback = codecs.ErrorFeedback(self.spec)
        self.state_path = Path(state_path) if state_path else None
        if self.state_path is not None:
            state = storage.load_state(self.state_path)
            if state is not None:
                self.feedback.load_state_dict(state.get("feedback", {}))
        self._model: Model | None = None
        self._model_key: tuple | None = None
        if not slowdown >= 1.0:
            raise FedmqError(f"slowdown {slowdown} must be >= 1 (1: the host's own speed)")
        self.slowdown = slowdown
        self.threads = max(1, threads)  # the device's budget, whatever the model config says
        self.halt = threading.Event()  # cuts a simulated slow device's wait short on stop
        self.update_transform = update_transform

    def _model_for(self, a: ModelAnnouncement) -> Model:
        key = (a.model, tuple(sorted(a.model_config.items())))
        if key != self._model_key:
            self._model = build_model(a.model, dict(a.model_config))
            self._model_key = key
            if hasattr(self._model, "threads"):
                self._model.threads = self.threads
        assert self._model is not None
        if self._model.layout.hash != a.layout_hash:
            raise ProtocolError(
                f"model v{a.version} layout {a.layout_hash} does not match the local build of "
                f"{a.model} ({self._model.layout.hash}); upgrade this agent", reason="bad_layout")
        return self._model

    def _encode(self, delta: np.ndarray, codec: str, rng: np.random.Generator):
        """Encode with the assigned codec (or ours); error feedback carries the residual."""
        spec = codecs.get_codec(codec) if codec else self.spec
        if not spec.error_feedback:
            return codecs.encode(delta, spec, rng=rng)
        self.feedback.spec = spec
        encoded = self.feedback.encode(delta, rng=rng)
        if self.state_path is not None:
            storage.save_state(self.state_path, {"feedback": self.feedback.state_dict()})
        return encoded

    def _refresh_data(self) -> None:
        if self.reload is None:
            return
        if self._read is None:
            self._read = _Read(self.reload, name=f"{self.device_id}-data")
        read = self._read
        deadline = time.monotonic() + self.reload_wait_s
        while not read.done.wait(0.1) and not self.halt.is_set():
            if time.monotonic() > deadline:
                log.warning("%s: reading local data takes over %.0f s; training on the "
                            "previous %d examples", self.device_id, self.reload_wait_s,
                            len(self.data))
                return
        if not read.done.is_set():
            return
        self._read = None
        if read.error is not None:
            self.reload_failures += 1
            log.warning("%s: re-reading local data failed (%s); training on the previous %d "
                        "examples", self.device_id, read.error, len(self.data))
            return
        assert read.data is not None
        self.data = read.data
        self.reloads += 1

    def train(self, received: ReceivedModel, task: TaskConfig | None = None) -> Update:
        """Train on the model as `task` says (default: the announcement's task for all)."""
        a = received.announcement
        task = task or a.task
        model = self._model_for(a)
        self._refresh_data()
        model.set_flat(received.params)
        rng = np.random.default_rng([self.seed, a.round])
        # A device `slowdown` times slower does 1/slowdown of the work in its budget and
        # takes `slowdown` times as long for what it does.
        result = model.train(self.data.x, self.data.y, epochs=task.epochs,
                             batch_size=task.batch_size, lr=task.lr, rng=rng,
                             prox_mu=task.prox_mu, time_budget_s=task.time_budget_s / self.slowdown,
                             max_steps=task.max_steps)
        if self.slowdown > 1.0:
            self.halt.wait(result.seconds * (self.slowdown - 1.0))
        delta = model.get_flat() - received.params
        if self.update_transform is not None:
            delta = self.update_transform(delta)
        try:
            encoded = self._encode(delta, task.codec, rng)
        except FedmqError as exc:  # a codec this build does not know: ours still works
            log.warning("%s: assigned codec %r unusable (%s); using %s", self.device_id,
                        task.codec, exc, self.codec)
            encoded = self._encode(delta, "", rng)
        return Update(
            device_id=self.device_id, update_id=os.urandom(4).hex(), round=a.round,
            base_version=a.version, num_samples=result.num_samples, loss=result.loss,
            delta=encoded, layout_hash=a.layout_hash, train_s=result.seconds,
            steps=result.steps, complete=result.complete,
        )


@dataclass
class AgentStats:
    updates_sent: int = 0  # updates trained and sent (re-sends not counted)
    sat_out: int = 0  # rounds this device was not selected for
    partial: int = 0  # updates cut short by the time budget or step cap
    codecs: Counter = field(default_factory=Counter)  # updates sent, by codec
    resent: int = 0
    models_received: int = 0
    receipts: Counter = field(default_factory=Counter)  # by status
    rejected: Counter = field(default_factory=Counter)
    # round -> [bytes uploaded, bytes downloaded]
    traffic: dict[int, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))


class _Read:
    """One read of a live data source on a daemon thread: its data or its error."""

    def __init__(self, load: Callable[[], Dataset], *, name: str) -> None:
        self.data: Dataset | None = None
        self.error: Exception | None = None
        self.done = threading.Event()
        self._load = load
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        try:
            self.data = self._load()
        except Exception as exc:  # the user's file or sensor: any failure is a bad read
            self.error = exc if isinstance(exc, FedmqError) else DataError(
                f"{type(exc).__name__}: {exc}")
        finally:
            self.done.set()


class EdgeAgent:
    """One device: an MQTT client plus a training thread.

    `update_transform` is handed to the LocalTrainer (see there).
    """

    def __init__(self, config: AgentConfig, data: Dataset, *,
                 update_transform: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        self.config = config
        self.topics = FleetTopics(config.fleet)
        state_path = Path(config.state_dir) / "agent-state.bin" if config.state_dir else None
        # Devices must not share a seed: their stochastic rounding noise would not average out.
        seed = config.seed if config.seed >= 0 else zlib.crc32(config.device_id.encode())
        reload = None
        if config.data_reload:
            from fedmq.tasks.datasource import load_source

            reload = functools.partial(load_source, config.data_source, config.task,
                                       label=config.data_label,
                                       max_samples=config.data_max_samples)
        self.trainer = LocalTrainer(device_id=config.device_id, data=data, codec=config.codec,
                                    seed=seed, state_path=state_path, slowdown=config.slowdown,
                                    threads=config.train_threads or config.cpus
                                    or os.cpu_count() or 1, reload=reload,
                                    update_transform=update_transform)
        self.receiver = ModelReceiver()
        # With model_public_key set, only announcements the aggregator signed get through.
        self.announcements = opener_for_config(config.model_public_key)
        self.stats = AgentStats()
        self.outbox = Outbox(Path(config.state_dir) / "outbox" if config.state_dir else None)
        self._pending: ReceivedModel | None = None
        self._wake = threading.Condition()
        self._stopping = False
        self._worker: threading.Thread | None = None
        offline = DeviceStatus(device_id=config.device_id, online=False).to_payload()
        self.link = MqttLink(
            client_id=config.device_id, broker=config.broker, username=config.username,
            password=config.password, on_connect=self._on_connect, tls=config.tls(),
            will=Will(self.topics.device_status(config.device_id), offline),
            max_payload=config.max_payload, session_expiry_s=config.session_expiry_s,
        )
        self.link.route(self.topics.receipt(config.device_id), self._on_receipt)
        self.link.route(self.topics.model_current, self._on_announcement)
        # The model streams are subscribed only while needed, and only the one needed: a
        # device holding the previous version downloads the delta, never the full model.
        self._stream_filters = {FULL: self.topics.model_payload_filter,
                                DELTA: self.topics.model_delta_filter}
        for stream, topic_filter in self._stream_filters.items():
            self.link.route(topic_filter, self._chunk_handler(stream), active=False)

    @property
    def announced_round(self) -> int:
        """The newest round this device has heard announced (0: none yet)."""
        a = self.receiver.announcement
        return 0 if a is None else a.round

    # -- MQTT side (paho thread): decode, verify, hand over ------------------------------
    def _on_connect(self, _session_present: bool) -> None:
        birth = DeviceStatus(device_id=self.config.device_id, online=True,
                             capabilities=device_capabilities(self.config),
                             agent_version=__version__, ts=time.time())
        self.link.publish(self.topics.device_status(self.config.device_id), birth.to_payload(),
                          qos=1, retain=True)
        self.outbox.mark_unsent()  # whatever was in flight may be gone: send it again
        with self._wake:
            self._wake.notify()

    def _on_receipt(self, message) -> None:
        try:
            receipt = Receipt.from_payload(message.payload)
        except ProtocolError as exc:
            self.stats.rejected[exc.reason] += 1
            log.warning("%s: bad receipt: %s", self.config.device_id, exc)
            return
        entry = self.outbox.remove(receipt.update_id)
        if entry is None:
            return  # a receipt for something already settled (a re-send's second receipt)
        self.stats.receipts[receipt.status] += 1
        if receipt.status == "accepted":
            log.debug("%s: update %s counted in round %d", self.config.device_id,
                      receipt.update_id, receipt.round)
        else:
            log.warning("%s: update %s for round %d dropped: %s %s", self.config.device_id,
                        receipt.update_id, receipt.round, receipt.status, receipt.reason)

    def _on_announcement(self, message) -> None:
        self._receive(lambda: self.receiver.offer_announcement(
            self.announcements.open(message.payload), len(message.payload)), message.payload)

    def _chunk_handler(self, stream: str):
        def on_chunk(message) -> None:
            self._receive(lambda: self.receiver.offer_chunk(
                ModelChunk.from_payload(message.payload), len(message.payload), stream),
                message.payload)
        return on_chunk

    def _receive(self, offer, payload: bytes) -> None:
        if not payload:
            return  # an empty retained message only deletes an old chunk
        try:
            received = offer()
        except ProtocolError as exc:
            self.stats.rejected[exc.reason] += 1
            log.warning("%s: rejected model message (%s): %s", self.config.device_id,
                        exc.reason, exc)
            return
        finally:
            self._follow_wanted_stream()
        if received is not None:
            # A new model means the aggregator is up and moving: whatever still lacks a
            # receipt goes out again now (it is counted or refused, either way receipted)
            # instead of waiting out resend_after_s.
            self.outbox.mark_unsent(older_than_s=RESEND_ON_MODEL_AFTER_S, first_send_only=True)
            self.stats.models_received += 1
            self.stats.traffic[received.announcement.round][1] += received.wire_bytes
            with self._wake:
                self._pending = received  # newest wins: never train on a superseded model
                self._wake.notify()

    def _follow_wanted_stream(self) -> None:
        wanted = self.receiver.wanted()
        for stream, topic_filter in self._stream_filters.items():
            if stream == wanted:
                self.link.activate(topic_filter)
            else:
                self.link.deactivate(topic_filter)

    # -- training thread -----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                if self._pending is None and not self._stopping:
                    self._wake.wait(RESEND_CHECK_S)
                if self._stopping:
                    return
                received, self._pending = self._pending, None
            if self.link.subscribed.is_set():  # receipts can reach us: re-send what waits
                for entry in self.outbox.due(resend_after_s=self.config.resend_after_s):
                    self.stats.traffic[entry.round][0] += self._send(entry)  # bytes are bytes
                    self.stats.resent += 1
            if received is not None:
                try:
                    self._train_and_publish(received)
                except Exception:  # a bug or a full disk must not end training for good
                    self.stats.rejected["train_error"] += 1
                    log.exception("%s: round %d failed; waiting for the next model",
                                  self.config.device_id, received.announcement.round)

    def _send(self, entry: Pending) -> int:
        topic = self.topics.update(self.config.device_id)
        messages = split_payload(entry.payload,
                                 max_payload=self.link.effective_max_payload(topic))
        connected = self.link.connected.is_set()
        for message in messages:
            self.link.publish(topic, message, qos=1)
        self.outbox.sent(entry, connected=connected)
        log.debug("%s: sent update %s (round %d, connected=%s)", self.config.device_id,
                  entry.update_id, entry.round, connected)
        return sum(len(message) for message in messages)

    def _train_and_publish(self, received: ReceivedModel) -> None:
        a = received.announcement
        task = a.task_for(self.config.device_id)
        if task is None:
            self.stats.sat_out += 1
            log.debug("%s: not in round %d's cohort; holding model v%d", self.config.device_id,
                      a.round, a.version)
            return
        log.info("%s: round %d: training on model v%d", self.config.device_id, a.round,
                 a.version)
        try:
            update = self.trainer.train(received, task)
        except FedmqError as exc:
            self.stats.rejected[getattr(exc, "reason", "train_failed")] += 1
            log.error("%s: cannot train on model v%d: %s", self.config.device_id, a.version, exc)
            return
        entry = self.outbox.put(update.update_id, a.round, update.to_payload())
        sent = self._send(entry)
        self.stats.updates_sent += 1
        self.stats.partial += not update.complete
        self.stats.codecs[update.delta.codec] += 1
        self.stats.traffic[a.round][0] += sent
        log.info("%s: round %d: trained on %d samples (loss %.4f), sent %d bytes",
                 self.config.device_id, a.round, update.num_samples, update.loss, sent)

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self._worker = threading.Thread(target=self._run, name=f"train-{self.config.device_id}",
                                        daemon=True)
        self._worker.start()
        self.link.start()

    def stop(self) -> None:
        self.trainer.halt.set()
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._worker is not None:
            self._worker.join(timeout=30)
        offline = DeviceStatus(device_id=self.config.device_id, online=False, ts=time.time())
        self.link.stop(final=(self.topics.device_status(self.config.device_id),
                              offline.to_payload()))
