"""The public API for your own federated task: what you implement and what fedmq hands you.

A `Task` says how to build the model and where a device's data comes from; the model it
builds is a `Trainer`: named float arrays out and in, `fit` within a `Budget`, and
`evaluate`. fedmq moves the named arrays as one flat float32 vector whose layout (names
and shapes, in order) is hashed into every update, so the wire format, the codecs,
chunking, signing, the aggregation rules and DP apply to your task unchanged.

Ready-made Trainers wrap a PyTorch module (`TorchTrainer`), plain numpy arrays and a
gradient function (`NumpyTrainer`) and scikit-learn estimators with `partial_fit`
(`SklearnTrainer`). Point fedmq at a task with `task = "my_pkg.tasks:MyTask"` (or an entry
point of the group `fedmq.tasks`) in agent.toml, aggregator.toml or `fedmq simulate
--task`. Everything here is importable from `fedmq` itself; docs/custom-tasks.md walks
through a task from scratch, and `fedmq new PROJECT` writes one that runs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from fedmq.errors import DataError
from fedmq.models.base import batches, budget_spent
from fedmq.tasks.partition import partition, split_by

# What `Task.load_data` and `Task.test_data` return: examples and their labels (or
# targets), one per row, as numpy arrays (or anything np.asarray takes).
Data = tuple[Any, Any]
# What `Trainer.evaluate` returns: "loss" always; "accuracy" (and "top3") when the task has
# classes. Other keys are ignored.
Metrics = Mapping[str, float]


@dataclass(frozen=True, slots=True)
class Device:
    """Which device `Task.load_data` loads for: share `index` of `count` in a simulated
    fleet (or a real one split by hand: agent.toml's device_index, device_count), with the
    run's `seed`, its `partition` (`--partition`: iid, dirichlet, shards or natural; empty:
    Dirichlet label skew `alpha`, IID at alpha 0) and the shards partition's labels per
    device. A real device with its own data may ignore all of it."""

    index: int = 0
    count: int = 1
    seed: int = 0
    alpha: float = 0.5
    partition: str = ""
    shards_per_device: int = 2

    def shard(self, x: Any, y: Any, groups: Any = None) -> Data:
        """This device's rows of a pooled data set, split like the bundled tasks: the same
        split on every machine for a seed (labels decide the label skew; IID needs none).
        `groups`: each example's group (speaker, subject, site), which the natural
        partition keeps whole on one device."""
        y = np.asarray(y)
        if not self.partition:
            parts = partition(y, devices=self.count, alpha=self.alpha, seed=self.seed)
        elif self.partition == "natural" and groups is None:
            raise DataError("the natural partition keeps each group of examples on one "
                            "device: call device.shard(x, y, groups=...) with each "
                            "example's group (speaker, subject, site)")
        else:
            parts = split_by(self.partition, y, devices=self.count, seed=self.seed,
                             alpha=self.alpha, k=self.shards_per_device,
                             groups=None if groups is None else np.asarray(groups))
        rows = parts[self.index]
        return np.asarray(x)[rows], y[rows]


@dataclass(frozen=True, slots=True)
class FitResult:
    """What `Trainer.fit` reports; `num_samples` weighs the update in FedAvg (a fleet with
    `update_weight = "examples"` weighs it by the device's training set instead)."""

    num_samples: int  # examples processed (an example seen in two epochs counts twice)
    loss: float  # mean training loss over them
    steps: int = 0  # optimizer steps taken
    complete: bool = True  # False: stopped at the step cap or time budget before `epochs`


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Budget:
    """The local work a round asks for, as the aggregator assigned it to this device.

    Stop at whichever comes first: `epochs` passes over the data, `max_steps` optimizer
    steps (0: no cap) or `time_budget_s` seconds (0: no limit); always take at least one
    step, so a slow device still contributes. `prox_mu` > 0 asks for FedProx's term
    mu/2 * ||w - w_global||^2, w_global being the parameters `fit` starts from. `rng` is
    the round's seeded generator (shuffle with it and runs repeat); `threads` caps compute
    threads (0: the library's default). `batches()` does the stopping for you.
    """

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.1
    prox_mu: float = 0.0
    max_steps: int = 0
    time_budget_s: float = 0.0
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    threads: int = 0

    def batches(self, n: int) -> Batches:
        """Shuffled mini-batch index arrays over `n` examples, within this budget."""
        return Batches(self, n)


class Batches:
    """The mini-batches of one `fit` (index arrays); counts what it handed out so
    `result()` can report it. Time starts when it is made."""

    def __init__(self, budget: Budget, n: int) -> None:
        if n < 1:
            raise DataError("no training examples on this device")
        self.budget = budget
        self.n = n
        self.steps = 0
        self.samples = 0
        self.complete = True
        self._start = time.perf_counter()

    def __iter__(self) -> Iterator[np.ndarray]:
        b = self.budget
        for idx in batches(self.n, epochs=b.epochs, batch_size=b.batch_size, rng=b.rng):
            if self.steps and budget_spent(self._start, self.steps, b.time_budget_s,
                                           b.max_steps):
                self.complete = False
                return
            self.steps += 1
            self.samples += len(idx)
            yield idx

    def result(self, loss: float) -> FitResult:
        """The FitResult of the batches handed out, with their mean `loss`."""
        return FitResult(num_samples=self.samples, loss=float(loss), steps=self.steps,
                         complete=self.complete)


@runtime_checkable
class Trainer(Protocol):
    """A built model: its state as named float arrays, local training and evaluation.

    `get_params` returns the same names with the same shapes, in the same order, every
    time (that order and those shapes are the layout); `set_params` receives them as
    float32 arrays it may keep. Only floating-point arrays federate: leave counters out.
    """

    def get_params(self) -> Mapping[str, np.ndarray]: ...

    def set_params(self, params: Mapping[str, np.ndarray]) -> None: ...

    def fit(self, x: Any, y: Any, budget: Budget) -> FitResult: ...

    def evaluate(self, x: Any, y: Any) -> Metrics: ...


class Task:
    """Your federated problem. Subclass it, implement `build` and `load_data` (and
    `test_data` for the aggregator to score each new model), then name it by its import
    path: `task = "my_pkg.tasks:MyTask"`. It is built with no arguments.

    The class attributes are defaults `fedmq simulate` trains with (flags override them).
    Declare `input_shape` and `classes` (and `x_dtype`) to let agents read their data from
    a `data_source` (CSV, NPZ, python:) checked against them instead of `load_data`.
    """

    name: ClassVar[str] = ""  # the model's name on the wire; "": "module:Class"
    rounds: ClassVar[int] = 20
    epochs: ClassVar[int] = 1
    batch_size: ClassVar[int] = 32
    lr: ClassVar[float] = 0.1
    max_steps: ClassVar[int] = 0  # local steps per round (0: no cap)
    input_shape: ClassVar[tuple[int, ...]] = ()  # one example's shape, if fixed
    x_dtype: ClassVar[str] = "float32"
    classes: ClassVar[int] = 0  # 0: not a classification task (or not declared)

    def build(self, *, seed: int) -> Trainer:
        """A fresh model. The layout must not depend on `seed`; the initial weights may
        (the aggregator's are the ones every device starts from)."""
        raise NotImplementedError

    def load_data(self, device: Device) -> Data:
        """(x, y) this device trains on: its own files or sensor, or its share of a pooled
        data set (`device.shard(x, y)`) in a simulation."""
        raise NotImplementedError

    def test_data(self, *, seed: int) -> Data | None:
        """(x, y) the aggregator scores every new model on; None: no evaluation."""
        return None


TASK_METHODS = ("build", "load_data")
TRAINER_METHODS = ("get_params", "set_params", "fit", "evaluate")

__all__ = ["Batches", "Budget", "Data", "Device", "FitResult", "Metrics", "Task", "Trainer"]
