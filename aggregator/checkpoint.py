"""The aggregator's state on disk: the model once per round, the open round on every commit.

Within a round only the open round changes (its running sum, who counted), yet it must be
on disk before any of its updates is acknowledged, many times a second under load; and
each new model must be on disk before it is published, once a round, which sets how
short a round can be. So:

- `path` holds the whole state (model, optimizer, history, open round), written
  write-then-rename when this process first saves;
- two model slots next to it (`path.model-0`, `path.model-1`) take turns holding the
  whole state each time the model's version changes after that;
- two journal slots (`path.round-0`, `path.round-1`) take turns holding everything but
  the model, optimizer and history after every other commit;
- the history's round records beyond the newest HISTORY_INLINE go to an append-only
  file (`path.history`, length- and CRC-framed), rewritten whole by each process's
  first save;
- an append-only list in the state (storage.AppendOnly: a robust rule's kept updates)
  goes, in journal slots, to a side file (`path.NAME-0`/`-1`, framed the same way, each
  entry tagged with the list it belongs to): a commit appends only the entries new since the
  last and fdatasyncs them before the slot that counts them, so its cost does not grow
  with the round's updates (a slot holds the count, not the updates). A new list (a new
  round) starts over in the other file: the newest durable state may still count
  entries of the one in use. Whole-state and model writes hold the list itself.

A slot is overwritten in place (no new file, no rename, no directory entry to make
durable: one fdatasync of blocks the file already owns, ~0.25 ms here against ~2 ms for
write-then-rename, on rounds of ~10 ms), framed by a sequence number, its length and a
CRC32, so a write torn by a crash is recognised and the other slot, one commit older and
never acknowledged past, is used.

On load, the newest of `path` and the model slots written after it by the same process
(a random run id ties them: slots left behind when an operator moved the file away never
count for a new one) is the base; the newest journal slot written after the base, for
the same model version and layout, then replaces its open round.
"""
from __future__ import annotations

import logging
import os
import secrets
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmq import storage

log = logging.getLogger(__name__)

# Parts of state["machine"] that change only when the model's version does.
MODEL_KEYS = ("params", "optimizer")
# Parts of the state that change only when the model's version does: a closed round's
# record joins the history with the model it made. Journal slots leave them out, so a
# commit's cost does not grow with the rounds run (a 30-minute soak closes ~570).
VERSION_KEYS = ("history",)
# The newest round records a model write holds itself; older ones are in the append-only
# history file (`path.history`), made durable every HISTORY_INLINE // 2 rounds, so a
# model write costs the same at round 10 and at round 100,000 (with the whole history
# inline, ~1 ms of packing and 165 KB per write at 570 rounds).
HISTORY_INLINE = 64
_FRAME = struct.Struct("<II")  # a history record's or side-file entry's length and CRC32
_APPENDED = "__appended__"  # a journal's reference to an AppendOnly list's side file
# What a slot must share with the whole-state file to count.
_SAME = ("version", "layout_hash", "format")
_HEADER = struct.Struct("<4sIQQI")  # magic, format, sequence, body length, CRC32 of body
_MAGIC = b"FQJ1"
_FORMAT = 1
_SLOTS = 2


@dataclass
class _SideFile:
    """Where this process appends one AppendOnly list: which of its two files, the list
    it mirrors (a new list starts over), the tag its entries carry, what is written."""

    index: int
    items: Sequence[Any]
    tag: str
    count: int = 0
    nbytes: int = 0


