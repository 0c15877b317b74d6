"""`fedmq new PROJECT`: a small runnable project for your own task, written offline.

PROJECT/ holds a pyproject (the package PROJECT, declaring its task as the `fedmq.tasks`
entry point PROJECT), PROJECT/task.py (a numpy task on generated data: it runs wherever
fedmq does, and is the thing to edit), agent.toml, aggregator.toml and a README.
`cd PROJECT && pip install -e . && fedmq simulate --task PROJECT.task:Task` trains it
over a private broker. Nothing is downloaded: the files are the strings below.
"""

from __future__ import annotations

import argparse
import importlib.util
import keyword
import sys
from pathlib import Path

from fedmq.errors import ConfigError

PLACEHOLDER = "{{project}}"

PYPROJECT = """\
[build-system]
requires = ["setuptools>=68", "wheel"]
build-backend = "setuptools.build_meta"

[project]
name = "{{project}}"
version = "0.1.0"
description = "A federated task trained with fedmq"
requires-python = ">=3.10"
dependencies = ["fedmq"]

# `task = "{{project}}"` then names the task too (as does `{{project}}.task:Task`).
[project.entry-points."fedmq.tasks"]
{{project}} = "{{project}}.task:Task"

[tool.setuptools]
packages = ["{{project}}"]
"""

INIT = '''"""{{project}}: a federated task for fedmq (see task.py)."""
'''

TASK = '''"""{{project}}'s federated task: edit it to train your model on your data.

fedmq builds the model `Task.build` returns on the aggregator and on every device,
trains it on each device's `load_data` and scores each new global model on `test_data`.
Only the model's named arrays travel (as deltas); the data never leaves a device.

This template is softmax regression in plain numpy on generated clusters, so it runs
wherever fedmq does. To train a PyTorch module instead, return
`fedmq.TorchTrainer.build(make_network, seed=seed)` from `build`; for scikit-learn,
`fedmq.SklearnTrainer(SGDClassifier(loss="log_loss"), features=FEATURES,
classes=CLASSES)`. fedmq's docs/custom-tasks.md says more.

Try it:  fedmq simulate --task {{project}}.task:Task
"""

from __future__ import annotations

import numpy as np

import fedmq

FEATURES = 10  # values per example
CLASSES = 3


def make_data(*, seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Stand-in data, one noisy cluster per class: replace it with yours."""
    centres = np.random.default_rng(0).normal(0.0, 1.0, size=(CLASSES, FEATURES))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, size=n)
    x = centres[y] + rng.normal(0.0, 1.0, size=(n, FEATURES))
    return x.astype(np.float32), y


def loss_and_grad(params, x, y):
    """Mean cross-entropy of one mini-batch, and its gradient for each parameter."""
    logits = x @ params["w"] + params["b"]
    logits = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    rows = np.arange(len(y))
    loss = float(-np.log(probs[rows, y] + 1e-12).mean())
    probs[rows, y] -= 1.0
    probs /= len(y)
    return loss, {"w": x.T @ probs, "b": probs.sum(axis=0)}


def predict(params, x):
    """Class scores, for accuracy."""
    return x @ params["w"] + params["b"]


class Task(fedmq.Task):
    """Softmax regression on generated clusters (a template: make it yours)."""

    # What `fedmq simulate` trains with unless its flags say otherwise.
    rounds = 10
    epochs = 1
    batch_size = 32
    lr = 0.5
    # One example's shape and the class count: with them an agent may read its data from
    # a file instead of load_data (agent.toml's data_source), checked against them.
    input_shape = (FEATURES,)
    classes = CLASSES

    def build(self, *, seed: int) -> fedmq.Trainer:
        rng = np.random.default_rng(seed)
        params = {"w": rng.normal(0.0, 0.01, size=(FEATURES, CLASSES)).astype(np.float32),
                  "b": np.zeros(CLASSES, dtype=np.float32)}
        return fedmq.NumpyTrainer(params, loss_and_grad, predict=predict)

    def load_data(self, device: fedmq.Device):
        """A simulated device's share of one pooled data set, skewed by label
        (device.alpha). A real device reads its own data here, e.g.
        `data = np.load("/var/lib/{{project}}/data.npz"); return data["x"], data["y"]`."""
        x, y = make_data(seed=device.seed, n=2000)
        return device.shard(x, y)

    def test_data(self, *, seed: int):
        """What the aggregator scores every new model on."""
        return make_data(seed=seed + 1, n=500)
'''

