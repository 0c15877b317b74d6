"""Update and model codecs: sparsify, quantize, pack, compress — chosen by name.

Both sides share this package, so the aggregator decodes any mix of codecs in a round:
each EncodedTensor names its pipeline (see spec.py), and `decode_into` folds it straight
into the aggregator's running sum.
"""

from __future__ import annotations

from fedmq.core.codecs import lossless
from fedmq.core.codecs.feedback import ErrorFeedback
from fedmq.core.codecs.pipeline import decode, decode_into, encode, max_raw_size
from fedmq.core.codecs.spec import PRESETS, CodecSpec, Preset, parse_spec, parse_wire_spec
from fedmq.errors import ConfigError


def get_codec(name: str) -> CodecSpec:
    """The pipeline for a preset name or a spec string, or a ConfigError that lists presets."""
    try:
        return parse_spec(name)
    except ConfigError:
        raise
    except Exception as exc:  # pragma: no cover - parse_spec raises ConfigError itself
        raise ConfigError(f"bad codec {name!r}: {exc}") from None


def codec_names() -> list[str]:
    return list(PRESETS)


__all__ = [
    "PRESETS",
    "CodecSpec",
    "ErrorFeedback",
    "Preset",
    "codec_names",
    "decode",
    "decode_into",
    "encode",
    "get_codec",
    "lossless",
    "max_raw_size",
    "parse_spec",
    "parse_wire_spec",
]
