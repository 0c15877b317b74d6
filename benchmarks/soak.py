"""Soak: a 200-device fleet with hostile senders, flapping links and broker and
aggregator SIGKILLs at random times, for --minutes (issue #17; a benchmark, not CI).

What runs: a persistent mosquitto; the aggregator in its own process (the safe
defaults on, nothing else configured); 200 EdgeAgents (synthetic task, logreg), a fifth
of them behind fault proxies that flap their link; three strangers without a birth
(simulator/hostile.py): one sends a zero update claiming 2^62 samples each round, one
an update of 1e30 values, one garbage. Every 20-60 s the broker or the aggregator is
SIGKILLed and restarted 0.5-3 s later.

Then it settles: flapping and kills stop, the strangers only re-send what has no
receipt, and the aggregator is restarted to finish two more rounds and hold the final
model (nobody is asked to train it), until every update is settled or SETTLE_S passed.

Reported: rounds completed (and refused by the model guard), the final accuracy against
an undisturbed run of as many rounds (same fleet, no strangers, no faults), and every
update accounted for: on each device and stranger, trained = receipted + refused +
pending; and the aggregator counted receipted <= counted <= receipted + pending, equal
when nothing is pending (above it: counted twice, or counted and then answered
"rejected" to a re-send).

    python benchmarks/soak.py --minutes 30 [--devices 200 --seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from aggregator.checkpoint import CheckpointStore
from aggregator.config import AggregatorConfig
from edge_agent.agent import EdgeAgent
from edge_agent.config import AgentConfig
from fedmq.core.protocol import AggregatorStatus, FleetTopics
from fedmq.models import build_model
from fedmq.tasks import device_shards, task_spec
from fedmq.transport.message import Message
from fedmq.transport.mqtt import MqttLink
from simulator.broker import LocalMosquitto
from simulator.faultproxy import ProxyPool
from simulator.hostile import HostileSender, forged_updates, garbage

TASK = "synthetic-0.5-0.5"
FLEET = "soak"
FLAKY_SHARE = 0.2  # devices behind a flapping link
FLAP_UP_S, FLAP_DOWN_S = (6.0, 15.0), (1.0, 4.0)
KILL_EVERY_S = (20.0, 60.0)  # gap between two SIGKILLs
DOWN_S = (0.5, 3.0)  # how long the killed process stays down
SETTLE_S = 240.0
QUORUM = 0.8  # of the devices: the updates that close a round
DEADLINE_S = 20.0
RECENT = 10  # rounds whose mean accuracy is reported beside the last one's


@dataclass
class Outcome:
    rounds: int = 0  # model version reached
    refused_rounds: int = 0
    accuracy: float | None = None
    recent_accuracy: float | None = None  # mean of the last RECENT rounds
    counted: int = 0  # updates the aggregator's checkpoint counts
    refusals_logged: int = 0  # ERROR lines of refused rounds, every aggregator process
    trained: int = 0  # updates made, devices and strangers
    receipted: int = 0
    refused: int = 0  # settled by a rejected or duplicate receipt
    pending: int = 0
    kills: Counter = field(default_factory=Counter)
    strangers: dict[str, dict] = field(default_factory=dict)
    settled_s: float | None = None  # None: SETTLE_S passed with updates pending
    wall_s: float = 0.0


class AggregatorProcess:
    """The aggregator in a child process of this script, so it can be SIGKILLed."""

    def __init__(self, workdir: Path, broker: str, *, devices: int, seed: int) -> None:
        self.checkpoint = workdir / "aggregator.ckpt"
        self.log = workdir / "aggregator.log"
        spec = task_spec(TASK)  # local training as the task's own defaults say
        self.settings = dict(broker=broker, fleet=FLEET, task=TASK, seed=seed,
                             checkpoint=str(self.checkpoint), log_level="WARNING",
                             min_updates=max(2, int(QUORUM * devices)),
                             deadline_s=DEADLINE_S, epochs=spec.epochs, lr=spec.lr,
                             batch_size=spec.batch_size)
        self.devices = devices
        self.proc: subprocess.Popen | None = None

    def start(self, **overrides) -> None:
        spec = json.dumps({**self.settings, **overrides, "devices": self.devices})
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen([sys.executable, __file__, "--aggregator-child", spec],
                                         stdout=log, stderr=log)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()

    def refusals_logged(self) -> int:
        return sum("refused:" in line for line in self.log.read_text().splitlines())


def aggregator_child(spec: str) -> int:
    """Run one aggregator until SIGTERM, also after its last round: updates trained
    before it still get their receipts."""
    from aggregator.service import AggregatorService
    from fedmq.runtime import setup_logging, wait_for_signal
    from fedmq.tasks import fleet_test_set

    settings = json.loads(spec)
    devices = settings.pop("devices")
    config = AggregatorConfig(**settings)
    setup_logging(config.log_level)
    test = fleet_test_set(config.task, device_count=devices, seed=config.seed)
    service = AggregatorService(config, test_data=test)
    service.start()
    try:
        wait_for_signal()
    finally:
        service.stop()
    return 1 if service.failure is not None else 0


class StatusWatch:
    """The aggregator's retained status: the round open and the model version."""

    def __init__(self, broker: str) -> None:
        self.status = AggregatorStatus(online=False)
        self.link = MqttLink(client_id="soak-watch", broker=broker)
        self.link.route(FleetTopics(FLEET).aggregator_status, self._on_status, qos=1)
        self.link.start()

    def _on_status(self, message: Message) -> None:
        if message.payload:
            self.status = AggregatorStatus.from_payload(message.payload)


