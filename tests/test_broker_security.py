"""broker_config/ against a real mosquitto: who may connect, and who may publish or read what.

Every broker here runs a shipped file with only paths and ports rewritten
(tests/secure_brokers.py); every client is the project's MqttLink, so the client side of
TLS (fedmq/transport/tls.py) is exercised too. A "never receives" check always waits for a
message the same subscriber is allowed to get and that the broker handled later: once that
arrived, the forbidden one would have arrived before it.
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import threading

import pytest
from cryptography.hazmat.primitives import serialization

from fedmq.core.protocol import FleetTopics
from fedmq.errors import BrokerError, ConfigError
from fedmq.ops.certs import Pki
from fedmq.transport.mqtt import MqttLink
from fedmq.transport.tls import TlsFiles
from simulator.broker import (
    DEV_SETTINGS,
    LocalMosquitto,
    as_invoking_user,
    free_port,
    port_open,
)

from .helpers import wait_for
from .secure_brokers import (
    bridge_conf,
    production_broker,
    read_shipped,
    running,
)

pytestmark = pytest.mark.integration

AGGREGATOR = "fedmq-aggregator"
KEYHOLDER = "fedmq-keyholder"
PASSWORDS = {"dev-a": "pw-a", "dev-b": "pw-b", AGGREGATOR: "pw-agg", KEYHOLDER: "pw-kh"}
FLEET = FleetTopics("farm")


class Inbox:
    """Messages one link received on one filter, in arrival order."""

    def __init__(self, link: MqttLink, topic_filter: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        link.route(topic_filter, self._add)

    def _add(self, message) -> None:
        with self._lock:
            self.messages.append((message.topic, message.payload))

    def topics(self) -> list[str]:
        with self._lock:
            return [topic for topic, _ in self.messages]

    def has(self, topic: str, payload: bytes | None = None) -> bool:
        with self._lock:
            return any(t == topic and (payload is None or p == payload)
                       for t, p in self.messages)


def publish(link: MqttLink, topic: str, payload: bytes, *, retain: bool = False) -> None:
    """QoS 1 and wait for the PUBACK: the broker has routed (or dropped) it."""
    link.publish(topic, payload, qos=1, retain=retain).wait_for_publish(30)


@pytest.fixture(scope="module")
def rogue_pki(tmp_path_factory) -> Pki:
    """Another CA that issued a certificate with a legitimate device's name."""
    rogue = Pki(tmp_path_factory.mktemp("rogue") / "ca")
    rogue.init()
    rogue.issue_client("dev-a")
    return rogue


@pytest.fixture
def secure(tmp_path, pki):
    broker = production_broker(tmp_path / "broker", pki, passwords=PASSWORDS)
    broker.mosquitto.start()
    yield broker
    broker.mosquitto.close()


# --- who may connect ---------------------------------------------------------------------

def refused(link: MqttLink) -> str:
    link.start()
    try:
        with pytest.raises(BrokerError, match="refused the connection") as info:
            link.wait_connected(30)
        return str(info.value)
    finally:
        link.stop()


def test_anonymous_clients_are_refused(secure):
    anonymous = MqttLink(client_id="anon", broker=secure.password_url,
                         tls=TlsFiles(ca_file=str(secure.pki.ca.cert)))
    assert "Not authorized" in refused(anonymous)


def test_a_wrong_password_is_refused_with_a_clear_reason(secure, caplog):
    message = refused(secure.password_link("dev-a", "not-the-password"))
    assert "Not authorized" in message and "fedmq enroll" in message
    assert any("refused the connection" in r.getMessage() and r.levelname == "ERROR"
               for r in caplog.records)


def test_the_right_password_over_tls_is_accepted(secure):
    with running(secure.password_link("dev-a", "pw-a")) as (link,):
        assert link.connected.is_set()


def test_plain_mqtt_is_not_offered(secure):
    """Port 8883 speaks only TLS: a plain MQTT client never gets a CONNACK."""
    plain = MqttLink(client_id="dev-a", broker=secure.password_url.replace("mqtts", "mqtt"),
                     username="dev-a", password="pw-a")
    plain.start()
    try:
        wait_for(lambda: "wrong version number" in secure.log_text(),
                 "the broker to reject a plain-text CONNECT on its TLS port")
        assert not plain.connected.is_set()
    finally:
        plain.stop()


