"""A PyTorch `nn.Module` as a Trainer, with your loss and optimizer.

The named arrays are the module's parameters then its persistent floating-point buffers
(BatchNorm statistics), as for the built-in torch models (fedmq/models/torch_backend.py
says why buffers travel). Each round makes a fresh optimizer from the factory (the
usual choice in federated learning: optimizer state does not outlive a round); FedProx's
term mu/2 ||w - w_global||^2 is added to the loss when the budget asks for it. torch is
imported when a TorchTrainer is made (pip install 'fedmq[torch]').
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fedmq.adapters.numpy_trainer import accuracy
from fedmq.api import Budget, FitResult, Metrics
from fedmq.errors import ConfigError, require

EVAL_BATCH = 1024  # examples per forward pass when evaluating: bounds memory, not results


def _torch():
    return require("torch", "torch")


def sgd(params: Any, lr: float) -> Any:
    """The default optimizer factory: plain SGD at the round's learning rate."""
    return _torch().optim.SGD(params, lr=lr)


class TorchTrainer:
    """`module` trained with `loss(outputs, targets)` (default: cross-entropy over class
    logits) and `optimizer(parameters, lr)` (default: SGD). Inputs are converted to
    `x_dtype` (None: as given, e.g. int64 token ids); targets to int64 when they are whole
    numbers, else float32. Subclass and override `evaluate` for other metrics."""

    backend = "torch"

    def __init__(self, module: Any, *, loss: Callable[[Any, Any], Any] | None = None,
                 optimizer: Callable[[Any, float], Any] = sgd,
                 x_dtype: str | None = "float32") -> None:
        torch = _torch()
        from fedmq.models.torch_backend import federated_state

        if not isinstance(module, torch.nn.Module):
            raise ConfigError(f"TorchTrainer needs a torch.nn.Module, got "
                              f"{type(module).__name__}")
        self.module = module
        self.loss = loss or torch.nn.functional.cross_entropy
        self.optimizer = optimizer
        self.x_dtype = None if x_dtype is None else np.dtype(x_dtype)
        self._state = federated_state(module)

    @classmethod
    def build(cls, factory: Callable[[], Any], *, seed: int, **options: Any) -> TorchTrainer:
        """The module `factory()` makes under `seed` (the same initial weights on every
        machine), leaving the caller's random state alone."""
        torch = _torch()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = factory()
        return cls(module, **options)

    def get_params(self) -> dict[str, np.ndarray]:
        return {name: t.detach().cpu().numpy().copy() for name, t in self._state}

    def set_params(self, params: Mapping[str, np.ndarray]) -> None:
        torch = _torch()
        with torch.no_grad():
            for name, t in self._state:
                t.copy_(torch.from_numpy(np.asarray(params[name])).to(t.dtype).view_as(t))

    def _x(self, x: Any) -> Any:
        # Copy: a read-only or strided view cannot back a tensor.
        return _torch().from_numpy(np.array(x, dtype=self.x_dtype))

    def _y(self, y: Any) -> Any:
        y = np.asarray(y)
        whole = y.dtype.kind in "biu"
        return _torch().from_numpy(np.array(y, dtype=np.int64 if whole else np.float32))

    def fit(self, x: Any, y: Any, budget: Budget) -> FitResult:
        from fedmq.models.torch_backend import torch_compute

        trainable = [p for p in self.module.parameters() if p.requires_grad]
        anchor = [p.detach().clone() for p in trainable] if budget.prox_mu > 0 else None
        optimizer = self.optimizer(trainable, budget.lr)
        plan = budget.batches(len(x))
        total = 0.0
        with torch_compute(budget.threads):
            self.module.train()
            for idx in plan:
                optimizer.zero_grad(set_to_none=True)
                loss = self.loss(self.module(self._x(x[idx])), self._y(y[idx]))
                total += loss.item() * len(idx)  # the task's loss, without the prox term
                if anchor is not None:  # FedProx: mu/2 ||w - w_global||^2
                    loss = loss + budget.prox_mu / 2 * sum(
                        (p - a).pow(2).sum() for p, a in zip(trainable, anchor, strict=True))
                loss.backward()
                optimizer.step()
        return plan.result(total / plan.samples)

    def predict(self, x: Any) -> np.ndarray:
        """The module's outputs in eval mode, without autograd, EVAL_BATCH at a time."""
        from fedmq.models.torch_backend import torch_compute

        torch = _torch()
        out = []
        with torch_compute(0), torch.no_grad():
            self.module.eval()
            for lo in range(0, len(x), EVAL_BATCH):
                out.append(self.module(self._x(x[lo : lo + EVAL_BATCH])))
        return torch.cat(out)

    def evaluate(self, x: Any, y: Any) -> Metrics:
        outputs = self.predict(x)
        with _torch().no_grad():
            loss = float(self.loss(outputs, self._y(y)))
        metrics = {"loss": loss}
        if outputs.ndim == 2 and np.asarray(y).dtype.kind in "biu":  # class scores
            metrics["accuracy"] = accuracy(outputs.numpy(), y)
        return metrics


__all__ = ["TorchTrainer", "sgd"]
