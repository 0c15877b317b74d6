"""Cohort selection, capability-based task tiers and fleet profiles (pure, no broker)."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aggregator.selection import AssignmentPolicy, CohortPolicy, assign_tasks, select_cohort
from fedmq.core.protocol import ModelAnnouncement, PayloadInfo, TaskConfig
from fedmq.errors import ConfigError
from simulator.profiles import MIXES, fleet_profiles

device_ids = st.lists(st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True), unique=True,
                      max_size=40)


@given(online=device_ids, k=st.integers(1, 30), factor=st.floats(1.0, 3.0),
       round_=st.integers(1, 100))
def test_a_cohort_is_an_over_selected_sample_of_the_online_devices(online, k, factor, round_):
    policy = CohortPolicy(clients_per_round=k, over_select=factor)
    cohort = select_cohort(online, policy, seed=7, round=round_)
    if not online:
        assert cohort is None  # nobody known yet: everyone trains
        return
    assert set(cohort) <= set(online) and len(set(cohort)) == len(cohort)
    assert len(cohort) == min(len(online), math.ceil(k * factor))
    assert cohort == select_cohort(list(reversed(online)), policy, seed=7, round=round_)


def test_cohorts_change_from_round_to_round():
    online = [f"d{i}" for i in range(20)]
    policy = CohortPolicy(clients_per_round=5, over_select=1.2)
    cohorts = {tuple(select_cohort(online, policy, seed=0, round=r)) for r in range(1, 6)}
    assert len(cohorts) > 1


def test_no_selection_means_everyone_trains():
    assert select_cohort(["a", "b"], CohortPolicy(), seed=0, round=1) is None


@pytest.mark.parametrize(("fleet_budget", "constrained", "expected"), [
    (5.0, 2.0, 2.0),  # the tighter of the two
    (1.0, 2.0, 1.0),
    (0.0, 2.0, 2.0),  # no fleet budget: constrained devices still get theirs
    (5.0, 0.0, 5.0),  # not set: the fleet's
])
def test_constrained_devices_get_the_tighter_time_budget(fleet_budget, constrained, expected):
    base = TaskConfig(epochs=3, time_budget_s=fleet_budget)
    policy = AssignmentPolicy(constrained_time_budget_s=constrained)
    on_battery = {"cpus": 4, "ram_mb": 4096, "battery": True}
    assert policy.task_for(base, on_battery).time_budget_s == expected
    assert policy.task_for(base, {"cpus": 8, "ram_mb": 16000}) == base


def test_a_negative_nan_or_infinite_constrained_budget_is_refused():
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="constrained_time_budget_s"):
            AssignmentPolicy(constrained_time_budget_s=bad)


def test_the_aggregator_config_hands_the_constrained_budget_on():
    from aggregator.config import AggregatorConfig

    policy = AggregatorConfig(constrained_time_budget_s=2.0).assignment_policy()
    assert policy.constrained_time_budget_s == 2.0


def test_weak_devices_get_fewer_epochs_and_thin_links_a_smaller_codec():
    base = TaskConfig(epochs=3, time_budget_s=5.0)
    policy = AssignmentPolicy(constrained_epochs=1, constrained_batch_size=16,
                              slow_link_kbps=256, slow_link_codec="q4")
    devices = {
        "laptop": {"cpus": 8, "ram_mb": 16000},
        "zero": {"cpus": 1, "ram_mb": 512},
        "phone": {"cpus": 4, "ram_mb": 4096, "battery": True, "link_kbps": 64},
        "modem": {"cpus": 4, "ram_mb": 4096, "link_kbps": 128},
        "odd": {"cpus": "many", "link_kbps": None},  # junk capabilities change nothing
    }
    tiers, assign = assign_tasks(base, devices, policy)
    assert set(assign) == {"zero", "phone", "modem"}
    assert tiers[assign["zero"]] == TaskConfig(epochs=1, batch_size=16, time_budget_s=5.0)
    assert tiers[assign["phone"]] == TaskConfig(epochs=1, batch_size=16, time_budget_s=5.0,
                                                codec="q4")
    assert tiers[assign["modem"]] == TaskConfig(epochs=3, time_budget_s=5.0, codec="q4")
    a = ModelAnnouncement(fleet="f", version=0, round=1, model="m", model_config={},
                          layout=[], layout_hash="h", task=base,
                          payload=PayloadInfo(codec="f32", size=0, sha256="0" * 64),
                          cohort=["laptop", "zero"], tiers=tiers, assign=assign)
    back = ModelAnnouncement.from_payload(a.to_payload())
    assert back.task_for("laptop") == base
    assert back.task_for("zero").epochs == 1
    assert back.task_for("phone") is None  # not in the cohort


@pytest.mark.parametrize("kwargs", [
    {"clients_per_round": -1}, {"over_select": 0.9}, {"over_select": float("nan")}])
def test_cohort_policy_validation(kwargs):
    with pytest.raises(ConfigError):
        CohortPolicy(**kwargs)


def test_an_unknown_assigned_codec_is_a_config_error():
    with pytest.raises(ConfigError):
        AssignmentPolicy(slow_link_codec="q3")


def test_fleet_profiles_follow_the_mix_proportions():
    fleet = fleet_profiles("mixed", 14, seed=1)
    names = [p.name for p in fleet]
    assert sorted(names) == sorted(MIXES["mixed"] * 2)
    assert names != [p.name for p in fleet_profiles("mixed", 14, seed=2)]
    with pytest.raises(ConfigError, match="unknown profile mix"):
        fleet_profiles("exotic", 3, seed=0)
