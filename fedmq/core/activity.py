"""A device's retained status, kept fresh: the birth plus what the device has done since.

Pure (no clock, no transport): the agent and the simulator's hosted devices feed it what
they trained, sent and still hold, and publish the status it makes when `due`. Fresh
statuses are at most `interval_s` apart: one per update per device would add a retained
message per update to a 10,000-device fleet, and an operator's table needs seconds, not
milliseconds.
"""

from __future__ import annotations

from typing import Any

from fedmq.core.protocol import DeviceActivity, DeviceStatus


class ActivityReport:
    """One device's status as it stands; `interval_s` 0: the birth alone, never refreshed."""

    __slots__ = ("_dirty", "_last", "agent_version", "backend", "bytes_up", "capabilities",
                 "codec", "device_id", "interval_s", "last_round", "pending", "updates")

    def __init__(self, *, device_id: str, capabilities: dict[str, Any], agent_version: str,
                 interval_s: float) -> None:
        if not interval_s >= 0:
            raise ValueError(f"status interval {interval_s} must be >= 0 seconds")
        self.device_id = device_id
        self.capabilities = capabilities  # shared, never changed: hosted devices share one
        self.agent_version = agent_version
        self.interval_s = interval_s
        self.last_round = self.updates = self.bytes_up = self.pending = 0
        self.codec = self.backend = ""
        self._dirty = False
        self._last = float("-inf")  # when the last status was made (monotonic)

    def trained(self, *, round: int, codec: str, backend: str) -> None:
        self.last_round = max(self.last_round, round)
        self.updates += 1
        self.codec, self.backend = codec, backend
        self._dirty = True

    def uploaded(self, nbytes: int) -> None:
        if nbytes:
            self.bytes_up += nbytes
            self._dirty = True

    def holding(self, pending: int) -> None:
        """Updates in the outbox now."""
        if pending != self.pending:
            self.pending = pending
            self._dirty = True

    def due(self, now: float) -> bool:
        """Something changed since the last status, and `interval_s` has passed."""
        return self._dirty and self.interval_s > 0 and now - self._last >= self.interval_s

    @property
    def dirty(self) -> bool:
        return self._dirty and self.interval_s > 0

    def status(self, *, online: bool, now: float, wall: float) -> DeviceStatus:
        """The whole status (a retained message replaces the birth, so it repeats the
        capabilities); `now` (monotonic) starts the next interval, `wall` is its `ts`."""
        self._dirty, self._last = False, now
        activity = DeviceActivity(last_round=self.last_round, updates=self.updates,
                                  bytes_up=self.bytes_up, pending=self.pending,
                                  codec=self.codec, backend=self.backend)
        return DeviceStatus(device_id=self.device_id, online=online,
                            capabilities=self.capabilities, agent_version=self.agent_version,
                            ts=wall, activity=activity)
