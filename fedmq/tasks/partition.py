"""Deterministic splits of a data set across devices, by name in PARTITIONERS: `iid`,
`dirichlet` (label skew), `shards` (pathological: k labels per device) and `natural` (whole
groups per device: one speaker, subject or site each).

A split that cannot be made fails at once, naming the largest fleet the data allows,
rather than after seconds of redrawing.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Protocol

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


def shards_partition(labels: np.ndarray, *, devices: int, k: int, seed: int,
                     min_size: int = 1) -> list[np.ndarray]:
    """Pathological label skew (McMahan et al.'s shards): each device holds examples of
    exactly `k` labels (fewer only when the data has fewer than k labels).

    Label slots are dealt round-robin over a seeded order of the labels: device i gets
    slots i*k .. i*k+k-1, so every label goes to about devices*k/labels devices, and each
    label's examples are split evenly (shuffled) among the devices that hold it. Every
    example goes to exactly one device, which needs devices * k >= the number of labels.
    """
    if k < 1:
        raise ConfigError(f"shards: k (labels per device) must be >= 1, got {k}")
    classes, sizes = np.unique(np.asarray(labels), return_counts=True)
    k = min(k, len(classes))
    need = -(-len(classes) // k)  # ceil: devices needed so that every label has a holder
    if devices < need:
        raise ConfigError(f"shards: {devices} devices x {k} labels cannot hold all "
                          f"{len(classes)} labels (every example goes to a device); use at "
                          f"least {need} devices or a larger k")
    largest = largest_shards_fleet(tuple(sizes.tolist()), k=k, min_size=min_size)
    _check_devices(devices, largest=largest,
                   why=f"{k} labels per device, at least {min_size} example(s) of each; the "
                       f"smallest label has {sizes.min()} examples")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(classes))  # slot s holds label classes[order[s % C]]
    holders: list[list[int]] = [[] for _ in classes]
    for slot in range(devices * k):
        holders[order[slot % len(classes)]].append(slot // k)
    parts: list[list[np.ndarray]] = [[] for _ in range(devices)]
    for c, cls in enumerate(classes):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        for device, chunk in zip(holders[c], np.array_split(idx, len(holders[c])),
                                 strict=True):
            parts[device].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def largest_shards_fleet(class_sizes: tuple[int, ...], *, k: int, min_size: int = 1) -> int:
    """The most devices a shards split can serve: every holder of a label gets at least
    `min_size` of its examples, whichever label the seeded order puts first."""
    classes = len(class_sizes)
    k = min(k, classes)
    smallest = min(class_sizes)
    # The busiest label position has ceil(devices * k / classes) holders; any label may
    # land there, so the smallest label bounds the fleet.
    return (smallest // min_size) * classes // k


def natural_partition(groups: np.ndarray, *, devices: int, seed: int) -> list[np.ndarray]:
    """Whole natural groups per device (speaker, subject, site): with as many devices as
    groups, one group each; with fewer, the groups of a seeded order dealt round-robin.
    A group is never split, so a fleet larger than the number of groups is refused."""
    names = np.unique(np.asarray(groups))
    _check_devices(devices, largest=len(names),
                   why=f"{len(names)} natural groups (speakers, subjects), one or more per "
                       "device, never split")
    order = names[np.random.default_rng(seed).permutation(len(names))]
    return [np.sort(np.flatnonzero(np.isin(groups, order[d::devices])))
            for d in range(devices)]


class Partitioner(Protocol):
    """Index arrays, one per device, from labels (and natural groups, where used)."""

    def __call__(self, labels: np.ndarray, *, devices: int, seed: int, alpha: float, k: int,
                 groups: np.ndarray | None) -> list[np.ndarray]: ...


PARTITIONERS: dict[str, Partitioner] = {}


def register_partitioner(name: str, fn: Partitioner) -> None:
    if name in PARTITIONERS:
        raise ValueError(f"partitioner {name!r} is registered twice")
    PARTITIONERS[name] = fn


def _needs_groups(groups: np.ndarray | None) -> np.ndarray:
    if groups is None:
        raise ConfigError("the natural partition needs each example's group (speaker, "
                          "subject); this task has none: use iid, dirichlet or shards")
    return groups


_BUILTIN: dict[str, Callable[..., list[np.ndarray]]] = {
    "iid": lambda labels, *, devices, seed, **_: iid_partition(len(labels), devices=devices,
                                                               seed=seed),
    "dirichlet": lambda labels, *, devices, seed, alpha, **_: dirichlet_partition(
        labels, devices=devices, alpha=alpha, seed=seed),
    "shards": lambda labels, *, devices, seed, k, **_: shards_partition(
        labels, devices=devices, k=k, seed=seed),
    "natural": lambda labels, *, devices, seed, groups, **_: natural_partition(
        _needs_groups(groups), devices=devices, seed=seed),
}
for _name, _fn in _BUILTIN.items():
    register_partitioner(_name, _fn)


def check_partitioner(name: str) -> Partitioner:
    """The registered partitioner `name`; an unknown name fails listing the known ones."""
    fn = PARTITIONERS.get(name)
    if fn is None:
        raise ConfigError(f"unknown partitioner {name!r}; available: "
                          f"{', '.join(sorted(PARTITIONERS))}")
    return fn


def split_by(name: str, labels: np.ndarray, *, devices: int, seed: int, alpha: float = 0.5,
             k: int = 2, groups: np.ndarray | None = None) -> list[np.ndarray]:
    """Partition with the registered partitioner `name` (alpha: dirichlet's skew; k:
    shards' labels per device; groups: natural's group of each example)."""
    return check_partitioner(name)(np.asarray(labels), devices=devices, seed=seed,
                                   alpha=alpha, k=k, groups=groups)
