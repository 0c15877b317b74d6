"""Uplink into the central aggregator, flat vs hierarchical: 100 devices over 4 sites.

Flat: every device connects to the central broker and its update travels to the central
aggregator. Hierarchical: each site has its own mosquitto bridged to the central one
(simulator.broker.site_bridge) and a site aggregator (`fedmq aggregator --role site`) that
folds its 25 devices' updates into one partial aggregate per round; only that partial
(and the devices' small statuses) crosses the bridge. Both run the same digits fleet in
the same process, side by side, and print the update bytes the central aggregator took in
per round, the messages that carried them, and the accuracy reached.

    python benchmarks/sites.py [--devices 100 --sites 4 --rounds 5 --repeats 2 --codec q8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from aggregator.config import AggregatorConfig
from aggregator.partial_service import PartialService
from aggregator.service import AggregatorService
from edge_agent.agent import EdgeAgent
from edge_agent.config import AgentConfig
from fedmq.tasks import device_shards
from simulator.broker import LocalMosquitto, site_bridge

TASK = dict(task="digits", model="logreg")


def wait(condition, what: str, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def start_agents(urls: list[str], fleet: str, devices: int, codec: str,
                 workdir: Path) -> list[EdgeAgent]:
    """Device i connects to urls[i * len(urls) // devices]: contiguous blocks per site."""
    shards = device_shards("digits", device_count=devices, alpha=0.5, seed=0)
    agents = []
    for i in range(devices):
        url = urls[i * len(urls) // devices]
        agent = EdgeAgent(AgentConfig(broker=url, fleet=fleet, device_id=f"dev{i:03d}",
                                      device_index=i, device_count=devices, codec=codec,
                                      state_dir=str(workdir / f"dev{i:03d}"),
                                      log_level="ERROR"), shards[i])
        agent.start()
        agents.append(agent)
    return agents


def run(*, hierarchical: bool, devices: int, sites: int, rounds: int, codec: str,
        workdir: Path) -> tuple[list[int], int, float]:
    """(update bytes into the central aggregator per round, messages, final accuracy)."""
    fleet = "hier" if hierarchical else "flat"
    names = [f"site-{i}" for i in range(sites)]
    stops = []
    central = LocalMosquitto(workdir=workdir / "central")
    central.workdir.mkdir()
    central.start()
    stops.append(central.close)
    try:
        urls = [central.url]
        if hierarchical:
            urls = []
            for name in names:
                broker = LocalMosquitto(workdir=workdir / name, extra_config=site_bridge(
                    central_port=central.port, site=name, fleet=fleet))
                broker.workdir.mkdir()
                broker.start()
                stops.append(broker.close)
                urls.append(broker.url)
                site = PartialService(AggregatorConfig(
                    broker=broker.url, fleet=fleet, role="site", source_name=name,
                    client_id=f"{name}-aggregator", checkpoint=str(workdir / f"{name}.state"),
                    log_level="ERROR", **TASK))
                site.start()
                stops.append(site.stop)
        service = AggregatorService(AggregatorConfig(
            broker=central.url, fleet=fleet, min_updates=devices, rounds=rounds,
            deadline_s=120, partial_sources=",".join(names) if hierarchical else "",
            checkpoint=str(workdir / "central.ckpt"), log_level="ERROR", **TASK))
        service.start()
        stops.append(service.stop)
        agents = start_agents(urls, fleet, devices, codec, workdir)
        stops.extend(agent.stop for agent in agents)
        wait(service.finished.is_set, f"{rounds} rounds")
        messages = service.accepted + service.redelivered
        return ([r.bytes_up for r in service.history], messages,
                service.history[-1].accuracy)
    finally:
        for stop in reversed(stops):
            stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--codec", default="q8", help="the devices' update codec")
    args = parser.parse_args()
    print(f"{args.devices} devices, digits/logreg, devices' codec {args.codec}, "
          f"{args.rounds} rounds; hierarchical: {args.sites} sites, each a bridged mosquitto "
          "+ a site aggregator")
    results: dict[bool, list[tuple[list[int], int, float]]] = {False: [], True: []}
    for _ in range(args.repeats):
        for hierarchical in (False, True):  # interleaved: the same machine noise for both
            with tempfile.TemporaryDirectory(prefix="fedmq-sites-") as tmp:
                results[hierarchical].append(run(
                    hierarchical=hierarchical, devices=args.devices, sites=args.sites,
                    rounds=args.rounds, codec=args.codec, workdir=Path(tmp)))
    print(f"{'layout':14s} {'bytes/round into central':>25s} {'messages/round':>15s} "
          f"{'accuracy':>9s}")
    per_round = {}
    for hierarchical, runs in results.items():
        rounds = [b for bytes_up, _, _ in runs for b in bytes_up]
        messages = [m / args.rounds for _, m, _ in runs]
        accuracy = [a for _, _, a in runs]
        per_round[hierarchical] = statistics.median(rounds)
        layout = "hierarchical" if hierarchical else "flat"
        span = f"{min(rounds):,d}-{max(rounds):,d} B"
        print(f"{layout:14s} {span:>25s} {min(messages):>7.0f}-{max(messages):<7.0f} "
              f"{min(accuracy):.3f}-{max(accuracy):.3f}")
    print(f"summary: the central aggregator takes in {per_round[True] / per_round[False]:.1%} "
          "of the flat layout's update bytes per round (medians)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
