"""One secure-aggregation round with n devices and a server in one process, no broker.

Every message goes through its msgpack payload both ways (so byte counts are real and
decoding is exercised), devices drop out at the stage they are told to, and the clock
jumps to each stage's deadline when nothing is left to deliver. For tests and for
benchmarks/secagg.py; the MQTT wiring replaces `_deliver` with publishes.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from fedmq.core.protocol.wire import Message, decode_any
from fedmq.core.secagg.client import SecAggClient
from fedmq.core.secagg.messages import (
    SECAGG_MESSAGES,
    MaskedInput,
    NeighbourKeys,
    RoutedShares,
    SecAggSetup,
    UnmaskRequest,
)
from fedmq.core.secagg.server import Outbound, SecAggResult, SecAggServer, StageTimeouts
from fedmq.errors import SecureAggregationError

# Where a device can vanish: it never handles this message (and so never answers it).
BEFORE_KEYS = "before_keys"  # ignores the setup: advertises nothing
BEFORE_SHARES = "before_shares"  # advertised keys, ignores its neighbours' keys
BEFORE_INPUT = "before_input"  # shared its secrets, sends no masked input
AFTER_INPUT = "after_input"  # sent its masked input, does not answer the unmask request
_IGNORES: dict[str, type[Message]] = {BEFORE_KEYS: SecAggSetup, BEFORE_SHARES: NeighbourKeys,
                                      BEFORE_INPUT: RoutedShares, AFTER_INPUT: UnmaskRequest}
DROP_STAGES = tuple(_IGNORES)


def seeded_entropy(seed: bytes | str | int) -> Callable[[int], bytes]:
    """A reproducible byte source for tests and benchmarks; never for real rounds."""
    return random.Random(seed).randbytes


@dataclass(slots=True)
class RoundReport:
    """What happened in one simulated round."""

    result: SecAggResult | None
    error: SecureAggregationError | None
    expected: np.ndarray  # plain field sum of the inputs that should be in the result
    counted: tuple[str, ...]  # devices whose input should be in the result
    bytes_up: dict[str, int] = field(default_factory=dict)  # by message kind
    bytes_down: dict[str, int] = field(default_factory=dict)
    device_seconds: float = 0.0  # summed over devices
    server_seconds: float = 0.0

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_up.values()) + sum(self.bytes_down.values())


def simulate_round(setup: SecAggSetup, inputs: Mapping[str, np.ndarray], *,
                   drops: Mapping[str, str] | None = None,
                   timeouts: StageTimeouts | None = None,
                   entropy_seed: bytes | str | int | None = None,
                   float_inputs: bool = False,
                   observe: Callable[[Message], None] | None = None) -> RoundReport:
    """Run the round; `inputs` holds each device's field elements (or float updates with
    `float_inputs`, quantized by the device), `drops` the stage each dropout vanishes at.
    `observe` sees every message the server receives (the server's view).
    SecureAggregationError is reported, not raised."""
    drops = dict(drops or {})
    unknown = set(drops.values()) - set(DROP_STAGES)
    if unknown:
        raise ValueError(f"unknown drop stages {sorted(unknown)}; use {DROP_STAGES}")
    clients = {device: _client(device, entropy_seed) for device in setup.participants}
    report = RoundReport(result=None, error=None, expected=setup.field.zeros(0), counted=())
    now = 0.0
    started = time.perf_counter()
    server = SecAggServer(setup, timeouts=timeouts, now=now)
    queue: deque[Outbound] = deque(server.start())
    report.server_seconds += time.perf_counter() - started
    submitted: set[str] = set()
    counted: set[str] = set()
    gone: set[str] = set()

    def to_server(message: Message) -> None:
        payload = message.to_payload()
        report.bytes_up[message.KIND] = report.bytes_up.get(message.KIND, 0) + len(payload)
        if observe is not None:
            observe(message)
        started = time.perf_counter()
        try:
            handled = server.receive(decode_any(payload, *SECAGG_MESSAGES), now=now)
        except SecureAggregationError as exc:
            raise _RoundLost(exc) from None  # not to be taken for the device refusing
        finally:
            report.server_seconds += time.perf_counter() - started
        if isinstance(message, MaskedInput) and handled.status == "accepted":
            counted.add(message.device_id)
        queue.extend(handled.outgoing)

    def to_device(device: str, payload: bytes, kind: type[Message]) -> None:
        if device in gone:
            return
        if device in drops and kind is _IGNORES[drops[device]]:
            gone.add(device)  # vanished: ignores everything from now on
            return
        report.bytes_down[kind.KIND] = report.bytes_down.get(kind.KIND, 0) + len(payload)
        client = clients[device]
        started = time.perf_counter()
        replies = client.receive(decode_any(payload, *SECAGG_MESSAGES))
        if device not in submitted and client.setup is not None:
            submitted.add(device)
            x = inputs[device]
            replies += client.submit(x) if float_inputs else client.submit_elements(x)
        report.device_seconds += time.perf_counter() - started
        for reply in replies:
            to_server(reply)

    try:
        while server.stage not in ("done", "failed"):
            while queue:
                out = queue.popleft()
                payload = out.message.to_payload()
                for device in [out.to] if out.to is not None else setup.participants:
                    try:
                        to_device(device, payload, type(out.message))
                    except SecureAggregationError:
                        gone.add(device)  # a device that refuses is a dropout
            now = server.deadline
            started = time.perf_counter()
            queue.extend(server.tick(now))
            report.server_seconds += time.perf_counter() - started
    except SecureAggregationError as exc:
        report.error = exc
    except _RoundLost as lost:
        report.error = lost.error
    report.result = server.result
    report.counted = tuple(d for d in setup.participants if d in counted)
    total = setup.field.zeros(setup.vector_size)
    if not float_inputs:  # quantizing is random: compare float sums instead
        for device in report.counted:
            setup.field.add_into(total, setup.field.reduce(np.asarray(inputs[device])))
    report.expected = total
    return report


class _RoundLost(Exception):
    """The server lost the round while handling a device's message."""

    def __init__(self, error: SecureAggregationError) -> None:
        super().__init__(str(error))
        self.error = error


def _client(device: str, entropy_seed: bytes | str | int | None) -> SecAggClient:
    if entropy_seed is None:
        return SecAggClient(device)
    rng = np.random.default_rng(random.Random(f"{entropy_seed}/{device}/q").getrandbits(64))
    return SecAggClient(device, entropy=seeded_entropy(f"{entropy_seed}/{device}"), rng=rng)
