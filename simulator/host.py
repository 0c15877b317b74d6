"""Thousands of simulated devices in one process: each a DeviceMachine on a shared session
loop, training on a small worker pool.

An EdgeAgent is a device's service (its own MQTT link, threads, disk); a hosted device is
only its protocol state (fedmq.core.device.DeviceMachine) plus an MQTT session on one
SessionLoop. Training runs on `train_workers` threads, one device at a time per worker,
with a LocalTrainer built for that round from the device's data and dropped afterwards:
an idle device holds no model, no data and no trainer, so a 10,000-device fleet fits in
a few KB per device. Everything a machine decides is carried out on the loop thread.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from edge_agent.agent import LocalTrainer, device_capabilities
from fedmq import __version__
from fedmq.core.activity import ActivityReport
from fedmq.core.chunking import split_payload
from fedmq.core.device import (
    AnnouncementIn,
    ChunkIn,
    Connected,
    DeviceMachine,
    ReceiptIn,
    Rejected,
    Send,
    Sent,
    Settled,
    SitOut,
    Subscribe,
    Tick,
    Train,
    Trained,
    Unsubscribe,
)
from fedmq.core.protocol import DeviceStatus, FleetTopics, ModelAnnouncement, Update
from fedmq.core.signing import AnnouncementOpener
from fedmq.core.transfer import DELTA, FULL
from fedmq.tasks import Dataset
from fedmq.transport.message import Message
from simulator.sessions import Session, SessionLoop, SessionSpec

log = logging.getLogger(__name__)

# How often hosted devices look for updates whose receipt is overdue (as EdgeAgent does).
TICK_S = 1.0
# Largest payload a hosted device publishes in one message; bigger updates go in parts.
MAX_PAYLOAD = 128 * 1024


@dataclass
class HostStats:
    """What the fleet did, summed over devices (read from any thread: plain counters)."""

    trained: int = 0
    sat_out: int = 0
    sent: int = 0
    resent: int = 0
    settled: collections.Counter = field(default_factory=collections.Counter)
    rejected: collections.Counter = field(default_factory=collections.Counter)
    train_errors: int = 0
    bytes_up: int = 0
    announced_round: int = 0  # the newest round any hosted device heard announced
    # round -> [bytes uploaded, bytes downloaded, devices that uploaded] by the hosted
    # devices, as they counted
    traffic: dict[int, list[int]] = field(default_factory=dict)

    def count(self, round_no: int, *, up: int = 0, down: int = 0, uploaders: int = 0) -> None:
        slot = self.traffic.setdefault(round_no, [0, 0, 0])
        slot[0] += up
        slot[1] += down
        slot[2] += uploaders


class SharedOpener(AnnouncementOpener):
    """One announcement opener for every device of a host, remembering the last few it
    opened: each of 10,000 devices gets the same retained announcement, and decoding it
    once instead of 10,000 times is most of a round's CPU in a big simulated fleet (a real
    device opens its own, once)."""

    def __init__(self, remember: int = 4) -> None:
        super().__init__()
        self._opened: dict[bytes, ModelAnnouncement] = {}
        self._remember = remember

    def open(self, payload: bytes) -> ModelAnnouncement:
        announcement = self._opened.get(payload)
        if announcement is None:
            announcement = super().open(payload)
            if len(self._opened) >= self._remember:
                self._opened.pop(next(iter(self._opened)))
            self._opened[payload] = announcement
        return announcement


class HostedDevice:
    """One simulated device: its protocol machine, its session and its status report."""

    __slots__ = ("index", "machine", "report", "session")

    def __init__(self, index: int, machine: DeviceMachine, report: ActivityReport) -> None:
        self.index = index
        self.machine = machine
        self.report = report
        self.session: Session | None = None


class DeviceHost:
    """Devices `first .. first + count - 1` of a fleet, on one session loop."""

    def __init__(self, *, broker: str, fleet: str, count: int, first: int = 0,
                 data_for: Callable[[int], Dataset], id_format: str = "dev{index}",
                 codec: str = "float32", seed: int = 0, resend_after_s: float = 30.0,
                 train_workers: int = 1, capabilities: dict | None = None,
                 update_transform_for: Callable[[int], Callable | None] | None = None,
                 status_interval_s: float = 10.0, task: str = "") -> None:
        """update_transform_for(index): what device `index` does to its delta before
        encoding it (None: sends it honestly); see LocalTrainer. status_interval_s: as
        the agent's (fedmq/core/activity.py). task: a user task the devices train, as
        LocalTrainer's."""
        self.loop = SessionLoop(broker, name="fedmq-host")
        self.topics = FleetTopics(fleet)
        self.data_for = data_for
        self.task = task
        self.codec = codec
        self.seed = seed
        self.update_transform_for = update_transform_for or (lambda _index: None)
        self.stats = HostStats()
        self._pool = ThreadPoolExecutor(max_workers=max(1, train_workers),
                                        thread_name_prefix="fedmq-train")
        self._capabilities = capabilities if capabilities is not None else \
            device_capabilities()
        self._pending: set[HostedDevice] = set()  # devices with updates awaiting receipts
        self._reporting: set[HostedDevice] = set()  # devices whose status is to be refreshed
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self.devices: list[HostedDevice] = []
        opener = SharedOpener()
        streams = {self.topics.model_payload_filter: FULL,
                   self.topics.model_delta_filter: DELTA}
        self._stream_of = {f.rsplit("/", 1)[0]: s for f, s in streams.items()}
        for index in range(first, first + count):
            device_id = id_format.format(fleet=fleet, index=index)
            machine = DeviceMachine(device_id=device_id, fleet=fleet,
                                    resend_after_s=resend_after_s, opener=opener)
            report = ActivityReport(device_id=device_id, capabilities=self._capabilities,
                                    agent_version=__version__, interval_s=status_interval_s)
            device = HostedDevice(index, machine, report)
            offline = DeviceStatus(device_id=device_id, online=False).to_payload()
            spec = SessionSpec(device_id,
                               subscriptions=tuple((f, 1) for f in machine.always_subscribed),
                               will=(self.topics.device_status(device_id), offline, 1, True))
            device.session = self.loop.add(spec, self._on_message, on_ready=self._on_ready,
                                           userdata=device)
            self.devices.append(device)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self.loop.start()
        self._ticker = threading.Thread(target=self._tick_forever, name="fedmq-host-tick",
                                        daemon=True)
        self._ticker.start()

    def close(self) -> None:
        self._stop.set()
        self.loop.close()  # first: no message may ask the pool for work once it is shut
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._ticker is not None:
            self._ticker.join(5)

    def never_connected(self) -> list[str]:
        return [s.client_id for s in self.loop.never_connected()]

    # -- the loop thread ------------------------------------------------------------------
    def _on_ready(self, session: Session) -> None:
        device: HostedDevice = session.userdata
        self._publish_status(device)  # the birth
        self._carry_out(device, device.machine.handle(Connected(now=time.monotonic())))

    def _publish_status(self, device: HostedDevice) -> None:
        status = device.report.status(online=True, now=time.monotonic(), wall=time.time())
        self.loop.publish(device.session, self.topics.device_status(device.machine.device_id),
                          status.to_payload(), qos=1, retain=True)

    def _on_message(self, session: Session, message: Message) -> None:
        device: HostedDevice = session.userdata
        topic, now = message.topic, time.monotonic()
        if topic == device.machine.topics.model_current:
            event = AnnouncementIn(message.payload, now, retained=message.retain)
        elif topic == device.machine.topics.receipt(device.machine.device_id):
            event = ReceiptIn(message.payload, now)
        else:
            stream = self._stream_of.get(topic.rsplit("/", 1)[0])
            if stream is None:
                return
            event = ChunkIn(stream, message.payload, now)
        self._carry_out(device, device.machine.handle(event))

    def _carry_out(self, device: HostedDevice, decisions: list) -> None:
        session = device.session
        for d in decisions:
            if isinstance(d, Send):
                self._send(device, d)
            elif isinstance(d, Train) and not self._stop.is_set():
                a = d.model.announcement
                self.stats.announced_round = max(self.stats.announced_round, a.round)
                self.stats.count(a.round, down=d.model.wire_bytes)
                self._pool.submit(self._train, device, d)
            elif isinstance(d, Subscribe):
                self.loop.subscribe(session, d.topic_filters)
            elif isinstance(d, Unsubscribe):
                self.loop.unsubscribe(session, d.topic_filters)
            elif isinstance(d, Settled):
                self.stats.settled[d.receipt.status] += 1
                if not len(device.machine.outbox):
                    self._pending.discard(device)
            elif isinstance(d, SitOut):
                self.stats.sat_out += 1
                self.stats.announced_round = max(self.stats.announced_round,
                                                 d.announcement.round)
            elif isinstance(d, Rejected):
                self.stats.rejected[d.reason] += 1
                log.debug("%s: %s refused (%s): %s", device.machine.device_id, d.what,
                          d.reason, d.detail)
        device.report.holding(len(device.machine.outbox))
        if device.report.dirty:
            self._reporting.add(device)

    def _send(self, device: HostedDevice, send: Send) -> None:
        session = device.session
        connected = session.ready
        if connected:
            pieces = [send.payload] if len(send.payload) <= MAX_PAYLOAD else \
                split_payload(send.payload, max_payload=MAX_PAYLOAD)
            for piece in pieces:
                self.loop.publish(session, send.topic, piece, qos=1)
                self.stats.bytes_up += len(piece)
                device.report.uploaded(len(piece))
                self.stats.count(send.round, up=len(piece))
            if send.resend:
                self.stats.resent += 1
            else:
                self.stats.sent += 1
                self.stats.count(send.round, uploaders=1)
        self._pending.add(device)
        self._carry_out(device, device.machine.handle(
            Sent(send.update_id, connected=connected, now=time.monotonic())))

    def _trained(self, device: HostedDevice, update: Update, backend: str) -> None:
        self.stats.trained += 1
        device.report.trained(round=update.round, codec=update.delta.codec, backend=backend)
        self._carry_out(device, device.machine.handle(Trained(update, time.monotonic())))

    def _tick(self) -> None:
        now = time.monotonic()
        for device in list(self._pending):
            self._carry_out(device, device.machine.handle(
                Tick(now=now, online=device.session.ready)))
        for device in list(self._reporting):
            if not device.report.dirty:
                self._reporting.discard(device)
            elif device.report.due(now) and device.session.ready:
                self._publish_status(device)
                self._reporting.discard(device)

    def _tick_forever(self) -> None:
        while not self._stop.wait(TICK_S):
            self.loop.call_soon(self._tick)

    # -- a training worker ----------------------------------------------------------------
    def _train(self, device: HostedDevice, train: Train) -> None:
        """Train one round with a trainer made for it (data regenerated for the device)."""
        if self._stop.is_set():
            return
        machine = device.machine
        try:
            trainer = LocalTrainer(device_id=machine.device_id,
                                   data=self.data_for(device.index), codec=self.codec,
                                   seed=self.seed * 1_000_003 + device.index,
                                   update_transform=self.update_transform_for(device.index),
                                   task=self.task)
            update = trainer.train(train.model, train.task)
        except Exception as exc:  # one device's failure must not stop the fleet
            self.stats.train_errors += 1
            log.warning("%s: training failed: %s", machine.device_id, exc)
            return
        self.loop.call_soon(lambda: self._trained(device, update, trainer.backend))
