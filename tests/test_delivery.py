"""End-to-end delivery: outbox, receipts, idempotency, and the partial round's checkpoint."""

from __future__ import annotations

import time

import numpy as np
import pytest

from aggregator.rounds import RoundMachine, RoundPolicy
from aggregator.strategy.optimizers import ServerOptConfig, create_optimizer
from edge_agent.outbox import Outbox
from fedmq.core import codecs
from fedmq.core.protocol import Receipt, Update
from fedmq.errors import ConfigError, ProtocolError

from .helpers import make_agents, make_aggregator, wait_for


def test_outbox_survives_a_restart_and_forgets_only_on_remove(tmp_path):
    box = Outbox(tmp_path / "outbox")
    box.put("aa11", 3, b"first")
    box.put("bb22", 4, b"second")
    again = Outbox(tmp_path / "outbox")
    assert again.ids() == {"aa11", "bb22"}
    assert [e.payload for e in again.due(resend_after_s=30)] == [b"first", b"second"]
    assert again.remove("aa11").round == 3
    assert Outbox(tmp_path / "outbox").ids() == {"bb22"}
    assert again.remove("aa11") is None


def test_outbox_slots_are_reused_in_place_and_a_torn_one_is_ignored(tmp_path):
    folder = tmp_path / "outbox"
    box = Outbox(folder)
    for round in range(1, 30):  # one at a time, receipted: one slot file serves them all
        box.put(f"u{round}", round, b"x" * round)
        assert box.remove(f"u{round}") is not None
    assert sorted(p.name for p in folder.iterdir()) == ["slot-0.out"]
    box.put("keep", 40, b"kept payload")
    box.put("torn", 41, b"a payload cut short by a crash")
    torn = folder / "slot-1.out"
    torn.write_bytes(torn.read_bytes()[:-5])
    again = Outbox(folder)
    assert again.ids() == {"keep"}
    assert [e.payload for e in again.due(resend_after_s=30)] == [b"kept payload"]
    again.put("next", 42, b"y")  # into the torn (free) slot
    assert sorted(p.name for p in folder.iterdir()) == ["slot-0.out", "slot-1.out"]
    assert Outbox(folder).ids() == {"keep", "next"}


def test_an_outbox_of_many_pending_updates_shrinks_back_once_receipted(tmp_path):
    folder = tmp_path / "outbox"
    box = Outbox(folder)
    for i in range(10):  # a device offline for ten rounds
        box.put(f"u{i}", i, b"z")
    assert len(list(folder.iterdir())) == 10
    for i in range(10):
        box.remove(f"u{i}")
    assert sorted(p.name for p in folder.iterdir()) == [f"slot-{i}.out" for i in range(4)]
    assert len(Outbox(folder)) == 0


def test_an_outbox_of_the_old_one_file_per_update_format_is_moved_into_slots(tmp_path):
    folder = tmp_path / "outbox"
    folder.mkdir()
    (folder / f"{7:010d}-old1.upd").write_bytes(b"from an older fedmq")
    box = Outbox(folder)
    assert [(e.update_id, e.round, e.payload) for e in box.due(resend_after_s=30)] == \
        [("old1", 7, b"from an older fedmq")]
    assert sorted(p.name for p in folder.iterdir()) == ["slot-0.out"]
    assert Outbox(folder).ids() == {"old1"}


def test_outbox_resends_after_timeout_or_reconnect():
    box = Outbox()
    entry = box.put("id1", 1, b"x")
    entry.last_sent = 100.0
    assert box.due(resend_after_s=30, now=120.0) == []
    assert box.due(resend_after_s=30, now=131.0) == [entry]
    box.mark_unsent()
    assert box.due(resend_after_s=30, now=101.0) == [entry]


def test_a_new_model_resends_only_what_has_had_time_for_a_receipt():
    box = Outbox()
    old, fresh = box.put("old", 1, b"x"), box.put("new", 2, b"y")
    old.last_sent, fresh.last_sent = 100.0, 108.0
    box.mark_unsent(older_than_s=5.0, now=110.0)  # async: models come many times a second
    assert box.due(resend_after_s=30, now=110.0) == [old]


