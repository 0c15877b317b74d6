"""scikit-learn's SGDClassifier (logistic loss) on the digits, federated."""

from __future__ import annotations

from sklearn.linear_model import SGDClassifier

import fedmq

from . import digits


class DigitsSgdTask(fedmq.Task):
    """Digits, a linear model trained by partial_fit."""

    rounds, epochs, batch_size = 3, 1, 64

    def build(self, *, seed: int) -> fedmq.Trainer:
        estimator = SGDClassifier(loss="log_loss", learning_rate="constant", eta0=0.05,
                                  random_state=seed)
        return fedmq.SklearnTrainer(estimator, features=64, classes=10)

    def load_data(self, device: fedmq.Device):
        x, y = digits()
        return device.shard(x[:1400], y[:1400])

    def test_data(self, *, seed: int):
        x, y = digits()
        return x[1400:], y[1400:]
