"""Service configuration: flat frozen dataclasses loaded from TOML, every key also a flag.

One mechanism serves both services: `add_flags` derives `--some-key` flags from the
dataclass fields and `load_config` merges file values and flags, checking types.
"""

from __future__ import annotations

import argparse
import dataclasses
import socket
import sys
import typing
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError
from .protocol.topics import check_name
from .tls import TlsFiles

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

C = TypeVar("C")


def option(default: Any, help: str) -> Any:
    """A config field with its help text (shown by --help and in the example configs)."""
    return dataclasses.field(default=default, metadata={"help": help})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per config field; defaults stay None so only explicit flags override."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} (also settable in the TOML file)")
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        help_text = f"{f.metadata.get('help', '')} (default: {f.default!r})"
        if kind is bool:
            group.add_argument(_flag(f.name), dest=f.name, default=None,
                               action=argparse.BooleanOptionalAction, help=help_text)
        else:
            group.add_argument(_flag(f.name), dest=f.name, default=None, type=kind,
                               metavar=f.name.upper(), help=help_text)


def _coerce(value: Any, kind: type, key: str, source: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ConfigError(
        f"{source}: {key} = {value!r} should be {kind.__name__}, not {type(value).__name__}"
    )


def load_config(cls: type[C], path: str | Path | None = None,
                overrides: dict[str, Any] | None = None) -> C:
    """File values, then explicit overrides (flags); unknown keys are an error, not ignored."""
    values: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    if path:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        for key, value in data.items():
            if key not in fields:
                raise ConfigError(
                    f"{path}: unknown key {key!r}; valid keys: {', '.join(sorted(fields))}"
                )
            values[key] = _coerce(value, hints[key], key, str(path))
    for key, value in (overrides or {}).items():
        if value is not None and key in fields:
            values[key] = _coerce(value, hints[key], key, "flag")
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"incomplete configuration: {exc}") from None


def default_device_id() -> str:
    """The host name, trimmed to what a topic level allows."""
    name = "".join(c if c.isalnum() or c in "_.-" else "-" for c in socket.gethostname())
    return (name or "device")[:64]


@dataclasses.dataclass(frozen=True, kw_only=True)
class BrokerConfig:
    """Where the broker is and how to log in; shared by agent and aggregator configs."""

    broker: str = option("mqtt://127.0.0.1:1883", "broker URL, mqtt://host:port "
                         "(mqtts://host:8883: TLS)")
    username: str = option("", "MQTT user name (empty: anonymous)")
    password: str = option("", "MQTT password")
    ca_file: str = option("", "PEM CA certificate that signed the broker's certificate "
                          "(mqtts:// only; empty: the system's trusted CAs)")
    cert_file: str = option("", "PEM client certificate, for brokers that require one "
                            "(mqtts:// only; empty: none)")
    key_file: str = option("", "PEM private key of cert_file (empty: none)")
    fleet: str = option("default", "fleet name; topics live under fedmq/{fleet}/")
    log_level: str = option("INFO", "DEBUG, INFO, WARNING or ERROR")

    def __post_init__(self) -> None:
        check_name(self.fleet, "fleet name")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"log_level {self.log_level!r} must be DEBUG, INFO, WARNING or ERROR")
        self.tls()  # a key without a certificate is an error now, not at connect time

    def tls(self) -> TlsFiles:
        """What MqttLink needs for TLS; files are checked when the link is created."""
        return TlsFiles(ca_file=self.ca_file, cert_file=self.cert_file, key_file=self.key_file)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AgentConfig(BrokerConfig):
    device_id: str = option("", "this device's id and MQTT client id (default: host name)")
    task: str = option("digits", "bundled task whose data this device trains on")
    device_index: int = option(0, "this device's share of the bundled data: index ...")
    device_count: int = option(1, "... out of this many shares")
    partition_seed: int = option(0, "seed of the train/test split and the partition")
    alpha: float = option(0.5, "Dirichlet label skew of the partition (0 = IID)")
    data_source: str = option("", "this device's own data instead of the bundled shard: "
                              "csv:PATH, npz:PATH, text:PATH or python:package.module:function "
                              "(read at start, and before every round with data_reload)")
    data_label: str = option("", "csv data: name of the label column (empty: the last column)")
    data_max_samples: int = option(10_000, "text and python data: most examples to keep")
    data_reload: bool = option(False, "re-read data_source before every round (a file a logger "
                               "appends to, a live python: sensor); a bad read is logged and "
                               "the previous data trained on")
    codec: str = option("float32", "codec for this device's updates (see `fedmq codecs`)")
    seed: int = option(-1, "seed of local shuffling and stochastic rounding "
                       "(-1: derived from device_id, so every device differs)")
    max_payload: int = option(128 * 1024, "largest MQTT payload in bytes; bigger updates are "
                              "sent in parts (lowered to the broker's limit automatically)")
    session_expiry_s: int = option(3600, "seconds the broker keeps this device's session "
                                   "(queued receipts) while it is offline; 0: clean sessions")
    resend_after_s: float = option(30.0, "re-send an update that got no receipt after this "
                                   "many seconds, doubling for each further re-send (and "
                                   "after every reconnect)")
    state_dir: str = option("", "directory for state that must survive a reboot "
                            "(error-feedback residual, outbox); empty: memory only")
    model_public_key: str = option("", "PEM Ed25519 public key of the aggregator's "
                                   "signing_key: refuse unsigned or tampered models (empty: "
                                   "accept unsigned ones)")
    link_kbps: float = option(0.0, "uplink speed this device advertises, kbit/s (0: unknown); "
                              "the aggregator may assign a smaller codec to slow links")
    on_battery: bool = option(False, "advertise that this device runs on battery (the "
                              "aggregator may give it less work)")
    cpus: int = option(0, "cores to advertise (0: all the machine has)")
    train_threads: int = option(0, "threads a torch model trains with (0: the advertised "
                                "cores); numpy models use one")
    slowdown: float = option(1.0, "simulation only: compute this many times slower than "
                             "the host (a Pi Zero next to a laptop), time budget included")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.device_id:
            object.__setattr__(self, "device_id", default_device_id())
        check_name(self.device_id, "device_id")
        if self.max_payload < 1024:
            raise ConfigError("max_payload must be at least 1024 bytes")
        if self.data_reload and not self.data_source.strip():
            raise ConfigError("data_reload needs a data_source to re-read (the bundled shard "
                              "never changes)")
