"""Service configuration: flat frozen dataclasses loaded from TOML, every key also a flag.

One mechanism serves every side (agent, aggregator, simulator): `add_flags` derives
`--some-key` flags from the dataclass fields and `load_config` merges file values and
flags, checking types.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import socket
import sys
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from fedmq.core.protocol.topics import check_name
from fedmq.errors import ConfigError
from fedmq.transport.mqtt import MQTT_VERSIONS, check_mqtt_version, parse_brokers
from fedmq.transport.tls import TlsFiles

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

C = TypeVar("C")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")


Choices = Iterable[str] | Callable[[], Iterable[str]]


def option(default: Any, help: str, *, choices: Choices | None = None,
           list_sep: str | None = None) -> Any:
    """A config field with its help text (shown by --help and in the example configs).

    `choices`: the values allowed, or a function returning them (a registry's names, read
    when --help is built, so every registered entry shows); --help lists them. The config
    class still checks the value, with its own message. `list_sep`: a str option the TOML
    file may also give as a list of strings, joined with this separator (a flag gives the
    joined form)."""
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    if list_sep is not None:
        metadata["list_sep"] = list_sep
    return dataclasses.field(default=default, metadata=metadata)


def choices_of(field: dataclasses.Field) -> list[str]:
    """The values `field` allows ([] when any value of its type goes)."""
    choices = field.metadata.get("choices")
    if choices is None:
        return []
    return list(choices() if callable(choices) else choices)


@dataclasses.dataclass(frozen=True)
class Default:
    """Another default for a borrowed option, with the help text that explains it."""

    value: Any
    help: str = ""  # empty: the original help


def borrow_options(source: type, *, keys: Iterable[str] | None = None,
                   exclude: Iterable[str] = (),
                   defaults: Mapping[str, Default] | None = None) -> list[tuple[str, Any, Any]]:
    """Fields of another config class, for `dataclasses.make_dataclass`: a config that
    composes another takes its options (all, or `keys`, less `exclude`) with their types
    and help as they are declared there, and only states the defaults it changes."""
    hints = typing.get_type_hints(source)
    fields = {f.name: f for f in dataclasses.fields(source)}
    skipped = set(exclude)
    chosen = [n for n in (fields if keys is None else keys) if n not in skipped]
    changed = dict(defaults or {})
    unknown = (set(chosen) | skipped | set(changed)) - set(fields)
    if unknown:
        raise ConfigError(f"{source.__name__} has no option {', '.join(sorted(unknown))}")
    if set(changed) - set(chosen):
        raise ConfigError(f"defaults given for options not borrowed from {source.__name__}: "
                          f"{', '.join(sorted(set(changed) - set(chosen)))}")
    out = []
    for name in chosen:
        f = fields[name]
        new = changed.get(name)
        default, help_text = (f.default, f.metadata.get("help", "")) if new is None else (
            new.value, new.help or f.metadata.get("help", ""))
        out.append((name, hints[name], option(default, help_text,
                                              choices=f.metadata.get("choices"),
                                              list_sep=f.metadata.get("list_sep"))))
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per config field; defaults stay None so only explicit flags override."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} (also settable in the TOML file)")
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        help_text = flag_help(f)
        if kind is bool:
            group.add_argument(_flag(f.name), dest=f.name, default=None,
                               action=argparse.BooleanOptionalAction, help=help_text)
        else:
            group.add_argument(_flag(f.name), dest=f.name, default=None, type=kind,
                               metavar=f.name.upper(), help=help_text)


def flag_help(field: dataclasses.Field) -> str:
    """A flag's help: its text, the values it allows, and its default unless the text
    already says what the default means ("(empty: ...)", "(0: ...)")."""
    text = field.metadata.get("help", "")
    notes = []
    allowed = choices_of(field)
    if allowed:
        notes.append(f"one of: {', '.join(allowed)}")
    if not _explains_default(text, field.default):
        notes.append(f"default: {field.default!r}")
    return f"{text} ({'; '.join(notes)})" if notes else text


def _explains_default(text: str, default: Any) -> bool:
    if isinstance(default, bool):
        return False
    if default == "":
        said = ["empty"]
    elif isinstance(default, (int, float)) and float(default).is_integer():
        said = [str(int(default)), str(default)]
    else:
        said = [str(default)]
    return any(re.search(rf"[(;] ?{re.escape(word)}:", text) for word in said)


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
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except OSError as exc:  # e.g. a root-only /etc/fedmq file read by another user
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not UTF-8 text") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(_duplicate_key(path, text, exc)
                              or f"config file {path} is not valid TOML: {exc}") from None
        for key, value in data.items():
            if key not in fields:
                raise ConfigError(
                    f"{path}: unknown key {key!r}; valid keys: {', '.join(sorted(fields))}"
                )
            sep = fields[key].metadata.get("list_sep")
            if sep is not None and isinstance(value, list) and all(
                    isinstance(v, str) for v in value):
                value = sep.join(value)
            values[key] = _coerce(value, hints[key], key, str(path))
    for key, value in (overrides or {}).items():
        if value is not None and key in fields:
            values[key] = _coerce(value, hints[key], key, "flag")
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"incomplete configuration: {exc}") from None


_KEY_LINE = re.compile(r"""\s*("[^"]*"|'[^']*'|[A-Za-z0-9_-]+)\s*=""")
_ERROR_LINE = re.compile(r"\(at line (\d+), column \d+\)")


