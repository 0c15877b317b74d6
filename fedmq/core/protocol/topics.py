"""MQTT topic names for one fleet, as a value object with pure parsing (no broker needed)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from fedmq.errors import ConfigError, ProtocolError

ROOT = "fedmq"
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")

# Topic layout 2: a device publishes its updates on `update/{bucket}/{device_id}`, where
# bucket = (first 4 bytes of SHA-256(device id), big-endian) mod UPDATE_BUCKETS. Fixed for
# the protocol, not announced: a device must know its topic before it has heard any
# announcement (a re-send after a restart), and the broker's ACL grants it by pattern.
# An aggregator worker subscribes only to its buckets, so the broker sends each update
# to one worker instead of to all of them. 64 buckets: up to 64 workers, any N of them
# (bucket b goes to worker b mod N: each bucket to exactly one worker; N dividing 64
# gives every worker the same share). Layout 1 (`update/{device_id}`) is refused
# (`old_topic`, docs/protocol.md says why).
UPDATE_BUCKETS = 64
TOPIC_LAYOUT = 2


# Bytes of a device's key (device_key): its entry in an announcement's cohort digest
# (messages.py) and, as a big-endian integer, what its update bucket is taken from.
DEVICE_KEY_BYTES = 4


def device_key(device_id: str) -> bytes:
    """The first 4 bytes of SHA-256(device id). SHA-256 because it is the same in every
    process and language (Python's hash is salted) and mixes well."""
    return hashlib.sha256(device_id.encode()).digest()[:DEVICE_KEY_BYTES]


def update_bucket(device_id: str) -> int:
    """The update bucket of a device: device_key(id) as a big-endian integer, mod
    UPDATE_BUCKETS."""
    return int.from_bytes(device_key(device_id), "big") % UPDATE_BUCKETS


def check_name(value: str, what: str) -> str:
    """Fleet and device names become single topic levels: no wildcards, no slashes."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ConfigError(
            f"{what} {value!r} is not valid: use 1-64 characters from A-Z a-z 0-9 _ . -"
        )
    return value


@dataclass(frozen=True, slots=True)
class FleetTopics:
    """Every topic of one fleet lives under `fedmq/{fleet}/`."""

    fleet: str

    def __post_init__(self) -> None:
        check_name(self.fleet, "fleet name")

    @property
    def prefix(self) -> str:
        return f"{ROOT}/{self.fleet}"

    @property
    def model_current(self) -> str:
        return f"{self.prefix}/model/current"

    @property
    def model_payload(self) -> str:
        """Chunks of the model live below this level: `model/payload/{index}`."""
        return f"{self.prefix}/model/payload"

    def model_payload_chunk(self, index: int) -> str:
        return f"{self.model_payload}/{index}"

    @property
    def model_payload_filter(self) -> str:
        return f"{self.model_payload}/+"

    @property
    def model_delta(self) -> str:
        """Chunks of the delta from the previous model version: `model/delta/{index}`."""
        return f"{self.prefix}/model/delta"

    def model_delta_chunk(self, index: int) -> str:
        return f"{self.model_delta}/{index}"

    @property
    def model_delta_filter(self) -> str:
        return f"{self.model_delta}/+"

    def update(self, device_id: str) -> str:
        """`update/{bucket}/{device_id}` (topic layout 2, see UPDATE_BUCKETS)."""
        check_name(device_id, "device id")
        return f"{self.prefix}/update/{update_bucket(device_id)}/{device_id}"

    @property
    def update_filter(self) -> str:
        """Every device's updates, all buckets."""
        return f"{self.prefix}/update/+/+"

    def update_bucket_filter(self, bucket: int) -> str:
        """The updates of the devices in one bucket (what a worker subscribes to)."""
        if not 0 <= bucket < UPDATE_BUCKETS:
            raise ConfigError(f"update bucket {bucket} is not in 0..{UPDATE_BUCKETS - 1}")
        return f"{self.prefix}/update/{bucket}/+"

    @property
    def legacy_update_filter(self) -> str:
        """Topic layout 1's `update/{device_id}`: subscribed to only to refuse what an old
        device still sends there (`old_topic`), so that it is logged and counted."""
        return f"{self.prefix}/update/+"

    def partial(self, source: str) -> str:
        """Where a worker or site aggregator sends its partial aggregates (Update with
        `represents` >= 1); its receipts come back on `receipt/{source}`."""
        return f"{self.prefix}/partial/{check_name(source, 'partial source')}"

    @property
    def partial_filter(self) -> str:
        return f"{self.prefix}/partial/+"

    def receipt(self, device_id: str) -> str:
        return f"{self.prefix}/receipt/{check_name(device_id, 'device id')}"

    def device_status(self, device_id: str) -> str:
        return f"{self.prefix}/device/{check_name(device_id, 'device id')}/status"

    @property
    def device_status_filter(self) -> str:
        return f"{self.prefix}/device/+/status"

    @property
    def aggregator_status(self) -> str:
        return f"{self.prefix}/aggregator/status"

    @property
    def aggregator_sync(self) -> str:
        """The aggregator's own echo: what it publishes here comes back after every retained
        device birth its subscription brought (the broker keeps one client's order)."""
        return f"{self.prefix}/aggregator/sync"

    @property
    def he_decrypt(self) -> str:
        """Aggregator -> key holder: each round's encrypted sum (DecryptRequest); with
        `he = "ckks"` only the key holder may read it."""
        return f"{self.prefix}/he/decrypt"

    @property
    def he_sum(self) -> str:
        """Key holder -> aggregator: the decrypted sum (DecryptReply); only the key holder
        may write it, only the aggregator read it."""
        return f"{self.prefix}/he/sum"

    def device_from_update_topic(self, topic: str) -> str:
        """The device id a message on `update/{bucket}/{device_id}` claims to come from;
        the bucket must be that device's (written as a plain decimal), so each device has
        exactly one update topic and reaches exactly one worker."""
        rest = self._device_at(topic, f"{self.prefix}/update/", "", levels=2)
        bucket, slash, device = rest.partition("/")
        if not slash:  # one level: topic layout 1
            if not _NAME.fullmatch(bucket):
                raise ProtocolError(f"bad device id in topic {topic!r}", reason="bad_topic")
            raise ProtocolError(
                f"update on {topic!r}, the topic of fedmq's topic layout 1: this aggregator "
                f"takes updates on update/{{bucket}}/{{device}} (layout {TOPIC_LAYOUT}); "
                "upgrade the device's fedmq", reason="old_topic")
        if not _NAME.fullmatch(device):
            raise ProtocolError(f"bad device id in topic {topic!r}", reason="bad_topic")
        if bucket != str(update_bucket(device)):
            raise ProtocolError(f"update of {device} on bucket {bucket!r}, not its bucket "
                                f"{update_bucket(device)} (topic {topic!r})",
                                reason="bad_topic")
        return device

    def source_from_partial_topic(self, topic: str) -> str:
        """The worker or site a message on `partial/{source}` claims to come from."""
        return self._device_at(topic, f"{self.prefix}/partial/", "")

    def device_from_status_topic(self, topic: str) -> str:
        return self._device_at(topic, f"{self.prefix}/device/", "/status")

    @staticmethod
    def _device_at(topic: str, head: str, tail: str, *, levels: int = 1) -> str:
        if not (topic.startswith(head) and topic.endswith(tail)):
            raise ProtocolError(f"topic {topic!r} is not under {head!r}", reason="bad_topic")
        device = topic[len(head) : len(topic) - len(tail)]
        if levels > 1:  # the caller checks each level
            if device.count("/") >= levels:
                raise ProtocolError(f"topic {topic!r} has too many levels", reason="bad_topic")
            return device
        if not _NAME.fullmatch(device):
            raise ProtocolError(f"bad device id in topic {topic!r}", reason="bad_topic")
        return device
