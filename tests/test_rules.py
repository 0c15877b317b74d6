"""Aggregation rules by name: the registry and the interface the round machine relies on."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.strategy import rules
from aggregator.strategy.accumulator import WeightedAccumulator
from aggregator.strategy.collectors import CoordinateMedian, TrimmedMean
from aggregator.strategy.rules import create_rule, register_rule, rule_names
from fedmq.core import codecs
from fedmq.errors import ConfigError


def test_the_rules_are_registered_by_the_names_the_config_uses():
    assert rule_names() == ["bulyan", "centered_clip", "krum", "mean", "median",
                            "multi_krum", "trimmed_mean"]
    assert type(create_rule("mean", 3)) is WeightedAccumulator
    assert type(create_rule("median", 3)) is CoordinateMedian
    trimmed = create_rule("trimmed_mean", 3, trim_fraction=0.25)
    assert type(trimmed) is TrimmedMean and trimmed.trim == 0.25
    assert [n for n in rule_names() if create_rule(n, 1).streams] == ["mean"]


def test_an_unknown_name_is_a_config_error_listing_the_valid_ones():
    with pytest.raises(ConfigError, match="'geomed' must be bulyan, centered_clip, krum, "
                                          "mean, median, multi_krum or trimmed_mean"):
        create_rule("geomed", 3)


def test_a_name_is_registered_once(monkeypatch):
    monkeypatch.setattr(rules, "_REGISTRY", dict(rules._REGISTRY))

    class AnotherMedian(CoordinateMedian):
        name = "median"

    with pytest.raises(ValueError, match="'median' registered twice"):
        register_rule(AnotherMedian)

    class Nameless(CoordinateMedian):
        name = ""

    with pytest.raises(ValueError, match="no name"):
        register_rule(Nameless)

    class GeoMedian(CoordinateMedian):
        name = "geometric_median"

    register_rule(GeoMedian)
    assert "geometric_median" in rule_names()
    assert type(create_rule("geometric_median", 2)) is GeoMedian


@pytest.mark.parametrize("saved", ["mean", "median", "trimmed_mean"])
@pytest.mark.parametrize("loading", ["mean", "median", "trimmed_mean"])
def test_a_rule_loads_only_state_saved_under_its_own_name(saved, loading):
    source = create_rule(saved, 4)
    source.add_encoded(codecs.encode(np.ones(4, np.float32)), 2.0)
    target = create_rule(loading, 4)
    if saved == loading:
        target.load_state_dict(source.state_dict())
        assert target.count == 1 and np.allclose(target.result(), 1.0)
    else:
        with pytest.raises(ConfigError, match=f"aggregation = {saved}, then switch to "
                                              f"{loading}"):
            target.load_state_dict(source.state_dict())


def test_a_mean_saved_before_rules_had_names_still_loads():
    old = WeightedAccumulator(2).state_dict()
    del old["rule"]
    WeightedAccumulator(2).load_state_dict(old)
    with pytest.raises(ConfigError, match="summed for the mean"):
        CoordinateMedian(2).load_state_dict(old)


def test_decoded_and_encoded_updates_aggregate_alike():
    values = [np.full(3, v, np.float32) for v in (1.0, 2.0, 9.0)]
    for name in rule_names():
        # byzantine_f 0: three updates are a round every rule takes
        encoded, decoded = create_rule(name, 3, byzantine_f=0), create_rule(name, 3,
                                                                            byzantine_f=0)
        for v in values:
            encoded.add_encoded(codecs.encode(v), 1.0)
            decoded.add(v.copy(), 1.0)
        assert np.array_equal(encoded.result(), decoded.result()), name


def test_a_collector_copies_a_decoded_delta_it_keeps():
    rule = create_rule("median", 2)
    buffer = np.ones(2, np.float32)
    for _ in range(3):
        rule.add(buffer, 1.0)
        buffer *= 2  # the caller reuses its buffer
    assert np.array_equal(rule.result(), [2.0, 2.0])


def test_a_robust_rule_checks_the_trim_fraction_it_is_configured_with():
    for name in ("median", "trimmed_mean"):
        with pytest.raises(ConfigError, match=r"trim_fraction 0\.7"):
            create_rule(name, 3, trim_fraction=0.7)
    create_rule("mean", 3, trim_fraction=0.7)  # the mean has no use for it
