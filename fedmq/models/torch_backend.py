"""PyTorch backend: any `nn.Module` behind the flat-vector `Model` interface.

Flat vector: every parameter in `named_parameters()` order, then every persistent
floating-point buffer (BatchNorm running mean/var) in `named_buffers()` order, each
flattened row-major as float32. The ParamLayout lists the same (name, shape) pairs, so
its hash changes whenever the architecture does and every update is checked against it.

Floating-point buffers travel with the parameters and are averaged like them. Keeping
them local (FedBN) would leave the server's copy of the model with its initial running
statistics, so the server's evaluation and the ONNX export it ships would normalise
with the wrong statistics. Averaged statistics only approximate the pooled ones (the
spread between devices' means is lost), which is the usual FedAvg-with-BatchNorm
trade-off. Buffers get no gradient and no proximal term: training updates them as the
module's forward pass does. Integer buffers (`num_batches_tracked`) stay local: they
only count steps. Importing this module imports torch (pip install 'fedmq[torch]').
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

from fedmq.core.layout import ParamLayout
from fedmq.errors import ConfigError, DataError, require
from fedmq.models.base import (
    LOCAL_OPTIMIZERS,
    EvalResult,
    Model,
    TrainResult,
    batches,
    budget_spent,
)

torch = require("torch", "torch")

EVAL_BATCH = 1024  # examples per forward pass when evaluating: bounds memory, not results


def federated_state(module) -> list[tuple[str, object]]:
    """(name, tensor) in flat-vector order: parameters, then persistent float buffers."""
    persistent = set(module.state_dict())
    buffers = [(n, b) for n, b in module.named_buffers()
               if n in persistent and b.is_floating_point()]
    return [*module.named_parameters(), *buffers]


class SharedExclusive:
    """Many holders of `shared()` at once, or one of `exclusive()` (which new shared
    holders wait behind). The standard library has no such lock."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive)
            self._exclusive = True
            self._cond.wait_for(lambda: self._shared == 0)
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


# torch.export (the ONNX exporter) keeps its tracing state in torch.fx's module globals,
# which a training step on another thread of the process reads and writes too (torch
# 2.13: KeyError 'custom' in torch/fx/traceback.py mid-fit, when a simulator's aggregator
# exported while its devices trained). Exports hold it exclusively, torch compute shared.
TORCH_TRACING = SharedExclusive()


