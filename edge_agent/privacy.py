"""Local differential privacy: the device clips and noises its own update before upload.

Central DP (aggregator/strategy/privacy.py) trusts the aggregator with each clear update
and protects what it publishes. Local DP trusts nobody: the update leaves the device as
clip(delta, C) + N(0, (z C)^2 I), so the aggregator, the broker and anyone listening see
only that. Any two datasets of the device give clipped deltas at most 2C apart, so each
round is the Gaussian mechanism with noise multiplier z / 2 on the device's whole data:
(a, 2a / z^2)-RDP at every order a > 1, T rounds 2Ta / z^2, and at delta
epsilon = r + 2 sqrt(r ln(1/delta)), r = 2T / z^2 (Mironov 2017's conversion at the best
order). Written out here rather than taken from dp-accounting: the device's base install
stays numpy and paho (the aggregator's accountant is the extra `dp`); a test checks it
against the library. The noise is per device, so the fleet's mean carries noise of
z C / sqrt(K) per value: local DP costs accuracy that central DP does not.

Not protected: the update's metadata (its sample count, training loss, timing and size),
which the aggregator needs.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np

from fedmq.errors import ConfigError


def clip_and_noise(delta: np.ndarray, *, clip: float, noise_multiplier: float,
                   rng: np.random.Generator) -> np.ndarray:
    """delta scaled to an L2 norm of at most `clip`, plus N(0, (noise_multiplier x
    clip)^2) per value: a new float32 array, `delta` untouched."""
    x = np.asarray(delta, dtype=np.float32)
    norm = math.sqrt(float(np.einsum("i,i->", x.ravel(), x.ravel(), dtype=np.float64)))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    noise = rng.normal(0.0, noise_multiplier * clip, x.shape)
    return (x.astype(np.float64) * scale + noise).astype(np.float32)


def local_epsilon(rounds: int, noise_multiplier: float, delta: float) -> float:
    """epsilon at `delta` of `rounds` local-DP updates (see the module doc); 0 for none."""
    if rounds <= 0:
        return 0.0
    r = 2.0 * rounds / noise_multiplier**2
    return r + 2.0 * math.sqrt(r * math.log(1.0 / delta))


@dataclass(frozen=True, kw_only=True)
class LocalDP:
    clip: float  # L2 bound on the device's delta before noise
    noise_multiplier: float  # noise std in units of clip
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"ldp_clip {self.clip} must be > 0 (the L2 bound of this "
                              "device's update)")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ConfigError(f"ldp_noise_multiplier {self.noise_multiplier} must be > 0")
        if not 0 < self.delta < 1:
            raise ConfigError(f"ldp_delta {self.delta} must be in (0, 1)")

    def privatize(self, delta: np.ndarray, rng: np.random.Generator | None = None
                  ) -> np.ndarray:
        """The update to send; fresh noise from the OS unless `rng` is given (tests)."""
        rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
        return clip_and_noise(delta, clip=self.clip, noise_multiplier=self.noise_multiplier,
                              rng=rng)

    def epsilon(self, rounds: int) -> float:
        return local_epsilon(rounds, self.noise_multiplier, self.delta)
