"""Fixtures: private mosquittos on free ports and child processes, stopped even on failure."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator

import pytest
from hypothesis import settings

from fedmq.ops.certs import Pki
from simulator.broker import LocalMosquitto

from . import helpers

# Property tests check what is computed, never how fast: on a shared 2-core machine one
# example can take seconds, and hypothesis's default 200 ms deadline then fails the run.
settings.register_profile("fedmq", deadline=None)
settings.load_profile("fedmq")


@pytest.fixture
def broker_factory(tmp_path) -> Iterator[Callable[..., LocalMosquitto]]:
    """Start loopback mosquittos with extra config lines; all are closed at teardown."""
    started: list[LocalMosquitto] = []

    def start(extra_config: str = "", name: str = "broker") -> LocalMosquitto:
        mosq = LocalMosquitto(workdir=tmp_path / name, extra_config=extra_config)
        mosq.workdir.mkdir()
        started.append(mosq)
        return mosq.start()

    yield start
    for mosq in started:
        mosq.close()


@pytest.fixture
def broker(broker_factory) -> LocalMosquitto:
    """A fresh loopback mosquitto (anonymous, no persistence) for one test."""
    return broker_factory()


@pytest.fixture(params=["5", "3.1.1"])
def mqtt_version(request, monkeypatch) -> str:
    """The MQTT version matrix: a test taking this fixture runs once per version, every
    aggregator and agent that tests/helpers.py builds speaking it (no fallback: a broker
    refusing it fails the test)."""
    monkeypatch.setattr(helpers, "MQTT_VERSION", request.param)
    return request.param


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    """Child processes a test starts: killed (if still running) and reaped at teardown."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.fixture
def stoppers() -> Iterator[Callable[[Callable[[], object]], None]]:
    """Register clean-up calls (agents, services) that run in reverse order at teardown."""
    calls: list[Callable[[], object]] = []
    yield calls.append
    errors = []
    for call in reversed(calls):
        try:
            call()
        except Exception as exc:  # keep stopping the rest, then report
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    """The fleet CA, a server certificate for 127.0.0.1 and client certificates (for
    tests/secure_brokers.py's production brokers)."""
    pki = Pki(tmp_path_factory.mktemp("pki") / "ca")
    pki.init()
    pki.issue_server(["localhost", "127.0.0.1"])
    for name in ("dev-a", "fedmq-aggregator", "gateway-site1"):
        pki.issue_client(name)
    return pki
