"""A scikit-learn estimator with `partial_fit` as a Trainer: SGDClassifier, SGDRegressor,
Perceptron, PassiveAggressive*, or any estimator whose fitted attributes you name.

Its federated parameters are fitted attributes (`coef_` and `intercept_` by default),
moved as named arrays. Each mini-batch of the budget is one `partial_fit` call, at the
estimator's own learning-rate settings (set `learning_rate="constant", eta0=...` to
fix it); the round's `lr` only sizes FedProx's proximal step, applied after each call as
w <- (w + lr*mu*w_global) / (1 + lr*mu) (the proximal operator of mu/2 ||w - w_global||^2).
scikit-learn is imported when an SklearnTrainer is made (pip install 'fedmq[sklearn]').
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedmq.api import Budget, FitResult, Metrics
from fedmq.errors import ConfigError, require

LINEAR = ("coef_", "intercept_")


class SklearnTrainer:
    """`estimator` federated through `params`. A linear model (the default params) starts
    at zero, sized by `features` and `classes` (a count or the labels; a classifier needs
    them); for other params, hand over an estimator already fitted once (on any data of
    the right shape: every machine must start from the same layout)."""

    backend = "sklearn"

    def __init__(self, estimator: Any, *, features: int = 0,
                 classes: int | Sequence[Any] | None = None,
                 params: Sequence[str] = LINEAR) -> None:
        require("sklearn", "sklearn")
        from sklearn.base import is_classifier

        if not callable(getattr(estimator, "partial_fit", None)):
            raise ConfigError(f"SklearnTrainer needs an estimator with partial_fit; "
                              f"{type(estimator).__name__} has none")
        self.estimator = estimator
        self.names = tuple(params)
        self.classifier = is_classifier(estimator)
        self.classes = None
        if classes is not None:
            self.classes = np.arange(classes) if isinstance(classes, int) else \
                np.unique(np.asarray(classes))
        if self.classifier and self.classes is None:
            raise ConfigError(f"SklearnTrainer: {type(estimator).__name__} is a classifier: "
                              "give classes (how many, or the labels)")
        missing = [n for n in self.names if not hasattr(estimator, n)]
        if missing and self.names == LINEAR:
            self._zeros(features)
        elif missing:
            raise ConfigError(f"SklearnTrainer: {type(estimator).__name__} has no "
                              f"{', '.join(missing)} yet: fit it once before handing it over")

    def _zeros(self, features: int) -> None:
        """A linear model at zero (where SGD starts too), with the shapes sklearn uses."""
        if features < 1:
            raise ConfigError("SklearnTrainer: give features (inputs per example) to size "
                              "coef_ and intercept_")
        est = self.estimator
        if self.classifier:
            assert self.classes is not None
            rows = 1 if len(self.classes) == 2 else len(self.classes)
            est.coef_ = np.zeros((rows, features))
            est.intercept_ = np.zeros(rows)
            est.classes_ = self.classes
        else:
            est.coef_ = np.zeros(features)
            est.intercept_ = np.zeros(1)

    def get_params(self) -> dict[str, np.ndarray]:
        return {n: np.asarray(getattr(self.estimator, n), dtype=np.float64) for n in self.names}

    def set_params(self, params: Mapping[str, np.ndarray]) -> None:
        for name in self.names:
            setattr(self.estimator, name, np.array(params[name], dtype=np.float64))

    def fit(self, x: Any, y: Any, budget: Budget) -> FitResult:
        anchor = self.get_params() if budget.prox_mu > 0 else None
        extra = {"classes": self.classes} if self.classes is not None else {}
        plan = budget.batches(len(x))
        for idx in plan:
            self.estimator.partial_fit(_float64(x[idx]), y[idx], **extra)
            if anchor is not None:  # the proximal step of mu/2 ||w - w_global||^2
                step = budget.lr * budget.prox_mu
                for name, a in anchor.items():
                    w = np.asarray(getattr(self.estimator, name))
                    setattr(self.estimator, name, (w + step * a) / (1.0 + step))
        # partial_fit reports no loss: the trained model's, on this device's data
        return plan.result(self.evaluate(x, y)["loss"])

    def evaluate(self, x: Any, y: Any) -> Metrics:
        """Classifiers: accuracy, and log loss where the estimator has predict_proba
        (else the error rate); regressors: mean squared error."""
        est, x, y = self.estimator, _float64(x), np.asarray(y)
        if not self.classifier:
            return {"loss": float(np.mean((est.predict(x) - y) ** 2))}
        accuracy = float((est.predict(x) == y).mean())
        if not hasattr(est, "predict_proba"):
            return {"loss": 1.0 - accuracy, "accuracy": accuracy}
        proba = est.predict_proba(x)
        column = np.searchsorted(est.classes_, y)
        picked = proba[np.arange(len(y)), np.clip(column, 0, proba.shape[1] - 1)]
        return {"loss": float(-np.log(np.clip(picked, 1e-12, 1.0)).mean()),
                "accuracy": accuracy}


def _float64(x: Any) -> np.ndarray:
    """The parameters are float64 (as set_params makes them): so must the inputs be, or
    SGD's float32 path refuses them."""
    return np.asarray(x, dtype=np.float64)


__all__ = ["SklearnTrainer"]
