"""`fedmq new PROJECT` writes a project that runs: `fedmq simulate --task PROJECT.task:Task`
trains it over a private broker, and its agent.toml and aggregator.toml run a real agent
process (with the base install only) and an aggregator.

The template is never pip-installed here (that would change the shared environment):
PYTHONPATH stands in for `pip install -e .`, which is the user's way.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import fedmq
from aggregator.config import AggregatorConfig
from aggregator.service import AggregatorService
from edge_agent.config import AgentConfig
from fedmq.config import load_config
from fedmq.errors import ConfigError
from fedmq.scaffold import write_project

from .helpers import wait_for
from .test_layers import BASE_ONLY

FEDMQ = [sys.executable, "-m", "fedmq.cli"]
REPO = Path(fedmq.__file__).resolve().parent.parent
_names = itertools.count()


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A fresh project written by `fedmq new` (the command itself) into a clean directory;
    (its name, its directory), importable in this process for the duration of the test."""
    name = f"scaffolded_{os.getpid()}_{next(_names)}"
    made = subprocess.run([*FEDMQ, "new", name, "--dir", str(tmp_path)], capture_output=True,
                          text=True, timeout=60, env=_env())
    assert made.returncode == 0, made.stderr
    root = tmp_path / name
    assert f"fedmq simulate --task {name}.task:Task" in made.stdout
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == \
        sorted(["pyproject.toml", "README.md", "agent.toml", "aggregator.toml",
                f"{name}/__init__.py", f"{name}/task.py"])
    monkeypatch.syspath_prepend(str(root))
    yield name, root
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[module]


def _env(*paths: Path) -> dict[str, str]:
    """This environment with `paths` and this checkout first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [*(str(p) for p in paths), str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


@pytest.mark.integration
def test_the_template_trains_with_fedmq_simulate(project):
    name, root = project
    run = subprocess.run([*FEDMQ, "simulate", "--task", f"{name}.task:Task", "--devices", "3",
                          "--rounds", "2", "--quiet"], cwd=root, capture_output=True,
                         text=True, timeout=120, env=_env(root))
    assert run.returncode == 0, run.stderr[-3000:]
    summary = re.search(r"final accuracy ([\d.]+) after 2 rounds", run.stdout)
    assert summary, run.stdout
    assert float(summary[1]) > 0.8  # three clusters: a third by chance


@pytest.mark.integration
def test_the_template_configs_run_an_aggregator_and_a_base_install_agent(
        project, broker, tmp_path, stoppers, processes):
    name, root = project
    agent_config = load_config(AgentConfig, root / "agent.toml")
    assert agent_config.task == f"{name}.task:Task"
    config = load_config(AggregatorConfig, root / "aggregator.toml",
                         {"broker": broker.url, "rounds": 1, "min_updates": 1,
                          "checkpoint": str(tmp_path / "aggregator.ckpt")})
    assert config.model_name == f"{name}.task:Task"
    service = AggregatorService(config)
    service.start()
    stoppers(service.stop)
    agent = subprocess.Popen(
        [sys.executable, "-c", BASE_ONLY + "from fedmq.cli import main\nmain()\n", "agent",
         "--config", str(root / "agent.toml"), "--broker", broker.url, "--device-id", "dev0"],
        cwd=root, stderr=subprocess.PIPE, text=True, env=_env(root))
    processes.append(agent)
    wait_for(service.finished.is_set, "a round trained by the template's agent")
    assert service.failure is None
    record = service.history[0]
    assert record.participants == 1 and record.accuracy > 0.6
    agent.send_signal(signal.SIGTERM)
    _, stderr = agent.communicate(timeout=60)
    assert agent.returncode == 0, stderr[-2000:]


def test_fedmq_new_refuses_bad_names_and_existing_directories(tmp_path):
    with pytest.raises(ConfigError, match=r"must be a Python package name.*\(e\.g\. my_fl\)"):
        write_project("my-fl", tmp_path)
    with pytest.raises(ConfigError, match="'json' is already importable"):
        write_project("json", tmp_path)
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="taken already exists"):
        write_project("taken", tmp_path)
    refused = subprocess.run([*FEDMQ, "new", "class", "--dir", str(tmp_path)],
                             capture_output=True, text=True, timeout=60, env=_env())
    assert refused.returncode == 2 and "must be a Python package name" in refused.stderr
    assert not (tmp_path / "class").exists()
