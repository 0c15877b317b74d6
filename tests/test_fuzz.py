"""Fuzzing the update topics: every garbage payload is refused, counted once, and harmless.

Garbage comes from hypothesis strategies (wrong field types, bad values, poisoned arrays,
bogus Parts, random msgpack) and from seeded generators (random bytes, truncations of a
valid update, oversize payloads, huge declared sizes, wrong devices). None of it is a valid
update, by construction. A brokerless property test feeds single payloads to the service's
handler. The integration test runs the fleet on the production broker
(broker_config/production.conf + acl.conf: TLS, a password per account, per-device topics)
with require_known_devices, and publishes well over 10,000 of them as enrolled device
accounts while three real agents train: what the broker refuses (ACL, packet limit) never
reaches the aggregator, everything else is counted exactly as the same code counts it
without a broker, and the model is that of a run without garbage.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import msgpack
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from aggregator.config import AggregatorConfig
from aggregator.ingest import UpdateLimits
from aggregator.service import AggregatorService
from fedmq.core import codecs
from fedmq.core.protocol import DeviceStatus, FleetTopics, Update
from fedmq.core.protocol.wire import KIND_KEY, MAX_DECODED_BYTES, PROTOCOL_VERSION, VERSION_KEY
from fedmq.models import build_model
from fedmq.transport.mqtt import publish_overhead
from fedmq.transport.tls import TlsFiles

from .helpers import wait_for
from .secure_brokers import (
    AGGREGATOR,
    PASSWORD_PORT,
    ProductionBroker,
    enrolled_agents,
    production_broker,
    read_shipped,
)

FLEET = "test"
TOPICS = FleetTopics(FLEET)
AGENTS = ["dev0", "dev1", "dev2"]
# Strangers: in the fleet run, enrolled device accounts that send the garbage. mallory and
# the 64-character id announce themselves, so their garbage meets every check; eve-01 never
# does, so all of its garbage is unknown_device. Garbage for any other topic goes out as
# mallory, and the broker's ACL refuses it.
MALLORY = "mallory"
ANNOUNCED = [MALLORY, "x" * 64]
SILENT = ["eve-01"]
STRANGERS = ANNOUNCED + SILENT
# Levels that are no device id at all (`update/0/` with an empty level matches `update/+/+`).
BAD_LEVELS = ["", "sp ace", "x" * 65, "d\u00e9v"]
VALID_LEVELS = AGENTS + STRANGERS
# Where garbage goes: mostly where a stolen account may publish (its own topic), the rest
# to the agents' topics and to invalid levels.
TARGET_LEVELS = STRANGERS * 3 + AGENTS + BAD_LEVELS
# Same for both runs. Incomplete transfers expire after 1 s, so the test need not wait a
# minute for their count; pending declarations get room enough that `too_large` never
# depends on when the expiry ran (the accounting is then exact per reason).
SETTINGS = dict(fleet=FLEET, task="digits", model="mlp", hidden=16, epochs=1, lr=0.1,
                rounds=2, min_updates=3, deadline_s=60.0, evaluate=False, chunk_timeout_s=1.0,
                max_pending_bytes=1 << 30, max_update_norm=100.0, norm_policy="reject")
# The fleet runs (and their oracle) refuse updates from devices that never announced.
FLEET_SETTINGS = {**SETTINGS, "require_known_devices": True}
PARAMS = build_model("mlp", AggregatorConfig(**SETTINGS).model_config()).layout.size
LIMIT = UpdateLimits().payload_limit(PARAMS)
# Codec names no build understands (a parseable one could make a valid update by chance).
UNKNOWN_CODECS = ["f64", "rot13", "q3", "top2+f32", "f32+gzip", ""]
FRESH_ID = b"\xfefresh"  # stands for a transfer id unique to one garbage Part
HYPOTHESIS_BATCHES = 150  # hypothesis examples, each a batch of garbage
SEEDED = 15000  # garbage from the seeded generators
SEED = 20240611


def envelope(kind: str = "upd") -> dict:
    return {VERSION_KEY: PROTOCOL_VERSION, KIND_KEY: kind}


def update_map(device: str, values: np.ndarray | None = None, **fields) -> dict:
    """A valid Update's wire map (zero delta unless given), with `fields` replaced."""
    values = np.zeros(PARAMS, np.float32) if values is None else values
    u = Update(device_id=device, update_id="fuzz", round=1, base_version=0, num_samples=10,
               loss=0.5, delta=codecs.encode(values))
    return {**u.to_wire(), **envelope(), **fields}


