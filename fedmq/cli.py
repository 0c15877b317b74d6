"""`fedmq`: the command line of both services, the fleet simulator and operator tools.

Each subcommand lives with its side and is imported by name only when it is the one
asked for, so `fedmq agent` on a device never loads the aggregator, the simulator,
matplotlib or rich (tests/test_layers.py checks it; import-linter checks that this
package imports no side at all).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from dataclasses import dataclass

from fedmq import __version__
from fedmq.errors import FedmqError


@dataclass(frozen=True, slots=True)
class Command:
    """A subcommand: its module provides `configure(parser)`, which adds the arguments and
    sets `func(args) -> exit code`."""

    name: str
    module: str
    help: str


COMMANDS: tuple[Command, ...] = (
    Command("agent", "edge_agent.cli", "run an edge agent (long-running service)"),
    Command("aggregator", "aggregator.cli", "run the aggregator (long-running service)"),
    Command("keyholder", "aggregator.keyholder",
            "run the HE key holder: decrypts each round's encrypted sum (he = ckks)"),
    Command("simulate", "simulator.cli", "simulate a fleet training over a local broker"),
    Command("new", "fedmq.scaffold",
            "write a runnable project template for your own task (offline)"),
    Command("codecs", "fedmq.cli", "list the update codecs"),
    Command("predict", "edge_agent.predict",
            "run an exported ONNX model on local data (onnxruntime only)"),
    Command("certs", "fedmq.ops.certs", "a small CA: broker and device TLS certificates"),
    Command("enroll", "fedmq.ops.enroll",
            "create a device's broker account and print its config"),
    Command("keys", "fedmq.ops.keys", "model signing keys (Ed25519)"),
    Command("status", "fedmq.ops.status",
            "the fleet's devices and aggregator from their retained statuses (--watch)"),
)


def configure(parser: argparse.ArgumentParser) -> None:
    """`fedmq codecs`."""
    parser.set_defaults(func=_cmd_codecs)


def _cmd_codecs(_args: argparse.Namespace) -> int:
    from fedmq.core.codecs import PRESETS

    print(f"{'name':13s} {'pipeline':24s} description")
    for preset in PRESETS.values():
        print(f"{preset.name:13s} {preset.spec!s:24s} {preset.description}")
    print("\nAny pipeline also works by its stages, e.g. --codec top0.03+q4b128+zstd+ef "
          "(top-k fraction, f32|f16|q8|q4|q2|sign with block size, zstd|zlib|auto, ef).")
    return 0


def _chosen(argv: list[str]) -> str | None:
    names = {c.name for c in COMMANDS}
    for token in argv:
        if not token.startswith("-"):
            return token if token in names else None
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser, with the arguments of the subcommand named in `argv` (all of them when
    `argv` is None: documentation and tests)."""
    parser = argparse.ArgumentParser(prog="fedmq", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"fedmq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = _chosen(argv) if argv is not None else None
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        if argv is None or command.name == chosen:
            importlib.import_module(command.module).configure(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser(argv).parse_args(argv)
        return args.func(args)
    except FedmqError as exc:
        _say_error(exc)
        return 2
    except KeyboardInterrupt:
        return 130


def _say_error(exc: FedmqError) -> None:
    """One line: in the log's own format once a service set logging up (its log is where
    an operator looks, and --log-format json stays parseable), else argparse's style."""
    from fedmq.runtime import logging_is_set_up

    if logging_is_set_up():
        logging.getLogger("fedmq").error("%s", exc)
    else:
        print(f"fedmq: error: {exc}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
