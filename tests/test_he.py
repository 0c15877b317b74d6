"""he = "ckks": packing math, encrypt / sum / decrypt against the plain sum, what the
aggregator's key can and cannot do, the round machine over ciphertexts, key files and
the configurations refused (no broker; tests/test_he_integration.py has the broker)."""

import os
import stat

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedmq.core import he
from fedmq.core.protocol import EncodedTensor, Update
from fedmq.errors import ConfigError, FedmqError, ProtocolError

pytest.importorskip("tenseal")

# CKKS error bound on a sum of a few updates (measured ~1e-7 at N = 8192, ~1e-3 at 4096)
TOLERANCE = {8192: 1e-5, 4096: 2e-2}


@pytest.fixture(scope="module", params=[8192, 4096])
def keys(request):
    public, secret = he.create_keys(he.CkksParams(poly_modulus_degree=request.param,
                                                  clip_norm=1e6))
    return he.PublicKey(public), he.Decryptor(secret), public, secret


@pytest.fixture(scope="module")
def keys8k():
    public, secret = he.create_keys(he.CkksParams(clip_norm=3.0))
    return he.PublicKey(public), he.Decryptor(secret), public, secret


# -- packing (no encryption) ----------------------------------------------------------------
vectors = hnp.arrays(np.float64, st.integers(1, 300),
                     elements=st.floats(-100, 100, allow_nan=False))


@given(vectors, st.floats(0.01, 1e4), st.floats(0.01, 100))
def test_pack_is_weight_times_clipped_delta_then_the_weight(delta, weight, clip_norm):
    packed = he.pack(delta, weight, clip_norm)
    weighted, w = he.unpack(packed, delta.size)
    assert w == weight
    clipped = weighted / weight
    assert np.linalg.norm(clipped) <= clip_norm * (1 + 1e-9)
    if np.linalg.norm(delta) <= clip_norm:  # under the bound: untouched
        assert np.allclose(clipped, delta)
    else:  # above: scaled along the same direction
        assert np.allclose(clipped * np.linalg.norm(delta) / clip_norm, delta)


@given(st.lists(st.tuples(hnp.arrays(np.float64, 7, elements=st.floats(-100, 100)),
                          st.integers(1, 1000)), min_size=1, max_size=8))
def test_the_mean_of_packed_sums_is_the_weighted_mean(updates):
    total = sum(he.pack(d, w, 1e9) for d, w in updates)
    weighted, weight = he.unpack(total, 7)
    claimed = sum(w for _, w in updates)
    expect = sum(d * w for d, w in updates) / claimed
    assert np.allclose(he.mean_of(weighted, weight, claimed=claimed), expect, atol=1e-4)


def test_a_total_weight_unlike_the_claims_is_refused():
    with pytest.raises(FedmqError, match="weighted unlike its claim"):
        he.mean_of(np.ones(3), 31.0, claimed=30)
    with pytest.raises(FedmqError):
        he.mean_of(np.ones(3), float("nan"), claimed=30)


def test_bad_inputs_to_pack_are_refused():
    with pytest.raises(FedmqError, match="not finite"):
        he.pack(np.array([np.nan]), 1.0, 1.0)
    with pytest.raises(FedmqError, match="weight"):
        he.pack(np.ones(2), 0.0, 1.0)
    with pytest.raises(ConfigError, match="clip_norm"):
        he.CkksParams(clip_norm=0)
    with pytest.raises(ConfigError, match="poly_modulus_degree"):
        he.CkksParams(poly_modulus_degree=2048)


# -- encrypt, sum without the secret key, decrypt --------------------------------------------
def encrypted_mean(key, decryptor, updates, size):
    total = he.CiphertextSum(key, size)
    for delta, weight in updates:
        total.add(key.encrypt(delta, weight))
    weighted, weight = decryptor.decrypt(total.to_bytes(), size=size, count=total.count,
                                         min_count=1)
    return weighted, weight


@settings(max_examples=8, deadline=None)
@given(st.integers(1, 9000), st.integers(1, 5), st.integers(0, 2**32 - 1))
def test_decrypted_sum_is_the_plain_sum_within_ckks_precision(keys, size, devices, seed):
    key, decryptor, _, _ = keys
    rng = np.random.default_rng(seed)
    updates = [(rng.normal(0, 0.1, size), int(rng.integers(1, 500))) for _ in range(devices)]
    weighted, weight = encrypted_mean(key, decryptor, updates, size)
    plain = sum(d * w for d, w in updates)
    tol = TOLERANCE[key.params.poly_modulus_degree]
    assert abs(weight - sum(w for _, w in updates)) < tol
    assert np.max(np.abs(weighted - plain)) < tol
    # so the mean matches to well within what training notices
    mean = he.mean_of(weighted, weight, claimed=sum(w for _, w in updates))
    assert np.max(np.abs(mean - plain / sum(w for _, w in updates))) < tol


