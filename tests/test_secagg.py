"""Secure aggregation, pure: field, sharing, masks, graph, messages and whole rounds."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fedmq import storage
from fedmq.core.protocol.wire import decode_any
from fedmq.core.secagg import keys, prg, shamir
from fedmq.core.secagg.client import SecAggClient
from fedmq.core.secagg.field import FIELD_BITS, Field, Quantizer
from fedmq.core.secagg.graph import check_parameters, choose_parameters, neighbour_sets
from fedmq.core.secagg.messages import (
    SECAGG_MESSAGES,
    AdvertiseKeys,
    EncryptedShare,
    MaskedInput,
    RoutedShares,
    SecAggSetup,
    UnmaskRequest,
    UnmaskResponse,
)
from fedmq.core.secagg.server import Handled, SecAggServer, plan_setup
from fedmq.core.secagg.simulate import (
    AFTER_INPUT,
    BEFORE_INPUT,
    BEFORE_KEYS,
    BEFORE_SHARES,
    seeded_entropy,
    simulate_round,
)
from fedmq.errors import ConfigError, MissingExtraError, ProtocolError, SecureAggregationError

SESSION = bytes(range(16))


def devices(n: int) -> list[str]:
    return [f"dev-{i:03d}" for i in range(n)]


def setup_for(n: int, *, size: int = 32, dropout_rate: float = 0.3, seed: int = 0,
              **kw) -> SecAggSetup:
    return plan_setup(devices(n), round=3, vector_size=size, clip=1.0,
                      dropout_rate=dropout_rate, session=bytes([seed]) * 16, **kw)


def field_inputs(setup: SecAggSetup, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {d: rng.integers(0, setup.levels + 1, setup.vector_size, dtype=np.uint64)
            for d in setup.participants}


def drop_some(setup: SecAggSetup, fraction: float, stage: str, seed: int) -> dict[str, str]:
    rng = np.random.default_rng(1000 + seed)
    count = round(fraction * len(setup.participants))
    return {d: stage for d in rng.choice(setup.participants, count, replace=False)}


# -- field and quantization ---------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(FIELD_BITS), seed=st.integers(0, 2**32), size=st.integers(0, 50))
def test_field_addition_wraps_and_subtraction_undoes_it(bits, seed, size):
    field = Field(bits)
    rng = np.random.default_rng(seed)
    a = field.reduce(rng.integers(0, 2**32, size, dtype=np.uint64))
    b = field.reduce(rng.integers(0, 2**32, size, dtype=np.uint64))
    total = field.add(a, b)
    assert (total.astype(np.uint64) == (a.astype(np.uint64) + b) % field.modulus).all()
    assert (field.sub(total, b) == a).all()
    acc = a.copy()
    field.add_into(acc, b)
    field.add_into(acc, b, sign=-1)
    assert (acc == a).all()
    assert (field.from_bytes(field.to_bytes(a), size) == a).all()
    assert len(field.to_bytes(a)) == size * bits // 8


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(FIELD_BITS), summands=st.integers(1, 300),
       clip=st.floats(1e-3, 1e3), seed=st.integers(0, 2**32))
def test_quantized_sum_of_clipped_values_is_exact_up_to_one_step_each(bits, summands, clip,
                                                                      seed):
    field = Field(bits)
    try:
        q = Quantizer.for_summands(summands, clip=clip, field=field)
    except ConfigError:
        assert summands > (field.modulus - 1) // 2  # a grid of one step is refused
        return
    rng = np.random.default_rng(seed)
    values = rng.normal(0, clip, (summands, 8)) * rng.choice([0.1, 3.0])
    total = field.zeros(8)
    for v in values:
        elements = q.quantize(v, rng)
        assert elements.max() <= q.levels
        field.add_into(total, elements)
    assert field.max_summands(q.levels) >= summands  # the sum could not wrap
    clipped = np.clip(values, -clip, clip).sum(axis=0)
    assert np.abs(q.dequantize_sum(total, summands) - clipped).max() <= summands * q.step * 1.0001


def test_stochastic_quantization_is_unbiased():
    q = Quantizer(clip=1.0, levels=4)  # a coarse grid: rounding bias would show
    rng = np.random.default_rng(7)
    value = 0.3  # 2.6 steps above -1
    samples = q.dequantize_sum(q.quantize(np.full(200_000, value), rng), 1)
    assert abs(samples.mean() - value) < 0.005
    with pytest.raises(ProtocolError, match="NaN"):
        q.quantize(np.array([np.nan]), rng)


# -- Shamir ---------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(secret=st.binary(min_size=32, max_size=32), data=st.data())
def test_any_threshold_shares_rebuild_the_secret_and_fewer_do_not(secret, data):
    holders = data.draw(st.lists(st.integers(1, 1000), min_size=2, max_size=12, unique=True))
    threshold = data.draw(st.integers(2, len(holders)))
    shares = shamir.split(secret, threshold=threshold, holders=holders)
    assert all(len(s) == shamir.SHARE_BYTES for s in shares.values())
    subset = data.draw(st.lists(st.sampled_from(holders), min_size=threshold, unique=True))
    assert shamir.combine({x: shares[x] for x in subset}, threshold=threshold) == secret
    with pytest.raises(SecureAggregationError, match="cannot rebuild"):
        shamir.combine({x: shares[x] for x in subset[:threshold - 1]}, threshold=threshold)


def test_a_corrupt_share_does_not_pass_for_the_secret():
    secret = bytes(range(32))
    shares = shamir.split(secret, threshold=2, holders=[1, 2, 3])
    bad = {1: shares[1], 2: bytes(16) + shares[2][16:]}
    try:
        assert shamir.combine(bad, threshold=2) != secret
    except SecureAggregationError as exc:
        assert exc.reason == "bad_share"
    with pytest.raises(ProtocolError):
        shamir.combine({1: shares[1], 2: b"short"}, threshold=2)


# -- masks and keys -----------------------------------------------------------------------

def test_masks_are_deterministic_per_seed_and_separated_by_purpose():
    field = Field(32)
    seed = bytes(range(32))
    a = prg.expand(seed, 1000, field, purpose=prg.PAIR_MASK)
    assert (a == prg.expand(seed, 1000, field, purpose=prg.PAIR_MASK)).all()
    assert (a[:10] == prg.expand(seed, 10, field, purpose=prg.PAIR_MASK)).all()
    assert (a != prg.expand(seed, 1000, field, purpose=prg.SELF_MASK)).mean() > 0.99
    assert (a != prg.expand(bytes(32), 1000, field, purpose=prg.PAIR_MASK)).mean() > 0.99
    small = prg.expand(seed, 1000, Field(16), purpose=prg.PAIR_MASK)
    assert small.max() < 2**16 and (small == a & 0xFFFF).all()


def test_pairwise_seeds_agree_and_shares_open_only_on_their_route():
    a, b = keys.generate_keypair(), keys.generate_keypair()
    assert keys.mask_seed(a, b.public, session=SESSION) == keys.mask_seed(b, a.public,
                                                                          session=SESSION)
    assert keys.mask_seed(a, b.public, session=SESSION) != keys.share_key(a, b.public,
                                                                          session=SESSION)
    assert keys.mask_seed(a, b.public, session=SESSION) != keys.mask_seed(
        a, b.public, session=bytes(16))
    key = keys.share_key(a, b.public, session=SESSION)
    box = keys.encrypt_share(key, b"secret shares", session=SESSION, sender=1, recipient=2)
    assert keys.decrypt_share(key, box, session=SESSION, sender=1, recipient=2) == b"secret shares"
    for route in ({"sender": 2, "recipient": 1}, {"sender": 1, "recipient": 3}):
        with pytest.raises(SecureAggregationError, match="does not decrypt"):
            keys.decrypt_share(key, box, session=SESSION, **route)
    with pytest.raises(SecureAggregationError, match="does not decrypt"):
        keys.decrypt_share(key, box, session=bytes(16), sender=1, recipient=2)
    assert "private" not in repr(a) or a.private.hex() not in repr(a)


def test_without_cryptography_masks_need_the_secure_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.asymmetric.x25519", None)
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.ciphers", None)
    keys._crypto.cache_clear()
    prg._chacha20.cache_clear()
    try:
        with pytest.raises(MissingExtraError, match=r"'cryptography' package: .*fedmq\[secure\]"):
            keys.generate_keypair()
        with pytest.raises(MissingExtraError, match=r"fedmq\[secure\]"):
            prg.expand(bytes(32), 4, Field(32), purpose=prg.SELF_MASK)
        setup_for(10)  # planning a round and its messages need no cryptography
    finally:
        keys._crypto.cache_clear()
        prg._chacha20.cache_clear()


# -- the neighbour graph --------------------------------------------------------------------

@pytest.mark.parametrize(("n", "k"), [(10, 4), (10, 9), (51, 12), (100, 60), (7, 6), (8, 6)])
def test_the_graph_is_symmetric_k_regular_and_fixed_by_the_session(n, k):
    graph = neighbour_sets(n, k, SESSION)
    assert all(len(g) == k and i not in g for i, g in enumerate(graph))
    assert all(i in graph[j] for i, g in enumerate(graph) for j in g)
    assert graph == neighbour_sets(n, k, SESSION)
    if k < n - 1:
        assert graph != neighbour_sets(n, k, bytes(16))


def test_chosen_parameters_grow_logarithmically_and_never_let_a_lying_server_get_both():
    chosen = {n: choose_parameters(n, dropout_rate=0.1, adversarial_rate=0.05)
              for n in (100, 1000, 10_000, 100_000)}
    for n, p in chosen.items():
        check_parameters(n, p.neighbours, p.threshold)
        assert 2 * p.threshold > p.neighbours  # two disjoint sets of t honest revealers: none
    ks = [chosen[n].neighbours for n in (1000, 10_000, 100_000)]
    assert ks[2] < 150  # of 100,000: logarithmic, not linear
    assert 0 <= ks[2] - ks[1] <= ks[1] - ks[0] <= 25  # each tenfold adds less
    assert choose_parameters(10, dropout_rate=0.3).neighbours <= 9
    with pytest.raises(ConfigError, match="tolerate"):
        choose_parameters(10, dropout_rate=0.8)


# -- messages -----------------------------------------------------------------------------

def test_every_message_round_trips_and_bad_fields_are_refused_with_a_reason():
    setup = setup_for(10)
    assert SecAggSetup.from_payload(setup.to_payload()) == setup
    masked = MaskedInput(device_id="dev-001", round=3, session=SESSION, data=b"\x01" * 8)
    request = UnmaskRequest(device_id="dev-001", round=3, session=SESSION, survivors=[1, 2],
                            dropped=[3], inputs=7)
    for message in (masked, request,
                    AdvertiseKeys(device_id="a", round=3, session=SESSION,
                                  cipher_key=bytes(32), mask_key=bytes(range(32)))):
        assert decode_any(message.to_payload(), *SECAGG_MESSAGES) == message
    assert masked.input_id == f"sa-{SESSION.hex()}"
    with pytest.raises(ProtocolError) as exc:
        UnmaskRequest(device_id="dev-001", round=3, session=SESSION, survivors=[1, 2],
                      dropped=[2], inputs=2)
    assert exc.value.reason == "both_secrets"
    with pytest.raises(ProtocolError) as exc:
        UnmaskResponse(device_id="a", round=3, session=SESSION,
                       self_mask_shares=[_share(1)], key_shares=[_share(1)])
    assert exc.value.reason == "both_secrets"
    with pytest.raises(ProtocolError, match="session"):
        MaskedInput(device_id="a", round=3, session=b"short", data=b"")
    with pytest.raises(ProtocolError, match="overflow"):
        SecAggSetup(**{**_fields(setup), "levels": 2**31})
    with pytest.raises(ProtocolError, match="neighbours"):
        SecAggSetup(**{**_fields(setup), "neighbours": 5})
    with pytest.raises(ProtocolError, match="encrypted share"):
        EncryptedShare(peer=1, ciphertext=b"x")


def _fields(setup: SecAggSetup) -> dict:
    return {name: getattr(setup, name) for name in SecAggSetup.__dataclass_fields__}


# -- whole rounds -------------------------------------------------------------------------

@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3])
@pytest.mark.parametrize(("n", "seed"), [(10, 0), (10, 1), (40, 0), (40, 1), (100, 0)])
def test_the_unmasked_sum_is_the_plain_sum_when_devices_drop_after_sending(n, seed, fraction):
    setup = setup_for(n, seed=seed)
    drops = drop_some(setup, fraction, AFTER_INPUT, seed)
    report = simulate_round(setup, field_inputs(setup, seed), drops=drops, entropy_seed=seed)
    assert report.error is None
    assert list(report.result.survivors) == setup.participants == list(report.counted)
    assert (report.result.total == report.expected).all()
    assert report.result.dropped == report.result.excluded == ()


@pytest.mark.parametrize("fraction", [0.1, 0.3])
@pytest.mark.parametrize(("n", "seed"), [(10, 2), (40, 2), (100, 1)])
def test_masks_of_devices_that_shared_but_sent_no_input_are_removed(n, seed, fraction):
    setup = setup_for(n, seed=seed)
    drops = drop_some(setup, fraction, BEFORE_INPUT, seed)
    report = simulate_round(setup, field_inputs(setup, seed), drops=drops, entropy_seed=seed)
    assert report.error is None
    assert set(report.result.dropped) == set(drops)
    assert set(report.result.survivors) == set(setup.participants) - set(drops)
    assert (report.result.total == report.expected).all()


def test_dropouts_at_every_stage_at_once_still_sum_exactly():
    setup = setup_for(60, seed=4, size=16)
    stages = [BEFORE_KEYS, BEFORE_SHARES, BEFORE_INPUT, AFTER_INPUT]
    drops = {d: stages[i % 4] for i, d in enumerate(setup.participants[::4][:16])}
    report = simulate_round(setup, field_inputs(setup, 4), drops=drops, entropy_seed=4)
    assert report.error is None
    assert (report.result.total == report.expected).all()
    early = {d for d, s in drops.items() if s in (BEFORE_KEYS, BEFORE_SHARES)}
    assert set(report.result.excluded) == early  # never in anyone's masks
    assert set(report.result.dropped) == {d for d, s in drops.items() if s == BEFORE_INPUT}
    assert len(report.result.survivors) == 60 - len(early) - len(report.result.dropped)


def test_a_device_that_disappears_before_sharing_is_excluded_not_fatal():
    setup = setup_for(10, seed=5)
    report = simulate_round(setup, field_inputs(setup, 5),
                            drops={"dev-003": BEFORE_SHARES, "dev-007": BEFORE_KEYS},
                            entropy_seed=5)
    assert report.error is None
    assert report.result.excluded == ("dev-003", "dev-007")
    assert (report.result.total == report.expected).all()


def test_too_few_devices_end_the_round_with_an_error_not_a_hang():
    setup = setup_for(10, seed=6)  # min_clients = threshold = 5
    report = simulate_round(setup, field_inputs(setup, 6),
                            drops=drop_some(setup, 0.6, BEFORE_KEYS, 6), entropy_seed=6)
    assert report.result is None
    assert isinstance(report.error, SecureAggregationError)
    assert report.error.reason == "too_few_devices"
    assert "fewer than min_clients 5" in str(report.error)
    # too many leaving after their inputs: the secrets cannot be rebuilt
    report = simulate_round(setup, field_inputs(setup, 6),
                            drops=drop_some(setup, 0.6, AFTER_INPUT, 6), entropy_seed=6)
    assert report.error is not None and report.error.reason == "too_few_shares"


def test_the_server_fails_at_the_deadline_and_then_refuses_everything():
    setup = setup_for(10, seed=7)
    server = SecAggServer(setup, now=100.0)
    clients = [SecAggClient(d) for d in setup.participants[:3]]
    for client in clients:
        for message in client.receive(setup):
            assert server.receive(message, now=101.0).status == "accepted"
    assert server.tick(now=129.0) == []  # before the 30 s deadline: waits
    with pytest.raises(SecureAggregationError, match=r"only 0 of 10 .* \(3 answered\)"):
        server.tick(now=130.0)
    assert server.stage == "failed" and server.failure.reason == "too_few_devices"
    late = SecAggClient(setup.participants[5]).receive(setup)[0]
    assert server.receive(late, now=131.0).reason == "round_closed"
    assert server.tick(now=200.0) == []


def test_a_re_sent_masked_input_counts_once():
    setup = setup_for(10, seed=8)
    seen: list[MaskedInput] = []
    report = simulate_round(setup, field_inputs(setup, 8), entropy_seed=8,
                            observe=lambda m: seen.append(m) if isinstance(m, MaskedInput)
                            else None)
    assert (report.result.total == report.expected).all()
    # replay the same round against a fresh server, delivering every input twice
    server, clients = _round_until_inputs(setup, seed=8)
    pending = []
    for _, message in clients:
        handled = server.receive(message, now=1.0)
        assert handled.status == "accepted"
        pending += handled.outgoing
        again = server.receive(MaskedInput.from_payload(message.to_payload()), now=1.0)
        assert (again.status, again.reason, again.outgoing) == ("accepted", "resent", ())
    other = MaskedInput(device_id=clients[0][1].device_id, round=3, session=setup.session,
                        data=bytes(len(clients[0][1].data)))
    assert server.receive(other, now=1.0).status == "duplicate"
    _finish(server, [c for c, _ in clients], pending)
    assert (server.result.total == report.expected).all()


def _round_until_inputs(setup: SecAggSetup, *, seed: int):
    """A server and clients driven to the input stage; returns (server, [(client, input)])."""
    server = SecAggServer(setup, now=0.0)
    clients = {d: SecAggClient(d, entropy=seeded_entropy(f"{seed}/{d}"))
               for d in setup.participants}
    inputs = field_inputs(setup, seed)
    pending = list(server.start())
    masked = []
    while pending:
        out = pending.pop(0)
        for d in [out.to] if out.to else setup.participants:
            replies = clients[d].receive(out.message)
            if isinstance(out.message, SecAggSetup):
                clients[d].submit_elements(inputs[d])
            for reply in replies:
                if isinstance(reply, MaskedInput):
                    masked.append((clients[d], reply))
                else:
                    pending.extend(server.receive(reply, now=0.0).outgoing)
    assert server.stage == "inputs"
    return server, masked


def _finish(server: SecAggServer, clients: list[SecAggClient], pending: list) -> None:
    """Deliver `pending` (with what the input deadline brings) until the server is done."""
    if server.stage == "inputs":
        pending = pending + server.tick(now=server.deadline)
    while pending:
        out = pending.pop(0)
        for client in clients:
            if out.to in (None, client.device_id):
                for reply in client.receive(out.message):
                    pending.extend(server.receive(reply, now=0.0).outgoing)


def test_a_device_never_reveals_both_secrets_of_one_neighbour():
    setup = setup_for(10, seed=9)
    _server, masked = _round_until_inputs(setup, seed=9)
    client = masked[0][0]
    neighbour = sorted(client._held)[0]
    everyone = list(range(10))

    def request(client: SecAggClient, survivors: list[int], dropped: list[int],
                inputs: int = 10) -> UnmaskRequest:
        return UnmaskRequest(device_id=client.device_id, round=3, session=setup.session,
                             survivors=survivors, dropped=dropped, inputs=inputs)

    first = client.receive(request(client, everyone, []))
    assert neighbour in [s.owner for s in first[0].self_mask_shares]
    assert client.receive(request(client, everyone, [])) == first  # asked again: same answer
    lying = request(client, [i for i in everyone if i != neighbour], [neighbour], inputs=9)
    with pytest.raises(SecureAggregationError) as exc:
        client.receive(lying)
    assert exc.value.reason == "both_secrets"
    assert client.stage == "aborted" and client._held == {}
    other = masked[1][0]
    me = setup.index_of(other.device_id)
    with pytest.raises(SecureAggregationError, match="as dropped"):
        other.receive(request(other, [i for i in everyone if i != me], [me], inputs=9))
    with pytest.raises(SecureAggregationError, match="fewer than min_clients"):
        masked[2][0].receive(request(masked[2][0], everyone[:4], everyone[4:], inputs=4))


def test_the_server_refuses_a_share_of_the_wrong_secret():
    setup = setup_for(10, seed=10)
    server, masked = _round_until_inputs(setup, seed=10)
    for _, message in masked[:-1]:
        server.receive(message, now=0.0)
    assert server.tick(now=server.deadline)  # the last device dropped after sharing
    dropped = setup.index_of(masked[-1][1].device_id)
    responder = next(i for i in range(10) if dropped in server._graph[i] and i != dropped)
    wrong = UnmaskResponse(device_id=setup.participants[responder], round=3,
                           session=setup.session, key_shares=[],
                           self_mask_shares=[_share(dropped)])  # b of a dropped device
    assert server.receive(wrong, now=1.0).reason == "wrong_secret"
    survivor = next(j for j in server._graph[responder] if j != dropped)
    wrong = UnmaskResponse(device_id=setup.participants[responder], round=3,
                           session=setup.session, self_mask_shares=[],
                           key_shares=[_share(survivor)])  # mask key of a survivor
    assert server.receive(wrong, now=1.0).reason == "wrong_secret"


def _share(owner: int):
    from fedmq.core.secagg.messages import RevealedShare

    return RevealedShare(owner=owner, share=bytes(shamir.SHARE_BYTES))


def test_a_misrouted_share_is_refused_by_the_device():
    setup = setup_for(10, seed=11)
    server = SecAggServer(setup, now=0.0)
    clients = {d: SecAggClient(d) for d in setup.participants}
    pending, routed = list(server.start()), []
    while pending:
        out = pending.pop(0)
        if isinstance(out.message, RoutedShares):
            routed.append(out.message)
            continue
        for d in [out.to] if out.to else setup.participants:
            for reply in clients[d].receive(out.message):
                pending.extend(server.receive(reply, now=0.0).outgoing)
    a, b = routed[0], routed[1]
    swapped = RoutedShares(device_id=a.device_id, round=3, session=setup.session,
                           shares=[EncryptedShare(peer=s.peer, ciphertext=t.ciphertext)
                                   for s, t in zip(a.shares, reversed(a.shares), strict=True)])
    with pytest.raises(SecureAggregationError, match="does not decrypt"):
        clients[a.device_id].receive(swapped)
    assert clients[b.device_id].receive(b) == []  # no input yet: waits for it


def test_the_server_state_survives_a_restart_mid_round():
    setup = setup_for(12, seed=12)
    server, masked = _round_until_inputs(setup, seed=12)
    for _, message in masked[:8]:
        server.receive(message, now=0.0)
    saved = storage.loads(storage.dumps(server.state_dict()))
    restarted = SecAggServer(setup, now=50.0)
    restarted.load_state_dict(saved, now=50.0)
    assert restarted.stage == "inputs" and restarted.deadline == 50.0 + 300.0
    assert restarted.receive(masked[0][1], now=51.0).reason == "resent"
    pending = [o for _, message in masked[8:]
               for o in restarted.receive(message, now=51.0).outgoing]
    _finish(restarted, [c for c, _ in masked], pending)
    expected = setup.field.zeros(setup.vector_size)
    for x in field_inputs(setup, 12).values():
        setup.field.add_into(expected, setup.field.reduce(x))
    assert (restarted.result.total == expected).all()
    done = SecAggServer(setup, now=0.0)
    done.load_state_dict(storage.loads(storage.dumps(restarted.state_dict())), now=0.0)
    assert (done.result.total == expected).all() and done.stage == "done"
    with pytest.raises(ConfigError, match="another round"):
        SecAggServer(setup_for(12, seed=13), now=0.0).load_state_dict(saved, now=0.0)
    with pytest.raises(ConfigError, match="format"):
        restarted.load_state_dict({**saved, "format": 99}, now=0.0)


def test_float_updates_average_to_the_plain_mean_within_quantization_error():
    setup = setup_for(20, seed=14, size=200)
    rng = np.random.default_rng(14)
    updates = {d: rng.normal(0, 0.3, 200) for d in setup.participants}
    drops = drop_some(setup, 0.1, AFTER_INPUT, 14)
    report = simulate_round(setup, updates, drops=drops, entropy_seed=14, float_inputs=True)
    plain = np.clip(np.stack(list(updates.values())), -1, 1).sum(axis=0)
    step = setup.quantizer.step
    assert np.abs(report.result.float_sum(setup) - plain).max() <= 20 * step
    assert setup.quantizer.step < 1e-7  # 32 bits for 20 summands: far finer than q8


# -- what the server sees of one device ---------------------------------------------------

def _uniformity_p(values: np.ndarray) -> float:
    """The smaller p-value of chi-square tests of the top and bottom bytes against uniform."""
    top = np.bincount((values >> 24).astype(np.int64), minlength=256)
    low = np.bincount((values & 0xFF).astype(np.int64), minlength=256)
    return min(stats.chisquare(top).pvalue, stats.chisquare(low).pvalue)


def _same_distribution_p(a: np.ndarray, b: np.ndarray) -> float:
    """Chi-square test of homogeneity of the top-byte histograms of a and b."""
    table = np.stack([np.bincount((v >> 24).astype(np.int64), minlength=256) for v in (a, b)])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2:
        return 0.0 if (a != b).any() else 1.0
    return stats.chi2_contingency(table).pvalue


def test_the_servers_view_of_one_masked_input_is_independent_of_the_update():
    size, alpha = 1 << 14, 1e-3
    setup = setup_for(10, seed=15, size=size)
    target = setup.participants[4]
    views, updates = {}, {}
    for name, x in (("zeros", np.zeros(size, np.uint64)),
                    ("max", np.full(size, setup.levels, np.uint64))):
        inputs = field_inputs(setup, 15)
        inputs[target] = x
        seen = []
        simulate_round(setup, inputs, entropy_seed=15,
                       observe=lambda m, seen=seen: seen.append(m))
        masked = next(m for m in seen if isinstance(m, MaskedInput) and m.device_id == target)
        views[name] = setup.field.from_bytes(masked.data, size)
        updates[name] = setup.field.reduce(x)
    # what the server holds is uniform in the field whatever the update, and the two
    # views of opposite updates are indistinguishable from each other
    assert _uniformity_p(views["zeros"]) > alpha
    assert _uniformity_p(views["max"]) > alpha
    assert _same_distribution_p(views["zeros"], views["max"]) > alpha
    # negative controls: the same tests see through a missing or weakened mask
    masks = setup.field.sub(views["max"], updates["max"])
    leaky = setup.field.add(updates["max"], masks & 0xFFFF)  # a mask of 16 bits
    for unmasked in (updates["zeros"], updates["max"], leaky):
        assert _uniformity_p(unmasked) < 1e-12
    assert _same_distribution_p(updates["zeros"], updates["max"]) < 1e-12
    assert _same_distribution_p(setup.field.add(updates["zeros"], masks & 0xFFFF), leaky) < 1e-12


def test_the_server_acknowledges_a_repeated_message_and_refuses_a_changed_or_foreign_one():
    setup = setup_for(10, seed=16)
    server = SecAggServer(setup, now=0.0)
    keys_a = SecAggClient("dev-000").receive(setup)[0]
    assert server.receive(keys_a, now=0.0).status == "accepted"
    assert server.receive(keys_a, now=0.0) == Handled("accepted", "resent")
    changed = SecAggClient("dev-000").receive(setup)[0]
    assert server.receive(changed, now=0.0).status == "duplicate"
    copied = AdvertiseKeys(device_id="dev-001", round=3, session=setup.session,
                           cipher_key=keys_a.cipher_key, mask_key=bytes(range(32)))
    assert server.receive(copied, now=0.0).reason == "key_reuse"
    stranger = AdvertiseKeys(device_id="dev-999", round=3, session=setup.session,
                             cipher_key=bytes(32), mask_key=bytes(range(32)))
    assert server.receive(stranger, now=0.0).reason == "not_participant"
    other_round = AdvertiseKeys(device_id="dev-002", round=4, session=setup.session,
                                cipher_key=bytes(32), mask_key=bytes(range(32)))
    assert server.receive(other_round, now=0.0).reason == "wrong_session"
    early = MaskedInput(device_id="dev-002", round=3, session=setup.session, data=b"")
    assert server.receive(early, now=0.0).reason == "early"
    assert server.receive(setup, now=0.0).reason == "wrong_kind"
