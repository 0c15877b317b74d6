import numpy as np
import pytest

from edge_agent import persist


def test_state_round_trip_with_arrays(tmp_path):
    state = {"round": 3, "params": np.arange(5, dtype=np.float32),
             "nested": {"m": np.ones((2, 3))}, "history": [{"a": 1.5}]}
    path = tmp_path / "s.ckpt"
    persist.save_state(path, state)
    loaded = persist.load_state(path)
    assert loaded["round"] == 3 and loaded["history"] == [{"a": 1.5}]
    assert np.array_equal(loaded["params"], state["params"])
    assert loaded["params"].dtype == np.float32 and loaded["nested"]["m"].shape == (2, 3)
    assert list(tmp_path.iterdir()) == [path]  # no temporary files left behind


def test_missing_and_corrupt_state(tmp_path):
    assert persist.load_state(tmp_path / "none") is None
    (tmp_path / "bad").write_bytes(b"\x92\x01")
    with pytest.raises(persist.StateError):
        persist.load_state(tmp_path / "bad")


def test_object_arrays_are_refused_both_ways():
    with pytest.raises(TypeError):
        persist.dumps({"x": np.array([object()])})
    forged = persist.dumps({"x": np.zeros(1)}).replace(b"<f8", b"|O8")
    with pytest.raises(persist.StateError):
        persist.loads(forged)
