"""char_gru's local loss at every position of the window: the same parameters and the
same inference as the last-position loss, 64 targets per window in training."""

import numpy as np
import pytest
import torch

from fedmq.errors import ConfigError
from fedmq.models import build_model

SMALL = {"vocab": 96, "seq_len": 12, "embed": 4, "hidden": 16, "layers": 1, "threads": 1}


def _data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    text = rng.integers(1, 96, n + SMALL["seq_len"])
    x = np.lib.stride_tricks.sliding_window_view(text, SMALL["seq_len"])[:n]
    return np.ascontiguousarray(x), text[SMALL["seq_len"]:SMALL["seq_len"] + n]


def test_all_positions_is_the_default_and_keeps_layout_and_inference():
    every = build_model("char_gru", SMALL, seed=1)
    last = build_model("char_gru", {**SMALL, "loss": "last"}, seed=1)
    assert every.layout == last.layout  # the same model on the wire
    x, _ = _data()
    assert np.array_equal(every.predict_logits(x), last.predict_logits(x))


def test_the_training_loss_scores_every_position():
    model = build_model("char_gru", SMALL, seed=1)
    x, y = _data()
    with torch.no_grad():
        logits = model.module.forward_all(torch.from_numpy(x))
        targets = torch.cat([torch.from_numpy(x[:, 1:]), torch.from_numpy(y)[:, None]], 1)
        want = torch.nn.functional.cross_entropy(logits.reshape(-1, 96), targets.reshape(-1))
        last = torch.nn.functional.cross_entropy(logits[:, -1], torch.from_numpy(y))
    result = model.train(x, y, epochs=1, batch_size=len(x), lr=0.0,
                         rng=np.random.default_rng(0))
    assert result.loss == pytest.approx(float(want), rel=1e-5)
    assert result.loss != pytest.approx(float(last), rel=1e-3)
    last_model = build_model("char_gru", {**SMALL, "loss": "last"}, seed=1)
    got = last_model.train(x, y, epochs=1, batch_size=len(x), lr=0.0,
                           rng=np.random.default_rng(0))
    assert got.loss == pytest.approx(float(last), rel=1e-5)


def test_an_unknown_loss_is_refused():
    with pytest.raises(ConfigError, match="loss must be one of"):
        build_model("char_gru", {**SMALL, "loss": "middle"})
