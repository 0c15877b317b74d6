"""The one interface every model backend implements: flat parameters in, training, evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .layout import ParamLayout


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What a device reports about its local work: aggregation weights by `num_samples`."""

    num_samples: int  # samples actually processed (epochs x examples seen)
    loss: float  # mean training loss over those samples
    seconds: float


@dataclass(frozen=True, slots=True)
class EvalResult:
    loss: float
    accuracy: float
    num_samples: int


class Model:
    """A trainable model whose state is one flat float32 vector with a fixed layout."""

    name: str
    layout: ParamLayout

    def get_flat(self) -> np.ndarray:
        raise NotImplementedError

    def set_flat(self, flat: np.ndarray) -> None:
        raise NotImplementedError

    def train(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int,
        batch_size: int,
        lr: float,
        rng: np.random.Generator,
        prox_mu: float = 0.0,
    ) -> TrainResult:
        raise NotImplementedError

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> EvalResult:
        raise NotImplementedError
