"""The `fedmq` command as users run it: real processes, real signals, a real broker."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fedmq.core.protocol import AggregatorStatus, DeviceStatus, FleetTopics

from .helpers import wait_for

pytestmark = pytest.mark.integration
FEDMQ = [sys.executable, "-m", "fedmq.cli"]


def test_simulate_runs_a_fleet_and_writes_metrics_and_plot(tmp_path):
    metrics = tmp_path / "out" / "metrics.jsonl"
    proc = subprocess.run(
        [*FEDMQ, "simulate", "--devices", "4", "--rounds", "3", "--model", "logreg",
         "--metrics", str(metrics), "--timeout-s", "120"],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"final accuracy (0\.\d+) after 3 rounds, (\d+) bytes uploaded", last)
    assert match, proc.stdout
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2, 3]
    assert {"round", "accuracy", "loss", "participants", "bytes_up", "bytes_down",
            "wall_s"} <= set(lines[0])
    assert all(line["participants"] == 4 and line["bytes_up"] > 0 for line in lines)
    assert sum(line["bytes_up"] for line in lines) == int(match.group(2))
    assert metrics.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "round" in proc.stdout and "accuracy" in proc.stdout  # the final table


def test_simulate_reports_bad_flags_clearly():
    proc = subprocess.run([*FEDMQ, "simulate", "--devices", "0"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "devices and rounds must be >= 1" in proc.stderr
    assert "Traceback" not in proc.stderr


class RetainedWatcher:
    """Keeps the latest retained payload per topic of one fleet."""

    def __init__(self, port: int, fleet: str) -> None:
        self.latest: dict[str, bytes] = {}
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id="watcher", protocol=mqtt.MQTTv5)
        self.client.on_message = lambda _c, _u, m: self.latest.__setitem__(m.topic, m.payload)
        self.client.on_connect = lambda c, *_: c.subscribe(f"fedmq/{fleet}/#", qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_agent_and_aggregator_services_train_and_shut_down_cleanly(broker, tmp_path, processes,
                                                                   stoppers):
    topics = FleetTopics("svc")
    watcher = RetainedWatcher(broker.port, "svc")
    stoppers(watcher.close)
    common = ["--broker", broker.url, "--fleet", "svc"]
    processes.append(subprocess.Popen(
        [*FEDMQ, "aggregator", *common, "--min-updates", "2", "--model", "logreg",
         "--checkpoint", str(tmp_path / "agg.ckpt"), "--metrics", str(tmp_path / "m.jsonl")],
        stderr=subprocess.PIPE, text=True))
    for i in range(2):  # pi0 keeps its state on disk, pi1 in memory (and is warned)
        state = ["--state-dir", str(tmp_path / "pi0")] if i == 0 else []
        processes.append(subprocess.Popen(
            [*FEDMQ, "agent", *common, "--device-id", f"pi{i}", "--device-index", str(i),
             "--device-count", "2", *state], stderr=subprocess.PIPE, text=True))

    def aggregator_round() -> int:
        raw = watcher.latest.get(topics.aggregator_status)
        return AggregatorStatus.from_payload(raw).round if raw else 0

    wait_for(lambda: aggregator_round() >= 3, "two rounds through the services")
    for proc in processes:
        proc.send_signal(signal.SIGTERM)
    logs = []
    for proc in processes:
        assert proc.wait(30) == 0, proc.stderr.read()
        logs.append(proc.stderr.read())
    assert "state_dir is not set" not in logs[1] and "state_dir is not set" in logs[2]

    def offline(topic, cls) -> bool:
        raw = watcher.latest.get(topic)
        return raw is not None and not cls.from_payload(raw).online

    wait_for(lambda: offline(topics.aggregator_status, AggregatorStatus), "aggregator offline")
    for i in range(2):
        wait_for(lambda i=i: offline(topics.device_status(f"pi{i}"), DeviceStatus),
                 f"pi{i} offline")
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) >= 2
    assert (tmp_path / "agg.ckpt").exists()


def test_agent_with_bad_config_exits_with_a_clear_message(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text('device_id = "pi-1"\ncodec = "zip9"\n')
    proc = subprocess.run([*FEDMQ, "agent", "--config", str(config)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "codec 'zip9'" in proc.stderr and "Traceback" not in proc.stderr


# A folder under a regular file, or under /proc: unwritable even for root (tests run as root,
# whom chmod does not stop).
UNWRITABLE = [
    (["aggregator", "--checkpoint", "{file}/agg.ckpt"], "checkpoint", "{file}/agg.ckpt"),
    (["aggregator", "--checkpoint", "/proc/forbidden/agg.ckpt"], "checkpoint",
     "/proc/forbidden/agg.ckpt"),
    (["aggregator", "--checkpoint", "{tmp}/agg.ckpt", "--metrics", "{file}/m.jsonl"],
     "metrics", "{file}/m.jsonl"),
    (["agent", "--state-dir", "{file}/state"], "state_dir", "{file}/state"),
    (["simulate", "--metrics", "{file}/out/m.jsonl"], "metrics", "{file}/out/m.jsonl"),
]


@pytest.mark.parametrize(("argv", "option", "path"), UNWRITABLE,
                         ids=["checkpoint", "checkpoint-proc", "metrics", "state_dir",
                              "simulate-metrics"])
def test_an_unwritable_path_is_one_error_line_naming_it_not_a_traceback(tmp_path, argv, option,
                                                                       path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")

    def fill(text: str) -> str:
        return text.format(file=a_file, tmp=tmp_path)

    # the broker is never reached: the paths are checked before anything connects
    proc = subprocess.run([*FEDMQ, *map(fill, argv), "--broker", "mqtt://127.0.0.1:9"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    said = [line for line in proc.stderr.splitlines() if fill(path) in line]
    assert len(said) == 1, proc.stderr
    assert re.search(rf"\b(ERROR|error)\b.* {option} {re.escape(fill(path))} cannot be written",
                     said[0]), said[0]


def _processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line mentions `text` (live processes only)."""
    from pathlib import Path

    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().split(") ")[-1][:1]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(int(proc.name))
    return found


