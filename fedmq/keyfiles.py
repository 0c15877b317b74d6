"""Model-signing key files: read the aggregator's private key and a device's public key,
and create a new pair (`fedmq keys init`). The signing itself is pure (fedmq.core.signing).
Also the HE key files of `he = "ckks"` (`fedmq keys he-init`, fedmq.core.he).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedmq.core.he import CkksParams, KeyBundle, PublicKey, create_keys
from fedmq.core.protocol import ModelAnnouncement
from fedmq.core.signing import (
    PUBLIC_NAME,
    AnnouncementOpener,
    AnnouncementSigner,
    _ed25519,
    _serialization,
    key_id,
    unsigned,
)
from fedmq.errors import ConfigError

log = logging.getLogger(__name__)

PRIVATE_NAME = "model-signing.key"
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
DIR_MODE = 0o700


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror}; create a key pair "
                          "with `fedmq keys init --out DIR`") from None


def warn_if_shared(path: str | Path, what: str) -> None:
    """A WARNING when a secret key file is open to its group or others (it should be 0600,
    owned by the one service that reads it)."""
    mode = Path(path).stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("%s %s is readable by others (mode %o): chmod 600 it", what, path, mode)


def load_signer(path: str | Path) -> AnnouncementSigner:
    """The aggregator's signer from its PEM private key (warns if others can read it)."""
    data = _read(path, "model signing key")
    try:
        key = _serialization().load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not an unencrypted PEM private key ({exc}); create "
                          "one with `fedmq keys init --out DIR`") from None
    warn_if_shared(path, "model signing key")
    signer = AnnouncementSigner(key)
    log.info("model announcements are signed with key %s (%s)", signer.key_id, path)
    return signer


def load_opener(path: str | Path) -> AnnouncementOpener:
    """A device's verifier from the aggregator's PEM public key."""
    data = _read(path, "model public key")
    try:
        key = _serialization().load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not a PEM public key ({exc}); copy the aggregator's "
                          f"{PUBLIC_NAME} there") from None
    opener = AnnouncementOpener(key)
    log.info("only models signed with key %s are accepted (%s)", opener.key_id, path)
    return opener


def opener_for_config(model_public_key: str) -> AnnouncementOpener:
    """What an agent configured with `model_public_key` (empty: trust unsigned) verifies with."""
    return load_opener(model_public_key) if model_public_key else AnnouncementOpener()


def announcement_sealer(signing_key: str) -> Callable[[ModelAnnouncement], bytes]:
    """Announcement -> payload for `model/current`: signed with the key at `signing_key`,
    or a plain ModelAnnouncement when it is empty."""
    return load_signer(signing_key).seal if signing_key else unsigned


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


HE_PUBLIC_NAME = "he-public.ctx"
HE_SECRET_NAME = "he-secret.ctx"


def generate_he_keys(directory: str | Path, params: CkksParams, *,
                     force: bool = False) -> tuple[Path, Path, str]:
    """A new CKKS key pair (fedmq/core/he.py): the secret file 0600 for the key holder, the
    public file 0644 for devices and the aggregator; (public, secret, fingerprint)."""
    folder = Path(directory)
    public, secret = folder / HE_PUBLIC_NAME, folder / HE_SECRET_NAME
    if not force:
        for path in (public, secret):
            if path.exists():
                raise ConfigError(f"{path} already exists; pass --force to replace it (every "
                                  "device then needs the new public file)")
    public_bundle, secret_bundle = create_keys(params)
    if not folder.exists():
        folder.mkdir(mode=DIR_MODE, parents=True)
        os.chmod(folder, DIR_MODE)
    _write_new(secret, secret_bundle.to_bytes(), PRIVATE_MODE)
    _write_new(public, public_bundle.to_bytes(), PUBLIC_MODE)
    return public, secret, public_bundle.fingerprint


def load_he_public(path: str | Path) -> PublicKey:
    """A device's HE key: the fleet's public file. The secret file is refused: a device
    holding it could decrypt every other device's update."""
    bundle = KeyBundle.from_bytes(_read(path, "he_context"), what=f"he_context {path}")
    if bundle.secret:
        raise ConfigError(f"he_context {path} holds the secret key; give devices the public "
                          f"file ({HE_PUBLIC_NAME}) and keep the secret one with its holder")
    return PublicKey(bundle)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), mode)  # the umask may have taken bits off
        fh.write(data)
