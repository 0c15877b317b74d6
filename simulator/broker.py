"""Start and stop a private mosquitto on a free loopback port (simulator and tests).

It never touches a broker that is already running: it picks its own port and writes its
own config into a temporary directory, so it can be killed, restarted and reconfigured.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from fedmq.errors import BrokerError

# Settings for a loopback development broker; the comment on each says why.
DEV_SETTINGS = """\
allow_anonymous true
# Devices that reconnect find their queued QoS 1 messages; and the aggregator's queue holds
# a whole fleet's retained births (sent at once when it subscribes) and a round of its
# updates: past the limit mosquitto drops QoS 1 messages silently, PUBACK already sent.
max_queued_messages 100000
# The default in-flight window of 20 throttles 1 KB QoS 1 traffic ~15x on a busy box.
max_inflight_messages 100
# Nagle's algorithm plus delayed ACKs stall each small reply (PUBACK, receipt) ~40 ms.
set_tcp_nodelay true
"""

INSTALL_HINT = (
    "mosquitto is not installed; on Debian/Ubuntu run: sudo apt-get install -y mosquitto "
    "(or pass --broker mqtt://host:port to use a broker that is already running)"
)


def as_invoking_user(text: str) -> str:
    """Started as root, mosquitto drops to the `mosquitto` user, which cannot write into a
    private (0700) work directory: no log, no persistence file. A private broker stays
    with whoever started it (a non-root start never switches user)."""
    return text + ("\nuser root\n" if os.geteuid() == 0 else "")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def site_bridge(*, central_port: int, site: str, fleet: str, host: str = "127.0.0.1") -> str:
    """Mosquitto bridge lines that make a broker a site of a central one (docs/scale.md):
    the site aggregator's partial aggregates and the devices' statuses go up (so the
    central aggregator plans cohorts with them); models, the aggregator's status and the
    site's receipts come down. The devices' own updates never cross the bridge."""
    prefix = f"fedmq/{fleet}"
    return "\n".join([
        f"connection {site}-uplink",
        f"address {host}:{central_port}",
        "bridge_protocol_version mqttv50",
        f"remote_clientid {site}-bridge",
        "cleansession false",  # what one side owes the other survives a broken uplink
        "restart_timeout 1 5",
        f"topic {prefix}/partial/{site} out 1",
        f"topic {prefix}/device/+/status out 1",
        f"topic {prefix}/model/# in 1",
        f"topic {prefix}/aggregator/status in 1",
        f"topic {prefix}/receipt/{site} in 1",
    ])


class LocalMosquitto:
    """A mosquitto child process; `url` is ready once `start()` returns."""

    def __init__(self, *, port: int | None = None, extra_config: str = "",
                 persistence: bool = False, workdir: str | Path | None = None,
                 config_text: str = "", extra_ports: tuple[int, ...] = ()) -> None:
        """config_text: a complete mosquitto.conf used instead of the development settings
        (its listeners must include `port`); extra_ports: its other listeners, waited for
        too."""
        self.binary = shutil.which("mosquitto") or _sbin("mosquitto")
        if self.binary is None:
            raise BrokerError(INSTALL_HINT)
        self._tmp = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fedmq-mosquitto-")
            workdir = self._tmp.name
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.extra_config = extra_config
        self.persistence = persistence
        self.config_text = config_text
        self.extra_ports = extra_ports
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    def write_config(self) -> Path:
        path = self.workdir / "mosquitto.conf"
        if self.config_text:
            path.write_text(self.config_text)
            return path
        lines = [f"listener {self.port} 127.0.0.1", DEV_SETTINGS]
        if self.persistence:
            lines += ["persistence true", f"persistence_location {self.workdir}/"]
        lines += [f"log_dest file {self.log_path}", "log_type error", "log_type warning",
                  "log_type notice", self.extra_config]
        path.write_text(as_invoking_user("\n".join(lines) + "\n"))
        return path

    def start(self, timeout: float = 15.0) -> LocalMosquitto:
        config = self.write_config()
        self.process = subprocess.Popen(
            [self.binary, "-c", str(config)], stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                stderr = self.process.stderr
                err = stderr.read().decode(errors="replace") if stderr else ""
                log_text = self.log_path.read_text() if self.log_path.exists() else ""
                raise BrokerError(f"mosquitto exited at start-up (port {self.port}): "
                                  f"{err.strip()} {log_text.strip()[-500:]}")
            if all(port_open(p) for p in (self.port, *self.extra_ports)):
                return self
            time.sleep(0.05)
        self.stop()
        raise BrokerError(f"mosquitto did not listen on port {self.port} within {timeout:.0f} s")

    def stop(self, *, kill: bool = False, timeout: float = 10.0) -> None:
        """SIGTERM (clean, saves persistence) or SIGKILL (loses everything not yet saved)."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
        if proc.stderr:
            proc.stderr.close()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> LocalMosquitto:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def _sbin(name: str) -> str | None:
    for folder in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        candidate = Path(folder) / name
        if candidate.is_file():
            return str(candidate)
    return None
