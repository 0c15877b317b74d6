"""Deterministic splits of a data set across devices: IID and Dirichlet label skew."""

from __future__ import annotations

import numpy as np

from fedmq.errors import ConfigError


def train_test_split(n: int, *, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays (train, test); the test part is what devices never see."""
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test fraction {test_fraction} must be between 0 and 1")
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, round(n * test_fraction))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def iid_partition(n: int, *, devices: int, seed: int) -> list[np.ndarray]:
    """Equal-sized random shards (sizes differ by at most one)."""
    _check_devices(n, devices)
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, devices)]


def dirichlet_partition(
    labels: np.ndarray, *, devices: int, alpha: float, seed: int, min_size: int = 2
) -> list[np.ndarray]:
    """Label skew: each class is spread over devices in Dirichlet(alpha) proportions.

    Small alpha gives each device few classes (strongly non-IID); large alpha tends to IID.
    Draws are repeated (deterministically) until every device holds `min_size` examples.
    """
    if not alpha > 0:
        raise ConfigError(f"Dirichlet alpha {alpha} must be > 0 (use the IID partition instead)")
    _check_devices(len(labels), devices * min_size)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(1000):
        shards: list[list[np.ndarray]] = [[] for _ in range(devices)]
        for cls in classes:
            idx = rng.permutation(np.flatnonzero(labels == cls))
            cuts = (np.cumsum(rng.dirichlet(np.full(devices, alpha))) * len(idx)).astype(int)
            for device, part in enumerate(np.split(idx, cuts[:-1])):
                shards[device].append(part)
        parts = [np.sort(np.concatenate(s)) for s in shards]
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise ConfigError(
        f"could not give each of {devices} devices {min_size} examples with alpha={alpha}; "
        "raise alpha or use fewer devices"
    )


def partition(
    labels: np.ndarray, *, devices: int, alpha: float, seed: int
) -> list[np.ndarray]:
    """alpha > 0: Dirichlet label skew; alpha == 0: IID."""
    if alpha == 0:
        return iid_partition(len(labels), devices=devices, seed=seed)
    return dirichlet_partition(labels, devices=devices, alpha=alpha, seed=seed)


def _check_devices(n: int, devices: int) -> None:
    if devices < 1:
        raise ConfigError(f"need at least one device, got {devices}")
    if devices > n:
        raise ConfigError(f"cannot split {n} examples over {devices} devices")
