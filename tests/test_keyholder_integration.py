"""he = "ckks" with a separate key holder over a real mosquitto: the aggregator holds the
public key only, sends each round's encrypted sum to `fedmq keyholder` and closes the
round on its answer; the run survives the key holder being killed and restarted, and the
aggregator being restarted with a round awaiting decryption."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys

import pytest

from fedmq import __version__, storage
from simulator.broker import free_port
from tests.helpers import make_agents, make_aggregator, scrape, wait_for

pytest.importorskip("tenseal")
pytestmark = pytest.mark.integration

ROUNDS = 5
FEDMQ = [sys.executable, "-m", "fedmq.cli"]


@pytest.fixture
def keys(tmp_path):
    from fedmq.core.he import CkksParams
    from fedmq.keyfiles import generate_he_keys

    # A clip norm no honest update reaches, as in test_he_integration: the encrypted run
    # must match the plain one to CKKS precision.
    public, secret, _ = generate_he_keys(tmp_path / "keys", CkksParams(clip_norm=1e3))
    return str(public), str(secret)


def test_digits_trains_with_a_key_holder_process_killed_and_restarted_mid_run(
        broker, tmp_path, stoppers, processes, keys):
    public, secret = keys
    (tmp_path / "plain").mkdir()
    plain = make_aggregator(broker.url, tmp_path / "plain", stoppers, fleet="plain",
                            rounds=ROUNDS, client_id="agg-plain")
    plain_devices = make_agents(broker.url, stoppers, 3, fleet="plain")
    wait_for(plain.finished.is_set, f"{ROUNDS} plain rounds", timeout=180)
    for device in plain_devices:
        device.stop()

    state = tmp_path / "keyholder.state"
    keyholder = [*FEDMQ, "keyholder", "--broker", broker.url, "--fleet", "he",
                 "--he-secret-context", secret, "--min-updates", "3", "--state", str(state),
                 "--log-level", "WARNING"]
    processes.append(subprocess.Popen(keyholder))
    aggregator = make_aggregator(broker.url, tmp_path, stoppers, fleet="he", rounds=ROUNDS,
                                 client_id="agg-he", he="ckks", he_public_context=public,
                                 he_keyholder_timeout_s=2.0)
    he = aggregator.machine.policy.he
    assert aggregator.he_remote and he.decryptor is None
    assert not he.key.context.is_private()  # this process cannot decrypt anything
    devices = make_agents(broker.url, stoppers, 3, fleet="he", he_context=public)
    wait_for(lambda: len(aggregator.history) >= 2, "two rounds decrypted by the key holder",
             timeout=180)
    processes[0].send_signal(signal.SIGKILL)
    processes[0].wait(30)
    wait_for(lambda: aggregator.he_timeouts >= 1, "the aggregator to miss the key holder",
             timeout=120)
    processes.append(subprocess.Popen(keyholder))
    wait_for(aggregator.finished.is_set, f"{ROUNDS} rounds", timeout=180)

    rounds = aggregator.history
    assert [r.round for r in rounds] == list(range(1, ROUNDS + 1))
    assert all(r.participants == 3 for r in rounds)
    assert abs(rounds[-1].accuracy - plain.history[-1].accuracy) < 0.02
    assert aggregator.he_counters()["refused"] == 0
    assert len(aggregator.he_hops) == ROUNDS
    assert all(d.stats.codecs["ckks"] == d.stats.updates_sent for d in devices)
    saved = storage.load_state(state)  # the restarted key holder went on from its state
    assert saved["last"][aggregator.lineage][0] == ROUNDS


def test_a_restarted_aggregator_asks_again_for_the_round_it_sealed(broker, tmp_path, stoppers,
                                                                   keys, caplog):
    from aggregator.keyholder import KeyHolderConfig, KeyHolderService

    public, secret = keys
    settings = dict(fleet="he", rounds=2, client_id="agg-he", he="ckks",
                    he_public_context=public, he_keyholder_timeout_s=1.0)
    first = make_aggregator(broker.url, tmp_path, stoppers, **settings)
    make_agents(broker.url, stoppers, 3, fleet="he", he_context=public)
    with caplog.at_level(logging.WARNING, logger="aggregator.he_service"):
        wait_for(lambda: first.he_timeouts >= 1, "a round sealed with no key holder",
                 timeout=120)
    assert first.machine.acc.sealed and not first.history
    assert "no answer from the key holder" in caplog.text
    first.stop()

    second = make_aggregator(broker.url, tmp_path, stoppers, **settings)
    assert second.machine.acc.sealed  # restored from the checkpoint, still awaiting
    port = free_port()
    keyholder = KeyHolderService(KeyHolderConfig(
        broker=broker.url, fleet="he", he_secret_context=secret, min_updates=3,
        state=str(tmp_path / "keyholder.state"), metrics_port=port))
    keyholder.start()
    stoppers(keyholder.stop)
    wait_for(second.finished.is_set, "both rounds", timeout=180)
    assert [r.round for r in second.history] == [1, 2]
    assert all(r.participants == 3 for r in second.history)
    assert keyholder.holder.refused == {}
    assert second.he_counters()["refused"] == 0
    decrypted = scrape(port)[("fedmq_keyholder_decryptions_total", ())]
    assert decrypted == keyholder.holder.decrypted >= 2  # a repeat of a sum counts again


def test_the_key_holders_counters_are_served_to_prometheus(broker, tmp_path, stoppers, caplog):
    """metrics_port: decryptions, refusals by reason (every reason, 0 included) and
    malformed requests, read from the running key holder; a secret key others may read is
    warned about."""
    pytest.importorskip("prometheus_client")
    from aggregator.keyholder import KeyHolderConfig, KeyHolderService
    from fedmq.core import he
    from fedmq.core.keyholder import REFUSALS
    from fedmq.core.protocol import DecryptRequest, FleetTopics
    from fedmq.keyfiles import generate_he_keys
    from fedmq.transport.mqtt import MqttLink

    _, secret, fingerprint = generate_he_keys(
        tmp_path / "keys", he.CkksParams(poly_modulus_degree=4096, clip_norm=10.0))
    secret.chmod(0o640)
    port = free_port()
    with caplog.at_level(logging.WARNING, logger="fedmq.keyfiles"):
        keyholder = KeyHolderService(KeyHolderConfig(
            broker=broker.url, fleet="khm", he_secret_context=str(secret), min_updates=3,
            state=str(tmp_path / "keyholder.state"), metrics_port=port))
    assert "readable by others (mode 640): chmod 600 it" in caplog.text
    keyholder.start()
    stoppers(keyholder.stop)
    first = scrape(port)
    assert first[("fedmq_keyholder_decryptions_total", ())] == 0
    assert {reason: first[("fedmq_keyholder_refusals_total", (("reason", reason),))]
            for reason in REFUSALS} == dict.fromkeys(REFUSALS, 0)
    assert first[("fedmq_keyholder_info", (("fedmq_version", __version__), ("fleet", "khm"),
                                           ("key", fingerprint)))] == 1

    def ask(key: str, count: int) -> bytes:
        return DecryptRequest(lineage="l", round=1, key=key, size=5, count=count,
                              devices=[], ciphertexts=[b"x"]).to_payload()

    sender = MqttLink(client_id="khm-aggregator", broker=broker.url)
    sender.start()
    stoppers(sender.stop)
    sender.wait_connected(30)
    topic = FleetTopics("khm").he_decrypt
    for payload in (ask("ffffffffffffffff", 3), ask(fingerprint, 2), b"not msgpack"):
        sender.publish(topic, payload, qos=1)
    wait_for(lambda: scrape(port)[("fedmq_keyholder_malformed_total", ())] == 1,
             "the three requests counted")
    last = scrape(port)
    assert last[("fedmq_keyholder_refusals_total", (("reason", "wrong_key"),))] == 1
    assert last[("fedmq_keyholder_refusals_total", (("reason", "too_few"),))] == 1
    assert last[("fedmq_keyholder_decryptions_total", ())] == 0