def tensor(codec: str, size: int, data: bytes) -> dict:
    return {"c": codec, "n": size, "d": data}


def device_for(level: str) -> str:
    """The device id a payload claims: the topic's own, where the topic has a valid one."""
    return level if level in VALID_LEVELS else "dev0"


# -- hypothesis strategies ----------------------------------------------------------------

levels = st.sampled_from(TARGET_LEVELS)
int64 = st.integers(-(2**63), 2**64 - 1)
WRONG_TYPE = {
    "str": st.one_of(int64, st.binary(max_size=8), st.floats(), st.booleans(), st.none(),
                     st.lists(st.integers(0, 9), max_size=2)),
    "int": st.one_of(st.text(max_size=4), st.binary(max_size=4), st.floats(), st.booleans(),
                     st.none()),
    "float": st.one_of(st.text(max_size=4), st.binary(max_size=4), st.booleans(), st.none(),
                       st.lists(st.floats(), max_size=2)),
    "bool": st.one_of(int64, st.text(max_size=4), st.none(), st.floats()),
    "bytes": st.one_of(int64, st.text(max_size=8), st.none(), st.floats()),
    # never a map with all of c, n and d: that could be a valid tensor
    "tensor": st.one_of(int64, st.text(max_size=4), st.binary(max_size=16), st.none(),
                        st.lists(st.integers(0, 9), max_size=3),
                        st.dictionaries(st.sampled_from(["c", "n"]), int64, max_size=2)),
}
UPDATE_TYPES = {"dev": "str", "id": "str", "r": "int", "bv": "int", "ns": "int", "l": "float",
                "x": "tensor", "lh": "str", "s": "float", "st": "int", "cp": "bool"}
PART_TYPES = {"t": "bytes", "i": "int", "k": "int", "n": "int", "h": "bytes", "d": "bytes"}
NOT_ONE = st.one_of(int64.filter(lambda v: v != PROTOCOL_VERSION), st.just(True),
                    st.just(1.0), st.text(max_size=3), st.none())
BAD_VALUES = {  # right types, values that cannot pass
    "ns": st.integers(-(2**63), 0),
    "dev": st.sampled_from(["", "a/b", "x" * 65, "+", "#", "sp ace"]),
    "id": st.sampled_from(["", "i" * 65]),
    "r": st.one_of(st.integers(-(2**63), -1), st.just(0), st.integers(100, 2**63)),
    "bv": st.one_of(st.integers(-(2**63), -1), st.integers(100, 2**63)),
    "l": st.sampled_from([math.nan, math.inf, -math.inf]),
    VERSION_KEY: NOT_ONE,
    KIND_KEY: st.one_of(st.sampled_from(["model", "dev", "agg", "rcpt", "mchunk", "smodel",
                                         "part", ""]),
                        st.text(max_size=8).filter(lambda k: k not in ("upd", "part"))),
}
REQUIRED = ["dev", "id", "r", "bv", "ns", "l", "x", VERSION_KEY, KIND_KEY]


@st.composite
def wrong_types(draw):
    level = draw(levels)
    body = update_map(device_for(level))
    for key in draw(st.lists(st.sampled_from(sorted(UPDATE_TYPES)), min_size=1, max_size=3,
                             unique=True)):
        body[key] = draw(WRONG_TYPE[UPDATE_TYPES[key]])
    return level, body


@st.composite
def bad_values(draw):
    level = draw(levels)
    body = update_map(device_for(level))
    if draw(st.booleans()):
        for key in draw(st.lists(st.sampled_from(REQUIRED), min_size=1, max_size=3,
                                 unique=True)):
            del body[key]
    else:
        key = draw(st.sampled_from(sorted(BAD_VALUES)))
        body[key] = draw(BAD_VALUES[key])
    return level, body


