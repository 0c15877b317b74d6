"""The one interface every model backend implements: flat parameters in, training, evaluation."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np

from fedmq.core.layout import ParamLayout

# A torch model's local optimizer: "sgd" is plain SGD (no momentum, no state); "adam" is
# Adam with torch's default betas, built fresh at every train() call, so no optimizer
# state outlives a round or travels with the model (an update is still w_final - w_received).
LOCAL_OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What a device reports about its local work: aggregation weights by `num_samples`."""

    num_samples: int  # samples actually processed (epochs x examples seen)
    loss: float  # mean training loss over those samples
    seconds: float
    steps: int = 0  # optimizer steps taken
    complete: bool = True  # False: stopped at the time budget or step cap before `epochs`


@dataclass(frozen=True, slots=True)
class EvalResult:
    loss: float
    accuracy: float | None  # top-1; None: a task without classes (a user's regression)
    num_samples: int
    top3: float | None = None  # share with the label among the 3 best (keyboard), if reported


def batches(n: int, *, epochs: int, batch_size: int,
            rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Index arrays of shuffled mini-batches, epoch after epoch (shared by every backend)."""
    for _ in range(epochs):
        order = rng.permutation(n)
        for lo in range(0, n, batch_size):
            yield order[lo : lo + batch_size]


# Why a context variable: a stop must reach every training loop (the built-in backends,
# users' trainers through Budget.batches, FedRep's partial fits) without widening
# Model.train's signature, which users' models implement too. Each thread has its own.
_STOP_REQUESTED: ContextVar[Callable[[], bool] | None] = ContextVar("fedmq_stop_requested",
                                                                    default=None)


@contextmanager
def stoppable(stop_requested: Callable[[], bool]) -> Iterator[None]:
    """Training on this thread inside the block ends after its current step once
    `stop_requested()` is true (the result then says complete=False)."""
    token = _STOP_REQUESTED.set(stop_requested)
    try:
        yield
    finally:
        _STOP_REQUESTED.reset(token)


def budget_spent(start: float, steps: int, time_budget_s: float, max_steps: int) -> bool:
    """True once a device has used its time budget or step cap (0 means no limit), or was
    asked to stop (see `stoppable`)."""
    if max_steps and steps >= max_steps:
        return True
    stop_requested = _STOP_REQUESTED.get()
    if stop_requested is not None and stop_requested():
        return True
    return bool(time_budget_s) and time.perf_counter() - start >= time_budget_s


class Model:
    """A trainable model whose state is one flat float32 vector with a fixed layout."""

    name: str
    layout: ParamLayout
    backend: str = ""  # what trains it (numpy, torch): devices report it in their status

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
        time_budget_s: float = 0.0,
        max_steps: int = 0,
    ) -> TrainResult:
        """Train in place for `epochs`, stopping early (between batches) once `time_budget_s`
        seconds have passed or `max_steps` steps were taken (0: no limit). At least one
        step is always taken, so a slow device still contributes."""
        raise NotImplementedError

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> EvalResult:
        raise NotImplementedError
