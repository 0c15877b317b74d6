"""One device's protocol decisions, sans I/O: events in, decisions out.

`DeviceMachine.handle(event)` takes what happened (a message arrived, training finished,
the link came back, time passed) and returns what to do about it, as frozen dataclasses
the caller carries out: subscribe to a chunk stream, train a model, send an update,
count a refusal. It owns the model download (a ModelReceiver) and the outbox ledger
(which updates await a receipt, and when each goes out again); it never touches a socket,
a file, a thread or a clock: times come in as `now` (monotonic seconds), and link state
with the events. So the agent (edge_agent/agent.py) is an adapter around it, and a
simulator can drive thousands of them from one event loop.

The caller executes the decisions in order and reports each `Send` it carried out with a
`Sent` event; the machine is not thread-safe (the agent calls it under one lock).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedmq.core.outbox import Outbox
from fedmq.core.protocol import (
    EvalReport,
    FleetTopics,
    ModelAnnouncement,
    ModelChunk,
    Receipt,
    TaskConfig,
    Update,
    evaluates,
)
from fedmq.core.signing import AnnouncementOpener
from fedmq.core.transfer import DELTA, FULL, ModelReceiver, ReceivedModel
from fedmq.errors import ConfigError, ProtocolError

# A new model re-sends unreceipted updates at once, but only those sent at least this long
# ago: a receipt normally follows within a checkpoint write, and in async mode models
# arrive many times a second; re-sending what is still in flight would flood the broker.
RESEND_ON_MODEL_AFTER_S = 5.0


# -- events: what happened -----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Connected:
    """The link is (back) up: whatever was in flight may be lost, so all goes out again."""

    now: float


@dataclass(frozen=True, slots=True)
class AnnouncementIn:
    """A payload on `model/current`; `retained`: the broker's stored copy, sent because we
    subscribed, not a publish the aggregator made just now."""

    payload: bytes
    now: float
    retained: bool = False


@dataclass(frozen=True, slots=True)
class ChunkIn:
    """A payload on one model chunk stream (FULL: `model/payload/+`, DELTA: `model/delta/+`)."""

    stream: str
    payload: bytes
    now: float


@dataclass(frozen=True, slots=True)
class ReceiptIn:
    """A payload on `receipt/{device_id}`."""

    payload: bytes
    now: float


@dataclass(frozen=True, slots=True)
class Trained:
    """Local training produced `update` (for the model of a `Train` decision)."""

    update: Update
    now: float


@dataclass(frozen=True, slots=True)
class Evaluated:
    """The device scored a model (for an `Evaluate` decision): `report` goes up."""

    report: EvalReport
    now: float


@dataclass(frozen=True, slots=True)
class Sent:
    """The caller carried out a `Send`; `connected`: the link was up when it published (a
    send into a dead link goes out again on reconnect and does not lengthen the backoff)."""

    update_id: str
    connected: bool
    now: float


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed. `online`: receipts can reach us (connected and subscribed); only then
    is anything re-sent (a re-send whose receipt we cannot hear would only be re-sent)."""

    now: float
    online: bool


Event = (Connected | AnnouncementIn | ChunkIn | ReceiptIn | Trained | Evaluated | Sent
         | Tick)


# -- decisions: what to do -----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Subscribe:
    topic_filters: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    topic_filters: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Train:
    """Train `model` as `task` says, then report `Trained`. A newer Train supersedes one
    not yet started: never train on a superseded model."""

    model: ReceivedModel
    task: TaskConfig


@dataclass(frozen=True, slots=True)
class Evaluate:
    """Score `model` on the device's held-out data (before a `Train` of the same model,
    which comes right after when the device also trains), then report `Evaluated`. The
    announcement's `evaluate` share picks the devices (protocol.evaluates); a newer
    Evaluate supersedes one not yet started."""

    model: ReceivedModel


@dataclass(frozen=True, slots=True)
class Report:
    """Publish an EvalReport `payload` on `topic` at QoS 1, once: no receipt, no outbox."""

    topic: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class SitOut:
    """This device is not in the cohort of `announcement`'s round: train nothing (and drop
    any Train not yet started: it is superseded). Nothing is downloaded for a round a
    device sits out: with a few hundred devices asked out of thousands, the broker's
    fan-out and the devices' radios carry the model only where it is trained; a device
    asked later downloads it then (the full model: it holds no base for the delta)."""

    announcement: ModelAnnouncement


