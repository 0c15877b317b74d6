"""A fleet on RabbitMQ's MQTT plugin: a private node (its own node name, ports, epmd port,
database, log and enabled_plugins file; never the machine's RabbitMQ on 5672).

RabbitMQ before 3.13 (Debian 12 ships 3.10) speaks MQTT 3.1.1 only and cannot even parse
an MQTT 5 CONNECT: it hangs up without a CONNACK, which `mqtt_version = "auto"` takes
for "no MQTT 5" after two tries. Skipped with the reason where the node cannot start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from simulator.broker import port_open
from simulator.fleet import Simulation, SimulationConfig

pytestmark = pytest.mark.integration

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
START_S = 90.0


def distinct_ports(count: int) -> list[int]:
    """Free loopback ports, all different: held open together while they are picked (one
    at a time, the kernel may hand the same port out twice)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


class RabbitNode:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.amqp_port, self.mqtt_port, self.dist_port, self.epmd_port = distinct_ports(4)
        self.procs: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    def start(self) -> RabbitNode:
        d = self.workdir
        d.mkdir(parents=True, exist_ok=True)
        (d / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        (d / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}\n"
            f"mqtt.listeners.tcp.default = 127.0.0.1:{self.mqtt_port}\n"
            "mqtt.allow_anonymous = true\n")
        env = dict(os.environ, HOME=str(d), ERL_EPMD_PORT=str(self.epmd_port),
                   ERL_CRASH_DUMP=str(d / "erl_crash.dump"),
                   RABBITMQ_NODENAME=f"fedmqtest{self.amqp_port}@localhost",
                   RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
                   RABBITMQ_NODE_PORT=str(self.amqp_port),
                   RABBITMQ_DIST_PORT=str(self.dist_port),
                   RABBITMQ_MNESIA_BASE=str(d / "mnesia"), RABBITMQ_LOG_BASE=str(d / "log"),
                   RABBITMQ_ENABLED_PLUGINS_FILE=str(d / "enabled_plugins"),
                   RABBITMQ_CONFIG_FILE=str(d / "rabbitmq"),
                   RABBITMQ_PID_FILE=str(d / "pid"),
                   RABBITMQ_PLUGINS_EXPAND_DIR=str(d / "plugins-expand"))
        log = open(d / "out.txt", "wb")  # noqa: SIM115 - handed to the process
        # The node starts its own epmd on our epmd port; stop() ends it by that port.
        self.procs.append(subprocess.Popen([RABBITMQ_SERVER], stdout=log,
                                           stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True))
        log.close()
        deadline = time.monotonic() + START_S
        while not port_open(self.mqtt_port):
            if self.procs[-1].poll() is not None or time.monotonic() > deadline:
                tail = (d / "out.txt").read_text(errors="replace")[-800:]
                self.stop()
                pytest.skip(f"a private RabbitMQ node (ports amqp {self.amqp_port}, mqtt "
                            f"{self.mqtt_port}, dist {self.dist_port}, epmd {self.epmd_port}) "
                            f"did not open its MQTT port: {tail}")
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)  # its own session: script and beam
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
        # the epmd the node started on our private port (never the machine's on 4369)
        subprocess.run([shutil.which("epmd") or "epmd", "-port", str(self.epmd_port), "-kill"],
                       capture_output=True, timeout=30, check=False)


@pytest.fixture
def rabbit(tmp_path) -> Iterator[RabbitNode]:
    if not Path(RABBITMQ_SERVER).exists() or shutil.which("epmd") is None:
        pytest.skip("rabbitmq-server is not installed (Debian: apt-get install rabbitmq-server)")
    node = RabbitNode(tmp_path / "rabbit").start()
    yield node
    node.stop()


@pytest.mark.timeout(300)
def test_simulate_on_rabbitmq_falls_back_to_311_and_trains(rabbit, caplog):
    caplog.set_level(logging.WARNING)
    config = SimulationConfig(broker=rabbit.url, devices=4, rounds=3, timeout_s=150)
    with Simulation(config) as sim:
        result = sim.wait()
        assert sim.config.mqtt_version == "3.1.1"
    assert len(result.rounds) == 3 and result.final_accuracy > 0.5
    assert all(r.participants == 4 for r in result.rounds)
    fallbacks = [r for r in caplog.records if "does not speak MQTT 5" in r.message]
    assert len(fallbacks) == 1 and rabbit.url in fallbacks[0].message
