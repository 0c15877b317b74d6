"""Users' own tasks, written as a user would (only fedmq's public API), for
tests/test_user_tasks*.py to name by import path: tests.user_tasks.numpy_task:BlobsTask."""

from __future__ import annotations

import numpy as np

FEATURES, CLASSES = 8, 4


def blobs(*, seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters around fixed centres: separable, so a few rounds learn them."""
    centres = np.random.default_rng(12345).normal(0.0, 0.7, size=(CLASSES, FEATURES))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, size=n)
    x = centres[y] + rng.normal(0.0, 1.0, size=(n, FEATURES))
    return x.astype(np.float32), y


def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.data / 16.0).astype(np.float32), data.target
