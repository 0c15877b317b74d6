"""Server optimizers from Reddi et al. 2021, "Adaptive Federated Optimization" (Algorithm 2).

Each takes the weighted mean client delta (the pseudo-gradient, pointing downhill) and
moves the global model. FedAvg with lr=1 is exactly w_{t+1} = sum_k n_k/n w^k_{t+1}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from fedmq.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class ServerOptConfig:
    name: str = "fedavg"
    lr: float | None = None  # None: the optimizer's usual default
    momentum: float = 0.9  # FedAvgM
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3  # adaptivity: smaller means more adaptive


class ServerOptimizer:
    name: ClassVar[str] = ""
    default_lr: ClassVar[float] = 1.0

    def __init__(self, config: ServerOptConfig) -> None:
        self.config = config
        self.lr = config.lr if config.lr is not None else self.default_lr
        if not self.lr > 0:
            raise ConfigError(f"server learning rate {self.lr} must be > 0")
        self.state: dict[str, np.ndarray] = {}

    def step(self, params: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """New global parameters from the current ones and the mean client delta."""
        raise NotImplementedError

    def _slot(self, key: str, like: np.ndarray, fill: float = 0.0) -> np.ndarray:
        if key not in self.state or self.state[key].shape != like.shape:
            self.state[key] = np.full(like.shape, fill, dtype=np.float64)
        return self.state[key]

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "slots": {k: v.copy() for k, v in self.state.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ConfigError(
                f"checkpoint holds {state.get('name')!r} optimizer state but {self.name!r} is "
                "configured; use the same optimizer or start from a fresh checkpoint"
            )
        # copies: step() works on the slots in place, and `state` may be a snapshot that
        # is still being written
        self.state = {k: np.array(v, dtype=np.float64) for k, v in state["slots"].items()}


class FedAvg(ServerOptimizer):
    name = "fedavg"

    def step(self, params, delta):
        return (params + self.lr * delta).astype(np.float32)


class FedAvgM(ServerOptimizer):
    """Server momentum: m = beta m + delta; x += lr m."""

    name = "fedavgm"

    def step(self, params, delta):
        m = self._slot("m", params)
        m *= self.config.momentum
        m += delta
        return (params + self.lr * m).astype(np.float32)


class _Adaptive(ServerOptimizer):
    """Shared first moment; subclasses update the second moment v."""

    default_lr = 0.01

    def step(self, params, delta):
        c = self.config
        m = self._slot("m", params)
        m *= c.beta1
        m += (1.0 - c.beta1) * delta
        self._update_v(self._slot("v", params, self._v_init()), delta.astype(np.float64) ** 2)
        return (params + self.lr * m / (np.sqrt(self.state["v"]) + c.tau)).astype(np.float32)

    def _v_init(self) -> float:
        return self.config.tau**2

    def _update_v(self, v: np.ndarray, g2: np.ndarray) -> None:
        raise NotImplementedError


class FedAdagrad(_Adaptive):
    """v = v + delta^2."""

    name = "fedadagrad"

    def _update_v(self, v, g2):
        v += g2


class FedAdam(_Adaptive):
    """v = beta2 v + (1 - beta2) delta^2."""

    name = "fedadam"

    def _update_v(self, v, g2):
        v *= self.config.beta2
        v += (1.0 - self.config.beta2) * g2


class FedYogi(_Adaptive):
    """v = v - (1 - beta2) delta^2 sign(v - delta^2)."""

    name = "fedyogi"

    def _update_v(self, v, g2):
        v -= (1.0 - self.config.beta2) * g2 * np.sign(v - g2)


_REGISTRY: dict[str, type[ServerOptimizer]] = {}


def _register(cls: type[ServerOptimizer]) -> None:
    if cls.name in _REGISTRY:
        raise ValueError(f"server optimizer {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls


for _cls in (FedAvg, FedAvgM, FedAdagrad, FedAdam, FedYogi):
    _register(_cls)


def optimizer_names() -> list[str]:
    return sorted(_REGISTRY)


def create_optimizer(config: ServerOptConfig) -> ServerOptimizer:
    cls = _REGISTRY.get(config.name)
    if cls is None:
        raise ConfigError(
            f"unknown server optimizer {config.name!r}; "
            f"choose one of {', '.join(optimizer_names())}"
        )
    return cls(config)
