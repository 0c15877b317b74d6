"""What the agent costs a device: import time, peak RSS during a round, seconds per epoch.

Each case runs in a fresh Python process (so RSS and import times are the agent's own):
import the agent, load this device's shard, receive the initial model as an announcement
would carry it, and train one round with the task's defaults, as `LocalTrainer` does on a
device. Goal (issue 5): the numpy agent's peak RSS <= 60 MB.

    python benchmarks/footprint.py
"""

from __future__ import annotations

import json
import subprocess
import sys

GOAL_MB = 60.0
CASES = [  # (label, task, model)
    ("numpy digits mlp", "digits", "mlp"),
    ("numpy sensor-features mlp", "sensor-features", "mlp"),
    ("torch sensor har_cnn", "sensor", "har_cnn"),
    ("torch keyboard char_gru", "keyboard", "char_gru"),
]

PROBE = r"""
import json, resource, sys, time
task, model_name = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
import edge_agent.agent  # noqa: F401  what `fedmq agent` imports
from fedmq.tasks import device_shard, task_spec
from fedmq.models import build_model
import numpy as np
import_s = time.perf_counter() - t0
spec = task_spec(task)
data = device_shard(task, device_index=0, device_count=10, alpha=0.5, seed=0)
config = spec.model_config(model_name)
t1 = time.perf_counter()
model = build_model(model_name, config)  # builds torch lazily for torch models
backend_s = time.perf_counter() - t1
start = model.get_flat()
result = model.train(data.x, data.y, epochs=spec.epochs, batch_size=spec.batch_size,
                     lr=spec.lr, rng=np.random.default_rng(0), max_steps=spec.max_steps)
delta = model.get_flat() - start
from fedmq.core import codecs
codecs.encode(delta, "q8", rng=np.random.default_rng(0))
per_epoch = result.seconds / max(1, spec.epochs) if result.complete else result.seconds
print(json.dumps({
    "import_s": import_s, "backend_s": backend_s, "examples": len(data),
    "params": int(start.size), "epoch_s": per_epoch, "complete": result.complete,
    "steps": result.steps, "torch": "torch" in sys.modules,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""


def measure(task: str, model: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, task, model], capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"{task}/{model} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    rows = []
    for label, task, model in CASES:
        print(f"measuring {label} ...", file=sys.stderr, flush=True)
        rows.append((label, measure(task, model)))
    print(f"\n{'agent':28s} {'import':>8s} {'backend':>8s} {'params':>8s} {'examples':>9s} "
          f"{'ms/epoch':>9s} {'peak RSS':>9s}")
    for label, r in rows:
        epoch = f"{r['epoch_s'] * 1000:.1f}" + ("" if r["complete"] else "*")
        print(f"{label:28s} {r['import_s']:7.2f}s {r['backend_s']:7.2f}s {r['params']:8d} "
              f"{r['examples']:9d} {epoch:>9s} {r['peak_rss_mb']:7.1f}MB")
    print("* keyboard trains a capped number of steps per round (the task's max_steps); "
          "the figure is that round's time")
    numpy_peak = max(r["peak_rss_mb"] for label, r in rows if label.startswith("numpy"))
    verdict = "meets" if numpy_peak <= GOAL_MB else "MISSES"
    print(f"summary: numpy agent peak RSS {numpy_peak:.1f} MB ({verdict} the {GOAL_MB:.0f} MB "
          "goal); torch agents need the torch extra")
    return 0


if __name__ == "__main__":
    sys.exit(main())
