"""Payloads bigger than one MQTT message: split into Parts, reassembled with bounded memory.

Pure (no MQTT, no clock: callers pass `now`). The agent splits its update with
`split_payload`; the aggregator feeds the Parts it receives to a `Reassembler`. The model
broadcast (transfer.py) cuts and verifies its chunks with the same `frame` and
`join_verified`, so there is one implementation of each.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from fedmq.core.protocol import Message, Part
from fedmq.errors import ConfigError, ProtocolError

# Largest payload of one MQTT message unless configured otherwise. Hosted brokers cap
# messages at 128-256 KiB, so 128 KiB passes everywhere; a smaller Maximum Packet Size in
# the broker's CONNACK lowers it further (MqttLink.effective_max_payload).
DEFAULT_MAX_PAYLOAD = 128 * 1024
# 8 bytes of the payload's SHA-256: a re-send of the same payload is the same transfer
# (it fills the gaps of the open one); one sender's different payloads never collide.
TRANSFER_ID_BYTES = 8
# `frame` measures the envelope around empty data, whose msgpack bin header is 2 bytes;
# around real data it is up to 5.
_BIN_HEADER_GROWTH = 3
# Keys of closed transfers (finished, expired, superseded or refused) remembered so their
# late parts are ignored quietly, not refused one by one; bounded against floods.
_CLOSED_MEMORY = 1024
# The automatic reassembly budget is never below this (the old fixed default): room for
# the odd multi-part update of a small model, whatever the cohort.
AUTO_BUDGET_FLOOR = 64 << 20
# Shares of the automatic budget beyond one per awaited sender: room for a sender outside
# the cohort (a late update folded into the round, a device that came online unnoticed).
SPARE_SHARES = 1

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
    digest = hashlib.sha256(payload).digest()
    transfer_id = digest[:TRANSFER_ID_BYTES]  # the same on every re-send (see Reassembler)

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

    Parts may arrive more than once; every part must repeat its transfer's manifest and
    none may carry more than it declared. Admission (docs/protocol.md, Part admission):

    - A transfer opens only at its part 0. A device publishes a transfer's parts in order
      over one connection at QoS 1 and MQTT keeps that order, so part 0 comes first unless
      it was refused or lost; a transfer opened at a later part could never complete, yet
      would hold its whole declared size until it timed out (issue 13: 5M-parameter rounds
      stalled on exactly that). A part of a transfer that is not open is dropped: refused
      once as `incomplete` if the transfer was never seen, ignored quietly if it was
      closed (finished, expired, superseded, refused). The device's re-send starts at part
      0 again. A window (admit from index < W) buys nothing in that order and would reopen
      the hole for W parts, so there is none.
    - A re-send keeps its transfer id (split_payload derives it from the payload), so its
      part 0 finds the transfer open and its other parts fill the gaps; part 0 of a closed
      transfer opens it again (a re-send after it expired, or after it completed and the
      receipt was lost: the update is rebuilt and answered again, counted once upstream).
    - Per sender: one open transfer (a new transfer id supersedes the open one, counted in
      `superseded`), whose declared size the caller bounds (aggregator: max_update_bytes).
    - The budget: the declared sizes of open transfers stay within `budget`, a fixed
      `max_pending_bytes`, or (0) automatic: with a round planned, room for every awaited
      sender's share plus SPARE_SHARES, never below AUTO_BUDGET_FLOOR.
    - Fair shares (`plan`): each sender the round awaits has `share` bytes held for it. A
      transfer of an awaited sender within its share needs only room in the budget; any
      other transfer (a sender outside the cohort, or above its share) only room beyond
      every awaited sender's unused share, and a new plan evicts such transfers (counted
      in `evicted`) if the new cohort's shares need their room. So no sender's garbage,
      whatever it declares or however it sends, can take room an awaited sender's update
      needs.

    A transfer that got no new part for `timeout_s` is dropped by `expire`.
    """

    def __init__(self, *, timeout_s: float, max_pending_bytes: int = 0) -> None:
        if not timeout_s > 0:
            raise ConfigError(f"the chunk timeout (chunk_timeout_s) must be > 0, not {timeout_s}")
        if max_pending_bytes < 0:
            raise ConfigError(f"max_pending_bytes must be >= 0 (0: automatic), not "
                              f"{max_pending_bytes}")
        self.timeout_s = timeout_s
        self.max_pending_bytes = max_pending_bytes  # 0: automatic (see budget)
        self.budget = max_pending_bytes or AUTO_BUDGET_FLOOR
        self.pending_bytes = 0  # part data held by incomplete transfers
        self.reserved_bytes = 0  # their declared sizes: within the budget when admitted
        self.ignored_parts = 0  # duplicates, and late parts of closed transfers
        self.superseded = 0  # open transfers dropped for a newer one from the same sender
        self.evicted = 0  # ... or to make room for the senders a new plan awaits
        self.share = 0  # bytes held for each awaited sender (0: no round planned)
        self._open: dict[tuple[str, bytes], _Transfer] = {}
        self._open_by_source: dict[str, bytes] = {}  # sender -> its open transfer's id
        self._closed: dict[tuple[str, bytes], float] = {}  # -> when last heard of
        self._awaited: set[str] = set()  # senders the round awaits an update from
        self._held = 0  # unused shares of awaited senders: sum of _unused_share()

    @property
    def pending_transfers(self) -> int:
        return len(self._open)

    @property
    def held_bytes(self) -> int:
        """Budget kept for awaited senders that have not (fully) claimed their share."""
        return self._held

    def plan(self, awaited: Iterable[str], *, share: int) -> None:
        """A round starts (or is announced again): `awaited` are the senders it waits for
        (its cohort, less those already counted), each to be sure of `share` bytes."""
        if share < 0:
            raise ConfigError(f"a reassembly share must be >= 0, not {share}")
        self.share = share
        self._awaited = set(awaited)
        self._held = sum(self._unused_share(s) for s in self._awaited)
        self._resize()
        self._make_room()

    def expect(self, sender: str) -> None:
        """One more awaited sender (a device came online in a round that asks everyone)."""
        if sender not in self._awaited:
            self._awaited.add(sender)
            self._held += self._unused_share(sender)
            self._resize()
            self._make_room()

    def delivered(self, sender: str) -> None:
        """The round counted `sender`'s update: its share is no longer held."""
        if sender in self._awaited:
            self._held -= self._unused_share(sender)
            self._awaited.discard(sender)

    def offer(self, source: str, part: Part, now: float, *,
              wire_bytes: int = 0) -> Assembled | None:
        """Take one part (`wire_bytes`: its MQTT payload size); the payload once complete.

        Raises ProtocolError: `too_large` (no room for a new transfer), `incomplete` (a
        part of a transfer whose part 0 never came: dropped), `bad_chunks` (the part
        disagrees with earlier ones and is dropped), `bad_hash` (complete but corrupt;
        the transfer is dropped).
        """
        key = (source, part.transfer_id)
        transfer = self._open.get(key)
        if transfer is None:
            if part.index != 0:
                return self._not_open(key, part, now)
            self._closed.pop(key, None)  # a re-send: opens the transfer again
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
        self._close(key, now)
        payload = join_verified((transfer.pieces[i] for i in range(count)), size=size,
                                sha256=sha256, what=what)
        return Assembled(payload, transfer.wire_bytes)

    def expire(self, now: float) -> int:
        """Drop transfers that got no new part for `timeout_s`, freeing their memory;
        returns how many were dropped."""
        stale = [key for key, t in self._open.items() if now - t.touched > self.timeout_s]
        for key in stale:
            self._close(key, now)
        self._closed = {key: at for key, at in self._closed.items()
                        if now - at <= self.timeout_s}
        return len(stale)

    def _not_open(self, key: tuple[str, bytes], part: Part, now: float) -> None:
        """A part other than 0 of a transfer that is not open: never admitted."""
        seen = self._closed.pop(key, None) is not None
        self._remember(key, now)  # its further parts are ignored quietly
        if seen:
            self.ignored_parts += 1
            return None
        raise ProtocolError(
            f"{_describe(key)}: part {part.index} of {part.count} arrived, but part 0 of its "
            "transfer never did (refused, lost, or sent before a restart); a transfer opens "
            "only at its part 0, so it was dropped: the device's re-send starts it again",
            reason="incomplete",
        )

    def _admit(self, key: tuple[str, bytes], part: Part, now: float) -> _Transfer:
        source = key[0]
        older = self._open_by_source.get(source)
        if older is not None:
            self._close((source, older), now)
            self.superseded += 1
        own = self._unused_share(source)  # the sender's whole share if awaited, else 0
        within_share = own > 0 and part.size <= self.share
        needed = part.size + (0 if within_share else self._held - own)
        if self.reserved_bytes + needed > self.budget:
            self._remember(key, now)  # its other parts are ignored, not refused one by one
            held = "" if within_share else (f", and {self._held - own} bytes held for "
                                            "the updates the round awaits")
            how = "set" if self.max_pending_bytes else "automatic"
            raise ProtocolError(
                f"{_describe(key)} declares {part.size} bytes; with {self.reserved_bytes} bytes "
                f"of other transfers pending{held}, that exceeds the reassembly budget of "
                f"{self.budget} bytes (max_pending_bytes, {how}); the device's re-send "
                "starts it again: raise max_pending_bytes (or set it to 0, automatic) if "
                "honest devices hit this",
                reason="too_large",
            )
        transfer = _Transfer(manifest=(part.count, part.size, part.sha256), touched=now)
        self._open[key] = transfer
        self._open_by_source[source] = key[1]
        self.reserved_bytes += part.size
        self._held += self._unused_share(source) - own
        return transfer

    def _close(self, key: tuple[str, bytes], now: float) -> None:
        source = key[0]
        own = self._unused_share(source)
        transfer = self._open.pop(key)
        if self._open_by_source.get(source) == key[1]:
            del self._open_by_source[source]
        self.reserved_bytes -= transfer.manifest[1]
        self.pending_bytes -= transfer.held
        self._held += self._unused_share(source) - own
        self._remember(key, now)

    def _make_room(self) -> None:
        """Drop transfers of senders the round does not await, stalest first, until every
        awaited sender's share fits again: one admitted while the room was free (between
        rounds, or after the awaited updates were in) must not keep a new cohort out."""
        excess = self.reserved_bytes + self._held - self.budget
        outsiders = sorted((t.touched, key) for key, t in self._open.items()
                           if key[0] not in self._awaited)
        for touched, key in outsiders:
            if excess <= 0:
                break
            excess -= self._open[key].manifest[1]
            self._close(key, touched)
            self.evicted += 1

    def _remember(self, key: tuple[str, bytes], now: float) -> None:
        self._closed.pop(key, None)  # to the end: the oldest goes first
        self._closed[key] = now
        if len(self._closed) > _CLOSED_MEMORY:
            del self._closed[next(iter(self._closed))]

    def _unused_share(self, sender: str) -> int:
        """What the budget holds for `sender` beyond its open transfer: its share less
        what that transfer declared, if the round awaits it; else 0."""
        if sender not in self._awaited:
            return 0
        transfer_id = self._open_by_source.get(sender)
        declared = 0 if transfer_id is None else self._open[(sender, transfer_id)].manifest[1]
        return max(0, self.share - declared)

    def _resize(self) -> None:
        if not self.max_pending_bytes:
            self.budget = max(AUTO_BUDGET_FLOOR,
                              self.share * (len(self._awaited) + SPARE_SHARES))


def _describe(key: tuple[str, bytes]) -> str:
    return f"transfer {key[1].hex()} from {key[0]}"
