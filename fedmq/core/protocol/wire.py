"""msgpack envelope shared by every fedmq message: versioned, typed, never pickled.

Each message is a frozen dataclass whose fields carry a short wire key in their metadata
(envelope bytes matter once updates are compressed 100x). Decoding checks the protocol
version, the message kind and every field's type before anything else sees the data.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, field
from typing import Any, ClassVar, TypeVar, Union

import msgpack

from fedmq.errors import ConfigError, ProtocolError

# 2: updates moved to update/{bucket}/{device_id} (topics.py: topic layout 2). A
# version-1 peer meets a version-2 one with bad_version on the first message, instead of
# updates sent where nobody listens.
PROTOCOL_VERSION = 2
# Envelope keys start with "$"; field keys never do, so the two cannot collide.
VERSION_KEY = "$v"
KIND_KEY = "$k"
# msgpack refuses containers/strings larger than this before allocating them.
MAX_DECODED_BYTES = 256 * 1024 * 1024

T = TypeVar("T", bound="Message")


def wire(key: str, default: Any = MISSING, default_factory: Any = MISSING, *,
         omit_default: bool = False) -> Any:
    """A dataclass field sent under the wire key `key`. `omit_default`: left out of the
    payload while it holds its default (a field added later that most messages never set:
    the envelope of every update stays as small as it was)."""
    if not key or key.startswith("$"):
        raise ValueError(f"wire key {key!r} is empty or reserved for the envelope")
    if omit_default and default is MISSING:
        raise ValueError(f"wire key {key!r}: only a field with a default can be omitted")
    kwargs: dict[str, Any] = {"metadata": {"wire": key, "omit_default": omit_default}}
    if default is not MISSING:
        kwargs["default"] = default
    if default_factory is not MISSING:
        kwargs["default_factory"] = default_factory
    return field(**kwargs)


def unpack(payload: bytes) -> Any:
    """msgpack -> Python objects, turning every library failure into ProtocolError."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ProtocolError("payload is not bytes")
    try:
        return msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            max_bin_len=MAX_DECODED_BYTES,
            max_str_len=MAX_DECODED_BYTES,
        )
    except Exception as exc:  # msgpack raises many types; all mean "malformed"
        raise ProtocolError(f"payload is not valid msgpack: {exc}") from None


