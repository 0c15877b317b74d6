"""Tensor codecs, chosen by name and described inside every payload.

Both sides share this module so the aggregator can decode any mix of codecs in a round.
Decoding folds straight into a running sum (`decode_into`) so the aggregator never
materialises one array per update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .errors import CodecError, ConfigError
from .protocol import EncodedTensor


class Codec:
    """Turns a flat float32 vector into bytes and back."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def encode(self, values: np.ndarray) -> EncodedTensor:
        raise NotImplementedError

    def decode(self, tensor: EncodedTensor) -> np.ndarray:
        out = np.zeros(tensor.size, dtype=np.float32)
        self.decode_into(tensor, out, 1.0)
        return out

    def decode_into(self, tensor: EncodedTensor, acc: np.ndarray, weight: float) -> None:
        """acc += weight * decode(tensor), without keeping the decoded copy around."""
        raise NotImplementedError


_REGISTRY: dict[str, Codec] = {}


def register(codec: Codec) -> Codec:
    if codec.name in _REGISTRY:
        raise ValueError(f"codec {codec.name!r} is registered twice")
    _REGISTRY[codec.name] = codec
    return codec


def get_codec(name: str) -> Codec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown codec {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}"
        ) from None


def codec_names() -> list[str]:
    return sorted(_REGISTRY)


def codec_for_payload(tensor: EncodedTensor) -> Codec:
    """The codec a received tensor names, as a CodecError (never ConfigError) if unknown."""
    codec = _REGISTRY.get(tensor.codec)
    if codec is None:
        raise CodecError(f"payload uses unknown codec {tensor.codec!r}", reason="unknown_codec")
    return codec


def encode(values: np.ndarray, codec: str = "float32") -> EncodedTensor:
    return get_codec(codec).encode(values)


def decode(tensor: EncodedTensor) -> np.ndarray:
    return codec_for_payload(tensor).decode(tensor)


def decode_into(tensor: EncodedTensor, acc: np.ndarray, weight: float = 1.0) -> None:
    if tensor.size != acc.size:
        raise CodecError(
            f"tensor has {tensor.size} values, the model has {acc.size}", reason="bad_shape"
        )
    codec_for_payload(tensor).decode_into(tensor, acc, weight)


@dataclass(frozen=True)
class DenseFloat(Codec):
    """Little-endian IEEE floats, no compression beyond the width."""

    dtype: str = "<f4"

    def encode(self, values: np.ndarray) -> EncodedTensor:
        flat = np.ascontiguousarray(values, dtype=np.float32).ravel()
        data = flat.astype(self.dtype).tobytes()
        return EncodedTensor(codec=self.name, size=flat.size, data=data)

    def _view(self, tensor: EncodedTensor) -> np.ndarray:
        width = np.dtype(self.dtype).itemsize
        if len(tensor.data) != tensor.size * width:
            raise CodecError(
                f"{self.name} tensor of {tensor.size} values needs {tensor.size * width} bytes, "
                f"got {len(tensor.data)}",
                reason="truncated",
            )
        return np.frombuffer(tensor.data, dtype=self.dtype)

    def decode(self, tensor: EncodedTensor) -> np.ndarray:
        return self._view(tensor).astype(np.float32)

    def decode_into(self, tensor: EncodedTensor, acc: np.ndarray, weight: float) -> None:
        view = self._view(tensor)
        if weight == 1.0:
            acc += view
        else:
            acc += np.float32(weight) * view


class Float32(DenseFloat):
    name = "float32"
    description = "raw float32, no compression (the baseline)"


class Float16(DenseFloat):
    name = "float16"
    description = "IEEE half precision, 2x smaller"


register(Float32("<f4"))
register(Float16("<f2"))
