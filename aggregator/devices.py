"""Which devices exist, which are online, and what they can do, from their status messages.

Births (retained, online with capabilities) and Last Wills (offline) arrive on
`device/{id}/status`; this keeps the latest of each device. Pure: the service feeds it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from fedmq.core.protocol import DeviceStatus
from fedmq.errors import ProtocolError


@dataclass(frozen=True)
class DeviceInfo:
    device_id: str
    online: bool
    capabilities: dict
    agent_version: str
    last_change: float  # the registry's clock when this status arrived


class DeviceRegistry:
    def __init__(self) -> None:
        self.devices: dict[str, DeviceInfo] = {}

    def observe(self, topic_device: str, status: DeviceStatus, now: float) -> DeviceInfo:
        """Record a status; a device may only speak for itself (topic and payload agree)."""
        if status.device_id != topic_device:
            raise ProtocolError(f"status for {status.device_id} arrived on {topic_device}'s "
                                "topic", reason="wrong_topic")
        before = self.devices.get(topic_device)
        # A Last Will carries no capabilities: keep what the birth told us.
        capabilities = status.capabilities or (before.capabilities if before else {})
        info = DeviceInfo(topic_device, status.online, dict(capabilities),
                          status.agent_version or (before.agent_version if before else ""), now)
        self.devices[topic_device] = info
        return info

    def online(self) -> list[str]:
        return sorted(d for d, info in list(self.devices.items()) if info.online)

    def known(self, device_id: str) -> bool:
        return device_id in self.devices

    def declared_examples(self, device_id: str) -> int | None:
        """The training examples the device said it holds in its birth (capability
        `examples`); None: it said nothing usable. A claim, not a fact: it only ever
        lowers what the device's own updates may weigh (bounds.py)."""
        info = self.devices.get(device_id)
        return None if info is None else _examples(info.capabilities)

    def typical_declared_examples(self) -> float | None:
        """The median of what the online devices declared (None: none declared)."""
        declared = [n for info in list(self.devices.values()) if info.online
                    and (n := _examples(info.capabilities)) is not None]
        return statistics.median(declared) if declared else None


def _examples(capabilities: dict) -> int | None:
    value = capabilities.get("examples")
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None
