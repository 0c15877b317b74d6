"""`fedmq certs` and `fedmq enroll` as an operator runs them, checked by mosquitto itself."""

from __future__ import annotations

import ipaddress
import stat
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from aggregator.config import AggregatorConfig
from edge_agent.config import AgentConfig
from fedmq.cli import main
from fedmq.config import load_config
from fedmq.errors import BrokerError, ConfigError, MissingExtraError
from fedmq.ops.certs import Pki, client_uri
from fedmq.ops.enroll import add_password, enroll, password_users
from fedmq.transport.mqtt import MqttLink

from .helpers import wait_for
from .secure_brokers import production_broker, running

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def fedmq(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def pki(tmp_path, capsys) -> Pki:
    """A CA and a broker certificate, made through the command line."""
    ca_dir = tmp_path / "pki"
    assert fedmq(capsys, "certs", "init", "--dir", str(ca_dir))[0] == 0
    assert fedmq(capsys, "certs", "issue", "server", "--dir", str(ca_dir), "--host",
                 "localhost", "--host", "127.0.0.1")[0] == 0
    return Pki(ca_dir)


# --- fedmq certs ---------------------------------------------------------------------------

def test_keys_are_private_and_directories_closed(pki, capsys):
    code, out, _ = fedmq(capsys, "certs", "issue", "client", "dev-1", "--dir",
                         str(pki.directory))
    assert code == 0 and "clients/dev-1.key" in out
    client = pki.client("dev-1")
    for key in (pki.ca.key, pki.server.key, client.key):
        assert mode(key) == 0o600, key
    for cert in (pki.ca.cert, pki.server.cert, client.cert):
        assert mode(cert) == 0o644, cert
    for folder in (pki.directory, client.key.parent):
        assert mode(folder) == 0o700, folder


def test_certificates_chain_to_the_ca_with_the_right_names(pki):
    client = pki.issue_client("dev_1.kitchen")
    store = PolicyBuilder().store(Store([load(pki.ca.cert)]))
    server = load(pki.server.cert)
    for name in (x509.DNSName("localhost"),
                 x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        chain = store.build_server_verifier(name).verify(server, [])
        assert chain[-1] == load(pki.ca.cert)
    verified = store.build_client_verifier().verify(load(client.cert), [])
    assert verified.subjects == [x509.UniformResourceIdentifier(client_uri("dev_1.kitchen"))]
    common_names = load(client.cert).subject.get_attributes_for_oid(
        x509.oid.NameOID.COMMON_NAME)
    assert [a.value for a in common_names] == ["dev_1.kitchen"]  # mosquitto's user name
    with pytest.raises(x509.verification.VerificationError):  # a client cert is no server
        store.build_server_verifier(x509.DNSName("localhost")).verify(load(client.cert), [])


def test_nothing_is_overwritten_without_force(pki, capsys):
    before = pki.ca.key.read_bytes(), pki.ca.cert.read_bytes()
    code, _, err = fedmq(capsys, "certs", "init", "--dir", str(pki.directory))
    assert code == 2 and "already exists; pass --force" in err
    assert (pki.ca.key.read_bytes(), pki.ca.cert.read_bytes()) == before
    pki.issue_client("dev-1")
    with pytest.raises(ConfigError, match="already exists"):
        pki.issue_client("dev-1")
    old_key = pki.client("dev-1").key.read_bytes()
    pki.issue_client("dev-1", force=True)
    assert pki.client("dev-1").key.read_bytes() != old_key
    assert mode(pki.client("dev-1").key) == 0o600


def test_issuing_needs_a_ca_and_valid_names(tmp_path):
    with pytest.raises(ConfigError, match="fedmq certs init"):
        Pki(tmp_path / "none").issue_client("dev-1")
    with pytest.raises(ConfigError, match="not valid"):
        Pki(tmp_path / "none").issue_client("../escape")


def test_without_cryptography_the_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "cryptography.x509", None)  # as if not installed
    with pytest.raises(MissingExtraError, match=r"fedmq\[secure\]"):
        Pki(tmp_path / "pki").init()


# --- fedmq enroll ----------------------------------------------------------------------------

@pytest.mark.integration
def test_enroll_prints_an_agent_config_whose_password_mosquitto_accepts(pki, tmp_path,
                                                                        capsys):
    broker = production_broker(tmp_path / "broker", pki, passwords={})
    code, out, err = fedmq(capsys, "enroll", "dev-1", "--fleet", "farm", "--password-file",
                           str(broker.passwd), "--broker", broker.password_url,
                           "--device-dir", str(broker.etc))
    assert code == 0 and "systemctl reload mosquitto" in err
    snippet = tmp_path / "agent.toml"
    snippet.write_text(out)
    config = load_config(AgentConfig, snippet)  # valid TOML with only known keys
    assert (config.device_id, config.username, config.fleet) == ("dev-1", "dev-1", "farm")
    assert len(config.password) >= 32 and config.password not in broker.passwd.read_text()
    broker.mosquitto.start()
    try:
        link = MqttLink(client_id=config.device_id, broker=config.broker,
                        username=config.username, password=config.password,
                        tls=config.tls())
        with running(link):
            assert link.connected.is_set()
    finally:
        broker.mosquitto.close()


@pytest.mark.integration
def test_enroll_with_a_certificate_for_the_aggregator(pki, tmp_path, capsys):
    broker = production_broker(tmp_path / "broker", pki, passwords={})
    code, out, err = fedmq(capsys, "enroll", "fedmq-aggregator", "--role", "aggregator",
                           "--cert", "--pki", str(pki.directory), "--broker", broker.cert_url,
                           "--device-dir", str(pki.directory / "clients"))
    assert code == 0 and "clients/fedmq-aggregator.key" in err
    values = tomllib.loads(out)
    assert "password" not in values and values["client_id"] == "fedmq-aggregator"
    assert values["require_known_devices"] is True  # an enrolled fleet refuses strangers
    values["ca_file"] = str(pki.ca.cert)  # the device-side copy of ca.crt
    config = AggregatorConfig(**values)
    broker.mosquitto.start()
    try:
        link = MqttLink(client_id=config.client_id, broker=config.broker, tls=config.tls())
        with running(link):
            assert link.connected.is_set()
    finally:
        broker.mosquitto.close()
    assert "u'fedmq-aggregator'" in broker.log_text()


def test_enroll_refuses_to_replace_a_password_without_force(tmp_path):
    passwd = tmp_path / "passwd"
    first = enroll("dev-1", fleet="farm", broker="mqtts://b:8883", password_file=passwd)
    with pytest.raises(ConfigError, match="already has a password"):
        enroll("dev-1", fleet="farm", broker="mqtts://b:8883", password_file=passwd)
    second = enroll("dev-1", fleet="farm", broker="mqtts://b:8883", password_file=passwd,
                    force=True)
    assert first.password != second.password and password_users(passwd) == {"dev-1"}
    assert mode(passwd) == 0o600  # created by enroll


def test_enroll_explains_a_missing_mosquitto_passwd(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # a machine without the mosquitto package
    with pytest.raises(BrokerError, match="apt-get install -y mosquitto"):
        add_password(tmp_path / "passwd", "dev-1", "pw")


def test_enroll_writes_its_keys_into_an_existing_config_in_place(tmp_path, capsys):
    """Pasting the printed snippet under deploy/aggregator.toml repeats its keys (an error);
    --config replaces their lines, keeps every comment, the mode and the owner."""
    config = tmp_path / "aggregator.toml"
    example = Path("deploy/aggregator.toml").read_text()
    config.write_text(example)
    config.chmod(0o640)
    code, out, err = fedmq(capsys, "enroll", "fedmq-aggregator", "--role", "aggregator",
                           "--fleet", "farm", "--broker", "mqtts://server:8883",
                           "--password-file", str(tmp_path / "passwd"), "--device-dir",
                           "/etc/fedmq", "--signing-key", "/etc/fedmq/model-signing.key",
                           "--config", str(config))
    assert code == 0 and out == "" and f"into {config}" in err
    settings = load_config(AggregatorConfig, config)
    assert (settings.broker, settings.fleet, settings.username) == (
        "mqtts://server:8883", "farm", "fedmq-aggregator")
    assert settings.ca_file == "/etc/fedmq/ca.crt"
    assert settings.signing_key == "/etc/fedmq/model-signing.key"
    assert settings.password and settings.password not in (tmp_path / "passwd").read_text()
    text = config.read_text()
    comments = [line for line in example.splitlines() if line.startswith("#")]
    assert comments == [line for line in text.splitlines() if line.startswith("#")]
    assert len(text.splitlines()) == len(example.splitlines())  # every key was there
    assert mode(config) == 0o640


def test_enroll_creates_a_private_config_and_refuses_one_it_cannot_rewrite(tmp_path):
    from fedmq.ops.configfile import set_keys

    fresh = set_keys(tmp_path / "pi-1.toml", {"device_id": "pi-1", "password": "p"},
                     comment="credentials")
    assert mode(fresh) == 0o600
    assert load_config(AgentConfig, fresh).device_id == "pi-1"
    tabled = tmp_path / "tabled.toml"
    tabled.write_text('fleet = "farm"\n[extra]\nnote = "x"\n')
    with pytest.raises(ConfigError, match="set them by hand"):
        set_keys(tabled, {"password": "p"})
    assert tabled.read_text() == 'fleet = "farm"\n[extra]\nnote = "x"\n'


def test_signing_keys_go_to_the_aggregator_and_public_keys_to_devices(tmp_path):
    passwd = tmp_path / "passwd"
    with pytest.raises(ConfigError, match="--role aggregator"):
        enroll("dev-1", fleet="farm", broker="mqtts://b:8883", password_file=passwd,
               signing_key="/etc/fedmq/model-signing.key")
    with pytest.raises(ConfigError, match="--model-public-key"):
        enroll("fedmq-aggregator", role="aggregator", fleet="farm", broker="mqtts://b:8883",
               password_file=passwd, model_public_key="/etc/fedmq/model-signing.pub")


@pytest.mark.integration
def test_enroll_gives_the_key_holder_the_account_acl_conf_names(pki, tmp_path, capsys):
    """`--role keyholder` writes its login into deploy/keyholder.toml in place; with it the
    key holder receives what the aggregator sends on he/decrypt (broker_config/acl.conf
    grants that to fedmq-keyholder alone)."""
    from aggregator.keyholder import KeyHolderConfig
    from fedmq.core.protocol import FleetTopics

    broker = production_broker(tmp_path / "broker", pki, passwords={"fedmq-aggregator": "pw"})
    config = tmp_path / "keyholder.toml"
    config.write_text(Path("deploy/keyholder.toml").read_text())
    code, out, err = fedmq(capsys, "enroll", "fedmq-keyholder", "--role", "keyholder",
                           "--fleet", "farm", "--password-file", str(broker.passwd),
                           "--broker", broker.password_url, "--config", str(config))
    assert code == 0 and out == "" and "note:" not in err
    assert "readable by root and fedmq-keyholder only" in err
    values = tomllib.loads(config.read_text())
    assert "require_known_devices" not in values and "device_id" not in values
    settings = load_config(KeyHolderConfig, config)
    assert (settings.client_id, settings.username, settings.fleet) == (
        "fedmq-keyholder", "fedmq-keyholder", "farm")
    assert settings.ca_file == "/etc/fedmq-keyholder/ca.crt"  # install.sh's directory
    assert settings.he_secret_context == "/etc/fedmq-keyholder/he-secret.ctx"  # kept

    settings = load_config(KeyHolderConfig, config, {"ca_file": str(pki.ca.cert)})
    keyholder = MqttLink(client_id=settings.client_id, broker=settings.broker,
                         username=settings.username, password=settings.password,
                         tls=settings.tls())
    received: list[bytes] = []
    topics = FleetTopics("farm")
    keyholder.route(topics.he_decrypt, lambda message: received.append(message.payload),
                    qos=1)
    aggregator = MqttLink(client_id="fedmq-aggregator", broker=broker.password_url,
                          username="fedmq-aggregator", password="pw",
                          tls=settings.tls())
    broker.mosquitto.start()
    try:
        with running(keyholder, aggregator):
            aggregator.publish(topics.he_decrypt, b"the round's sum", qos=1)
            wait_for(lambda: received, "the request at the key holder")
    finally:
        broker.mosquitto.close()
    assert received == [b"the round's sum"]


def test_enroll_names_the_acl_user_a_server_account_needs(tmp_path, capsys):
    code, out, err = fedmq(capsys, "enroll", "keyholder-2", "--role", "keyholder",
                           "--password-file", str(tmp_path / "passwd"),
                           "--broker", "mqtts://b:8883")
    assert code == 0 and "grants the keyholder's topics to user fedmq-keyholder" in err
    assert tomllib.loads(out)["client_id"] == "keyholder-2"
    with pytest.raises(ConfigError, match="--role aggregator"):
        enroll("fedmq-keyholder", role="keyholder", fleet="farm", broker="mqtts://b:8883",
               password_file=tmp_path / "passwd", signing_key="/etc/fedmq/model-signing.key")
    with pytest.raises(ConfigError, match="the key holder needs neither"):
        enroll("fedmq-keyholder", role="keyholder", fleet="farm", broker="mqtts://b:8883",
               password_file=tmp_path / "passwd", model_public_key="/etc/fedmq/m.pub")