@dataclass(frozen=True, slots=True)
class Send:
    """Publish `payload` (an encoded Update, in parts if the link needs) on `topic` at QoS 1,
    then report `Sent`. The ledger already holds it: a durable ledger has stored it."""

    topic: str
    update_id: str
    round: int
    payload: bytes
    resend: bool  # False: the first send after training


@dataclass(frozen=True, slots=True)
class Settled:
    """The aggregator's receipt for an update in the outbox: it is gone from the outbox."""

    receipt: Receipt


@dataclass(frozen=True, slots=True)
class Ignored:
    """A message with nothing to do: `older` / `repeat` announcement (older than, or the
    same as, the one we hold: a late retained copy, a reconnect), or a receipt for an
    update already `settled` (a re-send's second receipt)."""

    what: str
    why: str


@dataclass(frozen=True, slots=True)
class Rejected:
    """A message refused as `reason` (ProtocolError's): count it, keep going."""

    what: str  # "model" or "receipt"
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class NewLineage:
    """The aggregator started over (a model of another lineage, see ModelAnnouncement):
    the model held is dropped and the new line followed, whatever its versions."""

    lineage: str


Decision = (Subscribe | Unsubscribe | Train | Evaluate | Report | SitOut | Send | Settled
            | Ignored | Rejected | NewLineage)


