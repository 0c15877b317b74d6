"""The ring the masked sums live in, Z_2^bits, and the float <-> element mapping.

Elements are held in numpy uint32 arrays whatever `bits` is: uint32 addition wraps mod
2^32 and 2^bits divides 2^32, so `(a + b) & mask` is addition mod 2^bits with no widening.
A masked input travels as `bits / 8` bytes per value: 16 bits suffice for a small cohort
at coarse precision (2 bytes a value against q8's 1), 32 for everything else.

Quantization is stochastic (floor(y + u), u ~ U[0, 1), unbiased like the q8 codec) onto
the integer grid 0..levels over [-clip, clip], with `levels` small enough that the sum of
`summands` such values cannot wrap: the unmasked field sum is then the exact sum of the
quantized values, and the float sum is recovered from it knowing only how many were added.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedmq.errors import ConfigError, ProtocolError

FIELD_BITS = (16, 24, 32)
DTYPE = np.uint32


@dataclass(frozen=True, slots=True)
class Field:
    """Z_2^bits on uint32 arrays."""

    bits: int = 32

    def __post_init__(self) -> None:
        if self.bits not in FIELD_BITS:
            raise ConfigError(f"secure aggregation field bits must be one of {FIELD_BITS}, "
                              f"got {self.bits}")

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    @property
    def mask(self) -> np.uint32:
        return DTYPE(self.modulus - 1)

    @property
    def element_bytes(self) -> int:
        return self.bits // 8

    def zeros(self, count: int) -> np.ndarray:
        return np.zeros(count, dtype=DTYPE)

    def reduce(self, values: np.ndarray) -> np.ndarray:
        """Any integer array -> canonical elements (uint32 in [0, 2^bits))."""
        return (np.asarray(values).astype(np.uint64) & np.uint64(self.modulus - 1)).astype(DTYPE)

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a.astype(DTYPE, copy=False) + b.astype(DTYPE, copy=False)) & self.mask

    def sub(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a.astype(DTYPE, copy=False) - b.astype(DTYPE, copy=False)) & self.mask

    def add_into(self, target: np.ndarray, b: np.ndarray, *, sign: int = 1) -> None:
        """target <- target + sign * b in place (target is a uint32 array)."""
        if sign >= 0:
            target += b
        else:
            target -= b
        target &= self.mask

    def to_bytes(self, elements: np.ndarray) -> bytes:
        """Little-endian, `element_bytes` per element."""
        little = np.ascontiguousarray(elements, dtype="<u4")
        if self.bits == 32:
            return little.tobytes()
        if self.bits == 16:
            return little.astype("<u2").tobytes()
        return little.view(np.uint8).reshape(-1, 4)[:, :3].tobytes()

    def from_bytes(self, data: bytes, count: int) -> np.ndarray:
        """Elements back from `to_bytes`; ProtocolError if the length is not `count` of them."""
        if len(data) != count * self.element_bytes:
            raise ProtocolError(f"a masked input of {count} values in Z_2^{self.bits} has "
                                f"{count * self.element_bytes} bytes, got {len(data)}",
                                reason="bad_size")
        if self.bits == 32:
            return np.frombuffer(data, dtype="<u4").astype(DTYPE)
        if self.bits == 16:
            return np.frombuffer(data, dtype="<u2").astype(DTYPE)
        wide = np.zeros((count, 4), dtype=np.uint8)
        wide[:, :3] = np.frombuffer(data, dtype=np.uint8).reshape(count, 3)
        return wide.view("<u4").reshape(count).astype(DTYPE)

    def max_summands(self, levels: int) -> int:
        """How many values in 0..levels can be added without wrapping."""
        return (self.modulus - 1) // levels


@dataclass(frozen=True, slots=True, kw_only=True)
class Quantizer:
    """Clip to [-clip, clip], then round stochastically onto 0..levels."""

    clip: float
    levels: int

    def __post_init__(self) -> None:
        if not (np.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"secure aggregation clip must be a finite value > 0, "
                              f"got {self.clip}")
        if not 1 <= self.levels < 1 << 32:
            raise ConfigError(f"quantization levels must be in 1..2^32-1, got {self.levels}")

    @classmethod
    def for_summands(cls, summands: int, *, clip: float, field: Field) -> Quantizer:
        """The finest grid whose sum over `summands` values still fits the field."""
        if summands < 1:
            raise ConfigError("a secure sum needs at least one summand")
        levels = (field.modulus - 1) // summands
        if levels < 2:
            raise ConfigError(f"Z_2^{field.bits} has no room for {summands} summands; "
                              "use more field bits or a smaller cohort")
        return cls(clip=clip, levels=levels)

    @property
    def step(self) -> float:
        """The float value of one grid step."""
        return 2.0 * self.clip / self.levels

    def quantize(self, values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Field elements in 0..levels whose expectation is the clipped value's position."""
        x = np.asarray(values, dtype=np.float64).ravel()
        if not np.isfinite(x).all():
            raise ProtocolError("refusing to quantize NaN or Inf values", reason="non_finite")
        y = (np.clip(x, -self.clip, self.clip) + self.clip) / self.step
        q = np.floor(y + rng.random(y.shape))
        np.clip(q, 0, self.levels, out=q)
        return q.astype(DTYPE)

    def dequantize_sum(self, total: np.ndarray, count: int) -> np.ndarray:
        """The float sum of `count` quantized vectors from their (exact) field sum."""
        return np.asarray(total, dtype=np.float64) * self.step - count * self.clip
