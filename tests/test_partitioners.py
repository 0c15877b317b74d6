"""The shards and natural partitioners and the partitioner registry: every example is
assigned exactly once, k labels per device are respected, groups are never split, and a
fleet that cannot be made is refused naming the largest one the data allows."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.errors import ConfigError
from fedmq.tasks.partition import (
    PARTITIONERS,
    largest_shards_fleet,
    natural_partition,
    register_partitioner,
    shards_partition,
    split_by,
)


def _assert_exact_cover(parts, n):
    joined = np.concatenate(parts)
    assert len(joined) == n, "an example was dropped or given twice"
    assert np.array_equal(np.sort(joined), np.arange(n))


@st.composite
def labelled(draw):
    sizes = draw(st.lists(st.integers(1, 40), min_size=1, max_size=8))
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return draw(st.permutations(labels.tolist())), sizes


@settings(max_examples=80, deadline=None)
@given(data=labelled(), k=st.integers(1, 4), devices=st.integers(1, 60),
       seed=st.integers(0, 2**16))
def test_shards_cover_every_example_once_with_k_labels_each(data, k, devices, seed):
    labels, sizes = data
    labels = np.array(labels)
    classes = len(sizes)
    k_eff = min(k, classes)
    largest = largest_shards_fleet(tuple(sizes), k=k)
    if devices * k_eff < classes or devices > largest:
        with pytest.raises(ConfigError) as err:
            shards_partition(labels, devices=devices, k=k, seed=seed)
        if devices * k_eff >= classes:
            assert f"largest fleet it allows is {largest}" in str(err.value)
        return
    parts = shards_partition(labels, devices=devices, k=k, seed=seed)
    assert len(parts) == devices
    _assert_exact_cover(parts, len(labels))
    for part in parts:
        assert len(np.unique(labels[part])) == k_eff  # exactly k labels, at least 1 of each
    again = shards_partition(labels, devices=devices, k=k, seed=seed)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=8), k=st.integers(1, 4))
def test_largest_shards_fleet_is_tight(sizes, k):
    """The bound is reachable, and one device more is refused."""
    labels = np.repeat(np.arange(len(sizes)), sizes)
    largest = largest_shards_fleet(tuple(sizes), k=k)
    if largest * min(k, len(sizes)) < len(sizes):  # even the largest cannot cover: skip
        return
    shards_partition(labels, devices=largest, k=k, seed=0)
    with pytest.raises(ConfigError, match=f"largest fleet it allows is {largest}"):
        shards_partition(labels, devices=largest + 1, k=k, seed=0)


def test_shards_refuses_too_few_devices_to_hold_every_label():
    labels = np.repeat(np.arange(10), 5)
    with pytest.raises(ConfigError, match="at least 5 devices"):
        shards_partition(labels, devices=4, k=2, seed=0)


@settings(max_examples=60, deadline=None)
@given(groups=st.lists(st.integers(0, 12), min_size=1, max_size=200),
       devices=st.integers(1, 15), seed=st.integers(0, 2**16))
def test_natural_partition_keeps_groups_whole(groups, devices, seed):
    groups = np.array(groups)
    names = np.unique(groups)
    if devices > len(names):
        with pytest.raises(ConfigError, match=f"largest fleet it allows is {len(names)}"):
            natural_partition(groups, devices=devices, seed=seed)
        return
    parts = natural_partition(groups, devices=devices, seed=seed)
    _assert_exact_cover(parts, len(groups))
    owner = {}
    for d, part in enumerate(parts):
        assert len(part) > 0
        for g in np.unique(groups[part]):
            assert owner.setdefault(int(g), d) == d, "a group was split over devices"
    if devices == len(names):  # one group per device
        assert all(len(np.unique(groups[p])) == 1 for p in parts)


def test_registry_by_name_rejects_duplicates_and_unknown_names():
    assert {"iid", "dirichlet", "shards", "natural"} <= set(PARTITIONERS)
    with pytest.raises(ValueError, match="registered twice"):
        register_partitioner("iid", PARTITIONERS["iid"])
    labels = np.repeat(np.arange(4), 10)
    with pytest.raises(ConfigError, match="unknown partitioner 'bogus'; available: dirichlet"):
        split_by("bogus", labels, devices=2, seed=0)
    with pytest.raises(ConfigError, match="needs each example's group"):
        split_by("natural", labels, devices=2, seed=0)
    for name in ("iid", "dirichlet", "shards"):
        _assert_exact_cover(split_by(name, labels, devices=4, seed=0, k=1), len(labels))
    parts = split_by("natural", labels, devices=4, seed=0, groups=labels)
    assert sorted(len(np.unique(labels[p])) for p in parts) == [1, 1, 1, 1]
