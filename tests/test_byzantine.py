"""Krum, multi-Krum, Bulyan and centered clipping: each stays within its proven bound of
the honest updates whatever its stated number of attackers send (hypothesis), and refuses
rounds too small to protect."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from aggregator.config import AggregatorConfig
from aggregator.strategy import robust
from aggregator.strategy.rules import create_rule, rule_names
from fedmq.errors import ConfigError, ProtocolError

from .test_rounds import machine, update

finite = st.floats(-100.0, 100.0, allow_nan=False, width=32)
# what an attacker may send: anything finite, huge included (ingest refuses the rest)
wild = st.one_of(finite, st.floats(-1e6, 1e6, allow_nan=False, width=32))


@st.composite
def rounds(draw, least):
    """(honest rows, attacker rows, f) with n = honest + f >= least(f)."""
    f = draw(st.integers(0, 3))
    n = draw(st.integers(least(f), least(f) + 4))
    dim = draw(st.integers(1, 6))
    honest = np.array(draw(st.lists(st.lists(finite, min_size=dim, max_size=dim),
                                    min_size=n - f, max_size=n - f)), np.float64)
    bad = np.array(draw(st.lists(st.lists(wild, min_size=dim, max_size=dim),
                                 min_size=f, max_size=f)), np.float64).reshape(f, dim)
    return honest, bad, f


def _mixed(honest, bad, seed):
    rows = np.concatenate([honest, bad]).astype(np.float32)
    return rows[np.random.default_rng(seed).permutation(len(rows))]


def _diameter(honest):
    return math.sqrt(float(robust.pairwise_sq_distances(honest).max()))


TOL = 1e-3  # float32 rows, float64 bounds


@settings(max_examples=150, deadline=None)
@given(case=rounds(lambda f: 2 * f + 3), seed=st.integers(0, 99))
def test_krum_keeps_an_update_near_an_honest_one(case, seed):
    honest, bad, f = case
    out = robust.krum(_mixed(honest, bad, seed), f).astype(np.float64)
    n = len(honest) + f
    nearest = min(np.linalg.norm(out - h) for h in honest)
    bound = math.sqrt(n - f - 2) * _diameter(honest)
    assert nearest <= bound * (1 + TOL) + TOL * (1 + np.abs(honest).max())


@settings(max_examples=150, deadline=None)
@given(case=rounds(lambda f: 2 * f + 3), seed=st.integers(0, 99))
def test_multi_krum_stays_near_the_honest_mean(case, seed):
    honest, bad, f = case
    out = robust.multi_krum(_mixed(honest, bad, seed), f).astype(np.float64)
    n = len(honest) + f
    bound = (math.sqrt(n - f - 2) + 1) * _diameter(honest)
    assert np.linalg.norm(out - honest.mean(axis=0)) <= \
        bound * (1 + TOL) + TOL * (1 + np.abs(honest).max())


@settings(max_examples=150, deadline=None)
@given(case=rounds(lambda f: 4 * f + 3), seed=st.integers(0, 99))
def test_bulyan_stays_within_the_honest_range_widened_by_its_width(case, seed):
    honest, bad, f = case
    out = robust.bulyan(_mixed(honest, bad, seed), f).astype(np.float64)
    lo, hi = honest.min(axis=0), honest.max(axis=0)
    width = hi - lo
    slack = TOL * (1 + np.abs(honest).max())
    assert np.all(out >= lo - width - slack) and np.all(out <= hi + width + slack)


@settings(max_examples=150, deadline=None)
@given(case=rounds(lambda f: 3 * f + 1), seed=st.integers(0, 99),
       iterations=st.integers(1, 5))
def test_centered_clip_stays_within_its_bound_of_the_honest_mean(case, seed, iterations):
    """With n >= 3f + 1 and tau = 2 (R + D0) (R: honest radius, D0: the median's distance
    to the honest mean), every step keeps |v - mu| <= (f/n) |v - mu| + f tau / n."""
    honest, bad, f = case
    rows = _mixed(honest, bad, seed)
    mu = honest.mean(axis=0)
    start = np.median(rows.astype(np.float64), axis=0)
    radius = max(np.linalg.norm(h - mu) for h in honest)
    d0 = float(np.linalg.norm(start - mu))
    tau = 2 * (radius + d0)
    assume(tau > 0)
    out = robust.centered_clip(rows, tau=tau, iterations=iterations).astype(np.float64)
    n = len(rows)
    bound = (f / n) ** iterations * d0 + f * tau / (n - f)
    assert np.linalg.norm(out - mu) <= bound * (1 + TOL) + TOL * (1 + np.abs(honest).max())


def test_without_attackers_far_away_krum_picks_honest_and_bulyan_is_near_the_mean():
    rng = np.random.default_rng(0)
    honest = rng.normal(0.0, 0.1, (16, 50)).astype(np.float32) + 1.0
    bad = np.full((3, 50), -50.0, np.float32)
    rows = np.concatenate([honest, bad])
    assert robust.krum_select(rows, 3)[0] < 16
    assert np.all(robust.krum_select(rows, 3, 13) < 16)
    assert np.abs(robust.bulyan(rows, 3) - honest.mean(axis=0)).max() < 0.15
    assert np.abs(robust.centered_clip(rows) - honest.mean(axis=0)).max() < 0.3


@pytest.mark.parametrize(("name", "f", "least"), [
    ("krum", 1, 5), ("krum", 2, 7), ("multi_krum", 3, 9), ("bulyan", 1, 7),
    ("bulyan", 2, 11), ("centered_clip", 2, 5)])
def test_rules_refuse_rounds_too_small_for_f(name, f, least):
    rule = create_rule(name, 4, byzantine_f=f)
    rule.check_round_size(least)  # enough
    with pytest.raises(ConfigError, match=f"at least {least} updates"):
        rule.check_round_size(least - 1)
    with pytest.raises(ConfigError, match=f"rounds of at least {least}"):
        AggregatorConfig(aggregation=name, byzantine_f=f, min_updates=least - 1)
    AggregatorConfig(aggregation=name, byzantine_f=f, min_updates=least)


def test_byzantine_f_must_be_a_count():
    with pytest.raises(ConfigError, match="byzantine_f -1"):
        create_rule("krum", 4, byzantine_f=-1)
    assert {"krum", "multi_krum", "bulyan", "centered_clip"} <= set(rule_names())


@pytest.mark.parametrize("name", ["krum", "multi_krum", "bulyan", "centered_clip"])
def test_robust_rules_refuse_partial_aggregates_and_survive_a_restart(name):
    from dataclasses import replace

    m = machine(min_updates=7, aggregation=name, byzantine_f=1)
    partial = replace(update("worker1", uid="p1"), represents=5)
    with pytest.raises(ProtocolError) as exc:
        m.offer(partial)
    assert exc.value.reason == "not_supported"
    with pytest.raises(ConfigError, match="aggregation = mean"):
        AggregatorConfig(aggregation=name, min_updates=7, partial_sources="w1")
    for i in range(6):
        m.offer(update(f"d{i}", delta=np.full(4, 1.0 + 0.01 * i, np.float32)))
    m.offer(update("evil", delta=np.full(4, -1e4, np.float32)))
    resumed = machine(min_updates=7, aggregation=name, byzantine_f=1)
    resumed.load_state_dict(m.state_dict(), now=1.0)
    resumed.close(now=2.0)
    assert np.all(np.abs(resumed.params - 1.03) < 0.1)  # the attacker moved nothing