class CheckpointStore:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.slots = [self.path.with_name(f"{self.path.name}.round-{i}") for i in range(_SLOTS)]
        self.model_slots = [self.path.with_name(f"{self.path.name}.model-{i}")
                            for i in range(_SLOTS)]
        self._seq = 0  # of the last save; every save takes the next number
        self._run = secrets.token_hex(8)  # this process's whole file and slots carry it
        self._model_version: int | None = None  # version of the model in `path`, if current
        self._fds: dict[Path, int] = {}
        self._file_written = False  # `path` holds this process's run: model slots may follow
        self.history_path = self.path.with_name(f"{self.path.name}.history")
        self._history_count = 0  # records in the history file, written by this process
        self._history_synced = 0  # of those, the ones known to be on disk
        self._sides: dict[str, _SideFile] = {}  # AppendOnly lists by name
        self.full_writes = 0  # saves of the whole state: `path` once, then model slots
        self.file_writes = 0
        self.journal_writes = 0
        self.journal_bytes = 0  # written by journal saves: slots and side-file entries

    # -- writing -------------------------------------------------------------------------
    def save(self, state: dict[str, Any]) -> None:
        """Make `state` durable: the whole file if the model changed, else one journal slot."""
        self._seq += 1
        version = state["machine"]["version"]
        if version != self._model_version:
            whole = {**self._history_split(state), "seq": self._seq, "run": self._run}
            if self._file_written:
                self._write_slot(whole, self.model_slots[self.full_writes % _SLOTS])
            else:
                storage.save_state(self.path, whole)
                self._file_written = True
                self.file_writes += 1
            self._model_version = version
            self.full_writes += 1
            # it holds its AppendOnly lists itself: the next journal starts them over (in
            # either file) and the list of a closed round is not kept alive here
            self._sides.clear()
            return
        machine = {k: v for k, v in state["machine"].items() if k not in MODEL_KEYS}
        journal = {k: v for k, v in state.items() if k not in VERSION_KEYS}
        self.journal_bytes += self._write_slot(
            {**journal, "machine": machine, "seq": self._seq, "run": self._run},
            self.slots[self._seq % _SLOTS], appended=True)
        self.journal_writes += 1

    def _history_split(self, state: dict[str, Any]) -> dict[str, Any]:
        """`state` with its history as the newest records (`history_tail`) and a count;
        the older ones go to the history file first (durable before the state naming
        them is). The first save of a process writes the file afresh: whatever an earlier
        run left in it past what it made durable never counts."""
        if "history" not in state:
            return state
        history = state["history"]
        start = max(0, len(history) - HISTORY_INLINE)
        if not self._file_written:
            storage.atomic_write(self.history_path, b"".join(map(_frame, history[:start])))
            self._history_count = self._history_synced = start
        elif len(history) > self._history_count:
            fd = self._fds.get(self.history_path)
            if fd is None:
                fd = self._fds[self.history_path] = os.open(self.history_path, os.O_WRONLY)
            frames = b"".join(map(_frame, history[self._history_count:]))
            storage.pwrite_all(fd, [frames], os.fstat(fd).st_size)
            self._history_count = len(history)
            if start > self._history_synced or \
                    self._history_count - self._history_synced >= HISTORY_INLINE // 2:
                storage.datasync(fd)
                self._history_synced = self._history_count
        rest = {k: v for k, v in state.items() if k != "history"}
        return {**rest, "history_tail": history[start:], "history_total": len(history)}

    def _with_history(self, state: dict[str, Any]) -> dict[str, Any]:
        """The inverse of `_history_split` (states of older versions hold it whole)."""
        if "history_total" not in state:
            return state
        tail, total = state.pop("history_tail"), state.pop("history_total")
        start = total - len(tail)
        older = _read_frames(self.history_path, limit=start) if start else []
        if len(older) < start:
            log.warning("checkpoint history %s holds %d of the %d oldest round records; the "
                        "rest are missing from the history (the model and rounds are not "
                        "affected)", self.history_path, len(older), start)
        return {**state, "history": older + list(tail)}

    def _write_slot(self, journal: dict[str, Any], path: Path, *,
                    appended: bool = False) -> int:
        """Write `journal` to a slot and make it durable; the bytes written. With
        `appended`, AppendOnly lists go to their side files first (see _append)."""
        unsynced: dict[int, int] = {}  # side files appended to: bytes
        parts = storage.dump_parts(
            journal, appended=(lambda marker: self._append(marker, unsynced)) if appended
            else None)
        for fd in unsynced:  # the entries are on disk before the slot that counts them
            storage.datasync(fd)
        length, crc = 0, 0
        for part in parts:
            length += len(part)
            crc = zlib.crc32(part, crc)
        fd = self._slot_fd(path)
        written = storage.pwrite_all(fd, [_HEADER.pack(_MAGIC, _FORMAT, self._seq, length, crc),
                                   *parts], 0)
        storage.datasync(fd)
        return written + sum(unsynced.values())

    def _append(self, marker: storage.AppendOnly, unsynced: dict[int, int]) -> dict[str, Any]:
        """Write the entries `marker` gained since the last save to its side file (not
        yet synced: `unsynced` gets its fd and the bytes); the reference a journal holds
        instead of the list. A new list starts over in the list's other file, whose
        entries the newest durable state no longer counts (it counts the file in use, or
        none). Each entry carries the list's tag: entries of an earlier list left in the
        file never pass for its own."""
        side = self._sides.get(marker.name)
        if side is None or side.items is not marker.items or marker.count < side.count:
            if not marker.name.isidentifier():
                raise ValueError(f"AppendOnly name {marker.name!r} must be an identifier "
                                 "(it names a file)")
            side = self._sides[marker.name] = _SideFile(
                index=0 if side is None else 1 - side.index, items=marker.items,
                tag=f"{self._run}-{self._seq}")
        if marker.count > side.count:
            fd = self._slot_fd(self._side_path(marker.name, side.index))
            frames = b"".join(_frame([side.tag, entry])
                              for entry in marker.packed(side.count))
            side.nbytes += storage.pwrite_all(fd, [frames], side.nbytes)
            side.count = marker.count
            unsynced[fd] = unsynced.get(fd, 0) + len(frames)
        return {_APPENDED: marker.name, "file": side.index, "tag": side.tag,
                "count": side.count}

    def _side_path(self, name: str, index: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{name}-{index}")

    def _resolve(self, obj: Any) -> Any:
        """`obj` with each side-file reference replaced by the entries it counts
        (StateError if the file holds fewer)."""
        if isinstance(obj, dict):
            if _APPENDED in obj:
                return self._read_side(obj)
            return {k: self._resolve(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self._resolve(v) for v in obj]
        return obj

    def _read_side(self, ref: dict[str, Any]) -> list[Any]:
        path = self._side_path(str(ref[_APPENDED]), int(ref["file"]))
        count, tag = int(ref["count"]), ref["tag"]
        entries = []
        for entry in _read_frames(path, limit=count):
            if not (isinstance(entry, list) and len(entry) == 2 and entry[0] == tag):
                break
            entries.append(entry[1])
        if len(entries) < count:
            raise storage.StateError(f"{path} holds {len(entries)} of the {count} entries "
                                     "its journal counts")
        return entries

    def _slot_fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            existed = path.exists()
            fd = self._fds[path] = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            if not existed:  # the new name itself must survive a crash
                storage.fsync_dir(path.parent)
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    # -- reading -------------------------------------------------------------------------
    def load(self) -> dict[str, Any] | None:
        """The newest durable state, or None when nothing was saved yet."""
        state = storage.load_state(self.path)
        if state is None:
            return None
        seq, run = int(state.pop("seq", 0)), state.pop("run", None)
        models = [m for m in map(_read_slot, self.model_slots) if m is not None]
        journals = [j for j in map(_read_slot, self.slots) if j is not None]
        # later saves number on
        self._seq = max([seq] + [j["seq"] for j in journals + models])
        newer = [m for m in models if m["seq"] > seq and m.get("run") == run]
        if newer:
            state = max(newer, key=lambda m: m["seq"])
            seq = int(state.pop("seq"))
            del state["run"]
        machine = state["machine"]
        current = [j for j in journals
                   if j["seq"] > seq and j.get("run") == run
                   and all(j["machine"].get(k) == machine.get(k) for k in _SAME)]
        state = self._with_history(state)
        for newest in sorted(current, key=lambda j: j["seq"], reverse=True):
            try:
                newest = self._resolve(newest)
            except storage.StateError as exc:  # not from a crash: written before the slot
                log.error("checkpoint journal %d is incomplete (%s); using the commit before "
                          "it: updates acknowledged in between are lost", newest["seq"], exc)
                continue
            model = {k: machine[k] for k in MODEL_KEYS}
            del newest["seq"], newest["run"]
            of_version = {k: state[k] for k in VERSION_KEYS if k in state}
            return {**newest, **of_version, "machine": {**newest["machine"], **model}}
        return state


def _frame(record: Any) -> bytes:
    """A record of an append-only file: length, CRC32, msgpack."""
    body = storage.dumps(record)
    return _FRAME.pack(len(body), zlib.crc32(body)) + body


def _read_frames(path: Path, *, limit: int) -> list[Any]:
    """Up to `limit` records of an append-only file (`_frame`), up to the first torn or
    missing one."""
    try:
        data = memoryview(path.read_bytes())
    except FileNotFoundError:
        return []
    records, offset = [], 0
    while len(records) < limit and offset + _FRAME.size <= len(data):
        length, crc = _FRAME.unpack_from(data, offset)
        body = data[offset + _FRAME.size:offset + _FRAME.size + length]
        if len(body) != length or zlib.crc32(body) != crc:
            break
        try:
            records.append(storage.loads(bytes(body)))
        except storage.StateError:
            break
        offset += _FRAME.size + length
    return records


def _read_slot(path: Path) -> dict[str, Any] | None:
    """A slot's journal, or None if it is missing, torn or not ours."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if len(data) < _HEADER.size:
        return None
    magic, fmt, seq, length, crc = _HEADER.unpack_from(data)
    body = memoryview(data)[_HEADER.size:_HEADER.size + length]
    if magic != _MAGIC or fmt != _FORMAT or len(body) != length or zlib.crc32(body) != crc:
        return None
    try:
        journal = storage.load_parts(body)
    except storage.StateError:
        return None
    return journal if journal.get("seq") == seq else None
