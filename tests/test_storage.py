import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedmq import storage


def test_state_round_trip_with_arrays(tmp_path):
    state = {"round": 3, "params": np.arange(5, dtype=np.float32),
             "nested": {"m": np.ones((2, 3))}, "history": [{"a": 1.5}]}
    path = tmp_path / "s.ckpt"
    storage.save_state(path, state)
    loaded = storage.load_state(path)
    assert loaded["round"] == 3 and loaded["history"] == [{"a": 1.5}]
    assert np.array_equal(loaded["params"], state["params"])
    assert loaded["params"].dtype == np.float32 and loaded["nested"]["m"].shape == (2, 3)
    assert list(tmp_path.iterdir()) == [path]  # no temporary files left behind


def test_missing_and_corrupt_state(tmp_path):
    assert storage.load_state(tmp_path / "none") is None
    (tmp_path / "bad").write_bytes(b"\x92\x01")
    with pytest.raises(storage.StateError):
        storage.load_state(tmp_path / "bad")


def test_zero_dimensional_and_strided_arrays_keep_their_shape(tmp_path):
    state = {"scalar": np.array(2.5, np.float32), "strided": np.arange(12).reshape(3, 4)[:, ::2]}
    storage.save_state(tmp_path / "s", state)
    for loaded in (storage.load_state(tmp_path / "s"),
                   storage.load_parts(b"".join(map(bytes, storage.dump_parts(state))))):
        assert loaded["scalar"].shape == () and loaded["scalar"] == 2.5
        assert np.array_equal(loaded["strided"], state["strided"])


def test_object_arrays_are_refused_both_ways():
    with pytest.raises(TypeError):
        storage.dumps({"x": np.array([object()])})
    forged = storage.dumps({"x": np.zeros(1)}).replace(b"<f8", b"|O8")
    with pytest.raises(storage.StateError):
        storage.loads(forged)


finite = st.floats(allow_nan=False, width=32)
arrays = st.one_of(
    hnp.arrays(st.sampled_from([np.float32, np.float64, np.int8, np.int64, np.uint16]),
               hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)),
)
trees = st.recursive(
    st.one_of(st.integers(-2**63, 2**63 - 1), finite, st.text(max_size=5), st.none(), arrays),
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.text(max_size=4), children, max_size=4)),
    max_leaves=12,
)


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return (isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
                and np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


@given(trees)
def test_parts_round_trip_any_state(tree):
    data = b"".join(bytes(part) for part in storage.dump_parts(tree))
    assert _same(storage.load_parts(data), tree)


def test_parts_do_not_copy_arrays_and_refuse_what_does_not_add_up():
    big = np.arange(1000, dtype=np.float32)
    parts = storage.dump_parts({"sum": big, "n": 3})
    assert any(np.shares_memory(np.frombuffer(p, np.uint8), big) for p in parts[2:])  # no copy
    data = b"".join(bytes(p) for p in parts)
    for broken in (data[:-4], data[:6], b"\xff" * 8 + data[8:]):
        with pytest.raises(storage.StateError):
            storage.load_parts(broken)
    with pytest.raises(TypeError):
        storage.dump_parts({"x": np.array([object()])})