def test_a_client_certificate_from_the_fleet_ca_is_accepted(secure):
    with running(secure.cert_link("dev-a")) as (link,):
        assert link.connected.is_set()
    assert "u'dev-a'" in secure.log_text()  # the certificate's CN became the user name


def test_a_client_certificate_from_another_ca_is_refused(secure, rogue_pki):
    message = refused(secure.cert_link("dev-a", rogue_pki))
    assert "client certificate" in message
    assert "certificate verify failed" in secure.log_text()


def test_the_certificate_port_refuses_clients_without_a_certificate(secure):
    link = MqttLink(client_id="dev-a", broker=secure.cert_url, username="dev-a",
                    password="pw-a", tls=TlsFiles(ca_file=str(secure.pki.ca.cert)))
    assert "client certificate" in refused(link)


def test_a_broker_certificate_from_another_ca_is_refused_by_the_client(secure, rogue_pki):
    link = MqttLink(client_id="dev-a", broker=secure.password_url, username="dev-a",
                    password="pw-a", tls=TlsFiles(ca_file=str(rogue_pki.ca.cert)))
    assert "broker's certificate was not accepted" in refused(link)


def test_a_claimed_client_id_cannot_take_over_another_devices_session(secure):
    """use_username_as_clientid: dev-a claiming client id dev-b stays dev-a."""
    connects = []
    victim = secure.password_link("dev-b", "pw-b", on_connect=connects.append)
    inbox = Inbox(victim, FLEET.model_current)
    with running(victim, secure.password_link("dev-a", "pw-a", client_id="dev-b")):
        aggregator = secure.password_link(AGGREGATOR, "pw-agg")
        with running(aggregator):
            publish(aggregator, FLEET.model_current, b"model", retain=True)
            wait_for(lambda: inbox.has(FLEET.model_current), "the victim's model")
    assert len(connects) == 1  # never kicked off and reconnected
    assert "as dev-a (" in secure.log_text()


# --- who may publish and read what ---------------------------------------------------------

def test_a_device_cannot_publish_as_another_device(secure):
    aggregator = secure.password_link(AGGREGATOR, "pw-agg", session_expiry_s=0)
    updates = Inbox(aggregator, f"{FLEET.prefix}/update/#")
    statuses = Inbox(aggregator, FLEET.device_status_filter)
    device_a = secure.password_link("dev-a", "pw-a")
    with running(aggregator, device_a):
        publish(device_a, FLEET.update("dev-b"), b"forged update")
        publish(device_a, f"{FLEET.update('dev-b')}/0", b"forged part")
        # topic layout 1 (update/{id}) and levels below its own topic are not granted
        publish(device_a, f"{FLEET.prefix}/update/dev-a", b"old-layout update")
        publish(device_a, f"{FLEET.update('dev-a')}/0", b"below its own topic")
        publish(device_a, FLEET.device_status("dev-b"), b"forged status")
        publish(device_a, FLEET.update("dev-a"), b"own update")
        publish(device_a, FLEET.device_status("dev-a"), b"own status")
        wait_for(lambda: statuses.has(FLEET.device_status("dev-a")), "dev-a's own status")
    assert updates.topics() == [FLEET.update("dev-a")]
    assert statuses.topics() == [FLEET.device_status("dev-a")]


def test_a_device_reads_no_other_devices_updates_or_receipts(secure):
    spy = secure.password_link("dev-a", "pw-a")
    stolen_updates = Inbox(spy, "fedmq/+/update/#")
    stolen_receipts = Inbox(spy, "fedmq/+/receipt/+")
    models = Inbox(spy, f"{FLEET.prefix}/model/#")
    device_b = secure.password_link("dev-b", "pw-b")
    aggregator = secure.password_link(AGGREGATOR, "pw-agg")
    with running(spy, device_b, aggregator):
        publish(device_b, FLEET.update("dev-b"), b"b's update")
        publish(aggregator, FLEET.receipt("dev-b"), b"b's receipt")
        publish(aggregator, FLEET.receipt("dev-a"), b"a's receipt")
        publish(aggregator, FLEET.model_current, b"the model", retain=True)
        wait_for(lambda: models.has(FLEET.model_current, b"the model"), "the model")
        wait_for(lambda: stolen_receipts.has(FLEET.receipt("dev-a")), "dev-a's own receipt")
    assert stolen_updates.topics() == []
    assert stolen_receipts.topics() == [FLEET.receipt("dev-a")]