@st.composite
def poisoned(draw):
    """Valid-looking updates from the topic's own device whose delta is not."""
    level = draw(st.sampled_from(VALID_LEVELS))
    kind = draw(st.sampled_from(["f32", "f16", "q8_scale", "huge", "norm", "size",
                                 "truncated", "codec"]))
    values = np.zeros(PARAMS, np.float32)
    where = draw(st.lists(st.integers(0, PARAMS - 1), min_size=1, max_size=5))
    bad = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    if kind == "f32":
        values[where] = bad
        x = tensor("f32", PARAMS, values.astype("<f4").tobytes())
    elif kind == "f16":
        x = tensor("f16", PARAMS, _with(values.astype("<f2"), where, bad))
    elif kind == "q8_scale":
        data = bytearray(codecs.encode(values, "q8").data)
        block = draw(st.integers(0, (PARAMS - 1) // 256))
        scale = draw(st.sampled_from([math.nan, math.inf, -1.0, -1e-30]))
        data[4 * block: 4 * block + 4] = np.float32(scale).tobytes()
        x = tensor("q8", PARAMS, bytes(data))
    elif kind == "huge":  # finite, but x num_samples overflows the float32 sum
        values[where] = draw(st.floats(4e31, 3e38))
        x = tensor("f32", PARAMS, values.astype("<f4").tobytes())
    elif kind == "norm":  # finite and summable, but far above max_update_norm
        values[:] = draw(st.floats(10.0, 1e6))
        x = tensor("f32", PARAMS, values.astype("<f4").tobytes())
    elif kind == "size":
        size = PARAMS + draw(st.sampled_from([-PARAMS, -1, 1, 7, 2**31 - PARAMS]))
        x = tensor("f32", size, b"\0" * 4 * min(size, PARAMS + 8))
    elif kind == "truncated":
        x = tensor("f32", PARAMS, b"\0" * (4 * PARAMS - draw(st.integers(1, 4 * PARAMS))))
    else:
        x = tensor(draw(st.sampled_from(UNKNOWN_CODECS)), PARAMS, b"\0" * 4 * PARAMS)
    return level, update_map(level, x=x)


def _with(half: np.ndarray, where: list[int], bad: float) -> bytes:
    half[where] = bad
    return half.tobytes()


update_garbage = st.one_of(wrong_types(), bad_values(), poisoned())


@st.composite
def bogus_parts(draw):
    level = draw(levels)
    style = draw(st.sampled_from(["open", "huge", "complete", "types", "manifest"]))
    h = draw(st.binary(min_size=32, max_size=32))
    if style == "open":  # admitted, never completed: counted as incomplete when it expires
        k = draw(st.integers(2, 8))
        n = draw(st.integers(k, LIMIT))
        part = dict(t=FRESH_ID, i=draw(st.integers(0, k - 1)), k=k, n=n, h=h,
                    d=draw(st.binary(max_size=min(n, 64))))
    elif style == "huge":  # declares more than any update of this model can be
        n = draw(st.integers(LIMIT + 1, MAX_DECODED_BYTES))
        part = dict(t=FRESH_ID, i=0, k=draw(st.integers(1, 1000)), n=n, h=h, d=b"x")
    elif style == "complete":  # one part holding a whole (garbage) update
        _, inner = draw(update_garbage)
        d = msgpack.packb(inner, use_bin_type=True)
        if draw(st.booleans()):
            h = hashlib.sha256(d).digest()  # else the hash is wrong: bad_hash
        part = dict(t=FRESH_ID, i=0, k=1, n=len(d), h=h, d=d)
    elif style == "types":
        part = dict(t=FRESH_ID, i=0, k=2, n=100, h=h, d=b"abc")
        for key in draw(st.lists(st.sampled_from(sorted(PART_TYPES)), min_size=1, max_size=2,
                                 unique=True)):
            part[key] = draw(WRONG_TYPE[PART_TYPES[key]])
    else:  # a manifest that contradicts itself
        part = draw(st.sampled_from([
            dict(t=FRESH_ID, i=3, k=3, n=10, h=h, d=b"a"),  # index past count
            dict(t=FRESH_ID, i=0, k=11, n=10, h=h, d=b"a"),  # more parts than bytes
            dict(t=FRESH_ID, i=0, k=1, n=2, h=h, d=b"abc"),  # data beyond size
            dict(t=FRESH_ID, i=0, k=1, n=3, h=h[:31], d=b"abc"),  # short digest
            dict(t=b"", i=0, k=1, n=3, h=h, d=b"abc"),  # empty transfer id
            dict(t=b"t" * 17, i=0, k=1, n=3, h=h, d=b"abc"),  # long transfer id
            dict(t=FRESH_ID, i=-1, k=1, n=3, h=h, d=b"abc"),
        ]))
    return level, {**part, **envelope("part")}


msgpack_values = st.recursive(
    st.none() | st.booleans() | int64 | st.floats() | st.text(max_size=8)
    | st.binary(max_size=16),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                 max_size=4),
    max_leaves=12)
random_msgpack = st.tuples(levels, msgpack_values.map(
    lambda v: msgpack.packb(v, use_bin_type=True)))
garbage = st.one_of(update_garbage, bogus_parts(), random_msgpack)


# -- seeded generators --------------------------------------------------------------------

def seeded_garbage(count: int, seed: int) -> list[tuple[str, object]]:
    """Random bytes, truncated and oversize payloads, huge declared sizes, wrong devices."""
    rnd = random.Random(seed)
    rng = np.random.default_rng(seed)
    valid = [Update(device_id=d, update_id="ok", round=1, base_version=0, num_samples=10,
                    loss=0.5, delta=codecs.encode(rng.normal(0, 0.01, PARAMS)
                                                  .astype(np.float32))).to_payload()
             for d in VALID_LEVELS]
    out: list[tuple[str, object]] = []
    for n in range(count):
        level = rnd.choice(TARGET_LEVELS)
        style = n % 6
        if n % 500 == 7:  # one part of an open transfer, twice: the copy is ignored
            part = {**dict(t=b"dup" + n.to_bytes(4, "big"), i=0, k=2, n=100,
                           h=rnd.randbytes(32), d=b"abc"), **envelope("part")}
            out += [(MALLORY, part), (MALLORY, part)]
        elif style == 0:
            out.append((level, rnd.randbytes(rnd.randint(0, 300))))
        elif style == 1:  # a valid update, cut short
            payload = rnd.choice(valid)
            out.append((level, payload[: rnd.randrange(len(payload))]))
        elif style == 2:  # a valid update from another device than the topic's
            sender = rnd.randrange(len(VALID_LEVELS))
            others = [lv for lv in VALID_LEVELS if lv != VALID_LEVELS[sender]]
            out.append((rnd.choice(others), valid[sender]))
        elif style == 3:  # NaN / Inf in a valid-looking float32 delta
            values = rng.normal(0, 0.01, PARAMS).astype(np.float32)
            values[rng.integers(0, PARAMS, rnd.randint(1, 4))] = rnd.choice(
                [np.nan, np.inf, -np.inf])
            own = rnd.choice(VALID_LEVELS)
            out.append((own, update_map(own, x=tensor("f32", PARAMS, values.tobytes()))))
        elif style == 4:  # a Part declaring a huge payload
            size = rnd.randint(LIMIT + 1, MAX_DECODED_BYTES)
            out.append((level, {**dict(t=FRESH_ID, i=0, k=rnd.randint(1, 100), n=size,
                                       h=rnd.randbytes(32), d=rnd.randbytes(50)),
                                **envelope("part")}))
        elif n % 300 == 5:  # now and then a whole payload bigger than any update
            out.append((level, rnd.randbytes(LIMIT + rnd.randint(1, 40_000))))
        else:  # a valid-looking zero update for a round that is not open
            own = rnd.choice(VALID_LEVELS)
            field = rnd.choice([{"r": 0}, {"r": rnd.randint(100, 10**6)},
                                {"bv": rnd.randint(100, 10**6)}])
            out.append((own, update_map(own, **field)))
    return out


def hypothesis_garbage(batches: int) -> list[tuple[str, object]]:
    """Batches of garbage drawn by hypothesis, deterministically (derandomized)."""
    out: list[tuple[str, object]] = []

    @settings(max_examples=batches, derandomize=True, database=None,
              phases=[Phase.generate], deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(garbage, min_size=20, max_size=40))
    def collect(batch):
        out.extend(batch)

    collect()
    return out


def materialize(items: list[tuple[str, object]],
                serials: Iterator[int] | None = None) -> list[tuple[str, bytes]]:
    """(topic, payload) to publish; every FRESH_ID becomes a transfer id of its own."""
    serials = serials if serials is not None else itertools.count()
    out = []
    for level, body in items:
        if isinstance(body, dict):
            if body.get("t") == FRESH_ID:
                body = {**body, "t": b"fz" + next(serials).to_bytes(6, "big")}
            body = msgpack.packb(body, use_bin_type=True)
        # a device's own topic is update/{bucket}/{id}; an invalid id goes in bucket 0
        out.append((TOPICS.update(level) if level in VALID_LEVELS
                    else f"fedmq/{FLEET}/update/0/{level}", body))
    return out


# -- brokerless: one payload at a time ----------------------------------------------------

class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def quiet_service(checkpoint, settings: dict = SETTINGS) -> AggregatorService:
    """A service that is never started: its handler runs on the caller's thread, on a
    clock the caller moves."""
    return AggregatorService(AggregatorConfig(broker="mqtt://127.0.0.1:1", **settings,
                                              checkpoint=str(checkpoint)), clock=ManualClock())


def expire_transfers(service: AggregatorService) -> None:
    """Let every open transfer time out and the service count it, as its loop would."""
    service.clock.now += SETTINGS["chunk_timeout_s"] + 1
    service._tick()


@pytest.fixture(scope="module")
def handler(tmp_path_factory):
    service = quiet_service(tmp_path_factory.mktemp("fuzz") / "agg.ckpt")
    yield service
    service.writer.close()


_serials = itertools.count()  # transfer ids stay unique across hypothesis examples


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(item=garbage)
def test_any_garbage_payload_is_counted_once_and_leaves_the_aggregate_alone(handler, item):
    (topic, payload), = materialize([item], _serials)
    before = sum(handler.rejected.values())
    reply = handler._handle_update(topic, payload)
    if reply is not None:  # a parseable update: the device is told, never "accepted"
        assert reply[1].status == "rejected"
    expire_transfers(handler)  # an open transfer counts once, when it expires
    assert sum(handler.rejected.values()) == before + 1
    assert handler.machine.acc.count == 0 and not handler.machine.acc.total.any()
    assert handler.accepted == 0 and handler.reassembler.ignored_parts == 0


def test_the_seeded_garbage_covers_every_kind_and_is_all_refused(tmp_path):
    service = quiet_service(tmp_path / "agg.ckpt")
    try:
        items = seeded_garbage(600, SEED)
        for topic, payload in materialize(items):
            service._handle_update(topic, payload)
        expire_transfers(service)
    finally:
        service.writer.close()
    repeated = service.reassembler.ignored_parts
    assert repeated == len(range(7, 600, 500))  # a part sent twice: the copy is ignored
    assert sum(service.rejected.values()) + repeated == len(items) and service.accepted == 0
    for why in ("malformed", "wrong_topic", "non_finite", "too_large", "stale_round",
                "future_round", "wrong_version", "bad_topic"):
        assert service.rejected[why] > 0, why


# -- over the production broker, with real agents -----------------------------------------

PASSWORDS = {AGGREGATOR: "pw-agg", **{name: f"pw-{name}" for name in AGENTS + STRANGERS}}


def shipped_limit(name: str) -> int:
    return int(re.search(rf"^{name} (\d+)$", read_shipped("production.conf"),
                         re.MULTILINE).group(1))


# The broker hangs up on a client sending a bigger PUBLISH.
MAX_PACKET = shipped_limit("max_packet_size")
# What mosquitto announces as its Receive Maximum: QoS 1 publishes a client may have in
# flight (paho does not read it from the CONNACK, so it is set before connecting).
RECEIVE_MAXIMUM = shipped_limit("max_inflight_messages")
DELIVERED, DENIED, TOO_BIG = "delivered", "denied by the ACL", "over the packet limit"


@dataclass(frozen=True, slots=True)
class Shot:
    """One garbage payload, the account that publishes it, and what the broker does."""

    topic: str
    payload: bytes
    account: str
    fate: str


def aim(messages: list[tuple[str, bytes]]) -> list[Shot]:
    """A payload on a stranger's own topic goes out as that stranger and is delivered; one
    on any other topic goes out as mallory and is refused by the ACL; one over the packet
    limit never gets that far."""
    shots = []
    for topic, payload in messages:
        level = topic.rsplit("/", 1)[-1]
        if len(payload) + publish_overhead(topic, qos=1) > MAX_PACKET:
            shots.append(Shot(topic, payload, MALLORY, TOO_BIG))
        elif level in STRANGERS and topic == TOPICS.update(level):
            shots.append(Shot(topic, payload, level, DELIVERED))
        else:
            shots.append(Shot(topic, payload, MALLORY, DENIED))
    return shots


class Fuzzer:
    """A stolen device account's own MQTT v5 connection, in plain paho (an attacker runs no
    fedmq code), counting the broker's answer to every QoS 1 publish."""

    def __init__(self, broker: ProductionBroker, account: str) -> None:
        self.account = account
        self.pubacks: Counter[str] = Counter()  # PUBACK reason -> messages
        self.hung_up: str | None = None  # the reason of the broker's DISCONNECT
        self.receive_maximum: int | None = None  # from the CONNACK
        self._lock = threading.Lock()
        self._connected, self._gone = threading.Event(), threading.Event()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=account, protocol=mqtt.MQTTv5,
                                  reconnect_on_failure=False)
        self.client.username_pw_set(account, broker.passwords[account])
        self.client.tls_set_context(TlsFiles(ca_file=str(broker.pki.ca.cert)).context())
        self.client.max_inflight_messages_set(RECEIVE_MAXIMUM)
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.on_disconnect = self._on_disconnect
        self._port = broker.ports[PASSWORD_PORT]

    def start(self) -> Fuzzer:
        self.client.connect("127.0.0.1", self._port)
        self.client.loop_start()
        wait_for(lambda: self._connected.is_set() or self._gone.is_set(),
                 f"{self.account}'s connection")
        assert self._connected.is_set(), f"the broker refused {self.account}: {self.hung_up}"
        assert self.receive_maximum == RECEIVE_MAXIMUM
        return self

    def _on_connect(self, _client, _userdata, _flags, reason_code, props) -> None:
        if reason_code.is_failure:
            self.hung_up = str(reason_code)
            self._gone.set()
            return
        self.receive_maximum = getattr(props, "ReceiveMaximum", None)
        self._connected.set()

    def _on_publish(self, _client, _userdata, _mid, reason_code, _props) -> None:
        with self._lock:
            self.pubacks[str(reason_code)] += 1

    def _on_disconnect(self, _client, _userdata, _flags, reason_code, _props) -> None:
        self.hung_up = self.hung_up or str(reason_code)
        self._gone.set()

    def publish(self, topic: str, payload: bytes, *,
                retain: bool = False) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=1, retain=retain)

    def wait_hung_up(self) -> str | None:
        wait_for(self._gone.is_set, f"the broker to hang up on {self.account}")
        return self.hung_up

    def stop(self) -> None:
        if self._connected.is_set() and not self._gone.is_set():
            self.client.disconnect()
            self._gone.wait(5)  # loop_stop() at once could drop the DISCONNECT
        self.client.loop_stop()


