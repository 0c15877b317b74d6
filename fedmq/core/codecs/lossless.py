"""The lossless last stage: zstd when `zstandard` is installed, zlib otherwise.

Decompression is bounded by the largest size the pipeline could have produced, so a
small hostile payload cannot expand into gigabytes.
"""

from __future__ import annotations

import io
import zlib
from functools import lru_cache

from fedmq.errors import CodecError

ZSTD_LEVEL = 3  # fast on a Pi; higher levels gain a few percent on these payloads
ZLIB_LEVEL = 6


@lru_cache(maxsize=1)
def _zstd():
    try:
        import zstandard
    except ImportError:
        return None
    return zstandard


def zstd_available() -> bool:
    return _zstd() is not None


def resolve(stage: str) -> str:
    """'auto' -> the best stage installed here."""
    if stage == "auto":
        return "zstd" if zstd_available() else "zlib"
    return stage


def compress(data: bytes, stage: str) -> bytes:
    if stage == "zstd":
        zstandard = _zstd()
        if zstandard is None:
            raise CodecError("zstd needs the zstandard package: pip install 'fedmq[compress]'",
                             reason="unknown_codec")
        return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=False,
                                        write_content_size=True).compress(data)
    if stage == "zlib":
        return zlib.compress(data, ZLIB_LEVEL)
    return data


def decompress(data: bytes, stage: str, *, limit: int) -> bytes:
    if stage == "none":
        return data
    try:
        if stage == "zstd":
            zstandard = _zstd()
            if zstandard is None:
                raise CodecError("payload is zstd-compressed but zstandard is not installed: "
                                 "pip install 'fedmq[compress]'", reason="unknown_codec")
            # read at most limit+1 bytes, whatever size the frame header claims
            with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as reader:
                out = reader.read(limit + 1)
        else:
            inflater = zlib.decompressobj()
            out = inflater.decompress(data, limit + 1)
            if not inflater.eof and len(out) <= limit:
                raise CodecError("zlib stream is truncated", reason="truncated")
            if inflater.unused_data:
                raise CodecError("bytes after the end of the zlib stream", reason="malformed")
    except CodecError:
        raise
    except Exception as exc:  # zlib.error, zstd.ZstdError: both mean a corrupt payload
        raise CodecError(f"{stage} stream is corrupt: {exc}", reason="malformed") from None
    if len(out) > limit:
        raise CodecError(f"decompressed {len(out)} bytes, more than the {limit} the codec allows",
                         reason="too_large")
    return out