class DeviceMachine:
    """The decisions of device `device_id` in `fleet`; see the module docstring."""

    def __init__(self, *, device_id: str, fleet: str, resend_after_s: float,
                 outbox: Outbox | None = None, opener: AnnouncementOpener | None = None,
                 receiver: ModelReceiver | None = None) -> None:
        """outbox: the ledger (edge_agent passes one that writes through to disk; entries
        it holds from before a restart are sent on the first online Tick). opener: which
        announcements to trust (signing.py; default: unsigned and signed alike)."""
        if not resend_after_s > 0:
            raise ConfigError(f"resend_after_s {resend_after_s} must be > 0")
        self.device_id = device_id
        self.resend_after_s = resend_after_s
        self.topics = FleetTopics(fleet)
        self.update_topic = self.topics.update(device_id)
        self.outbox = outbox if outbox is not None else Outbox()
        self.opener = opener or AnnouncementOpener()
        self.receiver = receiver or ModelReceiver()
        self._stream_filters = {FULL: self.topics.model_payload_filter,
                                DELTA: self.topics.model_delta_filter}
        self.following: str | None = None  # the chunk stream subscribed to, if any

    @property
    def always_subscribed(self) -> tuple[str, ...]:
        """Filters to subscribe for the device's whole life (chunk streams come and go
        by Subscribe/Unsubscribe decisions)."""
        return (self.topics.receipt(self.device_id), self.topics.model_current)

    def stream_filter(self, stream: str) -> str:
        return self._stream_filters[stream]

    def handle(self, event: Event) -> list[Decision]:
        """What to do about `event`, in the order to do it."""
        return _DISPATCH[type(event)](self, event)

    # -- link and time ------------------------------------------------------------------
    def _connected(self, event: Connected) -> list[Decision]:
        self.outbox.mark_unsent(now=event.now)
        return []

    def _tick(self, event: Tick) -> list[Decision]:
        if not event.online:
            return []
        return [Send(self.update_topic, e.update_id, e.round, e.payload, resend=True)
                for e in self.outbox.due(resend_after_s=self.resend_after_s, now=event.now)]

    # -- the model coming down --------------------------------------------------------------
    def _announcement(self, event: AnnouncementIn) -> list[Decision]:
        decisions: list[Decision] = []
        held, opened = self.receiver.announcement, []

        def offer() -> ReceivedModel | None:
            announcement = self.opener.open(event.payload)
            opened.append(announcement)
            changes = self.receiver.lineage_changes
            try:
                return take(announcement)
            finally:
                if self.receiver.lineage_changes != changes:
                    decisions.insert(0, NewLineage(announcement.lineage))

        def take(announcement: ModelAnnouncement) -> ReceivedModel | None:
            if announcement.task_for(self.device_id) is None and not self._evaluates(
                    announcement):
                if self.receiver.pass_over(announcement):
                    self._model_arrived(event.now)
                    decisions.append(SitOut(announcement))
                else:
                    decisions.append(Ignored("announcement", "repeat"))
                return None
            received = self.receiver.offer_announcement(announcement, len(event.payload))
            held = self.receiver.announcement
            if held is not announcement and held is not None:
                # Not taken: older than the one we hold (or download), or the same again.
                why = "older" if announcement.version < held.version else "repeat"
                decisions.append(Ignored("announcement", why))
            return received

        decisions = self._receive(offer, event, decisions)
        if (held is not None and opened and not event.retained
                and (opened[0].lineage, opened[0].version) == (held.lineage, held.version)):
            self._aggregator_reannounced(event.now)
        return decisions

    def _chunk(self, event: ChunkIn) -> list[Decision]:
        if event.stream not in self._stream_filters:
            raise ConfigError(f"unknown model stream {event.stream!r}")
        return self._receive(lambda: self.receiver.offer_chunk(
            ModelChunk.from_payload(event.payload), len(event.payload), event.stream), event, [])

    def _receive(self, offer: Callable[[], ReceivedModel | None],
                 event: AnnouncementIn | ChunkIn, decisions: list[Decision]) -> list[Decision]:
        if not event.payload:
            return []  # an empty retained message only deletes an old chunk
        try:
            received = offer()
        except ProtocolError as exc:
            received = None
            decisions.append(Rejected("model", exc.reason, str(exc)))
        decisions.extend(self._follow(self.receiver.wanted()))
        if received is None:
            return decisions
        self._model_arrived(event.now)
        a = received.announcement
        if self._evaluates(a):
            decisions.append(Evaluate(received))
        task = a.task_for(self.device_id)
        if task is not None:  # else it downloaded the model only to score it
            decisions.append(Train(received, task))
        else:
            decisions.append(SitOut(a))
        return decisions

    def _evaluates(self, a: ModelAnnouncement) -> bool:
        return evaluates(self.device_id, a.version, a.evaluate)

    def _model_arrived(self, now: float) -> None:
        """A new model means the aggregator is up and moving: whatever still lacks a
        receipt goes out again at the next Tick (it is counted or refused, either way
        receipted) instead of waiting out resend_after_s; but only first sends: what was
        re-sent already waits for its backoff."""
        self.outbox.mark_unsent(now=now, older_than_s=RESEND_ON_MODEL_AFTER_S,
                                first_send_only=True)

    def _aggregator_reannounced(self, now: float) -> None:
        """The model version we hold, announced again while we listen (the same bytes, or
        afresh to be trained again): the aggregator does so when it (re)connects, as after
        moving to another broker of the list, or at a deadline short of updates. What
        lacks a receipt goes out again at the next Tick, re-sent before or not: a re-send
        on our own reconnect may have reached this broker before the aggregator subscribed
        there, and would otherwise wait out its backoff (30 s, then 60 s). It is counted
        or refused (a duplicate of the round trained again), receipted either way."""
        self.outbox.mark_unsent(now=now)

    def _follow(self, wanted: str | None) -> list[Decision]:
        """Subscribe to the one chunk stream the pending model needs, and only while needed:
        a device holding the previous version downloads the delta, never the full model."""
        if wanted == self.following:
            return []
        decisions: list[Decision] = []
        if self.following is not None:
            decisions.append(Unsubscribe((self._stream_filters[self.following],)))
        if wanted is not None:
            decisions.append(Subscribe((self._stream_filters[wanted],)))
        self.following = wanted
        return decisions

    # -- updates going up -----------------------------------------------------------------
    def _trained(self, event: Trained) -> list[Decision]:
        update = event.update
        entry = self.outbox.put(update.update_id, update.round, update.to_payload())
        return [Send(self.update_topic, entry.update_id, entry.round, entry.payload,
                     resend=False)]

    def _evaluated(self, event: Evaluated) -> list[Decision]:
        return [Report(self.update_topic, event.report.to_payload())]

    def _sent(self, event: Sent) -> list[Decision]:
        entry = self.outbox.get(event.update_id)
        if entry is not None:  # else its receipt came in meanwhile
            self.outbox.sent(entry, connected=event.connected, now=event.now)
        return []

    def _receipt(self, event: ReceiptIn) -> list[Decision]:
        try:
            receipt = Receipt.from_payload(event.payload)
        except ProtocolError as exc:
            return [Rejected("receipt", exc.reason, str(exc))]
        if self.outbox.remove(receipt.update_id) is None:
            return [Ignored("receipt", "settled")]
        return [Settled(receipt)]


# One table for all machines: a device costs its state, not a dict of bound methods.
_DISPATCH: dict[type, Callable[[DeviceMachine, Any], list[Decision]]] = {
    Connected: DeviceMachine._connected, AnnouncementIn: DeviceMachine._announcement,
    ChunkIn: DeviceMachine._chunk, ReceiptIn: DeviceMachine._receipt,
    Trained: DeviceMachine._trained, Sent: DeviceMachine._sent, Tick: DeviceMachine._tick,
    Evaluated: DeviceMachine._evaluated,
}
