"""fedmq: federated learning for fleets of edge and IoT devices over MQTT.

This package is what both sides share — the pure core (wire protocol, codecs, chunking,
model transfer, signing), the MQTT transport, storage, configuration, models and tasks —
and it imports neither the device side (`edge_agent`) nor the server side
(`aggregator`). It stays installable with paho-mqtt, numpy and msgpack alone.
"""

from fedmq.errors import (
    BrokerError,
    CodecError,
    ConfigError,
    DataError,
    FedmqError,
    MissingExtraError,
    ProtocolError,
)

__version__ = "0.1.0"

__all__ = [
    "BrokerError",
    "CodecError",
    "ConfigError",
    "DataError",
    "FedmqError",
    "MissingExtraError",
    "ProtocolError",
    "__version__",
]
