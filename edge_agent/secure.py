"""A device's side of secure aggregation (SecAgg+) over MQTT: the thin adapter around the
sans-I/O SecAggClient (fedmq/core/secagg/client.py).

One client per round, made when the round's setup (retained on `secagg/setup`) names
this device. Messages for it come on `secagg/{device}/in`; what it sends goes up on its
own update topic. The masked input goes through the agent's durable outbox (it is
re-sent until receipted, and a re-send counts once); the other messages are plain QoS 1.
The update itself never leaves the device in the clear: it is clipped, weighted
(fedmq/core/secagg/weighting.py), quantized and masked first.

The client's secrets live in memory only: a device that restarts mid-round has dropped
out of that round (the aggregator leaves it out, see aggregator/secure_round.py) and
joins the next one.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable

import numpy as np

from fedmq.core.protocol import FleetTopics
from fedmq.core.protocol.wire import Message, decode_any
from fedmq.core.secagg import (
    MaskedInput,
    NeighbourKeys,
    RoutedShares,
    SecAggClient,
    SecAggSetup,
    UnmaskRequest,
)
from fedmq.core.secagg.weighting import weighted_vector
from fedmq.errors import ProtocolError, SecureAggregationError, require

log = logging.getLogger(__name__)

SERVER_KINDS = (NeighbourKeys, RoutedShares, UnmaskRequest)


class SecureDevice:
    """The device's secure rounds. Thread-safe: messages come on paho's thread, trained
    updates on the training thread; `publish` and `queue_input` are called outside the
    lock.

    publish(message): send a message up as it is (QoS 1).
    queue_input(message): put a MaskedInput in the durable outbox and send it.
    drop_after_input(round): simulation only; True makes the device vanish once its
    masked input is out (it never answers that round's unmask request).
    """

    def __init__(self, *, device_id: str, topics: FleetTopics,
                 publish: Callable[[Message], int],
                 queue_input: Callable[[MaskedInput], int],
                 drop_after_input: Callable[[int], bool] | None = None) -> None:
        require("cryptography", "secure")  # at start-up, not at the first round's keys
        self.device_id = device_id
        self.setup_topic = f"{topics.prefix}/secagg/setup"
        self.in_topic = f"{topics.prefix}/secagg/{device_id}/in"
        self._publish = publish
        self._queue_input = queue_input
        self._drop_after_input = drop_after_input
        self._lock = threading.Lock()
        self.client: SecAggClient | None = None
        self._round = -1  # of the client
        self._trained: tuple[int, np.ndarray, int] | None = None  # round, delta, samples
        self._submitted: set[bytes] = set()  # sessions this device gave its input to
        self.stats: Counter[str] = Counter()

    @property
    def round(self) -> int:
        """The round of the latest setup seen (-1: none yet)."""
        return self._round

    # -- events --------------------------------------------------------------------------
    def on_setup(self, payload: bytes) -> int:
        """A round's setup; returns the bytes sent in reply."""
        if not payload:
            return 0
        try:
            setup = SecAggSetup.from_payload(payload)
        except ProtocolError as exc:
            self.stats[f"rejected_{exc.reason}"] += 1
            log.warning("%s: bad secure-aggregation setup (%s): %s", self.device_id,
                        exc.reason, exc)
            return 0
        with self._lock:
            if setup.round < self._round or (
                    self.client is not None and self.client.setup is not None
                    and self.client.setup.session == setup.session):
                return 0  # older, or the one in hand again
            if self.device_id not in setup.participants:
                self.client, self._round = None, setup.round
                return 0
            self.client, self._round = SecAggClient(self.device_id), setup.round
            self.stats["rounds"] += 1
            replies = self._run(lambda c: c.receive(setup))
            replies += self._submit_held()
        return self._send(replies)

    def on_message(self, payload: bytes) -> int:
        """A message of the open round for this device."""
        try:
            message = decode_any(payload, *SERVER_KINDS)
        except ProtocolError as exc:
            self.stats[f"rejected_{exc.reason}"] += 1
            return 0
        with self._lock:
            client = self.client
            if client is None or client.setup is None or message.session != client.setup.session:
                self.stats["ignored_session"] += 1
                return 0
            if isinstance(message, UnmaskRequest) and self._drop_after_input is not None \
                    and self._drop_after_input(message.round):
                self.stats["dropped_on_purpose"] += 1
                self.client = None  # gone: answers nothing more this round
                return 0
            replies = self._run(lambda c: c.receive(message))
        return self._send(replies)

    def submit(self, round: int, delta: np.ndarray, samples: int) -> int:
        """This device's trained delta for `round`: masked and sent once the round's
        shares are in (at once, or when they arrive)."""
        with self._lock:
            self._trained = (round, np.asarray(delta, dtype=np.float32).ravel(), samples)
            replies = self._submit_held()
        return self._send(replies)

    # -- helpers -------------------------------------------------------------------------
    def _submit_held(self) -> list[Message]:
        client, trained = self.client, self._trained
        if client is None or client.setup is None or trained is None:
            return []
        round, delta, samples = trained
        setup = client.setup
        if round != setup.round or setup.session in self._submitted:
            return []
        if delta.size + 1 != setup.vector_size:
            self.stats["rejected_bad_size"] += 1
            log.error("%s: secure round %d sums %d values, this model has %d parameters",
                      self.device_id, round, setup.vector_size - 1, delta.size)
            return []
        self._submitted.add(setup.session)
        self._trained = None
        vector = weighted_vector(delta, samples, clip=setup.clip, weight_cap=setup.weight_cap)
        return self._run(lambda c: c.submit(vector))

    def _run(self, step: Callable[[SecAggClient], list[Message]]) -> list[Message]:
        client = self.client
        assert client is not None
        try:
            return step(client)
        except SecureAggregationError as exc:  # a refusal: this device drops out
            self.stats[f"refused_{exc.reason}"] += 1
            log.warning("%s: leaving secure round %d: %s", self.device_id, self._round, exc)
            self.client = None
        except ProtocolError as exc:
            self.stats[f"rejected_{exc.reason}"] += 1
            log.warning("%s: secure round %d: %s", self.device_id, self._round, exc)
        return []

    def _send(self, replies: list[Message]) -> int:
        sent = 0
        for message in replies:
            if isinstance(message, MaskedInput):
                self.stats["inputs"] += 1
                sent += self._queue_input(message)
            else:
                self.stats[message.KIND] += 1
                sent += self._publish(message)
        return sent