def test_only_the_aggregator_can_publish_the_model(secure):
    """A device's retained fake model is dropped; devices keep getting the real one."""
    aggregator = secure.password_link(AGGREGATOR, "pw-agg")
    device_a = secure.password_link("dev-a", "pw-a")
    with running(aggregator, device_a):
        publish(aggregator, FLEET.model_current, b"real model", retain=True)
        publish(aggregator, FLEET.model_payload_chunk(0), b"real chunk", retain=True)
        publish(device_a, FLEET.model_current, b"fake model", retain=True)
        publish(device_a, FLEET.model_payload_chunk(0), b"fake chunk", retain=True)
        publish(device_a, FLEET.aggregator_status, b"fake status", retain=True)
    reader = secure.cert_link("dev-a", client_id="reader")
    models = Inbox(reader, f"{FLEET.prefix}/model/#")
    status = Inbox(reader, FLEET.aggregator_status)
    with running(reader):
        wait_for(lambda: len(models.messages) == 2, "both retained model topics")
    assert sorted(models.messages) == [(FLEET.model_current, b"real model"),
                                       (FLEET.model_payload_chunk(0), b"real chunk")]
    assert status.messages == []


def test_the_aggregator_reads_updates_and_statuses_of_every_device(secure):
    aggregator = secure.cert_link(AGGREGATOR)  # the certificate route works for it too
    updates = Inbox(aggregator, FLEET.update_filter)
    statuses = Inbox(aggregator, FLEET.device_status_filter)
    devices = [secure.password_link("dev-a", "pw-a"), secure.password_link("dev-b", "pw-b")]
    with running(aggregator, *devices):
        for device in devices:
            publish(device, FLEET.update(device.client_id), b"update")
            publish(device, FLEET.device_status(device.client_id), b"online", retain=True)
        wait_for(lambda: len(updates.messages) == 2 and len(statuses.messages) == 2,
                 "both devices' updates and statuses")
    assert sorted(updates.messages) == sorted((FLEET.update(d), b"update")
                                              for d in ("dev-a", "dev-b"))
    assert sorted(statuses.messages) == [(FLEET.device_status(d), b"online")
                                         for d in ("dev-a", "dev-b")]


def test_only_the_key_holder_reads_encrypted_sums_and_answers_them(secure):
    """he = ckks: a device can neither read the round's sum or its decryption nor pass a
    forged decryption to the aggregator."""
    aggregator = secure.password_link(AGGREGATOR, "pw-agg")
    keyholder = secure.password_link(KEYHOLDER, "pw-kh")
    device = secure.password_link("dev-a", "pw-a")
    requests = Inbox(keyholder, FLEET.he_decrypt)
    answers = Inbox(aggregator, FLEET.he_sum)
    spied = Inbox(device, f"{FLEET.prefix}/he/#")
    with running(aggregator, keyholder, device):
        publish(device, FLEET.he_sum, b"forged sum")
        publish(device, FLEET.he_decrypt, b"decrypt this single update")
        publish(aggregator, FLEET.he_decrypt, b"the round's sum")
        publish(keyholder, FLEET.he_sum, b"decrypted")
        wait_for(lambda: answers.has(FLEET.he_sum, b"decrypted"), "the key holder's answer")
        wait_for(lambda: requests.has(FLEET.he_decrypt, b"the round's sum"), "the request")
    assert answers.messages == [(FLEET.he_sum, b"decrypted")]
    assert requests.messages == [(FLEET.he_decrypt, b"the round's sum")]
    assert spied.messages == []


def test_a_revoked_certificate_can_publish_nothing_after_a_reload(secure):
    """acl.conf's revocation recipe: a deny block, then `systemctl reload` (SIGHUP)."""
    aggregator = secure.password_link(AGGREGATOR, "pw-agg")
    updates = Inbox(aggregator, FLEET.update_filter)
    lost, other = secure.cert_link("dev-a"), secure.password_link("dev-b", "pw-b")
    with running(aggregator, lost, other):
        publish(lost, FLEET.update("dev-a"), b"before")
        wait_for(lambda: updates.has(FLEET.update("dev-a"), b"before"), "the first update")
        acl = secure.etc / "acl.conf"
        acl.write_text(acl.read_text() + "\nuser dev-a\ntopic deny #\n")
        secure.mosquitto.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "Reloading config" in secure.log_text(), "the broker's reload")
        publish(lost, FLEET.update("dev-a"), b"after")
        publish(other, FLEET.update("dev-b"), b"marker")
        wait_for(lambda: updates.has(FLEET.update("dev-b")), "dev-b's update")
    assert updates.messages == [(FLEET.update("dev-a"), b"before"),
                                (FLEET.update("dev-b"), b"marker")]


