"""Central differential privacy for the aggregate: DP-FedAvg (McMahan et al., ICLR 2018).

Every device's delta is clipped to an L2 norm of `clip_norm` (the update screen does it),
counts with weight 1 (not its sample count, which would let one device move the sum by
more than `clip_norm`), and the round's sum gets Gaussian noise of standard deviation
`noise_multiplier * clip_norm` before it is divided by a fixed denominator (the round's
target number of updates). Adding or removing one device then changes what any round
releases by at most `clip_norm`: user-level privacy, for the whole of a device's data.

The privacy spent is accounted by strategy/accounting.py with Google's dp-accounting
(RDP or PLD, amplified by the selector's sampling where the library can). Noise is drawn
from the OS unless `seed` is set (tests and reproducible simulations: never in
production, where a predictable noise stream is no noise at all).

Adaptive clipping (Andrew et al., "Differentially Private Learning with Adaptive
Clipping", NeurIPS 2021): with `clip_quantile` gamma set, the clip follows the gamma-th
quantile of the updates' norms. Each round the server counts the updates that were within
the clip before clipping, releases that count (centred, each device moving it by 1/2)
with Gaussian noise sigma_b (`count_noise`; default the expected updates / 20, as in the
paper), and steps the clip geometrically: C <- C exp(-eta (b - gamma)), b the noised
fraction within. The count's noise is accounted with the round's (accounting.py).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np

from aggregator.strategy.accounting import accountant_kind
from fedmq.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class CentralDP:
    clip_norm: float  # L2 bound on one device's delta: the sum's sensitivity
    noise_multiplier: float  # noise std on the sum, in units of clip_norm
    denominator: int  # the round's sum is divided by this fixed count, not by who came
    delta: float = 1e-5
    accountant: str = "rdp"  # strategy/accounting.py: rdp or pld
    target_epsilon: float = 0.0  # stop before a round would spend beyond it (0: no budget)
    seed: int = -1  # of the noise, for reproducible tests (-1: fresh from the OS)
    clip_quantile: float = 0.0  # adaptive clipping's target quantile gamma (0: fixed clip)
    clip_lr: float = 0.2  # eta of the geometric clip step
    count_noise: float = 0.0  # sigma_b of the noised count (0: denominator / 20)

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
        accountant_kind(self.accountant)
        if not (math.isfinite(self.target_epsilon) and self.target_epsilon >= 0):
            raise ConfigError(f"dp_target_epsilon {self.target_epsilon} must be >= 0 (0: no "
                              "budget)")
        if not 0 <= self.clip_quantile < 1:
            raise ConfigError(f"dp_clip_quantile {self.clip_quantile} must be in [0, 1) "
                              "(0: a fixed clip; 0.5 clips at the median norm)")
        if not (math.isfinite(self.clip_lr) and self.clip_lr > 0):
            raise ConfigError(f"dp_clip_lr {self.clip_lr} must be > 0 (0.2 in Andrew et al.)")
        if not (math.isfinite(self.count_noise) and self.count_noise >= 0):
            raise ConfigError(f"dp_clip_count_noise {self.count_noise} must be >= 0 (0: the "
                              "expected updates per round / 20)")

    @property
    def adaptive(self) -> bool:
        return self.clip_quantile > 0

    @property
    def count_sigma(self) -> float:
        """sigma_b of adaptive clipping's count (0 without adaptive clipping)."""
        if not self.adaptive:
            return 0.0
        return self.count_noise or self.denominator / 20.0

    def rng(self, round: int) -> np.random.Generator:
        """The noise of `round`: seeded by (seed, round) when a seed is set, else fresh."""
        if self.seed >= 0:
            return np.random.default_rng([self.seed, round])
        # PCG64 seeded with 128 bits from the OS: unpredictable, not a cryptographic stream
        return np.random.default_rng(secrets.randbits(128))

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.clip_norm

    def noised_mean(self, total: np.ndarray, rng: np.random.Generator | None = None, *,
                    clip_norm: float | None = None) -> np.ndarray:
        """(total + N(0, (z clip)^2 I)) / denominator, `clip` the round's (default the
        fixed one). Fresh noise from the OS unless a generator is given (see rng())."""
        if rng is None:
            rng = np.random.default_rng(secrets.randbits(128))
        std = self.noise_multiplier * (clip_norm or self.clip_norm)
        noise = rng.normal(0.0, std, total.shape).astype(np.float32)
        return (total + noise) / np.float32(self.denominator)

    def noise_norm(self, size: int, clip_norm: float | None = None) -> float:
        """The expected L2 norm of a round's noise in the mean, for `size` parameters
        (a Gaussian vector's norm concentrates at std x sqrt(size))."""
        std = self.noise_multiplier * (clip_norm or self.clip_norm)
        return std * math.sqrt(size) / self.denominator


# The adaptive clip stays within these multiples of the configured dp_clip_norm: a clip
# that collapsed to 0 would zero every update, one that ran away would drown the model
# in noise (the quantile estimate is noisy, and a fleet may go quiet).
CLIP_RANGE = (1e-3, 1e3)


class AdaptiveClip:
    """The clip norm of the next round: fixed, or stepped towards the target quantile of
    the updates' norms (see the module doc). Checkpointed with the round machine."""

    def __init__(self, dp: CentralDP) -> None:
        self.dp = dp
        self.clip = dp.clip_norm

    def step(self, *, within: int, counted: int, rng: np.random.Generator) -> float:
        """After a round of `counted` updates of which `within` were not clipped: the
        clip for the next round (unchanged when the clip is fixed)."""
        dp = self.dp
        if not dp.adaptive:
            return self.clip
        centred = (within - counted / 2.0) + float(rng.normal(0.0, dp.count_sigma))
        fraction = centred / dp.denominator + 0.5
        low, high = (f * dp.clip_norm for f in CLIP_RANGE)
        self.clip = min(high, max(low, self.clip * math.exp(-dp.clip_lr
                                                            * (fraction - dp.clip_quantile))))
        return self.clip

    def state_dict(self) -> dict[str, float]:
        return {"clip": self.clip}

    def load_state_dict(self, state: dict[str, float]) -> None:
        try:
            clip = float(state["clip"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"the checkpoint's DP clip is damaged ({exc}); move the "
                              "checkpoint away to start fresh") from None
        if not (math.isfinite(clip) and clip > 0):
            raise ConfigError(f"the checkpoint's DP clip {clip} is not a norm; move the "
                              "checkpoint away to start fresh")
        # a fixed clip follows the configuration, an adaptive one resumes where it was
        self.clip = clip if self.dp.adaptive else self.dp.clip_norm

