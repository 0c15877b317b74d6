"""MQTT topic names for one fleet, as a value object with pure parsing (no broker needed)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from fedmq.errors import ConfigError, ProtocolError

ROOT = "fedmq"
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


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
        return f"{self.prefix}/update/{check_name(device_id, 'device id')}"

    @property
    def update_filter(self) -> str:
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

    def device_from_update_topic(self, topic: str) -> str:
        """The device id a message on `update/{device_id}` claims to come from."""
        return self._device_at(topic, f"{self.prefix}/update/", "")

    def source_from_partial_topic(self, topic: str) -> str:
        """The worker or site a message on `partial/{source}` claims to come from."""
        return self._device_at(topic, f"{self.prefix}/partial/", "")

    def device_from_status_topic(self, topic: str) -> str:
        return self._device_at(topic, f"{self.prefix}/device/", "/status")

    @staticmethod
    def _device_at(topic: str, head: str, tail: str) -> str:
        if not (topic.startswith(head) and topic.endswith(tail)):
            raise ProtocolError(f"topic {topic!r} is not under {head!r}", reason="bad_topic")
        device = topic[len(head) : len(topic) - len(tail)]
        if not _NAME.fullmatch(device):
            raise ProtocolError(f"bad device id in topic {topic!r}", reason="bad_topic")
        return device
