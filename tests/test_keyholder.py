"""The HE key holder's core (fedmq/core/keyholder.py): which sums it decrypts, once per
round; its messages; and the aggregator's sealed round (aggregator/he_round.py) with a
key holder and no secret key. The refusal tests need no TenSEAL (a stand-in decryptor);
the round tests use real CKKS keys."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.core import he
from fedmq.core.keyholder import KeyHolder, KeyHolderPolicy
from fedmq.core.protocol import DecryptReply, DecryptRequest
from fedmq.errors import ConfigError, FedmqError, ProtocolError

FP = "00112233aabbccdd"
SIZE = 5


class StandIn:
    """A decryptor that 'decrypts' by reading the ciphertext bytes as float64 values."""

    fingerprint = FP
    params = he.CkksParams(poly_modulus_degree=8192)

    def __init__(self) -> None:
        self.calls = 0

    def decrypt(self, blobs, *, size, count, min_count):
        self.calls += 1
        if count < min_count:
            raise FedmqError("too few")
        total = np.frombuffer(b"".join(blobs), dtype="<f8")
        return he.unpack(total, size)


def request(round: int = 1, *, count: int = 3, lineage: str = "line", key: str = FP,
            values: tuple[float, ...] = (1, 2, 3, 4, 5, 6), size: int = SIZE,
            blobs: int = 1) -> DecryptRequest:
    data = np.asarray(values, dtype="<f8").tobytes()
    return DecryptRequest(lineage=lineage, round=round, key=key, size=size, count=count,
                          devices=[f"d{i}" for i in range(count)],
                          ciphertexts=[data] * blobs)


def holder(min_count: int = 3) -> KeyHolder:
    return KeyHolder(StandIn(), KeyHolderPolicy(min_count=min_count))


def test_a_sum_of_enough_updates_is_decrypted_and_bound_to_its_request():
    kh = holder()
    req = request()
    reply = kh.answer(req)
    assert reply.status == "ok" and reply.reason == ""
    assert np.frombuffer(reply.weighted, "<f8").tolist() == [1, 2, 3, 4, 5]
    assert reply.weight == 6.0
    assert (reply.round, reply.lineage, reply.digest) == (1, "line", req.digest())
    assert kh.decrypted == 1 and not kh.refused


@pytest.mark.parametrize(("req", "reason"), [
    (request(count=2), "too_few"),
    (request(key="ffffffffffffffff"), "wrong_key"),
    (request(blobs=2), "bad_shape"),
])
def test_a_sum_it_must_not_decrypt_is_refused_counted_and_never_decrypted(req, reason):
    kh = holder()
    reply = kh.answer(req)
    assert (reply.status, reply.reason) == ("refused", reason)
    assert reply.weighted == b"" and reply.message
    assert kh.refused == {reason: 1} and kh.decrypted == 0
    assert kh.decryptor.calls == 0


def test_each_round_is_decrypted_once_in_order_and_the_same_sum_is_answered_again():
    kh = holder()
    assert kh.answer(request(3)).status == "ok"
    # the very same sum again (a lost reply, a restarted aggregator): answered again
    again = kh.answer(request(3))
    assert again.status == "ok" and kh.decrypted == 2
    # another sum for the same round: that would reveal the difference of two sums
    other = kh.answer(request(3, values=(9, 9, 9, 9, 9, 6)))
    assert other.reason == "different_sum"
    # an older round
    assert kh.answer(request(2)).reason == "replayed"
    # the next round, and another lineage's round 1, go on
    assert kh.answer(request(4)).status == "ok"
    assert kh.answer(request(1, lineage="fresh")).status == "ok"
    assert kh.refused == {"different_sum": 1, "replayed": 1}


def test_what_it_decrypted_survives_a_restart_through_its_state():
    kh = holder()
    kh.answer(request(5))
    kh.answer(request(1))
    restarted = holder()
    restarted.load_state_dict(kh.state_dict())
    assert restarted.answer(request(5, values=(0, 0, 0, 0, 0, 6))).reason == "different_sum"
    assert restarted.answer(request(4)).reason == "replayed"
    assert restarted.answer(request(5)).status == "ok"
    assert restarted.refused["replayed"] == 1 + kh.refused["replayed"]
    with pytest.raises(ConfigError, match="state format"):
        restarted.load_state_dict({"format": 99})


def test_a_decryptor_failure_is_a_refusal_not_a_crash():
    class Broken(StandIn):
        def decrypt(self, blobs, **_):
            raise ValueError("not a ciphertext")

    kh = KeyHolder(Broken(), KeyHolderPolicy(min_count=2))
    reply = kh.answer(request())
    assert (reply.status, reply.reason) == ("refused", "undecryptable")
    assert "not a ciphertext" in reply.message


def test_the_policy_refuses_a_minimum_of_one():
    with pytest.raises(ConfigError, match=">= 2"):
        KeyHolderPolicy(min_count=1)


def test_messages_round_trip_and_refuse_what_cannot_be():
    req = request()
    assert DecryptRequest.from_payload(req.to_payload()) == req
    reply = holder().answer(req)
    assert DecryptReply.from_payload(reply.to_payload()) == reply
    with pytest.raises(ProtocolError):
        DecryptReply(lineage="l", round=1, digest=b"x" * 32, status="refused")  # no reason
    with pytest.raises(ProtocolError):
        DecryptReply(lineage="l", round=1, digest=b"x" * 31, status="ok")
    with pytest.raises(ProtocolError):
        DecryptRequest(lineage="l", round=1, key=FP, size=3, count=1, devices=["a", "b"],
                       ciphertexts=[b"x"])
    with pytest.raises(ProtocolError):
        DecryptRequest(lineage="l", round=1, key=FP, size=3, count=2, devices=[],
                       ciphertexts=[])


# -- with real CKKS keys -----------------------------------------------------------------

@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    pytest.importorskip("tenseal")
    from fedmq.keyfiles import generate_he_keys

    public, secret, _ = generate_he_keys(tmp_path_factory.mktemp("he"),
                                         he.CkksParams(poly_modulus_degree=4096, clip_norm=10.0))
    return str(public), str(secret)


def test_the_aggregator_with_a_key_holder_has_no_secret_key(keys):
    from aggregator.he_round import load_setup

    setup = load_setup(keys[0], "")
    assert setup.remote and setup.decryptor is None
    assert not setup.key.context.is_private()
    assert not setup.key.context.has_secret_key()
    with pytest.raises(ConfigError, match="must not have it"):
        load_setup(keys[1], "")  # the secret file given as the public one


def test_a_sealed_round_takes_no_update_and_closes_on_the_key_holders_sum(keys):
    from aggregator.he_round import EncryptedMean, load_setup
    from aggregator.keyholder import KeyHolderConfig

    setup = load_setup(keys[0], "")
    rule = EncryptedMean(SIZE, setup=setup, min_count=2)
    deltas = [np.array([0.1, -0.2, 0.3, 0.0, 1.0]), np.array([0.3, 0.2, -0.1, 0.5, 0.0])]
    for delta, weight in zip(deltas, (10.0, 30.0), strict=True):
        rule.add_encoded(setup.key.encrypt(delta, weight), weight)
    req = rule.seal(lineage="line", round=1, devices=("a", "b"))
    assert rule.awaiting and req.count == 2 and req.key == setup.key.fingerprint
    with pytest.raises(ProtocolError) as late:
        rule.add_encoded(setup.key.encrypt(deltas[0], 1.0), 1.0)
    assert late.value.reason == "round_closing" and rule.count == 2
    # a restart: the sealed sum is restored sealed, and asks for the same sum again
    resumed = EncryptedMean(SIZE, setup=setup, min_count=2)
    resumed.load_state_dict(rule.state_dict())
    assert resumed.awaiting
    assert resumed.seal(lineage="line", round=1, devices=("a", "b")).digest() == req.digest()

    config = KeyHolderConfig(he_secret_context=keys[1], min_updates=2)
    kh = KeyHolder(config.decryptor(), config.policy())
    resumed.resolve(kh.answer(req))
    expected = (deltas[0] * 10 + deltas[1] * 30) / 40
    assert np.allclose(resumed.result(), expected, atol=1e-3)
    assert resumed.refusal() == ""


def test_a_refusal_from_the_key_holder_refuses_the_round(keys):
    from aggregator.he_round import EncryptedMean, load_setup

    setup = load_setup(keys[0], "")
    rule = EncryptedMean(SIZE, setup=setup, min_count=2)
    for _ in range(2):
        rule.add_encoded(setup.key.encrypt(np.ones(SIZE), 1.0), 1.0)
    req = rule.seal(lineage="line", round=1, devices=("a", "b"))
    rule.resolve(DecryptReply(lineage="line", round=1, digest=req.digest(), status="refused",
                              reason="replayed", message="round 2 was decrypted already"))
    assert not rule.result().any()
    assert "replayed" in rule.refusal()


def test_a_round_short_of_the_minimum_is_never_sealed(keys):
    from aggregator.he_round import EncryptedMean, load_setup

    setup = load_setup(keys[0], "")
    rule = EncryptedMean(SIZE, setup=setup, min_count=2)
    rule.add_encoded(setup.key.encrypt(np.ones(SIZE), 1.0), 1.0)
    with pytest.raises(FedmqError, match="not sent for decryption"):
        rule.seal(lineage="line", round=1, devices=("a",))
    assert not rule.sealed


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.integers(1, 4), st.integers(0, 2),
                          st.integers(1, 4)), max_size=25))
def test_whatever_is_asked_each_round_yields_at_most_one_sum_in_order(asks):
    """Any sequence of requests (lineage, round, which sum, count): per lineage, the sums
    decrypted are one per round, in non-decreasing round order, each of enough updates."""
    kh = holder(min_count=2)
    decrypted: dict[str, list[tuple[int, bytes]]] = {}
    for lineage, round, variant, count in asks:
        req = request(round, lineage=lineage, count=count,
                      values=(variant, 0, 0, 0, 0, 1))
        reply = kh.answer(req)
        if reply.status == "ok":
            assert count >= 2
            decrypted.setdefault(lineage, []).append((round, reply.digest))
    for sums in decrypted.values():
        rounds = [r for r, _ in sums]
        assert rounds == sorted(rounds)
        assert all(len({d for r, d in sums if r == round}) == 1 for round in set(rounds))
    assert kh.decrypted == sum(map(len, decrypted.values()))
    assert kh.decrypted + sum(kh.refused.values()) == len(asks)
