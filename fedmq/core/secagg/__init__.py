"""Secure aggregation (SecAgg+, Bell et al. 2020, on Bonawitz et al. 2017), sans I/O.

The server learns the sum of the devices' quantized updates and nothing about any one
of them, even when devices drop out mid-round. Shared by both sides; pure like the rest
of fedmq.core (no sockets, no files). `cryptography` (the `secure` extra) is imported
only when keys, masks or shares are made. Stages and messages: docs/secagg.md.

    field.py     Z_2^bits arithmetic, stochastic quantization into the field
    prg.py       mask expansion (ChaCha20), domain-separated
    shamir.py    t-of-k sharing of 32-byte secrets
    graph.py     the sparse neighbour graph and its (k, t)
    keys.py      X25519 + HKDF key agreement, share encryption
    messages.py  the versioned wire messages
    client.py    a device's stage machine
    server.py    the server's stage machine, round planning
    simulate.py  one whole round in one process (tests, benchmarks)
"""

from fedmq.core.secagg.client import SecAggClient
from fedmq.core.secagg.field import Field, Quantizer
from fedmq.core.secagg.graph import GraphParameters, choose_parameters
from fedmq.core.secagg.messages import (
    SECAGG_MESSAGES,
    AdvertiseKeys,
    MaskedInput,
    NeighbourKeys,
    RoutedShares,
    SecAggSetup,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from fedmq.core.secagg.server import (
    Handled,
    Outbound,
    SecAggResult,
    SecAggServer,
    StageTimeouts,
    plan_setup,
)

__all__ = [
    "SECAGG_MESSAGES",
    "AdvertiseKeys",
    "Field",
    "GraphParameters",
    "Handled",
    "MaskedInput",
    "NeighbourKeys",
    "Outbound",
    "Quantizer",
    "RoutedShares",
    "SecAggClient",
    "SecAggResult",
    "SecAggServer",
    "SecAggSetup",
    "ShareKeys",
    "StageTimeouts",
    "UnmaskRequest",
    "UnmaskResponse",
    "choose_parameters",
    "plan_setup",
]
