"""Wearable task: shoulder-exercise recognition from a smartwatch, one subject per device.

Ten subjects each did sets of 20 repetitions of seven shoulder exercises (pendulum,
abduction, forward elevation, internal and external rotation, trapezius extension,
upright row) with a watch on each wrist in turn: 140 recordings of a 3-axis accelerometer
and 3-axis gyroscope at 50 Hz, 20-50 s each (Burns et al. 2018, arXiv:1802.01489). The
`seglearn` package (BSD) ships them as `seglearn/data/watch_dataset.npy`, which
`seglearn.datasets.load_watch` reads without downloading; we read the same file directly
(importing seglearn needs pandas, which it does not declare, and scikit-learn).

The file is a pickled dict of numpy arrays: it is loaded with `allow_pickle`, the same
trust as importing the installed package. Each recording's last `test_fraction` of time
is held out (the subject's later repetitions, LEAF's protocol), so no test window overlaps
a training window; both parts are cut into WINDOW-step windows every STRIDE steps,
labelled with the recording's exercise. A device is one subject (a natural partition).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from fedmq.errors import ConfigError, DataError, MissingExtraError

CLASSES = ("PEN", "ABD", "FEL", "IR", "ER", "TRAP", "ROW")  # label i is CLASSES[i]
CHANNELS = 6  # accelerometer x, y, z; gyroscope x, y, z
RATE_HZ = 50
WINDOW = 100  # 2 s: about one repetition
STRIDE = 50  # 1 s
RECORDINGS = 140
SUBJECTS = 10


@dataclass(frozen=True)
class Recording:
    x: np.ndarray  # float32 (CHANNELS, steps)
    label: int
    subject: int


def data_file() -> Path:
    """The watch data file inside the installed seglearn package (not imported)."""
    spec = importlib.util.find_spec("seglearn")
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError("seglearn", "sim")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "watch_dataset.npy"
    if not path.is_file():
        raise DataError(f"seglearn's watch data is missing at {path}; reinstall seglearn")
    return path


@lru_cache(maxsize=1)
def load_recordings() -> tuple[Recording, ...]:
    """The 140 raw recordings, in the file's order."""
    try:
        raw = np.load(data_file(), allow_pickle=True).item()
        series, labels, subjects = raw["X"], np.asarray(raw["y"]), np.asarray(raw["subject"])
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise DataError(f"cannot read seglearn's watch data ({exc}); reinstall seglearn") from None
    if not len(series) == len(labels) == len(subjects) == RECORDINGS:
        raise DataError(f"seglearn's watch data has {len(series)} recordings, expected "
                        f"{RECORDINGS}; a different seglearn version?")
    out = []
    for x, label, subject in zip(series, labels, subjects, strict=True):
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != CHANNELS or len(x) < 2 * WINDOW:
            raise DataError(f"a watch recording has shape {x.shape}; expected (steps, 6)")
        out.append(Recording(np.ascontiguousarray(x.T), int(label), int(subject)))
    return tuple(out)


def _cut(recording: Recording, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test fraction {test_fraction} must be between 0 and 1")
    steps = recording.x.shape[1]
    cut = steps - max(WINDOW, round(steps * test_fraction))
    return recording.x[:, :cut], recording.x[:, cut:]


def _windows(x: np.ndarray) -> np.ndarray:
    starts = range(0, x.shape[1] - WINDOW + 1, STRIDE)
    return np.stack([x[:, s : s + WINDOW] for s in starts])


@lru_cache(maxsize=4)
def split(*, test_fraction: float) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray],
                                             tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """((x, y, subject) of the training windows, the same of the held-out windows).

    Channels are standardised with the training parts' statistics: fixed constants of the
    task, the same on every device and the server.
    """
    recordings = load_recordings()
    parts = [_cut(r, test_fraction) for r in recordings]
    train_steps = np.concatenate([a for a, _ in parts], axis=1)
    mean = train_steps.mean(axis=1, keepdims=True)
    std = train_steps.std(axis=1, keepdims=True)
    out = []
    for side in (0, 1):
        xs, ys, gs = [], [], []
        for r, part in zip(recordings, parts, strict=True):
            w = _windows((part[side] - mean) / std)
            xs.append(w)
            ys.append(np.full(len(w), r.label, dtype=np.int64))
            gs.append(np.full(len(w), r.subject, dtype=np.int64))
        out.append((np.concatenate(xs).astype(np.float32), np.concatenate(ys),
                    np.concatenate(gs)))
    return out[0], out[1]
