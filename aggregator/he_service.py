"""The aggregator's hop to a separate HE key holder (`he_decrypt = keyholder`), kept out
of service.py, which calls these at a few hooks.

When a round of encrypted updates is due to close, the round's rule is sealed (no
update joins it any more), the sealed round is checkpointed, and its encrypted sum goes
to the key holder on `he/decrypt` (a DecryptRequest, in Parts when large). The round
stays open until the DecryptReply comes back on `he/sum`; then it closes as any round
does (server optimizer, model guard, checkpoint, model publish). A refusal refuses the
round (the devices train the same model again as the next round). No answer within
he_keyholder_timeout_s: a WARNING, and the request is sent again; a sealed round found
in the checkpoint after a restart is asked for again at once.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aggregator.he_round import EncryptedMean
from fedmq.core.chunking import Reassembler, split_payload
from fedmq.core.protocol import DecryptReply, DecryptRequest, Part
from fedmq.core.protocol.wire import decode_any
from fedmq.errors import ProtocolError

if TYPE_CHECKING:
    from aggregator.config import AggregatorConfig
    from aggregator.observers import ObserverFanout
    from aggregator.rounds import RoundMachine
    from fedmq.core.protocol import FleetTopics
    from fedmq.transport.mqtt import MqttLink

log = logging.getLogger(__name__)

SOURCE = "keyholder"  # the one sender of he/sum, as the Reassembler keys it


@dataclass(frozen=True, slots=True)
class HeReply:
    """A message on he/sum for the loop thread."""

    payload: bytes
    mid: int
    qos: int


@dataclass
class _Pending:
    request: DecryptRequest
    digest: bytes
    first_sent: float  # monotonic: the hop's latency is measured from here
    sent_at: float  # the service clock: when it was (last) sent


class KeyHolderDriver:
    """Mixed into AggregatorService; inert unless he_decrypt = keyholder. Uses the
    service's `_checkpoint` and `_close_round`."""

    clock: Callable[[], float]
    observers: ObserverFanout
    config: AggregatorConfig
    machine: RoundMachine
    topics: FleetTopics
    link: MqttLink
    lineage: str

    def _init_keyholder(self) -> None:
        he = self.machine.policy.he
        self.he_remote = he is not None and he.remote
        self.he_pending: _Pending | None = None
        self.he_refused: Counter[str] = Counter()  # the key holder's refusals, by reason
        self.he_timeouts = 0  # requests sent again for want of an answer
        self.he_ignored = 0  # replies to no pending request (late, another lineage, garbage)
        self.he_hops: list[float] = []  # seconds from request to reply, per answered round
        self._he_parts = Reassembler(timeout_s=self.config.chunk_timeout_s)
        if he is None:
            return
        if self.he_remote:
            log.info("he = ckks: this aggregator holds the public HE key %s only (no secret "
                     "key); each round's encrypted sum is decrypted by the key holder "
                     "(`fedmq keyholder`) over %s and %s", he.key.fingerprint,
                     self.topics.he_decrypt, self.topics.he_sum)
        else:
            log.warning("he = ckks with he_decrypt = local: this process holds the secret HE "
                        "key and could decrypt any single update; run `fedmq keyholder` with "
                        "the secret file and give the aggregator he_public_context only")

    def _route_keyholder(self, put: Callable[[object], None]) -> None:
        if self.he_remote:
            self.link.route(self.topics.he_sum, lambda m: put(HeReply(m.payload, m.mid, m.qos)),
                            qos=1)

    @property
    def _he_rule(self) -> EncryptedMean:
        acc = self.machine.acc
        assert isinstance(acc, EncryptedMean)
        return acc

    def _tick_keyholder(self, now: float, due_to_close: bool) -> bool:
        """True while the open round is in the key holder's hands (the caller then does
        nothing else with it): sealed and sent now, or awaiting an answer."""
        rule = self._he_rule
        if not rule.sealed:
            if not due_to_close:
                return False
            o = self.machine.open
            self._send(rule.seal(lineage=self.lineage, round=o.round,
                                 devices=tuple(sorted(o.devices))), now, durable=True)
            return True
        if rule.answer is not None:
            return False  # answered: the round closes (done as the reply came)
        pending = self.he_pending
        if pending is None or pending.request.round != self.machine.round:
            log.info("round %d's encrypted sum was sent to the key holder before a restart; "
                     "asking again", self.machine.round)
            o = self.machine.open
            self._send(rule.seal(lineage=self.lineage, round=o.round,
                                 devices=tuple(sorted(o.devices))), now, durable=False)
        elif now - pending.sent_at >= self.config.he_keyholder_timeout_s:
            self.he_timeouts += 1
            log.warning("round %d: no answer from the key holder on %s within %.0f s; asking "
                        "again (is `fedmq keyholder` running for fleet %s, with the same key "
                        "and broker access to %s?)", self.machine.round, self.topics.he_sum,
                        now - pending.sent_at, self.config.fleet, self.topics.he_decrypt)
            self._publish(pending.request)
            pending.sent_at = now
        return True

    def _send(self, request: DecryptRequest, now: float, *, durable: bool) -> None:
        """Checkpoint the sealed round first (`durable`): a restart asks for the same sum,
        never a different one for the same round."""
        if durable and not self._checkpoint(wait=True):
            log.error("round %d: the sealed round could not be saved; not sent to the key "
                      "holder", request.round)
            return
        self.he_pending = _Pending(request, request.digest(), time.monotonic(), now)
        self._publish(request)
        log.info("round %d: sent the encrypted sum of %d updates to the key holder",
                 request.round, request.count)

    def _publish(self, request: DecryptRequest) -> None:
        limit = self.link.effective_max_payload(self.topics.he_decrypt)
        pieces = split_payload(request.to_payload(), max_payload=limit)
        for piece in pieces:
            self.link.publish(self.topics.he_decrypt, piece, qos=1)
        self.observers.traffic(direction="out", kind="he", nbytes=sum(map(len, pieces)))

    def _handle_keyholder(self, item: HeReply, now: float) -> None:
        """A message on he/sum: the pending round's answer closes it; anything else is
        counted and dropped."""
        self.link.ack(item.mid, item.qos)
        try:
            message = decode_any(item.payload, DecryptReply, Part)
            if isinstance(message, Part):
                done = self._he_parts.offer(SOURCE, message, time.monotonic(),
                                            wire_bytes=len(item.payload))
                if done is None:
                    return
                message = DecryptReply.from_payload(done.payload)
        except ProtocolError as exc:
            self.he_ignored += 1
            log.warning("ignored a message on %s (%s): %s", self.topics.he_sum, exc.reason, exc)
            return
        pending = self.he_pending
        if (pending is None or message.lineage != self.lineage
                or message.round != pending.request.round or message.digest != pending.digest
                or not self._he_rule.awaiting):
            self.he_ignored += 1
            log.info("ignored a key holder reply for round %d (lineage %r): no such sum is "
                     "awaited", message.round, message.lineage)
            return
        hop = time.monotonic() - pending.first_sent
        self.he_pending = None
        if message.status != "ok":
            self.he_refused[message.reason] += 1
            log.error("round %d: the key holder refused to decrypt the sum (%s): %s",
                      message.round, message.reason, message.message)
        else:
            self.he_hops.append(hop)
            log.info("round %d: the key holder answered in %.3f s", message.round, hop)
        self._he_rule.resolve(message)
        self._close_round(now)

    def he_counters(self) -> dict[str, int]:
        """For status and tests: the hop's refusals, timeouts and ignored replies."""
        return {"refused": sum(self.he_refused.values()), "timeouts": self.he_timeouts,
                "ignored": self.he_ignored}