def fire(fuzzers: dict[str, Fuzzer], shots: list[Shot]) -> None:
    """Publish every shot as its account; return once the broker acknowledged each."""
    infos = [fuzzers[shot.account].publish(shot.topic, shot.payload) for shot in shots]
    for info in infos:
        info.wait_for_publish(60)


def run_fleet(broker: ProductionBroker, shots: list[Shot]) -> dict:
    """Aggregator + 3 agents for 2 rounds on `broker`, the strangers publishing `shots`:
    half before the agents start (round 1 open and waiting; handled before any agent
    update), the rest while they train, then every oversize one on a connection of its own.
    """
    with ExitStack() as stack:
        broker.mosquitto.start()
        stack.callback(broker.mosquitto.close)
        seen_at_close: list[int] = []  # garbage payloads handled when each round closed

        def seen() -> int:
            """Garbage payloads handled so far (an open transfer counts when it arrives,
            and as `incomplete` instead once it expired)."""
            r = service.reassembler
            return sum(service.rejected.values()) + r.ignored_parts + r.pending_transfers

        def oversize_logged() -> int:
            return broker.log_text().count(f"Client {MALLORY} disconnected due to oversize")

        config = AggregatorConfig(broker=broker.password_url, client_id=AGGREGATOR,
                                  **broker.login(AGGREGATOR), **FLEET_SETTINGS,
                                  checkpoint=str(broker.etc.parent / "agg.ckpt"))
        service = AggregatorService(config, on_round=lambda _r: seen_at_close.append(seen()))
        service.start()
        stack.callback(service.stop)
        wait_for(service.link.subscribed.is_set, "the aggregator's subscriptions")
        fuzzers: dict[str, Fuzzer] = {}
        for account in STRANGERS if shots else []:
            fuzzers[account] = Fuzzer(broker, account)
            stack.callback(fuzzers[account].stop)
            fuzzers[account].start()
        for account in ANNOUNCED if shots else []:
            birth = DeviceStatus(device_id=account, online=True).to_payload()
            fuzzers[account].publish(TOPICS.device_status(account), birth,
                                     retain=True).wait_for_publish(60)
        wait_for(lambda: all(service.registry.known(a) for a in fuzzers if a in ANNOUNCED),
                 "the births of the announced strangers")
        sent = [shot for shot in shots if shot.fate != TOO_BIG]
        half = len(sent) // 2
        first_half = sum(shot.fate == DELIVERED for shot in sent[:half])
        started = time.monotonic()
        fire(fuzzers, sent[:half])
        # Handled before round 1 can close; and the aggregator's queue at the broker never
        # nears production.conf's max_queued_messages, past which garbage would be dropped.
        wait_for(lambda: seen() >= first_half, "the first half of the garbage")
        enrolled_agents(broker, stack.callback, list(range(len(AGENTS))), total=len(AGENTS))
        fire(fuzzers, sent[half:])
        for fuzzer in fuzzers.values():  # their accounts are needed again just below
            fuzzer.stop()
        hung_up = []
        for shot in shots:
            if shot.fate == TOO_BIG:
                big = Fuzzer(broker, shot.account)
                try:
                    big.start().publish(shot.topic, shot.payload)
                    hung_up.append(big.wait_hung_up())
                finally:
                    big.stop()
        wait_for(lambda: oversize_logged() >= len(hung_up), "the broker's oversize log lines")
        wait_for(service.finished.is_set, "2 rounds")
        delivered = sum(shot.fate == DELIVERED for shot in shots)
        wait_for(lambda: sum(service.rejected.values()) + service.reassembler.ignored_parts
                 >= delivered, "every delivered garbage payload to be counted")
        wait_for(lambda: service.reassembler.pending_transfers == 0, "open transfers to expire")
        return {"params": service.machine.params.copy(), "history": list(service.history),
                "rejected": Counter(service.rejected), "accepted": service.accepted,
                "ignored": service.reassembler.ignored_parts,
                "seconds": time.monotonic() - started, "failure": service.failure,
                "seen_at_close": seen_at_close, "first_half": first_half,
                "pubacks": {a: Counter(f.pubacks) for a, f in fuzzers.items()},
                "hung_up": hung_up, "oversize_logged": oversize_logged()}


