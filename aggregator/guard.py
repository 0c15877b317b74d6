"""The last check before a model goes out: it is finite and did not explode.

Every device trains on what the aggregator publishes, so a non-finite model stops the
whole fleet for good (no device can train on it, so no update can repair it), and an
exploded one (a huge update folded in before the norm bound had warmed up, or with
bounds turned off) throws away all training so far. The round machine asks the guard
about each new model; a refused one is never published: the round is dropped and run
again from the last good model (rounds.py).

Honest rounds change the model's L2 norm by a few percent; the first rounds of a model
that starts at zero (logreg) by up to 2x (measured on the bundled tasks), hence the
default of 10x, measured against at least FLOOR so a model near zero may grow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from aggregator.bounds import check_factor

# The smallest norm growth is measured against: a zero-initialised model has norm 0.
FLOOR = 1.0


def l2_norm(values: np.ndarray) -> float:
    """Summed in float64: float32 squares overflow long before a float32 vector does.
    einsum casts block by block: no float64 copy of a 1M-value update (8 MB, and a
    float64 dot here is 10x slower than this), every update pays it on the way in."""
    x = values.ravel()
    return math.sqrt(float(np.einsum("i,i->", x, x, dtype=np.float64)))


@dataclass(frozen=True, kw_only=True)
class ModelGuard:
    max_growth: float = 10.0  # 0: only non-finite models are refused
    floor: float = FLOOR

    def __post_init__(self) -> None:
        check_factor("max_model_growth", self.max_growth, minimum=1.0)
        if not (math.isfinite(self.floor) and self.floor > 0):
            raise ValueError(f"the guard's floor {self.floor} must be > 0")

    def refusal(self, old: np.ndarray, new: np.ndarray, *, slack: float = 0.0) -> str:
        """Why `new` must not replace `old` ('' if it may). `slack`: a norm the step may
        have by design, whatever the old model's (the DP noise of a round)."""
        norm = l2_norm(new)
        if not math.isfinite(norm):  # a NaN or Inf anywhere makes the float64 norm so
            return "the new model is not finite (NaN or Inf)"
        base = max(l2_norm(old), self.floor, slack)
        if self.max_growth and norm > self.max_growth * base:
            return (f"the new model's L2 norm {norm:.4g} is {norm / base:.3g}x the last "
                    f"good one's ({base:.4g}), above max_model_growth {self.max_growth:g}")
        return ""
