"""Private NATS servers with an MQTT listener (MQTT 3.1.1 only), alone or as a cluster.

Each node gets free ports (client, cluster route, MQTT), its own JetStream store directory
and its own config file, so the machine's own NATS (4222) is never touched. NATS's MQTT
gateway keeps sessions, retained messages and QoS 1 queues in JetStream streams, which a
cluster replicates across its nodes.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from simulator.broker import free_port, port_open

NATS_SERVER = shutil.which("nats-server") or (
    "/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").exists() else None)
START_S = 30.0


def require_nats() -> str:
    if NATS_SERVER is None:
        pytest.skip("nats-server is not installed (Debian: apt-get install nats-server; "
                    ".ci/run installs it)")
    return NATS_SERVER


@dataclass
class NatsNode:
    name: str
    workdir: Path
    client_port: int = field(default_factory=free_port)
    cluster_port: int = field(default_factory=free_port)
    mqtt_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    def write_config(self, routes: list[int], *, cluster: bool) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        lines = [
            f"server_name: {self.name}",
            f"listen: 127.0.0.1:{self.client_port}",
            f'jetstream {{ store_dir: "{self.workdir / "js"}" }}',
            # fedmq's models come in parts of up to max_payload (128 KiB by default)
            "max_payload: 8MB",
            f"mqtt {{ listen: 127.0.0.1:{self.mqtt_port} }}",
        ]
        if cluster:
            route_list = ", ".join(f"nats-route://127.0.0.1:{p}" for p in routes)
            lines.append(f"cluster {{ name: fedmq-test, listen: 127.0.0.1:{self.cluster_port}, "
                         f"routes: [{route_list}] }}")
        path = self.workdir / "nats.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, config: Path) -> None:
        log = open(self.workdir / "nats.log", "ab")  # noqa: SIM115 - kept for the process
        self.proc = subprocess.Popen([require_nats(), "-c", str(config)], stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()

    def wait_ready(self, timeout: float = START_S) -> None:
        deadline = time.monotonic() + timeout
        while not port_open(self.mqtt_port):
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"nats-server {self.name} exited: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nats-server {self.name} did not open its MQTT port: "
                                   f"{self.log_tail()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: the node vanishes without closing anything."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.workdir / "nats.log").read_text(
                errors="replace").splitlines()[-lines:])
        return "(no log)"


class NatsCluster:
    """`size` nats-server nodes routed to each other (size 1: a lone server)."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.nodes = [NatsNode(f"n{i + 1}", workdir / f"n{i + 1}") for i in range(size)]

    def start(self) -> NatsCluster:
        routes = [n.cluster_port for n in self.nodes]
        cluster = len(self.nodes) > 1
        configs = [n.write_config(routes, cluster=cluster) for n in self.nodes]
        try:
            for node, config in zip(self.nodes, configs, strict=True):
                node.start(config)
            for node in self.nodes:
                node.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]
