"""Homomorphic encryption of updates (CKKS, through TenSEAL): keys, packing, sums.

`he = "ckks"` makes every device encrypt its update under the fleet's public key and the
aggregator add the ciphertexts up without any decryption key; only the holder of the
secret key (a `Decryptor`) turns the round's encrypted sum into the new model's delta
(docs/privacy.md, "Homomorphic encryption", says who sees what).

What a device encrypts is one packed vector per update: its clipped delta times its
weight (the samples it trained on), then the weight itself in one extra slot, so the
decrypted sum carries both the weighted sum and the total weight, and the mean is their
quotient. The vector is cut into ciphertexts of `slots` values (CKKS batches N/2 reals in
one ciphertext of degree N).

Pure apart from TenSEAL, which is imported lazily (the extra `he`): no files, no
sockets. The key files are `KeyBundle.to_bytes()`; fedmq/ops/he.py writes them.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from fedmq.core.protocol import EncodedTensor
from fedmq.errors import ConfigError, FedmqError, ProtocolError

CODEC = "ckks"  # EncodedTensor.codec of an encrypted update
SCHEMES = ("ckks",)
BUNDLE_FORMAT = 1  # of a key file
BLOB_FORMAT = 1  # of an encrypted update's EncodedTensor.data
FINGERPRINT_BYTES = 8
# CKKS parameters at 128-bit security (the homomorphicencryption.org standard allows
# 218 coefficient-modulus bits at N = 8192 and 109 at N = 4096). Sums need no
# multiplicative depth, so one data prime between the two special primes is enough.
PRESETS: dict[int, tuple[tuple[int, ...], int]] = {
    8192: ((60, 40, 60), 40),  # (coefficient modulus bits, scale bits): ~1e-7 abs error
    4096: ((30, 25, 30), 25),  # 40% smaller ciphertexts, ~1e-3 abs error on a sum
}
# The decrypted total weight may differ from the sum of the claimed sample counts by
# CKKS noise only; a ciphertext weighted differently from its claim shows as more.
WEIGHT_TOLERANCE = 0.25


def tenseal() -> Any:
    """The tenseal module, or a FedmqError naming the extra that installs it."""
    try:
        import tenseal as ts
    except ImportError:
        raise FedmqError("he = \"ckks\" needs TenSEAL: pip install 'fedmq[he]' (wheels for "
                         "x86_64 and aarch64 Linux)") from None
    return ts


@dataclass(frozen=True, kw_only=True)
class CkksParams:
    """The fleet's CKKS parameters and the L2 norm every device clips its delta to."""

    poly_modulus_degree: int = 8192
    clip_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.poly_modulus_degree not in PRESETS:
            raise ConfigError(f"poly_modulus_degree {self.poly_modulus_degree} must be one of "
                              f"{', '.join(map(str, sorted(PRESETS)))}")
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ConfigError(f"clip_norm {self.clip_norm} must be > 0: devices clip their "
                              "update to it before encrypting (the server cannot)")

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2


@dataclass(frozen=True)
class KeyBundle:
    """A key file's contents: the TenSEAL context (public key only, or with the secret
    key), the parameters, and the fingerprint of the public part that every encrypted
    update names."""

    params: CkksParams
    context: bytes
    secret: bool
    fingerprint: str = field(default="")

    def to_bytes(self) -> bytes:
        return msgpack.packb({"fedmq_he": BUNDLE_FORMAT, "scheme": "ckks",
                              "n": self.params.poly_modulus_degree,
                              "clip": self.params.clip_norm, "secret": self.secret,
                              "fp": self.fingerprint, "ctx": self.context})

    @classmethod
    def from_bytes(cls, data: bytes, *, what: str = "HE key file") -> KeyBundle:
        try:
            raw = msgpack.unpackb(data)
            if not isinstance(raw, dict) or raw.get("fedmq_he") != BUNDLE_FORMAT:
                raise ValueError("not a fedmq HE key file of this version")
            params = CkksParams(poly_modulus_degree=int(raw["n"]), clip_norm=float(raw["clip"]))
            return cls(params, bytes(raw["ctx"]), bool(raw["secret"]), str(raw["fp"]))
        except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
            raise ConfigError(f"{what}: {exc}; write one with `fedmq keys he-init`") from None


