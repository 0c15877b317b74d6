"""Bounds the fleet sets for itself: how large an update may be, and how much it may weigh.

A fixed `max_update_norm` needs someone who knows what honest updates look like, and a
weighted mean trusts every device's `num_samples`: left at that, one stranger moves the
model anywhere, or claims 2^62 samples and drowns the fleet (issue #17). So by default:

- the L2 norm bound is adaptive: `adaptive_norm_factor` x the median norm of the last
  WINDOW accepted updates, once WARMUP have been accepted (before that only the model
  guard, guard.py, stands between a huge update and the fleet);
- a claimed sample count is credited at most `max_sample_factor` x the median credited
  claim of recent accepted updates (before WARMUP of them: of what the devices online
  declared in their births), and at most that many times what the device itself
  declared in its birth (`examples` x the epochs it may be asked for). A device that
  never published a birth (a stranger) is credited at most the typical claim itself:
  it weighs no more than a typical device.

A median moves only when a majority of the window moves it, and each device counts
once per round, so a minority of devices cannot raise the bounds it is held to. What is
recorded is what was folded in (the clipped norm, the credited samples). Pure: the
ingest path (ingest.py) asks and feeds it, the service checkpoints it.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable
from typing import Any

from fedmq.errors import ConfigError

# Accepted updates whose norms and claims make the medians: several rounds of a small
# fleet, and the latest part of one round of a large one (the bounds follow the model).
WINDOW = 64
# Accepted updates before the medians are trusted: a lone first update would otherwise
# set the bound it is held to.
WARMUP = 5
# What a device that never published a birth may weigh, in typical claims.
STRANGER_FACTOR = 1.0


def check_factor(name: str, value: float, *, minimum: float) -> None:
    """A factor setting is 0 (off) or at least `minimum`: below it the bound would cut
    the typical honest update itself."""
    if not (math.isfinite(value) and (value == 0 or value >= minimum)):
        raise ConfigError(f"{name} {value} must be 0 (off) or at least {minimum:g}")


class RecentMedian:
    """The median of the last `window` values, once at least `warmup` were added."""

    def __init__(self, *, window: int = WINDOW, warmup: int = WARMUP) -> None:
        if not 1 <= warmup <= window:
            raise ValueError(f"need 1 <= warmup ({warmup}) <= window ({window})")
        self.warmup = warmup
        self._values: deque[float] = deque(maxlen=window)
        self._median: float | None = None  # cached until the next add

    def add(self, value: float) -> None:
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"a recorded norm or claim must be finite and >= 0, not {value}")
        self._values.append(float(value))
        self._median = None

    @property
    def warm(self) -> bool:
        return len(self._values) >= self.warmup

    def median(self) -> float | None:
        """None until warm."""
        if not self.warm:
            return None
        if self._median is None:
            self._median = statistics.median(self._values)
        return self._median

    def values(self) -> list[float]:
        return list(self._values)

    def load(self, values: Iterable[float]) -> None:
        self._values.clear()
        for value in values:
            self.add(float(value))
        self._median = None


class UpdateBounds:
    """The norm bound and the sample credit, fixed or learnt from accepted updates."""

    def __init__(self, *, max_update_norm: float = 0.0, norm_factor: float = 0.0,
                 sample_factor: float = 0.0, window: int = WINDOW,
                 warmup: int = WARMUP) -> None:
        self.max_update_norm = max_update_norm  # > 0: fixed, the factor is not used
        self.norm_factor = norm_factor  # 0 (and no fixed bound): no norm bound at all
        self.sample_factor = sample_factor  # 0: claims are credited as they are
        self.norms = RecentMedian(window=window, warmup=warmup)
        self.samples = RecentMedian(window=window, warmup=warmup)

    @property
    def decodes(self) -> bool:
        """Whether updates are decoded on the way in (to bound or learn their norm)."""
        return self.max_update_norm > 0 or self.norm_factor > 0

    def norm_bound(self) -> float | None:
        """The L2 bound an update is held to now; None: none (off, or warming up)."""
        if self.max_update_norm > 0:
            return self.max_update_norm
        typical = self.norms.median() if self.norm_factor else None
        if typical is None or typical == 0:  # zero updates so far: nothing to scale by
            return None
        return self.norm_factor * typical

    def typical_claim(self, fleet_declared: float | None = None) -> float | None:
        """The claim an update is compared with: the median of recent credited claims,
        or while too few are known, the median of what the online devices declared."""
        return self.samples.median() if self.samples.warm else fleet_declared

    def credit(self, claim: int, *, declared: float | None = None, known: bool = True,
               fleet_declared: float | None = None) -> int:
        """The samples an update claiming `claim` is weighted by: at most sample_factor x
        the typical claim and x its own device's declared claim (None: it declared
        none); from a device never `known` (no birth), at most STRANGER_FACTOR x the
        typical claim. Never below 1."""
        if not self.sample_factor:
            return claim
        typical = self.typical_claim(fleet_declared)
        caps = [factor * reference for factor, reference in (
                    (self.sample_factor if known else STRANGER_FACTOR, typical),
                    (self.sample_factor, declared))
                if reference is not None and reference > 0]
        if not caps:
            return claim
        return max(1, min(claim, math.floor(min(caps))))

    def accepted(self, *, norm: float | None, samples: int) -> None:
        """Learn from an update that was folded in: its (clipped) norm and credited claim."""
        if norm is not None:
            self.norms.add(norm)
        self.samples.add(float(samples))

    def state_dict(self) -> dict[str, Any]:
        return {"norms": self.norms.values(), "samples": self.samples.values()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            norms, samples = list(state["norms"]), list(state["samples"])
            self.norms.load(norms)
            self.samples.load(samples)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"the checkpoint's update bounds are damaged ({exc}); move the "
                              "checkpoint away to start fresh") from None
