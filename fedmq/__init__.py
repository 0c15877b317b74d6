"""fedmq: federated learning for fleets of edge and IoT devices over MQTT.

This package is what both sides share — the pure core (wire protocol, codecs, chunking,
model transfer, signing), the MQTT transport, storage, configuration, models and tasks —
and it imports neither the device side (`edge_agent`) nor the server side
(`aggregator`). It stays installable with paho-mqtt, numpy and msgpack alone.

The public API for your own task (fedmq.api, docs/custom-tasks.md) is importable from
here: `from fedmq import Task, TorchTrainer`. It loads on first use, so `import fedmq`
stays as light as the errors below, and a Trainer whose library is missing names the
extra that installs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedmq.errors import (
    BrokerError,
    CodecError,
    ConfigError,
    DataError,
    FedmqError,
    MissingExtraError,
    ProtocolError,
)

if TYPE_CHECKING:
    from fedmq.adapters.numpy_trainer import NumpyTrainer
    from fedmq.adapters.sklearn_trainer import SklearnTrainer
    from fedmq.adapters.torch_trainer import TorchTrainer
    from fedmq.api import Batches, Budget, Device, FitResult, Metrics, Task, Trainer

__version__ = "0.1.0"

# name -> the module that defines it, imported when the name is first used
_LAZY = {
    **dict.fromkeys(("Batches", "Budget", "Device", "FitResult", "Metrics", "Task", "Trainer"),
                    "fedmq.api"),
    "NumpyTrainer": "fedmq.adapters.numpy_trainer",
    "SklearnTrainer": "fedmq.adapters.sklearn_trainer",
    "TorchTrainer": "fedmq.adapters.torch_trainer",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fedmq' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "Batches",
    "BrokerError",
    "Budget",
    "CodecError",
    "ConfigError",
    "DataError",
    "Device",
    "FedmqError",
    "FitResult",
    "Metrics",
    "MissingExtraError",
    "NumpyTrainer",
    "ProtocolError",
    "SklearnTrainer",
    "Task",
    "TorchTrainer",
    "Trainer",
    "__version__",
]
