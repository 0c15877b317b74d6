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
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, MissingExtraError, ProtocolError, require
from .protocol import ModelAnnouncement
from .protocol.wire import Message, peek_kind, wire

log = logging.getLogger(__name__)

# Domain separation: a signature over an announcement can never pass for a signature
# over anything else this key might ever sign.
SIGNED_CONTEXT = b"fedmq/model-announcement/v1\x00"
SIGNATURE_BYTES = 64  # Ed25519
KEY_ID_CHARS = 16
PRIVATE_NAME = "model-signing.key"
PUBLIC_NAME = "model-signing.pub"
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
DIR_MODE = 0o700


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


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror}; create a key pair "
                          "with `fedmq keys init --out DIR`") from None


class AnnouncementSigner:
    """The aggregator's half: wraps each announcement in a SignedAnnouncement."""

    def __init__(self, private_key) -> None:
        if not isinstance(private_key, _ed25519().Ed25519PrivateKey):
            raise ConfigError("the model signing key must be an Ed25519 key; create one with "
                              "`fedmq keys init --out DIR`")
        self._key = private_key
        self.key_id = key_id(private_key.public_key())

    @classmethod
    def from_file(cls, path: str | Path) -> AnnouncementSigner:
        data = _read(path, "model signing key")
        try:
            key = _serialization().load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path} is not an unencrypted PEM private key ({exc}); create "
                              "one with `fedmq keys init --out DIR`") from None
        mode = Path(path).stat().st_mode & 0o777
        if mode & 0o077:
            log.warning("model signing key %s is readable by others (mode %o): chmod 600 it",
                        path, mode)
        return cls(key)

    def seal(self, announcement: ModelAnnouncement) -> bytes:
        """The payload to retain on `model/current`."""
        body = announcement.to_payload()
        return SignedAnnouncement(announcement=body, key_id=self.key_id,
                                  signature=self._key.sign(SIGNED_CONTEXT + body)).to_payload()


def _unsigned(announcement: ModelAnnouncement) -> bytes:
    return announcement.to_payload()


def announcement_sealer(signing_key: str) -> Callable[[ModelAnnouncement], bytes]:
    """Announcement -> payload for `model/current`: signed with the key at `signing_key`,
    or a plain ModelAnnouncement when it is empty."""
    return AnnouncementSigner.from_file(signing_key).seal if signing_key else _unsigned


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

    @classmethod
    def from_file(cls, path: str | Path) -> AnnouncementOpener:
        data = _read(path, "model public key")
        try:
            key = _serialization().load_pem_public_key(data)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path} is not a PEM public key ({exc}); copy the aggregator's "
                              f"{PUBLIC_NAME} there") from None
        return cls(key)

    @classmethod
    def for_config(cls, model_public_key: str) -> AnnouncementOpener:
        return cls.from_file(model_public_key) if model_public_key else cls()

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


# --- key files ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class KeyPair:
    """Where `generate_keypair` wrote the two halves, and the key's id."""

    private: Path
    public: Path
    key_id: str


def generate_keypair(directory: str | Path, *, force: bool = False) -> KeyPair:
    """A new Ed25519 key pair: the private key 0600 (created exclusively, never briefly
    readable by others) and the public key 0644, in a directory made 0700 if missing."""
    s = _serialization()
    folder = Path(directory)
    private, public = folder / PRIVATE_NAME, folder / PUBLIC_NAME
    if not force:
        for path in (private, public):
            if path.exists():
                raise ConfigError(f"{path} already exists; pass --force to replace it (every "
                                  "device then needs the new public key)")
    if not folder.exists():
        folder.mkdir(mode=DIR_MODE, parents=True)
        os.chmod(folder, DIR_MODE)  # mkdir's mode is masked by the umask
    key = _ed25519().Ed25519PrivateKey.generate()
    _write_new(private, key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8,
                                          s.NoEncryption()), PRIVATE_MODE)
    _write_new(public, key.public_key().public_bytes(s.Encoding.PEM,
                                                     s.PublicFormat.SubjectPublicKeyInfo),
               PUBLIC_MODE)
    return KeyPair(private, public, key_id(key.public_key()))


def _write_new(path: Path, data: bytes, mode: int) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), mode)  # the umask may have taken bits off
        fh.write(data)


def _cmd_init(args: argparse.Namespace) -> int:
    pair = generate_keypair(args.out, force=args.force)
    print(f"model signing key {pair.key_id}\n"
          f"  private: {pair.private} (mode 600; the aggregator only)\n"
          f"  public:  {pair.public} (copy to every device)\n\n"
          f"aggregator.toml:  signing_key = \"{pair.private}\"\n"
          f"agent.toml:       model_public_key = \"/etc/fedmq/{PUBLIC_NAME}\"")
    return 0


def register(sub) -> None:
    """Add `fedmq keys init` to the `fedmq` subcommands."""
    keys = sub.add_parser("keys", help="model signing keys (Ed25519)",
                          description="Model signing keys: the aggregator signs every model "
                          "announcement, devices with the public key refuse anything else.")
    verbs = keys.add_subparsers(dest="keys_command", required=True)
    init = verbs.add_parser("init", help="create a signing key pair")
    init.add_argument("--out", required=True, metavar="DIR",
                      help="directory for model-signing.key (0600) and model-signing.pub")
    init.add_argument("--force", action="store_true", help="replace existing key files")
    init.set_defaults(func=_cmd_init)
