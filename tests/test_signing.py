"""Signed model announcements: key files, sign/verify, and forged models over a real broker
with the production configs (a stolen aggregator password, but not the signing key)."""

from __future__ import annotations

import dataclasses
import logging
import stat
import sys
import threading
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.config import AgentConfig
from fedmq.cli import main
from fedmq.config import load_config
from fedmq.core.layout import ParamLayout
from fedmq.core.protocol import FleetTopics, ModelAnnouncement, PayloadInfo, TaskConfig
from fedmq.core.signing import PUBLIC_NAME, AnnouncementOpener, SignedAnnouncement
from fedmq.core.transfer import encode_model
from fedmq.errors import ConfigError, MissingExtraError, ProtocolError
from fedmq.keyfiles import (
    PRIVATE_NAME,
    announcement_sealer,
    generate_keypair,
    load_opener,
    load_signer,
    opener_for_config,
)
from fedmq.ops.enroll import password_users
from fedmq.transport.mqtt import MqttLink

from .helpers import make_aggregator, wait_for
from .secure_brokers import AGGREGATOR, ProductionBroker, enrolled_agents, production_broker


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return generate_keypair(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory):
    return generate_keypair(tmp_path_factory.mktemp("other-keys"))


def announcement(version: int = 1, round: int = 1, aid: str = "a1") -> ModelAnnouncement:
    info = PayloadInfo(codec="f32", size=10, sha256="ab" * 32)
    return ModelAnnouncement(fleet="f", version=version, round=round, model="logreg",
                             model_config={"inputs": 4, "classes": 2}, layout=[["w", [10]]],
                             layout_hash="h", task=TaskConfig(lr=0.5), payload=info,
                             announce_id=aid, issued_at=1.5)


def reason(call) -> str:
    with pytest.raises(ProtocolError) as info:
        call()
    return info.value.reason


# -- key files and the command ------------------------------------------------------------

