"""What every aggregation rule offers the round machine, so rules plug in by name.

A rule holds one open round's updates and turns them into the delta that steps the
server optimizer. It either streams (folds each update into a running weighted sum, so
memory does not grow with the round) or collects (keeps every update until the round
closes, as coordinate-wise rules must).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from fedmq.core.protocol import EncodedTensor
from fedmq.errors import ConfigError


class AggregationRule(ABC):
    name: ClassVar[str] = ""
    streams: ClassVar[bool] = True  # False: keeps the round's updates until it closes

    @classmethod
    def build(cls, size: int, *, trim_fraction: float = 0.1) -> AggregationRule:
        """A rule for `size` parameters from the aggregation settings it uses."""
        return cls(size)  # type: ignore[call-arg]

    @property
    @abstractmethod
    def count(self) -> int:
        """Updates held for the open round."""

    def check_round_size(self, smallest_round: int) -> None:  # noqa: B027 - optional hook
        """Raise ConfigError if the smallest round that may close defeats the rule."""

    @abstractmethod
    def add_encoded(self, tensor: EncodedTensor, weight: float,
                    norm: float | None = None) -> None:
        """Take an encoded update: decoded (and so validated) all-or-nothing, once."""

    @abstractmethod
    def add(self, delta: np.ndarray, weight: float, norm: float | None = None) -> None:
        """Take an update already decoded (and validated) by the caller; `delta` may be a
        reused buffer, so a rule that keeps it copies it."""

    @abstractmethod
    def result(self) -> np.ndarray:
        """The round's aggregate delta."""

    def refusal(self) -> str:
        """Why the last `result` is unusable ('' : it is usable); the round is refused
        like a model the guard refuses (an encrypted round that cannot be decrypted)."""
        return ""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def _check_saved_rule(self, state: dict[str, Any]) -> None:
        """Refuse a round saved under another rule: its updates were summed or kept for
        that rule, and cannot be re-read for this one."""
        saved = state.get("rule") or ("mean" if "total" in state else "an unknown rule")
        if saved != self.name:
            how = "summed for the mean" if saved == "mean" else f"collected for {saved}"
            raise ConfigError(f"the checkpoint's open round was {how}; finish it with "
                              f"aggregation = {saved}, then switch to {self.name}")
