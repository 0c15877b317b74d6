"""Latency settings on every MQTT hop: TCP_NODELAY on our sockets and on the broker's.

With Nagle's algorithm on, a small message waits for the ACK of the previous one, which
the peer's delayed-ACK timer holds for up to 40 ms: every hop of a round stalls.
"""

from __future__ import annotations

import socket

import pytest

from fedmq.transport.mqtt import MqttLink
from simulator.broker import DEV_SETTINGS

from .helpers import wait_for


@pytest.mark.integration
def test_every_link_turns_off_nagle_before_it_connects(broker, stoppers):
    link = MqttLink(client_id="nodelay", broker=broker.url)
    link.start()
    stoppers(link.stop)
    wait_for(link.connected.is_set, "the link's connection")
    sock = link._client.socket()  # the live paho socket, read only
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_every_broker_config_we_ship_or_generate_turns_off_nagle():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "broker_config"
    assert "set_tcp_nodelay true" in DEV_SETTINGS
    for name in ("dev.conf", "production.conf"):
        lines = (root / name).read_text().splitlines()
        assert "set_tcp_nodelay true" in lines, name


@pytest.mark.integration
def test_a_broker_that_cannot_be_reached_is_said_once_at_warning(caplog):
    import logging

    from .helpers import wait_for as wait

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    link = MqttLink(client_id="lonely", broker=f"mqtt://127.0.0.1:{port}")
    with caplog.at_level(logging.DEBUG, logger="fedmq.transport.mqtt"):
        link.start()
        try:
            wait(lambda: sum("cannot reach" in r.getMessage() for r in caplog.records) >= 2,
                 "two failed attempts")
        finally:
            link.stop()
    said = [r for r in caplog.records if "cannot reach" in r.getMessage()]
    assert said[0].levelno == logging.WARNING and "lonely" in said[0].getMessage()
    assert all(r.levelno == logging.DEBUG for r in said[1:])  # the same cause: once
