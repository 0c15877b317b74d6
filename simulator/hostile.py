"""Senders that attack a fleet from outside it: strangers that never published a birth
and publish crafted updates on their own update topic (issue #17). For tests and the
soak benchmark (benchmarks/soak.py); the aggregator's defences are aggregator/bounds.py
and aggregator/guard.py.

A sender answers every announcement of a new round with what `make(round, version)`
builds: an Update (a forged sample count, huge values), or raw bytes (garbage). Like a
device it keeps the Updates no receipt has settled and sends them again with each new
announcement, so its updates can be accounted for as a device's are (trained =
receipted + refused + pending).
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Callable

import numpy as np

from fedmq.core import codecs
from fedmq.core.protocol import AggregatorStatus, FleetTopics, Receipt, Update
from fedmq.errors import ProtocolError
from fedmq.transport.message import Message
from fedmq.transport.mqtt import MqttLink

Make = Callable[[int, int], "Update | bytes"]


class HostileSender:
    """One stranger on the broker; `start()` it, `stop()` it."""

    def __init__(self, *, broker: str, fleet: str, device_id: str, make: Make) -> None:
        self.topics = FleetTopics(fleet)
        self.device_id = device_id
        self.make = make
        self.rounds: list[int] = []  # rounds it answered
        self.sent = 0  # payloads made (each Update once, however often it was re-sent)
        self.receipts: Counter[str] = Counter()  # settled Updates, by receipt status
        self.quiet = False  # make nothing new; still re-send what is unsettled
        self._unsettled: dict[str, bytes] = {}  # update id -> payload
        self._lock = threading.Lock()
        self.link = MqttLink(client_id=device_id, broker=broker)
        self.link.route(self.topics.aggregator_status, self._on_status, qos=1)
        self.link.route(self.topics.receipt(device_id), self._on_receipt, qos=1)

    @property
    def pending(self) -> int:
        """Updates sent and not settled by a receipt."""
        with self._lock:
            return len(self._unsettled)

    def start(self) -> HostileSender:
        self.link.start()
        return self

    def stop(self) -> None:
        self.link.stop()

    def _on_status(self, message: Message) -> None:
        if not message.payload:
            return
        status = AggregatorStatus.from_payload(message.payload)
        with self._lock:
            if not status.online or status.round in self.rounds:
                return
            self.rounds.append(status.round)
            fresh = None if self.quiet else self.make(status.round, status.version)
            if fresh is not None:
                self.sent += 1
            if isinstance(fresh, Update):
                self._unsettled[fresh.update_id] = fresh.to_payload()
            again = list(self._unsettled.values())
        topic = self.topics.update(self.device_id)
        if isinstance(fresh, bytes):
            self.link.publish(topic, fresh, qos=1)
        for payload in again:
            self.link.publish(topic, payload, qos=1)

    def _on_receipt(self, message: Message) -> None:
        try:
            receipt = Receipt.from_payload(message.payload)
        except ProtocolError:
            return
        with self._lock:
            if self._unsettled.pop(receipt.update_id, None) is not None:
                self.receipts[receipt.status] += 1


def forged_updates(device_id: str, *, layout_hash: str, size: int, value: float,
                   samples: int) -> Make:
    """Every round, an update of `size` values all `value`, claiming `samples` samples:
    value 0 with 2^62 samples holds an unbounded mean still, 1e30 with 1 sample blows
    it up."""
    def make(round_no: int, version: int) -> Update:
        return Update(device_id=device_id, update_id=f"{device_id}-r{round_no}", round=round_no,
                      base_version=version, num_samples=samples, loss=0.1,
                      delta=codecs.encode(np.full(size, value, np.float32)),
                      layout_hash=layout_hash)
    return make


def garbage(seed: int, *, most: int = 4096) -> Make:
    """Every round, up to `most` random bytes (refused as malformed, owed no receipt)."""
    rng = random.Random(seed)
    return lambda _round, _version: rng.randbytes(rng.randint(0, most))
