"""`fedmq status`: devices' activity reports, the fleet table, and the live reader."""

from __future__ import annotations

import threading

import pytest

from fedmq.cli import main
from fedmq.config import BrokerConfig
from fedmq.core.activity import ActivityReport
from fedmq.core.protocol import (
    AggregatorStatus,
    DeviceActivity,
    DeviceStatus,
    FleetTopics,
)
from fedmq.ops.status import CLEAR, COLUMNS, FleetState, StatusReader, render, watch
from tests.helpers import WAIT_S, make_agents, make_aggregator, wait_for

TOPICS = FleetTopics("test")
NOW = 1_000_000.0


def _report(interval_s: float = 5.0) -> ActivityReport:
    return ActivityReport(device_id="pi1", capabilities={"cpus": 4}, agent_version="9",
                          interval_s=interval_s)


def test_activity_is_reported_when_it_changed_at_most_every_interval():
    report = _report(interval_s=5.0)
    birth = report.status(online=True, now=0.0, wall=NOW)
    assert birth.capabilities == {"cpus": 4} and birth.activity == DeviceActivity()
    assert not report.due(100.0)  # nothing happened
    report.trained(round=3, codec="q8", backend="numpy")
    report.uploaded(1200)
    report.holding(1)
    assert not report.due(4.9) and report.due(5.0)
    status = report.status(online=True, now=5.0, wall=NOW + 5)
    assert status.activity == DeviceActivity(last_round=3, updates=1, bytes_up=1200,
                                             pending=1, codec="q8", backend="numpy")
    assert status.capabilities == {"cpus": 4} and status.ts == NOW + 5  # replaces the birth
    report.holding(1)  # no change
    report.uploaded(0)
    assert not report.dirty and not report.due(60.0)
    report.holding(0)  # the receipt came
    assert report.due(10.0) and not report.due(9.0)
    silent = _report(interval_s=0.0)  # births only
    silent.trained(round=1, codec="f32", backend="numpy")
    assert not silent.dirty and not silent.due(1e9)
    with pytest.raises(ValueError):
        _report(interval_s=-1.0)


def _device(device_id: str, *, online: bool = True, ts: float = NOW - 5, **activity):
    return DeviceStatus(device_id=device_id, online=online, ts=ts,
                        capabilities={"battery": True, "link_kbps": 256.0},
                        activity=DeviceActivity(**activity) if activity else None)


def _rows(text: str) -> dict[str, list[str]]:
    """The device table of a rendered frame, by device id."""
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("DEVICE"))
    assert lines[header].split() == list(COLUMNS)
    rows = {}
    for line in lines[header + 1:]:
        if not line.strip():
            break
        cells = line.split()
        rows[cells[0]] = cells
    return rows


def test_the_table_shows_each_device_from_its_retained_status():
    state = FleetState(TOPICS)
    state.observe(TOPICS.aggregator_status,
                  AggregatorStatus(online=True, round=4, version=3, ts=NOW - 2).to_payload())
    state.observe(TOPICS.device_status("pi2"),
                  _device("pi2", last_round=4, updates=3, bytes_up=3 * 1024 * 1024,
                          pending=1, codec="top0.02+sign", backend="torch").to_payload())
    old_agent = DeviceStatus(device_id="pi1", online=True, ts=NOW - 125)  # no activity
    state.observe(TOPICS.device_status("pi1"), old_agent.to_payload())
    text = render(state, now=NOW)
    assert "AGGREGATOR   online, round 4, model v3, status 2s old" in text
    rows = _rows(text)
    assert list(rows) == ["pi1", "pi2"]  # sorted by id
    assert rows["pi2"] == ["pi2", "yes", "5s", "4", "torch", "top0.02+sign", "3.0MiB", "1",
                           "battery/256kbps"]
    assert rows["pi1"] == ["pi1", "yes", "2m5s", "-", "-", "-", "-", "-", "-/-"]
    assert text.rstrip().endswith("2 devices, 2 online")


def test_a_last_will_keeps_what_the_device_said_before():
    state = FleetState(TOPICS)
    state.observe(TOPICS.aggregator_status,
                  AggregatorStatus(online=True, round=4, version=3, ts=NOW).to_payload())
    state.observe(TOPICS.aggregator_status, AggregatorStatus(online=False).to_payload())
    state.observe(TOPICS.device_status("pi1"),
                  _device("pi1", last_round=2, updates=2, bytes_up=900, codec="f32",
                          backend="numpy").to_payload())
    state.observe(TOPICS.device_status("pi1"),  # the broker's Last Will: no ts, nothing
                  DeviceStatus(device_id="pi1", online=False).to_payload())
    text = render(state, now=NOW)
    assert "AGGREGATOR   OFFLINE, round 4, model v3" in text
    assert _rows(text)["pi1"] == ["pi1", "no", "5s", "2", "numpy", "f32", "900B", "0",
                                  "battery/256kbps"]
    assert text.rstrip().endswith("1 devices, 0 online")
    state.observe(TOPICS.device_status("pi1"), b"")  # a cleared retained status
    assert "no device has published a status yet" in render(state, now=NOW)


