"""The simulator's session loop: many MQTT sessions on one thread, against real mosquitto."""

from __future__ import annotations

import logging
import threading

import pytest

from fedmq.transport.mqtt import MqttLink
from simulator.sessions import SessionLoop, SessionSpec

from .helpers import wait_for

pytestmark = pytest.mark.integration


def test_hundreds_of_sessions_on_one_thread_receive_retained_and_publish(broker, stoppers):
    received: list[str] = []
    lock = threading.Lock()
    sink = MqttLink(client_id="sink", broker=broker.url)
    sink.route("up/#", lambda m: (lock.acquire(), received.append(m.topic), lock.release()))
    sink.start()
    stoppers(sink.stop)
    wait_for(sink.subscribed.is_set, "the sink's subscription")
    sink.publish("model/current", b"model v1", retain=True)

    got: dict[str, bytes] = {}

    def on_message(session, message):
        got[session.client_id] = message.payload
        loop.publish(session, f"up/{session.client_id}", b"update", qos=1)

    loop = SessionLoop(broker.url)
    count = 300
    for i in range(count):
        loop.add(SessionSpec(f"d{i}", subscriptions=(("model/current", 1),)), on_message)
    loop.start()
    stoppers(loop.close)
    wait_for(lambda: len(got) == count, "every session's retained model")
    assert set(got.values()) == {b"model v1"}
    wait_for(lambda: len(received) == count, "every session's update at the sink")
    assert sorted(received) == sorted(f"up/d{i}" for i in range(count))
    assert loop.ready_count == count and not loop.failures
    assert threading.active_count() < 20  # one loop thread, not a thread pair per session


def test_a_refused_session_is_said_counted_and_retried(broker_factory, caplog):
    locked = broker_factory("allow_anonymous false\n", name="locked")
    loop = SessionLoop(locked.url)
    session = loop.add(SessionSpec("nobody"), lambda s, m: None)
    with caplog.at_level(logging.WARNING, logger="simulator.sessions"):
        loop.start()
        try:
            wait_for(lambda: loop.failures, "the broker's refusal")
        finally:
            loop.close()
    assert not session.connected_once and loop.never_connected() == [session]
    assert any("nobody cannot connect" in r.message and "refused" in r.message
               for r in caplog.records)


def test_sessions_come_back_after_the_broker_restarts(broker, stoppers):
    """After a restart every session reconnects and renews its subscription, the one it
    was created with and the one added at run time."""
    got: dict[str, set[str]] = {}
    loop = SessionLoop(broker.url)
    sessions = [loop.add(SessionSpec(f"r{i}", subscriptions=(("fixed", 1),)),
                         lambda s, m: got.setdefault(m.topic, set()).add(s.client_id))
                for i in range(20)]
    loop.start()
    stoppers(loop.close)
    wait_for(lambda: loop.ready_count == 20, "20 sessions")
    for session in sessions:
        loop.subscribe(session, ("added",))
    broker.stop()
    wait_for(lambda: loop.ready_count == 0, "the sessions to notice")
    broker.start()
    wait_for(lambda: loop.ready_count == 20, "all 20 sessions reconnected", timeout=120)
    assert loop.connects == 40 and all(s.connected_once for s in sessions)
    sink = MqttLink(client_id="after", broker=broker.url)
    sink.start()
    stoppers(sink.stop)
    wait_for(sink.connected.is_set, "a publisher")
    sink.publish("fixed", b"1", retain=False)
    sink.publish("added", b"2", retain=False)
    everyone = {f"r{i}" for i in range(20)}
    wait_for(lambda: got.get("fixed") == everyone and got.get("added") == everyone,
             "both messages at every session")
    assert set(got) == {"fixed", "added"}