def test_each_resend_of_one_update_waits_twice_as_long(caplog):
    box = Outbox()
    entry = box.put("id1", 1, b"x")
    now, waits = 1000.0, []
    for _ in range(9):
        box.sent(entry, connected=True, now=now)
        wait = next(t for t in range(1, 10_000) if box.due(resend_after_s=30, now=now + t))
        waits.append(wait)
        now += wait
    assert waits == [30, 60, 120, 240, 480, 960, 1920, 3600, 3600]  # capped at MAX_BACKOFF_S
    assert "sent 4 times without a receipt" in caplog.text


def test_a_send_into_a_dead_link_does_not_lengthen_the_backoff():
    box = Outbox()
    entry = box.put("id1", 1, b"x")
    box.sent(entry, connected=False, now=50.0)
    assert entry.sends == 0 and box.due(resend_after_s=30, now=50.0) == [entry]


def test_a_new_model_resends_only_first_sends_reconnects_resend_everything():
    box = Outbox()
    once, often = box.put("once", 1, b"x"), box.put("often", 1, b"y")
    for _ in range(3):
        box.sent(often, connected=True, now=100.0)
    box.sent(once, connected=True, now=100.0)
    box.mark_unsent(older_than_s=5.0, first_send_only=True, now=110.0)
    assert box.due(resend_after_s=30, now=110.0) == [once]  # "often" waits out its backoff
    box.mark_unsent(now=111.0)  # a reconnect: whatever was in flight may be gone
    assert box.due(resend_after_s=30, now=111.0) == [often, once]


@pytest.mark.integration
def test_an_update_refused_unread_is_resent_less_and_less_often(broker, tmp_path, stoppers,
                                                                 monkeypatch):
    """An aggregator whose max_update_bytes is below any update refuses every one as
    too_large before it can name it, so no receipt comes: the device backs off instead of
    re-sending every resend_after_s forever."""
    import edge_agent.agent

    monkeypatch.setattr(edge_agent.agent, "RESEND_CHECK_S", 0.02)  # look often for due ones
    service = make_aggregator(broker.url, tmp_path, stoppers, min_updates=1, rounds=1,
                              max_update_bytes=2000)
    [agent] = make_agents(broker.url, stoppers, 1, resend_after_s=0.2)
    wait_for(lambda: agent.stats.updates_sent == 1, "the first update")
    first = time.monotonic()
    wait_for(lambda: agent.stats.resent >= 3, "three re-sends")
    # re-sends after 0.2, 0.4 and 0.8 s: 1.4 s at least (every 0.2 s would take 0.6 s)
    assert time.monotonic() - first >= 1.3
    wait_for(lambda: service.rejected["too_large"] >= 4, "the aggregator to refuse all four")
    assert service.accepted == 0


def machine(min_updates=3):
    return RoundMachine(params=np.zeros(4, np.float32),
                        optimizer=create_optimizer(ServerOptConfig()),
                        policy=RoundPolicy(min_updates=min_updates), layout_hash="", now=0.0)


def update(device, uid, round=1, version=0, value=1.0):
    return Update(device_id=device, update_id=uid, round=round, base_version=version,
                  num_samples=10, loss=0.1, delta=codecs.encode(np.full(4, value, np.float32)))


def test_a_redelivered_update_is_acknowledged_but_never_counted_twice():
    m = machine()
    assert m.offer(update("a", "u1")) is True
    assert m.offer(update("a", "u1")) is False  # broker redelivery or device re-send
    assert m.acc.count == 1
    with pytest.raises(ProtocolError, match="already contributed"):
        m.offer(update("a", "u2"))  # a second, different update of the device


def test_an_update_resent_after_its_round_closed_is_still_accepted_not_stale():
    m = machine(min_updates=1)
    m.offer(update("a", "u1"))
    m.close(1.0)
    assert m.offer(update("a", "u1", round=1)) is False  # known: receipt "accepted"
    with pytest.raises(ProtocolError) as info:
        m.offer(update("a", "u9", round=1))
    assert info.value.reason == "stale_round"


