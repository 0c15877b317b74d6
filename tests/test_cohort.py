"""The cohort the round machine owns: planned, re-planned, checkpointed (no broker)."""

from __future__ import annotations

import pytest

from aggregator.cohort import Cohort
from aggregator.selection import CohortPolicy
from fedmq.errors import ConfigError, ProtocolError

from .test_rounds import machine, update

ONLINE = [f"d{i}" for i in range(10)]


def selective(**policy):
    return machine(min_updates=1, target_updates=2,
                   cohort=CohortPolicy(clients_per_round=2, over_select=1.0), **policy)


def reason(call) -> str:
    with pytest.raises(ProtocolError) as info:
        call()
    return info.value.reason


def test_a_plan_asks_k_devices_and_the_machine_refuses_the_others_for_that_round():
    m = selective()
    asked = m.plan(ONLINE)
    assert len(asked) == 2 and set(asked) <= set(ONLINE) and m.selective
    outsider = next(d for d in ONLINE if d not in asked)
    assert reason(lambda: m.check_selected(update(outsider))) == "not_selected"
    m.check_selected(update(asked[0]))
    m.check_selected(update(outsider, round=2))  # another round: not this cohort's business
    assert m.open.target == 2


def test_re_planning_the_same_round_asks_new_devices_and_keeps_the_first():
    m = selective()
    first = m.plan(ONLINE)
    assert m.extend(now=20.0)  # a selective round that ran short asks others
    second = m.plan(ONLINE)
    assert not set(first) & set(second)
    for device in first + second:  # everyone asked so far may still deliver
        m.check_selected(update(device))
    assert m.cohort.size(m.round) == 4
    assert m.open.target == 2  # min(K, asked), never beyond K


def test_with_no_selection_or_nobody_online_everyone_may_train():
    m = machine(min_updates=1)
    assert m.plan(ONLINE) is None and not m.selective and not m.extend(now=20.0)
    s = selective()
    assert s.plan([]) is None
    s.check_selected(update("anyone"))


def test_a_closed_round_reports_its_cohort_and_the_next_round_is_planned_afresh():
    m = selective()
    asked = m.plan(ONLINE)
    m.offer(update(asked[0]))
    m.offer(update(asked[1], uid="2"))
    assert m.close(now=1.0).cohort == 2
    m.check_selected(update(ONLINE[0], round=2, version=1))  # round 2 not planned yet
    assert m.plan(ONLINE) is not None and m.cohort.round == 2


def test_the_cohort_survives_a_state_dict_round_trip():
    m = selective()
    asked = m.plan(ONLINE)
    m.offer(update(asked[0]))
    restored = selective()
    restored.load_state_dict(m.state_dict(), now=5.0)
    assert restored.cohort == m.cohort and restored.open.target == 2
    outsider = next(d for d in ONLINE if d not in asked)
    assert reason(lambda: restored.check_selected(update(outsider))) == "not_selected"
    assert not set(restored.plan(ONLINE)) & set(asked)  # a re-plan still asks others


def test_a_checkpoint_without_a_cohort_lets_everyone_deliver():
    m = selective()
    m.plan(ONLINE)
    state = m.state_dict()
    del state["cohort"]  # written before the machine owned the cohort
    restored = selective()
    restored.load_state_dict(state, now=1.0)
    assert restored.cohort == Cohort()
    restored.check_selected(update("d9"))


@pytest.mark.parametrize(("cohort", "match"), [
    ({"round": 7, "asked": ["d1"]}, "cohort of round 7 but round 1 is open"),
    ({"round": 1, "asked": [1, 2]}, "malformed cohort"),
    ({"asked": ["d1"]}, "malformed cohort"),
    ({"round": "one", "asked": None}, "malformed cohort"),
])
def test_a_bad_saved_cohort_is_refused(cohort, match):
    state = selective().state_dict()
    state["cohort"] = cohort
    with pytest.raises(ConfigError, match=match):
        selective().load_state_dict(state, now=1.0)


