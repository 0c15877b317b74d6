"""What the aggregator tells whoever watches it (metrics, a dashboard): a small observer
interface and its fan-out.

The service calls the fan-out where things happen and knows nothing of who listens; an
observer only reads, so it can never change a round. Calls come from the service's loop
thread, and from the checkpoint writer's thread (`checkpoint_saved`, `traffic` of
receipts, which go out after their checkpoint): observers must be thread-safe and quick.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Protocol

from aggregator.devices import DeviceInfo
from aggregator.records import RoundRecord
from fedmq.core.protocol import EvalReport

log = logging.getLogger(__name__)


class AggregatorObserver(Protocol):
    """Every event has a do-nothing default: subclass and override what you need."""

    def start(self) -> None:
        """The service starts (bind a port, open a file)."""

    def close(self) -> None:
        """The service stopped; release what `start` took."""

    def announced(self, *, round: int, version: int, model_bytes: int) -> None:
        """A model went out for `round` (also a re-announcement of the same round)."""

    def round_closed(self, record: RoundRecord) -> None:
        """A round closed, was checkpointed and its model announced."""

    def update_accepted(self, *, device_id: str, round: int, counted: bool) -> None:
        """An update was accepted: `counted` now, or counted before (a redelivery)."""

    def update_rejected(self, reason: str, count: int = 1) -> None:
        """`count` messages refused for `reason` (the service's `rejected` counter)."""

    def traffic(self, *, direction: str, kind: str, nbytes: int) -> None:
        """MQTT payload bytes in ("in": update, status) or out ("out": model, receipt,
        status)."""

    def device_seen(self, info: DeviceInfo, *, online: int, known: int) -> None:
        """A device's status arrived; `online` and `known` count the whole fleet now."""

    def checkpoint_saved(self, seconds: float) -> None:
        """A checkpoint write (and its fsync) took `seconds`."""

    def evaluation_accepted(self, report: EvalReport) -> None:
        """A device's evaluation report of the current model was taken."""


class ObserverFanout(AggregatorObserver):
    """Hands each event to every observer; one that raises is logged (its first failure of
    each event, with the traceback) and kept: watching must never stop the aggregator."""

    def __init__(self, observers: Iterable[AggregatorObserver] = ()) -> None:
        self.observers: list[AggregatorObserver] = list(observers)
        self._failed: set[tuple[int, str]] = set()

    def add(self, observer: AggregatorObserver) -> None:
        self.observers.append(observer)

    def _each(self, event: str, *args, **kwargs) -> None:
        for observer in self.observers:
            try:
                getattr(observer, event)(*args, **kwargs)
            except Exception:
                key = (id(observer), event)
                if key not in self._failed:
                    self._failed.add(key)
                    log.exception("observer %s failed on %s (logged once; the aggregator "
                                  "goes on)", type(observer).__name__, event)

    def start(self) -> None:
        for observer in self.observers:  # a port in use is the operator's to fix: raise
            observer.start()

    def close(self) -> None:
        self._each("close")

    def announced(self, *, round: int, version: int, model_bytes: int) -> None:
        self._each("announced", round=round, version=version, model_bytes=model_bytes)

    def round_closed(self, record: RoundRecord) -> None:
        self._each("round_closed", record)

    def update_accepted(self, *, device_id: str, round: int, counted: bool) -> None:
        self._each("update_accepted", device_id=device_id, round=round, counted=counted)

    def update_rejected(self, reason: str, count: int = 1) -> None:
        self._each("update_rejected", reason, count)

    def traffic(self, *, direction: str, kind: str, nbytes: int) -> None:
        self._each("traffic", direction=direction, kind=kind, nbytes=nbytes)

    def device_seen(self, info: DeviceInfo, *, online: int, known: int) -> None:
        self._each("device_seen", info, online=online, known=known)

    def checkpoint_saved(self, seconds: float) -> None:
        self._each("checkpoint_saved", seconds)

    def evaluation_accepted(self, report: EvalReport) -> None:
        self._each("evaluation_accepted", report)
