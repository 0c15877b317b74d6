"""The secure-aggregation messages, frozen and versioned like every fedmq payload.

They share the msgpack envelope of `fedmq.core.protocol.wire` (`$v` protocol version,
`$k` kind; kinds start with "sa."), and every one names the round and the 16-byte
session, so a message of another round or a restarted one is refused by a comparison.
Peers inside a message are device *indices* into `SecAggSetup.participants` (compact;
the topic already names the device). Stages and flows: docs/secagg.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedmq.core.protocol.messages import _require
from fedmq.core.protocol.topics import check_name
from fedmq.core.protocol.wire import MAX_DECODED_BYTES, Message, WireObject, wire
from fedmq.core.secagg.field import Field, Quantizer
from fedmq.core.secagg.graph import check_parameters
from fedmq.core.secagg.keys import KEY_BYTES, NONCE_BYTES, TAG_BYTES
from fedmq.core.secagg.shamir import SHARE_BYTES
from fedmq.errors import ConfigError, ProtocolError

SESSION_BYTES = 16
# A share ciphertext: nonce, the two 48-byte shares, the Poly1305 tag.
SHARE_CIPHERTEXT_BYTES = NONCE_BYTES + 2 * SHARE_BYTES + TAG_BYTES


def _check_round(round: int, session: bytes) -> None:
    _require(round >= 0, f"round {round} must be >= 0")
    _require(len(session) == SESSION_BYTES, f"a session id has {SESSION_BYTES} bytes, "
             f"got {len(session)}")


def _check_unique(indices: list[int], what: str) -> None:
    _require(all(i >= 0 for i in indices), f"{what}: device indices must be >= 0")
    _require(len(set(indices)) == len(indices), f"{what}: a device is listed twice")


@dataclass(frozen=True, slots=True)
class SecAggSetup(Message):
    """Server -> every participant: the round's cohort, graph and field. Index i of
    `participants` is device i everywhere else in the round."""

    KIND = "sa.setup"
    round: int = wire("r")
    session: bytes = wire("s")
    participants: list[str] = wire("p")
    neighbours: int = wire("k")
    threshold: int = wire("t")
    min_clients: int = wire("m")  # fewer inputs than this and the round is abandoned
    vector_size: int = wire("n")
    clip: float = wire("c")
    levels: int = wire("l")
    field_bits: int = wire("b", 32)
    # samples a device's weight is capped at (core/secagg/weighting.py; 0: all weigh 1)
    weight_cap: int = wire("w", 0, omit_default=True)

    def __post_init__(self) -> None:
        _check_round(self.round, self.session)
        for device in self.participants:
            check_name(device, "device id")
        _require(len(set(self.participants)) == len(self.participants),
                 "a participant is listed twice")
        n = len(self.participants)
        try:
            check_parameters(n, self.neighbours, self.threshold)
            field = Field(self.field_bits)
            Quantizer(clip=self.clip, levels=self.levels)
        except ConfigError as exc:
            raise ProtocolError(str(exc), reason="bad_field") from None
        _require(self.weight_cap >= 0, f"weight_cap {self.weight_cap} must be >= 0")
        _require(2 <= self.min_clients <= n, f"min_clients {self.min_clients} must be in "
                 f"2..{n}")
        _require(field.max_summands(self.levels) >= n, f"{n} sums of values up to "
                 f"{self.levels} overflow Z_2^{self.field_bits}")
        _require(self.vector_size >= 1
                 and self.vector_size * field.element_bytes <= MAX_DECODED_BYTES,
                 f"vector size {self.vector_size} out of range")

    @property
    def field(self) -> Field:
        return Field(self.field_bits)

    @property
    def quantizer(self) -> Quantizer:
        return Quantizer(clip=self.clip, levels=self.levels)

    def index_of(self, device_id: str) -> int:
        try:
            return self.participants.index(device_id)
        except ValueError:
            raise ProtocolError(f"device {device_id!r:.40} is not in this round",
                                reason="not_participant") from None


@dataclass(frozen=True, slots=True)
class AdvertiseKeys(Message):
    """Device -> server: its two fresh public keys for this round."""

    KIND = "sa.keys"
    device_id: str = wire("dev")
    round: int = wire("r")
    session: bytes = wire("s")
    cipher_key: bytes = wire("ck")
    mask_key: bytes = wire("mk")

    def __post_init__(self) -> None:
        check_name(self.device_id, "device id")
        _check_round(self.round, self.session)
        _require(len(self.cipher_key) == KEY_BYTES and len(self.mask_key) == KEY_BYTES,
                 f"public keys have {KEY_BYTES} bytes")


@dataclass(frozen=True, slots=True)
class PeerKeys(WireObject):
    index: int = wire("i")
    cipher_key: bytes = wire("ck")
    mask_key: bytes = wire("mk")

    def __post_init__(self) -> None:
        _require(self.index >= 0, "device indices must be >= 0")
        _require(len(self.cipher_key) == KEY_BYTES and len(self.mask_key) == KEY_BYTES,
                 f"public keys have {KEY_BYTES} bytes")


@dataclass(frozen=True, slots=True)
class NeighbourKeys(Message):
    """Server -> one device: the public keys of its neighbours that advertised theirs."""

    KIND = "sa.nkeys"
    device_id: str = wire("dev")  # the recipient
    round: int = wire("r")
    session: bytes = wire("s")
    keys: list[PeerKeys] = wire("ks")

    def __post_init__(self) -> None:
        check_name(self.device_id, "device id")
        _check_round(self.round, self.session)
        _check_unique([k.index for k in self.keys], "neighbour keys")


@dataclass(frozen=True, slots=True)
class EncryptedShare(WireObject):
    """One device's two shares for another, encrypted for the recipient. `peer` is the
    recipient in ShareKeys and the sender in RoutedShares."""

    peer: int = wire("i")
    ciphertext: bytes = wire("c")

    def __post_init__(self) -> None:
        _require(self.peer >= 0, "device indices must be >= 0")
        _require(len(self.ciphertext) == SHARE_CIPHERTEXT_BYTES,
                 f"an encrypted share has {SHARE_CIPHERTEXT_BYTES} bytes, "
                 f"got {len(self.ciphertext)}")


@dataclass(frozen=True, slots=True)
class ShareKeys(Message):
    """Device -> server: shares of its self-mask seed and mask key, one per neighbour."""

    KIND = "sa.shares"
    device_id: str = wire("dev")
    round: int = wire("r")
    session: bytes = wire("s")
    shares: list[EncryptedShare] = wire("x")

    def __post_init__(self) -> None:
        check_name(self.device_id, "device id")
        _check_round(self.round, self.session)
        _check_unique([s.peer for s in self.shares], "shares")


@dataclass(frozen=True, slots=True)
class RoutedShares(Message):
    """Server -> one device: the shares its surviving neighbours made for it."""

    KIND = "sa.rshares"
    device_id: str = wire("dev")  # the recipient
    round: int = wire("r")
    session: bytes = wire("s")
    shares: list[EncryptedShare] = wire("x")

    def __post_init__(self) -> None:
        check_name(self.device_id, "device id")
        _check_round(self.round, self.session)
        _check_unique([s.peer for s in self.shares], "routed shares")


@dataclass(frozen=True, slots=True)
class MaskedInput(Message):
    """Device -> server: its quantized update plus masks, `field_bits / 8` bytes a value."""

    KIND = "sa.input"
    device_id: str = wire("dev")
    round: int = wire("r")
    session: bytes = wire("s")
    data: bytes = wire("d")

    def __post_init__(self) -> None:
        check_name(self.device_id, "device id")
        _check_round(self.round, self.session)

    @property
    def input_id(self) -> str:
        """The same for every re-send: what a receipt and the outbox key on."""
        return f"sa-{self.session.hex()}"


@dataclass(frozen=True, slots=True)
class UnmaskRequest(Message):
    """Server -> one device that sent its input: which of its neighbours count (reveal
    their self-mask shares) and which dropped after sharing (reveal their mask-key
    shares), and how many inputs the sum holds. Neighbours only: O(k), not O(n)."""

    KIND = "sa.unmask"
    device_id: str = wire("dev")  # the recipient
    round: int = wire("r")
    session: bytes = wire("s")
    survivors: list[int] = wire("u")  # includes the recipient itself
    dropped: list[int] = wire("d")
    inputs: int = wire("n")  # inputs in the sum to be unmasked

    def __post_init__(self) -> None:
        check_name(self.device_id, "device id")
        _check_round(self.round, self.session)
        _check_unique(self.survivors, "survivors")
        _check_unique(self.dropped, "dropped")
        _require(not set(self.survivors) & set(self.dropped),
                 "a device is listed both as a survivor and as dropped", "both_secrets")
        _require(self.inputs >= len(self.survivors), "fewer inputs than listed survivors")


@dataclass(frozen=True, slots=True)
class RevealedShare(WireObject):
    owner: int = wire("i")  # whose secret this is a share of
    share: bytes = wire("x")

    def __post_init__(self) -> None:
        _require(self.owner >= 0, "device indices must be >= 0")
        _require(len(self.share) == SHARE_BYTES, f"a share has {SHARE_BYTES} bytes")


@dataclass(frozen=True, slots=True)
class UnmaskResponse(Message):
    """Device -> server: for each neighbour, one share: of its self-mask seed if it
    survived, of its mask key if it dropped. Never both for one owner."""

    KIND = "sa.reveal"
    device_id: str = wire("dev")
    round: int = wire("r")
    session: bytes = wire("s")
    self_mask_shares: list[RevealedShare] = wire("b")
    key_shares: list[RevealedShare] = wire("sk")

    def __post_init__(self) -> None:
        check_name(self.device_id, "device id")
        _check_round(self.round, self.session)
        survivors = [s.owner for s in self.self_mask_shares]
        dropped = [s.owner for s in self.key_shares]
        _check_unique(survivors, "self-mask shares")
        _check_unique(dropped, "mask-key shares")
        _require(not set(survivors) & set(dropped),
                 "shares of both secrets of one device", "both_secrets")


SECAGG_MESSAGES = (SecAggSetup, AdvertiseKeys, NeighbourKeys, ShareKeys, RoutedShares,
                   MaskedInput, UnmaskRequest, UnmaskResponse)
