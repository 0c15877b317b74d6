"""The round state machine, driven with a fake clock and hand-made updates (no broker)."""

import numpy as np
import pytest

from aggregator.optimizers import ServerOptConfig, create_optimizer
from aggregator.rounds import Action, RoundMachine, RoundPolicy
from edge_agent import codecs
from edge_agent.errors import ConfigError, ProtocolError
from edge_agent.protocol import Update


def machine(min_updates=2, deadline_s=10.0, on_insufficient="extend", size=4):
    return RoundMachine(
        params=np.zeros(size, np.float32), optimizer=create_optimizer(ServerOptConfig()),
        policy=RoundPolicy(min_updates=min_updates, deadline_s=deadline_s,
                           on_insufficient=on_insufficient),
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
