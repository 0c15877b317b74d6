"""Masks: a 32-byte seed expanded into field elements by ChaCha20 (RFC 8439's stream).

The seed is the ChaCha20 key; the nonce is derived from a purpose label, so a pairwise
seed and a self-mask seed, or a future use of the same seed, can never yield the same
stream (domain separation). The keystream is read as little-endian uint32 words and
reduced to the field: 2^bits divides 2^32, so every element stays exactly uniform.
`cryptography` (the `secure` extra) is imported on first use.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np

from fedmq.core.secagg.field import Field
from fedmq.errors import require

SEED_BYTES = 32
DOMAIN = b"fedmq/secagg/prg/v1\x00"
# Purposes of the two kinds of masks in a round.
SELF_MASK = b"self-mask"
PAIR_MASK = b"pair-mask"


@functools.cache
def _chacha20():
    ciphers = require("cryptography.hazmat.primitives.ciphers", "secure",
                      package="cryptography")
    return ciphers.Cipher, ciphers.algorithms.ChaCha20


@functools.cache
def _nonce(purpose: bytes) -> bytes:
    """ChaCha20's 16-byte nonce in `cryptography`: block counter 0, then 96 bits of purpose."""
    return bytes(4) + hashlib.sha256(DOMAIN + purpose).digest()[:12]


def expand(seed: bytes, count: int, field: Field, *, purpose: bytes) -> np.ndarray:
    """`count` uniformly random field elements determined by `seed` and `purpose`."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed has {SEED_BYTES} bytes, got {len(seed)}")
    cipher, chacha20 = _chacha20()
    stream = cipher(chacha20(seed, _nonce(purpose)), mode=None).encryptor()
    words = np.frombuffer(stream.update(bytes(4 * count)), dtype="<u4")
    return words & field.mask if field.bits < 32 else words.astype(np.uint32)
