"""Checkpoint writes off the aggregation loop, with the acks that must wait for them.

The loop folds updates in and hands over (snapshot, callbacks); this thread writes the
newest snapshot waiting (one write covers every batch queued behind the one in flight:
group commit) and only then runs the callbacks of those batches, in order. So decoding
goes on while a big model's checkpoint is fsynced, and nothing is acknowledged before the
state holding it is on disk.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from aggregator.checkpoint import CheckpointStore

log = logging.getLogger(__name__)

Callback = Callable[[], None]


class CheckpointWriter:
    def __init__(self, store: CheckpointStore, *,
                 on_failure: Callable[[BaseException], None],
                 on_idle: Callback | None = None,
                 on_saved: Callable[[float], None] | None = None) -> None:
        self.store = store
        self.on_failure = on_failure
        self.on_idle = on_idle  # called (on this thread) whenever the last job is done
        self.on_saved = on_saved  # called (on this thread) with each write's seconds
        self.writes = 0
        self._jobs: queue.Queue = queue.Queue()
        self._idle = threading.Condition()
        self._pending = 0
        self._submitted = 0  # jobs handed over, ever
        self._durable = 0  # of those, the jobs whose state is on disk (callbacks may not have run)
        self._failed = False
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def submit(self, state: dict[str, Any] | None, callbacks: list[Callback]) -> None:
        """Write `state` (None: nothing new to write), then run `callbacks`. The state must
        be a snapshot: the loop goes on changing its own copy."""
        with self._idle:
            self._pending += 1
            self._submitted += 1
            number = self._submitted
        self._jobs.put((number, state, callbacks))

    @property
    def failed(self) -> bool:
        """A write failed: nothing may be acknowledged any more (the service stops)."""
        return self._failed

    @property
    def idle(self) -> bool:
        """Nothing queued or in flight: a snapshot handed over now is written at once."""
        return self._pending == 0

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until everything submitted is written and its callbacks ran."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0 or self._failed, timeout)

    def durable(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far is on disk (False: a write failed, or
        the timeout passed), not for its callbacks: a new model goes out while the
        receipts its checkpoint released are still being sent."""
        with self._idle:
            target = self._submitted
            return self._idle.wait_for(lambda: self._durable >= target or self._failed,
                                       timeout) and not self._failed

    def close(self, timeout: float = 60.0) -> None:
        self.flush(timeout)
        self._jobs.put(None)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.store.close()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            jobs = [job]
            while True:  # coalesce whatever queued up behind the write in flight
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._jobs.put(None)
                    break
                jobs.append(more)
            latest = next((state for _, state, _ in reversed(jobs) if state is not None),
                          None)
            seconds = None
            try:
                if latest is not None and not self._failed:
                    started = time.perf_counter()
                    self.store.save(latest)
                    self.writes += 1
                    seconds = time.perf_counter() - started
            except Exception as exc:  # disk full, permissions: nothing may be acked now
                self._failed = True
                if isinstance(exc, OSError):  # the disk's fault, said in words
                    log.error("checkpoint write to %s failed (%s); nothing more is "
                              "acknowledged and the aggregator stops: free the disk or fix "
                              "its permissions, then restart it", self.store.path,
                              exc.strerror or exc)
                else:  # a bug: its traceback
                    log.exception("checkpoint write to %s failed", self.store.path)
                self.on_failure(exc)
            with self._idle:
                self._durable = jobs[-1][0]
                self._idle.notify_all()
            if seconds is not None and self.on_saved is not None:
                self.on_saved(seconds)
            if not self._failed:
                for _, _, callbacks in jobs:
                    for callback in callbacks:
                        try:
                            callback()
                        except Exception:
                            log.exception("post-checkpoint callback failed")
            with self._idle:
                self._pending -= len(jobs)
                idle = self._pending == 0
                self._idle.notify_all()
            if idle and self.on_idle is not None:
                self.on_idle()
