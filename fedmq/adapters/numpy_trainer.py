"""A numpy model as a Trainer: named parameter arrays and a function giving the mini-batch
loss and its gradients; fedmq runs plain SGD (plus FedProx's term) within the budget."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fedmq.api import Budget, FitResult, Metrics
from fedmq.errors import ConfigError, DataError

Params = dict[str, np.ndarray]
LossAndGrad = Callable[[Params, Any, Any], tuple[float, Mapping[str, np.ndarray]]]
Predict = Callable[[Params, Any], np.ndarray]


class NumpyTrainer:
    """`loss_and_grad(params, x, y) -> (mean loss, {name: gradient})` on a mini-batch;
    `predict(params, x)` (optional) gives class scores (n, classes) or labels (n,), for
    accuracy. Subclass and override `evaluate` for other metrics."""

    backend = "numpy"

    def __init__(self, params: Mapping[str, Any], loss_and_grad: LossAndGrad, *,
                 predict: Predict | None = None) -> None:
        self.params: Params = {}
        for name, value in params.items():
            array = np.array(value, copy=True)
            if array.dtype.kind != "f":
                raise ConfigError(f"NumpyTrainer: parameter {name!r} is {array.dtype}; give "
                                  "floating-point arrays")
            self.params[name] = array
        if not self.params:
            raise ConfigError("NumpyTrainer needs at least one parameter array")
        self.loss_and_grad = loss_and_grad
        self.predict = predict

    def get_params(self) -> Params:
        return self.params

    def set_params(self, params: Mapping[str, np.ndarray]) -> None:
        for name, value in params.items():
            self.params[name][...] = value

    def _grads(self, x: Any, y: Any) -> tuple[float, Mapping[str, np.ndarray]]:
        loss, grads = self.loss_and_grad(self.params, x, y)
        missing = [n for n in self.params if n not in grads]
        if missing:
            raise DataError(f"loss_and_grad gave no gradient for {', '.join(missing)}")
        return float(loss), grads

    def fit(self, x: Any, y: Any, budget: Budget) -> FitResult:
        anchor = {n: p.copy() for n, p in self.params.items()} if budget.prox_mu > 0 else None
        plan = budget.batches(len(x))
        total = 0.0
        for idx in plan:
            loss, grads = self._grads(x[idx], y[idx])
            for name, p in self.params.items():
                grad = grads[name]
                if anchor is not None:  # FedProx: gradient of mu/2 ||w - w_global||^2
                    grad = grad + budget.prox_mu * (p - anchor[name])
                p -= budget.lr * grad
            total += loss * len(idx)
        return plan.result(total / plan.samples)

    def evaluate(self, x: Any, y: Any) -> Metrics:
        loss, _ = self._grads(x, y)
        metrics = {"loss": loss}
        if self.predict is not None:
            metrics["accuracy"] = accuracy(self.predict(self.params, x), y)
        return metrics


def accuracy(scores: Any, y: Any) -> float:
    """Share of `y` matched by `scores`: class scores (n, classes) or labels (n,)."""
    scores, y = np.asarray(scores), np.asarray(y)
    predicted = scores.argmax(axis=1) if scores.ndim == 2 else scores
    return float((predicted == y).mean())


__all__ = ["NumpyTrainer", "accuracy"]
