"""Rules that keep every update of a round: coordinate-wise median and trimmed mean, and
the Byzantine-robust Krum, multi-Krum, Bulyan and centered clipping (robust.py).

Unlike the streaming sum they need all of a round's updates, so they keep each one as it
arrived (encoded, so 1-4 bytes a value) and decode them all when the round closes into
a K x P float32 matrix: memory grows with the round's updates. Both are unweighted (see
robust.py for why and for the math). Their state hands the kept updates over as an
append-only list, so each checkpoint writes only the updates new since the last one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from aggregator.strategy import robust
from aggregator.strategy.rule import AggregationRule
from fedmq.core import codecs
from fedmq.core.protocol import EncodedTensor
from fedmq.errors import CodecError, ConfigError
from fedmq.storage import AppendOnly


class UpdateCollector(AggregationRule):
    """Keeps the round's updates; subclasses reduce the K x P matrix at close."""

    streams = False

    @classmethod
    def build(cls, size: int, *, trim_fraction: float = 0.1,
              byzantine_f: int = 1) -> AggregationRule:
        check_trim(trim_fraction)  # set for a robust rule, so checked for each
        check_f(byzantine_f)
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
        """The kept updates as the list itself, not a copy: a snapshot per commit costs
        nothing, and the checkpoint appends only the new ones (they are never changed,
        and a new round or a load starts a new list)."""
        return {"rule": self.name,
                "tensors": AppendOnly("updates", self.tensors, len(self.tensors),
                                      pack=_packed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_saved_rule(state)
        saved = state["tensors"]
        if isinstance(saved, AppendOnly):  # a state_dict() not saved in between
            saved = saved.packed()
        self.tensors = [EncodedTensor(codec=c, size=int(n), data=bytes(d))
                        for c, n, d in saved]


def _packed(tensor: EncodedTensor) -> list[Any]:
    return [tensor.codec, tensor.size, tensor.data]


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
    def build(cls, size: int, *, trim_fraction: float = 0.1,
              byzantine_f: int = 1) -> TrimmedMean:
        check_f(byzantine_f)
        return cls(size, trim_fraction=trim_fraction)

    def check_round_size(self, smallest_round: int) -> None:
        """A trimmed mean that cuts nothing from the smallest round is the mean."""
        if robust.trimmed_count(self.trim, smallest_round) < 1:
            raise ConfigError(f"trimmed_mean with trim_fraction {self.trim} cuts nothing "
                              f"from a round of {smallest_round} updates (min_updates): "
                              "raise either")

    def result(self) -> np.ndarray:
        return robust.trimmed_mean(self.rows(), self.trim)


class ByzantineCollector(UpdateCollector):
    """A rule that withstands `f` attackers in a round of at least `smallest(f)` updates."""

    def __init__(self, size: int, *, f: int = 1) -> None:
        check_f(f)
        super().__init__(size)
        self.f = f

    @classmethod
    def build(cls, size: int, *, trim_fraction: float = 0.1,
              byzantine_f: int = 1) -> AggregationRule:
        check_trim(trim_fraction)
        return cls(size, f=byzantine_f)

    @classmethod
    def smallest(cls, f: int) -> int:
        raise NotImplementedError

    @classmethod
    def needs(cls) -> str:
        raise NotImplementedError

    def check_round_size(self, smallest_round: int) -> None:
        least = self.smallest(self.f)
        if smallest_round < least:
            raise ConfigError(f"{self.name} withstands byzantine_f = {self.f} attackers only "
                              f"in rounds of at least {least} updates ({self.needs()}); "
                              f"min_updates is {smallest_round}: raise it or lower "
                              "byzantine_f")

    def result(self) -> np.ndarray:
        rows = self.rows()
        if len(rows) < self.smallest(self.f):  # a deadline closed it short: say so
            raise ConfigError(f"{self.name} got {len(rows)} updates, fewer than the "
                              f"{self.smallest(self.f)} byzantine_f = {self.f} needs")
        return self.reduce(rows)

    def reduce(self, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class Krum(ByzantineCollector):
    name = "krum"

    @classmethod
    def smallest(cls, f: int) -> int:
        return 2 * f + 3

    @classmethod
    def needs(cls) -> str:
        return "n >= 2f + 3"

    def reduce(self, rows: np.ndarray) -> np.ndarray:
        return robust.krum(rows, self.f)


class MultiKrum(Krum):
    name = "multi_krum"

    def reduce(self, rows: np.ndarray) -> np.ndarray:
        return robust.multi_krum(rows, self.f)


class Bulyan(ByzantineCollector):
    name = "bulyan"

    @classmethod
    def smallest(cls, f: int) -> int:
        return 4 * f + 3

    @classmethod
    def needs(cls) -> str:
        return "n >= 4f + 3"

    def reduce(self, rows: np.ndarray) -> np.ndarray:
        return robust.bulyan(rows, self.f)


class CenteredClip(ByzantineCollector):
    """Norm-bounded mean around the median: f < n / 2 attackers."""

    name = "centered_clip"

    @classmethod
    def smallest(cls, f: int) -> int:
        return 2 * f + 1

    @classmethod
    def needs(cls) -> str:
        return "n >= 2f + 1: a median of honest majority to start from"

    def reduce(self, rows: np.ndarray) -> np.ndarray:
        return robust.centered_clip(rows)


def check_f(f: int) -> None:
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ConfigError(f"byzantine_f {f!r} must be a whole number >= 0: the attackers a "
                          "round must withstand")


def check_trim(trim_fraction: float) -> None:
    if not 0.0 <= trim_fraction < 0.5:
        raise ConfigError(f"trim_fraction {trim_fraction} must be in [0, 0.5): the "
                          "fraction cut from each end")
