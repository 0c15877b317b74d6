"""Signed model announcements: the aggregator signs with Ed25519, devices verify.

Whoever can publish on `model/current` decides what every device trains next, so a device
given the aggregator's public key (`model_public_key`) trusts only announcements that key
signed. Signing the announcement covers the model too: it carries the SHA-256 of the full
payload (`p.h`) and of the delta (`dp.h`), and `ModelReceiver` checks the reassembled
chunks against them.

On the wire a signed announcement is a `SignedAnnouncement` (`$k = "smodel"`) holding the
exact bytes of the ModelAnnouncement payload and an Ed25519 signature over
`SIGNED_CONTEXT + those bytes`: byte-exact, so no canonical re-encoding is needed and
fields an older device does not know are still covered. `cryptography` (the `secure`
extra) is imported only when a key is configured; unsigned fleets need nothing new.
Key files are read and written by `fedmq.keyfiles`: this module touches no files.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from fedmq.core.protocol import ModelAnnouncement
from fedmq.core.protocol.wire import Message, peek_kind, wire
from fedmq.errors import ConfigError, MissingExtraError, ProtocolError, require

log = logging.getLogger(__name__)

# Domain separation: a signature over an announcement can never pass for a signature
# over anything else this key might ever sign.
SIGNED_CONTEXT = b"fedmq/model-announcement/v1\x00"
SIGNATURE_BYTES = 64  # Ed25519
KEY_ID_CHARS = 16
PUBLIC_NAME = "model-signing.pub"


@dataclass(frozen=True, slots=True)
class SignedAnnouncement(Message):
    """Retained on `model/current` when the aggregator has a signing key."""

    KIND = "smodel"
    announcement: bytes = wire("a")  # the exact ModelAnnouncement payload that was signed
    signature: bytes = wire("s")  # Ed25519 over SIGNED_CONTEXT + announcement
    key_id: str = wire("kid")  # which key signed, so a key mismatch reads as one

    def __post_init__(self) -> None:
        if len(self.signature) != SIGNATURE_BYTES:
            raise ProtocolError(f"signature has {len(self.signature)} bytes, Ed25519 has "
                                f"{SIGNATURE_BYTES}", reason="bad_field")
        if len(self.key_id) != KEY_ID_CHARS or any(c not in "0123456789abcdef"
                                                   for c in self.key_id):
            raise ProtocolError(f"key id {self.key_id!r:.40} is not {KEY_ID_CHARS} lowercase "
                                "hex characters", reason="bad_field")


def _crypto(module: str):
    """A `cryptography` submodule, or an error naming the package and the extra."""
    try:
        return require(f"cryptography.{module}", "secure")
    except MissingExtraError:
        raise MissingExtraError("cryptography", "secure") from None


def _ed25519():
    return _crypto("hazmat.primitives.asymmetric.ed25519")


def _serialization():
    return _crypto("hazmat.primitives.serialization")


def key_id(public_key) -> str:
    """First 16 hex characters of the SHA-256 of the raw 32-byte public key."""
    s = _serialization()
    raw = public_key.public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:KEY_ID_CHARS]


class AnnouncementSigner:
    """The aggregator's half: wraps each announcement in a SignedAnnouncement."""

    def __init__(self, private_key) -> None:
        if not isinstance(private_key, _ed25519().Ed25519PrivateKey):
            raise ConfigError("the model signing key must be an Ed25519 key; create one with "
                              "`fedmq keys init --out DIR`")
        self._key = private_key
        self.key_id = key_id(private_key.public_key())

    def seal(self, announcement: ModelAnnouncement) -> bytes:
        """The payload to retain on `model/current`."""
        body = announcement.to_payload()
        return SignedAnnouncement(announcement=body, key_id=self.key_id,
                                  signature=self._key.sign(SIGNED_CONTEXT + body)).to_payload()


def unsigned(announcement: ModelAnnouncement) -> bytes:
    return announcement.to_payload()


class AnnouncementOpener:
    """The device's half: a `model/current` payload -> a ModelAnnouncement it may use.

    With a public key, only announcements that key signed pass; the rest raise
    ProtocolError `unsigned`, `wrong_key` or `bad_signature` (and the device keeps the
    model it has). Without one, plain and signed announcements are both accepted, the
    latter unverified.
    """

    def __init__(self, public_key=None) -> None:
        if public_key is not None and not isinstance(public_key, _ed25519().Ed25519PublicKey):
            raise ConfigError("model_public_key must be an Ed25519 public key (the "
                              f"{PUBLIC_NAME} written by `fedmq keys init`)")
        self._key = public_key
        self.key_id = key_id(public_key) if public_key is not None else ""
        self._told_unverified = False

    @property
    def verifying(self) -> bool:
        return self._key is not None

    def open(self, payload: bytes) -> ModelAnnouncement:
        kind = peek_kind(payload)
        if kind == ModelAnnouncement.KIND:
            if self._key is not None:
                raise ProtocolError(
                    "the model announcement is not signed, and this device trusts only models "
                    f"signed by key {self.key_id}: give the aggregator its signing_key (or "
                    "clear model_public_key to accept unsigned models)", reason="unsigned")
            return ModelAnnouncement.from_payload(payload)
        if kind != SignedAnnouncement.KIND:
            raise ProtocolError(f"message kind {kind!r:.40} does not belong on model/current",
                                reason="wrong_kind")
        signed = SignedAnnouncement.from_payload(payload)
        if self._key is None:
            if not self._told_unverified:
                self._told_unverified = True
                log.info("model announcements are signed (key %s) but model_public_key is not "
                         "set: accepting them unverified", signed.key_id)
        else:
            self._verify(signed)
        return ModelAnnouncement.from_payload(signed.announcement)

    def _verify(self, signed: SignedAnnouncement) -> None:
        if signed.key_id != self.key_id:
            raise ProtocolError(
                f"the model announcement is signed by key {signed.key_id}, this device trusts "
                f"key {self.key_id}: after a key change, copy the aggregator's new "
                f"{PUBLIC_NAME} to model_public_key", reason="wrong_key")
        exceptions = _crypto("exceptions")
        try:
            self._key.verify(signed.signature, SIGNED_CONTEXT + signed.announcement)
        except exceptions.InvalidSignature:
            raise ProtocolError(
                "the model announcement's signature does not verify: it was altered after "
                "signing or forged; ignored, keeping the current model",
                reason="bad_signature") from None
