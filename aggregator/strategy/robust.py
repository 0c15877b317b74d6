"""Robust aggregation: coordinate-wise median and trimmed mean (Yin et al., ICML 2018).

A weighted mean lets one device move the model anywhere; the norm bound (max_update_norm)
limits how far, but a few colluding devices inside the bound still steer it. The median,
or the mean of what is left after cutting the `trim` fraction of largest and smallest
values per coordinate, stays within the range of the honest updates as long as fewer
than half of a round's K updates (median), or at most floor(trim x K) of them (trimmed
mean), are corrupted. Both are unweighted: a device claiming many samples would otherwise
buy extra influence. Each device counts once per round (sync rounds that discard late
updates), so the share of updates is the share of devices.

Pure functions of the round's K x P matrix; collectors.py keeps the updates that feed
them.
"""

from __future__ import annotations

import math

import numpy as np

# Coordinates reduced per step at close: bounds the sort's scratch to K x COLUMNS values.
COLUMNS = 1 << 16


def coordinate_median(rows: np.ndarray) -> np.ndarray:
    return _by_columns(rows, lambda block: np.median(block, axis=0))


def trimmed_mean(rows: np.ndarray, trim: float) -> np.ndarray:
    """Per coordinate, the mean of the values left after dropping floor(trim * K) of the
    largest and as many of the smallest."""
    k = trimmed_count(trim, len(rows))

    def reduce(block: np.ndarray) -> np.ndarray:
        ordered = np.sort(block, axis=0)
        return ordered[k:len(block) - k].mean(axis=0)

    return _by_columns(rows, reduce)


def _by_columns(rows: np.ndarray, reduce) -> np.ndarray:
    if rows.ndim != 2 or not len(rows):
        raise ValueError("no updates to aggregate")
    out = np.empty(rows.shape[1], dtype=np.float32)
    for lo in range(0, rows.shape[1], COLUMNS):
        out[lo:lo + COLUMNS] = reduce(rows[:, lo:lo + COLUMNS])
    return out


def trimmed_count(trim: float, count: int) -> int:
    """Values cut from each end of `count`: floor(trim x count), where 0.29 x 100 is 29."""
    return math.floor(trim * count + 1e-9)
