"""TLS settings of one MQTT connection: which CA to trust and which client certificate to show.

Checked before connecting, so a missing or unreadable file is a ConfigError naming the
config key, not an SSL stack trace on paho's thread every 30 seconds.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from fedmq.errors import ConfigError

MIN_VERSION = ssl.TLSVersion.TLSv1_2


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files; empty strings mean none (no ca_file: the system's trusted CAs)."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    def __post_init__(self) -> None:
        if self.key_file and not self.cert_file:
            raise ConfigError("key_file is set but cert_file is not: a client certificate "
                              "needs both (fedmq enroll DEVICE --cert prints them)")

    def __bool__(self) -> bool:
        return bool(self.ca_file or self.cert_file or self.key_file)

    def context(self) -> ssl.SSLContext:
        """A client context that verifies the broker's certificate and host name."""
        for key in ("ca_file", "cert_file", "key_file"):
            _check_readable(key, getattr(self, key))
        try:
            context = ssl.create_default_context(cafile=self.ca_file or None)
        except ssl.SSLError as exc:
            raise ConfigError(f"ca_file {self.ca_file}: not a PEM CA certificate "
                              f"({exc.reason or exc})") from None
        context.minimum_version = MIN_VERSION
        context.sslsocket_class = _ClosingSSLSocket
        if self.cert_file:
            try:
                # A service has no terminal: never let OpenSSL prompt for a passphrase.
                context.load_cert_chain(self.cert_file, self.key_file or None,
                                        password=_no_passphrase)
            except ssl.SSLError as exc:
                raise ConfigError(
                    f"cert_file {self.cert_file} / key_file {self.key_file or '(none)'}: "
                    f"not a matching PEM certificate and unencrypted key "
                    f"({exc.reason or exc})") from None
        return context


def _no_passphrase() -> bytes:
    return b""


class _ClosingSSLSocket(ssl.SSLSocket):
    """Closes itself when its handshake fails: paho 2.2 drops such a socket unclosed, one
    leaked file descriptor per retry against a broker that rejects us."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise  # a non-blocking handshake in progress, not a failure
        except OSError:
            self.close()
            raise


def describe_tls_failure(exc: BaseException | None) -> str:
    """One line for a failed TLS connect, with what to check."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"the broker's certificate was not accepted ({exc.verify_message}); check "
                "ca_file is the fleet CA and the broker URL's host is in the server "
                "certificate (fedmq certs issue server --host ...)")
    if isinstance(exc, ssl.SSLError):
        return (f"TLS handshake failed ({exc.reason or exc}); if the broker requires client "
                "certificates, check cert_file/key_file were issued by its CA")
    if exc is not None:
        return f"{type(exc).__name__}: {exc}"
    return "connection failed"


def _check_readable(key: str, path: str) -> None:
    if not path:
        return
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{key} {path} does not exist (or is not a file)")
    try:
        with file.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{key} {path} cannot be read: {exc.strerror}; the service's "
                          "user needs read access") from None
