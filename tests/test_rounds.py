"""The round state machine, driven with a fake clock and hand-made updates (no broker)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aggregator.rounds import Action, RoundMachine, RoundPolicy
from aggregator.staleness import StalenessPolicy
from aggregator.strategy.optimizers import ServerOptConfig, create_optimizer
from fedmq.core import codecs
from fedmq.core.protocol import Update
from fedmq.errors import ConfigError, ProtocolError


def machine(min_updates=2, deadline_s=10.0, on_insufficient="extend", size=4, **policy):
    return RoundMachine(
        params=np.zeros(size, np.float32), optimizer=create_optimizer(ServerOptConfig()),
        policy=RoundPolicy(min_updates=min_updates, deadline_s=deadline_s,
                           on_insufficient=on_insufficient, **policy),
        layout_hash="lay", now=0.0,
    )


def update(device, *, round=1, version=0, samples=10, delta=None, layout="lay", uid="u"):
    delta = np.ones(4, np.float32) if delta is None else delta
    return Update(device_id=device, update_id=uid, round=round, base_version=version,
                  num_samples=samples, loss=1.0, delta=codecs.encode(delta), layout_hash=layout)


def test_round_closes_at_min_updates_with_weighted_mean():
    m = machine()
    m.offer(update("a", samples=10, delta=np.full(4, 1.0, np.float32)))
    assert m.due(1.0) is Action.WAIT
    m.offer(update("b", samples=30, delta=np.full(4, 5.0, np.float32)))
    assert m.due(1.0) is Action.CLOSE
    result = m.close(1.0)
    assert (result.round, result.version, result.participants, result.samples) == (1, 1, 2, 40)
    assert np.allclose(m.params, 4.0)  # (10*1 + 30*5) / 40
    assert m.round == 2 and m.acc.count == 0


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"round": 0}, "stale_round"), ({"round": 2}, "future_round"),
    ({"version": 3}, "wrong_version"), ({"layout": "other"}, "bad_layout"),
])
def test_mismatched_updates_are_rejected_with_reason(kwargs, reason):
    m = machine()
    with pytest.raises(ProtocolError) as info:
        m.offer(update("a", **kwargs))
    assert info.value.reason == reason
    assert m.acc.count == 0


def test_a_device_counts_once_per_round():
    m = machine(min_updates=3)
    m.offer(update("a", uid="1"))
    with pytest.raises(ProtocolError) as info:
        m.offer(update("a", uid="2"))
    assert info.value.reason == "duplicate"
    assert m.acc.count == 1


def test_shape_mismatch_is_rejected_before_touching_the_sum():
    m = machine()
    with pytest.raises(ProtocolError):
        m.offer(update("a", delta=np.ones(5, np.float32)))
    assert m.acc.count == 0 and not m.open.devices


def test_deadline_extends_rather_than_averaging_over_too_few():
    m = machine(min_updates=2, deadline_s=10)
    m.offer(update("a"))
    assert m.due(9.9) is Action.WAIT
    assert m.due(10.0) is Action.EXTEND
    m.extend(10.0)
    assert m.due(19.0) is Action.WAIT
    m.offer(update("b"))
    assert m.due(19.0) is Action.CLOSE


def test_deadline_rerun_reannounces_on_the_same_model_and_keeps_what_it_holds():
    m = machine(min_updates=2, deadline_s=10, on_insufficient="rerun")
    m.offer(update("a", uid="ua"))
    assert m.due(10.0) is Action.RERUN
    assert m.rerun(10.0) == 1  # the receipted update stays
    assert (m.round, m.version, m.acc.count) == (2, 0, 1)
    assert m.due(15.0) is Action.WAIT  # a fresh deadline
    with pytest.raises(ProtocolError) as info:
        m.offer(update("b", round=1))
    assert info.value.reason == "stale_round"
    with pytest.raises(ProtocolError) as info:
        m.offer(update("a", round=2, uid="ua2"))  # a retrained copy does not count twice
    assert info.value.reason == "duplicate"
    m.offer(update("b", round=2, uid="ub"))
    assert m.due(15.0) is Action.CLOSE and m.close(15.0).participants == 2


def test_state_round_trip_resumes_between_rounds():
    m = machine(min_updates=1)
    m.offer(update("a"))
    m.close(0.0)
    restored = machine(min_updates=1)
    restored.load_state_dict(m.state_dict(), now=5.0)
    assert (restored.round, restored.version) == (2, 1)
    assert np.array_equal(restored.params, m.params)
    other_layout = RoundMachine(
        params=np.zeros(4, np.float32), optimizer=create_optimizer(ServerOptConfig()),
        policy=RoundPolicy(min_updates=1), layout_hash="different", now=0.0)
    with pytest.raises(ConfigError, match="different model layout"):
        other_layout.load_state_dict(m.state_dict(), now=0.0)


@pytest.mark.parametrize("kwargs", [{"min_updates": 0}, {"deadline_s": 0},
                                    {"on_insufficient": "average"}])
def test_policy_validation(kwargs):
    with pytest.raises(ConfigError):
        RoundPolicy(**kwargs)


def test_an_over_selected_round_closes_at_its_target_or_at_the_deadline_on_quorum():
    m = machine(min_updates=2, target_updates=3, deadline_s=10)
    m.offer(update("a", uid="1"))
    m.offer(update("b", uid="2"))
    assert m.due(5.0) is Action.WAIT  # quorum met, target not: wait for the deadline
    m.offer(update("c", uid="3"))
    assert m.due(5.0) is Action.CLOSE
    m.close(5.0)
    m.offer(update("a", round=2, version=1, uid="4"))
    m.offer(update("b", round=2, version=1, uid="5"))
    assert m.due(15.1) is Action.CLOSE and m.close(15.1).participants == 2


def test_late_updates_fold_into_the_open_round_with_a_staleness_discount():
    m = machine(min_updates=1, late_updates="fold",
                staleness=StalenessPolicy(kind="polynomial", a=1.0, max_staleness=2))
    m.offer(update("a", uid="1"))
    m.close(1.0)  # v1, round 2
    m.offer(update("b", round=2, version=1, samples=10, uid="2", delta=np.full(4, 3.0)))
    counted = m.offer(update("c", round=1, version=0, samples=10, uid="3",
                             delta=np.full(4, 2.0)))
    assert counted
    result = m.close(2.0)
    assert (result.participants, result.stale, result.max_staleness) == (2, 1, 1)
    # (10 * 3 + 10 * 0.5 * 2) / 20 = 2.0 on top of v1's 1.0
    assert np.allclose(m.params, 3.0)


def test_a_device_may_count_once_per_model_version_it_trained_on():
    m = machine(min_updates=5, late_updates="fold")
    m.offer(update("a", uid="1"))
    m.version = 1  # as if a step happened while the device trained
    m.offer(update("a", version=1, uid="2"))  # a newer base: counts too
    with pytest.raises(ProtocolError) as info:
        m.offer(update("a", version=1, uid="3"))
    assert info.value.reason == "duplicate"


def test_updates_beyond_the_maximum_staleness_are_refused():
    m = machine(min_updates=1, late_updates="fold", staleness=StalenessPolicy(max_staleness=1))
    for version in range(3):
        m.offer(update(f"d{version}", round=version + 1, version=version, uid=f"u{version}"))
        m.close(float(version))
    with pytest.raises(ProtocolError) as info:
        m.offer(update("late", round=2, version=1, uid="x"))
    assert info.value.reason == "too_stale"
    m.offer(update("late", round=3, version=2, uid="y"))  # one behind: fine


def test_a_version_two_checkpoint_still_loads():
    m = machine(min_updates=3)
    m.offer(update("a", uid="u1"))
    state = m.state_dict()
    state["format"] = 2
    state["open"]["devices"] = {"a": "u1"}
    del state["open"]["contributions"], state["open"]["stale"]
    restored = machine(min_updates=3)
    restored.load_state_dict(state, now=0.0)
    assert restored.open.contributions == {("a", 0): "u1"}
    assert restored.offer(update("a", uid="u1")) is False


@given(kind=st.sampled_from(["constant", "polynomial", "hinge"]),
       a=st.floats(0, 10), b=st.floats(0, 20), tau=st.integers(0, 1000))
def test_staleness_weights_are_in_0_1_and_never_grow_with_age(kind, a, b, tau):
    s = StalenessPolicy(kind=kind, a=a, b=b, max_staleness=1000)
    assert s.weight(0) == 1.0
    assert 0.0 < s.weight(tau + 1) <= s.weight(tau) <= 1.0


@pytest.mark.parametrize("kwargs", [{"kind": "linear"}, {"a": -1.0}, {"max_staleness": -1}])
def test_staleness_policy_validation(kwargs):
    with pytest.raises(ConfigError):
        StalenessPolicy(**kwargs)


def test_a_resent_update_never_counts_twice_however_late_it_may_still_be_folded():
    """A device whose receipt was lost re-sends; with late updates folded, the copy could
    still be accepted 10 versions on, so its id is remembered that long."""
    m = machine(min_updates=1, late_updates="fold",
                staleness=StalenessPolicy(max_staleness=10))
    assert m.offer(update("a", uid="first"))
    for version in range(1, 11):
        m.close(float(version))
        m.offer(update("b", round=version + 1, version=version, uid=f"b{version}"))
    assert (m.version, m.round) == (10, 11)
    assert m.offer(update("a", uid="first")) is False  # 10 behind, but already counted
    restored = machine(min_updates=1, late_updates="fold",
                       staleness=StalenessPolicy(max_staleness=10))
    restored.load_state_dict(m.state_dict(), now=0.0)
    assert restored.offer(update("a", uid="first")) is False  # also after a restart
    m.close(11.0)
    # 11 behind: still its device's latest counted id, so "accepted", never counted again
    assert m.offer(update("a", uid="first")) is False
    with pytest.raises(ProtocolError) as info:  # an update never counted is too stale
        m.offer(update("a", uid="second"))
    assert info.value.reason == "too_stale"


def test_a_device_away_for_many_rounds_still_hears_accepted_for_what_counted():
    """Its receipt was lost and it came back 20 short rounds later (seen in the 30-minute
    soak): the re-send must be recognised as counted, not refused as stale. Memory stays
    bounded: each device's last few ids, plus the recent rounds'."""
    from aggregator.rounds import LAST_PER_DEVICE, REMEMBER_ROUNDS

    m = machine(min_updates=1)
    assert m.offer(update("a", uid="first"))
    for version in range(1, 21):
        m.close(float(version))
        m.offer(update("b", round=version + 1, version=version, uid=f"b{version}"))
    m.close(21.0)
    assert m.offer(update("a", uid="first")) is False  # already counted: "accepted"
    restored = machine(min_updates=1)
    restored.load_state_dict(m.state_dict(), now=0.0)
    assert restored.offer(update("a", uid="first")) is False
    remembered_b = [u for (d, u) in m.recent if d == "b"]
    assert len(remembered_b) <= REMEMBER_ROUNDS + LAST_PER_DEVICE
