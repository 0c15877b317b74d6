import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedmq.core import codecs
from fedmq.core.protocol import EncodedTensor
from fedmq.errors import CodecError, ConfigError

finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@given(arrays(np.float32, st.integers(0, 300), elements=finite))
def test_float32_is_exact(values):
    assert np.array_equal(codecs.decode(codecs.encode(values, "float32")), values)


@given(arrays(np.float32, st.integers(0, 300), elements=finite))
def test_float16_is_within_half_precision(values):
    decoded = codecs.decode(codecs.encode(values, "float16"))
    assert np.allclose(decoded, values, rtol=1e-3, atol=1e-3)


@given(arrays(np.float32, 50, elements=finite), st.floats(0.5, 100))
def test_decode_into_adds_weighted(values, weight):
    acc = np.ones(50, dtype=np.float32)
    codecs.decode_into(codecs.encode(values, "float32"), acc, weight)
    assert np.allclose(acc, 1 + np.float32(weight) * values, rtol=1e-5, atol=1e-3)


def test_truncated_tensor_is_a_codec_error():
    tensor = codecs.encode(np.arange(10, dtype=np.float32), "float32")
    short = EncodedTensor(codec=tensor.codec, size=tensor.size, data=tensor.data[:-1])
    with pytest.raises(CodecError) as info:
        codecs.decode(short)
    assert info.value.reason == "truncated"


def test_unknown_codec_in_payload_is_a_codec_error_not_a_config_error():
    with pytest.raises(CodecError):
        codecs.decode(EncodedTensor(codec="rot13", size=1, data=b"1234"))
    with pytest.raises(ConfigError, match="use a preset"):
        codecs.get_codec("rot13")


def test_decode_into_checks_size():
    with pytest.raises(CodecError):
        codecs.decode_into(codecs.encode(np.zeros(3, np.float32)), np.zeros(4, np.float32))
