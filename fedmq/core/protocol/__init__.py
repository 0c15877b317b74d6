"""The fedmq wire protocol: topics and versioned msgpack messages (docs/protocol.md)."""

from fedmq.core.protocol.messages import (
    AggregatorStatus,
    CohortDigest,
    DeviceActivity,
    DeviceStatus,
    EncodedTensor,
    EvalMetrics,
    EvalReport,
    ModelAnnouncement,
    ModelChunk,
    Part,
    PayloadInfo,
    Receipt,
    TaskConfig,
    Update,
    cohort_digest,
    device_key,
    evaluates,
)
from fedmq.core.protocol.topics import UPDATE_BUCKETS, FleetTopics, check_name, update_bucket
from fedmq.core.protocol.wire import PROTOCOL_VERSION, Message

__all__ = [
    "PROTOCOL_VERSION",
    "UPDATE_BUCKETS",
    "AggregatorStatus",
    "CohortDigest",
    "DeviceActivity",
    "DeviceStatus",
    "EncodedTensor",
    "EvalMetrics",
    "EvalReport",
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
    "cohort_digest",
    "device_key",
    "evaluates",
    "update_bucket",
]