# --- the development broker ------------------------------------------------------------------

def _directives(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_production_conf_binds_loopback_until_told_where():
    """Shipped, every listener binds 127.0.0.1 (it bound every interface, the unused
    client-certificate port included); `deploy/install.sh broker --listen ADDRESS` says
    where (tests/test_deploy.py, tests/test_recipe.py)."""
    listeners = [line for line in _directives(read_shipped("production.conf"))
                 if line.startswith("listener")]
    assert listeners == ["listener 8883 127.0.0.1", "listener 8884 127.0.0.1"]


def test_dev_conf_agrees_with_the_simulator_broker():
    dev = _directives(read_shipped("dev.conf"))
    missing = [line for line in _directives(DEV_SETTINGS) if line not in dev]
    assert not missing, f"dev.conf lacks {missing} from simulator/broker.py DEV_SETTINGS"
    assert "persistence true" in dev
    # Port (-p) and database (the working directory) are chosen where it is started: a
    # fixed port collides with the packaged mosquitto on 1883, a fixed file in /tmp with
    # every other developer's broker.
    assert not [line for line in dev if line.startswith(("listener", "port ",
                                                         "persistence_location"))]


@contextlib.contextmanager
def dev_broker(workdir, port: int):
    """`mosquitto -c broker_config/dev.conf -p PORT` started in `workdir`, as the file says."""
    workdir.mkdir(exist_ok=True)
    config = workdir / "dev.conf"  # the shipped text (+ `user root` when run as root)
    config.write_text(as_invoking_user(read_shipped("dev.conf")))
    binary = LocalMosquitto(workdir=workdir).binary
    with (workdir / "stderr.log").open("wb") as log:
        proc = subprocess.Popen([binary, "-c", str(config), "-p", str(port)], cwd=workdir,
                                stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    try:
        wait_for(lambda: port_open(port) or proc.poll() is not None, "the dev broker")
        assert proc.poll() is None, (workdir / "stderr.log").read_text()
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        proc.terminate()  # SIGTERM: mosquitto saves its database
        proc.wait(30)


def test_dev_conf_runs_on_the_port_given_and_keeps_retained_in_its_directory(tmp_path):
    # Never the machine's 1883: only once the port is left to -p.
    assert not [line for line in _directives(read_shipped("dev.conf"))
                if line.startswith("listener")]
    ports = {"alice": free_port(), "bob": free_port()}
    for expect_retained in (False, True):  # the second start reads the saved database
        with contextlib.ExitStack() as brokers:  # two side by side, one database each
            for name, port in ports.items():
                url = brokers.enter_context(dev_broker(tmp_path / name, port))
                link = MqttLink(client_id="anon", broker=url)
                inbox = Inbox(link, "fedmq/dev/model/current")
                with running(link):
                    if not expect_retained:
                        publish(link, "fedmq/dev/model/current", name.encode(), retain=True)
                    wait_for(lambda i=inbox, n=name: i.has("fedmq/dev/model/current",
                                                           n.encode()),
                             f"{name}'s retained model")
    for name in ports:
        assert (tmp_path / name / "fedmq-dev.db").exists()
    assert "local only mode" in (tmp_path / "alice" / "stderr.log").read_text()


# --- a site gateway bridged to the central broker ------------------------------------------

def test_a_gateway_bridges_one_fleet_to_the_central_broker_over_mutual_tls(tmp_path, pki):
    central = production_broker(tmp_path / "central", pki,
                                passwords={AGGREGATOR: "pw-agg"})
    gateway_etc = tmp_path / "gateway" / "etc"
    issued = pki.client("gateway-site1")
    gateway = production_broker(
        tmp_path / "gateway", pki, passwords={"dev-a": "pw-a"},
        etc_files={"gateway.crt": issued.cert, "gateway.key": issued.key},
        conf_d={"fedmq-bridge.conf": bridge_conf(central, gateway_etc)})
    site, plant = FleetTopics("site"), FleetTopics("plant-a")
    try:
        central.mosquitto.start()
        gateway.mosquitto.start()
        aggregator = central.password_link(AGGREGATOR, "pw-agg")
        updates = Inbox(aggregator, plant.update_filter)
        device = gateway.password_link("dev-a", "pw-a")
        models = Inbox(device, site.model_current)
        receipts = Inbox(device, site.receipt("dev-a"))
        with running(aggregator, device):
            # Retained, so it reaches the device whenever the bridge comes up.
            publish(aggregator, plant.model_current, b"model v1", retain=True)
            wait_for(lambda: models.has(site.model_current, b"model v1"),
                     "the central model at the site, renamed to fleet site")
            publish(device, site.update("dev-a"), b"update from the site")
            wait_for(lambda: updates.has(plant.update("dev-a"), b"update from the site"),
                     "the site's update at the central broker, renamed to fleet plant-a")
            publish(aggregator, plant.receipt("dev-a"), b"receipt")
            wait_for(lambda: receipts.has(site.receipt("dev-a"), b"receipt"),
                     "the receipt back at the site")
        log = central.log_text()
        assert re.search(r"as gateway-site1 \(p\d, c0,.*u'gateway-site1'\)", log), log
    finally:
        gateway.mosquitto.close()
        central.mosquitto.close()


# --- client-side checks that need no broker -------------------------------------------------

def test_tls_files_are_checked_before_connecting(tmp_path, pki):
    with pytest.raises(ConfigError, match=r"ca_file .* does not exist"):
        MqttLink(client_id="d", broker="mqtts://127.0.0.1:8883",
                 tls=TlsFiles(ca_file=str(tmp_path / "missing.crt")))
    with pytest.raises(ConfigError, match="key_file is set but cert_file is not"):
        TlsFiles(key_file=str(pki.client("dev-a").key))
    with pytest.raises(ConfigError, match="not a matching PEM certificate and unencrypted"):
        TlsFiles(cert_file=str(pki.client("dev-a").cert),
                 key_file=str(pki.client(AGGREGATOR).key)).context()
    encrypted = tmp_path / "encrypted.key"  # would make OpenSSL prompt on a terminal
    key = serialization.load_pem_private_key(pki.client("dev-a").key.read_bytes(), None)
    encrypted.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(ConfigError, match="unencrypted key"):
        TlsFiles(cert_file=str(pki.client("dev-a").cert), key_file=str(encrypted)).context()
    with pytest.raises(ConfigError, match="not TLS; use mqtts://"):
        MqttLink(client_id="d", broker="mqtt://127.0.0.1:1883",
                 tls=TlsFiles(ca_file=str(pki.ca.cert)))


# --- the whole system on the production broker -------------------------------------------

def test_agents_and_aggregator_train_over_tls_with_passwords_and_acls(secure, tmp_path,
                                                                    stoppers):
    """Real services with ca_file + credentials from their configs: the ACLs let every
    message a round needs through (births, models, updates, receipts)."""
    from edge_agent.agent import EdgeAgent
    from edge_agent.config import AgentConfig
    from fedmq.tasks import partition, split_task

    from .helpers import make_aggregator

    ca = str(secure.pki.ca.cert)
    service = make_aggregator(secure.password_url, tmp_path, stoppers, fleet=FLEET.fleet,
                              client_id=AGGREGATOR, username=AGGREGATOR,
                              password=PASSWORDS[AGGREGATOR], ca_file=ca, rounds=2,
                              min_updates=2)
    train, _ = split_task("digits", seed=0)
    shards = partition(train.y, devices=2, alpha=0.5, seed=0)
    agents = []
    for i, device in enumerate(("dev-a", "dev-b")):
        agent = EdgeAgent(AgentConfig(broker=secure.password_url, fleet=FLEET.fleet,
                                      device_id=device, username=device,
                                      password=PASSWORDS[device], ca_file=ca),
                          train.subset(shards[i]))
        agent.start()
        stoppers(agent.stop)
        agents.append(agent)
    wait_for(service.finished.is_set, "2 rounds over TLS")
    assert all(r.participants == 2 for r in service.history)
    wait_for(lambda: all(a.stats.receipts["accepted"] >= 2 for a in agents),
             "receipts through the ACLs")
    assert not service.rejected and not any(a.stats.rejected for a in agents)