def test_an_update_spans_as_many_ciphertexts_as_its_packed_size_needs(keys8k):
    key = keys8k[0]
    for size, count in [(1, 1), (4095, 1), (4096, 2), (8191, 2), (8192, 3)]:
        tensor = key.encrypt(np.zeros(size), 1.0)
        assert len(key.open(tensor, size)) == count == he.ciphertext_count(size, key.slots)


def test_the_aggregators_key_cannot_decrypt(keys8k):
    key, _, public, secret = keys8k
    assert not key.context.has_secret_key()
    # even one loaded from the secret file keeps only the public part
    assert not he.PublicKey(secret).context.has_secret_key()
    ct = key.open(key.encrypt(np.ones(5), 2.0), 5)[0]
    with pytest.raises(ValueError, match="secret"):
        ct.decrypt()
    assert b"" not in (public.context,) and len(public.context) < len(secret.context)


def test_the_decryptor_refuses_a_sum_of_too_few_updates(keys8k):
    key, decryptor, _, _ = keys8k
    total = he.CiphertextSum(key, 4)
    total.add(key.encrypt(np.ones(4), 1.0))
    with pytest.raises(FedmqError, match="at least 2"):
        decryptor.decrypt(total.to_bytes(), size=4, count=total.count, min_count=2)
    with pytest.raises(ConfigError, match="no secret key"):
        he.Decryptor(keys8k[2])


def test_foreign_and_malformed_ciphertexts_are_refused_with_a_reason_and_change_nothing(keys8k):
    key, decryptor, _, _ = keys8k
    size = 10
    total = he.CiphertextSum(key, size)
    total.add(key.encrypt(np.full(size, 0.1), 3.0))
    other_public, _ = he.create_keys(he.CkksParams(clip_norm=3.0))
    other = he.PublicKey(other_public)
    small, _ = he.create_keys(he.CkksParams(poly_modulus_degree=4096, clip_norm=3.0))
    good = key.encrypt(np.ones(size), 1.0)
    raw = msgpack.unpackb(good.data)
    cases = {
        "not_encrypted": EncodedTensor(codec="float32", size=size, data=b"\0" * 40),
        "wrong_key": other.encrypt(np.ones(size), 1.0),
        "bad_shape": key.encrypt(np.ones(size + 1), 1.0),
        "malformed": EncodedTensor(codec="ckks", size=size, data=b"garbage"),
    }
    for reason, tensor in cases.items():
        with pytest.raises(ProtocolError) as info:
            total.add(tensor)
        assert info.value.reason == reason, reason
    # a ciphertext of the right key id but another ring, or cut short, does not load
    for blob in (he.PublicKey(small).encrypt(np.ones(size), 1.0).data,):
        forged = msgpack.packb({**msgpack.unpackb(blob),
                                              "fp": key.fingerprint})
        with pytest.raises(ProtocolError):
            total.add(EncodedTensor(codec="ckks", size=size, data=forged))
    cut = msgpack.packb({**raw, "ct": [raw["ct"][0][:1000]]})
    with pytest.raises(ProtocolError) as info:
        total.add(EncodedTensor(codec="ckks", size=size, data=cut))
    assert info.value.reason == "malformed"
    assert total.count == 1
    weighted, weight = decryptor.decrypt(total.to_bytes(), size=size, count=1, min_count=1)
    assert abs(weight - 3.0) < 1e-5 and np.allclose(weighted, 0.3, atol=1e-5)


# -- the round machine over ciphertexts ------------------------------------------------------
def he_machine(setup, *, size, min_updates=2):
    from aggregator.rounds import RoundMachine, RoundPolicy
    from aggregator.strategy.optimizers import ServerOptConfig, create_optimizer

    return RoundMachine(params=np.zeros(size, np.float32),
                        optimizer=create_optimizer(ServerOptConfig()),
                        policy=RoundPolicy(min_updates=min_updates, he=setup),
                        layout_hash="lay", now=0.0)


def he_update(key, device, delta, samples, *, claim=None, uid="u"):
    return Update(device_id=device, update_id=uid, round=1, base_version=0,
                  num_samples=claim or samples, loss=1.0, delta=key.encrypt(delta, samples),
                  layout_hash="lay")


