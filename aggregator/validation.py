"""What an update must pass before it may touch the aggregate, one reason token per failure.

The wire layer checks types and fields, the round machine checks round, version, layout
and duplicates, and decoding into the running sum checks codec, size and finiteness; this
adds the checks about the *sender* and the *contents*: a known, online device (optional),
payload and declared sizes, and an optional L2 norm bound (clip or reject) with values
whose weighted sum cannot overflow. Pure apart from a reused scratch buffer: the service
calls it and counts what it raises.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from aggregator.devices import DeviceRegistry
from fedmq.core import codecs
from fedmq.core.codecs.pipeline import MAX_WEIGHTED_VALUE
from fedmq.core.protocol import Part, Update
from fedmq.errors import ConfigError, ProtocolError

# A device that stops cleanly publishes its offline status right after its last update,
# and statuses skip the update queue: give the update this long to catch up.
OFFLINE_GRACE_S = 10.0
# The largest honest update spends 9 bytes per parameter (top-k at 100%: a varint index
# of at most 5 bytes plus a float32). The slack covers the envelope and a lossless frame
# many times over, and leaves even a tiny model room for two default-sized messages.
MAX_BYTES_PER_PARAM = 9
SIZE_SLACK = 256 * 1024
# |value| x num_samples must stay below this, so that the float32 sum of up to 2**20
# such updates cannot overflow to Inf (float32 max / 2**20, about 3.2e32).
NORM_POLICIES = ("clip", "reject")
# The first rejection of each (reason, source) is logged, then every LOG_EVERY-th: a
# flood of garbage costs one line per sender and reason, not one per message.
LOG_EVERY = 1000
# (reason, source) pairs remembered for that; beyond it, new sources share one entry, so
# a flood from ever-new device ids cannot grow memory.
MAX_LOG_KEYS = 4096
OTHER_SOURCES = "*"


def _reject(message: str, reason: str) -> ProtocolError:
    return ProtocolError(message, reason=reason)


@dataclass(frozen=True, kw_only=True)
class UpdateLimits:
    """The validation settings of AggregatorConfig, checked once at start-up."""

    require_known_devices: bool = False
    max_update_norm: float = 0.0  # 0: no bound
    norm_policy: str = "clip"
    max_update_bytes: int = 0  # 0: derived from the model size

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_update_norm) and self.max_update_norm >= 0):
            raise ConfigError(f"max_update_norm {self.max_update_norm} must be >= 0 (0: off)")
        if self.norm_policy not in NORM_POLICIES:
            raise ConfigError(f"norm_policy {self.norm_policy!r} must be 'clip' or 'reject'")
        if self.max_update_bytes < 0:
            raise ConfigError("max_update_bytes must be >= 0 (0: derived from the model size)")

    @classmethod
    def from_config(cls, config) -> UpdateLimits:
        norm, policy = config.max_update_norm, config.norm_policy
        if config.dp_noise_multiplier:  # DP: every update clipped to the noise's scale
            if norm:
                raise ConfigError("with dp_noise_multiplier set, dp_clip_norm bounds every "
                                  "update; leave max_update_norm at 0")
            norm, policy = config.dp_clip_norm, "clip"
        return cls(require_known_devices=config.require_known_devices,
                   max_update_norm=norm, norm_policy=policy,
                   max_update_bytes=config.max_update_bytes)

    def payload_limit(self, params: int) -> int:
        """Bytes an update of a `params`-parameter model may take, whole or declared by
        its Parts."""
        return self.max_update_bytes or MAX_BYTES_PER_PARAM * params + SIZE_SLACK


def check_sender(device: str, registry: DeviceRegistry, now: float) -> None:
    """The device announced itself (a birth on its status topic) and has not left."""
    info = registry.devices.get(device)
    if info is None:
        raise _reject(f"{device} never announced itself on its status topic; updates from "
                      "unknown devices are refused (require_known_devices)", "unknown_device")
    if not info.online and now - info.last_change > OFFLINE_GRACE_S:
        raise _reject(f"{device} is offline since {now - info.last_change:.0f} s; its update "
                      "is refused (require_known_devices)", "offline_device")


def check_size(size: int, limit: int, what: str) -> None:
    if size > limit:
        raise _reject(f"{what} of {size} bytes exceeds the {limit}-byte limit for this model "
                      "(max_update_bytes)", "too_large")


def l2_norm(values: np.ndarray) -> float:
    """In float64: float32 squares overflow long before a float32 vector does."""
    x = values.astype(np.float64, copy=False).ravel()
    return math.sqrt(float(np.dot(x, x)))


def clip_factor(norm: float, bound: float, policy: str) -> float:
    """What to scale a delta of L2 norm `norm` by (1.0: keep it); raises for `reject`."""
    if bound <= 0 or norm <= bound:
        return 1.0
    if policy == "reject":
        raise _reject(f"update has L2 norm {norm:.4g}, above max_update_norm {bound:.4g}",
                      "norm_exceeded")
    # a hair under: float32 rounding of the scaled values may otherwise land just above
    return bound / norm * (1.0 - 1e-6)


class UpdateScreen:
    """The checks of one service: its limits, its model size and a reused scratch buffer."""

    def __init__(self, limits: UpdateLimits, *, params: int, registry: DeviceRegistry) -> None:
        self.limits = limits
        self.params = params
        self.registry = registry
        self.max_bytes = limits.payload_limit(params)
        self.clipped = 0  # updates scaled down to max_update_norm
        self._scratch = np.zeros(params, dtype=np.float32)

    def sender(self, device: str, now: float) -> None:
        if self.limits.require_known_devices:
            check_sender(device, self.registry, now)

    def payload(self, payload: bytes) -> None:
        """An MQTT payload on an update topic (a whole Update or one Part)."""
        check_size(len(payload), self.max_bytes, "update payload")

    def part(self, part: Part) -> Part:
        """A Part may not declare a payload bigger than a whole update may be."""
        check_size(part.size, self.max_bytes, "chunked update (declared size)")
        return part

    def contents(self, update: Update) -> Update:
        """The update to fold: itself, or a float32 copy scaled to max_update_norm (clip).

        With a norm bound the delta is decoded into scratch first (codec, size, finiteness,
        values x num_samples within MAX_WEIGHTED_VALUE, then the norm). Without one it is
        decoded once, by the fold itself, which validates it just as strictly but cannot
        see an overflow coming: that second decode would cost a quarter of the ingest
        rate, and without a bound any device can move the model anywhere anyway.
        """
        if not math.isfinite(update.loss * update.num_samples):
            raise _reject(f"training loss {update.loss} x {update.num_samples} samples is "
                          "not finite", "non_finite")
        bound = self.limits.max_update_norm
        if not bound:
            return update
        scratch = self._scratch
        scratch.fill(0.0)
        codecs.decode_into(update.delta, scratch, 1.0)
        peak = max(float(scratch.max()), -float(scratch.min())) if scratch.size else 0.0
        if peak * update.num_samples > MAX_WEIGHTED_VALUE:
            raise _reject(f"update value {peak:.3g} x {update.num_samples} samples would "
                          "overflow the aggregate", "out_of_range")
        factor = clip_factor(l2_norm(scratch), bound, self.limits.norm_policy)
        if factor == 1.0:
            return update
        scratch *= np.float32(factor)
        self.clipped += 1
        return dataclasses.replace(update, delta=codecs.encode(scratch, "float32"))


class RejectionLog:
    """Counts every rejection by reason; logs the first of each (reason, source) and then
    every `every`-th with its running count."""

    def __init__(self, counter: Counter, logger: logging.Logger, *, every: int = LOG_EVERY,
                 max_keys: int = MAX_LOG_KEYS) -> None:
        if every < 1 or max_keys < 1:
            raise ValueError("every and max_keys must be >= 1")
        self.counter = counter
        self.logger = logger
        self.every = every
        self.max_keys = max_keys
        self._seen: dict[tuple[str, str], int] = {}

    def record(self, reason: str, source: str, message: str) -> bool:
        """Count one rejection; True if it was logged."""
        self.counter[reason] += 1
        key = (reason, source)
        if key not in self._seen and len(self._seen) >= self.max_keys:
            key = (reason, OTHER_SOURCES)
        seen = self._seen[key] = self._seen.get(key, 0) + 1
        if seen == 1:
            self.logger.warning("%s", message)
        elif seen % self.every == 0:
            self.logger.warning("%s (%d %s rejections from %s so far)", message, seen, reason,
                                key[1])
        else:
            return False
        return True
