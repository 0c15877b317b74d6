"""Payloads bigger than one MQTT message: split into Parts, reassembled with bounded memory.

Pure (no MQTT, no clock: callers pass `now`). The agent splits its update with
`split_payload`; the aggregator feeds the Parts it receives to a `Reassembler`. The model
broadcast (transfer.py) cuts and verifies its chunks with the same `frame` and
`join_verified`, so there is one implementation of each.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from fedmq.core.protocol import Message, Part
from fedmq.errors import ConfigError, ProtocolError

# Largest payload of one MQTT message unless configured otherwise. Hosted brokers cap
# messages at 128-256 KiB, so 128 KiB passes everywhere; a smaller Maximum Packet Size in
# the broker's CONNACK lowers it further (MqttLink.effective_max_payload).
DEFAULT_MAX_PAYLOAD = 128 * 1024
# 8 random bytes: one sender's concurrent transfers never collide, at 10 bytes per part.
TRANSFER_ID_BYTES = 8
# `frame` measures the envelope around empty data, whose msgpack bin header is 2 bytes;
# around real data it is up to 5.
_BIN_HEADER_GROWTH = 3
# Keys of finished transfers remembered so late duplicates of their parts are ignored
# instead of opening a transfer that can only time out; bounded against floods.
_FINISHED_MEMORY = 1024

M = TypeVar("M", bound=Message)


def frame(payload: bytes, *, max_payload: int, make: Callable[[int, int, bytes], M]) -> list[M]:
    """Cut `payload` into messages `make(index, count, data)` that each encode to at most
    `max_payload` bytes; the envelope is measured, not guessed."""
    n = max(len(payload), 1)
    # No index or count exceeds these, and a msgpack integer never shrinks as it grows.
    overhead = len(make(n - 1, n, b"").to_payload()) + _BIN_HEADER_GROWTH
    step = max_payload - overhead
    if step < 1:
        raise ConfigError(
            f"a payload limit of {max_payload} bytes leaves no room for data beside the "
            f"{overhead}-byte envelope; raise max_payload or the broker's maximum packet size"
        )
    pieces = [payload[i : i + step] for i in range(0, len(payload), step)] or [b""]
    return [make(i, len(pieces), piece) for i, piece in enumerate(pieces)]


def split_payload(payload: bytes, *, max_payload: int) -> list[bytes]:
    """`[payload]` itself if it fits in `max_payload` bytes, else the encoded Parts of it."""
    if len(payload) <= max_payload:
        return [payload]
    transfer_id = os.urandom(TRANSFER_ID_BYTES)
    digest = hashlib.sha256(payload).digest()

    def make(index: int, count: int, data: bytes) -> Part:
        return Part(transfer_id=transfer_id, index=index, count=count, size=len(payload),
                    sha256=digest, data=data)

    return [part.to_payload() for part in frame(payload, max_payload=max_payload, make=make)]


def join_verified(pieces: Iterable[bytes], *, size: int, sha256: bytes, what: str) -> bytes:
    """The pieces joined in order, if they make `size` bytes with this SHA-256 (else bad_hash)."""
    blob = b"".join(pieces)
    digest = hashlib.sha256(blob).digest()
    if len(blob) != size or digest != sha256:
        raise ProtocolError(
            f"{what}: reassembled {len(blob)} bytes with SHA-256 {digest.hex()[:16]}..., the "
            f"manifest promised {size} bytes with {sha256.hex()[:16]}...; corrupted by the "
            "sender or in transit, so discarded: check the sender's software and the network",
            reason="bad_hash",
        )
    return blob


@dataclass(frozen=True, slots=True)
class Assembled:
    """A payload rebuilt from its parts; `wire_bytes` is what those parts cost on the wire."""

    payload: bytes
    wire_bytes: int


@dataclass
class _Transfer:
    manifest: tuple[int, int, bytes]  # count, size, sha256: every part must repeat it
    touched: float  # when its last new part arrived
    pieces: dict[int, bytes] = field(default_factory=dict)
    held: int = 0
    wire_bytes: int = 0


class Reassembler:
    """Rebuilds payloads from their Parts, per (sender, transfer id), in bounded memory.

    Parts may arrive in any order and more than once. A transfer is admitted only if its
    declared size fits under `max_pending_bytes` beside the transfers already open, and none
    may hold more than it declared, so a hostile sender cannot exhaust memory; a transfer
    that got no new part for `timeout_s` is dropped by `expire`.

    A sender has one transfer open at a time: a new transfer id from it supersedes the one
    it had open. A device sends its parts in order over one connection, so a new transfer
    means it gave up on (or re-sent) the old one; and one sender starting transfer after
    transfer can hold no more of the shared budget than one update's size, instead of
    filling it and stalling every other device's multi-part update.
    """

    def __init__(self, *, timeout_s: float, max_pending_bytes: int) -> None:
        if not timeout_s > 0:
            raise ConfigError(f"the chunk timeout (chunk_timeout_s) must be > 0, not {timeout_s}")
        if max_pending_bytes < 1:
            raise ConfigError(f"max_pending_bytes must be >= 1, not {max_pending_bytes}")
        self.timeout_s = timeout_s
        self.max_pending_bytes = max_pending_bytes
        self.pending_bytes = 0  # part data held by incomplete transfers
        self.reserved_bytes = 0  # their declared sizes: never above max_pending_bytes
        self.ignored_parts = 0  # duplicates, and late parts of finished transfers
        self.superseded = 0  # open transfers dropped for a newer one from the same sender
        self._open: dict[tuple[str, bytes], _Transfer] = {}
        self._open_by_source: dict[str, bytes] = {}  # sender -> its open transfer's id
        self._finished: dict[tuple[str, bytes], float] = {}

    @property
    def pending_transfers(self) -> int:
        return len(self._open)

    def offer(self, source: str, part: Part, now: float, *,
              wire_bytes: int = 0) -> Assembled | None:
        """Take one part (`wire_bytes`: its MQTT payload size); the payload once complete.

        Raises ProtocolError: `too_large` (no room for a new transfer), `bad_chunks` (the
        part disagrees with earlier ones and is dropped), `bad_hash` (complete but corrupt;
        the transfer is dropped).
        """
        key = (source, part.transfer_id)
        if key in self._finished:
            self.ignored_parts += 1
            return None
        transfer = self._open.get(key)
        if transfer is None:
            transfer = self._admit(key, part, now)
        what = _describe(key)
        count, size, sha256 = transfer.manifest
        if (part.count, part.size, part.sha256) != transfer.manifest:
            raise ProtocolError(
                f"{what}: part {part.index} declares {part.count} parts of {part.size} bytes "
                f"(SHA-256 {part.sha256.hex()[:16]}...) where earlier parts declared {count} "
                f"of {size} bytes ({sha256.hex()[:16]}...); the part was dropped",
                reason="bad_chunks",
            )
        if part.index in transfer.pieces:
            self.ignored_parts += 1
            return None
        if transfer.held + len(part.data) > size:
            raise ProtocolError(f"{what}: parts carry more than the declared {size} bytes; "
                                "the part was dropped", reason="bad_chunks")
        transfer.pieces[part.index] = part.data
        transfer.held += len(part.data)
        transfer.wire_bytes += wire_bytes
        transfer.touched = now
        self.pending_bytes += len(part.data)
        if len(transfer.pieces) < count:
            return None
        self._finish(key, now)
        payload = join_verified((transfer.pieces[i] for i in range(count)), size=size,
                                sha256=sha256, what=what)
        return Assembled(payload, transfer.wire_bytes)

    def expire(self, now: float) -> int:
        """Drop transfers that got no new part for `timeout_s`, freeing their memory;
        returns how many were dropped."""
        stale = [key for key, t in self._open.items() if now - t.touched > self.timeout_s]
        for key in stale:
            self._finish(key, now)
        self._finished = {key: at for key, at in self._finished.items()
                          if now - at <= self.timeout_s}
        return len(stale)

    def _admit(self, key: tuple[str, bytes], part: Part, now: float) -> _Transfer:
        older = self._open_by_source.get(key[0])
        if older is not None:
            self._finish((key[0], older), now)
            self.superseded += 1
        if self.reserved_bytes + part.size > self.max_pending_bytes:
            raise ProtocolError(
                f"{_describe(key)} declares {part.size} bytes; with {self.reserved_bytes} bytes "
                f"of other transfers pending, that exceeds max_pending_bytes "
                f"({self.max_pending_bytes}): raise it if honest devices hit this",
                reason="too_large",
            )
        transfer = _Transfer(manifest=(part.count, part.size, part.sha256), touched=now)
        self._open[key] = transfer
        self._open_by_source[key[0]] = key[1]
        self.reserved_bytes += part.size
        return transfer

    def _finish(self, key: tuple[str, bytes], now: float) -> None:
        transfer = self._open.pop(key)
        if self._open_by_source.get(key[0]) == key[1]:
            del self._open_by_source[key[0]]
        self.reserved_bytes -= transfer.manifest[1]
        self.pending_bytes -= transfer.held
        self._finished[key] = now
        if len(self._finished) > _FINISHED_MEMORY:
            del self._finished[next(iter(self._finished))]


def _describe(key: tuple[str, bytes]) -> str:
    return f"transfer {key[1].hex()} from {key[0]}"
