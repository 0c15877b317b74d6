"""Model backends, built by name + config so agent and aggregator build the same architecture."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedmq.core.layout import ParamLayout
from fedmq.errors import ConfigError
from fedmq.models.base import EvalResult, Model, TrainResult
from fedmq.models.numpy_models import MLP, LogisticRegression

_BUILDERS: dict[str, Callable[..., Model]] = {}


def register_model(name: str, builder: Callable[..., Model]) -> None:
    if name in _BUILDERS:
        raise ValueError(f"model {name!r} is registered twice")
    _BUILDERS[name] = builder


def model_names() -> list[str]:
    return sorted(_BUILDERS)


def build_model(name: str, config: dict[str, Any], *, seed: int = 0) -> Model:
    """Build a model from the (name, config) pair that travels in the model announcement."""
    builder = _BUILDERS.get(name)
    if builder is None:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(model_names())}")
    try:
        return builder(seed=seed, **config)
    except TypeError as exc:
        raise ConfigError(f"bad config {config!r} for model {name!r}: {exc}") from None


def _lazy(attr: str) -> Callable[..., Model]:
    """A builder that imports the torch architectures (and torch) only when called."""

    def build(**config: Any) -> Model:
        from fedmq.models import torch_models

        return getattr(torch_models, attr)(**config)

    build.__name__ = attr
    return build


register_model("logreg", LogisticRegression)
register_model("mlp", MLP)
register_model("char_gru", _lazy("char_gru"))  # keyboard task; needs fedmq[torch]
register_model("har_cnn", _lazy("har_cnn"))  # sensor task; needs fedmq[torch]

__all__ = ["EvalResult", "Model", "ParamLayout", "TrainResult", "build_model", "model_names",
           "register_model"]