def strangers(broker: str, seed: int) -> list[HostileSender]:
    model = build_model("logreg", AggregatorConfig(task=TASK).model_config())
    layout, size = model.layout.hash, model.layout.size
    return [HostileSender(broker=broker, fleet=FLEET, device_id=name, make=make).start()
            for name, make in (
                ("stranger-2pow62", forged_updates("stranger-2pow62", layout_hash=layout,
                                                   size=size, value=0.0, samples=2**62)),
                ("stranger-1e30", forged_updates("stranger-1e30", layout_hash=layout,
                                                 size=size, value=1e30, samples=1)),
                ("stranger-garbage", garbage(seed)))]


def fleet(broker: str, devices: int, seed: int, pool: ProxyPool | None,
          rng: random.Random) -> list[EdgeAgent]:
    shards = device_shards(TASK, device_count=devices, alpha=0.5, seed=seed)
    flaky = set(rng.sample(range(devices), int(FLAKY_SHARE * devices))) if pool else set()
    agents = []
    for i, shard in enumerate(shards):
        device_id = f"{FLEET}-dev{i:03d}"
        url = broker
        if i in flaky:
            url = pool.url(device_id)
            pool.proxy(device_id).flap(up_s=rng.uniform(*FLAP_UP_S),
                                       down_s=rng.uniform(*FLAP_DOWN_S))
        agents.append(EdgeAgent(AgentConfig(
            broker=url, fleet=FLEET, device_id=device_id, task=TASK, device_index=i,
            device_count=devices, partition_seed=seed, seed=seed * 1_000_003 + i,
            log_level="ERROR", train_threads=1), shard))
    for agent in agents:
        agent.start()
    return agents