@pytest.mark.integration
def test_ten_thousand_garbage_updates_during_a_round_change_nothing_but_the_counters(
        tmp_path, pki, caplog):
    items = hypothesis_garbage(HYPOTHESIS_BATCHES) + seeded_garbage(SEEDED, SEED)
    shots = aim(materialize(items))
    fates = Counter(shot.fate for shot in shots)
    delivered = [shot for shot in shots if shot.fate == DELIVERED]
    assert len(delivered) >= 10_000 and fates[DENIED] > 0 and fates[TOO_BIG] > 0
    # what the same code makes of each delivered payload on its own, with no broker between
    oracle = quiet_service(tmp_path / "oracle.ckpt", FLEET_SETTINGS)
    try:
        for account in ANNOUNCED:
            oracle.registry.observe(account, DeviceStatus(device_id=account, online=True),
                                    oracle.clock())
        for shot in delivered:
            oracle._handle_update(shot.topic, shot.payload)
        expire_transfers(oracle)
    finally:
        oracle.writer.close()
    ignored = oracle.reassembler.ignored_parts  # the repeated parts
    assert sum(oracle.rejected.values()) + ignored == len(delivered) and oracle.accepted == 0
    assert ignored == len(range(7, SEEDED, 500))
    silent = sum(shot.account in SILENT for shot in delivered)
    assert oracle.rejected["unknown_device"] == silent > 0

    clean = run_fleet(production_broker(tmp_path / "clean", pki, passwords=PASSWORDS), [])
    caplog.clear()
    fuzzed = run_fleet(production_broker(tmp_path / "fuzzed", pki, passwords=PASSWORDS),
                       shots)

    assert clean["failure"] is None and fuzzed["failure"] is None  # it survived
    assert not clean["rejected"]
    # (agents go on to train the final model, so more than 6 may be accepted by now)
    assert clean["accepted"] >= 6 and fuzzed["accepted"] >= 6
    # The broker: every payload on a stranger's own topic delivered (and each birth), every
    # other one refused by the ACL, and every oversize one by hanging up on its sender.
    expected = {a: Counter(Success=sum(s.account == a and s.fate == DELIVERED for s in shots)
                           + (a in ANNOUNCED)) for a in STRANGERS}
    expected[MALLORY]["Not authorized"] = fates[DENIED]
    assert fuzzed["pubacks"] == expected
    # (paho reads the DISCONNECT's reason, Packet too large, unless the closed socket beats it)
    assert len(fuzzed["hung_up"]) == fuzzed["oversize_logged"] == fates[TOO_BIG]
    assert set(fuzzed["hung_up"]) <= {"Packet too large", "Unspecified error"}
    # The aggregator: every delivered payload counted exactly once, under the reason it gets
    # on its own (a repeated part of an open transfer is an ignored duplicate, not a
    # rejection), and nothing the broker refused.
    assert sum(fuzzed["rejected"].values()) + fuzzed["ignored"] == len(delivered)
    assert fuzzed["rejected"] == oracle.rejected
    assert fuzzed["ignored"] == ignored
    assert fuzzed["rejected"]["bad_topic"] == 0  # no invalid level got past the ACL
    logged = {m.group(1) for r in caplog.records
              if (m := re.match(r"rejected update on (.*) \(\w+\): ", r.getMessage()))}
    assert logged == {TOPICS.update(a) for a in STRANGERS}  # the only topics it ever saw
    assert fuzzed["seen_at_close"][0] >= fuzzed["first_half"]  # garbage landed mid-round
    # the rounds are those of the clean run: same participants, same model (to float32
    # rounding: the three updates may be summed in another order)
    assert [(r.round, r.participants, r.samples) for r in fuzzed["history"]] == \
        [(r.round, r.participants, r.samples) for r in clean["history"]]
    assert np.allclose(fuzzed["params"], clean["params"], rtol=1e-5, atol=1e-6)
    assert not np.array_equal(fuzzed["params"], build_model(
        "mlp", AggregatorConfig(**SETTINGS).model_config(), seed=0).get_flat())  # it trained
    drift = float(np.abs(fuzzed["params"] - clean["params"]).max())
    print(f"\nfuzz: {len(shots)} garbage payloads ({dict(fates)}), fleet run "
          f"{fuzzed['seconds']:.1f} s (clean {clean['seconds']:.1f} s), max parameter "
          f"difference {drift:.2g}; rejected {dict(fuzzed['rejected'])}")
