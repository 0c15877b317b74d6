"""A small PyTorch network on scikit-learn's digits, with its own loss and optimizer."""

from __future__ import annotations

import torch
from torch import nn

import fedmq

from . import digits


def loss(outputs, targets):
    return nn.functional.cross_entropy(outputs, targets, label_smoothing=0.05)


def adam(params, lr):
    return torch.optim.Adam(params, lr=lr)


class DigitsTorchTask(fedmq.Task):
    """Digits through Linear-BatchNorm-ReLU-Linear, trained with Adam."""

    rounds, epochs, batch_size, lr = 3, 1, 32, 0.01

    def build(self, *, seed: int) -> fedmq.Trainer:
        def network():
            return nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(),
                                 nn.Linear(32, 10))
        return fedmq.TorchTrainer.build(network, seed=seed, loss=loss, optimizer=adam)

    def load_data(self, device: fedmq.Device):
        x, y = digits()
        return device.shard(x[:1400], y[:1400])

    def test_data(self, *, seed: int):
        x, y = digits()
        return x[1400:], y[1400:]


class ExportableDigitsTorchTask(DigitsTorchTask):
    """The same, with one example's shape declared: its model can be exported to ONNX."""

    input_shape = (64,)