def test_unreadable_statuses_are_counted_not_fatal():
    state = FleetState(TOPICS)
    state.observe(TOPICS.device_status("pi1"), b"garbage")
    state.observe(TOPICS.device_status("pi1"), _device("pi9").to_payload())  # not its topic
    state.observe(f"{TOPICS.prefix}/device/a+b/status", _device("pi1").to_payload())
    assert not state.devices
    assert dict(state.rejected) == {"malformed": 1, "wrong_topic": 1, "bad_topic": 1}
    text = render(state, now=NOW)
    assert "none seen" in text
    assert "unreadable statuses: bad_topic x1, malformed x1, wrong_topic x1" in text


class Frames:
    """A text stream that keeps each frame `watch` writes (it writes one per call)."""

    def __init__(self) -> None:
        self.frames: list[str] = []

    def write(self, text: str) -> None:
        self.frames.append(text)

    def flush(self) -> None:
        pass


@pytest.mark.integration
def test_watch_follows_a_live_fleet_and_the_cli_prints_it(broker, tmp_path, stoppers, capsys):
    service = make_aggregator(broker.url, tmp_path, stoppers, rounds=3, min_updates=3)
    reader = StatusReader(BrokerConfig(broker=broker.url, fleet="test"))
    stoppers(reader.close)
    reader.start(timeout_s=WAIT_S)
    out, stop = Frames(), threading.Event()
    watcher = threading.Thread(target=watch, kwargs=dict(reader=reader, out=out,
                                                         interval_s=0.1, stop=stop))
    watcher.start()
    stoppers(lambda: (stop.set(), watcher.join(WAIT_S)))
    wait_for(lambda: out.frames, "the first table")
    assert "no device has published a status yet" in out.frames[0]
    assert "AGGREGATOR   online, round 1, model v0" in out.frames[0]

    agents = make_agents(broker.url, stoppers, 3, status_interval_s=0.2)
    wait_for(service.finished.is_set, "three rounds")

    def settled() -> dict[str, list[str]]:
        frame = out.frames[-1]
        rows = _rows(frame) if "DEVICE" in frame else {}
        done = len(rows) == 3 and all(r[3] == "3" and r[7] == "0" for r in rows.values())
        return rows if done else {}

    wait_for(settled, "every device's round-3 activity with its receipt in the table")
    for device, row in settled().items():
        agent = agents[int(device.removeprefix("dev"))]
        assert row[1] == "yes" and row[4:6] == ["numpy", "f32"]
        assert agent.stats.updates_sent == 3 and row[6].endswith("KiB")
    assert "AGGREGATOR   online, round 4, model v3" in out.frames[-1]
    stop.set()
    watcher.join(WAIT_S)

    ansi = Frames()
    assert watch(reader, out=ansi, interval_s=0.01, count=2, ansi=True) == 2
    assert all(frame.startswith(CLEAR) for frame in ansi.frames)

    agents[2].stop()  # says goodbye: offline, with what it did
    wait_for(lambda: not reader.state.devices["dev2"].online, "dev2's offline status")
    capsys.readouterr()
    assert main(["status", "--broker", broker.url, "--fleet", "test"]) == 0
    text = capsys.readouterr().out
    rows = _rows(text)
    assert [rows[d][1] for d in ("dev0", "dev1", "dev2")] == ["yes", "yes", "no"]
    assert rows["dev2"][3] == "3"
    assert text.rstrip().endswith("3 devices, 2 online")
    assert main(["status", "--broker", broker.url, "--fleet", "test", "--watch",
                 "--count", "2", "--interval", "0.05"]) == 0
    text = capsys.readouterr().out
    assert text.count("fedmq status at") == 2 and CLEAR not in text  # not a terminal
    assert main(["status", "--broker", broker.url, "--watch", "--interval", "0"]) == 2


@pytest.mark.integration
def test_status_shows_a_hosted_simulation_live():
    from simulator.config import SimulationConfig
    from simulator.fleet import Simulation

    config = SimulationConfig(devices=6, task="synthetic-iid", rounds=3, engine="hosted",
                              fleet="live", status_interval_s=0.2)
    with Simulation(config) as sim:
        reader = StatusReader(BrokerConfig(broker=sim.broker.url, fleet="live"))
        try:
            reader.start(timeout_s=WAIT_S)
            # while it trains: all six online, with the backend and codec they train with
            wait_for(lambda: len(reader.state.devices) == 6
                     and all(s.online and s.activity is not None and s.activity.updates
                             for s in reader.state.devices.values()),
                     "six hosted devices reporting activity")
            sim.wait()
            wait_for(lambda: all(s.activity.last_round == 3 and s.activity.pending == 0
                                 for s in reader.state.devices.values()),
                     "every hosted device's last round, receipted")
            rows = _rows(reader.render())
        finally:
            reader.close()
    assert sorted(rows) == [f"live-dev{i:03d}" for i in range(6)]
    for row in rows.values():
        assert row[1] == "yes" and row[3:6] == ["3", "numpy", "f32"] and row[7] == "0"
