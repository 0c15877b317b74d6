"""Encode a flat float32 vector through a CodecSpec, and decode it straight into a sum.

Layout of the bytes before the lossless stage:
    sparse only: varint k, then k varints (gap - 1 between consecutive kept indices)
    f32 / f16:   the values, little-endian
    q8/q4/q2:    one float32 scale per block, then (q + L) in `bits` bits per value,
                 where q in [-L, L], L = 2**(bits-1) - 1, value = q * scale
    sign:        one float32 scale (mean |x|) per block, then 1 bit per value (1 = +)
`decode_into` validates every length, index and scale before it touches the sum, so a
rejected payload leaves no trace.
"""

from __future__ import annotations

import numpy as np

from ..errors import CodecError
from ..protocol import EncodedTensor
from . import lossless
from .bitpack import pack, packed_size, unpack, varint_decode, varint_encode
from .spec import CodecSpec, parse_spec, parse_wire_spec, with_lossless

F16_MAX = 65504.0


def _levels(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def _num_blocks(count: int, block: int) -> int:
    return (count + block - 1) // block


def values_size(spec: CodecSpec, count: int) -> int:
    if spec.quant == "f32":
        return 4 * count
    if spec.quant == "f16":
        return 2 * count
    return 4 * _num_blocks(count, spec.block) + packed_size(count, spec.bits)


def max_raw_size(spec: CodecSpec, size: int) -> int:
    """The most bytes a tensor of `size` values can take before the lossless stage."""
    index_bytes = 5 + 5 * size if spec.sparse else 0
    return index_bytes + values_size(spec, size)


def _blocks(values: np.ndarray, block: int) -> np.ndarray:
    pad = (-len(values)) % block
    if pad:
        values = np.concatenate([values, np.zeros(pad, np.float32)])
    return values.reshape(-1, block)


def _encode_values(values: np.ndarray, spec: CodecSpec, rng: np.random.Generator) -> bytes:
    if spec.quant == "f32":
        return values.astype("<f4").tobytes()
    if spec.quant == "f16":
        return np.clip(values, -F16_MAX, F16_MAX).astype("<f2").tobytes()
    blocks = _blocks(values, spec.block)
    if spec.quant == "sign":
        counts = np.full(len(blocks), spec.block, dtype=np.float32)
        if len(values) % spec.block:
            counts[-1] = len(values) % spec.block
        scales = (np.abs(blocks).sum(axis=1) / counts).astype(np.float32)
        bits = (values >= 0).astype(np.uint8)
        return scales.astype("<f4").tobytes() + pack(bits, 1)
    levels = _levels(spec.bits)
    scales = (np.abs(blocks).max(axis=1) / levels).astype(np.float32)
    safe = np.where(scales > 0, scales, 1.0).astype(np.float32)
    scaled = blocks / safe[:, None]
    # Stochastic rounding: floor(y + u), u ~ U[0,1), is unbiased: E[q] = y.
    q = np.floor(scaled + rng.random(scaled.shape, dtype=np.float32))
    np.clip(q, -levels, levels, out=q)
    offset = (q.reshape(-1)[: len(values)] + levels).astype(np.uint8)
    return scales.astype("<f4").tobytes() + pack(offset, spec.bits)


def encode(values: np.ndarray, spec: CodecSpec | str = "float32",
           *, rng: np.random.Generator | None = None) -> EncodedTensor:
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    x = np.ascontiguousarray(values, dtype=np.float32).ravel()
    if not np.isfinite(x).all():
        raise CodecError("refusing to encode NaN or Inf values", reason="non_finite")
    rng = rng if rng is not None else np.random.default_rng()
    parts = []
    kept = x
    if spec.sparse and x.size:
        k = max(1, min(x.size, round(spec.topk * x.size)))
        index = np.sort(np.argpartition(np.abs(x), x.size - k)[x.size - k :])
        gaps = np.diff(index, prepend=-1) - 1
        parts += [varint_encode(np.array([k])), varint_encode(gaps)]
        kept = x[index]
    parts.append(_encode_values(kept, spec, rng))
    raw = b"".join(parts)
    stage = lossless.resolve(spec.lossless)
    data = raw
    if stage != "none":
        packed = lossless.compress(raw, stage)
        if len(packed) < len(raw):
            data = packed
        else:
            stage = "none"
    return EncodedTensor(codec=with_lossless(spec, stage).wire(), size=x.size, data=data)


def _dequantize(raw: memoryview, spec: CodecSpec, count: int, weight: float) -> np.ndarray:
    """weight * values as float32, after checking the byte count and the scales."""
    if len(raw) != values_size(spec, count):
        raise CodecError(f"{spec.wire()} needs {values_size(spec, count)} value bytes for "
                         f"{count} values, got {len(raw)}", reason="truncated")
    w = np.float32(weight)
    if spec.quant in ("f32", "f16"):
        view = np.frombuffer(raw, dtype="<f4" if spec.quant == "f32" else "<f2")
        if not np.isfinite(view).all():
            raise CodecError("update contains NaN or Inf values", reason="non_finite")
        return view * w if weight != 1.0 else view.astype(np.float32)
    nblocks = _num_blocks(count, spec.block)
    scales = np.frombuffer(raw[: 4 * nblocks], dtype="<f4")
    if not (np.isfinite(scales).all() and (scales >= 0).all()):
        raise CodecError("block scales must be finite and >= 0", reason="non_finite")
    codes = unpack(raw[4 * nblocks :], spec.bits, count)
    scaled = scales * w
    out = np.empty(count, dtype=np.float32)
    full = (count // spec.block) * spec.block
    if spec.quant == "sign":
        signs = codes.astype(np.float32) * 2.0 - 1.0
        _scale_into(out, signs, scaled, spec.block, full)
        return out
    levels = _levels(spec.bits)
    if codes.max(initial=0) > 2 * levels:
        raise CodecError(f"quantized code above {2 * levels}", reason="malformed")
    _scale_into(out, codes, scaled, spec.block, full)
    # value = (code - L) * scale: subtract L * scale per block
    offsets = scaled * np.float32(levels)
    out[:full].reshape(-1, spec.block)[...] -= offsets[: full // spec.block, None]
    if full < count:
        out[full:] -= offsets[-1]
    return out


def _scale_into(out: np.ndarray, codes: np.ndarray, scales: np.ndarray, block: int,
                full: int) -> None:
    """out = codes * per-block scale, without materialising a repeated scale array."""
    np.multiply(codes[:full].reshape(-1, block), scales[: full // block, None],
                out=out[:full].reshape(-1, block))
    if full < len(out):
        np.multiply(codes[full:], scales[-1], out=out[full:])


def decode_into(tensor: EncodedTensor, acc: np.ndarray, weight: float = 1.0) -> None:
    """acc += weight * decoded(tensor); raises CodecError and leaves acc alone if invalid."""
    if tensor.size != acc.size:
        raise CodecError(f"tensor has {tensor.size} values, the model has {acc.size}",
                         reason="bad_shape")
    spec = parse_wire_spec(tensor.codec)
    raw = memoryview(lossless.decompress(tensor.data, spec.lossless,
                                         limit=max_raw_size(spec, tensor.size)))
    if not spec.sparse:
        acc += _dequantize(raw, spec, tensor.size, weight)
        return
    (k,), used = varint_decode(raw, 1)
    if not (tensor.size == 0 or 1 <= k <= tensor.size):
        raise CodecError(f"sparse tensor keeps {k} of {tensor.size} values", reason="malformed")
    gaps, used_gaps = varint_decode(raw[used:], int(k))
    index = np.cumsum(gaps + 1) - 1
    if k and index[-1] >= tensor.size:
        raise CodecError("sparse index out of range", reason="malformed")
    values = _dequantize(raw[used + used_gaps :], spec, int(k), weight)
    acc[index] += values  # indices are strictly increasing: no duplicates to merge


def decode(tensor: EncodedTensor) -> np.ndarray:
    out = np.zeros(tensor.size, dtype=np.float32)
    decode_into(tensor, out, 1.0)
    return out
