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
        self.online_count = 0  # kept as statuses come: counting is O(fleet)
        self.last_update: dict[str, float] = {}  # when each device's last update came in

    def heard_from(self, device_id: str, now: float) -> None:
        """An update of this device was accepted (the dashboard's "last update"). Only
        devices with a birth are kept: made-up ids on update topics cannot grow this."""
        if device_id in self.devices:
            self.last_update[device_id] = now

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
        self.online_count += info.online - (before is not None and before.online)
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
