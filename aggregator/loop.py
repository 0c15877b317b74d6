"""The loop every aggregator process runs: MQTT callbacks only enqueue, one thread owns
the state, and nothing is acknowledged before the checkpoint holding it is on disk.

Shared by the central service (service.py) and the worker/site service
(partial_service.py); each supplies `_snapshot`, `_process` and `_tick`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from aggregator.checkpoint import CheckpointStore
from aggregator.writer import CheckpointWriter
from fedmq.core.protocol import FleetTopics, Receipt
from fedmq.errors import FedmqError
from fedmq.transport.mqtt import MqttLink

log = logging.getLogger(__name__)

# How often the loop looks at the clock when no message arrives: deadlines are in seconds,
# so a fifth of a second is precise enough and costs nothing.
TICK_S = 0.2
# Messages handled per loop pass; the checkpoint writer coalesces passes further.
BATCH_MAX = 64
# How long what was folded in may wait for company before its checkpoint is written (group
# commit): updates of one round tend to come together, and a write started for the first
# one holds up the round's own close behind it (two fsyncs where one covers both). Nobody
# waits on a receipt: it only lets a device forget a stored update.
COMMIT_LINGER_S = 0.005
WRITER_IDLE = object()  # the checkpoint writer finished: hand it what piled up meanwhile

Reply = tuple[str, Receipt] | None  # (device or source, its receipt), or nothing owed


class ServiceLoop:
    """Inbox, loop thread, held replies and the checkpoint writer of one service."""

    link: MqttLink
    topics: FleetTopics

    def _init_loop(self, store: CheckpointStore, *,
                   on_saved: Callable[[float], None] | None = None) -> None:
        self.finished = threading.Event()  # set when all rounds are done, or on failure
        self.failure: BaseException | None = None
        self.answered = 0  # messages acked to the broker, each after its checkpoint
        self._dirty = False  # the state changed since the last checkpoint
        self._inbox: queue.Queue = queue.Queue()
        self.writer = CheckpointWriter(store, on_failure=self._fail,
                                       on_idle=lambda: self._inbox.put(WRITER_IDLE),
                                       on_saved=on_saved)
        self._held: list[Callable[[], None]] = []  # acks and receipts awaiting a checkpoint
        self._linger_until: float | None = None  # when what is held gets written at latest
        self._stop = threading.Event()
        self._loop: threading.Thread | None = None

    # -- what each service supplies ------------------------------------------------------
    def _snapshot(self) -> dict[str, Any]:
        raise NotImplementedError

    def _process(self, batch: list) -> None:
        raise NotImplementedError

    def _tick(self) -> None:
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------
    def _checkpoint(self, *, wait: bool = False) -> bool:
        """Hand the state to the writer; with `wait`, True once it is on disk (False: the
        write failed, and the service is failing)."""
        self._dirty = True
        self._commit(force=True)
        return self._written() if wait else True

    def _written(self) -> bool:
        """Wait until everything handed to the writer is on disk: False if a write failed."""
        return self.writer.durable()

    def _commit(self, *, force: bool = False) -> None:
        """Hand the held acks and receipts to the writer, behind a snapshot if the state
        changed. Only when the writer is idle and the oldest held reply lingered
        COMMIT_LINGER_S (or `force`): while a write is in flight, batches pile up and one
        snapshot covers them all, so a big model is copied once per write instead of once
        per batch."""
        if not (self._held or self._dirty):
            return
        now = time.monotonic()
        if self._linger_until is None:
            self._linger_until = now + COMMIT_LINGER_S
        if not force and (now < self._linger_until or not self.writer.idle):
            return
        # even without new state, replies wait behind earlier writes (an idempotent
        # "accepted" must not overtake the checkpoint that holds the update)
        self.writer.submit(self._snapshot() if self._dirty else None, self._held)
        self._held, self._dirty, self._linger_until = [], False, None

    def _next_batch(self) -> list:
        """The next inbox item (waiting up to a tick, or until held replies are due to be
        written), plus whatever else already waits."""
        timeout = TICK_S
        # while a write is in flight the held replies wait for it anyway, and WRITER_IDLE
        # wakes the loop when it is done: no spinning on an expired linger meanwhile
        if self._linger_until is not None and self.writer.idle:
            timeout = min(timeout, max(0.0, self._linger_until - time.monotonic()))
        try:
            batch = [self._inbox.get(timeout=timeout)]
        except queue.Empty:
            return []
        while len(batch) < BATCH_MAX:
            try:
                batch.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        return batch

    def _reply(self, mid: int, qos: int, reply: Reply) -> None:
        """Ack a message to the broker and send the receipt it is owed (after its write)."""
        self.link.ack(mid, qos)
        self.answered += 1
        if reply is not None:
            device, receipt = reply
            payload = receipt.to_payload()
            self.link.publish(self.topics.receipt(device), payload, qos=1)
            self._receipt_sent(len(payload))

    def _receipt_sent(self, nbytes: int) -> None:
        """A receipt went out (for metrics); nothing by default."""

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._next_batch()
            try:
                self._process(batch)
                self._tick()
                self._commit()
            except FedmqError:
                log.exception("aggregator loop error; continuing")
            except Exception as exc:
                log.exception("aggregator loop failed; stopping")
                self._fail(exc)
                return
        self._commit(force=True)  # what was folded in gets written, acked and receipted

    def _start_loop(self, name: str) -> None:
        self._loop = threading.Thread(target=self._run, name=name, daemon=True)
        self._loop.start()

    def _stop_loop(self) -> None:
        self._stop.set()
        if self._loop is not None:
            self._loop.join(timeout=30)
        self.writer.close()  # acks and receipts of everything folded in go out first

    def _fail(self, exc: BaseException) -> None:
        """Disk full, a bug: stop loudly so a supervisor restarts us from the checkpoint."""
        self.failure = exc
        self.finished.set()
