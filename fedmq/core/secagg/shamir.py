"""Shamir secret sharing of 32-byte secrets (mask seeds, X25519 private keys).

Written here because `cryptography` has no secret sharing, and the libraries that do
(pycryptodome's Shamir: 16-byte secrets over GF(2^128)) would add a second crypto
package for forty lines of textbook arithmetic.

The prime is the Mersenne prime 2^127 - 1. A secret is cut into 15-byte chunks (each
below the prime), every chunk is shared with its own random polynomial of degree
threshold - 1, and a holder's share is the chunks' values at its x-coordinate, 16 bytes
each. Any `threshold` shares give the secret back by Lagrange interpolation at 0; fewer
say nothing about it. x-coordinates are the holders' device indices + 1 (never 0).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping

from fedmq.errors import ProtocolError, SecureAggregationError

PRIME = (1 << 127) - 1
CHUNK_BYTES = 15  # 120 bits < 127: every chunk is a field element
WORD_BYTES = 16  # a share value in [0, PRIME) takes 127 bits
SECRET_BYTES = 32
CHUNKS = -(-SECRET_BYTES // CHUNK_BYTES)
SHARE_BYTES = CHUNKS * WORD_BYTES


def _chunks(secret: bytes) -> list[int]:
    return [int.from_bytes(secret[i:i + CHUNK_BYTES], "little")
            for i in range(0, len(secret), CHUNK_BYTES)]


def _random_element(entropy: Callable[[int], bytes]) -> int:
    """Uniform in [0, PRIME): 127 random bits, redrawn in the 2^-127 case of PRIME itself."""
    while True:
        value = int.from_bytes(entropy(WORD_BYTES), "little") & PRIME
        if value < PRIME:
            return value


def split(secret: bytes, *, threshold: int, holders: Iterable[int],
          entropy: Callable[[int], bytes] = os.urandom) -> dict[int, bytes]:
    """Shares of `secret` for each x-coordinate in `holders`; any `threshold` of them
    rebuild it."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secrets to share have {SECRET_BYTES} bytes, got {len(secret)}")
    xs = sorted(set(holders))
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} needs 1..{len(xs)} (the number of holders)")
    if xs[0] <= 0 or xs[-1] >= PRIME:
        raise ValueError("share x-coordinates must be in 1..PRIME-1")
    polys = [[c] + [_random_element(entropy) for _ in range(threshold - 1)]
             for c in _chunks(secret)]
    shares = {}
    for x in xs:
        words = []
        for coeffs in polys:
            y = 0
            for c in reversed(coeffs):  # Horner
                y = (y * x + c) % PRIME
            words.append(y.to_bytes(WORD_BYTES, "little"))
        shares[x] = b"".join(words)
    return shares


def combine(shares: Mapping[int, bytes], *, threshold: int) -> bytes:
    """The secret from at least `threshold` shares (the first `threshold` by x are used)."""
    if len(shares) < threshold:
        raise SecureAggregationError(
            f"{len(shares)} shares cannot rebuild a secret shared with threshold {threshold}",
            reason="too_few_shares")
    xs = sorted(shares)[:threshold]
    for x in xs:
        if not 0 < x < PRIME:
            raise ProtocolError(f"share x-coordinate {x} is out of range", reason="bad_share")
        if len(shares[x]) != SHARE_BYTES:
            raise ProtocolError(f"a share has {SHARE_BYTES} bytes, got {len(shares[x])}",
                                reason="bad_share")
    # Lagrange basis at 0: l_j = prod_{m != j} x_m / (x_m - x_j) = P / (x_j prod (x_m - x_j))
    # with P the product of all x; the t denominators are inverted with one modular
    # inversion (Montgomery's trick): pow(., -1, p) costs as much as ~100 products.
    product = 1
    for x in xs:
        product = product * x % PRIME
    dens = []
    for j, xj in enumerate(xs):
        den = xj
        for m, xm in enumerate(xs):
            if m != j:
                den = den * (xm - xj) % PRIME
        dens.append(den)
    prefix = [1]
    for den in dens:
        prefix.append(prefix[-1] * den % PRIME)
    inverse = pow(prefix[-1], -1, PRIME)  # of the product of every denominator
    basis = [0] * len(xs)
    for j in range(len(xs) - 1, -1, -1):
        basis[j] = product * inverse * prefix[j] % PRIME
        inverse = inverse * dens[j] % PRIME
    out = []
    for c in range(CHUNKS):
        lo = c * WORD_BYTES
        value = 0
        for lj, xj in zip(basis, xs, strict=True):
            y = int.from_bytes(shares[xj][lo:lo + WORD_BYTES], "little")
            if y >= PRIME:
                raise ProtocolError("a share value is not below the prime", reason="bad_share")
            value = (value + lj * y) % PRIME
        width = min(CHUNK_BYTES, SECRET_BYTES - c * CHUNK_BYTES)
        if value >= 1 << (8 * width):
            raise SecureAggregationError(
                "shares do not rebuild a valid secret (a share is corrupt or belongs to "
                "another secret)", reason="bad_share")
        out.append(value.to_bytes(width, "little"))
    return b"".join(out)
