"""Partial aggregates of workers and sites (aggregator/partial.py), without a broker:
folded through workers, a round gives the FedAvg of folding every update centrally."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.partial import PartialRound, Shard
from aggregator.rounds import Action, RoundMachine, RoundPolicy
from aggregator.strategy.optimizers import ServerOptConfig, create_optimizer
from fedmq.core import codecs
from fedmq.core.protocol import CohortDigest, Receipt, Update, cohort_digest
from fedmq.errors import ConfigError, ProtocolError

SIZE = 6


def central(min_updates=2, **policy):
    return RoundMachine(params=np.zeros(SIZE, np.float32),
                        optimizer=create_optimizer(ServerOptConfig()),
                        policy=RoundPolicy(min_updates=min_updates, deadline_s=10.0, **policy),
                        layout_hash="lay", now=0.0)


def worker(source="w0", flush_after_s=5.0, **policy):
    part = PartialRound(source=source, size=SIZE, layout_hash="lay",
                        policy=RoundPolicy(**policy), flush_after_s=flush_after_s)
    part.follow(round=1, version=0, cohort=None, now=0.0)
    return part


def update(device, delta, *, samples=10, uid="u", round=1, version=0, loss=1.0):
    return Update(device_id=device, update_id=uid, round=round, base_version=version,
                  num_samples=samples, loss=loss, delta=codecs.encode(np.asarray(delta, "f4")),
                  layout_hash="lay")


deltas = st.lists(
    st.tuples(st.lists(st.floats(-100, 100, width=32), min_size=SIZE, max_size=SIZE),
              st.integers(1, 10_000)),
    min_size=1, max_size=24)


@settings(max_examples=60, deadline=None)
@given(deltas, st.integers(1, 4))
def test_a_round_through_workers_equals_the_round_folded_centrally(updates, workers):
    shards = [Shard(i, workers) for i in range(workers)]
    parts = [worker(f"w{i}") for i in range(workers)]
    flat, reduced = central(min_updates=len(updates)), central(min_updates=len(updates))
    for n, (delta, samples) in enumerate(updates):
        device = f"dev{n}"
        u = update(device, delta, samples=samples, loss=float(n))
        flat.offer(u)
        owner = next(i for i, s in enumerate(shards) if s.owns(device))
        assert parts[owner].offer(u) is True
    for part in parts:
        if part.open.count:
            reduced.offer(part.seal(1.0).update)
    assert reduced.due(1.0) is Action.CLOSE
    a, b = flat.close(1.0), reduced.close(1.0)
    assert (a.participants, a.samples) == (b.participants, b.samples) == (
        len(updates), sum(s for _, s in updates))
    assert b.train_loss == pytest.approx(a.train_loss, rel=1e-9)
    scale = max(1.0, float(np.abs(flat.params).max()))
    np.testing.assert_allclose(reduced.params, flat.params, rtol=1e-5, atol=1e-5 * scale)


def test_every_device_belongs_to_exactly_one_worker():
    devices = [f"device-{i:05d}" for i in range(2000)]
    for count in (1, 2, 3, 4, 7):
        owners = [[s for s in range(count) if Shard(s, count).owns(d)] for d in devices]
        assert all(len(o) == 1 for o in owners)
        sizes = np.bincount([o[0] for o in owners], minlength=count)
        assert sizes.min() > 0.8 * len(devices) / count  # spread, not all on one


@pytest.mark.parametrize("text", ["1", "2/2", "-1/3", "a/b", "0/0"])
def test_bad_shards_are_config_errors(text):
    with pytest.raises(ConfigError):
        Shard.parse(text)


def test_a_resent_update_folds_once_and_a_second_update_is_a_duplicate():
    part = worker()
    assert part.offer(update("a", np.ones(SIZE), uid="1")) is True
    assert part.offer(update("a", np.ones(SIZE), uid="1")) is False
    with pytest.raises(ProtocolError) as info:
        part.offer(update("a", np.ones(SIZE), uid="2"))
    assert info.value.reason == "duplicate"
    sealed = part.seal(1.0)
    assert sealed.update.represents == 1
    # sealed and sent: still recognised while the central aggregator has not answered
    assert part.offer(update("a", np.ones(SIZE), uid="1")) is False
    assert part.answer("a", "1") is None


@pytest.mark.parametrize(("upstream", "status", "reason"), [
    (Receipt(update_id="", round=1, status="accepted"), "accepted", ""),
    (Receipt(update_id="", round=1, status="rejected", reason="stale_round"),
     "rejected", "stale_round"),
])
def test_devices_get_the_central_aggregators_verdict(upstream, status, reason):
    part = worker()
    part.offer(update("a", np.ones(SIZE), uid="1"))
    part.offer(update("b", np.ones(SIZE), uid="2"))
    sealed = part.seal(1.0)
    answer = Receipt(update_id=sealed.update.update_id, round=1, status=upstream.status,
                     reason=upstream.reason)
    owed = part.receipt(answer)
    assert sorted((d, r.update_id, r.status, r.reason) for d, r in owed) == [
        ("a", "1", status, reason), ("b", "2", status, reason)]
    assert part.receipt(answer) == []  # answered once
    assert part.answer("a", "1").status == status  # a re-send gets the same verdict


def test_the_central_aggregator_checks_what_a_device_would_be_checked_for():
    part = worker()
    for kwargs, reason in [({"round": 2}, "future_round"), ({"round": 0}, "stale_round"),
                           ({"version": 1}, "wrong_version")]:
        with pytest.raises(ProtocolError) as info:
            part.offer(update("a", np.ones(SIZE), **kwargs))
        assert info.value.reason == reason
    part.follow(round=1, version=0, cohort=["a"], now=0.0)
    with pytest.raises(ProtocolError) as info:
        part.check_selected(update("b", np.ones(SIZE)))
    assert info.value.reason == "not_selected"


def test_sealed_when_the_expected_devices_are_in_or_the_oldest_waited():
    part = worker(flush_after_s=5.0)
    part.follow(round=1, version=0, cohort=CohortDigest(cohort_digest(["a", "b"])), now=0.0)
    part.offer(update("a", np.ones(SIZE), uid="1"))
    assert not part.due(1.0, online=["a", "b", "c"])  # c is online but was not asked
    part.offer(update("b", np.ones(SIZE), uid="2"))
    assert part.due(1.1, online=["a", "b", "c"])
    lone = worker(flush_after_s=5.0)  # no cohort: waits for the devices online
    lone.offer(update("a", np.ones(SIZE), uid="1"))
    assert not lone.due(1.0, online=["a", "c"])
    assert lone.due(6.1, online=["a", "c"])  # first seen at 1.0: waited 5 s


def test_a_new_announcement_seals_what_was_folded_for_the_last_one():
    part = worker()
    part.offer(update("a", np.ones(SIZE), uid="1"))
    sealed = part.follow(round=2, version=1, cohort=None, now=1.0)
    assert sealed is not None and sealed.update.round == 1 and sealed.members == (("a", "1"),)
    assert part.follow(round=2, version=1, cohort=None, now=1.0) is None
    assert part.open.count == 0 and part.open.round == 2


def test_state_survives_a_restart_mid_round():
    part = worker()
    part.offer(update("a", np.full(SIZE, 2.0), uid="1", samples=10))
    first = part.seal(1.0)
    part.offer(update("b", np.full(SIZE, 4.0), uid="2", samples=30))
    again = worker()
    again.load_state_dict(part.state_dict())
    assert again.offer(update("b", np.full(SIZE, 4.0), uid="2")) is False
    assert list(again.pending) == [first.update.update_id]
    second = again.seal(2.0)
    assert second.update.update_id != first.update.update_id
    assert second.update.num_samples == 30 and second.update.represents == 1
    np.testing.assert_allclose(codecs.decode(second.update.delta), 4.0)
    with pytest.raises(ConfigError, match="own checkpoint"):
        worker(source="w1").load_state_dict(part.state_dict())


def test_a_partial_counts_its_devices_toward_the_quorum_and_once_per_id():
    m = central(min_updates=3)
    part = worker()
    part.offer(update("a", np.ones(SIZE), uid="1"))
    part.offer(update("b", np.ones(SIZE), uid="2"))
    sealed = part.seal(1.0).update
    assert m.offer(sealed) is True and m.open.count == 2
    assert m.offer(sealed) is False  # the worker re-sent it: counts once
    assert m.due(1.0) is Action.WAIT
    part.offer(update("c", np.ones(SIZE), uid="3"))
    assert m.offer(part.seal(1.0).update) is True  # a second partial of the same round
    assert m.due(1.0) is Action.CLOSE
    assert m.close(1.0).devices == ("w0",)


def test_robust_rules_refuse_partials():
    m = central(min_updates=3, aggregation="median")
    part = worker()
    part.offer(update("a", np.ones(SIZE), uid="1"))
    with pytest.raises(ProtocolError) as info:
        m.offer(part.seal(1.0).update)
    assert info.value.reason == "not_supported"


def test_a_worker_restores_a_digest_cohort():
    part = worker()
    part.follow(round=2, version=1, cohort=CohortDigest(cohort_digest(["a"])), now=0.0)
    again = worker()
    again.load_state_dict(part.state_dict())
    assert "a" in again.cohort and "b" not in again.cohort
