"""Training data for devices and held-out test data for the server, by task name."""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError, MissingExtraError
from .partition import partition, train_test_split


@dataclass(frozen=True)
class Dataset:
    x: np.ndarray  # float32 features, one row per example
    y: np.ndarray  # int64 class labels

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise DataError(f"{len(self.x)} feature rows but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray) -> Dataset:
        return Dataset(self.x[idx], self.y[idx])


@dataclass(frozen=True)
class TaskSpec:
    """Shape of a task's data, so the server can build the matching model."""

    name: str
    inputs: int
    classes: int


TASKS = {"digits": TaskSpec("digits", inputs=64, classes=10)}


def task_spec(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; available: {', '.join(TASKS)}") from None


@lru_cache(maxsize=1)
def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images), read without importing sklearn.

    Importing sklearn costs ~100 MB of RSS on a device; the data file alone is 60 KB.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError("scikit-learn", "sim")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise DataError(f"scikit-learn's digits file is missing at {path}; reinstall scikit-learn")
    with gzip.open(path, "rt") as fh:
        raw = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    return Dataset(x=raw[:, :-1] / 16.0, y=raw[:, -1].astype(np.int64))


def load_task(name: str) -> Dataset:
    task_spec(name)
    return load_digits()


def split_task(name: str, *, seed: int, test_fraction: float = 0.2) -> tuple[Dataset, Dataset]:
    """(train pool for devices, held-out test set) — identical on every machine for a seed."""
    data = load_task(name)
    train, test = train_test_split(len(data), test_fraction=test_fraction, seed=seed)
    return data.subset(train), data.subset(test)


def device_shard(
    name: str, *, device_index: int, device_count: int, alpha: float, seed: int,
    test_fraction: float = 0.2,
) -> Dataset:
    """Device `device_index`'s share of the task's training pool."""
    if not 0 <= device_index < device_count:
        raise ConfigError(f"device index {device_index} must be in [0, {device_count})")
    train, _ = split_task(name, seed=seed, test_fraction=test_fraction)
    parts = partition(train.y, devices=device_count, alpha=alpha, seed=seed)
    return train.subset(parts[device_index])


__all__ = ["TASKS", "Dataset", "TaskSpec", "device_shard", "load_task", "split_task",
           "task_spec"]
