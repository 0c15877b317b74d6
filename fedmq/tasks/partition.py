"""Deterministic splits of a data set across devices: IID and Dirichlet label skew.

A split that cannot be made fails at once, naming the largest fleet the data allows,
rather than after seconds of redrawing.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from fedmq.errors import ConfigError

DIRICHLET_ATTEMPTS = 1000  # draws before a feasible-looking split gives up
# A fleet is allowed when one Dirichlet draw gives every device `min_size` examples with at
# least this probability (so 1,000 draws all fail with probability < 1e-8).
MIN_DRAW_SUCCESS = 0.02
_ESTIMATE_DRAWS = 128  # simulated draws behind the estimate (a private, fixed seed)
_CHECK_DRAWS = 400  # and behind the check: 8 must succeed


def train_test_split(n: int, *, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays (train, test); the test part is what devices never see."""
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test fraction {test_fraction} must be between 0 and 1")
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, round(n * test_fraction))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def iid_partition(n: int, *, devices: int, seed: int) -> list[np.ndarray]:
    """Equal-sized random shards (sizes differ by at most one)."""
    _check_devices(devices, largest=n, why=f"{n} examples, at least one per device")
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, devices)]


def dirichlet_partition(
    labels: np.ndarray, *, devices: int, alpha: float, seed: int, min_size: int = 2
) -> list[np.ndarray]:
    """Label skew: each class is spread over devices in Dirichlet(alpha) proportions.

    Small alpha gives each device few classes (strongly non-IID); large alpha tends to IID.
    Draws are repeated (deterministically) until every device holds `min_size` examples;
    a fleet too large for that to happen soon is refused before the first draw.
    """
    if not alpha > 0:
        raise ConfigError(f"Dirichlet alpha {alpha} must be > 0 (use the IID partition instead)")
    classes, sizes = np.unique(labels, return_counts=True)
    largest = largest_dirichlet_fleet(tuple(sizes.tolist()), alpha=alpha, min_size=min_size)
    _check_devices(devices, largest=largest,
                   why=f"{len(labels)} examples in Dirichlet(alpha={alpha}) shares of at "
                       f"least {min_size} each; use fewer devices, or alpha 0 (IID) for up "
                       f"to {len(labels)}")
    rng = np.random.default_rng(seed)
    for _ in range(DIRICHLET_ATTEMPTS):
        # The same draws, in the same order, as always: a seed gives the split it always gave.
        perms, cuts = [], []
        counts = np.zeros(devices, dtype=np.int64)
        for cls in classes:
            idx = rng.permutation(np.flatnonzero(labels == cls))
            cut = (np.cumsum(rng.dirichlet(np.full(devices, alpha))) * len(idx)).astype(int)
            perms.append(idx)
            cuts.append(cut[:-1])
            counts += _part_sizes(cut, len(idx))
        if counts.min() >= min_size:
            shards = zip(*(np.split(p, c) for p, c in zip(perms, cuts, strict=True)),
                         strict=True)
            return [np.sort(np.concatenate(parts)) for parts in shards]
    raise ConfigError(
        f"could not give each of {devices} devices {min_size} examples with alpha={alpha} "
        f"in {DIRICHLET_ATTEMPTS} draws; raise alpha or use fewer devices"
    )


def partition(
    labels: np.ndarray, *, devices: int, alpha: float, seed: int
) -> list[np.ndarray]:
    """alpha > 0: Dirichlet label skew; alpha == 0: IID."""
    if alpha == 0:
        return iid_partition(len(labels), devices=devices, seed=seed)
    return dirichlet_partition(labels, devices=devices, alpha=alpha, seed=seed)


@lru_cache(maxsize=64)
def largest_dirichlet_fleet(class_sizes: tuple[int, ...], *, alpha: float,
                            min_size: int = 2) -> int:
    """The most devices a Dirichlet(alpha) split of classes this size can serve: one draw
    gives every device `min_size` examples with probability >= MIN_DRAW_SUCCESS.

    Depends on the class sizes only (not on the seed), so every seed agrees. A cheap,
    smooth estimate finds the bound; whole simulated draws then confirm it, stepping down
    where the estimate was too hopeful (small data sets, where devices compete for a few
    examples).
    """
    low, high = 0, sum(class_sizes) // min_size  # low: allowed; above high: impossible
    while low < high:
        mid = (low + high + 1) // 2
        if _estimated_success(class_sizes, alpha, min_size, mid) >= MIN_DRAW_SUCCESS:
            low = mid
        else:
            high = mid - 1
    while low and _simulated_success(class_sizes, alpha, min_size, low) < MIN_DRAW_SUCCESS:
        low -= 1
    return low


def _estimated_success(class_sizes: tuple[int, ...], alpha: float, min_size: int,
                       devices: int) -> float:
    """P(one draw leaves no device under `min_size`), devices' shortfalls taken as
    independent: (1-q_first)(1-q_mid)^(D-2)(1-q_last).

    Cuts are rounded down, so the first device gets about half an example less of each
    class and the last (the remainder) half more; the ones between are exchangeable, so
    their q is estimated from all of them at once. The product overestimates (devices share
    a fixed total), which _simulated_success corrects.
    """
    short = _short(class_sizes, alpha, min_size, devices, draws=_ESTIMATE_DRAWS)
    if devices == 1:
        return 1.0 - float(short.mean())
    middle = float(short[:, 1:-1].mean()) if devices > 2 else 0.0
    return float((1 - short[:, 0].mean()) * (1 - middle) ** (devices - 2)
                 * (1 - short[:, -1].mean()))


def _simulated_success(class_sizes: tuple[int, ...], alpha: float, min_size: int,
                       devices: int) -> float:
    """The share of simulated draws that leave no device under `min_size`."""
    short = _short(class_sizes, alpha, min_size, devices, draws=_CHECK_DRAWS)
    return float((~short.any(axis=1)).mean())


def _short(class_sizes: tuple[int, ...], alpha: float, min_size: int, devices: int, *,
           draws: int) -> np.ndarray:
    """(draws, devices): which devices a Dirichlet draw leaves under `min_size` examples."""
    rng = np.random.default_rng(0)  # private and fixed: the bound is a pure function
    counts = np.zeros((draws, devices), dtype=np.int64)
    for n in class_sizes:
        p = rng.dirichlet(np.full(devices, alpha), size=draws)
        counts += _part_sizes((np.cumsum(p, axis=-1) * n).astype(int), n)
    return counts < min_size


def _part_sizes(cuts: np.ndarray, n: int) -> np.ndarray:
    """Sizes of np.split(range(n), cuts[..., :-1]) (the last part takes the remainder)."""
    edge = (*cuts.shape[:-1], 1)
    edges = np.concatenate([np.zeros(edge, dtype=cuts.dtype), cuts[..., :-1],
                            np.full(edge, n, dtype=cuts.dtype)], axis=-1)
    return np.diff(edges, axis=-1)


def _check_devices(devices: int, *, largest: int, why: str) -> None:
    if devices < 1:
        raise ConfigError(f"need at least one device, got {devices}")
    if devices > largest:
        raise ConfigError(f"cannot split the data over {devices} devices: the largest fleet "
                          f"it allows is {largest} ({why})")
