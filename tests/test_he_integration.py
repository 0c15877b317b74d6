"""he = "ckks" over a real mosquitto: devices encrypt, the aggregator sums ciphertexts
(chunked uploads: one ciphertext is larger than max_payload), the secret key decrypts
the sum (here in the aggregator, he_decrypt = local; with a separate key holder in
test_keyholder_integration.py and the simulator test below), and digits trains to the
plain run's accuracy."""

import pytest

from tests.helpers import make_agents, make_aggregator, wait_for

pytest.importorskip("tenseal")
pytestmark = pytest.mark.integration

ROUNDS = 5


def test_digits_trains_with_encrypted_updates_to_the_plain_accuracy(broker, tmp_path,
                                                                    stoppers):
    from fedmq.core.he import CkksParams
    from fedmq.keyfiles import generate_he_keys

    # A clip norm no honest update reaches: the encrypted run must match the plain one
    # to CKKS precision, so any loss of accuracy would be the encryption's.
    public, secret, _ = generate_he_keys(tmp_path / "keys", CkksParams(clip_norm=1e3))
    (tmp_path / "plain").mkdir()
    plain = make_aggregator(broker.url, tmp_path / "plain", stoppers, fleet="plain",
                            rounds=ROUNDS, client_id="agg-plain")
    plain_devices = make_agents(broker.url, stoppers, 3, fleet="plain")
    wait_for(plain.finished.is_set, f"{ROUNDS} plain rounds", timeout=180)
    for device in plain_devices:  # the encrypted fleet's devices take their client ids
        device.stop()
    encrypted = make_aggregator(broker.url, tmp_path, stoppers, fleet="he", rounds=ROUNDS,
                                client_id="agg-he", he="ckks", he_public_context=str(public),
                                he_secret_context=str(secret))
    devices = make_agents(broker.url, stoppers, 3, fleet="he", he_context=str(public))
    # a device without the fleet's key: its plain updates are refused, never summed
    rogue = make_agents(broker.url, stoppers, 1, total=4, first=3, fleet="he")[0]
    wait_for(encrypted.finished.is_set, f"{ROUNDS} encrypted rounds", timeout=180)

    he_rounds, plain_rounds = encrypted.history, plain.history
    assert [r.round for r in he_rounds] == list(range(1, ROUNDS + 1))
    assert all(r.participants == 3 for r in he_rounds)
    assert plain_rounds[-1].accuracy > 0.7
    assert abs(he_rounds[-1].accuracy - plain_rounds[-1].accuracy) < 0.02
    # ciphertexts went up in parts: each is far larger than the plain update and than
    # one MQTT message
    assert min(r.bytes_up for r in he_rounds) > 3 * 128 * 1024
    assert encrypted.rejected["not_encrypted"] >= 1
    assert rogue.stats.receipts["rejected"] >= 1
    assert all(d.stats.receipts["accepted"] >= ROUNDS - 1 for d in devices)
    assert all(d.stats.codecs["ckks"] == d.stats.updates_sent for d in devices)


def test_simulate_he_ckks_makes_the_runs_keys_and_trains(tmp_path):
    from simulator.fleet import Simulation, SimulationConfig

    config = SimulationConfig(devices=3, rounds=3, model="logreg", he="ckks", timeout_s=120)
    with Simulation(config, workdir=tmp_path / "sim") as sim:
        result = sim.wait()
        public, secret = sim.he_keys
        # the split: the aggregator holds the public key only, the key holder decrypted
        he = sim.aggregator.machine.policy.he
        assert sim.aggregator.he_remote and he.decryptor is None
        assert not he.key.context.is_private() and not he.key.context.has_secret_key()
        assert sim.aggregator.config.he_secret_context == ""
        assert sim.keyholder is not None and sim.keyholder.holder.decrypted == 3
        assert sim.keyholder.holder.decryptor.context.is_private()
        assert len(sim.aggregator.he_hops) == 3
        assert all(a.trainer.encryptor is not None for a in sim.agents)
        assert all(a.stats.codecs["ckks"] == a.stats.updates_sent for a in sim.agents)
    assert public.endswith("he-public.ctx") and secret.endswith("he-secret.ctx")
    assert [r.round for r in result.rounds] == [1, 2, 3]
    assert result.final_accuracy > 0.6
