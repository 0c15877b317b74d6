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


# -- Byzantine-robust rules on whole updates -----------------------------------------------
#
# Krum (Blanchard et al., NeurIPS 2017) scores each update by the summed squared distance
# to its n - f - 2 nearest others and keeps the lowest; multi-Krum averages the m lowest.
# With n >= 2f + 3 and at most f attackers, a kept update is within sqrt(n - f - 2) x the
# honest updates' diameter of an honest one: its n - f - 2 neighbours hold at least one
# honest update, and its score is at most an honest update's, whose n - f - 2 nearest
# are all honest. Bulyan (El Mhamdi et al., ICML 2018) picks theta = n - 2f updates by
# repeated Krum, then per coordinate averages the beta = theta - 2f values nearest the
# median: with n >= 4f + 3 the median lies within the honest values, so every value kept
# is within the honest range widened by its width. Centered clipping (Karimireddy et al.,
# ICML 2021) starts at the coordinate median and moves by the mean of every update's
# offset clipped to tau, a few times: attackers move it by at most f tau / n a step.


def pairwise_sq_distances(rows: np.ndarray) -> np.ndarray:
    """K x K squared L2 distances, in float64 (float32 Gram matrices cancel badly)."""
    x = rows.astype(np.float64, copy=False)
    sq = np.einsum("ij,ij->i", x, x)
    gram = x @ x.T
    return np.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)


def krum_scores(distances: np.ndarray, f: int) -> np.ndarray:
    """Each update's summed squared distance to its n - f - 2 nearest others."""
    n = len(distances)
    keep = max(1, n - f - 2)
    scores = np.empty(n)
    for i in range(n):
        others = np.delete(distances[i], i)
        scores[i] = np.partition(others, keep - 1)[:keep].sum()
    return scores


def krum_select(rows: np.ndarray, f: int, m: int = 1) -> np.ndarray:
    """Indices of the m updates with the lowest Krum scores (ties: the earlier)."""
    scores = krum_scores(pairwise_sq_distances(rows), f)
    return np.argsort(scores, kind="stable")[:m]


def krum(rows: np.ndarray, f: int) -> np.ndarray:
    return rows[krum_select(rows, f)[0]].astype(np.float32)


def multi_krum(rows: np.ndarray, f: int, m: int | None = None) -> np.ndarray:
    """Mean of the m lowest-scoring updates (default n - f)."""
    m = len(rows) - f if m is None else m
    return rows[krum_select(rows, f, m)].mean(axis=0, dtype=np.float64).astype(np.float32)


def bulyan(rows: np.ndarray, f: int) -> np.ndarray:
    n = len(rows)
    theta = n - 2 * f
    beta = theta - 2 * f
    distances = pairwise_sq_distances(rows)
    left = list(range(n))
    chosen: list[int] = []
    while len(chosen) < theta:  # repeated Krum on what is left
        sub = distances[np.ix_(left, left)]
        best = int(np.argmin(krum_scores(sub, f)))
        chosen.append(left.pop(best))
    selected = rows[chosen]

    def reduce(block: np.ndarray) -> np.ndarray:
        median = np.median(block, axis=0)
        nearest = np.argsort(np.abs(block - median), axis=0, kind="stable")[:beta]
        return np.take_along_axis(block, nearest, axis=0).mean(axis=0)

    return _by_columns(selected, reduce)


def centered_clip(rows: np.ndarray, *, tau: float | None = None,
                  iterations: int = 3) -> np.ndarray:
    """Start at the coordinate median, then `iterations` times v += mean_i clip(x_i - v,
    tau). tau None: the median distance of the updates to the start."""
    x = rows.astype(np.float64, copy=False)
    v = np.median(x, axis=0)
    if tau is None:
        tau = float(np.median(np.linalg.norm(x - v, axis=1)))
    if tau <= 0:
        return v.astype(np.float32)
    for _ in range(iterations):
        offsets = x - v
        norms = np.linalg.norm(offsets, axis=1)
        scale = np.minimum(1.0, tau / np.maximum(norms, 1e-300))
        v = v + (offsets * scale[:, None]).mean(axis=0)
    return v.astype(np.float32)
