"""Which unconfirmed updates a device sends again, and when: the outbox's ledger.

A broker PUBACK is not delivery: a broker killed before its autosave forgets what it
acknowledged. So a device keeps every update it trained until the aggregator's receipt for
its update id arrives, and sends it again after a reconnect, a timeout or a new model.

Each further re-send of the same update waits twice as long as the one before (up to
MAX_BACKOFF_S): an update the aggregator refuses before it can even name it (too large for
its limit, a device it does not know) gets no receipt, and a fleet re-sending such updates
every 30 s forever would be a traffic storm over cellular links.

Pure: times are passed in. Durability is a subclass's business (edge_agent/outbox.py
writes each entry to disk in `put` before anyone may publish it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)
# The longest wait between two re-sends of one update without a receipt.
MAX_BACKOFF_S = 3600.0
# Sends of one update after which its missing receipt is worth a warning.
WARN_AFTER_SENDS = 4


@dataclass(slots=True)
class Pending:
    update_id: str
    round: int
    payload: bytes
    last_sent: float = 0.0  # monotonic time of the last send; 0 = not sent since (re)connect
    sends: int = 0  # times sent by this process, receipt still missing

    def backoff(self, resend_after_s: float) -> float:
        """Seconds to wait after the last send before sending again: resend_after_s after
        the first send, doubling with each further one, at most MAX_BACKOFF_S."""
        doublings = min(max(self.sends - 1, 0), 30)
        return min(resend_after_s * 2.0**doublings, max(resend_after_s, MAX_BACKOFF_S))


class Outbox:
    """Updates awaiting a receipt, in memory. Not thread-safe: one owner drives it."""

    def __init__(self) -> None:
        self._entries: dict[str, Pending] = {}

    def put(self, update_id: str, round: int, payload: bytes) -> Pending:
        entry = Pending(update_id, round, payload)
        self._entries[update_id] = entry
        return entry

    def get(self, update_id: str) -> Pending | None:
        return self._entries.get(update_id)

    def remove(self, update_id: str) -> Pending | None:
        return self._entries.pop(update_id, None)

    def due(self, *, resend_after_s: float, now: float) -> list[Pending]:
        """Entries never sent since the last (re)connect, or whose backoff has passed,
        oldest round first."""
        entries = sorted(self._entries.values(), key=lambda e: (e.round, e.update_id))
        return [e for e in entries
                if e.last_sent == 0.0 or now - e.last_sent >= e.backoff(resend_after_s)]

    def sent(self, entry: Pending, *, connected: bool, now: float) -> None:
        """Record a send. Into a dead link it counts as not sent: it goes out again as
        soon as the link is back, and does not lengthen the backoff."""
        if not connected:
            entry.last_sent = 0.0
            return
        entry.last_sent = now
        entry.sends += 1
        if entry.sends == WARN_AFTER_SENDS:
            log.warning("outbox: update %s (round %d) sent %d times without a receipt; the "
                        "aggregator may be refusing it unread (too large for its "
                        "max_update_bytes? this device unknown to it?); re-sending less "
                        "and less often", entry.update_id, entry.round, entry.sends)

    def mark_unsent(self, *, now: float, older_than_s: float = 0.0,
                    first_send_only: bool = False) -> None:
        """Send again, whatever the timers say, what was sent at least `older_than_s` ago
        (0, after a reconnect: everything; newer sends may still be on their way).
        `first_send_only`: only what was sent once: what has been re-sent already waits
        for its backoff (a refused update must not go out with every new model)."""
        for entry in self._entries.values():
            if first_send_only and entry.sends > 1:
                continue
            if now - entry.last_sent >= older_than_s:
                entry.last_sent = 0.0

    def __len__(self) -> int:
        return len(self._entries)

    def ids(self) -> set[str]:
        return set(self._entries)
