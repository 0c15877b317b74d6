"""How much an update trained on an older model still counts: s(tau), tau = versions behind.

The three shapes of FedAsync (Xie et al. 2019), used by FedBuff (Nguyen et al. 2022) and
by the synchronous rounds' "fold late updates into the next round" policy:

- constant:   s(tau) = 1
- polynomial: s(tau) = (1 + tau) ** -a
- hinge:      s(tau) = 1 if tau <= b else 1 / (a * (tau - b) + 1)

Updates more than `max_staleness` versions behind are refused outright: their delta points
somewhere the model no longer is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedmq.errors import ConfigError

STALENESS_KINDS = ("constant", "polynomial", "hinge")


@dataclass(frozen=True, kw_only=True)
class StalenessPolicy:
    kind: str = "polynomial"
    a: float = 0.5  # polynomial exponent, or the hinge's slope
    b: float = 4.0  # versions a hinge forgives before it starts to discount
    max_staleness: int = 10

    def __post_init__(self) -> None:
        if self.kind not in STALENESS_KINDS:
            raise ConfigError(
                f"staleness {self.kind!r} must be one of {', '.join(STALENESS_KINDS)}")
        if not (math.isfinite(self.a) and self.a >= 0):
            raise ConfigError(f"staleness exponent/slope a = {self.a} must be >= 0")
        if not (math.isfinite(self.b) and self.b >= 0):
            raise ConfigError(f"hinge offset b = {self.b} must be >= 0")
        if self.max_staleness < 0:
            raise ConfigError("max_staleness must be >= 0 versions")

    def weight(self, tau: int) -> float:
        """s(tau) in (0, 1], non-increasing, s(0) = 1."""
        if tau < 0:
            raise ValueError(f"staleness {tau} < 0: an update from a future model")
        if self.kind == "constant":
            return 1.0
        if self.kind == "polynomial":
            return float((1.0 + tau) ** -self.a)
        return 1.0 if tau <= self.b else 1.0 / (self.a * (tau - self.b) + 1.0)

    def accepts(self, tau: int) -> bool:
        return 0 <= tau <= self.max_staleness