class _ThreadCount:
    """torch's intra-op thread count is one per process, and a simulator trains several
    models at once on threads of one process. The first computation to start sets the
    count and the last to end restores the process's own (one that asks for another
    count while others run sets it: the newest asked wins). Each used to restore what it
    saw on entry, so the first trainer to finish put the one still training back on
    every core, beside the other trainers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._own = 0  # the process's count while none runs

    @contextmanager
    def at(self, threads: int) -> Iterator[None]:
        with self._lock:
            if self._active == 0:
                self._own = torch.get_num_threads()
            self._active += 1
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                if self._active == 0 and torch.get_num_threads() != self._own:
                    torch.set_num_threads(self._own)


_THREAD_COUNT = _ThreadCount()


@contextmanager
def torch_compute(threads: int) -> Iterator[None]:
    """Training or inference: never beside an export (TORCH_TRACING), and at `threads`
    (0: as is; _ThreadCount says how concurrent computations share the setting)."""
    with TORCH_TRACING.shared():
        if threads < 1:
            yield
            return
        with _THREAD_COUNT.at(threads):
            yield


class TorchModel(Model):
    """A torch module trained by plain SGD or per-round Adam (+ FedProx), its state one
    flat float32 vector.

    For the ONNX export: `module` is the nn.Module, `example_input()` a dummy input of
    the right dtype and shape, `predict_logits()` the reference output.
    """

    backend = "torch"

    def __init__(self, name: str, module, *, example_shape: tuple[int, ...],
                 example_dtype: str = "float32", threads: int = 1,
                 report_top3: bool = False,
                 train_loss: Callable[[object, object, object], object] | None = None,
                 optimizer: str = "sgd") -> None:
        if threads < 1:
            raise ConfigError(f"model {name}: threads must be >= 1, got {threads}")
        if optimizer not in LOCAL_OPTIMIZERS:
            raise ConfigError(f"model {name}: optimizer must be one of {LOCAL_OPTIMIZERS}, "
                              f"got {optimizer!r}")
        self.name = name
        self.module = module
        self.example_shape = tuple(example_shape)
        self.example_dtype = np.dtype(example_dtype)
        self.threads = threads  # torch's intra-op threads while training: a device budget
        self.report_top3 = report_top3
        # (module, x, y) -> scalar loss of local training (None: cross-entropy of the
        # module's logits); inference and evaluation always use the module's forward.
        self.train_loss = train_loss
        self.optimizer = optimizer  # local training's optimizer, LOCAL_OPTIMIZERS
        named = federated_state(module)
        self._tensors = [t for _, t in named]
        self._trainable = [p for p in module.parameters() if p.requires_grad]
        self.layout = ParamLayout(tuple((n, tuple(t.shape)) for n, t in named))

    @classmethod
    def build(cls, name: str, factory: Callable[[], object], *, seed: int,
              **kwargs) -> TorchModel:
        """Build the module under `seed` (initial weights identical on every machine)."""
        with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG alone
            torch.manual_seed(seed)
            module = factory()
        return cls(name, module, **kwargs)

    # -- flat state ------------------------------------------------------------------------
    def get_flat(self) -> np.ndarray:
        with torch.no_grad():
            return torch.cat([t.detach().reshape(-1).float() for t in self._tensors]).numpy()

    def set_flat(self, flat: np.ndarray) -> None:
        if flat.shape != (self.layout.size,):
            raise DataError(
                f"model {self.name} needs {self.layout.size} parameters, got {flat.size}"
            )
        src = torch.from_numpy(np.array(flat, dtype=np.float32))
        offset = 0
        with torch.no_grad():
            for t in self._tensors:
                n = t.numel()
                t.copy_(src[offset : offset + n].view_as(t))
                offset += n

    # -- training --------------------------------------------------------------------------
    def _torch_compute(self):
        return torch_compute(self.threads)

    def _input(self, x: np.ndarray):
        # Copy: a read-only strided view (keyboard windows) cannot back a tensor.
        return torch.from_numpy(np.array(x, dtype=self.example_dtype))

    def train(self, x, y, *, epochs, batch_size, lr, rng, prox_mu=0.0, time_budget_s=0.0,
              max_steps=0) -> TrainResult:
        if len(x) == 0:
            raise DataError("no training examples on this device")
        start = time.perf_counter()
        anchor = [p.detach().clone() for p in self._trainable] if prox_mu > 0 else None
        total_loss, seen, steps, complete = 0.0, 0, 0, True
        with self._torch_compute():
            self.module.train()
            adam = torch.optim.Adam(self._trainable, lr=lr) if self.optimizer == "adam" else None
            for idx in batches(len(x), epochs=epochs, batch_size=batch_size, rng=rng):
                if steps and budget_spent(start, steps, time_budget_s, max_steps):
                    complete = False
                    break
                loss = self._step(x[idx], y[idx], lr=lr, prox_mu=prox_mu, anchor=anchor,
                                  adam=adam)
                total_loss += loss * len(idx)
                seen += len(idx)
                steps += 1
        return TrainResult(num_samples=seen, loss=total_loss / seen,
                           seconds=time.perf_counter() - start, steps=steps, complete=complete)

    def _step(self, x: np.ndarray, y: np.ndarray, *, lr: float, prox_mu: float,
              anchor: list | None, adam=None) -> float:
        """One SGD step (or, given `adam`, one Adam step) on one batch; returns the
        batch's mean loss."""
        for p in self._trainable:
            p.grad = None
        target = torch.from_numpy(np.array(y, np.int64))
        if self.train_loss is not None:
            loss = self.train_loss(self.module, self._input(x), target)
        else:
            loss = torch.nn.functional.cross_entropy(self.module(self._input(x)), target)
        loss.backward()
        with torch.no_grad():
            for i, p in enumerate(self._trainable):
                if p.grad is None:  # a parameter this batch did not touch
                    continue
                grad = p.grad
                if anchor is not None:  # FedProx: gradient of mu/2 ||w - w_global||^2
                    grad = grad.add(p - anchor[i], alpha=prox_mu)
                if adam is None:
                    p.sub_(grad, alpha=lr)
                else:
                    p.grad = grad
        if adam is not None:
            adam.step()
        return loss.detach().item()

    # -- inference -------------------------------------------------------------------------
    def predict_logits(self, x: np.ndarray) -> np.ndarray:
        """float32 logits (n, classes): eval mode, no autograd, in EVAL_BATCH slices."""
        if len(x) == 0:
            raise DataError("no examples to predict")
        out = []
        with self._torch_compute(), torch.no_grad():
            self.module.eval()
            for lo in range(0, len(x), EVAL_BATCH):
                out.append(self.module(self._input(x[lo : lo + EVAL_BATCH])).float().numpy())
        return np.concatenate(out)

    def example_input(self, batch: int = 1) -> np.ndarray:
        """A dummy input of the module's dtype and shape (zeros), e.g. to trace an export."""
        return np.zeros((batch, *self.example_shape), dtype=self.example_dtype)

    def evaluate(self, x, y) -> EvalResult:
        if len(x) == 0:
            raise DataError("no evaluation examples")
        logits = self.predict_logits(x).astype(np.float64)
        y = np.asarray(y, dtype=np.int64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        loss = float(-log_probs[np.arange(len(y)), y].mean())
        accuracy = float((logits.argmax(axis=1) == y).mean())
        top3 = None
        if self.report_top3:
            best3 = np.argpartition(-logits, 2, axis=1)[:, :3]
            top3 = float((best3 == y[:, None]).any(axis=1).mean())
        return EvalResult(loss=loss, accuracy=accuracy, num_samples=len(y), top3=top3)
