"""One agent per state directory.

Two agents sharing one state_dir (every agent on a host pointed at /var/lib/fedmq) load
each other's outbox and send the other device's stored updates under their own topic,
which the aggregator refuses as `wrong_topic`, and they overwrite each other's
error-feedback residual. An agent therefore holds an exclusive lock on `agent.lock` in its
directory while it runs (the kernel drops it when the process dies, however it dies), and
the file names the device, so a different device later refuses a directory that still
holds the first one's state.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from fedmq.errors import ConfigError

LOCK_NAME = "agent.lock"


class StateDirLock:
    """Held from construction until `release()`; ConfigError if another agent has it."""

    def __init__(self, directory: str | Path, device_id: str) -> None:
        import fcntl  # POSIX; agents run on Linux devices

        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / LOCK_NAME
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._owner() or "another agent"
            self.release()
            raise ConfigError(
                f"state_dir {self.directory} is in use by {holder}; give every agent its own "
                "state_dir (the fedmq-agent@NAME unit uses /var/lib/fedmq/agent-NAME)"
            ) from None
        previous = self._owner().split(" ")[0]
        if previous and previous != device_id and self._holds_state():
            self.release()
            raise ConfigError(
                f"state_dir {self.directory} holds the state of device {previous}, not "
                f"{device_id}: its stored updates would be sent under the wrong name; give "
                f"{device_id} its own state_dir, or empty this one if {previous} is gone")
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{device_id} pid {os.getpid()}\n".encode(), 0)

    def _owner(self) -> str:
        assert self._fd is not None
        return os.pread(self._fd, 200, 0).decode(errors="replace").strip()

    def _holds_state(self) -> bool:
        """The residual or stored updates (edge_agent/agent.py keeps them here)."""
        outbox = self.directory / "outbox"
        return ((self.directory / "agent-state.bin").exists()
                or (outbox.is_dir() and any(outbox.iterdir())))

    def release(self) -> None:
        """Unlock (the file stays: it names the device the state belongs to)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