def peek_kind(payload: bytes) -> str:
    """The `$k` of a payload, for topics that carry several kinds; skips the field values
    instead of decoding them, so routing a big payload does not decode it twice."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ProtocolError("payload is not bytes")
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True,
                                max_buffer_size=max(len(payload), 1))
    kind: Any = None
    try:
        unpacker.feed(payload)
        for _ in range(unpacker.read_map_header()):
            if unpacker.unpack() == KIND_KEY:
                kind = unpacker.unpack()
                break
            unpacker.skip()
    except Exception as exc:  # msgpack raises many types; all mean "malformed"
        raise ProtocolError(f"payload is not a valid msgpack map: {exc}") from None
    if not isinstance(kind, str):
        raise ProtocolError(f"payload has no message kind ({KIND_KEY!r}): not a fedmq message")
    return kind


Checker = Callable[[Any, str], Any]


@functools.cache
def _checker(expected: Any) -> Checker:
    """A function that checks one decoded value against a (simple) type annotation and
    returns it normalised; built once per annotation, since working the annotation out
    with typing's introspection on every field of every message cost a device ~1 ms of
    CPU per round (a yappi profile of digits rounds)."""
    origin = typing.get_origin(expected)
    if origin in (Union, types.UnionType):
        options = tuple(_checker(option) for option in typing.get_args(expected))

        def check_union(value: Any, where: str) -> Any:
            for option in options:
                try:
                    return option(value, where)
                except ProtocolError:
                    pass
            raise ProtocolError(f"{where}: {value!r:.40} matches none of {expected}")
        return check_union
    if expected is type(None):
        def check_nil(value: Any, where: str) -> None:
            if value is None:
                return None
            raise ProtocolError(f"{where}: expected nil")
        return check_nil
    if expected is Any:
        return lambda value, where: value
    if dataclasses.is_dataclass(expected) and issubclass(expected, WireObject):
        return expected.from_wire
    name = getattr(expected, "__name__", str(expected))

    def wrong(value: Any, where: str) -> typing.NoReturn:
        raise ProtocolError(f"{where}: expected {name}, got {type(value).__name__}")

    if expected is float:
        def check_float(value: Any, where: str) -> float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            wrong(value, where)
        return check_float
    if expected is int:
        def check_int(value: Any, where: str) -> int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            wrong(value, where)
        return check_int
    if expected is bytes:
        def check_bytes(value: Any, where: str) -> bytes:
            if isinstance(value, (bytes, bytearray)):
                return bytes(value)
            wrong(value, where)
        return check_bytes
    if expected in (str, bool):
        def check_scalar(value: Any, where: str) -> Any:
            if isinstance(value, expected):
                return value
            wrong(value, where)
        return check_scalar
    if origin in (dict,) or expected is dict:
        def check_map(value: Any, where: str) -> dict:
            if isinstance(value, dict):
                return value
            wrong(value, where)
        return check_map
    if origin in (list, tuple) or expected in (list, tuple):
        args = typing.get_args(expected)
        if args and origin is list:
            item = _checker(args[0])

            def check_list_of(value: Any, where: str) -> list:
                if isinstance(value, (list, tuple)):
                    inner = f"{where}[]"
                    return [item(v, inner) for v in value]
                wrong(value, where)
            return check_list_of
        as_list = origin is list

        def check_sequence(value: Any, where: str) -> Any:
            if isinstance(value, (list, tuple)):
                return list(value) if as_list else tuple(value)
            wrong(value, where)
        return check_sequence
    raise TypeError(f"unsupported wire type {expected!r}")  # a message definition's bug


@functools.cache
def _schema(cls: type) -> tuple[tuple[str, str, Checker, bool], ...]:
    """(field name, wire key, checker, required) per field, resolved once per class:
    typing.get_type_hints costs more than decoding a whole update."""
    hints = typing.get_type_hints(cls)
    return tuple(
        (f.name, f.metadata["wire"], _checker(hints[f.name]),
         f.default is MISSING and f.default_factory is MISSING)
        for f in dataclasses.fields(cls)
    )


@functools.cache
def _wire_fields(cls: type) -> tuple[tuple[str, str, bool, Any], ...]:
    """(field name, wire key, omit_default, default) per field, once per class."""
    return tuple((f.name, f.metadata["wire"], bool(f.metadata.get("omit_default")),
                  f.default) for f in dataclasses.fields(cls))


class WireObject:
    """A dataclass that converts to and from a msgpack map with short keys."""

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, key, omit_default, default in _wire_fields(type(self)):
            value = getattr(self, name)
            if omit_default and value == default:
                continue
            if isinstance(value, WireObject):
                value = value.to_wire()
            elif isinstance(value, (list, tuple)):
                value = [v.to_wire() if isinstance(v, WireObject) else v for v in value]
            out[key] = value
        return out

    @classmethod
    def from_wire(cls: type[Any], data: Any, where: str = "") -> Any:
        where = where or cls.__name__
        if not isinstance(data, dict):
            raise ProtocolError(f"{where}: expected a map, got {type(data).__name__}")
        kwargs = {}
        for name, key, check, required in _schema(cls):
            if key not in data:
                if required:
                    raise ProtocolError(f"{where}: missing field {key!r} ({name})")
                continue
            kwargs[name] = check(data[key], f"{where}.{name}")
        try:
            return cls(**kwargs)
        except ProtocolError:
            raise
        except (ConfigError, ValueError, TypeError) as exc:
            raise ProtocolError(f"{where}: {exc}", reason="bad_field") from None


class Message(WireObject):
    """A top-level payload: adds the protocol version and the message kind."""

    KIND: ClassVar[str] = ""

    def to_payload(self) -> bytes:
        body = self.to_wire()
        body[VERSION_KEY] = PROTOCOL_VERSION
        body[KIND_KEY] = self.KIND
        return msgpack.packb(body, use_bin_type=True)

    @classmethod
    def from_payload(cls: type[T], payload: bytes) -> T:
        return decode_any(payload, cls)


def decode_any(payload: bytes, *kinds: type[T]) -> T:
    """The payload as whichever of `kinds` it names, unpacked once: a topic that carries
    several kinds need not walk a 1 MB update twice to learn which one it is."""
    where = " or ".join(cls.__name__ for cls in kinds)
    data = unpack(payload)
    if not isinstance(data, dict):
        raise ProtocolError(f"{where}: payload is not a map")
    version = data.get(VERSION_KEY)
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"{where}: protocol version {version!r} is not supported "
            f"(this build speaks {PROTOCOL_VERSION}); upgrade the older side",
            reason="bad_version",
        )
    kind = data.get(KIND_KEY)
    for cls in kinds:
        if kind == cls.KIND:
            return cls.from_wire(data)
    raise ProtocolError(f"{where}: message kind {kind!r:.40} where "
                        f"{' or '.join(repr(cls.KIND) for cls in kinds)} belongs",
                        reason="wrong_kind")
