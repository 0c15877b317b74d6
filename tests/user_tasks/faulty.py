"""Tasks with a bug in the user's code, as happens while writing one."""

from __future__ import annotations

import fedmq

from .numpy_task import BlobsTask


class BrokenFit(BlobsTask):
    def build(self, *, seed: int) -> fedmq.Trainer:
        trainer = super().build(seed=seed)
        trainer.loss_and_grad = lambda params, x, y: (0.0, {"w": params["b"] @ x})
        return trainer


class _NoEvaluation(fedmq.NumpyTrainer):
    def evaluate(self, x, y):
        raise ZeroDivisionError("metric over an empty class")


class BrokenEvaluation(BlobsTask):
    def build(self, *, seed: int) -> fedmq.Trainer:
        trainer = super().build(seed=seed)
        return _NoEvaluation(trainer.params, trainer.loss_and_grad)
