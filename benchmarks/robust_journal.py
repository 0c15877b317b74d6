"""Checkpoint cost of a robust round: bytes each commit writes and seconds per round.

A robust rule (median, trimmed mean, Krum...) keeps every update of the open round, and
the open round is checkpointed after every batch of accepted updates. Drives the round
machine and the checkpoint store directly (no broker: what is measured is the store),
committing after every `--batch` updates as the service does under load, with q8 updates
of a `--params` model from `--devices` devices per round:

    python benchmarks/robust_journal.py [--devices 50 --params 100000 --rounds 5 --batch 1]

Bytes are counted at os.pwrite (journal slots and any side file), so the figure is the
same whichever version of the store runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np

from aggregator.checkpoint import CheckpointStore
from aggregator.rounds import RoundMachine, RoundPolicy
from aggregator.strategy.optimizers import ServerOptConfig, create_optimizer
from fedmq.core import codecs
from fedmq.core.protocol import Update


class _Counted:
    """os.pwrite, counting the bytes it writes."""

    def __init__(self) -> None:
        self.bytes = 0
        self._pwrite = os.pwrite

    def __call__(self, fd: int, data, offset: int) -> int:
        written = self._pwrite(fd, data, offset)
        self.bytes += written
        return written


def run(*, devices: int, params: int, rounds: int, batch: int, rule: str) -> dict:
    rng = np.random.default_rng(0)
    deltas = [codecs.encode(rng.normal(0, 0.01, params).astype(np.float32), "q8")
              for _ in range(devices)]
    counted = _Counted()
    os.pwrite = counted
    try:
        with tempfile.TemporaryDirectory() as folder:
            m = RoundMachine(params=np.zeros(params, np.float32),
                             optimizer=create_optimizer(ServerOptConfig()),
                             policy=RoundPolicy(min_updates=devices, deadline_s=1e9,
                                                aggregation=rule),
                             layout_hash="lay", now=0.0)
            store = CheckpointStore(os.path.join(folder, "agg.ckpt"))
            store.save({"machine": m.state_dict(), "history": []})
            per_commit, per_round = [], []
            for r in range(1, rounds + 1):
                started = time.perf_counter()
                for i, delta in enumerate(deltas):
                    m.offer(Update(device_id=f"d{i}", update_id=f"u{r}-{i}", round=r,
                                   base_version=m.version, num_samples=10, loss=1.0,
                                   delta=delta, layout_hash="lay"))
                    if (i + 1) % batch == 0 or i + 1 == devices:
                        before = counted.bytes
                        store.save({"machine": m.state_dict(), "history": []})
                        per_commit.append(counted.bytes - before)
                m.close(now=float(r))
                store.save({"machine": m.state_dict(), "history": []})  # the new model
                per_round.append(time.perf_counter() - started)
            store.close()
    finally:
        os.pwrite = counted._pwrite
    return {"commit_kb_mean": statistics.mean(per_commit) / 1e3,
            "commit_kb_max": max(per_commit) / 1e3,
            "round_s_median": statistics.median(per_round),
            "round_s_range": (min(per_round), max(per_round))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--params", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1, help="updates per commit")
    parser.add_argument("--rule", default="median")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    for _ in range(args.repeat):
        result = run(devices=args.devices, params=args.params, rounds=args.rounds,
                     batch=args.batch, rule=args.rule)
        low, high = result["round_s_range"]
        print(f"{args.rule}, {args.devices} devices, {args.params} params, commit every "
              f"{args.batch}: journal {result['commit_kb_mean']:.1f} KB/commit mean, "
              f"{result['commit_kb_max']:.1f} KB max; {result['round_s_median']:.3f} s/round "
              f"median ({low:.3f}-{high:.3f})", flush=True)


if __name__ == "__main__":
    main()
