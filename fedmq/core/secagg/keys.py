"""Key agreement and share encryption: X25519, HKDF-SHA256, ChaCha20-Poly1305.

Each device makes two fresh X25519 key pairs per round (Bonawitz et al.): a *cipher* pair,
whose agreed secret with a neighbour encrypts the shares routed through the server, and a
*mask* pair, whose agreed secret seeds the pairwise mask. Only the mask key is ever
Shamir-shared, so rebuilding a dropped device's masks reveals nothing about the shares it
exchanged. Every derived key is bound by HKDF to the round's session and its purpose.

A share ciphertext carries a random 12-byte nonce; its associated data names the session,
the sender and the recipient, so the server cannot hand a share to another device or
replay it in another round undetected. `cryptography` (the `secure` extra) is imported
on first use.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedmq.errors import SecureAggregationError, require

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
MASK_SEED_INFO = b"fedmq/secagg/v1/pair-mask-seed"
SHARE_KEY_INFO = b"fedmq/secagg/v1/share-key"
SHARE_AD = b"fedmq/secagg/v1/share\x00"


@functools.cache
def _crypto(module: str):
    return require(f"cryptography.{module}", "secure", package="cryptography")


@dataclass(frozen=True, slots=True, repr=False)
class KeyPair:
    """An X25519 key pair: raw bytes, and the loaded private key (loading costs as much
    as an agreement). repr hides the private half."""

    private: bytes
    public: bytes
    key: Any


def generate_keypair(entropy: Callable[[int], bytes] = os.urandom) -> KeyPair:
    """A fresh X25519 key pair from `entropy` (the OS by default; tests pass a seeded one)."""
    return keypair_from_private(entropy(KEY_BYTES))


def keypair_from_private(private: bytes) -> KeyPair:
    x = _crypto("hazmat.primitives.asymmetric.x25519")
    key = x.X25519PrivateKey.from_private_bytes(private)
    return KeyPair(private=private, public=key.public_key().public_bytes_raw(), key=key)


def _agree(pair: KeyPair, peer_public: bytes, *, salt: bytes, info: bytes) -> bytes:
    x = _crypto("hazmat.primitives.asymmetric.x25519")
    try:
        shared = pair.key.exchange(x.X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # a low-order point: all-zero shared secret
        raise SecureAggregationError(f"key agreement failed: {exc}",
                                     reason="bad_key") from None
    hkdf = _crypto("hazmat.primitives.kdf.hkdf")
    hashes = _crypto("hazmat.primitives.hashes")
    return hkdf.HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt,
                     info=info).derive(shared)


def mask_seed(pair: KeyPair, peer_public: bytes, *, session: bytes) -> bytes:
    """The pairwise mask seed two neighbours (or the server, given one's rebuilt private
    key) agree on."""
    return _agree(pair, peer_public, salt=session, info=MASK_SEED_INFO)


def share_key(pair: KeyPair, peer_public: bytes, *, session: bytes) -> bytes:
    """The symmetric key two neighbours encrypt shares for each other with."""
    return _agree(pair, peer_public, salt=session, info=SHARE_KEY_INFO)


def _share_ad(session: bytes, sender: int, recipient: int) -> bytes:
    return SHARE_AD + session + sender.to_bytes(4, "big") + recipient.to_bytes(4, "big")


def encrypt_share(key: bytes, plaintext: bytes, *, session: bytes, sender: int,
                  recipient: int, entropy: Callable[[int], bytes] = os.urandom) -> bytes:
    """nonce || ChaCha20-Poly1305(plaintext), bound to (session, sender, recipient)."""
    aead = _crypto("hazmat.primitives.ciphers.aead")
    nonce = entropy(NONCE_BYTES)
    return nonce + aead.ChaCha20Poly1305(key).encrypt(
        nonce, plaintext, _share_ad(session, sender, recipient))


def decrypt_share(key: bytes, ciphertext: bytes, *, session: bytes, sender: int,
                  recipient: int) -> bytes:
    """The plaintext, or SecureAggregationError if it was altered, misrouted or replayed."""
    aead = _crypto("hazmat.primitives.ciphers.aead")
    exceptions = _crypto("exceptions")
    if len(ciphertext) < NONCE_BYTES + TAG_BYTES:
        raise SecureAggregationError("an encrypted share is too short", reason="bad_share")
    try:
        return aead.ChaCha20Poly1305(key).decrypt(
            ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:],
            _share_ad(session, sender, recipient))
    except exceptions.InvalidTag:
        raise SecureAggregationError(
            f"the share from device #{sender} does not decrypt: altered in transit, "
            "misrouted or from another round", reason="bad_share") from None