def create_keys(params: CkksParams) -> tuple[KeyBundle, KeyBundle]:
    """A fresh key pair: (public bundle for devices and the aggregator, secret bundle for
    the key holder). No relinearization or Galois keys: sums need none."""
    ts = tenseal()
    bits, scale_bits = PRESETS[params.poly_modulus_degree]
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=params.poly_modulus_degree,
                     coeff_mod_bit_sizes=list(bits))
    ctx.global_scale = 2.0 ** scale_bits
    public = _public_bytes(ctx)
    fp = hashlib.sha256(public).hexdigest()[: 2 * FINGERPRINT_BYTES]
    secret = ctx.serialize(save_public_key=True, save_secret_key=True,
                           save_galois_keys=False, save_relin_keys=False)
    return (KeyBundle(params, public, False, fp), KeyBundle(params, secret, True, fp))


def _public_bytes(ctx: Any) -> bytes:
    return ctx.serialize(save_public_key=True, save_secret_key=False,
                         save_galois_keys=False, save_relin_keys=False)


def packed_size(size: int) -> int:
    """Slots an update of `size` parameters takes: the weighted delta and the weight."""
    return size + 1


def ciphertext_count(size: int, slots: int) -> int:
    return -(-packed_size(size) // slots)


def clip(delta: np.ndarray, clip_norm: float) -> np.ndarray:
    """`delta` scaled down to L2 norm `clip_norm` if above it (float64)."""
    out = np.asarray(delta, dtype=np.float64)
    norm = float(np.linalg.norm(out))
    if not math.isfinite(norm):
        raise FedmqError("the update is not finite; nothing to encrypt")
    return out * (clip_norm / norm) if norm > clip_norm else out


def pack(delta: np.ndarray, weight: float, clip_norm: float) -> np.ndarray:
    """The vector a device encrypts: weight x clipped delta, then the weight."""
    if not (math.isfinite(weight) and weight > 0):
        raise FedmqError(f"update weight {weight} must be > 0")
    return np.concatenate([clip(delta, clip_norm) * weight, [float(weight)]])


def unpack(total: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """(weighted sum of deltas, total weight) of a decrypted packed sum."""
    if total.size < packed_size(size):
        raise FedmqError(f"decrypted sum has {total.size} values, {packed_size(size)} expected")
    return total[:size], float(total[size])


class PublicKey:
    """Encrypts packed updates and adds ciphertexts up: what devices and the aggregator
    hold. It cannot decrypt (the context has no secret key)."""

    def __init__(self, bundle: KeyBundle) -> None:
        ts = tenseal()
        self.ts = ts
        self.params = bundle.params
        self.fingerprint = bundle.fingerprint
        ctx = ts.context_from(bundle.context)
        if bundle.secret:  # the key holder's file: keep only its public part here
            ctx.make_context_public(generate_galois_keys=False, generate_relin_keys=False)
        self.context = ctx
        if ctx.has_secret_key():
            raise ConfigError("a public HE context must not hold the secret key")

    @property
    def slots(self) -> int:
        return self.params.slots

    @functools.cached_property
    def ciphertext_bytes(self) -> int:
        """Bytes of one serialized ciphertext (of a full slot vector), measured."""
        return len(self.ts.ckks_vector(self.context, [0.5] * self.slots).serialize())

    def encrypt(self, delta: np.ndarray, weight: float) -> EncodedTensor:
        """The clipped, weighted, packed `delta` as one encrypted EncodedTensor."""
        vector = pack(delta, weight, self.params.clip_norm)
        slots = self.slots
        cts = [self.ts.ckks_vector(self.context, vector[i : i + slots].tolist()).serialize()
               for i in range(0, vector.size, slots)]
        blob = msgpack.packb({"v": BLOB_FORMAT, "fp": self.fingerprint, "ct": cts})
        return EncodedTensor(codec=CODEC, size=int(delta.size), data=blob)

    def open(self, tensor: EncodedTensor, size: int) -> list[Any]:
        """The ciphertexts of an encrypted update of a `size`-parameter model, checked
        all-or-nothing (ProtocolError with a reason otherwise)."""
        if tensor.codec != CODEC:
            raise ProtocolError(f"update codec {tensor.codec!r}: this fleet encrypts updates "
                                "(he = \"ckks\"); give the device the fleet's he_context",
                                reason="not_encrypted")
        if tensor.size != size:
            raise ProtocolError(f"encrypted update of {tensor.size} parameters, the model has "
                                f"{size}", reason="bad_shape")
        try:
            raw = msgpack.unpackb(tensor.data)
            ok = isinstance(raw, dict) and raw.get("v") == BLOB_FORMAT
            fp, blobs = (raw.get("fp"), raw.get("ct")) if ok else (None, None)
        except (ValueError, msgpack.UnpackException):
            fp = blobs = None
        if not isinstance(blobs, list) or not all(isinstance(b, bytes) for b in blobs):
            raise ProtocolError("encrypted update is not a list of ciphertexts",
                                reason="malformed")
        if fp != self.fingerprint:
            raise ProtocolError(f"update encrypted under key {fp!r}, the fleet's is "
                                f"{self.fingerprint}: give the device the current he_context",
                                reason="wrong_key")
        expected = ciphertext_count(size, self.slots)
        if len(blobs) != expected:
            raise ProtocolError(f"encrypted update has {len(blobs)} ciphertexts, "
                                f"{expected} expected", reason="bad_shape")
        cts = []
        for i, blob in enumerate(blobs):
            want = min(self.slots, packed_size(size) - i * self.slots)
            try:
                ct = self.ts.ckks_vector_from(self.context, blob)
            except Exception as exc:  # TenSEAL raises bare ValueError/RuntimeError
                raise ProtocolError(f"ciphertext {i} does not load: {exc}",
                                    reason="malformed") from None
            if ct.size() != want:  # (a foreign scale or level fails to add to the sum)
                raise ProtocolError(f"ciphertext {i} holds {ct.size()} values, {want} "
                                    "expected", reason="bad_shape")
            cts.append(ct)
        return cts


class CiphertextSum:
    """The running encrypted sum of one round's packed updates; needs the public key
    only. `add` is all-or-nothing: a ciphertext that fails to add leaves the sum as it was."""

    def __init__(self, key: PublicKey, size: int) -> None:
        self.key = key
        self.size = size
        self.count = 0
        self.total: list[Any] | None = None

    def add(self, tensor: EncodedTensor) -> None:
        cts = self.key.open(tensor, self.size)
        try:
            new = cts if self.total is None else [s + c for s, c in zip(self.total, cts,
                                                                        strict=True)]
        except Exception as exc:
            raise ProtocolError(f"ciphertext does not add to the round's sum: {exc}",
                                reason="bad_shape") from None
        self.total = new
        self.count += 1

    def to_bytes(self) -> list[bytes]:
        return [] if self.total is None else [c.serialize() for c in self.total]

    def load(self, blobs: list[bytes], count: int) -> None:
        ctx = self.key.context
        self.total = [self.key.ts.ckks_vector_from(ctx, b) for b in blobs] if blobs else None
        self.count = count


class Decryptor:
    """The secret key's holder: decrypts a round's encrypted sum, and nothing smaller
    than `min_count` updates (see docs/privacy.md for what that does and does not stop)."""

    def __init__(self, bundle: KeyBundle) -> None:
        if not bundle.secret:
            raise ConfigError("this HE key file holds no secret key: the decryptor needs the "
                              "one `fedmq keys he-init` wrote as the secret file")
        ts = tenseal()
        self.ts = ts
        self.params = bundle.params
        self.fingerprint = bundle.fingerprint
        self.context = ts.context_from(bundle.context)

    def decrypt(self, blobs: list[bytes], *, size: int, count: int,
                min_count: int) -> tuple[np.ndarray, float]:
        """(weighted sum, total weight) of an encrypted sum of `count` updates."""
        if count < min_count:
            raise FedmqError(f"refusing to decrypt a sum of {count} updates; at least "
                             f"{min_count} are needed so no single update is revealed")
        parts = [np.asarray(self.ts.ckks_vector_from(self.context, b).decrypt())
                 for b in blobs]
        return unpack(np.concatenate(parts), size)


def mean_of(weighted: np.ndarray, weight: float, *, claimed: float) -> np.ndarray:
    """The weighted mean delta (float32), if the decrypted total weight matches the
    devices' claimed samples (else FedmqError: a ciphertext was weighted unlike its
    claim, or encrypted under another key)."""
    if not (math.isfinite(weight) and abs(weight - claimed) <= WEIGHT_TOLERANCE):
        raise FedmqError(f"decrypted total weight {weight:.6g} differs from the "
                         f"{claimed:g} samples the devices claimed: a ciphertext was weighted "
                         "unlike its claim or encrypted under another key")
    return (weighted / weight).astype(np.float32)