def test_the_open_rounds_partial_aggregate_survives_a_crash():
    straight, crashed = machine(), machine()
    for m in (straight, crashed):
        m.offer(update("a", "u1", value=1.0))
        m.offer(update("b", "u2", value=3.0))
    restored = machine()
    restored.load_state_dict(crashed.state_dict(), now=5.0)
    assert restored.open.contributions == {("a", 0): "u1", ("b", 0): "u2"}
    assert restored.offer(update("a", "u1")) is False  # still idempotent after the restart
    for m in (straight, restored):
        m.offer(update("c", "u3", value=5.0))
        m.close(6.0)
    assert np.array_equal(straight.params, restored.params)
    assert np.allclose(restored.params, 3.0)


@pytest.mark.integration
def test_every_update_gets_a_receipt_and_outboxes_drain(broker, tmp_path, stoppers, mqtt_version):
    service = make_aggregator(broker.url, tmp_path, stoppers, rounds=3)
    agents = make_agents(broker.url, stoppers, 3)
    wait_for(service.finished.is_set, "3 rounds")
    wait_for(lambda: sum(a.stats.receipts["accepted"] for a in agents) == service.accepted,
             "a receipt for every counted update")
    wait_for(lambda: all(len(a.outbox) == 0 for a in agents), "outboxes to drain")
    assert service.accepted >= 9
    assert {a.link.protocol_version for a in agents} == {mqtt_version}
    # every update message was acked to the broker (late ones included, hence >=)
    assert service.answered >= service.accepted


@pytest.mark.integration
def test_an_agent_killed_between_training_and_publishing_sends_on_restart(
        broker, tmp_path, stoppers, mqtt_version):
    service = make_aggregator(broker.url, tmp_path, stoppers, rounds=1, min_updates=3)
    make_agents(broker.url, stoppers, 2, total=3)
    state = tmp_path / "dev2-state"
    crashed = make_agents(broker.url, stoppers, 1, total=3, first=2, start=False,
                          state_dir=str(state))[0]
    crashed._send = lambda entry: 0  # dies after storing its update, before publishing
    crashed.start()
    stoppers(crashed.stop)
    wait_for(lambda: len(crashed.outbox) == 1, "the update to be stored")
    crashed.stop()
    (stored,) = Outbox(state / "outbox").ids()
    assert service.machine.open.devices <= {"dev0", "dev1"}

    restarted = make_agents(broker.url, stoppers, 1, total=3, first=2,
                            state_dir=str(state))[0]
    wait_for(service.finished.is_set, "round 1 with the restarted device")
    assert service.history[0].participants == 3
    wait_for(lambda: len(restarted.outbox) == 0, "the restarted device's outbox to drain")
    assert restarted.stats.resent >= 1
    assert ("dev2", stored) in service.machine.recent  # the stored update was counted


def test_receipt_round_trip():
    receipt = Receipt(update_id="ab12", round=4, status="rejected", reason="stale_round")
    assert Receipt.from_payload(receipt.to_payload()) == receipt
    with pytest.raises(ProtocolError):
        Receipt(update_id="x", round=1, status="maybe")


@pytest.mark.integration
def test_the_aggregator_keeps_a_registry_of_device_births_and_deaths(broker, tmp_path,
                                                                      stoppers):
    service = make_aggregator(broker.url, tmp_path, stoppers, rounds=1, min_updates=2)
    agents = make_agents(broker.url, stoppers, 2)
    wait_for(lambda: service.registry.online() == ["dev0", "dev1"], "two births")
    caps = service.registry.devices["dev0"].capabilities
    assert caps["cpus"] >= 1 and "float32" in caps["codecs"] and "numpy" in caps["backends"]
    agents[1].stop()
    wait_for(lambda: service.registry.online() == ["dev0"], "dev1 offline")
    assert not service.registry.devices["dev1"].online
    assert service.registry.devices["dev1"].capabilities  # kept from the birth


def test_registry_keeps_capabilities_across_a_last_will_and_refuses_impostors():
    from aggregator.devices import DeviceRegistry
    from fedmq.core.protocol import DeviceStatus

    registry = DeviceRegistry()
    registry.observe("pi1", DeviceStatus(device_id="pi1", online=True,
                                         capabilities={"cpus": 4}), now=1.0)
    info = registry.observe("pi1", DeviceStatus(device_id="pi1", online=False), now=2.0)
    assert not info.online and info.capabilities == {"cpus": 4} and registry.online() == []
    with pytest.raises(ProtocolError) as exc:
        registry.observe("pi1", DeviceStatus(device_id="pi2", online=True), now=3.0)
    assert exc.value.reason == "wrong_topic"