@pytest.fixture(scope="module")
def setup(keys8k):
    from aggregator.he_round import HESetup

    return HESetup(key=keys8k[0], decryptor=keys8k[1])


def test_an_encrypted_round_closes_on_the_weighted_mean_and_checkpoints_only_ciphertexts(setup):
    from aggregator.rounds import Action

    size = 6
    m = he_machine(setup, size=size)
    a, b = np.full(size, 1.0), np.full(size, -0.5)
    m.offer(he_update(setup.key, "a", a * 0.1, 10))
    state = m.state_dict()
    saved = state["open"]["acc"]
    assert saved["rule"] == "ckks" and saved["count"] == 1
    assert all(isinstance(c, bytes) for c in saved["ciphertexts"])
    # a restarted aggregator resumes the encrypted sum from the checkpoint
    m2 = he_machine(setup, size=size)
    m2.load_state_dict(state, now=0.0)
    assert m2.offer(he_update(setup.key, "b", b * 0.1, 30))
    assert m2.due(0.0) is Action.CLOSE
    result = m2.close(0.0)
    assert not result.refused and result.version == 1 and result.samples == 40
    assert np.allclose(m2.params, (10 * 0.1 - 30 * 0.05) / 40, atol=1e-6)


def test_a_plain_update_is_refused_by_an_encrypted_round(setup):
    from fedmq.core import codecs

    m = he_machine(setup, size=4)
    plain = Update(device_id="a", update_id="u", round=1, base_version=0, num_samples=5,
                   loss=1.0, delta=codecs.encode(np.ones(4, np.float32)), layout_hash="lay")
    with pytest.raises(ProtocolError) as info:
        m.offer(plain)
    assert info.value.reason == "not_encrypted" and m.acc.count == 0


def test_a_ciphertext_weighted_unlike_its_claim_refuses_the_round(setup):
    size = 4
    m = he_machine(setup, size=size)
    m.offer(he_update(setup.key, "a", np.full(size, 0.1), 10))
    m.offer(he_update(setup.key, "b", np.full(size, 0.1), 1000, claim=10))  # inflated
    result = m.close(0.0)
    assert "weighted unlike its claim" in result.refused
    assert result.version == 0 and not m.params.any()  # the last good model stays


def test_the_model_guard_still_applies_after_decryption(keys8k):
    from aggregator.he_round import HESetup

    public, secret = he.create_keys(he.CkksParams(clip_norm=1e6))
    setup = HESetup(key=he.PublicKey(public), decryptor=he.Decryptor(secret))
    m = he_machine(setup, size=3)
    m.params = np.full(3, 0.01, np.float32)
    m.offer(he_update(setup.key, "a", np.full(3, 1e4), 1))
    m.offer(he_update(setup.key, "b", np.full(3, 1e4), 1))
    assert "norm" in m.close(0.0).refused


# -- key files ----------------------------------------------------------------------------------
def test_he_init_writes_a_0600_secret_and_a_public_file_devices_can_load(tmp_path):
    from aggregator.he_round import load_setup
    from fedmq.keyfiles import generate_he_keys, load_he_public

    public, secret, fp = generate_he_keys(tmp_path / "k", he.CkksParams(clip_norm=2.0))
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    key = load_he_public(public)
    assert key.fingerprint == fp and key.params.clip_norm == 2.0
    with pytest.raises(ConfigError, match="holds the secret key"):
        load_he_public(secret)
    with pytest.raises(ConfigError, match="already exists"):
        generate_he_keys(tmp_path / "k", he.CkksParams())
    setup = load_setup(str(public), str(secret))
    assert setup.key.fingerprint == fp
    other, _, _ = generate_he_keys(tmp_path / "other", he.CkksParams())
    with pytest.raises(ConfigError, match="not one key pair"):
        load_setup(str(other), str(secret))
    (tmp_path / "junk").write_bytes(b"not a key")
    with pytest.raises(ConfigError, match="he-init"):
        load_he_public(tmp_path / "junk")


def test_keys_he_init_command(tmp_path, capsys):
    from fedmq.cli import main

    assert main(["keys", "he-init", "--out", str(tmp_path), "--clip-norm", "5",
                 "--poly-degree", "4096"]) == 0
    out = capsys.readouterr().out
    assert "he_secret_context" in out and "he_context" in out
    bundle = he.KeyBundle.from_bytes((tmp_path / "he-public.ctx").read_bytes())
    assert bundle.params == he.CkksParams(poly_modulus_degree=4096, clip_norm=5.0)