def _duplicate_key(path: str | Path, text: str, exc: Exception) -> str | None:
    """tomllib says only "Cannot overwrite a value (at line N ...)": name the key, both
    lines, and the usual cause (a pasted `fedmq enroll` snippet repeating keys the example
    config already sets). None when the error is something else."""
    where = _ERROR_LINE.search(str(exc))
    if where is None or "overwrite" not in str(exc):
        return None
    lines = text.splitlines()
    number = int(where.group(1))
    found = _KEY_LINE.match(lines[number - 1]) if 0 < number <= len(lines) else None
    if found is None:
        return None
    key = found.group(1).strip("\"'")
    earlier = [i + 1 for i, line in enumerate(lines[:number - 1])
               if (m := _KEY_LINE.match(line)) and m.group(1).strip("\"'") == key]
    first = f"line {earlier[0]} and again on line {number}" if earlier else f"line {number}"
    return (f"config file {path} sets {key} twice ({first}); keep one of them. A pasted "
            "`fedmq enroll` snippet repeats keys the example config already has: delete "
            "the example's line, or let `fedmq enroll ... --config FILE` write the keys "
            "into the file in place")


def default_device_id() -> str:
    """The host name, trimmed to what a topic level allows."""
    name = "".join(c if c.isalnum() or c in "_.-" else "-" for c in socket.gethostname())
    return (name or "device")[:64]


@dataclasses.dataclass(frozen=True, kw_only=True)
class BrokerConfig:
    """Where the broker is and how to log in; shared by agent and aggregator configs."""

    broker: str = option("mqtt://127.0.0.1:1883", "broker URL, mqtt://host:port "
                         "(mqtts://host:8883: TLS); several, as a TOML list or separated by "
                         "commas, are tried in turn: a lost connection moves on to the next "
                         "(the nodes of a clustered broker)", list_sep=",")
    mqtt_version: str = option("auto", "MQTT version: 5, 3.1.1, or auto (5, and 3.1.1 once "
                               "a broker refuses 5, said at WARNING)", choices=MQTT_VERSIONS)
    username: str = option("", "MQTT user name (empty: anonymous)")
    password: str = option("", "MQTT password")
    ca_file: str = option("", "PEM CA certificate that signed the broker's certificate "
                          "(mqtts:// only; empty: the system's trusted CAs)")
    cert_file: str = option("", "PEM client certificate, for brokers that require one "
                            "(mqtts:// only; empty: none)")
    key_file: str = option("", "PEM private key of cert_file (empty: none)")
    fleet: str = option("default", "fleet name; topics live under fedmq/{fleet}/")
    log_level: str = option("INFO", "the least severe messages logged", choices=LOG_LEVELS)
    log_format: str = option("text", "text: a line per message, for people; json: a JSON "
                             "object per line (time, level, logger, message and the "
                             "message's extra fields), for log collectors", choices=LOG_FORMATS)

    def __post_init__(self) -> None:
        check_name(self.fleet, "fleet name")
        parse_brokers(self.broker)  # a bad URL fails now, naming itself
        check_mqtt_version(self.mqtt_version)
        if self.log_level.upper() not in LOG_LEVELS:
            raise ConfigError(f"log_level {self.log_level!r} must be one of "
                              f"{', '.join(LOG_LEVELS)}")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"log_format {self.log_format!r} must be one of "
                              f"{', '.join(LOG_FORMATS)}")
        self.tls()  # a key without a certificate is an error now, not at connect time

    def tls(self) -> TlsFiles:
        """What MqttLink needs for TLS; files are checked when the link is created."""
        return TlsFiles(ca_file=self.ca_file, cert_file=self.cert_file, key_file=self.key_file)
