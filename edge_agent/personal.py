"""A device's personal layers (FedPer / FedRep): the tensors an announcement marks
personal never leave the device; their values live here, and on disk under state_dir.

The state belongs to one model layout and one set of patterns: a model of another
layout, or other patterns, starts the personal layers again from the announced model.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from fedmq.core.layout import LayoutMask
from fedmq.models.base import Model, TrainResult, batches, budget_spent
from fedmq.storage import StateError

STATE_REVISION = 1


class PersonalLayers:
    """The personal values of the newest model this device trained (none before)."""

    def __init__(self) -> None:
        self.layout_hash = ""
        self.patterns: tuple[str, ...] = ()
        self.values: np.ndarray | None = None
        self.rounds = 0  # rounds these values were trained in

    def _holds(self, mask: LayoutMask) -> bool:
        return (self.values is not None and self.layout_hash == mask.layout.hash
                and self.patterns == mask.patterns
                and self.values.size == mask.personal.size)

    def start(self, mask: LayoutMask, announced: np.ndarray) -> np.ndarray:
        """Where local work starts: the announced shared values with this device's
        personal ones (the announced ones the first time)."""
        if not mask.patterns or not self._holds(mask):
            return announced.astype(np.float32, copy=True)
        assert self.values is not None
        return mask.merge(shared=mask.take_shared(announced), personal=self.values)

    def keep(self, mask: LayoutMask, trained: np.ndarray) -> None:
        """Hold the personal values of `trained` (nothing without patterns)."""
        if not mask.patterns:
            return
        self.rounds = self.rounds + 1 if self._holds(mask) else 1
        self.layout_hash, self.patterns = mask.layout.hash, mask.patterns
        self.values = mask.take_personal(trained).astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"revision": STATE_REVISION, "layout": self.layout_hash,
                "patterns": list(self.patterns), "rounds": self.rounds,
                "values": self.values if self.values is not None
                else np.zeros(0, dtype=np.float32)}

    def load_state_dict(self, state: Any) -> None:
        """Restore what state_dict saved; raise StateError for anything else."""
        try:
            revision, layout = state["revision"], state["layout"]
            patterns, rounds, values = state["patterns"], state["rounds"], state["values"]
        except (KeyError, TypeError) as exc:
            raise StateError(f"personal layers state lacks {exc}") from None
        if revision != STATE_REVISION:
            raise StateError(f"personal layers state revision {revision!r} is not "
                             f"{STATE_REVISION}")
        if not (isinstance(layout, str) and isinstance(patterns, list)
                and all(isinstance(p, str) for p in patterns) and isinstance(rounds, int)
                and isinstance(values, np.ndarray) and values.dtype == np.float32
                and values.ndim == 1 and bool(np.isfinite(values).all())):
            raise StateError("personal layers state is malformed (layout, patterns, rounds, "
                             "finite float32 values)")
        self.layout_hash, self.patterns, self.rounds = layout, tuple(patterns), rounds
        self.values = values if values.size else None


def train_part(model: Model, x: np.ndarray, y: np.ndarray, *, frozen: np.ndarray,
               epochs: int, batch_size: int, lr: float, rng: np.random.Generator,
               prox_mu: float = 0.0, time_budget_s: float = 0.0,
               max_steps: int = 0) -> TrainResult:
    """Model.train with the values where `frozen` (a bool per flat value) held still
    (FedRep's two phases): one backend step per batch, the frozen values put back after
    each, and FedProx's pull toward the start applied here. Exact for the plain SGD the
    bundled backends run, whatever the backend; a user task's own optimizer state is
    not frozen, only its values are."""
    if frozen.shape != (model.layout.size,) or frozen.dtype != np.bool_:
        raise ValueError(f"frozen must be {model.layout.size} bools, got {frozen.shape} "
                         f"{frozen.dtype}")
    start = time.perf_counter()
    anchor = model.get_flat()
    held = anchor[frozen]
    before = anchor
    total_loss, seen, steps, complete = 0.0, 0, 0, True
    for idx in batches(len(x), epochs=epochs, batch_size=batch_size, rng=rng):
        if steps and budget_spent(start, steps, time_budget_s, max_steps):
            complete = False
            break
        step = model.train(x[idx], y[idx], epochs=1, batch_size=len(idx), lr=lr, rng=rng,
                           max_steps=1)
        after = model.get_flat()
        if prox_mu > 0:  # FedProx: the gradient of mu/2 ||w - w_start||^2 at the step's w
            after -= np.float32(lr * prox_mu) * (before - anchor)
        after[frozen] = held
        model.set_flat(after)
        before = after
        total_loss += step.loss * len(idx)
        seen += len(idx)
        steps += 1
    return TrainResult(num_samples=seen, loss=total_loss / seen,
                       seconds=time.perf_counter() - start, steps=steps, complete=complete)
