"""What every long-running `fedmq` command does the same way: logging, flags over TOML,
and waiting for a signal to shut down cleanly."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import signal
import sys
import threading
from typing import Any, TypeVar

from fedmq.config import LOG_FORMATS, add_flags, load_config
from fedmq.errors import ConfigError

C = TypeVar("C")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# What every LogRecord has; anything else on a record came in `extra=` and is kept.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the fields
    given as `extra=`, and the traceback as one string when there is one.

    Written here, not taken from python-json-logger: the agent's base install stays at
    paho, numpy and msgpack, and this is all of it."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str)


def log_formatter(fmt: str) -> logging.Formatter:
    """The formatter of --log-format `fmt`."""
    if fmt not in LOG_FORMATS:
        raise ConfigError(f"log_format {fmt!r} must be one of {', '.join(LOG_FORMATS)}")
    return JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)


class _Stderr(logging.StreamHandler):
    """To whatever sys.stderr is when a message is logged, not when logging was set up: a
    live progress display (`fedmq simulate`) swaps it to print messages above its bars."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(level: str, fmt: str = "text") -> None:
    """Messages of `level` and above to stderr, as text or JSON lines."""
    handler = _Stderr()
    handler.setFormatter(log_formatter(fmt))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def logging_is_set_up() -> bool:
    """Whether setup_logging put its handler in place (then errors go to the log)."""
    return any(isinstance(h, _Stderr) for h in logging.getLogger().handlers)


def stop_on_signals() -> threading.Event:
    """An event SIGTERM/SIGINT set from now on. Installed before a service starts: a
    signal in between would otherwise kill it without its clean shutdown."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def wait_for_signal(done: threading.Event | None = None, *,
                    stop: threading.Event | None = None) -> None:
    """Block until SIGTERM/SIGINT (`stop`, from stop_on_signals) or `done`, so services
    shut down cleanly."""
    stop = stop if stop is not None else stop_on_signals()
    while not stop.is_set() and not (done is not None and done.is_set()):
        stop.wait(0.5)


def serve(service: Any, *, done: threading.Event | None = None) -> int:
    """Start `service`, run it until SIGTERM/SIGINT or `done`, stop it cleanly: the exit
    status, 1 if it recorded a `failure`. Signals are caught before it starts."""
    stop = stop_on_signals()
    service.start()
    try:
        wait_for_signal(done, stop=stop)
    finally:
        service.stop()
    return 1 if getattr(service, "failure", None) is not None else 0


def add_config_flags(parser: argparse.ArgumentParser, cls: type, *, with_file: bool) -> None:
    """`--config TOML` (services) and one flag per key of `cls`."""
    if with_file:
        parser.add_argument("--config", metavar="TOML", help="configuration file")
    add_flags(parser, cls)


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """The TOML file named by --config (if any), then every flag given, checked."""
    overrides = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(cls)}
    return load_config(cls, getattr(args, "config", None), overrides)