@pytest.mark.integration
def test_an_unexpected_error_in_one_round_does_not_end_training(broker, tmp_path, stoppers):
    """A bug or a full disk in one round is logged and counted; the agent trains again on
    the next model instead of its training thread dying silently."""
    agents = make_agents(broker.url, stoppers, 2)
    flaky = agents[1]
    real_train, failures = flaky.trainer.train, []

    def train_once_broken(*args, **kwargs):
        if not failures:
            failures.append(True)
            raise OSError(28, "No space left on device")
        return real_train(*args, **kwargs)

    flaky.trainer.train = train_once_broken
    service = make_aggregator(broker.url, tmp_path, stoppers, rounds=3, min_updates=1)
    wait_for(service.finished.is_set, "3 rounds")
    wait_for(lambda: flaky.stats.updates_sent >= 1, "the flaky agent to train again")
    assert flaky.stats.rejected["train_error"] == 1


@pytest.mark.parametrize("configured", ["float32", "top5-q4-ef"])
def test_the_residual_survives_a_restart_whatever_codec_the_server_assigned(tmp_path,
                                                                             configured):
    """A slow-link device configured with one codec and assigned an error-feedback codec
    by the aggregator (AssignmentPolicy.slow_link_codec, through the announcement's task
    tiers) owes the same residual after a reboot as before it."""
    from edge_agent.agent import LocalTrainer
    from fedmq.core.protocol import ModelAnnouncement, TaskConfig
    from fedmq.core.transfer import ReceivedModel, encode_model
    from fedmq.models import build_model
    from fedmq.tasks import device_shard

    config = {"inputs": 64, "classes": 10}
    model = build_model("logreg", config, seed=0)
    info, _ = encode_model(model.get_flat(), codec="float32", version=0)
    announcement = ModelAnnouncement(
        fleet="f", version=0, round=1, model="logreg", model_config=config,
        layout=model.layout.to_wire(), layout_hash=model.layout.hash,
        task=TaskConfig(epochs=1, lr=0.1), payload=info,
        tiers=[TaskConfig(epochs=1, lr=0.1, codec="top2-sign-ef")], assign={"d0": 0})
    data = device_shard("digits", device_index=0, device_count=4, alpha=0.5, seed=0)
    state = tmp_path / "agent-state.bin"

    def trainer() -> LocalTrainer:
        return LocalTrainer(device_id="d0", data=data, codec=configured, seed=1,
                            state_path=state)

    before = trainer()
    before.train(ReceivedModel(announcement, model.get_flat(), 0),
                 announcement.task_for("d0"))
    assert before.feedback.residual is not None and np.any(before.feedback.residual)
    after = trainer()  # the reboot
    assert after.feedback.residual is not None, "the residual was lost on restart"
    assert np.array_equal(after.feedback.residual, before.feedback.residual)


def test_agents_refuse_to_share_a_state_dir(tmp_path, stoppers):
    """Every agent on a host pointed at one state_dir loaded the others' outbox and sent
    their updates under its own topic (refused as wrong_topic)."""
    state = str(tmp_path / "state")
    unused = "mqtt://127.0.0.1:9"  # never started: nothing here connects
    (first,) = make_agents(unused, stoppers, 1, start=False, state_dir=state)
    with pytest.raises(ConfigError, match=r"in use by dev0 pid \d+; give every agent its own"):
        make_agents(unused, stoppers, 1, first=1, total=2, start=False, state_dir=state)
    first.outbox.put("u1", 1, b"dev0's update")
    first._state_lock.release()  # dev0 is gone, its stored update is not
    with pytest.raises(ConfigError, match="holds the state of device dev0, not dev1"):
        make_agents(unused, stoppers, 1, first=1, total=2, start=False, state_dir=state)
    (again,) = make_agents(unused, stoppers, 1, start=False, state_dir=state)
    assert again.outbox.ids() == {"u1"}
    again._state_lock.release()
