"""Secure aggregation (SecAgg+) wired into the aggregator and the edge agent, over a real
mosquitto: the aggregator learns only each round's sum, exactly, with devices dropping
out after sending and a device vanishing before it shares its secrets.

The protocol core itself is tested without a broker in tests/test_secagg.py.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aggregator.config import AggregatorConfig
from aggregator.secure_round import SecureRounds, device_topic, setup_topic
from fedmq.core.protocol import FleetTopics
from fedmq.core.protocol.wire import decode_any, peek_kind
from fedmq.core.secagg import SecAggClient, SecAggSetup
from fedmq.core.secagg.field import Field
from fedmq.core.secagg.weighting import weighted_mean, weighted_vector
from fedmq.errors import ConfigError
from fedmq.transport.mqtt import MqttLink
from tests.helpers import make_agents, make_aggregator, wait_for

pytest.importorskip("cryptography")

SECURE = dict(secure_aggregation=True, secagg_stage_s=3.0)


class Recorder:
    """Every field vector a device submitted, by (device, session): what the plain sum of
    the same clipped, quantized updates is computed from."""

    def __init__(self, monkeypatch) -> None:
        self.inputs: dict[tuple[str, bytes], np.ndarray] = {}
        self.lock = threading.Lock()
        original = SecAggClient.submit_elements

        def submit_elements(client, elements):
            with self.lock:
                self.inputs[(client.device_id, client.setup.session)] = np.array(elements)
            return original(client, elements)

        monkeypatch.setattr(SecAggClient, "submit_elements", submit_elements)

    def plain_sum(self, devices, session: bytes, field: Field) -> np.ndarray:
        total = None
        for device in devices:
            x = field.reduce(self.inputs[(device, session)])
            total = x if total is None else field.add(total, x)
        return total


def secure_fleet(broker, tmp_path, stoppers, count: int, *, rounds: int = 2,
                 drop=None, agent_options=None, before_start=None, **overrides):
    """`count` secure agents, then the aggregator (so its first round finds them all);
    `before_start(service, agents)` runs before the aggregator starts."""
    agents = make_agents(broker.url, stoppers, count, secure_aggregation=True,
                         **(agent_options or {}))
    if drop is not None:
        for agent in agents:
            agent.secure._drop_after_input = drop(agent.config.device_id)
    for agent in agents:
        wait_for(agent.link.subscribed.is_set, "the agents' subscriptions")
    service = make_aggregator(broker.url, tmp_path, stoppers, start=False, rounds=rounds,
                              min_updates=3, **{**SECURE, **overrides})
    plain = []
    original = service.ingest.receive
    service.ingest.receive = lambda *a, **k: plain.append(a) or original(*a, **k)
    if before_start is not None:
        before_start(service, agents)
    service.start()
    stoppers(service.stop)
    return service, agents, plain


def test_a_secure_fleet_trains_and_the_aggregator_sees_only_the_exact_sum(
        broker, tmp_path, stoppers, monkeypatch):
    recorder = Recorder(monkeypatch)
    service, agents, plain = secure_fleet(broker, tmp_path, stoppers, 5, rounds=3)
    wait_for(service.finished.is_set, "three secure rounds", timeout=120)
    assert service.failure is None
    assert plain == []  # the plain ingest path never ran: no individual update was held
    assert service.rejected == {}
    history = service.history
    assert len(history) == 3 and all(r.participants == 5 for r in history)
    assert history[-1].accuracy > history[0].accuracy - 0.05
    assert history[-1].accuracy > 0.3  # it learns (10 classes: 0.1 by chance)
    for result in service.secure_sums:
        setup_field = Field(32)
        expected = recorder.plain_sum(result.survivors, result.session, setup_field)
        np.testing.assert_array_equal(result.total, expected)
    # every masked input was receipted and left the outbox
    wait_for(lambda: all(len(a.outbox) == 0 for a in agents), "empty outboxes")
    assert sum(a.stats.receipts["accepted"] for a in agents) >= 15


def test_the_round_completes_with_30_percent_dropping_after_sending(
        broker, tmp_path, stoppers, monkeypatch):
    recorder = Recorder(monkeypatch)
    gone = {"dev0", "dev3", "dev6"}  # 3 of 10 vanish once their masked input is out

    def drop(device):
        return lambda round: device in gone

    service, agents, plain = secure_fleet(broker, tmp_path, stoppers, 10, rounds=2,
                                          drop=drop)
    wait_for(service.finished.is_set, "two secure rounds with dropouts", timeout=120)
    assert service.failure is None and plain == []
    for result in service.secure_sums:
        assert len(result.survivors) == 10  # their inputs are in the sum all the same
        assert result.dropped == () and result.excluded == ()
        expected = recorder.plain_sum(result.survivors, result.session, Field(32))
        np.testing.assert_array_equal(result.total, expected)
    vanished = sum(a.secure.stats["dropped_on_purpose"] for a in agents)
    assert vanished >= 3  # they never answered an unmask request
    assert all(a.secure.stats["sa.reveal"] == 0 for a in agents
               if a.config.device_id in gone)


PACKET_LIMIT = 8192  # bytes: the digits MLP's masked input (4,811 x 4 bytes) is 19 KB


def lose_first_receipt(agent) -> threading.Event:
    """The agent misses its first receipt (set once lost), so its outbox sends that
    masked input again, whole, after resend_after_s."""
    lost = threading.Event()

    def on_receipt(message) -> None:
        if lost.is_set():
            agent._on_receipt(message)
        else:
            lost.set()

    agent.link.route(agent.topics.receipt(agent.config.device_id), on_receipt)
    return lost


def test_masked_inputs_bigger_than_the_broker_limit_travel_in_parts(
        broker_factory, tmp_path, stoppers, monkeypatch):
    """A broker that refuses packets above 8 KiB: every masked input goes up in Parts,
    is reassembled by the plain path's Reassembler and unmasked exactly; a device that
    vanishes after sending stays in the sum, and a masked input sent again (its receipt
    lost) is reassembled again and counted once."""
    recorder = Recorder(monkeypatch)
    small = broker_factory(f"max_packet_size {PACKET_LIMIT}", name="small")
    kinds: list[str] = []
    lost: list[threading.Event] = []

    def before_start(service, agents):
        unchunk = service.ingest.unchunk

        def recording(device, payload, now):
            kinds.append(peek_kind(payload))
            return unchunk(device, payload, now)

        service.ingest.unchunk = recording
        lost.append(lose_first_receipt(agents[1]))

    def drop(device):
        return lambda round: device == "dev0"  # vanishes once its input is out

    service, agents, plain = secure_fleet(
        small, tmp_path, stoppers, 5, rounds=2, drop=drop, before_start=before_start,
        agent_options=dict(resend_after_s=1.0), hidden=64)
    wait_for(service.finished.is_set, "two secure rounds in Parts", timeout=120)
    assert service.failure is None and plain == []
    assert service.link.max_packet_size == PACKET_LIMIT
    assert all(a.link.effective_max_payload(a.machine.update_topic) < PACKET_LIMIT
               for a in agents)
    assert len(service.secure_sums) == 2
    for result in service.secure_sums:
        assert sorted(result.survivors) == [f"dev{i}" for i in range(5)]  # dev0 too
        expected = recorder.plain_sum(result.survivors, result.session, Field(32))
        assert expected.size * 4 > PACKET_LIMIT  # no masked input fits one message
        np.testing.assert_array_equal(result.total, expected)
        assert result.bytes_up > 5 * expected.size * 4  # the Parts' wire bytes count
    assert kinds.count("part") >= 2 * 5 * 3  # at least 3 Parts per masked input
    assert "sa.input" not in kinds  # no masked input came whole
    assert service.secure.counts["sa.input:accepted"] >= 10
    vanished = agents[0].secure.stats["dropped_on_purpose"]
    assert vanished >= 2 and agents[0].secure.stats["sa.reveal"] == 0
    # the lost receipt: the masked input went up again and was counted once (the sums
    # above are exact), and its receipt came this time
    assert lost[0].is_set()
    wait_for(lambda: agents[1].stats.resent >= 1, "the re-send of dev1's masked input")
    wait_for(lambda: all(len(a.outbox) == 0 for a in agents), "empty outboxes")
    resent = (service.secure.counts["late:accepted"]
              + service.secure.counts["sa.input:accepted"] - 10)
    assert resent >= 1  # answered "accepted" (resent) again, not counted
    assert service.rejected.get("too_large", 0) == 0


class Vanisher:
    """A device that advertises its keys for the round, then disappears: it never
    shares its secrets (`shares`: it shares them, then never sends its input)."""

    def __init__(self, broker_url: str, device: str, fleet: str = "test", *,
                 shares: bool = False) -> None:
        from fedmq.core.protocol import DeviceStatus

        self.shares = shares
        self.device = device
        self.topics = FleetTopics(fleet)
        self.client = SecAggClient(device)
        self.advertised = threading.Event()
        self.link = MqttLink(client_id=device, broker=broker_url)
        self.link.route(setup_topic(self.topics), self._on_setup)
        self.link.route(device_topic(self.topics, device), self._on_message)
        self.birth = DeviceStatus(device_id=device, online=True).to_payload()

    def _on_setup(self, message) -> None:
        if self.advertised.is_set() or not message.payload:
            return
        setup = SecAggSetup.from_payload(message.payload)
        if self.device not in setup.participants:
            return
        for reply in self.client.receive(setup):
            self.link.publish(self.topics.update(self.device), reply.to_payload(), qos=1)
        self.advertised.set()

    def _on_message(self, message) -> None:
        from fedmq.core.secagg import NeighbourKeys

        if not self.shares or self.client.stage != "keys":
            return
        keys = decode_any(message.payload, NeighbourKeys)
        for reply in self.client.receive(keys):
            self.link.publish(self.topics.update(self.device), reply.to_payload(), qos=1)

    def start(self) -> None:
        self.link.start()
        wait_for(self.link.subscribed.is_set, "the vanisher's subscriptions")
        self.link.publish(self.topics.device_status(self.device), self.birth, qos=1,
                          retain=True)

    def stop(self) -> None:
        self.link.stop()


def test_a_device_that_vanishes_before_sharing_is_excluded_not_fatal(
        broker, tmp_path, stoppers, monkeypatch):
    recorder = Recorder(monkeypatch)
    vanisher = Vanisher(broker.url, "dev9")
    vanisher.start()
    stoppers(vanisher.stop)
    service, _, plain = secure_fleet(broker, tmp_path, stoppers, 5, rounds=1)
    wait_for(vanisher.advertised.is_set, "the vanisher's keys")
    wait_for(service.finished.is_set, "a secure round without the vanisher", timeout=120)
    assert service.failure is None and plain == []
    (result,) = service.secure_sums
    assert "dev9" in result.excluded and "dev9" not in result.survivors
    assert len(result.survivors) == 5
    expected = recorder.plain_sum(result.survivors, result.session, Field(32))
    np.testing.assert_array_equal(result.total, expected)
    assert service.history[-1].participants == 5


def test_an_aggregator_restart_goes_on_with_the_open_secure_round(
        broker, tmp_path, stoppers, monkeypatch):
    """Killed with every input in but the round still open (a device that shared and
    sent nothing holds the inputs stage to its deadline), the aggregator resumes the
    same round from its checkpoint: the same session, the sum exact."""
    recorder = Recorder(monkeypatch)
    vanisher = Vanisher(broker.url, "dev9", shares=True)
    vanisher.start()
    stoppers(vanisher.stop)
    settings = dict(rounds=1, deadline_s=8.0)
    service, agents, _ = secure_fleet(broker, tmp_path, stoppers, 4, **settings)
    wait_for(lambda: service.secure.counts["sa.input:accepted"] >= 4, "four masked inputs")
    wait_for(lambda: all(len(a.outbox) == 0 for a in agents), "their receipts")
    session = service.secure.server.setup.session
    assert not service.finished.is_set()
    service.stop()
    again = make_aggregator(broker.url, tmp_path, stoppers, min_updates=3,
                            **{**SECURE, **settings})
    wait_for(again.finished.is_set, "the resumed secure round", timeout=120)
    assert again.failure is None
    (result,) = again.secure_sums
    assert result.session == session  # the same round, not a new one
    assert sorted(result.survivors) == [a.config.device_id for a in agents]
    assert result.dropped == ("dev9",)  # shared, sent nothing: its masks were removed
    expected = recorder.plain_sum(result.survivors, result.session, Field(32))
    np.testing.assert_array_equal(result.total, expected)


def test_a_plain_update_is_refused_unread_in_secure_mode(broker, tmp_path, stoppers):
    # two devices not configured for secure aggregation: they send plain updates, and
    # never join the secure round they are planned into (excluded at the keys deadline)
    agents = make_agents(broker.url, stoppers, 2, first=10, total=12)
    service, _, plain = secure_fleet(broker, tmp_path, stoppers, 5, rounds=1)
    wait_for(lambda: service.rejected["secure_only"] >= 1, "a refused plain update")
    wait_for(lambda: sum(a.stats.receipts["rejected"] for a in agents) >= 1,
             "the refusal's receipt")
    assert plain == []
    wait_for(service.finished.is_set, "the secure round of the secure devices", timeout=120)


def test_a_secure_round_runs_through_the_production_acls(tmp_path, pki, stoppers):
    """broker_config/acl.conf with TLS and passwords: devices read only their own
    secagg/{device}/in and the setup, and answer on their own update topic."""
    from tests.secure_brokers import AGGREGATOR, enrolled_agents, production_broker

    devices = [0, 1, 2, 3]
    passwords = {AGGREGATOR: "pw-agg", **{f"dev{i}": f"pw-{i}" for i in devices}}
    broker = production_broker(tmp_path / "broker", pki, passwords=passwords)
    broker.mosquitto.start()
    stoppers(broker.mosquitto.close)
    agents = enrolled_agents(broker, stoppers, devices, total=4, secure_aggregation=True)
    for agent in agents:
        wait_for(agent.link.subscribed.is_set, "the agents' subscriptions")
    service = make_aggregator(broker.password_url, tmp_path, stoppers, rounds=1,
                              min_updates=3, client_id=AGGREGATOR,
                              **broker.login(AGGREGATOR), **SECURE)
    wait_for(service.finished.is_set, "a secure round through the ACLs", timeout=120)
    (result,) = service.secure_sums
    assert len(result.survivors) == 4 and not service.rejected
    wait_for(lambda: all(a.stats.receipts["accepted"] >= 1 for a in agents),
             "receipts for the masked inputs")


# -- without a broker ------------------------------------------------------------------
def config(**overrides) -> AggregatorConfig:
    return AggregatorConfig(task="digits", model="mlp", hidden=16, **{**SECURE, **overrides})


@pytest.mark.parametrize("setting", [
    dict(aggregation="median"), dict(aggregation="trimmed_mean"),
    dict(dp_noise_multiplier=1.0), dict(mode="async"), dict(role="worker"),
    dict(partial_sources="w1"), dict(max_update_norm=3.0), dict(norm_policy="reject"),
    dict(late_updates="fold"),
])
def test_settings_that_need_individual_updates_are_refused_at_load(setting):
    with pytest.raises(ConfigError, match="secure_aggregation cannot be combined"):
        config(**setting)


@pytest.mark.parametrize("setting", [
    dict(secagg_clip=0.0), dict(secagg_dropout=1.0), dict(secagg_field_bits=8),
    dict(secagg_stage_s=0.0), dict(secagg_weight_cap=-1),
])
def test_bad_secure_settings_are_refused(setting):
    with pytest.raises(ConfigError):
        config(**setting)


def test_a_restarted_device_is_left_out_of_the_round_it_lost_its_secrets_of():
    c = config()
    rounds = SecureRounds(c, topics=FleetTopics("test"), params=4)
    devices = [f"d{i}" for i in range(5)]
    publishes = rounds.open(1, devices, weight_cap=10, now=0.0)
    setup = SecAggSetup.from_payload(publishes[0].payload)
    clients = {d: SecAggClient(d) for d in devices}
    nkeys = {}

    def advertise(d, client, now):
        (keys,) = client.receive(setup)
        received = rounds.receive(d, keys.to_payload(), now=now)
        for p in received.publishes:
            nkeys[p.topic] = p.payload
        return received

    for d in devices[:4]:
        assert advertise(d, clients[d], 0.0).status == "accepted"
    # d0 restarts: a fresh client advertises other keys for the same round
    assert advertise("d0", SecAggClient("d0"), 0.1).status == "duplicate"
    assert advertise("d4", clients["d4"], 0.2).status == "accepted"  # the stage closes
    from fedmq.core.secagg import NeighbourKeys

    shares = {d: clients[d].receive(decode_any(nkeys[device_topic(rounds.topics, d)],
                                               NeighbourKeys))[0] for d in devices}
    # whatever it shares now (made with keys its neighbours never saw) is not taken
    assert rounds.receive("d0", shares["d0"].to_payload(), now=0.3).reason == \
        "secagg_restarted"
    for d in devices[1:]:
        assert rounds.receive(d, shares[d].to_payload(), now=0.3).status == "accepted"
    rounds.tick(now=10.0)  # the shares stage closes without d0: it is excluded
    assert rounds.active and rounds.server.stage == "inputs"


@given(st.lists(st.tuples(st.lists(st.floats(-2, 2), min_size=3, max_size=3),
                          st.integers(1, 500)), min_size=1, max_size=6),
       st.sampled_from([0, 50, 1000]))
def test_the_weighted_mean_rides_inside_the_sum(updates, cap):
    clip = 0.5
    total = sum(weighted_vector(np.array(d), n, clip=clip, weight_cap=cap)
                for d, n in updates)
    mean, weight, _ = weighted_mean(total, clip=clip, weight_cap=cap)
    w = np.array([1.0 if cap == 0 else min(n, cap) / cap for _, n in updates])
    clipped = np.clip(np.array([d for d, _ in updates]), -clip, clip)
    np.testing.assert_allclose(mean, (w[:, None] * clipped).sum(0) / w.sum(), atol=1e-5)
    assert weight == pytest.approx(w.sum())
    every = weighted_vector(np.array(updates[0][0]), updates[0][1], clip=clip, weight_cap=cap)
    assert np.all(np.abs(every) <= clip)  # inside the quantizer's range: nothing clipped


def test_devices_and_aggregator_adapters_in_process_whatever_the_order():
    """Without a broker: the setup may come before or after training, a re-sent masked
    input counts once, an older setup is ignored."""
    from edge_agent.secure import SecureDevice

    topics = FleetTopics("test")
    rounds = SecureRounds(config(), topics=topics, params=3)
    names = [f"d{i}" for i in range(4)]
    inbox: list[tuple[str, bytes]] = []  # (device, payload) to the aggregator
    inputs: dict[str, bytes] = {}

    def device(name):
        def publish(message):
            inbox.append((name, message.to_payload()))
            return 1

        def queue_input(message):
            inputs[name] = message.to_payload()
            return publish(message)

        return SecureDevice(device_id=name, topics=topics, publish=publish,
                            queue_input=queue_input)

    devices = {n: device(n) for n in names}
    deltas = {n: np.full(3, 0.1 * (i + 1)) for i, n in enumerate(names)}
    devices["d0"].submit(1, deltas["d0"], 10)  # trained before the setup came
    (setup,) = rounds.open(1, names, weight_cap=10, now=0.0)
    for n in names:
        devices[n].on_setup(setup.payload)
        devices[n].on_setup(setup.payload)  # a second delivery changes nothing
    for n in names[1:]:
        devices[n].submit(1, deltas[n], 10)
    receipts = []
    while inbox:
        name, payload = inbox.pop(0)
        received = rounds.receive(name, payload, now=1.0)
        # the round closes as soon as it can unmask: later reveals are stragglers
        assert received.status == "accepted" or received.reason == "secagg_round_closed"
        if received.input_id:
            receipts.append(received)
            again = rounds.receive(name, payload, now=1.0)  # a re-send: counted once
            assert (again.status, again.reason) == ("accepted", "secagg_resent")
        for p in received.publishes:
            devices[p.topic.split("/")[-2]].on_message(p.payload)
    outcome = rounds.take()
    assert outcome is not None and not isinstance(outcome, Exception)
    assert sorted(outcome.survivors) == names and len(receipts) == 4
    np.testing.assert_allclose(outcome.mean, np.full(3, 0.25), atol=1e-6)
    # an older round's setup is ignored by a device that has seen a newer one
    old = dataclasses_replace_round(setup.payload, 0)
    assert devices["d1"].on_setup(old) == 0 and devices["d1"].round == 1


def dataclasses_replace_round(payload: bytes, round: int) -> bytes:
    import dataclasses

    return dataclasses.replace(SecAggSetup.from_payload(payload), round=round).to_payload()


def test_secure_aggregation_and_he_are_refused_together():
    from aggregator.config import AggregatorConfig
    from edge_agent.config import AgentConfig
    from fedmq.errors import ConfigError

    with pytest.raises(ConfigError, match="he = ckks"):
        AggregatorConfig(secure_aggregation=True, he="ckks", min_updates=3)
    with pytest.raises(ConfigError, match="two ways of hiding"):
        AgentConfig(secure_aggregation=True, he_context="he-public.ctx")