def test_keys_init_writes_a_0600_private_and_0644_public_key_and_refuses_to_overwrite(
        tmp_path, capsys):
    out = tmp_path / "signing"
    assert main(["keys", "init", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "signing_key" in printed and "model_public_key" in printed
    assert stat.S_IMODE((out / PRIVATE_NAME).stat().st_mode) == 0o600
    assert stat.S_IMODE((out / PUBLIC_NAME).stat().st_mode) == 0o644
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    before = (out / PRIVATE_NAME).read_bytes()
    assert main(["keys", "init", "--out", str(out)]) == 2  # exists: refused
    assert "--force" in capsys.readouterr().err
    assert (out / PRIVATE_NAME).read_bytes() == before
    assert main(["keys", "init", "--out", str(out), "--force"]) == 0
    assert (out / PRIVATE_NAME).read_bytes() != before
    assert stat.S_IMODE((out / PRIVATE_NAME).stat().st_mode) == 0o600
    signer = load_signer(out / PRIVATE_NAME)
    assert load_opener(out / PUBLIC_NAME).key_id == signer.key_id


def test_bad_key_files_are_config_errors_that_say_what_to_do(tmp_path, keys):
    with pytest.raises(ConfigError, match="keys init"):
        load_signer(tmp_path / "missing.key")
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(ConfigError, match="not an unencrypted PEM private key"):
        load_signer(tmp_path / "junk.pem")
    with pytest.raises(ConfigError, match="not a PEM public key"):
        load_opener(keys.private)  # the private half where the public belongs
    from fedmq.ops.certs import Pki

    ec = Pki(tmp_path / "pki").init()  # an EC P-256 key: right format, wrong algorithm
    with pytest.raises(ConfigError, match="Ed25519"):
        load_signer(ec.key)


def test_without_cryptography_keys_need_the_secure_extra_but_unsigned_fleets_do_not(
        monkeypatch, keys):
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.serialization", None)
    with pytest.raises(MissingExtraError, match=r"'cryptography' package: .*fedmq\[secure\]"):
        opener_for_config(str(keys.public))
    with pytest.raises(MissingExtraError, match=r"fedmq\[secure\]"):
        announcement_sealer(str(keys.private))
    a = announcement()
    assert opener_for_config("").open(announcement_sealer("")(a)) == a


# -- sign and verify (pure) ---------------------------------------------------------------

def test_a_signed_announcement_opens_to_the_same_announcement(keys):
    a = announcement()
    sealed = load_signer(keys.private).seal(a)
    assert SignedAnnouncement.from_payload(sealed).announcement == a.to_payload()
    assert load_opener(keys.public).open(sealed) == a
    assert AnnouncementOpener().open(sealed) == a  # no key: accepted, unverified
    assert AnnouncementOpener().open(a.to_payload()) == a  # unsigned fleets keep working


def test_a_device_with_the_key_refuses_unsigned_foreign_and_altered_announcements(
        keys, other_keys):
    a = announcement()
    opener = load_opener(keys.public)
    assert reason(lambda: opener.open(a.to_payload())) == "unsigned"
    foreign = load_signer(other_keys.private).seal(a)
    assert reason(lambda: opener.open(foreign)) == "wrong_key"
    genuine = SignedAnnouncement.from_payload(load_signer(keys.private).seal(a))
    other_model = dataclasses.replace(a, version=9).to_payload()
    swapped = dataclasses.replace(genuine, announcement=other_model).to_payload()
    assert reason(lambda: opener.open(swapped)) == "bad_signature"
    relabelled = dataclasses.replace(
        SignedAnnouncement.from_payload(foreign), key_id=genuine.key_id).to_payload()
    assert reason(lambda: opener.open(relabelled)) == "bad_signature"
    assert reason(lambda: opener.open(b"\x81\xa2$k\xa4junk")) == "wrong_kind"
    assert reason(lambda: SignedAnnouncement(announcement=b"", signature=b"x" * 63,
                                             key_id="0" * 16)) == "bad_field"


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_flipping_any_bits_of_any_byte_of_a_signed_announcement_is_refused(keys, data):
    sealed = load_signer(keys.private).seal(announcement())
    index = data.draw(st.integers(0, len(sealed) - 1), label="index")
    mask = data.draw(st.integers(1, 255), label="mask")
    flipped = bytearray(sealed)
    flipped[index] ^= mask
    opener = load_opener(keys.public)
    with pytest.raises(ProtocolError):  # whatever the reason: never an announcement
        opener.open(bytes(flipped))


def test_the_service_refuses_to_start_with_a_missing_signing_key(tmp_path, stoppers):
    with pytest.raises(ConfigError, match="model signing key"):
        make_aggregator("mqtt://127.0.0.1:1", tmp_path, stoppers, start=False,
                        signing_key=str(tmp_path / "nope.key"))


# -- fedmq enroll ------------------------------------------------------------------------

def test_enroll_prints_a_device_config_that_trusts_only_the_aggregators_key(
        tmp_path, capsys, keys, pki):
    passwd = tmp_path / "passwd"
    assert main(["enroll", "dev-1", "--fleet", "farm", "--broker", "mqtts://b.example:8883",
                 "--password-file", str(passwd), "--model-public-key", str(keys.public)]) == 0
    printed = capsys.readouterr()
    snippet = tmp_path / "agent.toml"
    snippet.write_text(printed.out)
    config = load_config(AgentConfig, snippet)  # valid TOML with only known keys
    assert (config.device_id, config.username) == ("dev-1", "dev-1")
    assert config.model_public_key == str(keys.public)
    opener = opener_for_config(config.model_public_key)  # what the agent builds
    assert opener.verifying and opener.key_id == keys.key_id
    assert reason(lambda: opener.open(announcement().to_payload())) == "unsigned"
    assert f"{PUBLIC_NAME} -> {keys.public}" in printed.err  # what to copy where
    assert "reload mosquitto" in printed.err and "certificate" not in printed.err
    assert main(["enroll", "dev-3", "--cert", "--pki", str(pki.directory), "--broker",
                 "mqtts://b.example:8884", "--model-public-key", "/etc/fedmq/m.pub"]) == 0
    printed = capsys.readouterr()
    snippet.write_text(printed.out)
    assert load_config(AgentConfig, snippet).model_public_key == "/etc/fedmq/m.pub"
    assert "with a client certificate" in printed.err and "m.pub" in printed.err
    # without the option nothing changes; the aggregator signs, it verifies nothing
    assert main(["enroll", "dev-2", "--broker", "mqtts://b.example:8883",
                 "--password-file", str(passwd)]) == 0
    assert "model_public_key" not in capsys.readouterr().out
    assert main(["enroll", "fedmq-aggregator", "--role", "aggregator", "--broker",
                 "mqtts://b.example:8883", "--password-file", str(passwd),
                 "--model-public-key", str(keys.public)]) == 2
    assert "signing_key" in capsys.readouterr().err
    assert password_users(passwd) == {"dev-1", "dev-2"}


# -- over the production broker -----------------------------------------------------------
# broker_config/production.conf + acl.conf: TLS, a password per account, and only the
# aggregator's account may write the model topics. A forger therefore needs that account;
# with it but without the signing key, the broker delivers its models and only the
# signature check stands in the way.

PASSWORDS = {AGGREGATOR: "pw-agg", "dev0": "pw-0", "dev1": "pw-1", "dev2": "pw-2",
             "auditor": "pw-aud"}


@pytest.fixture
def secure(tmp_path, pki) -> Iterator[ProductionBroker]:
    broker = production_broker(tmp_path / "broker", pki, passwords=PASSWORDS)
    broker.mosquitto.start()
    yield broker
    broker.mosquitto.close()


def signing_aggregator(secure: ProductionBroker, tmp_path, stoppers, keys, **overrides):
    return make_aggregator(secure.password_url, tmp_path, stoppers, client_id=AGGREGATOR,
                           signing_key=str(keys.private), **secure.login(AGGREGATOR),
                           **overrides)


class ModelClient:
    """A client on the model topics: reads the retained announcement, and retains its own
    messages there if its account may write them."""

    def __init__(self, link: MqttLink, stoppers) -> None:
        self.topics = FleetTopics("test")
        self.current: bytes | None = None
        self._got = threading.Event()
        self.link = link
        self.link.route(self.topics.model_current, self._remember)
        self.link.start()
        stoppers(self.link.stop)
        self.link.wait_connected(30)  # fails at once if the broker refuses the account
        wait_for(self.link.subscribed.is_set, f"{link.client_id}'s subscriptions")

    def _remember(self, message) -> None:
        if self.current is None:
            self.current = message.payload
            self._got.set()

    def genuine(self) -> bytes:
        wait_for(self._got.is_set, "the aggregator's retained announcement")
        assert self.current is not None
        return self.current

    def retain(self, topic: str, payload: bytes) -> None:
        info = self.link.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(30)
        assert info.is_published()


@pytest.mark.integration
def test_a_signed_fleet_trains_normally_and_devices_without_the_key_still_follow(
        secure, tmp_path, stoppers, keys, mqtt_version):
    service = signing_aggregator(secure, tmp_path, stoppers, keys, rounds=2, min_updates=3)
    verifying = enrolled_agents(secure, stoppers, [0, 1], total=3,
                                model_public_key=str(keys.public))
    unkeyed = enrolled_agents(secure, stoppers, [2], total=3)
    wait_for(service.finished.is_set, "2 signed rounds")
    assert all(r.participants == 3 for r in service.history)
    assert service.history[-1].accuracy > service.history[0].accuracy
    assert not service.rejected
    for agent in [*verifying, *unkeyed]:
        assert agent.stats.models_received >= 2 and not agent.stats.rejected
    assert verifying[0].announcements.verifying and not unkeyed[0].announcements.verifying
    assert service.link.protocol_version == unkeyed[0].link.protocol_version == mqtt_version
    auditor = ModelClient(secure.password_link("auditor", PASSWORDS["auditor"]), stoppers)
    assert SignedAnnouncement.from_payload(auditor.genuine()).key_id == keys.key_id


@pytest.mark.integration
def test_an_agent_with_the_key_refuses_forged_models_and_keeps_its_own(
        secure, tmp_path, stoppers, keys, other_keys, caplog):
    # One device, a quorum of five: round 1 stays open and the aggregator publishes nothing
    # after its first announcement, so every model message from here on is the forger's.
    service = signing_aggregator(secure, tmp_path, stoppers, keys, rounds=1, min_updates=5,
                                 deadline_s=600.0)
    (agent,) = enrolled_agents(secure, stoppers, [0], total=1,
                               model_public_key=str(keys.public))
    wait_for(lambda: agent.stats.updates_sent == 1, "training on the genuine model v0")
    # The forger logs in with the aggregator's stolen password. The broker keeps one
    # connection per account (use_username_as_clientid), so it does while the aggregator is
    # away; had both been up, each login would have thrown the other off.
    service.link.stop()
    forger = ModelClient(secure.password_link(AGGREGATOR, PASSWORDS[AGGREGATOR]), stoppers)
    genuine = SignedAnnouncement.from_payload(forger.genuine())
    v0 = ModelAnnouncement.from_payload(genuine.announcement)
    assert (agent.receiver.held_version, v0.version) == (0, 0)

    def refusals(why: str) -> list[logging.LogRecord]:
        start = f"dev0: rejected model message ({why}): "
        return [r for r in caplog.records
                if r.name == "edge_agent.agent" and r.getMessage().startswith(start)]

    def forge(payload: bytes, why: str, says: str) -> None:
        forger.retain(forger.topics.model_current, payload)
        wait_for(lambda: agent.stats.rejected[why] == 1 and refusals(why),
                 f"the agent to refuse ({why}) and say so")
        assert agent.receiver.held_version == 0 and agent.stats.models_received == 1
        (line,) = refusals(why)  # one warning per refused message, saying what was wrong
        assert line.levelno == logging.WARNING and says in line.getMessage(), line.getMessage()

    params = np.full(ParamLayout.from_wire(v0.layout).size, 0.5, np.float32)  # the forger's
    info, chunks = encode_model(params, codec="float32", version=1)
    (chunk,) = chunks
    v1 = dataclasses.replace(v0, version=1, round=2, payload=info, announce_id="f0f0f0f0f0f0")

    forge(v1.to_payload(), "unsigned", "not signed")
    flipped = bytearray(genuine.announcement)
    flipped[len(flipped) // 2] ^= 0x01  # one byte of the genuine, signed announcement
    forge(dataclasses.replace(genuine, announcement=bytes(flipped)).to_payload(),
          "bad_signature", "signature does not verify")
    forge(load_signer(other_keys.private).seal(v1), "wrong_key",
          f"signed by key {other_keys.key_id}")

    # A correctly signed announcement whose chunk was altered: the SHA-256 it commits to
    # catches the flipped byte.
    bad_chunk = dataclasses.replace(chunk, data=bytes([chunk.data[0] ^ 0x80]) + chunk.data[1:])
    forger.retain(forger.topics.model_payload_chunk(0), bad_chunk.to_payload())
    forge(load_signer(keys.private).seal(v1), "bad_hash", "SHA-256")
    assert agent.stats.updates_sent == 1  # it trained on nothing new

    # The intact chunk completes the signed model: verification was the only obstacle.
    forger.retain(forger.topics.model_payload_chunk(0), chunk.to_payload())
    wait_for(lambda: agent.receiver.held_version == 1, "the properly signed model")
    assert agent.stats.rejected == Counter(unsigned=1, bad_signature=1, wrong_key=1,
                                           bad_hash=1)