# -- configurations refused at load -------------------------------------------------------------
@pytest.fixture(scope="module")
def key_files(tmp_path_factory):
    from fedmq.keyfiles import generate_he_keys

    public, secret, _ = generate_he_keys(tmp_path_factory.mktemp("he"), he.CkksParams())
    return str(public), str(secret)


@pytest.mark.parametrize(("settings_", "match"), [
    ({"aggregation": "median"}, "aggregation = median"),
    ({"aggregation": "trimmed_mean"}, "aggregation = trimmed_mean"),
    ({"dp_noise_multiplier": 1.0}, "central DP"),
    ({"mode": "async"}, "mode = sync"),
    ({"late_updates": "fold"}, "late_updates = discard"),
    ({"max_update_norm": 5.0}, "max_update_norm"),
    ({"role": "worker"}, "one central aggregator"),
    ({"role": "site"}, "one central aggregator"),
    ({"partial_sources": "w1"}, "one central aggregator"),
    ({"he_secret_context": "", "he_decrypt": "local"}, "local needs he_secret_context"),
    ({"he_decrypt": "keyholder"}, "must not have the secret key"),
    ({"he_public_context": "", "he_secret_context": ""}, "needs he_public_context"),
    ({"he_decrypt": "remote"}, "he_decrypt 'remote'"),
    ({"he": "paillier"}, "ckks or empty"),
    ({"min_updates": 1}, "min_updates >= 2"),
])
def test_he_refuses_what_it_cannot_do_at_config_load(key_files, settings_, match):
    from aggregator.config import AggregatorConfig

    values = {"he": "ckks", "he_public_context": key_files[0],
              "he_secret_context": key_files[1], **settings_}
    with pytest.raises(ConfigError, match=match):
        AggregatorConfig(**values)


def test_a_good_he_config_loads_with_server_side_bounds_off(key_files):
    from aggregator.config import AggregatorConfig
    from aggregator.ingest import UpdateLimits

    config = AggregatorConfig(he="ckks", he_public_context=key_files[0],
                              he_secret_context=key_files[1], model="logreg")
    limits = UpdateLimits.from_config(config)
    assert limits.norm_factor == 0 and limits.sample_factor == 0 and limits.he is not None
    # one 8192-degree ciphertext is ~230 KB: the plain 9 B/param limit would refuse it
    assert limits.payload_limit(650) > 300_000 > UpdateLimits().payload_limit(650)
    with pytest.raises(ConfigError, match="are for he = ckks"):
        AggregatorConfig(he_secret_context=key_files[1])


def test_simulator_he_flags(key_files):
    from simulator.config import SimulationConfig

    config = SimulationConfig(he="ckks", devices=3)
    assert not config.hosted and config.aggregator_config(
        broker="mqtt://x:1", fleet="f", checkpoint="").he == ""
    for bad, match in [({"aggregation": "median"}, "median"), ({"engine": "hosted"}, "--he"),
                       ({"he_clip_norm": 0.0}, "he_clip_norm"),
                       ({"devices": 1}, "at least 2 devices"),
                       ({"agents_only": True, "broker": "mqtt://x:1", "fleet": "f"},
                        "agents-only")]:
        with pytest.raises(ConfigError, match=match):
            SimulationConfig(**{"he": "ckks", "devices": 3, **bad})
    # with a cohort the simulator closes rounds on 1 update; encrypted ones need 2
    config = SimulationConfig(he="ckks", devices=4, clients_per_round=2)
    aggregator = config.aggregator_config(broker="mqtt://x:1", fleet="f", checkpoint="",
                                          he_keys=key_files)
    assert aggregator.he == "ckks" and aggregator.min_updates == 2


def test_an_encrypting_device_never_falls_back_to_a_plain_codec(keys8k, monkeypatch):
    from fedmq.core.protocol import TaskConfig
    from tests.helpers import trained_digits_delta

    key = keys8k[0]

    def broken(*_args, **_kwargs):
        raise FedmqError("encryption failed")

    monkeypatch.setattr(key, "encrypt", broken)
    with pytest.raises(FedmqError, match="encryption failed"):
        trained_digits_delta(TaskConfig(), encryptor=key)


def test_without_tenseal_the_error_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tenseal", None)  # import tenseal -> ImportError
    with pytest.raises(FedmqError, match=r"fedmq\[he\]"):
        he.create_keys(he.CkksParams())
