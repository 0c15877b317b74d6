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


class SecureAggregationError(FedmqError):
    """A secure-aggregation round cannot complete or a party refuses a step that would
    leak an update (too few devices left, a share that does not decrypt, a request to
    reveal both secrets of one device). The round is lost; no update is revealed.

    `reason` is a short stable token used as a counter key.
    """

    def __init__(self, message: str, *, reason: str = "failed") -> None:
        super().__init__(message)
        self.reason = reason


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


def require(module: str, extra: str, *, package: str = ""):
    """Import an optional heavy dependency lazily, or explain which extra provides it.

    `package` names what to install when `module` is a submodule of it (the message then
    says 'cryptography', not 'cryptography.hazmat.primitives.ciphers')."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(package or module, extra) from exc
