"""The aggregator's observers and its Prometheus endpoint, scraped over HTTP during a run."""

from __future__ import annotations

import logging
import socket
import sys
import urllib.error
import urllib.request

import pytest

from aggregator.devices import DeviceRegistry
from aggregator.observers import AggregatorObserver, ObserverFanout
from fedmq import __version__
from fedmq.core.protocol import DeviceStatus
from fedmq.errors import ConfigError, MissingExtraError
from fedmq.transport.mqtt import MqttLink
from simulator.broker import free_port
from tests.helpers import WAIT_S, make_agents, make_aggregator, scrape, wait_for


class Tally(AggregatorObserver):
    """Counts the rejections it hears of; everything else keeps the defaults."""

    def __init__(self) -> None:
        self.rejected: dict[str, int] = {}

    def update_rejected(self, reason: str, count: int = 1) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + count


class Broken(AggregatorObserver):
    def update_rejected(self, reason: str, count: int = 1) -> None:
        raise RuntimeError("a bug in an observer")

    def start(self) -> None:
        raise ConfigError("port taken")


def test_a_failing_observer_is_logged_once_and_the_others_still_hear(caplog):
    tally = Tally()
    fanout = ObserverFanout([Broken(), tally])
    with caplog.at_level(logging.ERROR, logger="aggregator.observers"):
        for _ in range(3):
            fanout.update_rejected("malformed", 2)
    assert tally.rejected == {"malformed": 6}
    assert [r.getMessage() for r in caplog.records] == [
        "observer Broken failed on update_rejected (logged once; the aggregator goes on)"]
    fanout.round_closed(None)  # the defaults do nothing, whatever they are given
    with pytest.raises(ConfigError, match="port taken"):  # starting is not optional
        fanout.start()


def test_the_registry_counts_devices_online_as_statuses_come():
    registry = DeviceRegistry()

    def status(device: str, online: bool) -> int:
        registry.observe(device, DeviceStatus(device_id=device, online=online), now=0.0)
        return registry.online_count

    assert [status("a", True), status("a", True), status("b", True), status("a", False),
            status("a", False), status("c", False), status("a", True)] == [1, 1, 2, 1, 1, 1, 2]
    assert registry.online_count == len(registry.online())


def test_without_the_extra_the_error_names_it(monkeypatch):
    from aggregator.metrics_export import PrometheusExporter

    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    with pytest.raises(MissingExtraError, match=r"pip install 'fedmq\[metrics\]'"):
        PrometheusExporter(port=9464)


def test_a_metrics_port_in_use_fails_the_start_in_words(tmp_path, stoppers):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        service = make_aggregator("mqtt://127.0.0.1:1", tmp_path, stoppers, start=False,
                                  metrics_port=port)
        stoppers(service.stop)
        with pytest.raises(ConfigError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            service.start()


@pytest.mark.integration
def test_the_metrics_endpoint_counts_a_live_run(broker, tmp_path, stoppers):
    port = free_port()
    service = make_aggregator(broker.url, tmp_path, stoppers, rounds=3, min_updates=3,
                              metrics_port=port)
    first = scrape(port)  # up before any device
    assert first[("fedmq_rounds_total", ())] == 0
    assert first[("fedmq_aggregator_info", (("fedmq_version", __version__), ("fleet", "test"),
                                            ("mode", "sync"), ("model", "mlp"),
                                            ("task", "digits")))] == 1
    # garbage on a device's update topic: refused as malformed, by reason
    intruder = MqttLink(client_id="intruder", broker=broker.url)
    intruder.start()
    stoppers(intruder.stop)
    intruder.wait_connected(WAIT_S)
    intruder.publish(service.topics.update("dev9"), b"not msgpack", qos=1)
    wait_for(lambda: service.rejected["malformed"] == 1, "the garbage's rejection")
    make_agents(broker.url, stoppers, 3)
    # the round is in the history before its checkpoint is written and it is reported
    wait_for(lambda: scrape(port)[("fedmq_rounds_total", ())] >= 1, "a round to close")

    live = scrape(port)  # while the run goes on (the service stops at teardown)

    def value(name: str, **labels: str) -> float:
        return live[(name, tuple(sorted(labels.items())))]

    assert value("fedmq_rounds_total") >= 1
    assert value("fedmq_round_duration_seconds_count") == value("fedmq_rounds_total")
    assert value("fedmq_updates_accepted_total") >= 3
    assert value("fedmq_updates_rejected_total", reason="malformed") == 1
    assert value("fedmq_received_bytes_total", kind="update") > 3 * 4 * 1000  # 3 MLP deltas
    assert value("fedmq_received_bytes_total", kind="status") > 0
    assert value("fedmq_sent_bytes_total", kind="model") > 0
    assert value("fedmq_sent_bytes_total", kind="receipt") > 0
    assert value("fedmq_devices_online") == 3 and value("fedmq_devices_known") == 3
    assert value("fedmq_model_version") >= 1 and 0 < value("fedmq_test_accuracy") <= 1
    assert value("fedmq_checkpoint_write_seconds_count") >= 1
    assert ("fedmq_dp_epsilon", ()) not in live  # DP is off: absent, not 0
    wait_for(service.finished.is_set, "three rounds")
    wait_for(lambda: scrape(port)[("fedmq_rounds_total", ())] == 3, "three rounds counted")
    service.stop()
    with pytest.raises(urllib.error.URLError):  # the port is closed with the service
        scrape(port)
