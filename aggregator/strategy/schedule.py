"""The devices' learning rate over a run, decided by the server and sent with each round.

A constant local learning rate leaves FedAvg's last models wandering on non-IID data: a
round's average moves with whichever devices took part, and the final model is one draw
of that walk (seen in benchmarks/quality.py as +-3-5 points between neighbouring rounds on
synthetic data, on the central side too). Decaying the rate lets both settle (Li et al.
2020 need a decaying rate for FedAvg to converge on non-IID data at all); a cosine keeps it
near lr for the first half, where most of the progress is made.
"""

from __future__ import annotations

import math


def cosine_lr(lr: float, *, floor: float, step: int, steps: int) -> float:
    """lr at `step` of 1..`steps`: lr at the first, lr * `floor` at the last and after,
    along half a cosine in between (`floor` 1 or `steps` < 2: lr throughout)."""
    if floor >= 1 or steps < 2:
        return lr
    done = min(max(step - 1, 0), steps - 1) / (steps - 1)
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * done)))
