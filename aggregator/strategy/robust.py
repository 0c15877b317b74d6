"""Robust aggregation: coordinate-wise median and trimmed mean (Yin et al., ICML 2018).

A weighted mean lets one device move the model anywhere; the norm bound (max_update_norm)
limits how far, but a few colluding devices inside the bound still steer it. The median,
or the mean of what is left after cutting the `trim` fraction of largest and smallest
values per coordinate, stays within the range of the honest updates as long as fewer
than half of a round's K updates (median), or at most floor(trim x K) of them (trimmed
mean), are corrupted. Both are unweighted: a device claiming many samples would otherwise
buy extra influence. Each device counts once per round (sync rounds that discard late
updates), so the share of updates is the share of devices.

Unlike the streaming sum they need every update of the round, so the collector keeps
each one as it arrived (encoded, so 1-4 bytes a value) and decodes them all when the round
closes into a K x P float32 matrix: memory grows with the round's updates.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedmq.core import codecs
from fedmq.core.protocol import EncodedTensor
from fedmq.errors import ConfigError

RULES = ("median", "trimmed_mean")
# Coordinates reduced per step at close: bounds the sort's scratch to K x COLUMNS values.
COLUMNS = 1 << 16


def coordinate_median(rows: np.ndarray) -> np.ndarray:
    return _by_columns(rows, lambda block: np.median(block, axis=0))


def trimmed_mean(rows: np.ndarray, trim: float) -> np.ndarray:
    """Per coordinate, the mean of the values left after dropping floor(trim * K) of the
    largest and as many of the smallest."""
    k = trimmed_count(trim, len(rows))

    def reduce(block: np.ndarray) -> np.ndarray:
        ordered = np.sort(block, axis=0)
        return ordered[k:len(block) - k].mean(axis=0)

    return _by_columns(rows, reduce)


def _by_columns(rows: np.ndarray, reduce) -> np.ndarray:
    if rows.ndim != 2 or not len(rows):
        raise ValueError("no updates to aggregate")
    out = np.empty(rows.shape[1], dtype=np.float32)
    for lo in range(0, rows.shape[1], COLUMNS):
        out[lo:lo + COLUMNS] = reduce(rows[:, lo:lo + COLUMNS])
    return out


class UpdateCollector:
    """Keeps the round's updates for a robust rule; the WeightedAccumulator's interface."""

    def __init__(self, size: int, *, rule: str, trim: float = 0.1) -> None:
        check_rule(rule, trim)
        self.size, self.rule, self.trim = size, rule, trim
        self.tensors: list[EncodedTensor] = []
        self._scratch = np.zeros(size, dtype=np.float32)

    @property
    def count(self) -> int:
        return len(self.tensors)

    def add_encoded(self, tensor: EncodedTensor, weight: float,
                    norm: float | None = None) -> None:
        """Keep `tensor` (its weight does not count: the rules are unweighted). Decoded
        once now, so an invalid one is refused at once, never at close."""
        self._scratch.fill(0.0)
        codecs.decode_into(tensor, self._scratch, 1.0)
        self.tensors.append(tensor)

    def mean(self) -> np.ndarray:
        """The rule's aggregate (called `mean` where the round machine takes it)."""
        rows = np.zeros((len(self.tensors), self.size), dtype=np.float32)
        for row, tensor in zip(rows, self.tensors, strict=True):
            codecs.decode_into(tensor, row, 1.0)
        if self.rule == "median":
            return coordinate_median(rows)
        return trimmed_mean(rows, self.trim)

    def state_dict(self) -> dict[str, Any]:
        return {"rule": self.rule,
                "tensors": [[t.codec, t.size, t.data] for t in self.tensors]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "tensors" not in state:
            raise ConfigError(f"the checkpoint's open round was summed for the mean; finish "
                              f"it with aggregation = mean, then switch to {self.rule}")
        self.tensors = [EncodedTensor(codec=c, size=int(n), data=bytes(d))
                        for c, n, d in state["tensors"]]


def trimmed_count(trim: float, count: int) -> int:
    """Values cut from each end of `count`: floor(trim x count), where 0.29 x 100 is 29."""
    return math.floor(trim * count + 1e-9)


def check_round_size(rule: str, trim: float, smallest_round: int) -> None:
    """A rule must still cut something from the smallest round that may close (at its
    deadline, with min_updates): the median of two is their mean, and a trimmed mean that
    cuts nothing is the mean."""
    if rule == "median" and smallest_round < 3:
        raise ConfigError(f"the median of {smallest_round} updates is their mean: set "
                          "min_updates to at least 3")
    if rule == "trimmed_mean" and trimmed_count(trim, smallest_round) < 1:
        raise ConfigError(f"trimmed_mean with trim_fraction {trim} cuts nothing from a round "
                          f"of {smallest_round} updates (min_updates): raise either")


def check_rule(rule: str, trim: float) -> None:
    if rule not in RULES:
        raise ConfigError(f"aggregation {rule!r} must be mean, {' or '.join(RULES)}")
    if not 0.0 <= trim < 0.5:
        raise ConfigError(f"trim_fraction {trim} must be in [0, 0.5): the fraction cut "
                          "from each end")
