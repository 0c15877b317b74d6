"""`fedmq`: the command line of both services and the fleet simulator.

Subcommands import what they need lazily so `fedmq agent` on a device never loads the
aggregator, matplotlib or rich.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading
from collections.abc import Callable

from .config import AgentConfig, add_flags, load_config
from .errors import FedmqError


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _wait_for_signal(done: threading.Event | None = None) -> None:
    """Block until SIGTERM/SIGINT (or `done`), so services shut down cleanly."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.is_set() and not (done is not None and done.is_set()):
        stop.wait(0.5)


def _overrides(args: argparse.Namespace, cls: type) -> dict:
    return {f.name: getattr(args, f.name, None) for f in dataclasses.fields(cls)}


def cmd_agent(args: argparse.Namespace) -> int:
    from .agent import EdgeAgent
    from .data import device_shard

    config = load_config(AgentConfig, args.config, _overrides(args, AgentConfig))
    _setup_logging(config.log_level)
    if config.data_source:  # the device's own data, checked before we connect
        from .datasource import load_source

        data = load_source(config.data_source, config.task, label=config.data_label,
                           max_samples=config.data_max_samples)
    else:
        data = device_shard(config.task, device_index=config.device_index,
                            device_count=config.device_count, alpha=config.alpha,
                            seed=config.partition_seed)
    agent = EdgeAgent(config, data)
    log = logging.getLogger("fedmq")
    log.info("agent %s starts with %d local examples", config.device_id, len(data))
    if not config.state_dir:
        log.warning("state_dir is not set: updates awaiting their receipt and the error-"
                    "feedback residual live in memory and are lost if this agent restarts; "
                    "set state_dir (e.g. /var/lib/fedmq) to keep them")
    agent.start()
    try:
        _wait_for_signal()
    finally:
        agent.stop()
    return 0


def cmd_aggregator(args: argparse.Namespace) -> int:
    from aggregator.config import AggregatorConfig
    from aggregator.service import AggregatorService

    config = load_config(AggregatorConfig, args.config, _overrides(args, AggregatorConfig))
    _setup_logging(config.log_level)
    service = AggregatorService(config)
    service.start()
    try:
        _wait_for_signal(service.finished)
    finally:
        service.stop()
    return 1 if service.failure is not None else 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from aggregator.sim_cli import run

    return run(args)


def cmd_codecs(_args: argparse.Namespace) -> int:
    from .codecs import PRESETS

    print(f"{'name':13s} {'pipeline':24s} description")
    for preset in PRESETS.values():
        print(f"{preset.name:13s} {preset.spec!s:24s} {preset.description}")
    print("\nAny pipeline also works by its stages, e.g. --codec top0.03+q4b128+zstd+ef "
          "(top-k fraction, f32|f16|q8|q4|q2|sign with block size, zstd|zlib|auto, ef).")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    from aggregator.config import AggregatorConfig
    from aggregator.simulator import SimulationConfig

    parser = argparse.ArgumentParser(prog="fedmq", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable, help: str, config_cls: type | None,
            with_file: bool) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        if with_file:
            p.add_argument("--config", metavar="TOML", help="configuration file")
        if config_cls is not None:
            add_flags(p, config_cls)
        p.set_defaults(func=func)
        return p

    add("agent", cmd_agent, "run an edge agent (long-running service)", AgentConfig, True)
    add("aggregator", cmd_aggregator, "run the aggregator (long-running service)",
        AggregatorConfig, True)
    sim = add("simulate", cmd_simulate, "simulate a fleet training over a local broker",
              SimulationConfig, False)
    sim.add_argument("--quiet", action="store_true", help="no progress bar or table")
    sim.add_argument("--verbose", action="store_true", help="log every service event")
    add("codecs", cmd_codecs, "list the update codecs", None, False)
    from .predict import add_arguments as predict_arguments  # numpy only; onnxruntime on use

    predict_arguments(add("predict", cmd_predict, "run an exported ONNX model on local data "
                          "(onnxruntime only)", None, False))
    from aggregator import certs, enroll  # cryptography is imported only when used

    certs.register(sub)
    enroll.register(sub)
    from . import signing  # model signing keys; cryptography only when used

    signing.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FedmqError as exc:
        print(f"fedmq: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