# A script (a benchmark, a user's notebook turned script) that runs a Simulation itself:
# killing it must clean up as killing `fedmq simulate` does
SIMULATION_SCRIPT = """
from simulator.fleet import Simulation, SimulationConfig
with Simulation(SimulationConfig(devices=3, rounds=100000, timeout_s=600)) as sim:
    sim.wait()
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
@pytest.mark.parametrize("entry", ["cli", "library"])
def test_simulate_stopped_by_a_signal_leaves_no_broker_and_no_files(tmp_path, sig, entry,
                                                                     processes):
    import os

    env = {**os.environ, "TMPDIR": str(tmp_path)}
    argv = ([*FEDMQ, "simulate", "--devices", "3", "--rounds", "100000", "--quiet",
             "--timeout-s", "600"] if entry == "cli" else [sys.executable, "-c",
                                                           SIMULATION_SCRIPT])
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    processes.append(proc)
    try:
        wait_for(lambda: _processes_mentioning(str(tmp_path / "fedmq-sim-")),
                 "the simulation's private mosquitto")
        wait_for(lambda: any(tmp_path.glob("fedmq-sim-*/aggregator.ckpt*")),
                 "rounds under way")
        proc.send_signal(sig)
        assert proc.wait(60) == 128 + sig
        wait_for(lambda: not _processes_mentioning(str(tmp_path)), "the broker to be gone")
        assert not list(tmp_path.glob("fedmq-sim-*"))
    finally:  # what the run left behind, if it failed to clean up after itself
        for pid in _processes_mentioning(str(tmp_path)):
            os.kill(pid, signal.SIGKILL)


def _json_lines(stderr: str) -> list[dict]:
    """Every line of `stderr` as the JSON object it must be (fails on any other line)."""
    lines = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    for line in lines:
        assert {"time", "level", "logger", "message"} <= set(line), line
    return lines


@pytest.mark.parametrize(("argv", "path"), [
    (["aggregator", "--checkpoint", "{file}/agg.ckpt"], "{file}/agg.ckpt"),
    (["agent", "--state-dir", "{file}/state"], "{file}/state"),
    (["simulate", "--metrics", "{file}/m.jsonl"], "{file}/m.jsonl"),
], ids=["aggregator", "agent", "simulate"])
def test_log_format_json_makes_every_stderr_line_a_json_object(tmp_path, argv, path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    argv = [arg.format(file=a_file) for arg in argv]
    proc = subprocess.run([*FEDMQ, *argv, "--log-format", "json",
                           "--broker", "mqtt://127.0.0.1:9"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    [error] = [line for line in _json_lines(proc.stderr) if line["level"] == "ERROR"]
    assert path.format(file=a_file) in error["message"]


def test_a_running_aggregator_logs_json_lines(tmp_path, processes):
    proc = subprocess.Popen([*FEDMQ, "aggregator", "--log-format", "json",
                             "--checkpoint", str(tmp_path / "agg.ckpt"),
                             "--broker", "mqtt://127.0.0.1:9"],  # nobody listens there
                            stderr=subprocess.PIPE, text=True)
    processes.append(proc)
    first = json.loads(proc.stderr.readline())  # blocks until the service says something
    assert first["level"] == "WARNING" and "cannot reach the broker" in first["message"]
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest
    _json_lines(rest)


def test_simulate_shows_warnings_by_default():
    # devices of a fleet whose broker is not there: the run cannot work, and says why
    proc = subprocess.run([*FEDMQ, "simulate", "--agents-only", "--broker",
                           "mqtt://127.0.0.1:9", "--fleet", "nowhere", "--devices", "1",
                           "--rounds", "1", "--timeout-s", "2", "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert re.search(r"WARNING .*cannot reach the broker at mqtt://127.0.0.1:9", proc.stderr), \
        proc.stderr
    assert re.search(r"ERROR .*did not finish 1 rounds within 2 s", proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_simulation_takes_only_the_default_kill_signals_and_gives_them_back():
    from simulator.fleet import unwinding_on_kill

    def own(*_):
        """A program's own SIGHUP handler."""

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, own)
        with unwinding_on_kill():
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, own)
            assert signal.getsignal(signal.SIGHUP) is own
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGHUP) is own
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
