"""Central differential privacy for the aggregate: DP-FedAvg (McMahan et al., ICLR 2018).

Every device's delta is clipped to an L2 norm of `clip_norm` (the update screen does it),
counts with weight 1 (not its sample count, which would let one device move the sum by
more than `clip_norm`), and the round's sum gets Gaussian noise of standard deviation
`noise_multiplier * clip_norm` before it is divided by a fixed denominator (the round's
target number of updates). Adding or removing one device then changes what any round
releases by at most `clip_norm`: user-level privacy, for the whole of a device's data.

The privacy spent is accounted with Renyi DP (Mironov, CSF 2017): one round of the
Gaussian mechanism with noise multiplier s is (a, a / (2 s^2))-RDP for every order a > 1,
T rounds compose to T a / (2 s^2), and (e, d)-DP follows with
e = T a / (2 s^2) + ln(1/d) / (a - 1), smallest at a = 1 + sqrt(ln(1/d) / r) with
r = T / (2 s^2), where e = r + 2 sqrt(r ln(1/d)). No amplification by sampling is
claimed: a round's participants are the first to answer, not a Poisson sample, so every
device is counted as taking part in every round.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np

from fedmq.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class CentralDP:
    clip_norm: float  # L2 bound on one device's delta: the sum's sensitivity
    noise_multiplier: float  # noise std on the sum, in units of clip_norm
    denominator: int  # the round's sum is divided by this fixed count, not by who came
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ConfigError(f"dp_clip_norm {self.clip_norm} must be > 0: without a bound "
                              "on each update no noise makes the sum private")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ConfigError(f"dp_noise_multiplier {self.noise_multiplier} must be > 0")
        if self.denominator < 1:
            raise ConfigError("the DP denominator (updates per round) must be >= 1")
        if not 0 < self.delta < 1:
            raise ConfigError(f"dp_delta {self.delta} must be in (0, 1), e.g. below 1 / "
                              "the number of devices")

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.clip_norm

    def noised_mean(self, total: np.ndarray,
                    rng: np.random.Generator | None = None) -> np.ndarray:
        """(total + N(0, noise_std^2 I)) / denominator. The noise is freshly seeded from
        the OS unless a generator is given (tests): it must not be reproducible."""
        # PCG64 seeded with 128 bits from the OS: unpredictable, not a cryptographic stream
        rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
        noise = rng.normal(0.0, self.noise_std, total.shape).astype(np.float32)
        return (total + noise) / np.float32(self.denominator)

    def noise_norm(self, size: int) -> float:
        """The expected L2 norm of a round's noise in the mean, for `size` parameters
        (a Gaussian vector's norm concentrates at std x sqrt(size))."""
        return self.noise_std * math.sqrt(size) / self.denominator

    @property
    def rdp_per_round(self) -> float:
        """r of one round: the Gaussian mechanism is (a, a r)-RDP for every order a > 1.
        Rounds with different noise compose by adding their r."""
        return 1.0 / (2.0 * self.noise_multiplier**2)


def epsilon_from_rdp(rdp: float, delta: float) -> float:
    """epsilon at `delta` of a mechanism that is (a, a rdp)-RDP for every a > 1: the
    minimum over a of a rdp + ln(1/delta) / (a - 1); 0 for nothing released."""
    if rdp <= 0:
        return 0.0
    return rdp + 2.0 * math.sqrt(rdp * math.log(1.0 / delta))


def gaussian_epsilon(rounds: int, noise_multiplier: float, delta: float) -> float:
    """epsilon of `rounds` compositions of the Gaussian mechanism (sensitivity 1, std
    `noise_multiplier`) at `delta`, by RDP."""
    return epsilon_from_rdp(max(rounds, 0) / (2.0 * noise_multiplier**2), delta)
