"""The fedmq wire protocol: topics and versioned msgpack messages (docs/protocol.md)."""

from .messages import (
    AggregatorStatus,
    DeviceStatus,
    EncodedTensor,
    ModelAnnouncement,
    ModelChunk,
    Part,
    PayloadInfo,
    Receipt,
    TaskConfig,
    Update,
)
from .topics import FleetTopics, check_name
from .wire import PROTOCOL_VERSION, Message

__all__ = [
    "PROTOCOL_VERSION",
    "AggregatorStatus",
    "DeviceStatus",
    "EncodedTensor",
    "FleetTopics",
    "Message",
    "ModelAnnouncement",
    "ModelChunk",
    "Part",
    "PayloadInfo",
    "Receipt",
    "TaskConfig",
    "Update",
    "check_name",
]
