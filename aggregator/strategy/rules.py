"""Aggregation rules by name, as `aggregation = ...` names them; a name is taken once."""

from __future__ import annotations

from aggregator.strategy.accumulator import WeightedAccumulator
from aggregator.strategy.collectors import (
    Bulyan,
    CenteredClip,
    CoordinateMedian,
    Krum,
    MultiKrum,
    TrimmedMean,
)
from aggregator.strategy.rule import AggregationRule
from fedmq.errors import ConfigError

_REGISTRY: dict[str, type[AggregationRule]] = {}


def register_rule(cls: type[AggregationRule]) -> type[AggregationRule]:
    """Make `cls` available by its name; a second rule of the same name is a bug."""
    if not cls.name:
        raise ValueError(f"aggregation rule {cls.__name__} has no name")
    if cls.name in _REGISTRY:
        raise ValueError(f"aggregation rule {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


for _cls in (WeightedAccumulator, CoordinateMedian, TrimmedMean, Krum, MultiKrum, Bulyan,
             CenteredClip):
    register_rule(_cls)


def rule_names() -> list[str]:
    return sorted(_REGISTRY)


def rule_class(name: str) -> type[AggregationRule]:
    cls = _REGISTRY.get(name)
    if cls is None:
        names = rule_names()
        raise ConfigError(f"aggregation {name!r} must be {', '.join(names[:-1])} or "
                          f"{names[-1]}")
    return cls


def create_rule(name: str, size: int, *, trim_fraction: float = 0.1,
                byzantine_f: int = 1) -> AggregationRule:
    """A fresh rule for one round of `size`-parameter updates; ConfigError for an unknown
    name (listing the known ones) or settings the rule refuses."""
    return rule_class(name).build(size, trim_fraction=trim_fraction, byzantine_f=byzantine_f)