AGENT_TOML = """\
# One device of {{project}}:  fedmq agent --config agent.toml --device-id dev0
# (after `pip install -e .` here; `fedmq agent --help` lists every key).
broker = "mqtt://127.0.0.1:1883"
fleet = "{{project}}"
task = "{{project}}.task:Task"

# Which share of the generated data Task.load_data gives this device (--device-index 1
# for the next one). A real device reads its own data in load_data, or from a file:
# data_source = "npz:/var/lib/{{project}}/data.npz"
device_index = 0
device_count = 4

# Keep updates awaiting their receipt across restarts (empty: memory only).
state_dir = ""
"""

AGGREGATOR_TOML = """\
# {{project}}'s aggregator:  fedmq aggregator --config aggregator.toml
# (after `pip install -e .` here; `fedmq aggregator --help` lists every key).
broker = "mqtt://127.0.0.1:1883"
fleet = "{{project}}"
task = "{{project}}.task:Task"

rounds = 10
min_updates = 2  # a round closes once this many devices sent their update
deadline_s = 60.0
epochs = 1
batch_size = 32
lr = 0.5
checkpoint = "{{project}}-aggregator.ckpt"
"""

README = """\
# {{project}}

A federated task for fedmq: the model and data in `{{project}}/task.py`, trained
across devices over MQTT.

## Try it

    pip install -e .
    fedmq simulate --task {{project}}.task:Task

`fedmq simulate` starts a private mosquitto (it must be installed), the aggregator and
10 devices on this machine, trains for `Task.rounds` rounds and prints the accuracy of
each round. `--devices 50 --rounds 30 --alpha 0.1` changes the fleet, `--help` shows the
rest. Installed, the package also names its task by its entry point: `--task {{project}}`.

Without installing it: `PYTHONPATH=. fedmq simulate --task {{project}}.task:Task`.

## Make it yours

Edit `{{project}}/task.py`:

- `build` returns the model: a `fedmq.NumpyTrainer` (as here), a
  `fedmq.TorchTrainer` (any `torch.nn.Module`, your loss and optimizer) or a
  `fedmq.SklearnTrainer` (an estimator with `partial_fit`), or your own class with
  `get_params`, `set_params`, `fit` and `evaluate`.
- `load_data` returns a device's `(x, y)`; `test_data` what the aggregator scores on.

The aggregator and every device must run the same version of this package: each update
carries a hash of the model's layout (names and shapes of its arrays), and a mismatch is
refused with both hashes named.

## Deploy it

On the server (with a broker at `broker`):

    fedmq aggregator --config aggregator.toml

On each device, with this package installed:

    fedmq agent --config agent.toml --device-id dev0 --device-index 0
    fedmq agent --config agent.toml --device-id dev1 --device-index 1
"""

FILES = {
    "pyproject.toml": PYPROJECT,
    "README.md": README,
    "agent.toml": AGENT_TOML,
    "aggregator.toml": AGGREGATOR_TOML,
    f"{PLACEHOLDER}/__init__.py": INIT,
    f"{PLACEHOLDER}/task.py": TASK,
}


def check_project_name(name: str) -> None:
    """A name usable as a package: an identifier that hides no importable module."""
    if not name.isidentifier() or keyword.iskeyword(name):
        hint = name.replace("-", "_").replace(".", "_").replace(" ", "_")
        suggestion = f" (e.g. {hint})" if hint.isidentifier() else ""
        raise ConfigError(f"project name {name!r} must be a Python package name: letters, "
                          f"digits and _, not starting with a digit{suggestion}")
    if name in sys.stdlib_module_names or importlib.util.find_spec(name) is not None:
        raise ConfigError(f"a module named {name!r} is already importable; choose a project "
                          "name that does not hide it")


def write_project(name: str, parent: str | Path = ".") -> Path:
    """Write the template for project `name` into parent/name; its path."""
    root = Path(parent) / name
    if root.exists():
        raise ConfigError(f"{root} already exists; choose another name or remove it")
    check_project_name(name)
    for relative, text in FILES.items():
        path = root / relative.replace(PLACEHOLDER, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.replace(PLACEHOLDER, name), encoding="utf-8")
    return root


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("project", help="the project's (and its package's) name, e.g. "
                        "keyboard_fl")
    parser.add_argument("--dir", default=".", help="where to create PROJECT/ (default: here)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        root = write_project(args.project, args.dir)
    except OSError as exc:
        raise ConfigError(f"cannot write the project: {exc.strerror}: "
                          f"{exc.filename}") from None
    print(f"wrote {root}/ (pyproject.toml, README.md, agent.toml, aggregator.toml, "
          f"{args.project}/task.py). Next:\n"
          f"  cd {root}\n"
          "  pip install -e .\n"
          f"  fedmq simulate --task {args.project}.task:Task")
    return 0


__all__ = ["FILES", "check_project_name", "write_project"]
