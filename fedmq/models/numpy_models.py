"""Dependency-free models for the smallest devices: softmax regression and a one-hidden-layer MLP.

Parameters live in one flat float32 vector; the named tensors are views into it, so
get/set of the flat vector is a copy and nothing else. Gradients are analytic.
"""

from __future__ import annotations

import time

import numpy as np

from fedmq.core.layout import ParamLayout
from fedmq.errors import DataError
from fedmq.models.base import EvalResult, Model, TrainResult, batches, budget_spent


def _softmax_xent(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy and its gradient with respect to the logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    probs = exp / exp.sum(axis=1, keepdims=True)
    n = logits.shape[0]
    loss = float(-np.log(probs[np.arange(n), y] + 1e-12).mean())
    probs[np.arange(n), y] -= 1.0
    return loss, probs / n


class NumpyModel(Model):
    """Shared training loop; subclasses define the layout, forward and backward passes."""

    backend = "numpy"

    def __init__(self, layout: ParamLayout, seed: int) -> None:
        self.layout = layout
        self.params = np.zeros(layout.size, dtype=np.float32)
        self.grads = np.zeros_like(self.params)
        self.p = layout.split(self.params)
        self.g = layout.split(self.grads)
        self._init(np.random.default_rng(seed))

    def _init(self, rng: np.random.Generator) -> None:
        for name, shape in self.layout.entries:
            if len(shape) == 2:  # He initialisation for weight matrices, zeros for biases
                self.p[name][...] = rng.normal(0.0, np.sqrt(2.0 / shape[0]), size=shape)

    def get_flat(self) -> np.ndarray:
        return self.params.copy()

    def set_flat(self, flat: np.ndarray) -> None:
        if flat.shape != self.params.shape:
            raise DataError(
                f"model {self.name} needs {self.params.size} parameters, got {flat.size}"
            )
        self.params[...] = flat

    def _logits(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _loss_and_grad(self, x: np.ndarray, y: np.ndarray) -> float:
        """Forward + backward on one batch; leaves the gradient in self.grads."""
        raise NotImplementedError

    def train(self, x, y, *, epochs, batch_size, lr, rng, prox_mu=0.0, time_budget_s=0.0,
              max_steps=0) -> TrainResult:
        if len(x) == 0:
            raise DataError("no training examples on this device")
        start = time.perf_counter()
        anchor = self.params.copy() if prox_mu > 0 else None
        total_loss, seen, steps = 0.0, 0, 0
        for idx in batches(len(x), epochs=epochs, batch_size=batch_size, rng=rng):
            if steps and budget_spent(start, steps, time_budget_s, max_steps):
                return TrainResult(num_samples=seen, loss=total_loss / seen,
                                   seconds=time.perf_counter() - start, steps=steps,
                                   complete=False)
            loss = self._loss_and_grad(x[idx], y[idx])
            if anchor is not None:  # FedProx: gradient of mu/2 ||w - w_global||^2
                self.grads += prox_mu * (self.params - anchor)
            self.params -= np.float32(lr) * self.grads
            total_loss += loss * len(idx)
            seen += len(idx)
            steps += 1
        return TrainResult(num_samples=seen, loss=total_loss / seen,
                           seconds=time.perf_counter() - start, steps=steps)

    def evaluate(self, x, y) -> EvalResult:
        if len(x) == 0:
            raise DataError("no evaluation examples")
        logits = self._logits(x)
        loss, _ = _softmax_xent(logits, y)
        accuracy = float((logits.argmax(axis=1) == y).mean())
        return EvalResult(loss=loss, accuracy=accuracy, num_samples=len(x))


class LogisticRegression(NumpyModel):
    """Multinomial logistic (softmax) regression."""

    name = "logreg"

    def __init__(self, *, inputs: int, classes: int, seed: int = 0) -> None:
        super().__init__(ParamLayout((("w", (inputs, classes)), ("b", (classes,)))), seed)

    def _init(self, rng: np.random.Generator) -> None:
        pass  # a convex model: start at zero, deterministically

    def _logits(self, x):
        return x @ self.p["w"] + self.p["b"]

    def _loss_and_grad(self, x, y):
        loss, dlogits = _softmax_xent(self._logits(x), y)
        self.g["w"][...] = x.T @ dlogits
        self.g["b"][...] = dlogits.sum(axis=0)
        return loss


class MLP(NumpyModel):
    """inputs -> hidden (ReLU) -> classes."""

    name = "mlp"

    def __init__(self, *, inputs: int, classes: int, hidden: int = 64, seed: int = 0) -> None:
        layout = ParamLayout(
            (("w1", (inputs, hidden)), ("b1", (hidden,)), ("w2", (hidden, classes)),
             ("b2", (classes,)))
        )
        super().__init__(layout, seed)

    def _hidden(self, x):
        return np.maximum(x @ self.p["w1"] + self.p["b1"], 0.0)

    def _logits(self, x):
        return self._hidden(x) @ self.p["w2"] + self.p["b2"]

    def _loss_and_grad(self, x, y):
        h = self._hidden(x)
        loss, dlogits = _softmax_xent(h @ self.p["w2"] + self.p["b2"], y)
        self.g["w2"][...] = h.T @ dlogits
        self.g["b2"][...] = dlogits.sum(axis=0)
        dh = dlogits @ self.p["w2"].T
        dh[h <= 0] = 0.0
        self.g["w1"][...] = x.T @ dh
        self.g["b1"][...] = dh.sum(axis=0)
        return loss
