"""Users' own tasks, found by name: an import path or an entry point of group `fedmq.tasks`.

`task = "my_pkg.tasks:KeyboardTask"` imports my_pkg.tasks and takes KeyboardTask (a
fedmq.Task subclass, built with no arguments, or an instance); `task = "keyboard-v2"`
names an entry point an installed package declares:

    [project.entry-points."fedmq.tasks"]
    keyboard-v2 = "my_pkg.tasks:KeyboardTask"

Loading a task registers its model with fedmq.models under the task's `name` (default
"module:Class"), so the aggregator builds it by that name and announces it, and an
agent builds the model its own configured task registered: an announcement never makes a
device import anything. Failures say what failed to import or what the object lacks,
as the python: data source does.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import math
import numbers
import re
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmq.api import TASK_METHODS, Device
from fedmq.api import Task as TaskBase
from fedmq.errors import ConfigError, DataError, FedmqError
from fedmq.tasks import Dataset, TaskSpec

ENTRY_POINT_GROUP = "fedmq.tasks"
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_DEFAULTS = (("rounds", int, 1), ("epochs", int, 1), ("batch_size", int, 1), ("lr", float, 0),
             ("max_steps", int, 0), ("classes", int, 0))


@dataclass(frozen=True)
class UserTaskSpec(TaskSpec):
    """A user task's spec: its own model (`model`, the name it registered), built with no
    config; the sizes of the bundled models (hidden, ...) do not apply to it."""

    custom: bool = True

    def model_config(self, model: str = "", **_sizes: Any) -> dict[str, Any]:
        if model not in ("", self.model):
            raise ConfigError(f"task {self.name!r} trains its own model ({self.model}); "
                              f"model {model!r} does not apply: leave model unset")
        return {}


@dataclass(frozen=True)
class UserTask:
    """A loaded user task: the object, the reference it was configured by, and its spec
    (model: the registered model name; custom: True)."""

    reference: str
    task: Any
    spec: TaskSpec

    def device_data(self, device: Device) -> Dataset:
        from fedmq.models.user import user_call

        what = f"load_data(device {device.index} of {device.count})"
        data = user_call(self.reference, what, lambda: self.task.load_data(device))
        return self._dataset(data, what)

    def test_data(self, *, seed: int) -> Dataset | None:
        from fedmq.models.user import user_call

        what = f"test_data(seed={seed})"
        method = getattr(self.task, "test_data", None)  # optional for a duck-typed task
        if method is None:
            return None
        data = user_call(self.reference, what, lambda: method(seed=seed))
        return None if data is None else self._dataset(data, what)

    def rehearse(self, train: Dataset, test: Dataset | None) -> None:
        """Build the model, take one training step and evaluate it: a simulation fails in
        a second, in one line, on a bug in the task's code, not round after round."""
        from fedmq.models import build_model

        model = build_model(self.spec.model, {}, seed=0)
        model.set_flat(model.get_flat())
        model.train(train.x, train.y, epochs=1, batch_size=self.spec.batch_size,
                    lr=self.spec.lr, rng=np.random.default_rng(0), max_steps=1)
        model.get_flat()
        if test is not None:
            model.evaluate(test.x, test.y)

    def _dataset(self, data: Any, what: str) -> Dataset:
        source = f"task {self.reference}: {what}"
        try:
            x, y = data
        except (TypeError, ValueError):
            raise DataError(f"{source} must return (x, y), got {type(data).__name__}") from None
        x, y = np.asarray(x), np.asarray(y)
        if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
            raise DataError(f"{source} returned x of shape {x.shape} and y of shape {y.shape}; "
                            "one row of each per example")
        if len(y) == 0:
            raise DataError(f"{source} returned no examples")
        if self.spec.example_shape and self.spec.classes:  # declared: checked as data files are
            from fedmq.tasks.datasource import InputSpec, check_dataset

            return check_dataset(x, y, InputSpec.from_task(self.spec), source)
        return Dataset(x, y)


_lock = threading.RLock()  # a task module may name a task as it imports
_loaded: dict[str, UserTask] = {}
_owners: dict[str, type] = {}  # registered model name -> the task class that registered it


def is_import_path(name: str) -> bool:
    return ":" in name


def entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    """The installed `fedmq.tasks` entry points, by name."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def cached(name: str) -> UserTask | None:
    """The user task `name` if it was loaded (task_spec loads it), else None."""
    return _loaded.get(name)


def find(name: str) -> UserTask | None:
    """Load the user task `name` refers to; None when it is neither an import path nor an
    installed entry point (not a user task at all). Raises ConfigError when it is one but
    cannot be loaded."""
    with _lock:
        user = _loaded.get(name)
        if user is not None:
            return user
        if is_import_path(name):
            if not _IMPORT_PATH.fullmatch(name):
                raise ConfigError(f"task {name!r} must be package.module:Name (an import path) "
                                  "or a task's name")
            obj = _import(name, shown=name)
        else:
            entry = entry_points().get(name)
            if entry is None:
                return None
            obj = _import(entry.value, shown=f"{name} (entry point {entry.value})")
        user = _load(name, obj)
        _loaded[name] = user
        return user


def _import(target: str, *, shown: str) -> Any:
    from fedmq.models.user import where

    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except FedmqError:
        raise
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            top = module_name.split(".")[0]
            raise ConfigError(f"task {shown}: cannot import {module_name}: there is no module "
                              f"{exc.name!r}; install the task's package (pip install -e "
                              f"DIR) or put the directory holding {top}/ on PYTHONPATH") \
                from None
        raise ConfigError(f"task {shown}: importing {module_name} failed: it needs "
                          f"{exc.name!r}, which is not installed") from None
    except Exception as exc:  # the user's module: any failure is named, with its line
        raise ConfigError(f"task {shown}: importing {module_name} failed: "
                          f"{type(exc).__name__}: {exc}{where(exc)}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"task {shown}: {module_name} has no {attr!r}")
        obj = getattr(obj, part)
    return obj


def _load(reference: str, obj: Any) -> UserTask:
    from fedmq.models.user import where

    if isinstance(obj, type):
        _check_methods(reference, obj, obj.__name__)
        try:
            task = obj()
        except Exception as exc:  # the user's constructor
            raise ConfigError(f"task {reference}: {obj.__name__}() failed: "
                              f"{type(exc).__name__}: {exc}{where(exc)} (a task is built "
                              "with no arguments)") from None
    else:
        task = obj
        _check_methods(reference, type(obj), f"{type(obj).__name__} object")
    cls = type(task)
    model = getattr(task, "name", "") or f"{cls.__module__}:{cls.__qualname__}"
    if not isinstance(model, str):
        raise ConfigError(f"task {reference}: its name must be a string, got {model!r}")
    spec = _spec(reference, task, model)
    _register(reference, task, model)
    return UserTask(reference=reference, task=task, spec=spec)


def _check_methods(reference: str, cls: type, shown: str) -> None:
    missing = [m for m in TASK_METHODS
               if not callable(getattr(cls, m, None)) or getattr(cls, m) is getattr(TaskBase, m)]
    if missing:
        raise ConfigError(f"task {reference}: {shown} lacks {', '.join(missing)} (a fedmq.Task "
                          "has build(seed=...), load_data(device) and, for the aggregator's "
                          "evaluation, test_data(seed=...))")


def _spec(reference: str, task: Any, model: str) -> TaskSpec:
    values = {}
    for key, kind, least in _DEFAULTS:
        value = getattr(task, key, getattr(TaskBase, key))
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or value < least \
                or (kind is int and not float(value).is_integer()):
            raise ConfigError(f"task {reference}: {key} = {value!r} must be a number >= {least}"
                              + (" (whole)" if kind is int else ""))
        values[key] = kind(value)
    shape = getattr(task, "input_shape", ())
    try:
        shape = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise ConfigError(f"task {reference}: input_shape must be a tuple of sizes, got "
                          f"{shape!r}") from None
    x_dtype = str(getattr(task, "x_dtype", "float32"))
    doc = (type(task).__doc__ or "").strip().splitlines()
    return UserTaskSpec(reference, inputs=math.prod(shape) if shape else 0, model=model,
                        example_shape=shape, x_dtype=x_dtype,
                        description=doc[0] if doc else "", **values)


def _register(reference: str, task: Any, model: str) -> None:
    """Register the task's model under `model`, once per task class."""
    from fedmq.models import model_names, register_model
    from fedmq.models.user import UserModel, user_call

    cls = type(task)
    owner = _owners.get(model)
    if owner is cls:
        return
    if owner is not None or model in model_names():
        taken = f"task class {owner.__module__}:{owner.__qualname__}" if owner else "a " \
            "built-in model"
        raise ConfigError(f"task {reference}: its model name {model!r} is taken by {taken}; "
                          "give the task class a different `name`")

    def build(*, seed: int = 0) -> UserModel:
        trainer = user_call(reference, "build()", lambda: task.build(seed=seed))
        return UserModel(model, trainer)

    register_model(model, build)
    _owners[model] = cls


__all__ = ["ENTRY_POINT_GROUP", "UserTask", "UserTaskSpec", "cached", "entry_points", "find",
           "is_import_path"]
