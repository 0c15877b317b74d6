"""The fedmq wire protocol: topics and versioned msgpack messages (docs/protocol.md)."""

from fedmq.core.protocol.messages import (
    AggregatorStatus,
    DeviceActivity,
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
from fedmq.core.protocol.topics import FleetTopics, check_name
from fedmq.core.protocol.wire import PROTOCOL_VERSION, Message

__all__ = [
    "PROTOCOL_VERSION",
    "AggregatorStatus",
    "DeviceActivity",
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