def run(workdir: Path, *, devices: int, seed: int, minutes: float = 0.0,
        rounds: int = 0) -> Outcome:
    """Disturbed for `minutes` (then settled), or undisturbed until `rounds` rounds."""
    disturbed = minutes > 0
    rng = random.Random(seed)
    outcome = Outcome()
    started = time.monotonic()
    broker = LocalMosquitto(persistence=True, workdir=workdir / "broker")
    broker.workdir.mkdir(parents=True)
    broker.start()
    aggregator = AggregatorProcess(workdir, broker.url, devices=devices, seed=seed)
    pool = ProxyPool.for_broker(broker.url) if disturbed else None
    watch = StatusWatch(broker.url)
    hostile: list[HostileSender] = []
    agents: list[EdgeAgent] = []
    try:
        if disturbed:  # before the devices: they meet the bounds still warming up
            hostile = strangers(broker.url, seed)
        aggregator.start(**({} if disturbed else {"rounds": rounds}))
        agents = fleet(broker.url, devices, seed, pool, rng)
        if disturbed:
            chaos(broker, aggregator, watch, outcome, minutes, rng)
            outcome.settled_s = settle(aggregator, watch, agents, hostile, pool)
        else:
            wait(lambda: watch.status.version >= rounds, 3600, f"{rounds} undisturbed rounds")
        aggregator.stop()
        account(outcome, aggregator, agents, hostile)
    finally:
        for agent in agents:
            with contextlib.suppress(Exception):
                agent.stop()
        for sender in hostile:
            sender.stop()
        watch.link.stop()
        aggregator.kill()
        if pool is not None:
            pool.stop()
        broker.close()
    outcome.wall_s = time.monotonic() - started
    return outcome


def wait(condition, timeout: float, what: str) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            print(f"  (gave up waiting for {what} after {timeout:.0f} s)", file=sys.stderr)
            return False
        time.sleep(0.5)
    return True


def chaos(broker: LocalMosquitto, aggregator: AggregatorProcess, watch: StatusWatch,
          outcome: Outcome, minutes: float, rng: random.Random) -> None:
    start = time.monotonic()
    end = start + minutes * 60
    next_kill = start + rng.uniform(*KILL_EVERY_S)
    next_report = start + 30
    while (now := time.monotonic()) < end:
        if now >= next_kill:
            victim = rng.choice(("broker", "aggregator"))
            outcome.kills[victim] += 1
            print(f"  {time.strftime('%H:%M:%S')} SIGKILL {victim}", file=sys.stderr)
            if victim == "broker":
                broker.stop(kill=True)
                time.sleep(rng.uniform(*DOWN_S))
                broker.start()
            else:
                aggregator.kill()
                time.sleep(rng.uniform(*DOWN_S))
                aggregator.start()
            next_kill = time.monotonic() + rng.uniform(*KILL_EVERY_S)
        if now >= next_report:
            s = watch.status
            print(f"  {now - start:5.0f} s: model v{s.version}, round {s.round}, kills "
                  f"{dict(outcome.kills)}", file=sys.stderr)
            next_report += 30
        time.sleep(0.2)


def settle(aggregator: AggregatorProcess, watch: StatusWatch, agents: list[EdgeAgent],
           hostile: list[HostileSender], pool: ProxyPool | None) -> float | None:
    """Faults off; the aggregator finishes two more rounds and keeps answering; seconds
    until nothing is pending (None: SETTLE_S passed)."""
    start = time.monotonic()
    if pool is not None:
        for proxy in pool.proxies.values():
            proxy.restore()
    for sender in hostile:
        sender.quiet = True
    wait(lambda: watch.status.online, 60, "the aggregator's status")
    final = watch.status.version + 2
    aggregator.stop()
    aggregator.start(rounds=final)

    def settled() -> bool:
        return (watch.status.version >= final and not any(len(a.outbox) for a in agents)
                and not any(s.pending for s in hostile))
    return time.monotonic() - start if wait(settled, SETTLE_S, "every update settled") \
        else None


