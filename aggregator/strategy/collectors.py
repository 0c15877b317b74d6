"""Rules that keep every update of a round: coordinate-wise median and trimmed mean.

Unlike the streaming sum they need all of a round's updates, so they keep each one as it
arrived (encoded, so 1-4 bytes a value) and decode them all when the round closes into
a K x P float32 matrix: memory grows with the round's updates. Both are unweighted (see
robust.py for why and for the math).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from aggregator.strategy import robust
from aggregator.strategy.rule import AggregationRule
from fedmq.core import codecs
from fedmq.core.protocol import EncodedTensor
from fedmq.errors import CodecError, ConfigError


class UpdateCollector(AggregationRule):
    """Keeps the round's updates; subclasses reduce the K x P matrix at close."""

    streams = False

    @classmethod
    def build(cls, size: int, *, trim_fraction: float = 0.1) -> AggregationRule:
        check_trim(trim_fraction)  # set for a robust rule, so checked for each
        return cls(size)

    def __init__(self, size: int) -> None:
        self.size = size
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

    def add(self, delta: np.ndarray, weight: float, norm: float | None = None) -> None:
        """Keep a decoded delta as raw float32 (4 bytes a value): a copy, no codec work."""
        if delta.shape != (self.size,):
            raise CodecError(f"delta has shape {delta.shape}, model needs ({self.size},)",
                             reason="bad_shape")
        self.tensors.append(EncodedTensor(codec="f32", size=self.size,
                                          data=delta.astype("<f4").tobytes()))

    def rows(self) -> np.ndarray:
        """The round's updates decoded, one row each."""
        rows = np.zeros((len(self.tensors), self.size), dtype=np.float32)
        for row, tensor in zip(rows, self.tensors, strict=True):
            codecs.decode_into(tensor, row, 1.0)
        return rows

    def state_dict(self) -> dict[str, Any]:
        return {"rule": self.name,
                "tensors": [[t.codec, t.size, t.data] for t in self.tensors]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_saved_rule(state)
        self.tensors = [EncodedTensor(codec=c, size=int(n), data=bytes(d))
                        for c, n, d in state["tensors"]]


class CoordinateMedian(UpdateCollector):
    name = "median"

    def check_round_size(self, smallest_round: int) -> None:
        """The median of two is their mean: it cuts nothing."""
        if smallest_round < 3:
            raise ConfigError(f"the median of {smallest_round} updates is their mean: set "
                              "min_updates to at least 3")

    def result(self) -> np.ndarray:
        return robust.coordinate_median(self.rows())


class TrimmedMean(UpdateCollector):
    name = "trimmed_mean"

    def __init__(self, size: int, *, trim_fraction: float = 0.1) -> None:
        check_trim(trim_fraction)
        super().__init__(size)
        self.trim = trim_fraction

    @classmethod
    def build(cls, size: int, *, trim_fraction: float = 0.1) -> TrimmedMean:
        return cls(size, trim_fraction=trim_fraction)

    def check_round_size(self, smallest_round: int) -> None:
        """A trimmed mean that cuts nothing from the smallest round is the mean."""
        if robust.trimmed_count(self.trim, smallest_round) < 1:
            raise ConfigError(f"trimmed_mean with trim_fraction {self.trim} cuts nothing "
                              f"from a round of {smallest_round} updates (min_updates): "
                              "raise either")

    def result(self) -> np.ndarray:
        return robust.trimmed_mean(self.rows(), self.trim)


def check_trim(trim_fraction: float) -> None:
    if not 0.0 <= trim_fraction < 0.5:
        raise ConfigError(f"trim_fraction {trim_fraction} must be in [0, 0.5): the "
                          "fraction cut from each end")
