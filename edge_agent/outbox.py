"""The device's outbox on disk: every trained update is written here (atomically) before
it is published and deleted when its receipt arrives, so it survives a reboot.

When to send what again is fedmq/core/outbox.py's business (the ledger this extends).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path

from fedmq.core.outbox import MAX_BACKOFF_S, WARN_AFTER_SENDS, Pending
from fedmq.core.outbox import Outbox as Ledger
from fedmq.storage import atomic_write

__all__ = ["MAX_BACKOFF_S", "WARN_AFTER_SENDS", "Outbox", "Pending"]

log = logging.getLogger(__name__)
_NAME = re.compile(r"(\d{10})-([0-9A-Za-z_.-]{1,64})\.upd")


class Outbox(Ledger):
    """Thread-safe; `directory=None` keeps entries in memory only (simulations). Times
    default to the monotonic clock."""

    def __init__(self, directory: str | Path | None = None) -> None:
        super().__init__()
        self.directory = Path(directory) if directory else None
        self._lock = threading.RLock()
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.directory.glob("*.upd")):
            match = _NAME.fullmatch(path.name)
            if match is None:
                log.warning("outbox: ignoring stray file %s", path)
                continue
            super().put(match.group(2), int(match.group(1)), path.read_bytes())
        if len(self):
            log.info("outbox: %d update(s) from before the restart await a receipt", len(self))

    def _path(self, entry: Pending) -> Path:
        assert self.directory is not None
        return self.directory / f"{entry.round:010d}-{entry.update_id}.upd"

    def put(self, update_id: str, round: int, payload: bytes) -> Pending:
        """Store durably first; only then may the caller publish."""
        if self.directory is not None:
            atomic_write(self._path(Pending(update_id, round, b"")), payload)
        with self._lock:
            return super().put(update_id, round, payload)

    def remove(self, update_id: str) -> Pending | None:
        with self._lock:
            entry = super().remove(update_id)
        if entry is not None and self.directory is not None:
            self._path(entry).unlink(missing_ok=True)
        return entry

    def due(self, *, resend_after_s: float, now: float | None = None) -> list[Pending]:
        with self._lock:
            return super().due(resend_after_s=resend_after_s,
                               now=time.monotonic() if now is None else now)

    def sent(self, entry: Pending, *, connected: bool, now: float | None = None) -> None:
        with self._lock:
            super().sent(entry, connected=connected,
                         now=time.monotonic() if now is None else now)

    def mark_unsent(self, *, older_than_s: float = 0.0, first_send_only: bool = False,
                    now: float | None = None) -> None:
        with self._lock:
            super().mark_unsent(now=time.monotonic() if now is None else now,
                                older_than_s=older_than_s, first_send_only=first_send_only)

    def ids(self) -> set[str]:
        with self._lock:
            return super().ids()
