"""Updates a device trained but the aggregator has not yet confirmed, kept until a receipt.

A broker PUBACK is not delivery: a broker killed before its autosave forgets what it
acknowledged. So every update is written here (atomically, when a directory is given)
before it is published, and removed only when the aggregator's receipt for its update id
arrives. Anything still here is sent again after a reconnect or a timeout, and after a
restart of the agent itself.

Each further re-send of the same update waits twice as long as the one before (up to
MAX_BACKOFF_S): an update the aggregator refuses before it can even name it (too large for
its limit, a device it does not know) gets no receipt, and a fleet re-sending such updates
every 30 s forever would be a traffic storm over cellular links.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fedmq.storage import atomic_write

log = logging.getLogger(__name__)
_NAME = re.compile(r"(\d{10})-([0-9A-Za-z_.-]{1,64})\.upd")
# The longest wait between two re-sends of one update without a receipt.
MAX_BACKOFF_S = 3600.0
# Sends of one update after which its missing receipt is worth a warning.
WARN_AFTER_SENDS = 4


@dataclass
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
    """Thread-safe; `directory=None` keeps entries in memory only (simulations)."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory else None
        self._entries: dict[str, Pending] = {}
        self._lock = threading.Lock()
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            for path in sorted(self.directory.glob("*.upd")):
                match = _NAME.fullmatch(path.name)
                if match is None:
                    log.warning("outbox: ignoring stray file %s", path)
                    continue
                round_, update_id = int(match.group(1)), match.group(2)
                self._entries[update_id] = Pending(update_id, round_, path.read_bytes())
            if self._entries:
                log.info("outbox: %d update(s) from before the restart await a receipt",
                         len(self._entries))

    def _path(self, entry: Pending) -> Path:
        assert self.directory is not None
        return self.directory / f"{entry.round:010d}-{entry.update_id}.upd"

    def put(self, update_id: str, round: int, payload: bytes) -> Pending:
        """Store durably first; only then may the caller publish."""
        entry = Pending(update_id, round, payload)
        if self.directory is not None:
            atomic_write(self._path(entry), payload)
        with self._lock:
            self._entries[update_id] = entry
        return entry

    def remove(self, update_id: str) -> Pending | None:
        with self._lock:
            entry = self._entries.pop(update_id, None)
        if entry is not None and self.directory is not None:
            self._path(entry).unlink(missing_ok=True)
        return entry

    def due(self, *, resend_after_s: float, now: float | None = None) -> list[Pending]:
        """Entries never sent since the last (re)connect, or whose backoff has passed."""
        now = time.monotonic() if now is None else now
        with self._lock:
            entries = sorted(self._entries.values(), key=lambda e: (e.round, e.update_id))
        return [e for e in entries
                if e.last_sent == 0.0 or now - e.last_sent >= e.backoff(resend_after_s)]

    def sent(self, entry: Pending, *, connected: bool, now: float | None = None) -> None:
        """Record a send. Into a dead link it counts as not sent: it goes out again as
        soon as the link is back, and does not lengthen the backoff."""
        if not connected:
            entry.last_sent = 0.0
            return
        entry.last_sent = time.monotonic() if now is None else now
        entry.sends += 1
        if entry.sends == WARN_AFTER_SENDS:
            log.warning("outbox: update %s (round %d) sent %d times without a receipt; the "
                        "aggregator may be refusing it unread (too large for its "
                        "max_update_bytes? this device unknown to it?); re-sending less "
                        "and less often", entry.update_id, entry.round, entry.sends)

    def mark_unsent(self, *, older_than_s: float = 0.0, first_send_only: bool = False,
                    now: float | None = None) -> None:
        """Send again, whatever the timers say, what was sent at least `older_than_s` ago
        (0, after a reconnect: everything; newer sends may still be on their way).
        `first_send_only`: only what was sent once: what has been re-sent already waits
        for its backoff (a refused update must not go out with every new model)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            for entry in self._entries.values():
                if first_send_only and entry.sends > 1:
                    continue
                if now - entry.last_sent >= older_than_s:
                    entry.last_sent = 0.0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def ids(self) -> set[str]:
        with self._lock:
            return set(self._entries)
