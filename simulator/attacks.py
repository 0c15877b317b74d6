"""What a simulated attacker does: `fedmq simulate --attack NAME --attackers K`.

Devices 0 .. K-1 of the fleet attack. Every attack sends a well-formed update that
validation alone cannot tell from an honest one:

- sign_flip: its honest delta reversed (-delta);
- scaled: reversed and scaled by SCALE (-10 delta), the push of `--byzantine`;
- gaussian: a random delta, N(0, (SCALE x the honest delta's RMS)^2) per value, fresh each
  round (Blanchard et al. 2017's Gaussian Byzantine worker);
- label_flip: trains honestly on its data with every label y flipped to classes - 1 - y
  (data poisoning: its delta looks like training, because it is).

The first three rewrite the delta through the agent's `update_transform` hook; label_flip
changes the device's training data instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from fedmq.errors import ConfigError
from fedmq.tasks import Dataset

ATTACKS = ("sign_flip", "scaled", "gaussian", "label_flip")
SCALE = 10.0


def sign_flip(delta: np.ndarray) -> np.ndarray:
    return -delta


def scaled(delta: np.ndarray) -> np.ndarray:
    return -SCALE * delta


class GaussianAttack:
    """A fresh random delta each round, SCALE x the honest delta's RMS per value."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, delta: np.ndarray) -> np.ndarray:
        rms = float(np.sqrt(np.mean(np.square(delta, dtype=np.float64)))) if delta.size else 0.0
        std = SCALE * max(rms, 1e-6)
        return self.rng.normal(0.0, std, delta.shape).astype(np.float32)


def check_attack(name: str) -> None:
    if name not in ATTACKS:
        raise ConfigError(f"attack {name!r} must be one of {', '.join(ATTACKS)}")


def update_transform(name: str, *, seed: int) -> Callable[[np.ndarray], np.ndarray] | None:
    """What an attacker of kind `name` does to its delta (None: label_flip, which trains
    on flipped labels and sends what it trained)."""
    check_attack(name)
    if name == "sign_flip":
        return sign_flip
    if name == "scaled":
        return scaled
    if name == "gaussian":
        return GaussianAttack(seed)
    return None


def poisoned_data(name: str, data: Dataset, *, classes: int) -> Dataset:
    """The attacker's training data: labels flipped for label_flip, else as it is."""
    check_attack(name)
    if name != "label_flip":
        return data
    if classes < 2:
        raise ConfigError("label_flip needs a classification task with at least 2 classes")
    return dataclasses.replace(data, y=(classes - 1 - data.y).astype(data.y.dtype))
