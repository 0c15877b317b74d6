"""Softmax regression in plain numpy on Gaussian blobs."""

from __future__ import annotations

import numpy as np

import fedmq

from . import CLASSES, FEATURES, blobs


def loss_and_grad(params, x, y):
    logits = x @ params["w"] + params["b"]
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    rows = np.arange(len(y))
    loss = float(-np.log(p[rows, y] + 1e-12).mean())
    p[rows, y] -= 1.0
    p /= len(y)
    return loss, {"w": x.T @ p, "b": p.sum(axis=0)}


def predict(params, x):
    return x @ params["w"] + params["b"]


class BlobsTask(fedmq.Task):
    """Four Gaussian blobs, softmax regression in numpy."""

    rounds, epochs, batch_size, lr = 3, 1, 16, 0.2

    def build(self, *, seed: int) -> fedmq.Trainer:
        params = {"w": np.zeros((FEATURES, CLASSES), np.float32),
                  "b": np.zeros(CLASSES, np.float32)}
        return fedmq.NumpyTrainer(params, loss_and_grad, predict=predict)

    def load_data(self, device: fedmq.Device):
        return blobs(seed=1000 + device.index, n=120)

    def test_data(self, *, seed: int):
        return blobs(seed=seed + 1, n=400)
