"""The shipped broker_config/ files, started for real on free loopback ports.

Only paths, ports and the central broker's address are rewritten, and every rewrite must
apply, so a path renamed in a shipped file fails loudly instead of pointing a test at /etc.
Certificates come from fedmq/ops/certs.py and passwords from mosquitto_passwd, exactly as
an operator makes them (broker_config/README.md).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from edge_agent.agent import EdgeAgent
from fedmq.ops.certs import Pki
from fedmq.ops.enroll import add_password
from fedmq.transport.mqtt import MqttLink
from fedmq.transport.tls import TlsFiles
from simulator.broker import LocalMosquitto, as_invoking_user, free_port

from .helpers import make_agents, wait_for

CONFIG_DIR = Path(__file__).resolve().parents[1] / "broker_config"
PASSWORD_PORT = 8883  # the shipped listeners; a test gets a free port for each
CERT_PORT = 8884
CONNECT_S = 30.0
AGGREGATOR = "fedmq-aggregator"  # acl.conf's aggregator account (user name = client id)


def read_shipped(name: str) -> str:
    return (CONFIG_DIR / name).read_text()


def rewrite(text: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        if old not in text:
            raise AssertionError(f"shipped config no longer contains {old!r}")
        text = text.replace(old, new)
    return text


def rewrite_listeners(text: str, ports: dict[int, int]) -> str:
    """`listener 8883` -> `listener {free port} 127.0.0.1`: never reachable from outside."""
    def sub(match: re.Match) -> str:
        return f"listener {ports[int(match.group(1))]} 127.0.0.1"
    new, count = re.subn(r"^listener (\d+)(?: \S+)?$", sub, text, flags=re.MULTILINE)
    assert count == len(ports), f"expected {len(ports)} listeners, found {count}"
    return new


@dataclass
class ProductionBroker:
    """production.conf + acl.conf with the fleet CA's server certificate and a password file."""

    pki: Pki
    mosquitto: LocalMosquitto
    etc: Path
    ports: dict[int, int]
    passwords: dict[str, str] = field(default_factory=dict)  # the accounts it was made with

    @property
    def password_url(self) -> str:
        return f"mqtts://127.0.0.1:{self.ports[PASSWORD_PORT]}"

    @property
    def cert_url(self) -> str:
        return f"mqtts://127.0.0.1:{self.ports[CERT_PORT]}"

    @property
    def passwd(self) -> Path:
        return self.etc / "passwd"

    def log_text(self) -> str:
        path = self.mosquitto.log_path
        return path.read_text() if path.exists() else ""

    def login(self, user: str) -> dict[str, str]:
        """AgentConfig / AggregatorConfig keys logging `user` in on port 8883 over TLS."""
        return {"username": user, "password": self.passwords[user],
                "ca_file": str(self.pki.ca.cert)}

    def password_link(self, user: str, password: str, **kwargs) -> MqttLink:
        """A link that logs in with a password on port 8883 (client id: the user name)."""
        kwargs.setdefault("client_id", user)
        return MqttLink(broker=self.password_url, username=user, password=password,
                        tls=TlsFiles(ca_file=str(self.pki.ca.cert)), **kwargs)

    def cert_link(self, name: str, pki: Pki | None = None, **kwargs) -> MqttLink:
        """A link that shows `name`'s client certificate from `pki` on port 8884."""
        issued = (pki or self.pki).client(name)
        kwargs.setdefault("client_id", name)
        return MqttLink(broker=self.cert_url,
                        tls=TlsFiles(ca_file=str(self.pki.ca.cert), cert_file=str(issued.cert),
                                     key_file=str(issued.key)), **kwargs)


def production_broker(root: Path, pki: Pki, *, passwords: dict[str, str],
                      etc_files: dict[str, Path] | None = None,
                      conf_d: dict[str, str] | None = None) -> ProductionBroker:
    """Lay out /etc/mosquitto/fedmq/ under `root` as broker_config/README.md says; not started.

    pki must hold the CA and a server certificate for 127.0.0.1.
    """
    etc, var, conf_dir = root / "etc", root / "var", root / "conf.d"
    for folder in (etc, var, conf_dir):
        folder.mkdir(parents=True)
    files = {"ca.crt": pki.ca.cert, "server.crt": pki.server.cert,
             "server.key": pki.server.key, "acl.conf": CONFIG_DIR / "acl.conf",
             **(etc_files or {})}
    for name, source in files.items():
        shutil.copy(source, etc / name)
    # mosquitto refuses to start without its password file, even if it is empty.
    (etc / "passwd").touch(mode=0o600)
    for user, password in passwords.items():
        add_password(etc / "passwd", user, password)
    for name, text in (conf_d or {}).items():
        (conf_dir / name).write_text(text)
    ports = {PASSWORD_PORT: free_port(), CERT_PORT: free_port()}
    mosq = LocalMosquitto(workdir=root, port=ports[PASSWORD_PORT],
                          extra_ports=(ports[CERT_PORT],))
    text = rewrite(read_shipped("production.conf"), {
        "/etc/mosquitto/fedmq/": f"{etc}/",
        "/var/lib/mosquitto/": f"{var}/",
        "/var/log/mosquitto/mosquitto.log": str(mosq.log_path),
        "/etc/mosquitto/conf.d": str(conf_dir),
    })
    mosq.config_text = as_invoking_user(rewrite_listeners(text, ports))
    return ProductionBroker(pki, mosq, etc, ports, dict(passwords))


def enrolled_agents(broker: ProductionBroker, stoppers, devices: list[int], *, total: int,
                    **overrides) -> list[EdgeAgent]:
    """helpers.make_agents, but device dev{i} logs in with its own account `dev{i}` (the
    ACL patterns confine every account to the topics carrying its name)."""
    return [agent for i in devices
            for agent in make_agents(broker.password_url, stoppers, 1, total=total, first=i,
                                     **broker.login(f"dev{i}"), **overrides)]


def bridge_conf(central: ProductionBroker, gateway_etc: Path) -> str:
    """bridge.conf pointing at `central`'s certificate port, files under `gateway_etc`."""
    return rewrite(read_shipped("bridge.conf"), {
        "central.example.org:8884": f"127.0.0.1:{central.ports[CERT_PORT]}",
        "/etc/mosquitto/fedmq/": f"{gateway_etc}/",
    })


@contextmanager
def running(*links: MqttLink) -> Iterator[tuple[MqttLink, ...]]:
    """Start links, wait until each is connected and subscribed; always stop them."""
    try:
        for link in links:
            link.start()
        for link in links:
            link.wait_connected(CONNECT_S)
            wait_for(link.subscribed.is_set, f"{link.client_id}'s subscriptions")
        yield links
    finally:
        for link in links:
            link.stop()
