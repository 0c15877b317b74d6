"""The device's outbox on disk: every trained update is written here before it is
published and forgotten when its receipt arrives, so it survives a reboot.

Each entry goes in place into a slot file (`slot-N.out`) that earlier entries left free:
a header (magic, round, lengths, CRC32) and the update id and payload after it, then one
fdatasync. No temporary file, rename or directory fsync per update (those cost ~4x one
fdatasync here, on rounds of ~10 ms); a slot's name is made durable once, when the slot
is first created. A write torn by a crash fails its CRC and is ignored: the update was
never published. A receipted entry's slot is marked free (its magic zeroed, not synced):
should a crash bring it back, the update is sent again and receipted again, counted once.

When to send what again is fedmq/core/outbox.py's business (the ledger this extends).
"""

from __future__ import annotations

import logging
import os
import re
import struct
import threading
import time
import zlib
from pathlib import Path

from fedmq.core.outbox import MAX_BACKOFF_S, WARN_AFTER_SENDS, Pending
from fedmq.core.outbox import Outbox as Ledger
from fedmq.storage import datasync, fsync_dir, pwrite_all

__all__ = ["MAX_BACKOFF_S", "WARN_AFTER_SENDS", "Outbox", "Pending"]

log = logging.getLogger(__name__)
_SLOT = re.compile(r"slot-(\d{1,6})\.out")
# Files of the outbox before slots (one per update, written then renamed): read once and
# moved into slots.
_LEGACY = re.compile(r"(\d{10})-([0-9A-Za-z_.-]{1,64})\.upd")
_HEADER = struct.Struct("<4sQHQI")  # magic, round, id length, payload length, CRC32
_MAGIC = b"FQO1"
_FREE = b"\0\0\0\0"
# Slots kept on disk once free (a device offline for long may have piled up more):
# further ones are deleted when their receipt arrives.
KEEP_SLOTS = 4


class Outbox(Ledger):
    """Thread-safe; `directory=None` keeps entries in memory only (simulations). Times
    default to the monotonic clock."""

    def __init__(self, directory: str | Path | None = None) -> None:
        super().__init__()
        self.directory = Path(directory) if directory else None
        self._lock = threading.RLock()
        self._slot_of: dict[str, int] = {}  # update id -> its slot
        self._free: set[int] = set()  # slot files on disk holding nothing
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self._load()
        if len(self):
            log.info("outbox: %d update(s) from before the restart await a receipt", len(self))

    def _load(self) -> None:
        assert self.directory is not None
        legacy = []
        for path in sorted(self.directory.iterdir()):
            if (match := _SLOT.fullmatch(path.name)) is not None:
                slot = int(match.group(1))
                entry = _read_slot(path)
                if entry is None or entry.update_id in self._slot_of:  # free, torn, twice
                    self._free.add(slot)
                else:
                    super().put(entry.update_id, entry.round, entry.payload)
                    self._slot_of[entry.update_id] = slot
            elif (match := _LEGACY.fullmatch(path.name)) is not None:
                legacy.append((path, match.group(2), int(match.group(1))))
            elif not path.name.startswith("."):
                log.warning("outbox: ignoring stray file %s", path)
        for path, update_id, round in legacy:  # into slots, then the old file goes
            if update_id not in self._slot_of:
                self.put(update_id, round, path.read_bytes())
            path.unlink()

    def _path(self, slot: int) -> Path:
        assert self.directory is not None
        return self.directory / f"slot-{slot}.out"

    def put(self, update_id: str, round: int, payload: bytes) -> Pending:
        """Store durably first; only then may the caller publish."""
        with self._lock:
            if self.directory is not None:
                self._store(update_id, round, payload)
            return super().put(update_id, round, payload)

    def _store(self, update_id: str, round: int, payload: bytes) -> None:
        slot = self._slot_of.get(update_id)
        if slot is None:  # a free slot file, else the first number not in use
            used = set(self._slot_of.values())
            slot = min(self._free) if self._free else \
                next(i for i in range(len(used) + 1) if i not in used)
        key = update_id.encode()
        crc = zlib.crc32(payload, zlib.crc32(key))
        header = _HEADER.pack(_MAGIC, round, len(key), len(payload), crc)
        path = self._path(slot)
        created = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            pwrite_all(fd, (header, key, payload), 0)
            datasync(fd)
        finally:
            os.close(fd)
        if created:  # the new name itself must survive a crash
            fsync_dir(self.directory)
        self._free.discard(slot)
        self._slot_of[update_id] = slot

    def remove(self, update_id: str) -> Pending | None:
        with self._lock:
            entry = super().remove(update_id)
            slot = self._slot_of.pop(update_id, None)
            if slot is None or self.directory is None:
                return entry
            path = self._path(slot)
            try:
                if slot >= KEEP_SLOTS:
                    path.unlink()
                else:
                    fd = os.open(path, os.O_WRONLY)
                    try:
                        os.pwrite(fd, _FREE, 0)  # not synced: see the module's docstring
                    finally:
                        os.close(fd)
                    self._free.add(slot)
            except FileNotFoundError:  # someone else's cleanup; nothing is held there
                pass
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


def _read_slot(path: Path) -> Pending | None:
    """The entry a slot holds, or None: free, torn by a crash, or not a slot."""
    data = path.read_bytes()
    if len(data) < _HEADER.size:
        return None
    magic, round, key_len, payload_len, crc = _HEADER.unpack_from(data)
    end = _HEADER.size + key_len + payload_len
    if magic != _MAGIC or len(data) < end:
        return None
    body = memoryview(data)[_HEADER.size:end]
    if zlib.crc32(body) != crc:
        return None
    try:
        update_id = bytes(body[:key_len]).decode()
    except UnicodeDecodeError:
        return None
    return Pending(update_id, round, bytes(body[key_len:]))
