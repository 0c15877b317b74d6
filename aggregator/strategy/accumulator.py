"""Streaming weighted sum of client deltas: memory does not grow with the number of updates."""

from __future__ import annotations

from typing import Any

import numpy as np

from aggregator.strategy.rule import AggregationRule
from fedmq.core import codecs
from fedmq.core.protocol import EncodedTensor
from fedmq.errors import CodecError


class WeightedAccumulator(AggregationRule):
    """Holds sum_k w_k * delta_k and sum_k n_k; the mean is their ratio (rule "mean").

    Usually w_k = n_k (samples). A stale update comes in with w_k = n_k * s(tau) but still
    adds n_k below the line, so its discount survives even when every update in the
    buffer is equally stale (FedBuff's (1/K) sum s(tau_k) delta_k, weighted by samples).
    """

    name = "mean"
    streams = True

    def __init__(self, size: int) -> None:
        self.total = np.zeros(size, dtype=np.float32)
        self.weight = 0.0
        self._count = 0
        self._scaled: np.ndarray | None = None  # add()'s weighted delta

    @property
    def count(self) -> int:
        return self._count

    def add_encoded(self, tensor: EncodedTensor, weight: float,
                    norm: float | None = None) -> None:
        """Decode straight into the running sum, all-or-nothing.

        decode_into validates lengths, indices and scales (and finiteness) before it
        touches the sum, so a rejected update never leaves a trace in the aggregate.
        """
        _check_weight(weight, norm)
        codecs.decode_into(tensor, self.total, weight)
        self.weight += weight if norm is None else norm
        self._count += 1

    def add(self, delta: np.ndarray, weight: float, norm: float | None = None) -> None:
        if delta.shape != self.total.shape:
            raise CodecError(
                f"delta has shape {delta.shape}, model needs {self.total.shape}", reason="bad_shape"
            )
        _check_weight(weight, norm)
        if self._scaled is None:  # kept: a fresh temporary per update costs more than the add
            self._scaled = np.empty_like(self.total)
        np.multiply(delta, np.float32(weight), out=self._scaled)
        self.total += self._scaled
        self.weight += weight if norm is None else norm
        self._count += 1

    def mean(self) -> np.ndarray:
        if self.weight <= 0:
            raise ValueError("no updates accumulated: a mean over nothing is undefined")
        return (self.total / self.weight).astype(np.float32)

    def result(self) -> np.ndarray:
        return self.mean()

    def state_dict(self) -> dict[str, Any]:
        return {"rule": self.name, "total": self.total.copy(), "weight": self.weight,
                "count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_saved_rule(state)
        total = np.asarray(state["total"], dtype=np.float32)
        if total.shape != self.total.shape:
            raise ValueError(f"saved aggregate has shape {total.shape}, need {self.total.shape}")
        self.total = total.copy()
        self.weight = float(state["weight"])
        self._count = int(state["count"])


def _check_weight(weight: float, norm: float | None) -> None:
    if not weight > 0 or (norm is not None and not norm >= weight):
        raise ValueError(f"weight must be > 0 and at most norm, got {weight}, {norm}")