def account(outcome: Outcome, aggregator: AggregatorProcess, agents: list[EdgeAgent],
            hostile: list[HostileSender]) -> None:
    state = CheckpointStore(aggregator.checkpoint).load()
    machine = state["machine"]
    outcome.rounds = int(machine["version"])
    outcome.refusals_logged = aggregator.refusals_logged()
    outcome.refused_rounds = int(machine.get("refused", 0))
    history = state.get("history", [])
    outcome.accuracy = history[-1]["accuracy"] if history else None
    recent = [r["accuracy"] for r in history[-RECENT:] if r["accuracy"] is not None]
    outcome.recent_accuracy = sum(recent) / len(recent) if recent else None
    outcome.counted = (sum(r["participants"] for r in history)
                       + int(machine.get("refused_updates", 0))
                       + len(machine["open"]["contributions"]))
    for agent in agents:
        receipts = agent.stats.receipts
        outcome.trained += agent.stats.updates_sent
        outcome.receipted += receipts["accepted"]
        outcome.refused += sum(receipts.values()) - receipts["accepted"]
        outcome.pending += len(agent.outbox)
    for sender in hostile:
        updates = sender.sent if sender.device_id != "stranger-garbage" else 0
        outcome.trained += updates
        outcome.receipted += sender.receipts["accepted"]
        outcome.refused += sum(sender.receipts.values()) - sender.receipts["accepted"]
        outcome.pending += sender.pending
        outcome.strangers[sender.device_id] = {"sent": sender.sent,
                                               "receipts": dict(sender.receipts),
                                               "pending": sender.pending}


def report(disturbed: Outcome, calm: Outcome, minutes: float) -> None:
    d = disturbed
    settled = (f"{d.settled_s:.0f} s" if d.settled_s is not None
               else f"not within {SETTLE_S:.0f} s")
    print(f"soak: {minutes:g} min of chaos ({d.wall_s:.0f} s in all), kills "
          f"{dict(d.kills)}; settled in {settled}")
    print(f"rounds completed: {d.rounds} (refused by the model guard: {d.refused_rounds}, "
          f"{d.refusals_logged} ERROR lines)")
    def accuracy(o: Outcome) -> str:
        if o.accuracy is None or o.recent_accuracy is None:
            return "-"
        return f"{o.accuracy:.4f} (last {RECENT} rounds' mean {o.recent_accuracy:.4f})"
    print(f"accuracy after {d.rounds} rounds: {accuracy(d)}; undisturbed run of {calm.rounds} "
          f"rounds: {accuracy(calm)} ({calm.wall_s:.0f} s)")
    balanced = d.trained == d.receipted + d.refused + d.pending
    print(f"updates: trained {d.trained} = receipted {d.receipted} + refused {d.refused} + "
          f"pending {d.pending}: {'holds' if balanced else 'BROKEN'}")
    over = d.counted - d.receipted - d.pending
    lost = d.receipted - d.counted
    # Counted without an accepted receipt: counted twice, or counted and then refused
    # (a re-send whose first receipt was lost, answered after the aggregator forgot it:
    # it remembers counted update ids REMEMBER_ROUNDS rounds, aggregator/rounds.py).
    print(f"aggregator counted {d.counted}: receipted <= counted <= receipted + pending "
          f"{'holds' if over <= 0 and lost <= 0 else 'BROKEN'}; counted without an "
          f"accepted receipt: {max(over, 0)}"
          f"{' (exact: nothing pending)' if d.pending == 0 else ''}; "
          f"receipted but not counted: {max(lost, 0)}")
    for name, figures in d.strangers.items():
        print(f"  {name}: {figures}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="minutes of chaos")
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="", help="keep the runs' files (the "
                        "aggregator's log, checkpoint) here instead of a temporary directory")
    args = parser.parse_args()
    logging.basicConfig(level=logging.CRITICAL)  # the devices' warnings are the point
    with contextlib.ExitStack() as stack:
        tmp = args.workdir or stack.enter_context(
            tempfile.TemporaryDirectory(prefix="fedmq-soak-"))
        print(f"disturbed run: {args.devices} devices, {args.minutes:g} min", file=sys.stderr)
        disturbed = run(Path(tmp) / "disturbed", devices=args.devices, seed=args.seed,
                        minutes=args.minutes)
        print(f"undisturbed run: {disturbed.rounds} rounds", file=sys.stderr)
        calm = run(Path(tmp) / "calm", devices=args.devices, seed=args.seed,
                   rounds=max(1, disturbed.rounds))
    report(disturbed, calm, args.minutes)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--aggregator-child":
        sys.exit(aggregator_child(sys.argv[2]))
    sys.exit(main())
