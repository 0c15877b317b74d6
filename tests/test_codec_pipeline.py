"""Properties of the codec pipeline: exact lossless stages, unbiased bounded quantization,
exact error feedback, sparse decode-into-sum, and hostile payloads."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedmq.core import codecs
from fedmq.core.codecs import lossless
from fedmq.core.codecs.bitpack import pack, unpack, varint_decode, varint_encode
from fedmq.core.codecs.pipeline import _levels
from fedmq.core.codecs.spec import CodecSpec, parse_spec
from fedmq.core.protocol import EncodedTensor
from fedmq.errors import CodecError, ConfigError

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)
vectors = arrays(np.float32, st.integers(1, 700), elements=finite)
QUANTIZED = ["q8", "q4", "q2"]
ALL_SPECS = ["float32", "float16", "q8", "q4", "q2", "sign-ef", "top5-q4-ef", "top1-q8-ef",
             "top0.3+f16+zlib", "top0.5+q2b16", "q4b8+zlib", "signb32+zstd"]


@given(st.sampled_from([1, 2, 4, 8]), st.data())
def test_bitpacking_round_trips(bits, data):
    values = data.draw(arrays(np.uint8, st.integers(0, 300),
                              elements=st.integers(0, (1 << bits) - 1)))
    packed = pack(values, bits)
    assert len(packed) == (len(values) * bits + 7) // 8
    assert np.array_equal(unpack(packed, bits, len(values)), values)


@given(st.lists(st.integers(0, 2**35 - 1), max_size=200))
def test_varints_round_trip(values):
    encoded = varint_encode(np.array(values, dtype=np.uint64))
    decoded, used = varint_decode(encoded + b"\x00trailing", len(values))
    assert decoded.tolist() == values and used == len(encoded)


@given(st.binary(max_size=5000), st.sampled_from(["zstd", "zlib", "none"]))
def test_lossless_stages_round_trip_exactly(data, stage):
    assert lossless.decompress(lossless.compress(data, stage), stage, limit=len(data)) == data


@pytest.mark.parametrize("stage", ["zstd", "zlib"])
def test_decompression_is_bounded(stage):
    bomb = lossless.compress(b"\0" * 10_000_000, stage)
    assert len(bomb) < 20_000
    with pytest.raises(CodecError) as info:
        lossless.decompress(bomb, stage, limit=1000)
    assert info.value.reason == "too_large"


@settings(max_examples=25, deadline=None)
@given(arrays(np.float32, st.integers(1, 40), elements=finite), st.sampled_from(QUANTIZED))
def test_stochastic_quantization_is_unbiased(x, quant):
    spec = CodecSpec(quant=quant, block=16)
    rng = np.random.default_rng(0)
    n = 600  # 5 sd is 0.1 of a step: deterministic rounding (bias up to half a step) fails
    mean = np.mean([codecs.decode(codecs.encode(x, spec, rng=rng)) for _ in range(n)], axis=0)
    scale = np.abs(x).max() / _levels(spec.bits)  # the largest any block's scale can be
    # each decode is within one scale step of x, so its sd is <= scale / 2
    assert np.all(np.abs(mean - x) <= 5 * (scale / 2) / np.sqrt(n) + 1e-4)


@given(vectors, st.sampled_from(QUANTIZED), st.sampled_from([8, 16, 64, 256]))
def test_quantization_error_is_within_one_step_of_each_block(x, quant, block):
    spec = CodecSpec(quant=quant, block=block)
    decoded = codecs.decode(codecs.encode(x, spec, rng=np.random.default_rng(1)))
    pad = (-len(x)) % block
    blocks = np.concatenate([x, np.zeros(pad, np.float32)]).reshape(-1, block)
    step = np.repeat(np.abs(blocks).max(axis=1) / _levels(spec.bits), block)[: len(x)]
    assert np.all(np.abs(decoded - x) <= step * (1 + 1e-5) + 1e-6)


def test_one_outlier_only_costs_its_own_block():
    x = np.random.default_rng(0).normal(size=1024).astype(np.float32) * 0.01
    x[5] = 1000.0
    decoded = codecs.decode(codecs.encode(x, CodecSpec(quant="q4", block=64)))
    assert np.abs(decoded[64:] - x[64:]).max() < 0.01


@given(vectors, st.sampled_from(ALL_SPECS))
def test_lossy_pipelines_keep_size_and_finite_values(x, name):
    decoded = codecs.decode(codecs.encode(x, name, rng=np.random.default_rng(2)))
    assert decoded.shape == x.shape and np.isfinite(decoded).all()


@given(vectors, st.sampled_from(["float32", "top0.3+f32", "top0.05+f32+zlib"]))
def test_float32_pipelines_are_exact_on_what_they_keep(x, name):
    decoded = codecs.decode(codecs.encode(x, name))
    kept = decoded != 0
    assert np.array_equal(decoded[kept], x[kept])
    spec = parse_spec(name)
    if spec.sparse:  # top-k keeps the largest magnitudes
        k = max(1, round(spec.topk * x.size))
        assert np.count_nonzero(decoded) <= k
        threshold = np.sort(np.abs(x))[-k]
        assert np.all(np.abs(x[np.abs(x) > threshold]) == np.abs(decoded[np.abs(x) > threshold]))


@settings(max_examples=40)
@given(st.lists(arrays(np.float32, 64, elements=finite), min_size=1, max_size=6),
       st.sampled_from(["sign-ef", "top5-q4-ef", "top2-q4-ef", "top0.1+f32+ef"]))
def test_error_feedback_carries_exactly_the_unsent_residual(deltas, name):
    feedback = codecs.ErrorFeedback(parse_spec(name))
    rng = np.random.default_rng(3)
    sent = np.zeros(64, np.float64)
    for delta in deltas:
        before = np.zeros(64, np.float32) if feedback.residual is None else feedback.residual
        corrected = delta + before
        tensor = feedback.encode(delta, rng=rng)
        decoded = codecs.decode(tensor)
        assert np.allclose(feedback.residual, corrected - decoded, atol=1e-4)
        sent += decoded
    # nothing is lost: everything sent plus what is still held equals everything trained
    total = np.sum(np.array(deltas, dtype=np.float64), axis=0)
    assert np.allclose(sent + feedback.residual, total, rtol=1e-4, atol=1e-2)


def test_error_feedback_state_survives_a_restart_but_not_a_codec_change():
    spec = parse_spec("top5-q4-ef")
    a = codecs.ErrorFeedback(spec)
    a.encode(np.arange(100, dtype=np.float32), rng=np.random.default_rng(0))
    b = codecs.ErrorFeedback(spec)
    b.load_state_dict(a.state_dict())
    assert np.array_equal(a.residual, b.residual)
    c = codecs.ErrorFeedback(parse_spec("sign-ef"))
    c.load_state_dict(a.state_dict())
    assert c.residual is None


def test_resumed_error_feedback_keeps_the_spec_its_residual_was_saved_under():
    a = codecs.ErrorFeedback(parse_spec("top5-q4-ef"))
    a.encode(np.arange(100, dtype=np.float32), rng=np.random.default_rng(0))
    b = codecs.ErrorFeedback.resume(a.state_dict(), default=parse_spec("float32"))
    assert b.spec == a.spec and np.array_equal(a.residual, b.residual)
    fresh = codecs.ErrorFeedback.resume({}, default=parse_spec("sign-ef"))
    assert fresh.spec == parse_spec("sign-ef") and fresh.residual is None
    unknown = codecs.ErrorFeedback.resume({**a.state_dict(), "spec": "top5-q9-ef"},
                                          default=parse_spec("sign-ef"))
    assert unknown.residual is None  # a codec this build cannot parse: nothing to resume


@given(st.integers(1, 5), st.sampled_from(ALL_SPECS), st.floats(0.5, 5000), st.data())
def test_decode_into_the_sum_equals_decode_then_add(seed, name, weight, data):
    x = data.draw(vectors)
    start = data.draw(arrays(np.float32, x.size, elements=finite))
    tensor = codecs.encode(x, name, rng=np.random.default_rng(seed))
    acc = start.copy()
    codecs.decode_into(tensor, acc, weight)
    expected = start + np.float32(weight) * codecs.decode(tensor)
    assert np.allclose(acc, expected, rtol=1e-5, atol=1e-2)


@settings(max_examples=200)
@given(st.sampled_from(ALL_SPECS), st.data())
def test_truncated_or_garbled_payloads_raise_codec_errors_and_leave_the_sum_alone(name, data):
    x = data.draw(vectors)
    tensor = codecs.encode(x, name, rng=np.random.default_rng(0))
    cut = data.draw(st.integers(0, max(0, len(tensor.data) - 1)))
    mangled = data.draw(st.sampled_from([
        tensor.data[:cut],
        tensor.data + b"\x00",
        data.draw(st.binary(max_size=len(tensor.data) + 8)),
    ]))
    assume(mangled != tensor.data)
    acc = np.ones(x.size, np.float32)
    try:
        codecs.decode_into(dataclasses.replace(tensor, data=mangled), acc, 2.0)
    except CodecError:
        assert np.array_equal(acc, np.ones(x.size, np.float32))
    else:  # a few flips decode to other valid values; they must still be finite
        assert np.isfinite(acc).all()


@pytest.mark.parametrize("codec", ["rot13", "q3", "top2+q4", "q8+auto", "f32+ef+x"])
def test_unknown_codec_names_in_payloads_are_codec_errors(codec):
    with pytest.raises(CodecError):
        codecs.decode(EncodedTensor(codec=codec, size=4, data=b"\0" * 16))


def test_non_finite_scale_is_refused():
    tensor = codecs.encode(np.ones(8, np.float32), CodecSpec(quant="q8", block=8))
    bad = np.float32(np.nan).tobytes() + tensor.data[4:]
    with pytest.raises(CodecError) as info:
        codecs.decode(dataclasses.replace(tensor, data=bad))
    assert info.value.reason == "non_finite"


def test_spec_strings_round_trip_and_presets_are_listed():
    for preset in codecs.PRESETS.values():
        spec = preset.spec
        assert parse_spec(str(spec)) == spec
        wire = parse_spec(spec.wire())
        assert wire.quant == spec.quant and wire.topk == spec.topk
    assert {"float32", "float16", "q8", "q4", "q2", "sign-ef"} <= set(codecs.codec_names())
    with pytest.raises(ConfigError):
        parse_spec("top1.5+q4")
    with pytest.raises(ConfigError):
        parse_spec("q4b4")


def test_compression_ratios_on_a_model_sized_update():
    x = np.random.default_rng(0).normal(size=4810).astype(np.float32) * 0.01
    size = {name: len(codecs.encode(x, name).data) for name in codecs.codec_names()}
    assert size["float32"] == 4 * 4810
    assert size["float32"] / size["q8"] > 3.5
    assert size["float32"] / size["q4"] > 7
    assert size["float32"] / size["sign-ef"] > 25
    assert size["float32"] / size["top2-q4-ef"] > 90


@pytest.mark.parametrize("codec", ["float32", "float16", "q8", "q4", "sign-ef", "top10-q8-ef"])
def test_finite_values_that_could_overflow_the_sum_are_refused_before_touching_it(codec):
    huge = np.full(64, 1e36, np.float32) if codec != "float16" else np.full(64, 6e4, np.float32)
    tensor = codecs.encode(huge, codec, rng=np.random.default_rng(0))
    acc = np.ones(64, np.float32)
    weight = 10.0 if codec != "float16" else 1e30
    with pytest.raises(CodecError) as info:
        codecs.decode_into(tensor, acc, weight)
    assert info.value.reason == "out_of_range"
    assert np.all(acc == 1.0)
    codecs.decode_into(codecs.encode(np.full(64, 0.5, np.float32), codec,
                                     rng=np.random.default_rng(0)), acc, 10.0)  # sane: fine


@settings(max_examples=40, deadline=None)
@given(codec=st.sampled_from(["float32", "float16", "q8", "q4b64", "q2b32", "sign", "top0.3+q8"]),
       size=st.integers(1, 3000), chunk=st.sampled_from([8, 64, 100, 512, 1 << 18]),
       seed=st.integers(0, 2**16))
def test_decoding_in_steps_equals_decoding_at_once(codec, size, chunk, seed):
    """The step size (CHUNK) is a speed knob: any step, aligned to the blocks or not, must
    give the same sum as one step over the whole tensor."""
    from fedmq.core.codecs import pipeline

    rng = np.random.default_rng(seed)
    tensor = codecs.encode(rng.normal(0, 1, size).astype(np.float32), codec, rng=rng)
    base = rng.normal(0, 1, size).astype(np.float32)
    whole, stepped = base.copy(), base.copy()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "CHUNK", 1 << 22)
        codecs.decode_into(tensor, whole, 2.5)
        patch.setattr(pipeline, "CHUNK", chunk)
        codecs.decode_into(tensor, stepped, 2.5)
    assert np.array_equal(stepped, whole)


@given(st.floats(1e-12, 0.0099, allow_nan=False), st.sampled_from(["q8", "sign", "f16"]))
def test_every_top_k_fraction_writes_a_codec_name_receivers_parse(fraction, quant):
    # `g` formatting wrote fractions below 1e-4 as "top1e-05", which the grammar refuses:
    # every update of such a device was rejected as unknown_codec.
    spec = CodecSpec(topk=fraction, quant=quant)
    received = codecs.pipeline.parse_wire_spec(spec.wire())
    assert received.sparse and received.quant == quant
    tensor = codecs.encode(np.arange(50, dtype=np.float32), spec)
    assert np.count_nonzero(codecs.decode(tensor)) == 1


@pytest.mark.parametrize("name", ["top0.1+q8", "top0.3+f32", "top0.5+sign+zlib"])
def test_an_empty_tensor_round_trips_through_a_sparse_codec(name):
    # The decoder reads k first; the encoder used to write nothing for zero values.
    tensor = codecs.encode(np.zeros(0, np.float32), name)
    assert tensor.data == b"\x00"
    assert codecs.decode(tensor).size == 0
