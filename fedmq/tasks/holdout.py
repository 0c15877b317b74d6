"""A device's local held-out split: the examples it scores models on and never trains on.

Federated evaluation and personalization (docs/protocol.md, EvalReport) need each device
to score the announced model on data of its own that it did not train on. Windows of one
text (the keyboard's character windows, int64 rows) hold out their last `fraction`, after
a gap of one window so no held-out window shares a character with a training one: the
same user's later typing, as LEAF evaluates. Any other data holds out a seeded random
`fraction` of its rows.
"""

from __future__ import annotations

import numpy as np

from fedmq.errors import ConfigError
from fedmq.tasks import Dataset


def is_sequential(data: Dataset) -> bool:
    """Whether `data` is overlapping windows of one text (int64 rows of ids)."""
    return data.x.ndim == 2 and data.x.dtype == np.int64


def local_holdout(data: Dataset, fraction: float, *, seed: int) -> tuple[Dataset, Dataset | None]:
    """(training data, held-out data) of one device; held-out None when `fraction` is 0
    or the device has too few examples to spare any (it then trains on all of them)."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"eval_holdout {fraction} must be in [0, 1)")
    n = len(data)
    if fraction == 0.0:
        return data, None
    held = round(n * fraction)
    if is_sequential(data):
        gap = data.x.shape[1]
        if held < 1 or n - held - gap < 1:
            return data, None
        return (data.subset(np.arange(n - held - gap)),
                data.subset(np.arange(n - held, n)))
    if held < 1 or n - held < 1:
        return data, None
    order = np.random.default_rng([seed, 7919]).permutation(n)
    return data.subset(np.sort(order[held:])), data.subset(np.sort(order[:held]))
