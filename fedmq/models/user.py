"""A user's Trainer (fedmq.api) behind the flat-vector `Model` interface.

The named arrays of `get_params()`, in their order, become the ParamLayout (its hash is
computed exactly as for the built-in models), and the flat float32 vector is their
concatenation; everything downstream (codecs, aggregation, transfer) sees no difference.
The user's code runs inside; what it raises is reported as a DataError naming the task,
the method and the line, so an agent logs one line instead of a traceback.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from fedmq.api import TRAINER_METHODS, Budget, FitResult, Trainer
from fedmq.core.layout import ParamLayout
from fedmq.errors import ConfigError, DataError, FedmqError
from fedmq.models.base import EvalResult, Model, TrainResult

T = TypeVar("T")


def where(exc: BaseException) -> str:
    """ ' (file:line)' of the innermost frame that raised `exc` (or of a syntax error)."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f" ({exc.filename}:{exc.lineno})"
    frames = traceback.extract_tb(exc.__traceback__)
    return f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def user_call(task: str, what: str, call: Callable[[], T]) -> T:
    """Run the user's code; a failure becomes a DataError that says where it happened."""
    try:
        return call()
    except FedmqError:
        raise
    except Exception as exc:  # the user's code: any failure is named, with its line
        raise DataError(f"task {task}: {what} failed: {type(exc).__name__}: {exc}"
                        f"{where(exc)}") from exc


def missing_methods(obj: object, methods: tuple[str, ...]) -> list[str]:
    return [m for m in methods if not callable(getattr(obj, m, None))]


class UserModel(Model):
    """A Trainer as a Model. `threads` (set by the agent) reaches the Trainer in its Budget."""

    def __init__(self, name: str, trainer: Trainer) -> None:
        missing = missing_methods(trainer, TRAINER_METHODS)
        if missing:
            raise ConfigError(
                f"task {name}: build() returned {type(trainer).__name__}, which lacks "
                f"{', '.join(missing)} (a fedmq.Trainer has {', '.join(TRAINER_METHODS)}; "
                "TorchTrainer, NumpyTrainer and SklearnTrainer are ready-made ones)")
        self.name = name
        self.trainer = trainer
        # said in the device's status, which allows 32 characters
        self.backend = str(getattr(trainer, "backend", "") or "user")[:32]
        self.threads = 0
        params = self._named()
        self.layout = ParamLayout(tuple((n, tuple(a.shape)) for n, a in params.items()))

    def _named(self) -> dict[str, np.ndarray]:
        """get_params() checked: a mapping of names to floating-point arrays."""
        params = user_call(self.name, "get_params()", self.trainer.get_params)
        if not isinstance(params, Mapping) or not params:
            raise DataError(f"task {self.name}: get_params() must return a non-empty mapping "
                            f"of names to arrays, got {type(params).__name__}")
        out = {}
        for key, value in params.items():
            if not isinstance(key, str):
                raise DataError(f"task {self.name}: parameter names must be strings, got "
                                f"{key!r}")
            array = np.asarray(value)
            if array.dtype.kind != "f":
                raise DataError(f"task {self.name}: parameter {key!r} is {array.dtype}; only "
                                "floating-point arrays are federated (leave counters and "
                                "integer state out of get_params)")
            out[key] = array
        return out

    def get_flat(self) -> np.ndarray:
        params = self._named()
        shapes = tuple((n, tuple(a.shape)) for n, a in params.items())
        if shapes != self.layout.entries:
            raise DataError(f"task {self.name}: get_params() changed from "
                            f"{_describe(self.layout.entries)} to {_describe(shapes)}; its "
                            "names and shapes must stay as they were when the model was built")
        return np.concatenate([a.reshape(-1) for a in params.values()]).astype(np.float32)

    def set_flat(self, flat: np.ndarray) -> None:
        if flat.shape != (self.layout.size,):
            raise DataError(f"model {self.name} needs {self.layout.size} parameters, got "
                            f"{flat.size}")
        views = self.layout.split(np.asarray(flat, dtype=np.float32))
        params = {name: view.copy() for name, view in views.items()}  # the trainer may keep them
        user_call(self.name, "set_params()", lambda: self.trainer.set_params(params))

    def train(self, x, y, *, epochs, batch_size, lr, rng, prox_mu=0.0, time_budget_s=0.0,
              max_steps=0) -> TrainResult:
        if len(x) == 0:
            raise DataError("no training examples on this device")
        budget = Budget(epochs=epochs, batch_size=batch_size, lr=lr, prox_mu=prox_mu,
                        max_steps=max_steps, time_budget_s=time_budget_s, rng=rng,
                        threads=self.threads)
        start = time.perf_counter()
        result = user_call(self.name, "fit()", lambda: self.trainer.fit(x, y, budget))
        seconds = time.perf_counter() - start
        if not isinstance(result, FitResult):
            raise DataError(f"task {self.name}: fit() must return a fedmq.FitResult, got "
                            f"{type(result).__name__} (budget.batches(n).result(loss) makes one)")
        if result.num_samples < 1 or not np.isfinite(result.loss):
            raise DataError(f"task {self.name}: fit() reported {result.num_samples} samples "
                            f"and loss {result.loss}; report the examples it trained on and "
                            "a finite loss")
        return TrainResult(num_samples=int(result.num_samples), loss=float(result.loss),
                           seconds=seconds, steps=int(result.steps),
                           complete=bool(result.complete))

    def evaluate(self, x, y) -> EvalResult:
        if len(x) == 0:
            raise DataError("no evaluation examples")
        metrics = user_call(self.name, "evaluate()", lambda: self.trainer.evaluate(x, y))
        if not isinstance(metrics, Mapping) or "loss" not in metrics:
            raise DataError(f"task {self.name}: evaluate() must return a mapping with 'loss' "
                            f"(and 'accuracy' for classes), got {metrics!r:.100}")
        return EvalResult(loss=float(metrics["loss"]), accuracy=_optional(metrics, "accuracy"),
                          num_samples=len(x), top3=_optional(metrics, "top3"))


def _optional(metrics: Mapping[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return None if value is None else float(value)


def _describe(entries: tuple[tuple[str, tuple[int, ...]], ...]) -> str:
    shown = ", ".join(f"{n}{list(s)}" for n, s in entries[:6])
    return "{" + shown + (", ..." if len(entries) > 6 else "") + "}"
