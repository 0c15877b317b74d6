"""Codec pipelines by name: a compact spec string travels in every encoded tensor.

Grammar (stages joined by "+", defaults omitted on the wire):
    [top{fraction}] + {f32|f16|q8|q4|q2|sign}[b{block}] + [zstd|zlib|auto] + [ef]
`top` keeps the largest-magnitude fraction of values, `q*`/`sign` quantize with one
float32 scale per block, the lossless stage compresses the bytes, and `ef` (device-side
only) keeps the unsent residual for the next round. Presets give the common ones names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from decimal import Decimal
from functools import lru_cache

from fedmq.errors import CodecError, ConfigError

QUANTIZERS = ("f32", "f16", "q8", "q4", "q2", "sign")
LOSSLESS = ("none", "zstd", "zlib", "auto")
DEFAULT_BLOCK = 256
_BLOCKED = re.compile(r"(q8|q4|q2|sign)(?:b(\d+))?")
_TOP = re.compile(r"top(0?\.\d+|1(?:\.0*)?)")


@dataclass(frozen=True, slots=True)
class CodecSpec:
    """One pipeline: sparsify -> quantize -> lossless, plus device-side error feedback."""

    quant: str = "f32"
    topk: float = 0.0  # fraction of values kept; 0 = dense
    block: int = DEFAULT_BLOCK
    lossless: str = "none"
    error_feedback: bool = False

    def __post_init__(self) -> None:
        if self.quant not in QUANTIZERS:
            raise ConfigError(f"unknown quantizer {self.quant!r}; use one of {QUANTIZERS}")
        if not 0.0 <= self.topk <= 1.0:
            raise ConfigError(f"top-k fraction {self.topk} must be in (0, 1]")
        if not 8 <= self.block <= 1 << 20:
            raise ConfigError(f"block size {self.block} must be between 8 and 2**20")
        if self.lossless not in LOSSLESS:
            raise ConfigError(f"unknown lossless stage {self.lossless!r}; use {LOSSLESS}")

    @property
    def bits(self) -> int:
        return {"f32": 32, "f16": 16, "q8": 8, "q4": 4, "q2": 2, "sign": 1}[self.quant]

    @property
    def sparse(self) -> bool:
        return 0.0 < self.topk < 1.0

    def wire(self) -> str:
        """What goes into the payload: everything the decoder needs, nothing it doesn't."""
        stages = []
        if self.sparse:
            fraction = f"{self.topk:g}"
            if "e" in fraction:  # below 1e-4 `g` writes 1e-05, which the grammar refuses
                fraction = format(Decimal(repr(self.topk)), "f")
            stages.append(f"top{fraction}")
        quant = self.quant
        if self.quant not in ("f32", "f16") and self.block != DEFAULT_BLOCK:
            quant += f"b{self.block}"
        stages.append(quant)
        if self.lossless in ("zstd", "zlib"):
            stages.append(self.lossless)
        return "+".join(stages)

    def __str__(self) -> str:
        text = self.wire()
        if self.lossless == "auto":
            text += "+auto"
        return text + ("+ef" if self.error_feedback else "")


def parse_spec(text: str) -> CodecSpec:
    """A preset name or a pipeline string -> CodecSpec (ConfigError if malformed)."""
    if text in PRESETS:
        return PRESETS[text].spec
    return _parse_stages(text)


@lru_cache(maxsize=256)
def _parse_stages(text: str) -> CodecSpec:
    """Grammar only: a payload's "q8" means exactly q8, whatever a preset of that name does."""
    fields: dict[str, object] = {}
    for stage in text.split("+"):
        if m := _TOP.fullmatch(stage):
            fields["topk"] = float(m.group(1))
        elif stage in ("f32", "f16"):
            fields["quant"] = stage
        elif m := _BLOCKED.fullmatch(stage):
            fields["quant"] = m.group(1)
            if m.group(2):
                fields["block"] = int(m.group(2))
        elif stage in LOSSLESS:
            fields["lossless"] = stage
        elif stage == "ef":
            fields["error_feedback"] = True
        else:
            raise ConfigError(
                f"codec {text!r}: unknown stage {stage!r}; use a preset ({', '.join(PRESETS)}) "
                "or stages like top0.02+q4b128+zstd+ef"
            )
    return CodecSpec(**fields)  # type: ignore[arg-type]


def parse_wire_spec(text: str) -> CodecSpec:
    """parse_spec for a received payload: failures are the sender's, so CodecError."""
    try:
        spec = _parse_stages(text)
    except ConfigError as exc:
        raise CodecError(f"payload codec {text!r} is not understood: {exc}",
                         reason="unknown_codec") from None
    if spec.lossless == "auto":
        raise CodecError(f"payload codec {text!r} names no concrete lossless stage",
                         reason="unknown_codec")
    return spec


@dataclass(frozen=True, slots=True)
class Preset:
    name: str
    spec: CodecSpec
    description: str


PRESETS: dict[str, Preset] = {}
for _p in (
    Preset("float32", CodecSpec(), "raw float32, no compression (the baseline)"),
    Preset("float16", CodecSpec(quant="f16"), "IEEE half precision (2x)"),
    Preset("q8", CodecSpec(quant="q8", lossless="auto"),
           "8-bit stochastic rounding, per-block scales, zstd (~4x)"),
    Preset("q4", CodecSpec(quant="q4", lossless="auto"), "4-bit stochastic, per-block scales"),
    Preset("q2", CodecSpec(quant="q2", lossless="auto"),
           "2-bit stochastic (ternary levels), per-block scales"),
    Preset("sign-ef", CodecSpec(quant="sign", lossless="auto", error_feedback=True),
           "1-bit sign with per-block mean-magnitude scale, error feedback (~32x)"),
    Preset("top3-q2-ef", CodecSpec(topk=0.03, quant="q2", lossless="auto",
                                   error_feedback=True),
           "top 3% + 2-bit stochastic (ternary) + error feedback"),
    Preset("top2-sign-ef", CodecSpec(topk=0.02, quant="sign", lossless="auto",
                                     error_feedback=True),
           "top 2% + sign x mean magnitude (sparse ternary, Sattler et al.) + error feedback"),
    Preset("top1-sign-ef", CodecSpec(topk=0.01, quant="sign", lossless="auto",
                                     error_feedback=True),
           "top 1% + sign x mean magnitude + error feedback"),
    Preset("top10-q8-ef", CodecSpec(topk=0.10, quant="q8", lossless="auto",
                                    error_feedback=True), "top 10% + 8-bit + error feedback"),
    Preset("top5-q4-ef", CodecSpec(topk=0.05, quant="q4", lossless="auto",
                                   error_feedback=True), "top 5% + 4-bit + error feedback"),
    Preset("top2-q4-ef", CodecSpec(topk=0.02, quant="q4", lossless="auto",
                                   error_feedback=True), "top 2% + 4-bit + error feedback"),
    Preset("top1-q8-ef", CodecSpec(topk=0.01, quant="q8", lossless="auto",
                                   error_feedback=True), "top 1% + 8-bit + error feedback"),
    Preset("top1-q4-ef", CodecSpec(topk=0.01, quant="q4", lossless="auto",
                                   error_feedback=True), "top 1% + 4-bit + error feedback"),
):
    if _p.name in PRESETS:
        raise ValueError(f"codec preset {_p.name!r} defined twice")
    PRESETS[_p.name] = _p


def with_lossless(spec: CodecSpec, lossless: str) -> CodecSpec:
    return replace(spec, lossless=lossless)
