"""What every long-running `fedmq` command does the same way: logging, flags over TOML,
and waiting for a signal to shut down cleanly."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import threading
from typing import TypeVar

from fedmq.config import add_flags, load_config

C = TypeVar("C")


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def wait_for_signal(done: threading.Event | None = None) -> None:
    """Block until SIGTERM/SIGINT (or `done`), so services shut down cleanly."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.is_set() and not (done is not None and done.is_set()):
        stop.wait(0.5)


def add_config_flags(parser: argparse.ArgumentParser, cls: type, *, with_file: bool) -> None:
    """`--config TOML` (services) and one flag per key of `cls`."""
    if with_file:
        parser.add_argument("--config", metavar="TOML", help="configuration file")
    add_flags(parser, cls)


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """The TOML file named by --config (if any), then every flag given, checked."""
    overrides = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(cls)}
    return load_config(cls, getattr(args, "config", None), overrides)
