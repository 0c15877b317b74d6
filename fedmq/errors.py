"""One exception hierarchy for the whole project; messages say what to do next."""

from __future__ import annotations


class FedmqError(Exception):
    """Root of every error fedmq raises on purpose."""


class ConfigError(FedmqError):
    """A configuration file, flag or value is wrong."""


class ProtocolError(FedmqError):
    """A payload does not follow the wire protocol (malformed, unknown version, bad field).

    `reason` is a short stable token used as a rejection-counter key.
    """

    def __init__(self, message: str, *, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class CodecError(ProtocolError):
    """An encoded tensor cannot be decoded (truncated, unknown codec, wrong size)."""

    def __init__(self, message: str, *, reason: str = "bad_codec") -> None:
        super().__init__(message, reason=reason)


class BrokerError(FedmqError):
    """The MQTT broker cannot be reached, started or used."""


class DataError(FedmqError):
    """Training or evaluation data is missing, empty or malformed."""


class MissingExtraError(FedmqError):
    """An optional dependency is needed; the message names the extra to install."""

    def __init__(self, module: str, extra: str) -> None:
        super().__init__(
            f"this feature needs the '{module}' package: pip install 'fedmq[{extra}]'"
        )
        self.module = module
        self.extra = extra


def require(module: str, extra: str):
    """Import an optional heavy dependency lazily, or explain which extra provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(module, extra) from exc
